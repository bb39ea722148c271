"""WebSockets on real server processes, driven by the libraries' own clients.

flask-sock (simple-websocket), Flask-SocketIO (python-engineio in gevent mode,
with and without gevent-websocket installed) and an app written against
gevent-websocket's ``wsgi.websocket`` run unchanged; a raw wsproto client checks
what the server writes (nothing) after the app returns.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
import simple_websocket
import socketio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from .conftest import ROOT, wait_for

pytestmark = [pytest.mark.realproc]

APP = "tests.apps.ws_app:app"
GEVENT_WEBSOCKET = ROOT / ".venv" / "gevent-websocket"


@pytest.fixture(scope="session")
def gevent_websocket_path():
    """A directory holding gevent-websocket, for servers that should find it installed."""
    if not (GEVENT_WEBSOCKET / "geventwebsocket").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(GEVENT_WEBSOCKET), "gevent-websocket==0.10.1"], check=True)
    return str(GEVENT_WEBSOCKET)


def ws_url(srv, path):
    return "ws://127.0.0.1:%d%s" % (srv.port, path)


class RawClient:
    """A WebSocket client on wsproto that keeps every byte the server sends."""

    def __init__(self, port, path):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host="127.0.0.1", target=path)))
        self.events = []
        while not any(isinstance(e, AcceptConnection) for e in self.events):
            self._read()

    def _read(self):
        data = self.sock.recv(65536)
        if data:
            self.ws.receive_data(data)
            self.events.extend(self.ws.events())
        return data

    def until_eof(self):
        """Read until the server closes the TCP connection; return the events seen."""
        try:
            while self._read():
                pass
        finally:
            self.sock.close()
        return self.events


def test_flask_sock_echo_and_end_of_socket(server_factory):
    srv = server_factory(APP)
    ws = simple_websocket.Client.connect(ws_url(srv, "/echo"))
    for i in range(200):
        ws.send("message %d" % i)
        assert ws.receive(timeout=5) == "message %d" % i
    ws.send(b"\x00\xffbinary")
    assert ws.receive(timeout=5) == b"\x00\xffbinary"
    ws.send("bye")
    with pytest.raises(simple_websocket.ConnectionClosed) as closed:
        ws.receive(timeout=5)
    assert closed.value.reason == 1000
    # Ordinary requests still work, and the takeover left no error in the log.
    assert requests.get(srv.url + "/plain", timeout=5).text == "plain -"
    assert srv.stop() == 0
    log = srv.log()
    assert "Traceback" not in log and "ERROR" not in log, log


def test_nothing_is_written_after_the_app_returns(server_factory):
    srv = server_factory(APP)
    # flask-sock: the handler returns, flask-sock closes with 1000 and raises StopIteration.
    events = RawClient(srv.port, "/hello-and-return").until_eof()
    kinds = [type(e) for e in events]
    assert kinds == [AcceptConnection, TextMessage, CloseConnection], events
    assert events[1].data == "hello" and events[2].code == 1000
    # gevent-websocket's object left open by the app: the server closes it with 1000, like gevent-websocket.
    events = RawClient(srv.port, "/gws-open").until_eof()
    assert [type(e) for e in events] == [AcceptConnection, TextMessage, CloseConnection], events
    assert events[2].code == 1000
    # A handler that raises: Flask logs it and makes a 500 response; no HTTP bytes follow the 101.
    raw = RawClient(srv.port, "/crash")
    events = raw.until_eof()
    assert [type(e) for e in events][:2] == [AcceptConnection, TextMessage], events
    assert all(isinstance(e, (AcceptConnection, TextMessage, CloseConnection)) for e in events), events
    assert srv.stop() == 0
    log = srv.log()
    assert "boom in a WebSocket handler" in log  # Flask's own log line for the view
    assert "greenqueue._http" not in log, log  # and nothing from the server


def test_gevent_websocket_style_app_without_gevent_websocket(server_factory):
    srv = server_factory(APP)
    ws = simple_websocket.Client.connect(ws_url(srv, "/gws"))
    ws.send("text")
    assert ws.receive(timeout=5) == "text"
    big = os.urandom(200_000)  # several frames' worth, several reads
    ws.send(big)
    assert ws.receive(timeout=5) == big
    ws.send("bye")
    with pytest.raises(simple_websocket.ConnectionClosed):
        ws.receive(timeout=5)


@pytest.mark.parametrize("with_gevent_websocket", [False, True], ids=["simple-websocket", "gevent-websocket"])
def test_flask_socketio_in_gevent_mode_uses_the_websocket_transport(server_factory, gevent_websocket_path,
                                                                     with_gevent_websocket):
    env = {"PYTHONPATH": gevent_websocket_path} if with_gevent_websocket else {}
    srv = server_factory(APP, env=env)
    driver = requests.get(srv.url + "/driver", timeout=5).text
    assert driver == ("gevent-websocket" if with_gevent_websocket else "simple-websocket")
    clients = []
    got = {}
    for n in range(3):
        c = socketio.Client(reconnection=False)
        got[n] = []
        c.on("echoed", lambda data, n=n: got[n].append(data))
        c.on("announced", lambda data, n=n: got[n].append(("announced", data)))
        c.connect(srv.url, transports=["websocket"], wait_timeout=10)
        assert c.transport() == "websocket"
        clients.append(c)
    for n, c in enumerate(clients):
        c.emit("echo", "hi %d" % n)
    wait_for(lambda: all(got[n] for n in got), 10, message="echoes")
    assert [got[n][0]["data"] for n in range(3)] == ["hi 0", "hi 1", "hi 2"]
    clients[0].emit("broadcast", "to everyone")
    wait_for(lambda: all(("announced", "to everyone") in got[n] for n in got), 10, message="broadcast")
    for c in clients:
        c.disconnect()
    assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()


def test_upgrade_to_something_else_is_plain_http(server_factory):
    srv = server_factory(APP)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
        data = b""
        while b"plain h2c" not in data:
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")


def _metric(srv, name):
    for line in requests.get(srv.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError("no %s in the metrics" % name)


def test_websockets_show_in_metrics_and_dashboard_and_count_against_max_connections(server_factory):
    srv = server_factory(APP, "--max-connections", "3", "--metrics-path", "/metrics",
                         "--dashboard-path", "/_gq")
    a = simple_websocket.Client.connect(ws_url(srv, "/echo"))
    b = simple_websocket.Client.connect(ws_url(srv, "/echo"))
    wait_for(lambda: _metric(srv, "greenqueue_websockets") == 2, 5, message="2 open WebSockets in the metrics")
    state = requests.get(srv.url + "/_gq/state.json", timeout=5).json()
    assert state["http"]["websockets"] == 2
    # Two WebSockets and one more connection fill --max-connections 3: a fourth waits.
    held = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    held.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert held.recv(100).startswith(b"HTTP/1.1 200")
    waiting = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    waiting.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    waiting.settimeout(0.5)
    with pytest.raises(socket.timeout):
        waiting.recv(100)
    a.send("bye")
    with pytest.raises(simple_websocket.ConnectionClosed):
        a.receive(timeout=5)
    waiting.settimeout(5)
    assert waiting.recv(100).startswith(b"HTTP/1.1 200")  # served once a WebSocket closed
    waiting.close()
    held.close()
    wait_for(lambda: _metric(srv, "greenqueue_websockets") == 1, 5, message="1 open WebSocket")
    b.close()


def test_websockets_work_through_the_drain_then_hear_1001(server_factory):
    srv = server_factory(APP, "--graceful-timeout", "2")
    ws = simple_websocket.Client.connect(ws_url(srv, "/echo"))
    gws = simple_websocket.Client.connect(ws_url(srv, "/gws"))
    ws.send("before")
    assert ws.receive(timeout=5) == "before"
    srv.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopped accepting" in srv.log(), 5, message="the drain to start")
    started = time.monotonic()
    # Draining: open WebSockets keep working until the graceful timeout.
    ws.send("during the drain")
    assert ws.receive(timeout=5) == "during the drain"
    gws.send("also during")
    assert gws.receive(timeout=5) == "also during"
    for client in (ws, gws):
        with pytest.raises(simple_websocket.ConnectionClosed) as closed:
            client.receive(timeout=10)
        assert closed.value.reason == 1001
    assert time.monotonic() - started > 1.0  # not before the graceful timeout
    assert srv.proc.wait(10) == 0
    assert "closing 2 WebSocket(s) with 1001" in srv.log()


@pytest.mark.nginx
def test_flask_sock_and_socketio_through_the_projects_nginx(tmp_path, gevent_websocket_path):
    from .nginx_support import NginxFront
    front = NginxFront(tmp_path, app=APP, args=()).start()
    try:
        ws = simple_websocket.Client.connect("ws://127.0.0.1:%d/echo" % front.port)
        for i in range(20):
            ws.send("via nginx %d" % i)
            assert ws.receive(timeout=5) == "via nginx %d" % i
        ws.send("bye")
        with pytest.raises(simple_websocket.ConnectionClosed):
            ws.receive(timeout=5)
        c = socketio.Client(reconnection=False)
        got = []
        c.on("echoed", lambda data: got.append(data))
        c.connect(front.url, transports=["websocket"], wait_timeout=10)
        assert c.transport() == "websocket"
        c.emit("echo", "through nginx")
        wait_for(lambda: got, 10, message="the Socket.IO echo through nginx")
        assert got[0]["data"] == "through nginx"
        c.disconnect()
        # Ordinary requests keep nginx's upstream keep-alive (no Connection: upgrade leaks into them).
        assert requests.get(front.url + "/plain", timeout=5).text == "plain -"
    finally:
        assert front.stop() == 0
    log = front.server.log()
    assert "Traceback" not in log, log
