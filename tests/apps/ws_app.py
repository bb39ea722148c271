"""WebSocket apps as their users write them for gunicorn -k gevent: flask-sock, Flask-SocketIO, gevent-websocket.

Nothing here knows about greenqueue: the same module runs under gunicorn in the bench.
"""

import os

from flask import Flask, request
from flask_sock import Sock
from flask_socketio import SocketIO, emit

app = Flask(__name__)
sock = Sock(app)
# Flask-SocketIO's recommended production mode; WebSocket transport through the server's socket.
socketio = SocketIO(app, async_mode="gevent")


@app.route("/health")
def health():
    return "ok"


@app.route("/plain")
def plain():
    return "plain %s" % request.headers.get("Upgrade", "-")


@app.route("/driver")
def driver():
    # Which WebSocket driver python-engineio picked: gevent-websocket's when it is installed.
    from engineio.async_drivers._websocket_wsgi import SimpleWebSocketWSGI
    cls = socketio.server.eio._async["websocket"]
    return "simple-websocket" if issubclass(cls, SimpleWebSocketWSGI) else "gevent-websocket"


@sock.route("/echo")
def echo(ws):
    while True:
        data = ws.receive()
        if data == "bye":
            break  # flask-sock closes with 1000 and the server writes nothing more
        ws.send(data)


@sock.route("/hello-and-return")
def hello_and_return(ws):
    ws.send("hello")


@sock.route("/crash")
def crash(ws):
    ws.send("about to fail")
    raise RuntimeError("boom in a WebSocket handler")


@app.route("/gws", websocket=True)  # Werkzeug routes an Upgrade request only to such rules
def gevent_websocket_echo():
    # An app written against gevent-websocket's environ["wsgi.websocket"].
    ws = request.environ.get("wsgi.websocket")
    if ws is None:
        return "expected a WebSocket", 400
    while True:
        msg = ws.receive()
        if msg is None or msg == "bye":
            break
        ws.send(msg)
    return ""


@app.route("/gws-open", websocket=True)
def gevent_websocket_left_open():
    ws = request.environ["wsgi.websocket"]
    ws.send("left open")
    return ""  # the server closes it with 1000, as gevent-websocket's handler does


@socketio.on("echo")
def on_echo(data):
    emit("echoed", {"data": data, "pid": os.getpid()})


@socketio.on("broadcast")
def on_broadcast(data):
    emit("announced", data, broadcast=True)
