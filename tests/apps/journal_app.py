"""A Flask app whose tasks leave observable traces, for the journal tests."""

import os
import time

import gevent
from flask import Flask, jsonify, request

import greenqueue
from greenqueue import task

app = Flask(__name__)
OUT = os.environ.get("JOURNAL_TEST_OUT", ".")
# Seconds a task sleeps are multiplied by this: 1 on the first run, 0 after a restart.
SLOW = float(os.environ.get("JOURNAL_TEST_SLOW", "1"))


@task
def record(name, seconds=0.0):
    """Sleep, then append ``name <time>`` to done.log."""
    if seconds * SLOW:
        gevent.sleep(seconds * SLOW)
    with open(os.path.join(OUT, "done.log"), "a") as fh:
        fh.write("%s %.3f\n" % (name, time.time()))
    return name


@task
def explode():
    """Always fails."""
    raise ValueError("nope")


@app.errorhandler(greenqueue.JournalError)
def journal_failed(exc):
    """The task was not accepted; say so instead of pretending it will run."""
    return jsonify(error=str(exc)), 503


@app.post("/spawn")
def spawn():
    name = request.form["name"]
    seconds = float(request.form.get("seconds", "0"))
    delay = request.form.get("delay")
    r = record.spawn_later(float(delay), name, seconds) if delay else record.spawn(name, seconds)
    return jsonify(id=r.id)


@app.post("/explode")
def spawn_explode():
    return jsonify(id=explode.spawn().id)


@app.get("/task/<task_id>")
def state(task_id):
    r = greenqueue.result(task_id)
    if r is None:
        return jsonify(state="UNKNOWN"), 404
    body = {"state": r.state, "retries": r.retries}
    if r.ready():
        try:
            body["result"] = r.get()
        except Exception as exc:
            body["error"] = "%s: %s" % (type(exc).__name__, exc)
    return jsonify(body)
