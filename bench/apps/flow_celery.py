"""Celery side of the flow-control bench: the cluster app plus the probe under Celery's ``rate_limit``.

Celery enforces ``rate_limit`` in each worker (a token bucket per task per
worker process), not across the cluster: with N workers the total is N times it.
"""

import os

from bench.apps.cluster_celery import celery, probe
from bench.apps.cluster_probe import report

__all__ = ["celery", "probe", "rated", "RATE"]

RATE = os.environ.get("BENCH_RATE_LIMIT", "10000/s")


@celery.task(name="bench.flow.rated", rate_limit=RATE)
def rated(t):
    """The probe under Celery's per-worker rate limit."""
    report(t)
