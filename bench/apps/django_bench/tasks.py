"""The Django task of the greenqueue stack (greenqueue's node finds it as Django's autodiscovery would)."""

try:
    from django.tasks import task
except ImportError:  # Django 5.2 with the backport
    from django_tasks import task


@task()
def noop(n: int) -> int:
    """A no-op task with one JSON argument, as bench_cluster's."""
    return n
