"""A strict HTTP/1.1 connection handler for gevent's StreamServer, parsed by llhttp.

Concurrency model: gevent's StreamServer accepts connections in the hub and
hands each to :meth:`Connection.adopt`, which starts no greenlet. An idle
keep-alive connection is a watcher, a timer and this object; when its client
sends something the watcher's callback (in the hub) queues it on the
:class:`Dispatcher`, whose few runner greenlets serve the ready connections
back to back (the WSGI app runs in the runner), switching to the hub only
when an app blocks or the queue is empty, as a thread pool's workers would.
A runner that blocks leaves the queue to another. The app may block on I/O
but a CPU loop blocks the hub. Each connection owns its parser, two I/O
watchers (one to wait for requests and body bytes, one to notice a hang-up
while a stream runs) and one timer for its deadlines; their callbacks run in
the hub. :meth:`Connection.handle` serves a connection in a greenlet of its
own instead (tests, and embedding in another server). Nothing is shared between connections except the read-only
:class:`HTTPSettings` (whose ``shutting_down`` flag the server sets), the
server's set of live connections, a bounded cache of header names (in
:mod:`greenqueue._request`) and the list of connections whose whole
response waits for the end of the hub's turn (sent by one hub callback; see
:meth:`Connection.send_final`). All of it belongs to the one hub that
serves connections (the main thread's).

Why not gevent.pywsgi's own parser: it accepts many malformed requests and
treats unknown transfer codings as "no body" (a request-smuggling risk).
llhttp (through ``httptools``) rejects those; :mod:`greenqueue._request`
adds the limits llhttp leaves to the embedder (request line, header count
and size, HTTP version, asterisk-form only for OPTIONS), this module the
header timeout, and it writes responses so the headers and the first body
chunk leave in one send, which avoids the delayed-ACK stall pywsgi has on
keep-alive connections.

Why the socket is read and written below gevent's socket methods: those set
up a gevent.Timeout per wait and ask the kernel for the send buffer size per
sendall, a third of this server's own cost per request. Here a connection
tries the non-blocking system call first, waits on its own watcher only
when the kernel says it would block, and keeps one timer whose deadline it
moves (a float store per wait) instead of starting and cancelling a timer
per wait.

Why a waiting connection holds nothing of its finished request: with
hundreds of clients one turn of the hub runs hundreds of requests, so an
object a parked connection keeps until its next request (the last request,
a bound method made per wait) outlives the young garbage collections and
reaches the oldest generation, whose full collections (each scanning the
whole heap) then come more often.
"""

import logging
import socket
import sys
import time
from collections import deque
from contextvars import Context
from math import inf
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Union
from urllib.parse import unquote_to_bytes

import gevent
import httptools
from gevent import getcurrent

from . import _websocket, events
from ._request import (_KEYS, _METHODS, _NO_BODY, _PROTOCOLS, HTTPSettings, Input, RequestError, _environ_key,
                       _NoBody, _Parser, _Request)
from ._response import _REASONS, ClientDisconnected, _http_date, _Response

# Part of this module's interface since before the request side had a module of its own.
__all__ = ["Connection", "ConnectionSet", "Dispatcher", "HTTPSettings", "Input", "RequestError"]

log = logging.getLogger(__name__)
access_log = logging.getLogger("greenqueue.access")

_READ_SIZE = 65536
_MAX_DRAIN = 1 << 20  # unread request body we still read to keep a connection alive
_monotonic = time.monotonic
_RequestFinished = events.RequestFinished
_wanted = events.wanted
# Whole responses up to this size wait for the end of the hub's turn; larger ones leave at once.
_BATCH_MAX = 65536
# Connections with a response waiting for the end of the hub's turn (this process serves
# connections from one hub, the main thread's).
_PENDING: List["Connection"] = []


def _busy(loop: Any) -> bool:
    """True when the hub has other watchers to run in this turn (other clients' requests, say)."""
    return getattr(loop, "pendingcnt", 1) > 0  # libev counts them; other loops: assume busy


def _flush_pending() -> None:
    """Send every response queued during this turn of the hub (a hub callback)."""
    conns = _PENDING[:]
    del _PENDING[:]
    for conn in conns:
        conn._flush_queued()


class Connection:
    """Serves every request of one client connection, one after the other."""

    __slots__ = ("sock", "address", "settings", "registry", "parser", "idle", "expect_continue", "body_timeout",
                 "tcp", "_nagle", "_burst_end", "_raw", "_hub", "_rio", "_dio", "_streamer", "_deadline",
                 "_waiter", "_parked", "_timer", "_timer_at", "_peer_addr", "_peer_port", "_trusted", "_out",
                 "_queued", "_wake", "ws", "dispatcher", "_on_ready_cb", "_iio")

    def __init__(self, sock: Any, address: Any, settings: HTTPSettings, registry: Any) -> None:
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
        self._burst_end: Any = None  # hub callback that ends the current burst
        # The non-blocking socket under gevent's: system calls without gevent's per-call set-up.
        self._raw = getattr(sock, "_sock", sock)
        self._hub = gevent.get_hub()
        self._rio: Any = None     # watcher a read waits on (made at the first wait)
        self._dio: Any = None     # watcher for a hang-up while a stream runs (made at the first stream)
        self._streamer: Any = None  # the greenlet to stop when the client hangs up mid-stream
        self._deadline: Optional[float] = None  # monotonic time the current wait gives up (None: not waiting)
        self._waiter: Any = None  # the greenlet in that wait
        self._wake: Any = None    # its bound switch, made once (a new one per wait would outlive young collections)
        self._parked = False      # that greenlet is parked in _wait_readable (a flush may wake it)
        self._out: Optional[bytes] = None  # response bytes not sent yet (queued, or what a flush could not send)
        self._queued = False      # this connection is in _PENDING
        self.ws: Any = None       # what took the socket over (a WebSocket), if anything did
        self.dispatcher: Optional["Dispatcher"] = None  # set when runners serve it (the server), not a greenlet
        self._on_ready_cb: Any = None  # its bound _on_ready, made once: the idle watcher's callback
        self._iio: Any = None     # the idle watcher (runners): left running while it is served, see _on_ready
        self._timer: Any = None   # one-shot timer at _timer_at; it moves on when the deadline moved
        self._timer_at = inf
        # Decided once per connection, not per request: the peer does not change.
        self._peer_addr: str = address[0] if isinstance(address, tuple) and address else ""
        self._peer_port: str = str(address[1]) if isinstance(address, tuple) and address else ""
        self._trusted = self._trusted_proxy(self._peer_addr)  # X-Forwarded-* from this peer are believed

    # I/O ----------------------------------------------------------------
    def _recv(self, timeout: Optional[float], wait_first: bool = False) -> bytes:
        """recv once (b"" when the peer closed); socket.timeout when nothing came in ``timeout`` seconds."""
        raw = self._raw
        if wait_first:
            self._wait_readable(timeout)
        while True:
            try:
                return raw.recv(_READ_SIZE)
            except BlockingIOError:
                self._wait_readable(timeout)

    def _wait_readable(self, timeout: Optional[float]) -> None:
        if self._out is not None and not self._queued:
            self.send_raw(b"")  # what a flush could not send leaves before we wait on the client
        rio = self._rio
        if rio is None:
            rio = self._rio = self._hub.loop.io(self._raw.fileno(), 1)
        glet = getcurrent()
        if glet is not self._waiter or self._wake is None:
            self._waiter = glet
            self._wake = glet.switch
        if timeout is not None:
            deadline = _monotonic() + timeout
            self._deadline = deadline
            if deadline < self._timer_at:
                self._arm(timeout, deadline)
        # The watcher switches straight back into this greenlet (no Waiter object per wait);
        # a stray switch only costs a recv that finds nothing, after which we wait again.
        rio.start(self._wake)
        self._parked = True
        try:
            self._hub.switch()
        finally:
            self._parked = False
            rio.stop()
            self._deadline = None

    def _arm(self, seconds: float, at: float) -> None:
        if self._timer is not None:
            self._timer.close()
        timer = self._hub.loop.timer(seconds, ref=False)
        timer.start(self._on_timer)
        self._timer = timer
        self._timer_at = at

    def _on_timer(self) -> None:
        # Runs in the hub. The deadline may have moved since the timer was set: follow it.
        self._timer = None
        self._timer_at = inf
        deadline = self._deadline
        if deadline is None:
            return  # not waiting now; the next wait sets a timer again
        left = deadline - _monotonic()
        if left > 0:
            self._arm(left, deadline)
            return
        self._deadline = None
        if self._waiter is None:
            self._expire()  # idle, served by runners: no greenlet waits on it
            return
        self._waiter.throw(socket.timeout("timed out"))

    def read_more(self, timeout: Optional[float]) -> None:
        """recv once and feed the parser; raise EOFError when the peer closed."""
        data = self._recv(timeout)
        if not data:
            raise EOFError
        self.parser.feed(data)

    def watch_disconnect(self, handler: Any) -> None:
        """Kill ``handler`` (the greenlet streaming a response) when the client hangs up.

        A plain I/O watcher whose callback runs in the hub, not a greenlet: an
        idle stream costs no greenlet stack. Call :meth:`unwatch_disconnect`
        when the stream ends.
        """
        dio = self._dio
        if dio is None:
            dio = self._dio = self._hub.loop.io(self._raw.fileno(), 1)
        self._streamer = handler
        dio.start(self._on_readable)

    def unwatch_disconnect(self) -> None:
        """Stop watching for a hang-up (the stream ended)."""
        if self._dio is not None:
            self._dio.stop()
        self._streamer = None

    def _on_readable(self) -> None:
        # Runs in the hub while a stream is being sent.
        try:
            data = self._raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # spurious wake-up: keep watching
        except OSError:
            data = b""
        self._dio.stop()
        if not data and self._streamer is not None:
            # Thrown now, from the hub (as a gevent.Timeout is), not from a later callback: by then
            # a runner may have finished this stream and be serving another connection.
            streamer, self._streamer = self._streamer, None
            streamer.throw(ClientDisconnected("client closed the connection"))
        # Data means a pipelined request; we stop watching rather than consume it.

    def send_raw(self, data: bytes) -> None:
        """Send bytes now, behind any response still queued (disconnects propagate as OSError)."""
        out = self._out
        if out is not None:
            self._out = None
            data = out + data
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            # The kernel's buffer is full (a slow reader, a large body): let gevent wait for room.
            self.sock.sendall(memoryview(data)[sent:])

    def send_final(self, data: bytes) -> None:
        """Queue a whole response of a kept-alive connection; it leaves at the end of the hub's turn.

        When other clients' requests are ready in the same turn, the hub runs
        them all back to back and then sends every response back to back: the
        interpreter's caches stay warm across requests instead of being
        flushed by a send system call between each two (a quarter to a third
        of a Flask hello's CPU per request, measured). A response waits at most
        for the other requests of its turn; responses to pipelined requests
        leave together in one send. With nothing else to run, it leaves now.
        """
        dispatcher = self.dispatcher
        if len(data) > _BATCH_MAX or not (_PENDING or self.parser.queue or (dispatcher is not None and dispatcher.ready)
                                          or _busy(self._hub.loop)):
            # Nothing else will run in this turn (one busy client, say): waiting would only add latency.
            self.send_raw(data)
            return
        out = self._out
        self._out = data if out is None else out + data
        if not self._queued:
            self._queued = True
            if not _PENDING:
                self._hub.loop.run_callback(_flush_pending)
            _PENDING.append(self)

    def _flush_queued(self) -> None:
        # Runs in the hub, from _flush_pending; must not block.
        self._queued = False
        data = self._out
        if data is None:
            return  # the greenlet already sent it, ahead of a later write
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._out = None
            return  # the client is gone: the greenlet's next read or write says so
        if sent == len(data):
            self._out = None
            return
        # The kernel's buffer is full. The greenlet sends the rest, waiting for room: now
        # if it is waiting for the client's next request, else at its next read or write.
        self._out = data[sent:]
        if self._parked:
            self._waiter.switch()
        elif self.dispatcher is not None and self.idle and self._waiter is None:
            self._on_ready()  # idle with no greenlet: a runner sends the rest (its serve() starts there)

    def send_chunk(self, data: bytes) -> None:
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
                self._burst_end = self._hub.loop.run_callback(self._end_burst)
        elif not self._nagle:
            self._set_nodelay(False)
        self.send_raw(data)

    def _end_burst(self) -> None:
        # Runs in the hub (a callback): setsockopt never blocks.
        self._burst_end = None
        if self._nagle:
            self._set_nodelay(True)  # Linux sends what Nagle held back as soon as this is set

    def end_stream(self) -> None:
        """The streamed body is done: push out anything held back and stop watching for bursts."""
        if self._burst_end is not None:
            self._burst_end.stop()
            self._burst_end = None
        if self._nagle:
            self._set_nodelay(True)

    def _set_nodelay(self, on: bool) -> None:
        try:
            self._raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if on else 0)
            self._nagle = not on
        except OSError:
            self.tcp = False  # the socket is closing: the stream's next write will say so

    def _next_request(self, wait_first: bool) -> Optional[_Request]:
        """Return the next request once its headers are in, or None when the client is done."""
        queue = self.parser.queue
        settings = self.settings
        started = None
        while True:
            if queue:
                if queue[0].headers_done:
                    return queue.popleft()
                # Part of a request is in: its headers must be complete within the header timeout.
                now = _monotonic()
                if started is None:
                    started = now
                timeout = settings.header_timeout
                if timeout is not None:
                    timeout -= now - started
                    if timeout <= 0:
                        raise RequestError(408, "request headers not received within %ss"
                                           % settings.header_timeout)
            elif settings.shutting_down:
                if settings.retire_grace is None:
                    return None
                # Retiring: a client may be sending its next request right now; wait a little
                # for it (it gets Connection: close) rather than close the connection under it.
                timeout = settings.retire_grace
            else:
                timeout = settings.keepalive_timeout
            try:
                data = self._recv(timeout, wait_first)
            except socket.timeout:
                if not queue:
                    return None  # idle keep-alive connection timed out: close quietly
                raise RequestError(408, "request headers not received within %ss"
                                   % settings.header_timeout) from None
            if not data:
                return None
            wait_first = False
            self.parser.feed(data)

    def _open(self) -> None:
        """Register the connection and set its socket up (both models)."""
        self.registry.add(self)
        try:
            self._raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.tcp = True
        except OSError:
            pass  # unix sockets have no Nagle to turn off
        # For the rare waits left to gevent (a send into a full buffer).
        self.sock.settimeout(self.body_timeout)

    def handle(self) -> None:
        """Serve requests until the client closes, asks to, or errs."""
        self._open()
        # A new connection's first request is usually in already; after a response the
        # next one rarely is, so then we wait before reading instead of failing a recv.
        wait_first = False
        try:
            while True:
                self.idle = True
                try:
                    req = self._next_request(wait_first)
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
                wait_first = not self.parser.queue
                if wait_first:
                    # Nothing half-parsed is left: let the finished request go before we wait.
                    # Kept by hundreds of parked connections, requests would reach the oldest
                    # garbage-collected generation (see the module docstring).
                    self.parser.current = None
                req = None
        except (OSError, EOFError):
            return  # the client went away; nothing to answer
        finally:
            self.registry.discard(self)
            self._release()

    # Served by runners (the server's model) ----------------------------------------
    def adopt(self, dispatcher: "Dispatcher") -> None:
        """Start serving this new connection with the dispatcher's runners (called in the hub: never blocks)."""
        self.dispatcher = dispatcher
        self._open()
        self._on_ready_cb = self._on_ready
        self.idle = False
        dispatcher.push(self)  # a new connection's first request is usually in already

    def _on_ready(self) -> None:
        # Runs in the hub: the idle connection has bytes (or a hang-up); a runner takes it. The
        # watcher keeps running: a runner usually reads the bytes within this turn, so stopping
        # and restarting it per request would only cost time. Should it fire while the connection
        # is being served (pipelined bytes, a runner blocked in the app), it stops until idle again.
        if not self.idle:
            self._iio.stop()
            return
        self._deadline = None
        self.idle = False
        dispatcher = self.dispatcher
        assert dispatcher is not None
        dispatcher.ready.append(self)  # Dispatcher.push, inlined: this runs once per request
        loop = self._hub.loop
        if dispatcher.idle and not _busy(loop):
            # No other watcher is pending in this turn: hand the queue to a runner now rather
            # than through a callback at the end of the turn (one client: a turn per request).
            dispatcher.idle.pop().switch()
        elif not dispatcher.kick_pending:
            dispatcher.kick_pending = True
            loop.run_callback(dispatcher._kick)

    def serve(self, contexts: List[Context]) -> None:
        """In a runner: serve every request that is ready without waiting for the client, then go idle or close.

        ``contexts[0]`` is the runner's empty context (a context is entered by one greenlet at a time).
        """
        keep = False
        try:
            keep = self._serve_ready(contexts)
        except RequestError as exc:
            self._send_error(exc.status, exc.reason)
        except (OSError, EOFError):
            pass  # the client went away; nothing to answer
        finally:
            if not keep:
                self.registry.discard(self)
                self._release()

    def _serve_ready(self, contexts: List[Context]) -> bool:
        """Serve what is ready; True when the connection was left idle (watched), False to close it."""
        if self._out is not None and not self._queued:
            self.send_raw(b"")  # what a flush could not send leaves before anything else
        queue = self.parser.queue
        settings = self.settings
        fresh = True  # the watcher fired (or the connection is new): a recv will find bytes or the hang-up
        req: Optional[_Request]
        while True:
            if queue and queue[0].headers_done:
                req = queue.popleft()
            elif queue:
                # Part of a request is in: wait in this runner for the rest, within the header timeout.
                req = self._next_request(False)
                if req is None:
                    return False
            elif settings.shutting_down and settings.retire_grace is None:
                return False
            elif fresh:
                fresh = False
                try:
                    data = self._raw.recv(_READ_SIZE)
                except BlockingIOError:
                    return self._go_idle()
                if not data:
                    return False
                self.parser.feed(data)
                continue
            else:
                return self._go_idle()
            self.idle = False
            # Each request runs in an empty context, as under a thread-pool server: a context variable an
            # app set and never reset does not reach the next request this runner serves. The context is
            # reused while requests leave it empty (Flask resets what it sets), a new one made otherwise.
            ctx = contexts[0]
            keep = ctx.run(self._handle_request, req)
            if len(ctx):
                contexts[0] = Context()
            if not keep:
                return False
            req = None  # not kept while idle (see the module docstring)

    def _go_idle(self) -> bool:
        """Wait for the next request with a watcher and a timer, no greenlet; True (the connection stays).

        Called with nothing left in the parser's queue (``_serve_ready`` serves it first).
        """
        self.parser.current = None  # see the module docstring: parked connections hold no request
        settings = self.settings
        if settings.shutting_down:
            if settings.retire_grace is None:
                return False
            timeout: Optional[float] = settings.retire_grace
        else:
            timeout = settings.keepalive_timeout
        self.idle = True
        self._waiter = self._wake = None
        if timeout is not None:
            deadline = _monotonic() + timeout
            self._deadline = deadline
            if deadline < self._timer_at:
                self._arm(timeout, deadline)
        iio = self._iio
        if iio is None:
            iio = self._iio = self._hub.loop.io(self._raw.fileno(), 1)
            iio.start(self._on_ready_cb)
        elif not iio.active:
            iio.start(self._on_ready_cb)
        return True

    def _expire(self) -> None:
        # Runs in the hub (or the draining greenlet): an idle connection with no greenlet closes
        # quietly; its keep-alive or retiring grace ran out, or the server shuts down.
        if self._iio is not None:
            self._iio.stop()
        self._deadline = None
        self._out = None  # what is still queued was sent by close_if_idle, or lost with the client
        self.registry.discard(self)
        self._release()

    def _release(self) -> None:
        if self._out is not None:
            try:
                self.send_raw(b"")
            except OSError:
                pass  # the client is gone; nothing left to tell it
        for watcher in (self._timer, self._rio, self._dio, self._iio):
            if watcher is not None:
                watcher.close()
        self._timer = self._rio = self._dio = self._iio = None
        self._waiter = self._wake = None
        try:
            self.sock.close()
        except OSError:
            pass

    def retire(self, grace: float) -> None:
        """A retiring process: an idle connection waits at most ``grace`` more seconds for a request."""
        if self.idle and (self._parked or self.dispatcher is not None and self._waiter is None):
            deadline = _monotonic() + grace
            if self._deadline is None or deadline < self._deadline:
                self._deadline = deadline
                if deadline < self._timer_at:
                    self._arm(grace, deadline)

    def close_if_idle(self) -> None:
        """Wake an idle keep-alive connection so it closes (graceful shutdown)."""
        if self.idle and self.dispatcher is not None and self._waiter is None:
            # Served by runners and idle: no greenlet to wake; close it here, its answer sent first.
            if self._out is not None:
                try:
                    self._raw.send(self._out)
                except OSError:
                    pass  # the client is gone, or its buffer is full: it was told nothing more
            self._expire()
            return
        if self.idle:
            try:
                # A response may still be queued: then only stop reading, and the
                # greenlet sends it before it closes.
                self.sock.shutdown(socket.SHUT_RD if self._out is not None else socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer

    # WebSocket takeover (see _websocket) ---------------------------------------------
    def take_over(self, taker: Any) -> None:
        """The app takes the socket (a WebSocket): it owns every read and write from now on."""
        if self.ws is None:
            self.ws = taker
            # The app's own reads wait as long as its protocol says (pings), not our keep-alive timeout.
            self.sock.settimeout(None)
            log.debug("WebSocket %s taken over by the app", self._peer())

    def end_websocket(self) -> None:
        """The app returned after a takeover: close what it left open, write nothing else."""
        if isinstance(self.ws, _websocket.WebSocket):
            self.ws.close()  # gevent-websocket's object left open: a 1000 close, as gevent-websocket does

    def going_away(self) -> None:
        """The graceful timeout ended: close this WebSocket with 1001 so its handler returns."""
        ws = self.ws
        try:
            if isinstance(ws, _websocket.WebSocket):
                ws.close(1001, "server shutting down")
            else:
                self.sock.sendall(_websocket.GOING_AWAY_FRAME)
        except OSError:
            pass  # the client is gone: its handler hears so from its own read
        except _websocket.WebSocketError:
            pass  # closed already

    def _send_error(self, status: int, reason: str) -> None:
        body = ("%d %s: %s\n" % (status, _REASONS.get(status, "Error"), reason)).encode("latin-1", "replace")
        head = ("HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
                "Connection: close\r\nDate: %s\r\n\r\n" % (status, _REASONS.get(status, "Error"),
                                                           len(body), _http_date()))
        log.info("rejected request from %s: %d %s", self._peer(), status, reason)
        try:
            self.send_raw(head.encode("latin-1") + body)
        except OSError:
            pass  # the client is gone; the rejection is logged

    def _peer(self) -> str:
        if isinstance(self.address, tuple) and self.address:
            return self.address[0]
        return "unix"

    # One request ---------------------------------------------------------
    def _build_environ(self, req: _Request) -> Dict[str, Any]:
        # A copy of the server's constant part (no per-connection copy: an idle stream holds less).
        environ = self.settings.base_environ.copy()
        environ["REMOTE_ADDR"] = self._peer_addr
        environ["REMOTE_PORT"] = self._peer_port
        environ["wsgi.errors"] = sys.stderr
        url = req.url
        if url[:1] == b"/" and b"#" not in url:
            path, _, query = url.partition(b"?")
        elif url == b"*":
            path, query = b"/", b""
        else:
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise RequestError(400, "invalid request target") from None
            path, query = parsed.path or b"/", parsed.query or b""
        environ["PATH_INFO"] = (unquote_to_bytes(path) if b"%" in path else path).decode("latin-1")
        environ["QUERY_STRING"] = query.decode("latin-1")
        environ["RAW_URI"] = environ["REQUEST_URI"] = url.decode("latin-1")
        environ["REQUEST_METHOD"] = _METHODS.get(req.method) or req.method.decode("latin-1")
        version = req.version
        environ["SERVER_PROTOCOL"] = _PROTOCOLS[version]
        keys = _KEYS
        for name, value in req.headers:
            key = keys.get(name)
            if key is None:
                key = _environ_key(name)
            if not key:
                continue
            if key in environ:
                if key == "HTTP_HOST":
                    raise RequestError(400, "HTTP/1.1 requests need exactly one Host header")
                environ[key] += "," + value.decode("latin-1")
            else:
                environ[key] = value.decode("latin-1")
        if version == "1.1" and "HTTP_HOST" not in environ:
            raise RequestError(400, "HTTP/1.1 requests need exactly one Host header")
        if self._trusted and ("HTTP_X_FORWARDED_FOR" in environ or "HTTP_X_FORWARDED_PROTO" in environ):
            self._apply_forwarded(environ)
        expect = environ.get("HTTP_EXPECT")
        self.expect_continue = isinstance(expect, str) and version == "1.1" and expect.lower() == "100-continue"
        environ["wsgi.input"] = _NO_BODY if req.complete and not req.body else Input(self, req)
        if req.upgrade and _websocket.wants_websocket(environ):
            _websocket.offer(self, environ)
        return environ

    def _trusted_proxy(self, remote_addr: str) -> bool:
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

    def _apply_forwarded(self, environ: Dict[str, Any]) -> None:
        fwd_for = environ.get("HTTP_X_FORWARDED_FOR")
        if fwd_for:
            # The rightmost address is the one our trusted proxy saw connect to it.
            client = fwd_for.split(",")[-1].strip()
            if client:
                environ["REMOTE_ADDR"] = client
        proto = environ.get("HTTP_X_FORWARDED_PROTO", "").split(",")[-1].strip().lower()
        if proto in ("http", "https"):
            environ["wsgi.url_scheme"] = proto

    def _handle_request(self, req: _Request) -> bool:
        """Run the app for ``req``; return True when the connection may serve another request."""
        started = _monotonic()
        environ = self._build_environ(req)
        resp = _Response(self, environ, req)
        settings = self.settings
        budget = settings.budget
        if budget is not None:
            budget.spend()
        try:
            resp.run(settings.app)
        finally:
            if settings.access_log_enabled:
                self._log_access(environ, resp, _monotonic() - started)
            if _wanted(_RequestFinished):
                events.notify(_RequestFinished(method=environ["REQUEST_METHOD"], path=environ["PATH_INFO"],
                                               status=resp.status_code or 0, seconds=_monotonic() - started))
        if not resp.keep_alive or req.upgrade or settings.shutting_down:
            return False
        if req.complete and not req.body:
            return True
        return self._finish_body(req, environ["wsgi.input"])

    def _finish_body(self, req: _Request, body: Union[Input, _NoBody]) -> bool:
        """Consume what the app left unread so the next request parses cleanly."""
        if body.cut or body.unread() > _MAX_DRAIN:
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

    def _log_access(self, environ: Dict[str, Any], resp: _Response, duration: float) -> None:
        access_log.info('%s - - [%s] "%s %s %s" %s %s %.4f', environ.get("REMOTE_ADDR") or "-",
                        time.strftime("%d/%b/%Y:%H:%M:%S %z"), environ["REQUEST_METHOD"],
                        environ["RAW_URI"], environ["SERVER_PROTOCOL"], resp.status_code or "-",
                        resp.sent_body, duration)


class ConnectionSet(Set[Connection]):
    """The server's live connections: a set that reopens the doors when one closes below the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        #: Called (in whatever greenlet closed a connection) when the count drops below the limit.
        self.on_room: Callable[[], None] = _nothing
        self._empty: Any = None

    def discard(self, conn: object) -> None:
        """Forget ``conn``; tell the servers there is room again, and anyone draining when it was the last."""
        if conn not in self:
            return
        super().discard(conn)
        n = len(self)
        if n == self.limit - 1:
            self.on_room()
        if not n and self._empty is not None:
            self._empty.set()

    def full(self) -> bool:
        """True at the limit: gevent's accept loop stops until a connection closes."""
        return len(self) >= self.limit

    def wait_empty(self, timeout: float) -> bool:
        """Block the calling greenlet until no connection is left or ``timeout`` passes; True when empty."""
        if not self:
            return True
        from gevent.event import Event
        if self._empty is None:
            self._empty = Event()
        self._empty.clear()
        return bool(self._empty.wait(timeout)) or not self


def _nothing() -> None:
    """The default: nobody is waiting for room."""


class Dispatcher:
    """Runs ready connections on a few runner greenlets, back to back; an idle connection holds no greenlet.

    A connection's watcher (a hub callback) pushes it here when its client
    sends something. One callback per turn of the hub then hands the queue to
    a runner, which serves the ready connections one after the other without
    going back to the hub in between, switching only when the app blocks. A
    runner that takes a connection while others still wait makes sure the
    hub will hand the rest to another runner if it blocks, so no connection
    waits behind a blocked one; the queue is served in order (FIFO), so none
    waits more than one round. Runners left idle park; a few are kept, the
    rest end.
    """

    __slots__ = ("ready", "idle", "runners", "kick_pending", "hub", "max_idle")

    def __init__(self, max_idle: int = 16) -> None:
        self.ready: Deque[Connection] = deque()
        self.idle: Set[Any] = set()       # parked runners
        self.runners: Set[Any] = set()    # every runner alive
        self.kick_pending = False
        self.hub = gevent.get_hub()
        self.max_idle = max_idle

    def push(self, conn: Connection) -> None:
        """Queue a connection that has something to serve; a runner takes it within this turn of the hub."""
        self.ready.append(conn)
        if not self.kick_pending:
            self.kick_pending = True
            self.hub.loop.run_callback(self._kick)

    def _kick(self) -> None:
        # Runs in the hub: every runner is parked or blocked; wake one (or start one) for the queue.
        self.kick_pending = False
        if not self.ready:
            return
        if self.idle:
            self.idle.pop().switch()
        else:
            runner = gevent.Greenlet(self._run)
            self.runners.add(runner)
            runner.start()

    def _run(self) -> None:
        me = getcurrent()
        ready = self.ready
        contexts = [Context()]
        try:
            while True:
                while ready:
                    conn = ready.popleft()
                    if ready and not self.kick_pending:
                        # Should this request block, the hub hands the rest of the queue to another runner.
                        self.kick_pending = True
                        self.hub.loop.run_callback(self._kick)
                    conn.serve(contexts)
                    conn = None  # type: ignore[assignment]
                if len(self.idle) >= self.max_idle:
                    return
                self.idle.add(me)
                self.hub.switch()
                self.idle.discard(me)  # a stray switch (not the kick's) left it listed
        finally:
            self.idle.discard(me)
            self.runners.discard(me)

    def kill_busy(self, timeout: float) -> None:
        """End every runner still serving (the graceful timeout ended); parked ones end too."""
        gevent.killall(list(self.runners), block=True, timeout=timeout)
