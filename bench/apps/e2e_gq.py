"""greenqueue side of the end-to-end bench: a view spawns a task that does 5 ms of I/O."""

import time

import gevent
from flask import Flask, jsonify, request

from greenqueue import task

app = Flask(__name__)
latencies = []


@task
def io_task(sent):
    """5 ms of I/O, then record how long after the request the task finished."""
    gevent.sleep(0.005)
    latencies.append(time.time() - sent)


@app.post("/work")
def work():
    io_task.spawn(float(request.args["t"]))
    return "queued"


@app.get("/stats")
def stats():
    return jsonify(latencies=latencies)
