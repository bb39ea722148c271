"""One HTTP request on its way in: the server's limits, llhttp's callbacks, the environ keys, ``wsgi.input``.

Concurrency model: everything here runs in the connection's greenlet (the
parser's callbacks run inside its ``feed``); :class:`Input` reads more of a
body through its connection, which may wait on the socket and so yields to
the hub. Module state: one bounded cache of header names (:data:`_KEYS`),
read and written only by greenlets of the hub that serves connections (the
main thread's), never across processes or threads.

Why llhttp (through ``httptools``) and not gevent.pywsgi's parser: see
:mod:`greenqueue._http`. This module adds the limits llhttp leaves to the
embedder: request line, header count and size, HTTP version, asterisk-form
only for OPTIONS.
"""

import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterator, List, NoReturn, Optional, Tuple

import httptools

from ._response import IncompleteBody
from .errors import GreenqueueError

if TYPE_CHECKING:
    from ._http import Connection

# The connection's logger: a cut body is part of the connection's story.
log = logging.getLogger("greenqueue._http")

_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}
_PROTOCOLS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}
# Request header name -> environ key ("" when dropped). Bounded: names come from clients.
_KEYS: Dict[bytes, str] = {}
_MAX_KEYS = 1024


class HTTPSettings:
    """Read-only limits and policies shared by every connection of one server."""

    def __init__(self, app: Callable, *, max_request_line: int = 8190, max_header_size: int = 65536,
                 max_headers: int = 100, header_timeout: Optional[float] = 10.0,
                 keepalive_timeout: Optional[float] = 75.0, forwarded_allow: Any = (), server_name: str = "",
                 server_port: Any = "", access_log_enabled: bool = False) -> None:
        self.app = app
        self.max_request_line = max_request_line
        self.max_header_size = max_header_size
        self.max_headers = max_headers
        self.header_timeout = header_timeout or None
        self.keepalive_timeout = keepalive_timeout or None
        # None means "trust any peer"; a tuple of ip_network otherwise.
        self.forwarded_allow = forwarded_allow
        self.server_name = server_name
        self.server_port = str(server_port)
        self.access_log_enabled = access_log_enabled
        self.shutting_down = False
        #: Set while a retiring process drains: how long an idle kept-alive connection may still
        #: send its next request (answered with Connection: close) before it is closed.
        self.retire_grace: Optional[float] = None
        #: Counts requests down to a recycling (--max-requests); None when off.
        self.budget: Any = None
        #: What every environ of this server starts from (a connection adds its peer).
        self.base_environ: Dict[str, Any] = {
            "SCRIPT_NAME": "", "SERVER_NAME": server_name, "SERVER_PORT": self.server_port,
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.multithread": False,
            "wsgi.multiprocess": False, "wsgi.run_once": False, "wsgi.input_terminated": True,
        }


class RequestError(GreenqueueError):
    """A request we refuse; ``status`` is the 4xx/5xx to answer with."""

    # A GreenqueueError because it reaches the app: a body that stops parsing (a malformed
    # chunk) raises it from ``wsgi.input.read()``, inside the app's own code.

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Request:
    """One parsed request: filled by the parser callbacks, read by the WSGI app."""

    __slots__ = ("url", "headers", "header_bytes", "complete", "headers_done", "body", "body_len",
                 "method", "version", "keep_alive", "upgrade")

    def __init__(self) -> None:
        self.url = b""
        self.headers: List[Tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.headers_done = False
        self.complete = False
        self.body: List[bytes] = []
        self.body_len = 0
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.upgrade = False


class _Parser:
    """httptools protocol object: turns callbacks into queued :class:`_Request` objects.

    One per connection, reused for every request on it; one feed parses every
    request the bytes contain (pipelining), each queued in order.
    """

    __slots__ = ("settings", "queue", "current", "parser", "error")

    def __init__(self, settings: HTTPSettings) -> None:
        self.settings = settings
        self.queue: Deque[_Request] = deque()
        self.current: Any = None  # the _Request being parsed (set by on_message_begin before any other callback)
        self.parser = httptools.HttpRequestParser(self)
        self.error: Optional[RequestError] = None

    def feed(self, data: bytes) -> None:
        """Parse ``data``; raise RequestError for anything llhttp or our limits refuse."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade/CONNECT request: we answer it as plain HTTP and close after it.
            if self.current is not None:
                self.current.upgrade = True
                self.current.complete = True
        except httptools.HttpParserCallbackError:
            raise self.error or RequestError(400, "bad request") from None
        except httptools.HttpParserInvalidMethodError:
            raise RequestError(501, "method not implemented") from None
        except httptools.HttpParserInvalidURLError:
            raise RequestError(400, "invalid request target") from None
        except httptools.HttpParserError as exc:
            reason = str(exc) or "malformed request"
            if reason == "Invalid HTTP version":
                raise RequestError(505, reason) from None
            raise RequestError(400, reason) from None

    def _fail(self, status: int, reason: str) -> NoReturn:
        self.error = RequestError(status, reason)
        raise self.error

    # httptools callbacks -------------------------------------------------
    def on_message_begin(self) -> None:
        self.current = _Request()
        self.queue.append(self.current)

    def on_url(self, url: bytes) -> None:
        req = self.current
        req.url += url
        if len(req.url) > self.settings.max_request_line:
            self._fail(414, "request line longer than %d bytes" % self.settings.max_request_line)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.current
        req.headers.append((name, value))
        req.header_bytes += len(name) + len(value) + 4
        if len(req.headers) > self.settings.max_headers:
            self._fail(431, "more than %d header fields" % self.settings.max_headers)
        if req.header_bytes > self.settings.max_header_size:
            self._fail(431, "headers larger than %d bytes" % self.settings.max_header_size)

    def on_headers_complete(self) -> None:
        req = self.current
        p = self.parser
        req.method = p.get_method()
        req.version = version = p.get_http_version()
        if version != "1.1" and version != "1.0":
            # llhttp reads any one-digit major and minor; we speak HTTP/1.x only (RFC 9110 15.6.6).
            self._fail(505, "HTTP/%s is not supported" % version)
        if req.url == b"*" and req.method != b"OPTIONS":
            # RFC 9112 3.2.4: the asterisk-form is only for a server-wide OPTIONS.
            self._fail(400, "the request target * is only allowed with OPTIONS")
        req.keep_alive = p.should_keep_alive()
        req.headers_done = True

    def on_body(self, body: bytes) -> None:
        req = self.current
        req.body.append(body)
        req.body_len += len(body)

    def on_message_complete(self) -> None:
        self.current.complete = True


def _environ_key(name: bytes) -> str:
    """The environ key of request header ``name``, or "" when the header is dropped."""
    key = name.decode("latin-1").upper()
    if "_" in key:
        key = ""  # dropped like gunicorn does: X_Forwarded_For must not pose as X-Forwarded-For
    else:
        key = key.replace("-", "_")
        if key != "CONTENT_TYPE" and key != "CONTENT_LENGTH":
            key = "HTTP_" + key
    if len(_KEYS) < _MAX_KEYS:
        _KEYS[name] = key
    return key


class Input:
    """``wsgi.input``: reads the request body lazily from the connection."""

    __slots__ = ("_conn", "_req", "_buf", "_continue_sent", "cut")

    def __init__(self, conn: "Connection", req: _Request) -> None:
        self._conn = conn
        self._req = req
        self._buf = b""
        self._continue_sent = False
        self.cut = False  # the client closed the connection before the end of the body

    def _fill(self) -> bool:
        """Read more body from the socket; False once the message is complete."""
        req = self._req
        if req.body:
            self._buf += b"".join(req.body)
            req.body.clear()
            return True
        if req.complete:
            return False
        if self.cut:
            raise IncompleteBody()
        conn = self._conn
        if conn.expect_continue and not self._continue_sent:
            self._continue_sent = True
            conn.send_raw(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            conn.read_more(conn.body_timeout)
        except EOFError:
            self.cut = True
            req.keep_alive = False
            log.info("client %s closed the connection %d bytes into a request body",
                     conn._peer(), req.body_len)
            raise IncompleteBody() from None
        return True

    def read(self, size: Optional[int] = -1) -> bytes:
        """Read up to ``size`` bytes (all when negative)."""
        if size is None or size < 0:
            while self._fill():
                pass
            data, self._buf = self._buf, b""
            return data
        while len(self._buf) < size and self._fill():
            pass
        data, self._buf = self._buf[:size], self._buf[size:]
        return data

    def readline(self, size: Optional[int] = -1) -> bytes:
        """Read one line (up to ``size`` bytes)."""
        while True:
            idx = self._buf.find(b"\n")
            if idx >= 0 or (size is not None and 0 <= size <= len(self._buf)):
                break
            if not self._fill():
                break
        end = idx + 1 if idx >= 0 else len(self._buf)
        if size is not None and 0 <= size < end:
            end = size
        data, self._buf = self._buf[:end], self._buf[end:]
        return data

    def readlines(self, hint: Any = None) -> List[bytes]:
        """Read all remaining lines."""
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def unread(self) -> int:
        """Bytes of body received but not yet consumed by the app."""
        return len(self._buf) + self._req.body_len


class _NoBody:
    """``wsgi.input`` of a request that has no body (stateless, so one serves every request)."""

    __slots__ = ()
    cut = False

    def read(self, size: Optional[int] = -1) -> bytes:
        """Nothing to read."""
        return b""

    def readline(self, size: Optional[int] = -1) -> bytes:
        """Nothing to read."""
        return b""

    def readlines(self, hint: Any = None) -> List[bytes]:
        """Nothing to read."""
        return []

    def __iter__(self) -> Iterator[bytes]:
        return iter(())

    def unread(self) -> int:
        """Nothing left."""
        return 0


_NO_BODY = _NoBody()
