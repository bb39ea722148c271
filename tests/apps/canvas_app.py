"""A node's app for workflow tests: starts chords and chains of canvas_tasks; their runs write a ledger.

Environment: CANVAS_LEDGER (see canvas_tasks).
"""

from flask import Flask, jsonify, request

import greenqueue
from greenqueue import chain, chord

from .canvas_tasks import body, member, step  # noqa: F401  (registers the tasks)

app = Flask(__name__)


@app.post("/chord")
def start_chord():
    n = int(request.args.get("n", "10"))
    seconds = float(request.args.get("seconds", "0"))
    r = chord([member.s(i, seconds) for i in range(n)], body.s()).delay()
    return jsonify(id=r.id)


@app.post("/chain")
def start_chain():
    seconds = float(request.args.get("seconds", "0"))
    r = chain(step.s([], "s1", 0), step.s("s2", seconds), step.s("s3", 0)).delay()
    return jsonify(id=r.id)


@app.get("/result/<task_id>")
def result(task_id):
    r = greenqueue.result(task_id)
    if r is None:
        return jsonify(state=None), 404
    return jsonify(state=r.state, result=r.result if r.successful() else None)
