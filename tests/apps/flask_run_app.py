"""A plain Flask app run by ``flask run`` (Werkzeug's threaded dev server), not by greenqueue."""

import os

from flask import Flask, jsonify

import greenqueue

app = Flask(__name__)
OUT = os.environ.get("OUTSIDE_TEST_OUT", ".")


@greenqueue.task
def write_file(name, text):
    """Write ``text`` to ``name`` under the test's directory, from a task greenlet."""
    with open(os.path.join(OUT, name), "w") as fh:
        fh.write(text)
    return text


@app.post("/spawn/<name>")
def spawn(name):
    r = write_file.spawn(name, "from a task")
    return jsonify(id=r.id, state=r.state)


@app.get("/result/<task_id>")
def result(task_id):
    r = greenqueue.result(task_id)
    return jsonify(state=r.state if r is not None else None)
