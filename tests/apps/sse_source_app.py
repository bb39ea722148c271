"""An SSE source (ids 1..N, resumable with Last-Event-ID, hanging up every few events) and its consumer."""

import json
import os

import gevent
from flask import Flask, Response, request

import greenqueue

app = Flask(__name__)
TOTAL = int(os.environ.get("SSE_TOTAL", "12"))
HANG_UP_EVERY = int(os.environ.get("SSE_HANG_UP_EVERY", "5"))
SOURCE = os.environ.get("SSE_SOURCE")  # set only in the consuming server
OUT = os.environ.get("GQ_TEST_OUT", ".")
failed_once = set()


@app.get("/events")
def events():
    start = int(request.headers.get("Last-Event-ID", "0")) + 1

    def stream():
        sent = 0
        for i in range(start, TOTAL + 1):
            yield "id: %d\nevent: tick\ndata: %s\n\n" % (i, json.dumps({"i": i}))
            sent += 1
            gevent.sleep(0.01)
            if sent == HANG_UP_EVERY:
                return  # hang up: the consumer must reconnect with Last-Event-ID
        while True:
            gevent.sleep(1)
            yield ": idle\n\n"
    return Response(stream(), mimetype="text/event-stream")


if SOURCE:
    @greenqueue.consume(SOURCE, batch_size=3, batch_interval=0.2)
    def on_events(messages):
        ids = [m.id for m in messages]
        if "7" in ids and "7" not in failed_once:
            failed_once.add("7")
            raise RuntimeError("batch with event 7 fails once")
        with open(os.path.join(OUT, "sse.jsonl"), "a") as fh:
            fh.write(json.dumps({"ids": ids, "events": [m.event for m in messages],
                                 "bodies": [m.body for m in messages]}) + "\n")
