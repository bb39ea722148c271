"""Django's own test tasks (django/tests/tasks/tasks.py), for either home of the framework."""

import time

try:
    from django.tasks import TaskContext, task
except ImportError:  # Django 5.2 with the backport
    from django_tasks import TaskContext, task


@task()
def noop_task(*args: tuple, **kwargs: dict) -> None:
    return None


@task
def noop_task_from_bare_decorator(*args: tuple, **kwargs: dict) -> None:
    return None


@task()
def calculate_meaning_of_life() -> int:
    return 42


@task()
def failing_task_value_error() -> None:
    raise ValueError("This task failed due to ValueError")


@task()
def failing_task_system_exit() -> None:
    raise SystemExit("This task failed due to SystemExit")


@task()
def complex_exception() -> None:
    raise ValueError(ValueError("This task failed"))


@task()
def complex_return_value() -> object:
    # Return something which isn't JSON serializable nor picklable.
    return lambda: True


@task()
def sleep_for(seconds: float) -> None:
    time.sleep(seconds)


@task(takes_context=True)
def get_task_id(context) -> str:
    return context.task_result.id


@task(takes_context=True)
def test_context(context, attempt) -> None:
    assert isinstance(context, TaskContext)
    assert context.attempt == attempt


@task(priority=10, queue_name="default")
def urgent(label: str) -> str:
    return label


@task()
def count_users() -> int:
    """Touches the ORM: opens a database connection in the task's greenlet."""
    from django.contrib.auth.models import User
    return User.objects.count()
