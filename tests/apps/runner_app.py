"""An app that shows what leaks from one request to the next on the same runner greenlet.

Each route answers what it found before it changed anything; the tests compare.
"""

import contextvars
import threading

import gevent
from flask import Flask, g, jsonify, request

app = Flask(__name__)
leaky = contextvars.ContextVar("leaky")
local = threading.local()  # a gevent local once the server patched threading: per runner, as per thread


@app.get("/leak")
def leak():
    found = {"g": getattr(g, "marker", None), "contextvar": leaky.get(None),
             "local": getattr(local, "marker", None), "arg": request.args.get("m")}
    g.marker = request.args.get("m")
    leaky.set(request.args.get("m"))  # never reset: a thread-pool server would keep it per request only
    local.marker = request.args.get("m")
    return jsonify(found)


BLOCKING = []


@app.get("/block")
def block():
    BLOCKING.append(1)
    try:
        gevent.sleep(float(request.args.get("s", "1")))
    finally:
        BLOCKING.pop()
    return "blocked"


@app.get("/blocking")
def blocking():
    return str(len(BLOCKING))


@app.get("/hello")
def hello():
    return "hello"
