"""One WSGI response in this process: framing, one send per small response, watching streams, errors."""

import logging
import sys
from types import SimpleNamespace

import pytest
from flask import Flask
from werkzeug.exceptions import ClientDisconnected as WerkzeugClientDisconnected

from greenqueue._response import IncompleteBody, _Response


class FakeConn:
    """Records what the response sends and when it watches for a hang-up."""

    def __init__(self, shutting_down=False):
        self.settings = SimpleNamespace(shutting_down=shutting_down)
        self.log = []
        self.ws = None  # no WebSocket took the connection over

    def send_raw(self, data):
        self.log.append(("send", data))

    def send_chunk(self, data):
        self.log.append(("chunk", data))

    def send_final(self, data):
        self.log.append(("final", data))

    def watch_disconnect(self, greenlet):
        self.log.append(("watch", None))

    def unwatch_disconnect(self):
        self.log.append(("unwatch", None))

    def end_stream(self):
        pass

    def _peer(self):
        return "test"

    def sent(self):
        return [data for kind, data in self.log if kind in ("send", "chunk", "final")]

    def kinds(self):
        return [kind for kind, _ in self.log]


def respond(app, method=b"GET", version="1.1", keep_alive=True, shutting_down=False):
    conn = FakeConn(shutting_down)
    req = SimpleNamespace(method=method, version=version, keep_alive=keep_alive)
    resp = _Response(conn, {"REQUEST_METHOD": method.decode(), "PATH_INFO": "/"}, req)
    resp.run(app)
    return resp, conn


def app_with(status="200 OK", headers=(), body=(b"hello",)):
    def app(environ, start_response):
        start_response(status, list(headers))
        return body() if callable(body) else list(body)
    return app


def head_of(data):
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    return lines[0], dict(line.split(b": ", 1) for line in lines[1:]), body


def test_a_list_body_leaves_with_its_headers_in_one_send_at_the_end_of_the_hubs_turn():
    resp, conn = respond(app_with(headers=[("Content-Type", "text/plain")]))
    assert conn.kinds() == ["final"]
    status, headers, body = head_of(conn.sent()[0])
    assert status == b"HTTP/1.1 200 OK" and body == b"hello"
    assert headers[b"Content-Length"] == b"5" and headers[b"Content-Type"] == b"text/plain"
    assert b"Date" in headers and b"Connection" not in headers
    assert resp.keep_alive and resp.status_code == 200 and resp.sent_body == 5


def test_http_1_0_keep_alive_is_said_and_a_close_asked_by_the_app_is_honoured():
    _, conn = respond(app_with(), version="1.0")
    assert head_of(conn.sent()[0])[1][b"Connection"] == b"keep-alive"
    resp, conn = respond(app_with(headers=[("Connection", "close")]))
    assert head_of(conn.sent()[0])[1][b"Connection"] == b"close" and not resp.keep_alive


def test_shutting_down_closes_after_the_response():
    resp, conn = respond(app_with(), shutting_down=True)
    assert head_of(conn.sent()[0])[1][b"Connection"] == b"close" and not resp.keep_alive


def test_204_and_head_have_no_body():
    _, conn = respond(app_with("204 No Content", body=[b"ignored"]))
    status, headers, body = head_of(conn.sent()[0])
    assert status.startswith(b"HTTP/1.1 204") and body == b"" and b"Content-Length" not in headers
    _, conn = respond(app_with(headers=[("Content-Length", "5")]), method=b"HEAD")
    status, headers, body = head_of(conn.sent()[0])
    assert headers[b"Content-Length"] == b"5" and body == b""


def test_the_app_transfer_encoding_is_replaced_by_our_own_framing():
    _, conn = respond(app_with(headers=[("Transfer-Encoding", "gzip")]))
    headers = head_of(conn.sent()[0])[1]
    assert b"Transfer-Encoding" not in headers and headers[b"Content-Length"] == b"5"


def test_a_stream_is_chunked_with_its_first_chunk_in_the_head_send_and_watched_throughout():
    def gen():
        yield b"one"
        yield b"two"

    _, conn = respond(app_with(body=gen))
    assert conn.kinds() == ["watch", "send", "chunk", "unwatch", "send"]
    status, headers, body = head_of(conn.sent()[0])
    assert headers[b"Transfer-Encoding"] == b"chunked" and body == b"3\r\none\r\n"
    assert conn.sent()[1:] == [b"3\r\ntwo\r\n", b"0\r\n\r\n"]


def test_a_body_of_declared_length_is_not_watched_when_its_first_chunk_completes_it():
    _, conn = respond(app_with(headers=[("Content-Length", "5")], body=lambda: iter([b"hello"])))
    assert conn.kinds() == ["final"]


def test_a_response_that_ends_the_connection_is_sent_at_once():
    _, conn = respond(app_with(headers=[("Connection", "close")]))
    assert conn.kinds() == ["send"]
    _, conn = respond(app_with(headers=[("Content-Length", "5")], body=lambda: iter([b"hello"])), keep_alive=False)
    assert conn.kinds() == ["send"]


def test_a_body_of_declared_length_is_watched_once_its_first_chunk_leaves_it_incomplete():
    _, conn = respond(app_with(headers=[("Content-Length", "6")], body=lambda: iter([b"hel", b"lo!"])))
    assert conn.kinds() == ["send", "watch", "chunk", "unwatch"]


def test_an_sse_stream_with_an_empty_first_chunk_sends_its_headers_at_once():
    def gen():
        yield b""
        assert conn_log[-1][0] == "send", "headers were not sent before the generator went on"
        yield b"data: 1\n\n"

    conn = FakeConn()
    conn_log = conn.log
    req = SimpleNamespace(method=b"GET", version="1.1", keep_alive=True)
    resp = _Response(conn, {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, req)
    resp.run(app_with(headers=[("Content-Type", "text/event-stream")], body=gen))
    assert resp.status_code == 200 and conn.kinds() == ["watch", "send", "chunk", "unwatch", "send"]


def test_a_body_that_contradicts_its_content_length_ends_the_connection(caplog):
    resp, _ = respond(app_with(headers=[("Content-Length", "9")]))
    assert not resp.keep_alive and "declared Content-Length 9" in caplog.text
    resp, _ = respond(app_with(headers=[("Content-Length", "9")], body=lambda: iter([b"hello"])))
    assert not resp.keep_alive


@pytest.mark.parametrize("headers, error", [
    ([("X-Evil", "a\r\nSet-Cookie: x=1")], ValueError),
    ([("X-Evil\r\nSet-Cookie", "1")], ValueError),
    ([("X-Colon:", "1")], ValueError),
    ([(b"X-Bytes", "1")], TypeError),
    ([("X-Int", 1)], TypeError),
])
def test_bad_response_headers_are_refused(headers, error):
    resp = _Response(FakeConn(), {}, SimpleNamespace(method=b"GET", version="1.1", keep_alive=True))
    with pytest.raises(error):
        resp.start_response("200 OK", headers)


def test_a_refused_header_name_is_refused_every_time():
    for _ in range(2):
        resp = _Response(FakeConn(), {}, SimpleNamespace(method=b"GET", version="1.1", keep_alive=True))
        with pytest.raises(ValueError):
            resp.start_response("200 OK", [("X-Colon:", "1")])


def test_a_header_line_sent_before_is_sent_again_as_it_was_and_its_meaning_still_counts():
    # The second response finds its lines already checked and rendered; what the values decide
    # (SSE, framing, Connection: close) is still decided for each response.
    sse = [("Content-Type", "text/event-stream"), ["X-List", "pair"]]
    for _ in range(2):
        resp = _Response(FakeConn(), {}, SimpleNamespace(method=b"GET", version="1.1", keep_alive=True))
        resp.start_response("200 OK", sse + [("Content-Length", "5"), ("Connection", "close")])
        assert resp.sse and resp.declared == 5 and resp.close_asked
        assert resp.lines == ["Content-Type: text/event-stream\r\n", "X-List: pair\r\n"]
    for _ in range(2):
        resp = _Response(FakeConn(), {}, SimpleNamespace(method=b"GET", version="1.1", keep_alive=True))
        resp.start_response("200 OK", [("Content-Type", "text/plain")])
        assert not resp.sse and resp.declared is None and not resp.close_asked
        assert resp.lines == ["Content-Type: text/plain\r\n"]
    with pytest.raises(ValueError):  # a known line does not vouch for an unknown one after it
        resp = _Response(FakeConn(), {}, SimpleNamespace(method=b"GET", version="1.1", keep_alive=True))
        resp.start_response("200 OK", [("Content-Type", "text/plain"), ("X-Evil", "a\r\nSet-Cookie: x=1")])


def test_start_response_twice_needs_exc_info_and_exc_info_after_the_head_re_raises():
    resp = _Response(FakeConn(), {}, SimpleNamespace(method=b"GET", version="1.1", keep_alive=True))
    resp.start_response("200 OK", [])
    with pytest.raises(AssertionError):
        resp.start_response("500 Oops", [])
    try:
        raise KeyError("original")
    except KeyError:
        exc_info = sys.exc_info()
    resp.start_response("500 Oops", [], exc_info)  # head not sent yet: replaces the status
    assert resp.status_code == 500
    resp.write(b"x")
    with pytest.raises(KeyError, match="original"):
        resp.start_response("502 Later", [], exc_info)


def test_an_app_error_is_a_500_with_its_traceback_logged(caplog):
    def app(environ, start_response):
        raise RuntimeError("boom")

    resp, conn = respond(app)
    assert conn.sent()[0].startswith(b"HTTP/1.1 500") and not resp.keep_alive
    assert [r for r in caplog.records if r.exc_info]


def test_an_incomplete_body_escaping_the_app_is_a_400_without_a_traceback(caplog):
    def app(environ, start_response):
        raise IncompleteBody()

    caplog.set_level(logging.DEBUG)
    resp, conn = respond(app)
    assert conn.sent()[0].startswith(b"HTTP/1.1 400") and resp.status_code == 400 and not resp.keep_alive
    assert not [r for r in caplog.records if r.exc_info]


def test_incomplete_body_is_werkzeugs_client_disconnected_and_an_eof_error():
    assert issubclass(IncompleteBody, WerkzeugClientDisconnected) and issubclass(IncompleteBody, EOFError)
    app = Flask(__name__)

    @app.post("/")
    def view():
        raise IncompleteBody()

    assert app.test_client().post("/").status_code == 400
