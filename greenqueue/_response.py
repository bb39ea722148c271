"""Writing one WSGI response: start_response/write, framing (length, chunked, close) and errors.

Concurrency model: runs in the connection's greenlet. A streamed body is
sent chunk by chunk as the app yields it (the status line and headers go
out with the first chunk, in one send); while a stream runs, a watcher
greenlet notices the client hanging up and raises ClientDisconnected in it.
"""

import errno
import logging
import time
from email.utils import formatdate

import gevent

log = logging.getLogger("greenqueue._http")
# What an app may raise that becomes a 500 (or a cut body): its exceptions, and a
# gevent.Timeout it started and did not catch (a BaseException, like GreenletExit).
_APP_ERRORS = (Exception, gevent.Timeout)

_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
_NO_BODY_STATUS = (204, 304)
_REASONS = {
    400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
    417: "Expectation Failed", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


class ClientDisconnected(gevent.GreenletExit):
    """Raised in a streaming greenlet when its client has closed the connection.

    A GreenletExit, so ``except Exception`` in app code (and in sse_response)
    does not mistake a departed client for a failure.
    """


_date_cache = [0, ""]


def _http_date():
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True)
    return _date_cache[1]


class _Response:
    """start_response/write for one request, and the framing of its body."""

    __slots__ = ("conn", "environ", "req", "status", "status_code", "headers", "headers_sent",
                 "chunked", "length", "keep_alive", "sent_body", "head", "no_body")

    def __init__(self, conn, environ, req):
        self.conn = conn
        self.environ = environ
        self.req = req
        self.status = None
        self.status_code = None
        self.headers = None
        self.headers_sent = False
        self.chunked = False
        self.length = None
        self.keep_alive = req.keep_alive
        self.sent_body = 0
        self.head = req.method == b"HEAD"
        self.no_body = self.head

    def start_response(self, status, headers, exc_info=None):
        """The WSGI start_response callable."""
        if exc_info:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called twice without exc_info")
        if not isinstance(status, str) or "\r" in status or "\n" in status:
            raise ValueError("invalid status line %r" % (status,))
        for name, value in headers:
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError("header %r: %r must be str" % (name, value))
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
                raise ValueError("header %r contains a line break (response splitting)" % name)
        self.status = status
        self.status_code = int(status.split(" ", 1)[0])
        self.headers = headers
        return self.write

    def _head_bytes(self, body_len_hint):
        code = self.status_code
        length = None
        has_te = False
        lines = ["HTTP/1.1 %s\r\n" % self.status]
        conn_header = None
        for name, value in self.headers:
            low = name.lower()
            if low == "content-length":
                length = int(value)
                continue  # re-added below unless the status forbids a body
            elif low == "transfer-encoding":
                has_te = True
                continue  # we frame the body ourselves
            elif low == "connection":
                conn_header = value.lower()
                continue
            lines.append("%s: %s\r\n" % (name, value))
        if conn_header == "close":
            self.keep_alive = False
        if code < 200 or code in _NO_BODY_STATUS:
            self.no_body = True
        elif length is not None:
            self.length = length
            lines.append("Content-Length: %d\r\n" % length)
        elif body_len_hint is not None:
            self.length = body_len_hint
            lines.append("Content-Length: %d\r\n" % body_len_hint)
        elif self.req.version == "1.1" and not self.head:
            self.chunked = True
            lines.append("Transfer-Encoding: chunked\r\n")
        elif not self.head:
            self.keep_alive = False  # HTTP/1.0 without a length: the close ends the body
        del has_te
        if self.conn.settings.shutting_down:
            self.keep_alive = False
        if not self.keep_alive:
            lines.append("Connection: close\r\n")
        elif self.req.version == "1.0":
            lines.append("Connection: keep-alive\r\n")
        lines.append("Date: %s\r\n\r\n" % _http_date())
        return "".join(lines).encode("latin-1")

    def write(self, data):
        """Send one body chunk now (WSGI write callable and the iterator loop)."""
        if self.status is None:
            raise AssertionError("write() before start_response()")
        if not self.headers_sent:
            head = self._head_bytes(None)
            self.headers_sent = True
            self.conn.send_raw(head + self._frame(data))
        elif data:
            self.conn.send_chunk(self._frame(data))

    def _frame(self, data):
        if self.no_body or not data:
            return b""
        self.sent_body += len(data)
        if self.chunked:
            return b"%x\r\n%s\r\n" % (len(data), data)
        return data

    def run(self, app):
        """Call the app and send its response."""
        try:
            result = app(self.environ, self.start_response)
        except _APP_ERRORS:
            self._internal_error()
            return
        try:
            self._send_result(result)
        except (ClientDisconnected,) + _DISCONNECTS:
            self.keep_alive = False
            log.debug("client %s went away during the response", self.conn._peer())
        except OSError as exc:
            self.keep_alive = False
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
                raise
        except _APP_ERRORS:
            self._internal_error()
        finally:
            self.conn.end_stream()  # a streamed body's (or a write() callable's) burst may still be open
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("error closing the response iterable of %s %s",
                                  self.environ["REQUEST_METHOD"], self.environ["PATH_INFO"])

    def _send_result(self, result):
        if isinstance(result, (list, tuple)) and not self.headers_sent:
            if self.status is None:
                raise AssertionError("the app returned without calling start_response()")
            body = b"".join(result)
            head = self._head_bytes(len(body))
            self.headers_sent = True
            if self.no_body:
                self.conn.send_raw(head)
            else:
                self.sent_body = len(body)
                self.conn.send_raw(head + body)
            return
        # A stream may sit idle (waiting on a worker); watch for the client leaving
        # so the source generator is closed at once instead of at the next write.
        watcher = self.conn.watch_disconnect(gevent.getcurrent())
        try:
            for chunk in result:
                if chunk:
                    self.write(chunk)
                elif not self.headers_sent and self.status is not None and self._wants_early_headers():
                    self.write(b"")
        finally:
            watcher.close()
        if not self.headers_sent:
            if self.status is None:
                raise AssertionError("the app returned without calling start_response()")
            self.conn.send_raw(self._head_bytes(0) if not self.chunked else self._head_bytes(None))
            self.headers_sent = True
        if self.chunked:
            self.conn.send_raw(b"0\r\n\r\n")
        elif self.length is not None and self.sent_body != self.length and not self.no_body:
            # The app lied about Content-Length; the connection cannot carry another response.
            log.warning("%s %s sent %d body bytes but declared Content-Length %d",
                        self.environ["REQUEST_METHOD"], self.environ["PATH_INFO"],
                        self.sent_body, self.length)
            self.keep_alive = False

    def _wants_early_headers(self):
        # An SSE stream that yields an empty first chunk still wants its headers out now.
        for name, value in self.headers:
            if name.lower() == "content-type" and value.startswith("text/event-stream"):
                return True
        return False

    def _internal_error(self):
        log.exception("error in %s %s", self.environ["REQUEST_METHOD"], self.environ["PATH_INFO"])
        self.keep_alive = False
        if self.headers_sent:
            return  # too late for a 500; closing the connection tells the client the body is cut
        self.status_code = 500
        body = b"Internal Server Error\n"
        head = ("HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                "Connection: close\r\nDate: %s\r\n\r\n" % (len(body), _http_date())).encode("latin-1")
        self.headers_sent = True
        try:
            self.conn.send_raw(head + body)
        except OSError:
            pass  # client gone; the error is logged above
