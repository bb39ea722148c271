"""The Celery task of the Celery stack (not tasks.py, so the greenqueue node never imports Celery)."""

from celery import shared_task


@shared_task(name="bench.django.noop")
def noop(n: int) -> int:
    """A no-op task with one JSON argument, as bench_cluster's."""
    return n
