"""Celery side of the end-to-end bench: the same view and task, with a Redis broker."""

import os
import time

import redis
from celery import Celery
from flask import Flask, request

BROKER = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
celery = Celery("e2e", broker=BROKER)
celery.conf.update(task_ignore_result=True, worker_prefetch_multiplier=64, broker_connection_retry_on_startup=True)
_redis = redis.Redis.from_url(BROKER)
app = Flask(__name__)


@celery.task
def io_task(sent):
    """5 ms of I/O, then record how long after the request the task finished."""
    time.sleep(0.005)
    _redis.rpush("bench:latency", time.time() - sent)


@app.post("/work")
def work():
    io_task.delay(float(request.args["t"]))
    return "queued"
