"""A strict HTTP/1.1 connection handler for gevent's StreamServer, parsed by llhttp.

Concurrency model: gevent's StreamServer accepts connections and runs
:meth:`Connection.handle` in one greenlet per connection; the WSGI app runs
in that same greenlet, so the app may block on I/O but a CPU loop blocks the
hub. Nothing here is shared between connections except the read-only
:class:`HTTPSettings` and the server's set of live connections.

Why not gevent.pywsgi's own parser: it accepts many malformed requests and
treats unknown transfer codings as "no body" (a request-smuggling risk).
llhttp (through ``httptools``) rejects those; this module adds the limits
llhttp leaves to the embedder (request line, header count and size, header
timeout) and writes responses so the headers and the first body chunk leave
in one send, which avoids the delayed-ACK stall pywsgi has on keep-alive
connections.
"""

import errno
import logging
import socket
import sys
import time
from email.utils import formatdate
from urllib.parse import unquote_to_bytes

import gevent
import gevent.socket
import httptools

log = logging.getLogger(__name__)
access_log = logging.getLogger("greenqueue.access")

_READ_SIZE = 65536
_MAX_DRAIN = 1 << 20  # unread request body we still read to keep a connection alive
_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
_NO_BODY_STATUS = (204, 304)
_REASONS = {
    400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
    417: "Expectation Failed", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


class HTTPSettings:
    """Read-only limits and policies shared by every connection of one server."""

    def __init__(self, app, *, max_request_line=8190, max_header_size=65536, max_headers=100,
                 header_timeout=10.0, keepalive_timeout=75.0, forwarded_allow=(), server_name="",
                 server_port="", access_log_enabled=False):
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
        #: ``observe(environ, status, seconds)`` after each request (metrics), or None.
        self.observe = None


class RequestError(Exception):
    """A request we refuse; ``status`` is the 4xx/5xx to answer with."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ClientDisconnected(gevent.GreenletExit):
    """Raised in a streaming greenlet when its client has closed the connection.

    A GreenletExit, so ``except Exception`` in app code (and in sse_response)
    does not mistake a departed client for a failure.
    """


class _Request:
    """One parsed request: filled by the parser callbacks, read by the WSGI app."""

    __slots__ = ("url", "headers", "header_bytes", "complete", "headers_done", "body", "body_len",
                 "method", "version", "keep_alive", "upgrade")

    def __init__(self):
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        self.headers_done = False
        self.complete = False
        self.body = []
        self.body_len = 0
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.upgrade = False


class _Parser:
    """httptools protocol object: turns callbacks into queued :class:`_Request` objects."""

    def __init__(self, settings):
        self.settings = settings
        self.queue = []
        self.current = None
        self.parser = httptools.HttpRequestParser(self)
        self.error = None

    def feed(self, data):
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

    def _fail(self, status, reason):
        self.error = RequestError(status, reason)
        raise self.error

    # httptools callbacks -------------------------------------------------
    def on_message_begin(self):
        self.current = _Request()
        self.queue.append(self.current)

    def on_url(self, url):
        req = self.current
        req.url += url
        if len(req.url) > self.settings.max_request_line:
            self._fail(414, "request line longer than %d bytes" % self.settings.max_request_line)

    def on_header(self, name, value):
        req = self.current
        req.headers.append((name, value))
        req.header_bytes += len(name) + len(value) + 4
        if len(req.headers) > self.settings.max_headers:
            self._fail(431, "more than %d header fields" % self.settings.max_headers)
        if req.header_bytes > self.settings.max_header_size:
            self._fail(431, "headers larger than %d bytes" % self.settings.max_header_size)

    def on_headers_complete(self):
        req = self.current
        p = self.parser
        req.method = p.get_method()
        req.version = p.get_http_version()
        req.keep_alive = p.should_keep_alive()
        req.headers_done = True

    def on_body(self, body):
        req = self.current
        req.body.append(body)
        req.body_len += len(body)

    def on_message_complete(self):
        self.current.complete = True


class Input:
    """``wsgi.input``: reads the request body lazily from the connection."""

    def __init__(self, conn, req):
        self._conn = conn
        self._req = req
        self._buf = b""
        self._continue_sent = False

    def _fill(self):
        """Read more body from the socket; False once the message is complete."""
        req = self._req
        if req.body:
            self._buf += b"".join(req.body)
            req.body.clear()
            return True
        if req.complete:
            return False
        if self._conn.expect_continue and not self._continue_sent:
            self._continue_sent = True
            self._conn.send_raw(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._conn.read_more(self._conn.body_timeout)
        return True

    def read(self, size=-1):
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

    def readline(self, size=-1):
        """Read one line (up to ``size`` bytes)."""
        while True:
            idx = self._buf.find(b"\n")
            if idx >= 0 or (0 <= size <= len(self._buf)):
                break
            if not self._fill():
                break
        end = idx + 1 if idx >= 0 else len(self._buf)
        if size is not None and 0 <= size < end:
            end = size
        data, self._buf = self._buf[:end], self._buf[end:]
        return data

    def readlines(self, hint=None):
        """Read all remaining lines."""
        return list(iter(self.readline, b""))

    def __iter__(self):
        return iter(self.readline, b"")

    def unread(self):
        """Bytes of body not yet consumed by the app (or -1 when unknown and large)."""
        return len(self._buf) + self._req.body_len


_date_cache = [0, ""]


def _http_date():
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True)
    return _date_cache[1]


class Connection:
    """Serves every request of one client connection, one after the other."""

    def __init__(self, sock, address, settings, registry):
        self.sock = sock
        self.address = address
        self.settings = settings
        self.registry = registry
        self.parser = _Parser(settings)
        self.idle = True
        self.expect_continue = False
        self.body_timeout = settings.keepalive_timeout or 60.0

    # I/O ----------------------------------------------------------------
    def read_more(self, timeout):
        """recv once and feed the parser; raise EOFError when the peer closed."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(_READ_SIZE)
        if not data:
            raise EOFError
        self.parser.feed(data)

    def watch_disconnect(self, handler):
        """Kill ``handler`` (the greenlet streaming a response) when the client hangs up."""
        raw = getattr(self.sock, "_sock", self.sock)
        try:
            gevent.socket.wait_read(self.sock.fileno())
            data = raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # spurious wake-up; the stream's own writes will notice a close
        except OSError:
            data = b""
        if not data:
            handler.kill(ClientDisconnected("client closed the connection"), block=False)
        # Data means a pipelined request; we stop watching rather than consume it.

    def send_raw(self, data):
        """Send bytes now (disconnects propagate as OSError)."""
        self.sock.sendall(data)

    def _next_request(self):
        """Return the next request once its headers are in, or None when the client is done."""
        queue = self.parser.queue
        started = None
        while True:
            if queue and queue[0].headers_done:
                return queue.pop(0)
            now = time.monotonic()
            if queue and started is None:
                started = now
            if self.settings.shutting_down and not queue:
                return None
            if started is None:
                timeout = self.settings.keepalive_timeout
            else:
                remaining = (self.settings.header_timeout or 1e9) - (now - started)
                if remaining <= 0:
                    raise RequestError(408, "request headers not received within %ss"
                                       % self.settings.header_timeout)
                timeout = remaining
            try:
                self.read_more(timeout)
            except socket.timeout:
                if started is None:
                    return None  # idle keep-alive connection timed out: close quietly
                raise RequestError(408, "request headers not received within %ss"
                                   % self.settings.header_timeout) from None
            except EOFError:
                return None
            if started is None and queue:
                started = now

    def handle(self):
        """Serve requests until the client closes, asks to, or errs."""
        self.registry.add(self)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # unix sockets have no Nagle to turn off
        try:
            while True:
                self.idle = True
                try:
                    req = self._next_request()
                except RequestError as exc:
                    self._send_error(exc.status, exc.reason)
                    return
                if req is None:
                    return
                self.idle = False
                try:
                    if not self._handle_request(req):
                        return
                except RequestError as exc:
                    self._send_error(exc.status, exc.reason)
                    return
        except (OSError, EOFError):
            return  # the client went away; nothing to answer
        finally:
            self.registry.discard(self)
            try:
                self.sock.close()
            except OSError:
                pass

    def close_if_idle(self):
        """Wake an idle keep-alive connection so it closes (graceful shutdown)."""
        if self.idle:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer

    def _send_error(self, status, reason):
        body = ("%d %s: %s\n" % (status, _REASONS.get(status, "Error"), reason)).encode("latin-1", "replace")
        head = ("HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
                "Connection: close\r\nDate: %s\r\n\r\n" % (status, _REASONS.get(status, "Error"),
                                                           len(body), _http_date()))
        log.info("rejected request from %s: %d %s", self._peer(), status, reason)
        try:
            self.sock.sendall(head.encode("latin-1") + body)
        except OSError:
            pass  # the client is gone; the rejection is logged

    def _peer(self):
        if isinstance(self.address, tuple) and self.address:
            return self.address[0]
        return "unix"

    # One request ---------------------------------------------------------
    def _build_environ(self, req):
        headers = {}
        host_count = 0
        for name, value in req.headers:
            key = name.decode("latin-1").upper()
            if "_" in key:
                # Dropped like gunicorn does: X_Forwarded_For must not pose as X-Forwarded-For.
                continue
            key = key.replace("-", "_")
            if key == "HOST":
                host_count += 1
            val = value.decode("latin-1")
            if key in headers:
                headers[key] += "," + val
            else:
                headers[key] = val
        if host_count > 1 or (host_count == 0 and req.version == "1.1"):
            raise RequestError(400, "HTTP/1.1 requests need exactly one Host header")
        try:
            url = httptools.parse_url(req.url) if req.url[:1] != b"*" else None
        except httptools.HttpParserInvalidURLError:
            raise RequestError(400, "invalid request target") from None
        path = url.path if url is not None and url.path else b"/"
        query = url.query if url is not None and url.query else b""
        settings = self.settings
        addr = self.address
        remote_addr, remote_port = (addr[0], str(addr[1])) if isinstance(addr, tuple) and addr else ("", "")
        environ = {
            "REQUEST_METHOD": req.method.decode("latin-1"),
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query.decode("latin-1"),
            "RAW_URI": req.url.decode("latin-1"),
            "REQUEST_URI": req.url.decode("latin-1"),
            "SERVER_NAME": settings.server_name,
            "SERVER_PORT": settings.server_port,
            "SERVER_PROTOCOL": "HTTP/" + req.version,
            "REMOTE_ADDR": remote_addr,
            "REMOTE_PORT": remote_port,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
        }
        for key, val in headers.items():
            if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
                environ[key] = val
            else:
                environ["HTTP_" + key] = val
        if self._trusted_proxy(remote_addr):
            self._apply_forwarded(environ)
        self.expect_continue = headers.get("EXPECT", "").lower() == "100-continue" and req.version == "1.1"
        environ["wsgi.input"] = Input(self, req)
        return environ

    def _trusted_proxy(self, remote_addr):
        allow = self.settings.forwarded_allow
        if not remote_addr:
            return True  # unix socket: only local processes with file access can connect
        if allow is None:
            return True
        if not allow:
            return False
        import ipaddress
        try:
            ip = ipaddress.ip_address(remote_addr)
        except ValueError:
            return False
        return any(ip in net for net in allow)

    def _apply_forwarded(self, environ):
        fwd_for = environ.get("HTTP_X_FORWARDED_FOR")
        if fwd_for:
            # The rightmost address is the one our trusted proxy saw connect to it.
            client = fwd_for.split(",")[-1].strip()
            if client:
                environ["REMOTE_ADDR"] = client
        proto = environ.get("HTTP_X_FORWARDED_PROTO", "").split(",")[-1].strip().lower()
        if proto in ("http", "https"):
            environ["wsgi.url_scheme"] = proto

    def _handle_request(self, req):
        """Run the app for ``req``; return True when the connection may serve another request."""
        started = time.monotonic()
        environ = self._build_environ(req)
        resp = _Response(self, environ, req)
        try:
            resp.run(self.settings.app)
        finally:
            duration = time.monotonic() - started
            if self.settings.access_log_enabled:
                self._log_access(environ, resp, duration)
            if self.settings.observe is not None:
                self.settings.observe(environ, resp.status_code, duration)
        if not resp.keep_alive or req.upgrade or self.settings.shutting_down:
            return False
        return self._finish_body(req, environ["wsgi.input"])

    def _finish_body(self, req, body):
        """Consume what the app left unread so the next request parses cleanly."""
        if req.complete and not req.body:
            return True
        if body.unread() > _MAX_DRAIN:
            return False
        try:
            while True:
                chunk = body.read(65536)
                if not chunk:
                    break
                if body.unread() > _MAX_DRAIN:
                    return False
        except (socket.timeout, EOFError):
            return False
        return True

    def _log_access(self, environ, resp, duration):
        access_log.info('%s - - [%s] "%s %s %s" %s %s %.4f', environ.get("REMOTE_ADDR") or "-",
                        time.strftime("%d/%b/%Y:%H:%M:%S %z"), environ["REQUEST_METHOD"],
                        environ["RAW_URI"], environ["SERVER_PROTOCOL"], resp.status_code or "-",
                        resp.sent_body, duration)


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
            self.conn.send_raw(self._frame(data))

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
        except Exception:
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
        except Exception:
            self._internal_error()
        finally:
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
        watcher = gevent.spawn(self.conn.watch_disconnect, gevent.getcurrent())
        try:
            for chunk in result:
                if chunk:
                    self.write(chunk)
                elif not self.headers_sent and self.status is not None and self._wants_early_headers():
                    self.write(b"")
        finally:
            watcher.kill(block=False)
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
