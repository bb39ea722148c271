"""A Flask app with a RabbitMQ consumer, next to its views in one server process (tests)."""

import json
import os

import gevent
from flask import Flask, jsonify

import greenqueue

URL = os.environ.get("GQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
OUT = os.environ.get("GQ_TEST_OUT", ".")
BATCH = int(os.environ.get("GQ_TEST_BATCH", "5"))
INTERVAL = float(os.environ.get("GQ_TEST_INTERVAL", "0.3"))
HANDLE_SECONDS = float(os.environ.get("GQ_TEST_HANDLE_SECONDS", "0"))

app = Flask(__name__)
seen_failures = set()


def record(kind, **data):
    with open(os.path.join(OUT, "consumed.jsonl"), "a") as fh:
        fh.write(json.dumps(dict(data, kind=kind)) + "\n")


@greenqueue.consume(URL, queues=["gq-test"], batch_size=BATCH, batch_interval=INTERVAL)
def handle(messages):
    bodies = [m.body for m in messages]
    record("start", bodies=bodies)
    for body in bodies:
        key = body.get("n")
        if body.get("fail_once") and key not in seen_failures:
            seen_failures.add(key)
            record("fail", bodies=bodies)
            raise RuntimeError("message %s fails the first time" % key)
    if HANDLE_SECONDS:
        gevent.sleep(HANDLE_SECONDS)
    record("done", bodies=bodies)


@app.get("/consumer")
def state():
    c = handle.consumer
    return jsonify(handled=c.handled, failed=c.failed)
