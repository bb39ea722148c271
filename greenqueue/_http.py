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

import logging
import socket
import sys
import time
from urllib.parse import unquote_to_bytes

import gevent
import gevent.socket
import httptools

from ._response import _REASONS, ClientDisconnected, _http_date, _Response

log = logging.getLogger(__name__)
access_log = logging.getLogger("greenqueue.access")

_READ_SIZE = 65536
_MAX_DRAIN = 1 << 20  # unread request body we still read to keep a connection alive
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
        self.tcp = False          # Nagle can be switched (not on unix sockets)
        self._nagle = False       # Nagle is on for the current burst of chunks
        self._burst_end = None    # hub callback that ends the current burst

    # I/O ----------------------------------------------------------------
    def read_more(self, timeout):
        """recv once and feed the parser; raise EOFError when the peer closed."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(_READ_SIZE)
        if not data:
            raise EOFError
        self.parser.feed(data)

    def watch_disconnect(self, handler):
        """Kill ``handler`` (the greenlet streaming a response) when the client hangs up.

        A plain I/O watcher whose callback runs in the hub, not a greenlet: an
        idle stream costs no greenlet stack. Returns the watcher; close it
        when the stream ends.
        """
        raw = getattr(self.sock, "_sock", self.sock)
        io = gevent.get_hub().loop.io(self.sock.fileno(), 1)

        def readable():
            try:
                data = raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return  # spurious wake-up: keep watching
            except OSError:
                data = b""
            io.stop()
            if not data:
                handler.kill(ClientDisconnected("client closed the connection"), block=False)
            # Data means a pipelined request; we stop watching rather than consume it.

        io.start(readable)
        return io

    def send_raw(self, data):
        """Send bytes now (disconnects propagate as OSError)."""
        self.sock.sendall(data)

    def send_chunk(self, data):
        """Send one chunk of a streamed body; chunks produced back to back may share packets.

        A chunk sent after the hub has run (the producer waited: for a token,
        a worker, a timer) leaves at once, Nagle off. Chunks produced without
        the hub running in between are a burst: Nagle goes on for its length,
        so the kernel packs them, and off again at the hub's next turn, which
        pushes out anything still held. A lone event is never delayed; a burst
        is never split into a packet per chunk.
        """
        if self._burst_end is None:
            if self.tcp:
                self._burst_end = gevent.get_hub().loop.run_callback(self._end_burst)
        elif not self._nagle:
            self._set_nodelay(False)
        self.sock.sendall(data)

    def _end_burst(self):
        # Runs in the hub (a callback): setsockopt never blocks.
        self._burst_end = None
        if self._nagle:
            self._set_nodelay(True)  # Linux sends what Nagle held back as soon as this is set

    def end_stream(self):
        """The streamed body is done: push out anything held back and stop watching for bursts."""
        if self._burst_end is not None:
            self._burst_end.stop()
            self._burst_end = None
        if self._nagle:
            self._set_nodelay(True)

    def _set_nodelay(self, on):
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if on else 0)
            self._nagle = not on
        except OSError:
            self.tcp = False  # the socket is closing: the stream's next write will say so

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
            self.tcp = True
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
