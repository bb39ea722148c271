"""A Flask app with a RabbitMQ consumer, next to its views in one server process (tests)."""

import json
import os

import gevent
from flask import Flask, jsonify

import greenqueue
from greenqueue.hooks import state

URL = os.environ.get("GQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
OUT = os.environ.get("GQ_TEST_OUT", ".")
BATCH = int(os.environ.get("GQ_TEST_BATCH", "5"))
INTERVAL = float(os.environ.get("GQ_TEST_INTERVAL", "0.3"))
HANDLE_SECONDS = float(os.environ.get("GQ_TEST_HANDLE_SECONDS", "0"))

app = Flask(__name__)


def record(kind, **data):
    with open(os.path.join(OUT, "consumed.jsonl"), "a") as fh:
        fh.write(json.dumps(dict(data, kind=kind)) + "\n")


@greenqueue.on_startup
def open_sink():
    """Consumers start after start-up hooks, so the handler can rely on this state."""
    state.seen_failures = set()
    record("startup")


@greenqueue.on_shutdown
def close_sink():
    """Consumers stop (finishing their batch) before shutdown hooks run."""
    record("shutdown")


@greenqueue.consume(URL, queues=["gq-test"], batch_size=BATCH, batch_interval=INTERVAL)
def handle(messages):
    for m in messages:
        if isinstance(m.body, bytes):  # content kombu would not decode arrives as raw bytes
            record("raw", bodies=[m.body.hex()])
            m.ack()
    messages = [m for m in messages if m.settled is None]
    bodies = [m.body for m in messages]
    record("start", bodies=bodies)
    for body in bodies:
        key = body.get("n")
        if body.get("fail_once") and key not in state.seen_failures:
            state.seen_failures.add(key)
            record("fail", bodies=bodies)
            raise RuntimeError("message %s fails the first time" % key)
    kept = []
    for m in messages:
        # Settle single messages; the rest are acked when the handler returns.
        if m.body.get("drop"):
            m.reject(requeue=False)
            record("dropped", bodies=[m.body])
        elif m.body.get("retry_once") and ("r", m.body["n"]) not in state.seen_failures:
            state.seen_failures.add(("r", m.body["n"]))
            m.reject(requeue=True)
            record("requeued", bodies=[m.body])
        else:
            kept.append(m.body)
    if HANDLE_SECONDS:
        gevent.sleep(HANDLE_SECONDS)
    record("done", bodies=kept)


@app.get("/consumer")
def stats():
    c = handle.consumer
    return jsonify(handled=c.handled, failed=c.failed, requeued=c.requeued, rejected=c.rejected)
