"""A RabbitMQ consumer for the fault tests: poison messages, heartbeats, keepalive (tests).

Every delivery the handler sees is written to ``ledger.jsonl`` before anything
else, so the tests count attempts from the handler's side, not greenqueue's.
"""

import json
import os
import socket

import gevent
from flask import Flask, jsonify

import greenqueue

URL = os.environ["GQ_TEST_AMQP_URL"]
QUEUE = os.environ["GQ_TEST_QUEUE"]
OUT = os.environ.get("GQ_TEST_OUT", ".")
HANDLE_SECONDS = float(os.environ.get("GQ_TEST_HANDLE_SECONDS", "0"))
SETTINGS = {}
if "GQ_TEST_HEARTBEAT" in os.environ:
    SETTINGS["heartbeat"] = float(os.environ["GQ_TEST_HEARTBEAT"])
if "GQ_TEST_MAX_DELIVERIES" in os.environ:
    SETTINGS["max_deliveries"] = int(os.environ["GQ_TEST_MAX_DELIVERIES"])

app = Flask(__name__)


def record(**data):
    with open(os.path.join(OUT, "ledger.jsonl"), "a") as fh:
        fh.write(json.dumps(data) + "\n")


@greenqueue.consume(URL, queues=[QUEUE], batch_size=1, **SETTINGS)
def handle(messages):
    for m in messages:
        record(kind="attempt", n=m.body["n"], deliveries=m.deliveries)
        if HANDLE_SECONDS:
            gevent.sleep(HANDLE_SECONDS)
        if m.body.get("poison"):
            raise ValueError("poison message %s" % m.body["n"])
        record(kind="done", n=m.body["n"])


@app.get("/consumer")
def stats():
    c = handle.consumer
    conn = c.reader.connection
    sock = None
    if conn is not None:
        sock = conn.connection.sock
    options = {}
    if sock is not None:
        options = {"SO_KEEPALIVE": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)}
        for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"):
            options[name] = sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
    return jsonify(connected=sock is not None, heartbeat=conn.get_heartbeat_interval() if conn else None,
                   socket=options, handled=c.handled, failed=c.failed, requeued=c.requeued, rejected=c.rejected,
                   dead_lettered=c.dead_lettered)
