"""Celery side of the cluster bench: Redis broker and result backend, late acks, and the same view."""

import itertools
import os

from celery import Celery
from flask import Flask

from bench.apps.cluster_probe import report

BROKER = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
celery = Celery("cluster", broker=BROKER, backend=BROKER)
celery.conf.update(
    # A task is acknowledged after it ran: the at-least-once promise greenqueue makes.
    task_acks_late=True,
    # One backend for all task greenlets; the default (one per thread, so one per greenlet under the
    # gevent pool) opens a Redis connection per task and drained half as fast here.
    result_backend_thread_safe=True,
    # What the other Celery bench uses; the default (4 per slot) drained half as fast here.
    worker_prefetch_multiplier=64,
    broker_connection_retry_on_startup=True)
app = Flask(__name__)
_ids = itertools.count()


@celery.task(name="bench.probe")
def probe(t):
    """Report when this run started, relative to ``t`` (0: the absolute time)."""
    report(t)


@celery.task(name="bench.noop")
def noop(n):
    """A no-op task with one JSON argument."""
    return n


@app.get("/spawn")
def spawn():
    """Send one task per request to the broker."""
    noop.delay(next(_ids))
    return "spawned"
