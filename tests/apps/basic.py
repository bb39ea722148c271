"""A small Flask app the server tests drive over real HTTP."""

import os
import time

import gevent
from gevent.event import Event
from flask import Flask, Response, jsonify, request, stream_with_context

import greenqueue
from greenqueue import task

app = Flask(__name__)


@task
def write_later(path, seconds):
    """Sleeps, then writes ``path``: observable proof the task ran to the end."""
    gevent.sleep(seconds)
    with open(path, "w") as fh:
        fh.write("done")
    return path
_release = Event()
_stream_closed = Event()


@app.get("/")
def hello():
    return "Hello, greenqueue!"


@app.route("/echo", methods=["POST", "PUT"])
def echo():
    return request.get_data()


@app.get("/env")
def env():
    return jsonify(remote_addr=request.environ.get("REMOTE_ADDR"), scheme=request.scheme,
                   path=request.path, query=request.query_string.decode())


@app.get("/slow")
def slow():
    marker = request.args.get("marker")
    if marker:
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
    gevent.sleep(float(request.args.get("seconds", "1")))
    return "slow done"


@app.get("/stream")
def stream():
    """Yields one chunk, then waits for /release before the last one."""
    _release.clear()
    _stream_closed.clear()

    def generate():
        try:
            yield "first\n"
            _release.wait(30)
            yield "last\n"
        finally:
            _stream_closed.set()

    return Response(stream_with_context(generate()), mimetype="text/plain")


@app.get("/burst/<int:n>")
def burst(n):
    """Yields ``n`` chunks back to back, then waits for /release before the last one."""
    _release.clear()

    def generate():
        for i in range(n):
            yield "%d\n" % i
        _release.wait(30)
        yield "last\n"

    return Response(generate(), mimetype="text/plain")


@app.get("/stream-closed")
def stream_closed():
    return "yes" if _stream_closed.wait(float(request.args.get("wait", "0"))) else "no"


@app.get("/release")
def release():
    _release.set()
    return "released"


@app.get("/count/<int:n>")
def count(n):
    def generate():
        for i in range(n):
            yield "%d\n" % i
    return Response(generate(), mimetype="text/plain")


@app.get("/boom")
def boom():
    raise RuntimeError("boom")


@app.get("/timeout-escapes")
def timeout_escapes():
    """A view whose own gevent.Timeout fires and is not caught."""
    gevent.Timeout.start_new(0.01)
    gevent.sleep(1)
    return "unreachable"


@app.get("/timeout-escapes-mid-stream")
def timeout_escapes_mid_stream():
    def generate():
        yield "started\n"
        gevent.Timeout.start_new(0.01)
        gevent.sleep(1)
        yield "unreachable\n"
    return Response(generate(), mimetype="text/plain")


@app.get("/nocontent")
def nocontent():
    return "", 204


@app.get("/time")
def now():
    return str(time.time())


@app.post("/spawn")
def spawn_task():
    r = write_later.spawn(request.form["path"], float(request.form.get("seconds", "0")))
    return jsonify(id=r.id, state=r.state)


@app.get("/task/<task_id>")
def task_state(task_id):
    r = greenqueue.result(task_id)
    if r is None:
        return jsonify(error="unknown task"), 404
    return jsonify(id=r.id, state=r.state, result=r.result if r.successful() else None)
