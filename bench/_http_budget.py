"""Where one keep-alive request's time goes in greenqueue's HTTP layer, piece by piece, in this process.

Usage: ``python -m bench._http_budget``. Each piece runs in a tight loop on
the request wrk sends (``GET / HTTP/1.1`` with one Host header): parsing,
the environ, start_response, the response head, the app call (a bare WSGI
callable and the Flask hello), the hooks after the response, and the system
calls and greenlet switches a request costs on a loopback TCP connection.
Tight loops keep caches warm, so under load each piece costs more; the
server's CPU per request (bench_http) is the figure that includes that.

Concurrency model: one process, the main greenlet and a second greenlet for
the switch and wait pieces; monkey-patched like the server.
"""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gevent  # noqa: E402
import greenlet  # noqa: E402
from gevent import getcurrent  # noqa: E402

from greenqueue import _http, events  # noqa: E402
from greenqueue._response import _Response  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"


class _Sock:
    """Enough of a socket for a Connection that never touches the network."""

    def fileno(self):
        return 0


class _OfflineConnection(_http.Connection):
    """A Connection whose sends are dropped: the pure-Python part of a request."""

    __slots__ = ()

    def send_raw(self, data):
        pass


def _per_call(fn, n):
    for _ in range(min(n, 2000)):
        fn()
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n * 1e6


def _python_pieces(n):
    from bench.apps.http_app import app as flask_app
    from bench.apps.http_bare import app as bare_app

    out = {}
    for label, app in (("bare", bare_app), ("flask", flask_app)):
        settings = _http.HTTPSettings(app, server_name="127.0.0.1", server_port=8080, forwarded_allow=None)
        conn = _OfflineConnection(_Sock(), ("127.0.0.1", 50000), settings, set())
        queue = conn.parser.queue

        def whole():
            conn.parser.feed(REQUEST)
            conn._handle_request(queue.popleft())

        out["whole Python path, " + label] = _per_call(whole, n)
        if label == "flask":
            req = None

            def flask_call():
                resp = _Response(conn, conn._build_environ(req), req)
                result = app(resp.environ, resp.start_response)
                for _ in result:
                    pass
                result.close()

            conn.parser.feed(REQUEST)
            req = queue.popleft()
            out["environ + Flask app call (view, Werkzeug request and response)"] = _per_call(flask_call, n // 4)
            continue

        def parse():
            conn.parser.feed(REQUEST)
            queue.popleft()

        out["parse (llhttp + callbacks)"] = _per_call(parse, n)
        conn.parser.feed(REQUEST)
        req = queue.popleft()
        out["environ"] = _per_call(lambda: conn._build_environ(req), n)
        environ = conn._build_environ(req)
        headers = [("Content-Type", "text/plain"), ("Content-Length", "13")]
        flask_headers = [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", "13")]

        def start_response(hdrs=headers):
            _Response(conn, environ, req).start_response("200 OK", hdrs)

        out["response object + start_response (bare app's headers)"] = _per_call(start_response, n)
        out["response object + start_response (Flask's headers)"] = _per_call(lambda: start_response(flask_headers), n)
        resp = _Response(conn, environ, req)
        resp.start_response("200 OK", headers)
        out["framing: response head + body in one buffer"] = _per_call(lambda: resp._head(13) + b"Hello, World!", n)
        out["app call, bare WSGI callable (a new response object and its start_response included)"] = _per_call(
            lambda: app(environ, _Response(conn, environ, req).start_response), n)
        out["hooks: access log off + RequestFinished not wanted"] = _per_call(
            lambda: settings.access_log_enabled or events.wanted(events.RequestFinished), n)
        unsubscribe = events.subscribe(lambda e: None, events.RequestFinished)
        try:
            out["hooks: RequestFinished built and sent to one listener"] = _per_call(
                lambda: events.wanted(events.RequestFinished) and events.notify(events.RequestFinished(
                    method="GET", path="/", status=200, seconds=0.0)), n)
        finally:
            unsubscribe()
        logger = logging.getLogger("greenqueue.access")
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.INFO)
        try:
            out["hooks: access log line (formatted, to a null handler)"] = _per_call(
                lambda: conn._log_access(environ, resp, 0.001), n // 4)
        finally:
            logger.handlers[:] = []
    return out


def _system_pieces(n):
    out = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        raw_server, raw_client = server._sock, client._sock
        raw_server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        response = b"x" * 150
        t_send = 0.0
        t_recv = 0.0
        for _ in range(n):
            raw_client.send(REQUEST)
            t0 = time.perf_counter()
            raw_server.recv(65536)
            t1 = time.perf_counter()
            raw_server.send(response)
            t2 = time.perf_counter()
            raw_client.recv(65536)
            t_recv += t1 - t0
            t_send += t2 - t1
        out["recv of a waiting request (system call)"] = t_recv / n * 1e6
        out["send of a 150-byte response (system call, loopback delivery included)"] = t_send / n * 1e6

        hub = gevent.get_hub()
        watcher = hub.loop.io(raw_server.fileno(), 1)
        raw_client.send(REQUEST)  # stays unread: the watcher fires on every loop turn

        def wait_ready():
            hub.wait(watcher)

        out["wait on a ready socket: switch to the hub, one loop turn, switch back"] = _per_call(wait_ready, n)
        watcher.close()
        client.close()
        server.close()

    main = getcurrent()

    def pong():
        while True:
            main.switch()

    other = greenlet.greenlet(pong)
    out["greenlet switch (one way)"] = _per_call(other.switch, n) / 2
    return out


def budget(n=20000):
    """Return {piece: microseconds per request}."""
    pieces = _python_pieces(n)
    pieces.update(_system_pieces(n))
    return pieces


def main():
    """Print the budget as a markdown table."""
    print("| piece | us per request |\n|---|---:|")
    for name, us in budget().items():
        print("| %s | %.2f |" % (name, us))
    return 0


if __name__ == "__main__":
    sys.exit(main())
