"""Writing one WSGI response: start_response/write, framing (length, chunked, close) and errors.

Concurrency model: runs in the connection's greenlet. A whole response (a
body given as a list, or one of declared length whose first chunk completes
it) leaves with the status line and headers in one send, at the end of the
hub's turn when other requests are ready in it (Connection.send_final). A
streamed body is sent
chunk by chunk as the app yields it (the status line and headers go out with
the first chunk, in one send); while a stream runs, the connection's hang-up
watcher (an I/O watcher whose callback runs in the hub) raises
ClientDisconnected in it. A body whose length the app declared before
iterating is watched only once its first chunk did not complete it: its
first chunk is produced without waiting in every framework we serve
(Werkzeug's responses, files), and not watching saves a watcher start and
stop per response.

Module state: two caches (header names already checked, the Date line of
the current second) read and written only by greenlets of this process's
hub, never across processes or threads.
"""

import errno
import logging
import time
from email.utils import formatdate
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import gevent
from gevent import getcurrent
from werkzeug.exceptions import ClientDisconnected as _WerkzeugClientDisconnected

from .errors import GreenqueueError

log = logging.getLogger("greenqueue._http")
# What an app may raise that becomes a 500 (or a cut body): its exceptions, and a
# gevent.Timeout it started and did not catch (a BaseException, like GreenletExit).
_APP_ERRORS = (Exception, gevent.Timeout)

_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
_REASONS = {
    400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
    417: "Expectation Failed", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}
# Response headers the server frames itself: taken out of the app's list and written by _head.
_FRAMING = frozenset(("content-length", "transfer-encoding", "connection"))


class ClientDisconnected(gevent.GreenletExit):
    """Raised in a streaming greenlet when its client has closed the connection.

    A GreenletExit, so ``except Exception`` in app code (and in sse_response)
    does not mistake a departed client for a failure.
    """


class IncompleteBody(_WerkzeugClientDisconnected, EOFError, GreenqueueError):
    """``wsgi.input`` ended because the client closed the connection before the end of the body.

    Werkzeug's ClientDisconnected, so Flask answers its 400 without logging a
    traceback; an EOFError, as a short body always was here; and a
    GreenqueueError, as every error greenqueue raises is. When it escapes a
    plain WSGI app the server answers 400 itself.
    """

    description = "The client closed the connection before the end of the request body."


_date_cache: List[Any] = [0, ""]


def _date_line() -> str:
    """The ``Date`` header line and the blank line ending the head (formatted once a second)."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = "Date: %s\r\n\r\n" % formatdate(now, usegmt=True)
    return _date_cache[1]


def _http_date() -> str:
    """The current time as an HTTP date."""
    return _date_line()[6:-4]


# Header names an app sent before, mapped to their lower case: an app sends the same
# few names over and over, so each is checked once. Bounded: names may come from input.
_NAMES: Dict[str, str] = {}
_MAX_NAMES = 512


# Whole header lines an app sent before, by their (name, value) pair, already checked and
# rendered: most responses repeat the same few (Content-Type: text/html; charset=utf-8). Framing
# headers and SSE content types are never in it (their values decide something). Bounded.
_LINES: Dict[Tuple[str, str], str] = {}
_MAX_LINES = 1024


def _checked_name(name: Any) -> str:
    """Validate a response header name; return its lower case (and remember it)."""
    if not isinstance(name, str):
        raise TypeError("header name %r must be str" % (name,))
    if "\r" in name or "\n" in name or ":" in name:
        raise ValueError("header %r contains a line break (response splitting)" % name)
    low = name.lower()
    if len(_NAMES) < _MAX_NAMES:
        _NAMES[name] = low
    return low


class _Response:
    """start_response/write for one request, and the framing of its body."""

    __slots__ = ("conn", "environ", "req", "status", "status_code", "lines", "declared", "close_asked",
                 "sse", "headers_sent", "chunked", "length", "keep_alive", "sent_body", "head", "no_body")

    def __init__(self, conn: Any, environ: dict, req: Any) -> None:
        self.conn = conn
        self.environ = environ
        self.req = req
        self.status: Optional[str] = None
        self.status_code = 0  # 0 until the app starts a response
        self.lines: List[str] = []
        self.declared: Optional[int] = None
        self.close_asked = False
        self.sse = False
        self.headers_sent = False
        self.chunked = False
        self.length: Optional[int] = None
        self.keep_alive = req.keep_alive
        self.sent_body = 0
        self.head = req.method == b"HEAD"
        self.no_body = self.head

    def start_response(self, status: str, headers: List[Tuple[str, str]],
                       exc_info: Optional[tuple] = None) -> Callable[[bytes], None]:
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
        code = int(status.partition(" ")[0])
        # One pass validates every header (no line breaks: response splitting) and
        # renders it, keeping out the framing headers this server writes itself.
        lines = []
        declared = None
        close_asked = sse = False
        names = _NAMES
        known_lines = _LINES
        for pair in headers:
            try:
                line = known_lines.get(pair)
            except TypeError:  # a list for a pair: checked the long way below
                line = None
            if line is not None:
                lines.append(line)  # sent before, so checked before (never a framing header)
                continue
            name, value = pair
            low = names.get(name)
            if low is None:
                low = _checked_name(name)
            if not isinstance(value, str):
                raise TypeError("header %r: %r must be str" % (name, value))
            if "\r" in value or "\n" in value:
                raise ValueError("header %r contains a line break (response splitting)" % name)
            if low in _FRAMING:
                if low == "content-length":
                    declared = int(value)
                elif low == "connection":
                    close_asked = value.lower() == "close"
                continue  # a Transfer-Encoding from the app is dropped: we frame the body ourselves
            line = "%s: %s\r\n" % (name, value)
            if low == "content-type":
                sse = value.startswith("text/event-stream")
                if sse:
                    lines.append(line)
                    continue  # not remembered: a remembered line skips this check
            if len(known_lines) < _MAX_LINES and type(pair) is tuple:
                known_lines[pair] = line
            lines.append(line)
        self.status = status
        self.status_code = code
        self.lines = lines
        self.declared = declared
        self.close_asked = close_asked
        self.sse = sse
        return self.write

    def _head(self, body_len: Optional[int]) -> bytes:
        """The status line and headers, with the framing for a body of ``body_len`` (None: unknown)."""
        code = self.status_code
        req = self.req
        if code < 200 or code == 204 or code == 304:
            self.no_body = True
            framing = ""
        elif self.declared is not None:
            self.length = self.declared
            framing = "Content-Length: %d\r\n" % self.declared
        elif body_len is not None:
            self.length = body_len
            framing = "Content-Length: %d\r\n" % body_len
        elif req.version == "1.1" and not self.head:
            self.chunked = True
            framing = "Transfer-Encoding: chunked\r\n"
        else:
            framing = ""
            if not self.head:
                self.keep_alive = False  # HTTP/1.0 without a length: the close ends the body
        if self.close_asked or not req.keep_alive or self.conn.settings.shutting_down:
            self.keep_alive = False
        if not self.keep_alive:
            framing += "Connection: close\r\n"
        elif req.version == "1.0":
            framing += "Connection: keep-alive\r\n"
        return ("HTTP/1.1 %s\r\n%s%s%s" % (self.status, "".join(self.lines), framing,
                                            _date_line())).encode("latin-1")

    def write(self, data: bytes) -> None:
        """Send one body chunk now (WSGI write callable and the iterator loop)."""
        if not self.headers_sent:
            if self.status is None:
                raise AssertionError("write() before start_response()")
            head = self._head(None)
            self.headers_sent = True
            data = head + self._frame(data)
            if self.keep_alive and not self.chunked and self.length is not None and self.sent_body >= self.length:
                self.conn.send_final(data)  # the whole response: it may wait for the end of the hub's turn
            else:
                self.conn.send_raw(data)
        elif data:
            self.conn.send_chunk(self._frame(data))

    def _frame(self, data: bytes) -> bytes:
        if self.no_body or not data:
            return b""
        self.sent_body += len(data)
        if self.chunked:
            return b"%x\r\n%s\r\n" % (len(data), data)
        return data

    def run(self, app: Callable) -> None:
        """Call the app and send its response."""
        try:
            result = app(self.environ, self.start_response)
        except _APP_ERRORS as exc:
            if self.conn.ws is not None:
                self._taken_over(exc)
            else:
                self._internal_error(exc)
            return
        if self.conn.ws is not None:
            self._taken_over(None, result)
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
        except _APP_ERRORS as exc:
            self._internal_error(exc)
        finally:
            self.conn.end_stream()  # a streamed body's (or a write() callable's) burst may still be open
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("error closing the response iterable of %s %s",
                                  self.environ["REQUEST_METHOD"], self.environ["PATH_INFO"])

    def _send_result(self, result: Iterable[bytes]) -> None:
        if isinstance(result, (list, tuple)) and not self.headers_sent:
            if self.status is None:
                raise AssertionError("the app returned without calling start_response()")
            body = b"".join(result)
            head = self._head(len(body))
            self.headers_sent = True
            if not self.no_body:
                self.sent_body = len(body)
                head += body
            if self.keep_alive:
                self.conn.send_final(head)  # the whole response: it may wait for the end of the hub's turn
            else:
                self.conn.send_raw(head)
            if not self.no_body and self.length != self.sent_body:
                self._lied()
            return
        conn = self.conn
        # A stream may sit idle (waiting on a worker); watch for the client leaving so
        # the source generator is closed at once instead of at the next write. A body
        # of declared length is watched only if its first chunk leaves it incomplete.
        watched = self.status is None or self.declared is None or self.sse
        if watched:
            conn.watch_disconnect(getcurrent())
        try:
            for chunk in result:
                if chunk:
                    self.write(chunk)
                    if not watched and not self.no_body and self.length is not None and self.sent_body < self.length:
                        conn.watch_disconnect(getcurrent())
                        watched = True
                elif not self.headers_sent and self.status is not None and self.sse:
                    self.write(b"")  # an SSE stream that yields an empty first chunk wants its headers out now
        finally:
            if watched:
                conn.unwatch_disconnect()
        if not self.headers_sent:
            if self.status is None:
                raise AssertionError("the app returned without calling start_response()")
            conn.send_raw(self._head(0))
            self.headers_sent = True
        if self.chunked:
            conn.send_raw(b"0\r\n\r\n")
        elif self.length is not None and self.sent_body != self.length and not self.no_body:
            self._lied()

    def _taken_over(self, exc: Optional[BaseException], result: Any = None) -> None:
        """The app took the socket over (a WebSocket) and is done with it: write nothing more."""
        self.keep_alive = False
        self.headers_sent = True
        self.status_code = 101
        # StopIteration and ConnectionError are how simple-websocket and python-engineio say
        # "the socket is finished" under gunicorn and Werkzeug; OSError is a client gone.
        if exc is not None and not isinstance(exc, (StopIteration, OSError)):
            log.error("error in WebSocket %s after the takeover", self.environ["PATH_INFO"], exc_info=exc)
        self.conn.end_websocket()
        close = getattr(result, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("error closing the response iterable of WebSocket %s", self.environ["PATH_INFO"])

    def _lied(self) -> None:
        # The app's Content-Length and its body disagree: the connection cannot carry another response.
        log.warning("%s %s sent %d body bytes but declared Content-Length %d",
                    self.environ["REQUEST_METHOD"], self.environ["PATH_INFO"], self.sent_body, self.length)
        self.keep_alive = False

    def _internal_error(self, exc: BaseException) -> None:
        self.keep_alive = False
        if isinstance(exc, IncompleteBody):
            # The client's fault, already logged in one line when its body was cut: no traceback.
            status, reason, body = 400, "Bad Request", b"Bad Request: incomplete request body\n"
        else:
            log.exception("error in %s %s", self.environ["REQUEST_METHOD"], self.environ["PATH_INFO"])
            status, reason, body = 500, "Internal Server Error", b"Internal Server Error\n"
        if self.headers_sent:
            return  # too late for a 500; closing the connection tells the client the body is cut
        self.status_code = status
        head = ("HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n%s"
                % (status, reason, len(body), _date_line())).encode("latin-1")
        self.headers_sent = True
        try:
            self.conn.send_raw(head + body)
        except OSError:
            pass  # client gone; the error is logged above
