"""Django's task framework on greenqueue: Django's own backend tests (tests/tasks/), for a background backend.

The tasks are Django's test tasks; each test below follows one of Django's
ImmediateBackend tests (named the same), waiting for the background run where
Django's ran inline. Run on every store: memory, SQLite, PostgreSQL. This
module runs on whichever home of the framework is installed: the backport on
Python 3.11, ``django.tasks`` in the Django 6 run (Python 3.12+).
"""

import asyncio
import datetime
import logging
import os

import pytest

django = pytest.importorskip("django")

import greenqueue  # noqa: E402
from greenqueue import runtime  # noqa: E402

from .conftest import wait_for  # noqa: E402
from .pg_support import pg, pg_dsn  # noqa: F401,E402  (fixtures)

WAIT = 20


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Django set up once for this module, on an SQLite database of its own."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_site.settings")
    os.environ["DJANGO_DB"] = str(tmp_path_factory.mktemp("django") / "site.db")
    django.setup()
    from django.core.management import call_command
    call_command("migrate", run_syncdb=True, verbosity=0)
    from tests.django_site import tasks
    return tasks


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=[pytest.mark.postgres,
                                                                           pytest.mark.realproc])])
def backend(request, site, tmp_path):
    """The default task backend, its tasks run on each store in turn."""
    if request.param == "sqlite":
        greenqueue.configure(journal=str(tmp_path / "j.db"))
    elif request.param == "postgres":
        greenqueue.configure(journal=request.getfixturevalue("pg_dsn"))
    from greenqueue.django import FRAMEWORK
    if FRAMEWORK == "django.tasks":
        from django.tasks import default_task_backend
    else:
        from django_tasks import default_task_backend
    yield default_task_backend
    if request.param != "memory":
        runtime.get_runtime().close_store()


def logger_name():
    """Where the framework logs its task lines ("django.tasks", or the backport's "django_tasks")."""
    from greenqueue.django import FRAMEWORK
    return FRAMEWORK


def status():
    from greenqueue.django import TaskResultStatus
    return TaskResultStatus


def finished(result):
    """Refresh ``result`` until its run ended (the run is in the background here)."""
    wait_for(lambda: (result.refresh(), result.is_finished)[1] or None, WAIT, interval=0.02,
             message="task %s to finish" % result.id)
    return result


def invalid():
    from greenqueue.django import _invalid
    return _invalid()


def test_using_correct_backend(backend):
    from greenqueue.django import FRAMEWORK, GreenqueueBackend
    if FRAMEWORK == "django.tasks":
        from django.tasks import task_backends
    else:
        from django_tasks import task_backends
    assert isinstance(task_backends["default"], GreenqueueBackend)
    assert backend.alias == "default" and backend.options == {}
    assert backend.supports_defer and backend.supports_priority and backend.supports_get_result


def test_enqueue_task(backend, site):
    for task in [site.noop_task, site.noop_task_from_bare_decorator]:
        result = task.enqueue(1, two=3)
        assert result.status in (status().READY, status().RUNNING, status().SUCCESSFUL)
        finished(result)
        assert result.status == status().SUCCESSFUL and result.is_finished
        assert result.started_at is not None and result.last_attempted_at is not None
        assert result.finished_at is not None
        assert result.started_at >= result.enqueued_at and result.finished_at >= result.started_at
        assert result.return_value is None
        assert result.task == task
        assert result.args == [1] and result.kwargs == {"two": 3}
        assert result.attempts == 1 and len(result.worker_ids) == 1


def in_event_loop(coro_fn, *args):
    """Run an async call the way an ASGI view would: an event loop in a thread of its own (this hub keeps going)."""
    return greenqueue.run_in_thread(lambda: asyncio.run(coro_fn(*args)))


def test_enqueue_task_async(backend, site):
    result = in_event_loop(site.noop_task.aenqueue)
    finished(result)
    assert result.status == status().SUCCESSFUL and result.args == [] and result.kwargs == {}
    again = in_event_loop(backend.aget_result, result.id)
    assert again.id == result.id and again.status == status().SUCCESSFUL


def test_catches_exception(backend, site, caplog):
    for task, exception, message in [
            (site.failing_task_value_error, ValueError, "This task failed due to ValueError"),
            (site.failing_task_system_exit, SystemExit, "This task failed due to SystemExit")]:
        with caplog.at_level(logging.ERROR, logger=logger_name()):
            result = finished(task.enqueue())
        assert result.status == status().FAILED
        with pytest.raises(ValueError, match="Task failed"):
            result.return_value
        assert result.started_at >= result.enqueued_at and result.finished_at >= result.started_at
        assert result.errors[0].exception_class is exception
        assert message in result.errors[0].traceback
        if exception is ValueError:
            assert result.errors[0].traceback.endswith("ValueError: %s\n" % message), result.errors[0].traceback
        assert result.task == task and result.args == [] and result.kwargs == {}
    assert any("state=FAILED" in r.getMessage() for r in caplog.records), "Django's failure log line"


def test_complex_exception(backend, site):
    result = finished(site.complex_exception.enqueue())
    assert result.status == status().FAILED
    assert result.errors[0].exception_class is ValueError
    assert 'ValueError(ValueError("This task failed"))' in result.errors[0].traceback or \
        "This task failed" in result.errors[0].traceback


def test_complex_return_value(backend, site):
    result = finished(site.complex_return_value.enqueue())
    assert result.status == status().FAILED
    assert result.errors[0].exception_class is TypeError
    assert "Unsupported type" in result.errors[0].traceback


def test_result(backend, site):
    result = finished(backend.enqueue(site.calculate_meaning_of_life, [], {}))
    assert result.status == status().SUCCESSFUL and result.return_value == 42
    assert backend.get_result(result.id).return_value == 42


def test_get_result_of_an_unknown_id(backend):
    from greenqueue.django import TaskResultDoesNotExist
    with pytest.raises(TaskResultDoesNotExist):
        backend.get_result("0" * 32)
    with pytest.raises(TaskResultDoesNotExist):
        greenqueue.spawn(lambda: 1).get(WAIT) and backend.get_result(greenqueue.spawn(lambda: 1).id)


def test_run_after(backend, site):
    from django.utils import timezone
    later = timezone.now() + datetime.timedelta(seconds=0.5)
    result = site.calculate_meaning_of_life.using(run_after=later).enqueue()
    assert result.status == status().READY
    finished(result)
    assert result.started_at >= later


def test_priority(backend, site):
    import gevent.event
    gate = gevent.event.Event()
    greenqueue.configure(max_concurrency=1)
    blocker = greenqueue.spawn(gate.wait, WAIT)
    low = site.urgent.using(priority=-10).enqueue("low")
    high = site.urgent.using(priority=50).enqueue("high")
    gate.set()
    blocker.get(WAIT)
    finished(low), finished(high)
    assert high.started_at <= low.started_at


def test_takes_context(backend, site):
    result = finished(site.get_task_id.enqueue())
    assert result.return_value == result.id


def test_context(backend, site):
    result = finished(site.test_context.enqueue(1))
    assert result.status == status().SUCCESSFUL


def test_validate_on_enqueue(backend, site, settings_override=None):
    from django.test import override_settings
    with override_settings(TASKS={"default": {"BACKEND": "greenqueue.django.GreenqueueBackend",
                                              "QUEUES": ["queue-1"]}}):
        with pytest.raises(invalid(), match="Queue 'unknown_queue' is not valid for backend"):
            site.noop_task.using(queue_name="unknown_queue").enqueue()


def test_enqueue_logs(backend, site, caplog):
    with caplog.at_level(logging.DEBUG, logger=logger_name()):
        result = finished(site.noop_task.enqueue())
        wait_for(lambda: any("state=SUCCESSFUL" in r.getMessage() for r in caplog.records) or None, WAIT)
    lines = [r.getMessage() for r in caplog.records if r.name == logger_name() and result.id in r.getMessage()]
    assert "enqueued" in lines[0] and "state=RUNNING" in lines[1] and "state=SUCCESSFUL" in lines[2], lines


def test_orm_tasks_close_their_connections(backend, site):
    from django.db import connections
    results = [site.count_users.enqueue() for _ in range(20)]
    for r in results:
        finished(r)
        assert r.status == status().SUCCESSFUL and r.return_value == 0
    # Here tasks run on this thread's hub, so they share its connection: each run closed it as
    # the request cycle does (CONN_MAX_AGE=0), so none is left open after them.
    assert connections["default"].connection is None
