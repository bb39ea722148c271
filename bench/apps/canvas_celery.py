"""Celery side of the canvas bench: the same three tasks on the cluster bench's Celery app (Redis broker and backend).

A chord needs the result backend; Redis's keeps its own counter of finished
members and sends the body from the worker that finished the last one.
"""

from bench.apps.cluster_celery import celery
from bench.apps.cluster_probe import report


@celery.task(name="bench.canvas.add")
def add(x, y):
    """A chord member: x + y."""
    return x + y


@celery.task(name="bench.canvas.tsum")
def tsum(nums, t0=None):
    """A chord's body: report its start (when timed), return the sum of the members' results."""
    if t0 is not None:
        report(t0)
    return sum(nums)


@celery.task(name="bench.canvas.inc")
def inc(n, t0=None):
    """A chain's step: n + 1 (the last one reports its start when timed)."""
    if t0 is not None:
        report(t0)
    return n + 1
