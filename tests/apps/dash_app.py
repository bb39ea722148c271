"""An app whose tasks the dashboard and metrics tests watch."""

import gevent
from flask import Flask, jsonify, request

import greenqueue
from greenqueue import every, periodic, task

app = Flask(__name__)
_release = gevent.event.Event()


@task
def slow_report(steps):
    """Reports progress, then waits for /release."""
    for i in range(steps):
        greenqueue.progress(i + 1, steps, "step %d" % (i + 1))
    _release.wait(30)
    return "done"


@task
def broken_import():
    """Always fails, with a traceback to show."""
    raise ValueError("the CSV has no header row")


@periodic(every(minutes=10))
def housekeeping():
    return None


@app.post("/spawn/<kind>")
def spawn(kind):
    _release.clear()
    r = slow_report.spawn(int(request.args.get("steps", "3"))) if kind == "slow" else broken_import.spawn()
    return jsonify(id=r.id)


@app.post("/release")
def release():
    _release.set()
    return "ok"


@app.post("/later/<int:seconds>")
def later(seconds):
    # A journaled @task delayed this long waits in the store, not in this process's heap.
    return jsonify(id=broken_import.spawn_later(seconds).id)
