"""SSE endpoints the SSE bench serves: a fast stream and idle streams."""

import gevent
from flask import Flask, Response, request

app = Flask(__name__)


@app.get("/stream")
def stream():
    n = int(request.args.get("n", "10000"))

    def events():
        for i in range(n):
            yield 'data: {"i":%d}\n\n' % i
        yield "data: [DONE]\n\n"
    return Response(events(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


@app.get("/idle")
def idle():
    def events():
        yield ": connected\n\n"
        while True:
            gevent.sleep(30)
            yield ": keep-alive\n\n"
    return Response(events(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
