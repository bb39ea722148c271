"""The HTTP connection handler in this process: a Connection served over a socketpair in a greenlet."""

import logging
import socket

import gevent
import gevent.socket
import pytest
from flask import Flask, request

from greenqueue import _http, events
from greenqueue._http import Connection, HTTPSettings, RequestError, _Parser


def hello(environ, start_response):
    body = ("%s %s" % (environ["REQUEST_METHOD"], environ["PATH_INFO"])).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


class Served:
    """One Connection over a socketpair, handled in its own greenlet; the test is the client."""

    def __init__(self, app, connection_class=Connection, tcp_buffers=None, **settings):
        if tcp_buffers is None:
            server_side, self.client = gevent.socket.socketpair()
        else:
            # Loopback TCP with small kernel buffers, so a large send comes back partial.
            with gevent.socket.socket() as listener:
                listener.bind(("127.0.0.1", 0))
                listener.listen(1)
                self.client = gevent.socket.socket()
                self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, tcp_buffers)
                self.client.connect(listener.getsockname())
                server_side, _ = listener.accept()
            server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, tcp_buffers)
        self.client.settimeout(10)
        self.conn = connection_class(server_side, ("127.0.0.1", 40000), HTTPSettings(app, **settings), set())
        self.greenlet = gevent.spawn(self.conn.handle)
        self._buf = b""

    def send(self, data):
        self.client.sendall(data)

    def response(self):
        """Read one response (its body framed by Content-Length); return (head, body)."""
        while b"\r\n\r\n" not in self._buf:
            self._more()
        head, _, self._buf = self._buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        while len(self._buf) < length:
            self._more()
        body, self._buf = self._buf[:length], self._buf[length:]
        return head, body

    def closed(self):
        """True once the server closed its end (every byte before that is ignored)."""
        while True:
            data = self.client.recv(65536)
            if not data:
                return True

    def _more(self):
        data = self.client.recv(65536)
        if not data:
            raise EOFError("the server closed the connection; got %r" % self._buf)
        self._buf += data

    def close(self):
        self.client.close()
        self.greenlet.join(10)
        assert self.greenlet.dead


@pytest.fixture
def served():
    made = []

    def make(app, **kwargs):
        s = Served(app, **kwargs)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


GET = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"


def test_settings_have_no_observe_side_channel():
    assert not hasattr(HTTPSettings(hello), "observe")


def test_request_finished_is_published_only_while_someone_listens(served):
    s = served(hello)
    assert not events.wanted(events.RequestFinished)
    s.send(GET % b"/first")
    assert s.response()[1] == b"GET /first"
    seen = []
    # Subscribed after the connection started: nothing cached may hide it.
    unsubscribe = events.subscribe(seen.append, events.RequestFinished)
    try:
        s.send(GET % b"/second")
        assert s.response()[1] == b"GET /second"
    finally:
        unsubscribe()
    s.send(GET % b"/third")
    assert s.response()[1] == b"GET /third"
    assert [(e.method, e.path, e.status) for e in seen] == [("GET", "/second", 200)]
    assert seen[0].seconds >= 0


def test_request_finished_says_status_0_when_no_response_started(served):
    def broken(environ, start_response):
        raise RuntimeError("no response")

    seen = []
    unsubscribe = events.subscribe(seen.append, events.RequestFinished)
    try:
        s = served(broken)
        s.send(GET % b"/x")
        assert s.response()[0].startswith(b"HTTP/1.1 500")
    finally:
        unsubscribe()
    assert [(e.path, e.status) for e in seen] == [("/x", 500)]


def parse(data, **settings):
    parser = _Parser(HTTPSettings(hello, **settings))
    parser.feed(data)
    return list(parser.queue)


@pytest.mark.parametrize("version", [b"2.0", b"3.0", b"1.9", b"0.9"])
def test_versions_other_than_1_0_and_1_1_are_refused_with_505(version):
    with pytest.raises(RequestError) as info:
        parse(b"GET /foo HTTP/" + version + b"\r\nHost: a\r\n\r\n")
    assert info.value.status == 505


def test_http_2_gets_a_505_answer_and_a_close(served):
    s = served(hello)
    s.send(b"GET /foo HTTP/2.0\r\nHost: a\r\n\r\n")
    head, _ = s.response()
    assert head.startswith(b"HTTP/1.1 505 ") and b"Connection: close" in head
    assert s.closed()


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"POST", b"DELETE"])
def test_asterisk_form_is_refused_for_anything_but_options(method):
    with pytest.raises(RequestError) as info:
        parse(method + b" * HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert info.value.status == 400


def test_options_asterisk_reaches_the_app(served):
    s = served(hello)
    s.send(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert s.response()[1] == b"OPTIONS /"


def test_pipelined_requests_arriving_together_are_parsed_from_one_read_and_answered_in_order(served):
    reads = []

    class Counting(Connection):
        __slots__ = ()

        def _recv(self, timeout, wait_first=False):
            data = Connection._recv(self, timeout, wait_first)
            reads.append(data)
            return data

    s = served(hello, connection_class=Counting)
    s.send(GET % b"/1" + b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc" + GET % b"/3")
    assert [s.response()[1] for _ in range(3)] == [b"GET /1", b"POST /2", b"GET /3"]
    assert len(reads) == 1


def test_keep_alive_reuses_the_parser_and_each_request_gets_its_own_environ(served):
    environs = []

    def app(environ, start_response):
        environs.append(environ)
        environ["app.scribble"] = len(environs)
        return hello(environ, start_response)

    s = served(app)
    parser = s.conn.parser
    for path in (b"/a", b"/b"):
        s.send(GET % path)
        s.response()
    assert s.conn.parser is parser
    first, second = environs
    assert first is not second and second["app.scribble"] == 2 and first["PATH_INFO"] == "/a"
    assert first["REMOTE_ADDR"] == second["REMOTE_ADDR"] == "127.0.0.1"
    assert first["wsgi.input"].read() == b""


def capture_environ(served, raw, **settings):
    seen = []

    def app(environ, start_response):
        seen.append(environ)
        return hello(environ, start_response)

    s = served(app, **settings)
    s.send(raw)
    head, _ = s.response()
    return head, (seen[0] if seen else None)


def test_environ_from_headers_and_target(served):
    _, env = capture_environ(served, b"GET /a%20b/c?x=1&y=%2F#frag HTTP/1.1\r\nHost: example.org:8080\r\n"
                             b"Content-Type: text/plain\r\nX-Multi: a\r\nX-Multi: b\r\nX_Sneaky: 1\r\n"
                             b"Accept: */*\r\n\r\n", server_name="srv", server_port=81)
    assert env["PATH_INFO"] == "/a b/c" and env["QUERY_STRING"] == "x=1&y=%2F"
    assert env["RAW_URI"] == env["REQUEST_URI"] == "/a%20b/c?x=1&y=%2F#frag"
    assert env["HTTP_HOST"] == "example.org:8080" and env["CONTENT_TYPE"] == "text/plain"
    assert env["HTTP_X_MULTI"] == "a,b" and env["HTTP_ACCEPT"] == "*/*"
    assert "HTTP_X_SNEAKY" not in env and not any("SNEAKY" in k for k in env)
    assert (env["SERVER_NAME"], env["SERVER_PORT"], env["SERVER_PROTOCOL"]) == ("srv", "81", "HTTP/1.1")
    assert env["REQUEST_METHOD"] == "GET" and env["SCRIPT_NAME"] == ""
    assert env["wsgi.version"] == (1, 0) and env["wsgi.input_terminated"] is True


def test_absolute_form_target(served):
    _, env = capture_environ(served, b"GET http://example.org/p/q?z=9 HTTP/1.1\r\nHost: example.org\r\n\r\n")
    assert (env["PATH_INFO"], env["QUERY_STRING"]) == ("/p/q", "z=9")


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: a\r\nHOST: b\r\n\r\n",
])
def test_http_1_1_needs_exactly_one_host(served, raw):
    head, env = capture_environ(served, raw)
    assert head.startswith(b"HTTP/1.1 400") and env is None


def test_http_1_0_may_omit_host(served):
    head, env = capture_environ(served, b"GET /old HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and env["SERVER_PROTOCOL"] == "HTTP/1.0"


@pytest.mark.parametrize("allow, remote, scheme", [(None, "203.0.113.9", "https"), ((), "127.0.0.1", "http")])
def test_forwarded_headers_are_believed_only_from_a_trusted_peer(served, allow, remote, scheme):
    _, env = capture_environ(served, b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1, 203.0.113.9\r\n"
                             b"X-Forwarded-Proto: https\r\n\r\n", forwarded_allow=allow)
    assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"]) == (remote, scheme)


def test_a_body_cut_short_is_a_400_for_flask_with_one_log_line(served, caplog):
    app = Flask(__name__)

    @app.post("/echo")
    def echo():
        return request.get_data()

    s = served(app)
    caplog.set_level(logging.INFO)
    s.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabcd")
    s.client.shutdown(socket.SHUT_WR)
    head, _ = s.response()
    assert head.startswith(b"HTTP/1.1 400") and b"Connection: close" in head
    assert s.closed()
    s.greenlet.join(5)
    lines = [r for r in caplog.records if "request body" in r.getMessage()]
    assert len(lines) == 1 and "4 bytes into a request body" in lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]


def test_a_body_cut_short_escaping_a_plain_wsgi_app_is_a_400_without_a_traceback(served, caplog):
    def app(environ, start_response):
        environ["wsgi.input"].read()
        return hello(environ, start_response)

    s = served(app)
    s.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc")
    s.client.shutdown(socket.SHUT_WR)
    assert s.response()[0].startswith(b"HTTP/1.1 400")
    assert s.closed()
    s.greenlet.join(5)
    assert not [r for r in caplog.records if r.exc_info]


def test_a_body_cut_short_reads_as_eof_error_too(served):
    errors = []

    def app(environ, start_response):
        try:
            environ["wsgi.input"].read(10)
        except EOFError as exc:
            errors.append(exc)
        return hello(environ, start_response)

    s = served(app)
    s.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
    s.client.shutdown(socket.SHUT_WR)
    s.response()
    assert len(errors) == 1


def test_an_idle_keep_alive_connection_is_closed_quietly_after_its_timeout(served):
    s = served(hello, keepalive_timeout=0.05)
    s.send(GET % b"/")
    s.response()
    assert s.client.recv(100) == b""  # no 408: an idle client did nothing wrong


def test_headers_that_do_not_complete_in_time_get_a_408(served):
    s = served(hello, header_timeout=0.05, keepalive_timeout=30)
    s.send(GET % b"/")
    s.response()
    s.send(b"GET / HTTP/1.1\r\nHo")  # the next request starts but never ends
    head, _ = s.response()
    assert head.startswith(b"HTTP/1.1 408")


def test_a_header_timeout_shorter_than_the_armed_keep_alive_timer_still_fires(served):
    # The connection's one timer was set for the keep-alive deadline; the header deadline is earlier.
    s = served(hello, header_timeout=0.05, keepalive_timeout=3600)
    s.send(b"GET / HTTP/1.1\r\n")
    assert s.response()[0].startswith(b"HTTP/1.1 408")


def test_idle_connections_close_on_graceful_shutdown(served):
    s = served(hello)
    s.send(GET % b"/")
    s.response()
    s.conn.settings.shutting_down = True
    s.conn.close_if_idle()
    assert s.closed()
    s.greenlet.join(5)
    assert s.greenlet.dead


def test_responses_to_pipelined_requests_leave_together_at_the_end_of_the_hubs_turn(served):
    flushed = []

    class Recording(Connection):
        __slots__ = ()

        def _flush_queued(self):
            flushed.append(self._out)
            Connection._flush_queued(self)

    s = served(hello, connection_class=Recording)
    s.send(GET % b"/1" + GET % b"/2" + GET % b"/3")
    assert [s.response()[1] for _ in range(3)] == [b"GET /1", b"GET /2", b"GET /3"]
    assert len(flushed) == 1 and flushed[0].count(b"HTTP/1.1 200 OK") == 3


def test_queued_responses_still_reach_an_idle_client_closed_by_graceful_shutdown(served):
    holder = []

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/1":
            # Runs before this turn's flush: both responses are still queued when the connection is closed.
            gevent.get_hub().loop.run_callback(holder[0].close_if_idle)
        return hello(environ, start_response)

    s = served(app)
    holder.append(s.conn)
    s.send(GET % b"/1" + GET % b"/2")
    assert [s.response()[1] for _ in range(2)] == [b"GET /1", b"GET /2"]
    assert s.closed()


def test_a_lone_response_leaves_at_once(served):
    queued = []

    class Recording(Connection):
        __slots__ = ()

        def _flush_queued(self):
            queued.append(self._out)
            Connection._flush_queued(self)

    s = served(hello, connection_class=Recording)
    for path in (b"/1", b"/2"):
        s.send(GET % path)
        assert s.response()[1] == b"GET " + path
    assert queued == []


def test_a_queued_response_larger_than_the_socket_buffer_arrives_whole_and_in_order(served, monkeypatch):
    # Larger than what the kernel takes in one send even on loopback (one 64 KiB segment).
    big = b"x" * 1000000
    monkeypatch.setattr(_http, "_BATCH_MAX", 2 * len(big))
    rests = []

    class Recording(Connection):
        __slots__ = ()

        def send_raw(self, data):
            if not data and self._out is not None:
                rests.append(len(self._out))  # the greenlet sends what the hub's flush could not
            Connection.send_raw(self, data)

    def app(environ, start_response):
        body = big if environ["PATH_INFO"] == "/big" else b"small"
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    s = served(app, connection_class=Recording, tcp_buffers=4096)
    s.send(GET % b"/big" + GET % b"/small")
    assert s.response()[1] == big
    assert s.response()[1] == b"small"
    s.send(GET % b"/big")
    assert s.response()[1] == big
    assert rests and all(0 < n < len(big) for n in rests), "every flush went whole: nothing tested the rest"
