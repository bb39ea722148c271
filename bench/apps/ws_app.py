"""The flask-sock echo app the WebSocket bench serves, unchanged, under greenqueue and gunicorn -k gevent."""

from flask import Flask
from flask_sock import Sock

app = Flask(__name__)
sock = Sock(app)


@sock.route("/echo")
def echo(ws):
    """Send every message back until the client says "bye"."""
    while True:
        data = ws.receive()
        if data == "bye":
            break
        ws.send(data)
