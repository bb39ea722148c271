"""The greenqueue server: CLI, listeners, and the HTTP front of the one lifecycle.

Concurrency model: ``main()`` monkey-patches the standard library before it
imports gevent's servers, greenqueue's runners or the app (the plain stdlib
modules imported at the top are patched in place, so that order is safe),
then runs in the main greenlet: it binds, starts the process pools and the
scheduler, serves (gevent's StreamServer spawns one greenlet per
connection, see ``_http``), and waits for a signal. Start-up, signals and
shutdown are :class:`greenqueue._lifecycle.Lifecycle`'s, the same as the
worker's; this module adds what HTTP needs: stop accepting and drain the
connections before the tasks drain. The listening sockets, the connection
pool and the set of live connections belong to this process's one hub.
Under ``--workers N`` each forked server process runs :func:`serve` on
sockets the supervisor bound.
"""

import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, List, Optional, Sequence, Tuple

from ._lifecycle import (RETIRE, Front, HookServer, HookWorker, Lifecycle, prepare_process, run_hook, run_main,
                         startup_failed)
from ._startup import StartupError, display, listen, load_app, parse_bind

if TYPE_CHECKING:
    from gevent import socket as gsocket
    from gevent.server import StreamServer

    from ._http import HTTPSettings
    from ._supervisor import ChildLink
    from .config import Settings

__all__ = ["main", "serve", "load_app", "parse_bind"]

log = logging.getLogger("greenqueue.server")

#: A ``--bind`` address and the socket listening on it.
Listener = Tuple[str, "gsocket.socket"]
WSGIApp = Callable[..., Any]
# Seconds WebSocket handlers get to return after their 1001 close before they are killed.
_GOING_AWAY_WAIT = 2.0
#: Seconds a retiring process keeps an idle kept-alive connection open for a request already on its way.
RETIRE_IDLE = 1.0


class Server(Front):
    """Owns the listeners and the connections; the lifecycle drives it."""

    def __init__(self, app_spec: str, settings: "Settings", listeners: Optional[Sequence[Listener]] = None,
                 link: Optional["ChildLink"] = None) -> None:
        from ._http import ConnectionSet, Dispatcher
        from .runtime import get_runtime

        self.app_spec = app_spec
        self.settings = settings
        self.runtime = get_runtime()
        #: Each gevent server with the HTTP settings its connections share (shutdown flips them to refuse).
        self.servers: List[Tuple["StreamServer", "HTTPSettings"]] = []
        self.unix_paths: List[str] = []
        self.connections = ConnectionSet(settings.max_connections)
        self.connections.on_room = self._room_again
        # Idle connections hold a watcher; runner greenlets serve the ready ones (see _http.Dispatcher).
        self.dispatcher = Dispatcher()
        # Under --workers the supervisor binds and owns the sockets; this process serves them.
        self.listeners = listeners
        #: This process's side of its supervisor (None: it runs alone).
        self.link = link
        self.retiring = False

    def run(self) -> int:
        """Start everything, serve until a signal, shut down; return the exit status."""
        s, rt = self.settings, self.runtime
        user_app = load_app(self.app_spec)
        if hasattr(user_app, "app_context"):
            # Tasks claimed from a shared store were spawned in another process: they run in
            # this server's Flask app context, as a task spawned in a request here would.
            rt.runner.app = user_app
        if s.processes > 1 and not s.journal and len(rt.scheduler):
            raise StartupError("--workers %d without --journal: every process would fire the @periodic jobs "
                               "of %s; give them a shared journal (a file or postgresql://...) so one leader "
                               "fires each run" % (s.processes, self.app_spec))
        app = self._observed(user_app)
        listeners = self.listeners if self.listeners is not None else self._bind()
        self._stream_servers(app, listeners)
        # Alone (no supervisor handed us the sockets): SIGHUP is a graceful stop, not a kill.
        link = self.link
        # Without a journal a replacement must not fire schedules while its predecessor still does.
        after = link.wait_for_predecessor if link is not None and link.predecessor and not s.journal else None
        lifecycle = Lifecycle(rt, s, log, front=self, alone=link is None, scheduler_after=after)
        try:
            lifecycle.start()
        except StartupError:
            self._remove_unix_sockets()
            raise
        worker = HookWorker(s, self.app_spec)
        run_hook(s, "post_worker_init", worker)
        status = lifecycle.serve(lambda: self._announce(lifecycle, [bind for bind, _ in listeners]))
        worker.alive = False
        run_hook(s, "worker_exit", HookServer(s, self.app_spec), worker)
        return status

    def _bind(self) -> List[Listener]:
        """Listen on every --bind address; StartupError (and nothing left bound) if one fails."""
        listeners: List[Listener] = []
        try:
            for bind in self.settings.bind:
                listeners.append((bind, listen(bind, self.settings.backlog)))
                if bind.startswith("unix:"):
                    self.unix_paths.append(bind[5:])
        except StartupError:
            for _, sock in listeners:
                sock.close()
            self._remove_unix_sockets()
            raise
        return listeners

    def _observed(self, app: WSGIApp) -> WSGIApp:
        """Wrap the app with /metrics and the dashboard when asked for."""
        s = self.settings
        if not (s.metrics_path or s.dashboard_path):
            return app
        from . import dashboard
        from .config import parse_ips
        for flag, path in (("--metrics-path", s.metrics_path), ("--dashboard-path", s.dashboard_path)):
            if path and not path.startswith("/"):
                raise StartupError("%s %r: must start with /" % (flag, path))
        wrapped: WSGIApp = dashboard.install(app, s.metrics_path, s.dashboard_path, parse_ips(s.dashboard_allow_ips),
                                             s.dashboard_token, self.connections, runtime=self.runtime)[0]
        return wrapped

    def _stream_servers(self, app: WSGIApp, listeners: Iterable[Listener]) -> None:
        from gevent.server import StreamServer

        from . import _http
        from .config import parse_ips

        s = self.settings
        forwarded = parse_ips(s.forwarded_allow_ips)
        budget = None
        if self.link is not None and self.link.max_requests:
            from ._supervisor import RequestBudget
            budget = RequestBudget(self.link)  # one count for every listener of this process
        for bind, sock in listeners:
            _, address = parse_bind(bind)
            name, port = (address[0], address[1]) if isinstance(address, tuple) else ("localhost", "")
            http = _http.HTTPSettings(
                app, max_request_line=s.max_request_line, max_header_size=s.max_header_size,
                max_headers=s.max_headers, header_timeout=s.header_timeout,
                keepalive_timeout=s.keepalive_timeout, forwarded_allow=forwarded,
                server_name=name, server_port=port, access_log_enabled=bool(s.access_log))
            http.budget = budget

            def adopt(_run: Any, _handle: Any, _close: Any, args: Any, http: "HTTPSettings" = http) -> None:
                # gevent's accept loop calls this in the hub for each new client: no greenlet per connection.
                client, address = args
                _http.Connection(client, address, http, self.connections).adopt(self.dispatcher)

            srv = StreamServer(sock, _unused_handle, spawn=adopt)  # type: ignore[call-overload]
            # Past --max-connections gevent stops accepting; _room_again starts it when one closes.
            srv.full = self.connections.full
            self.servers.append((srv, http))

    def _announce(self, lifecycle: Lifecycle, binds: Sequence[str]) -> None:
        """Start accepting, publish ServerStarting, log the start-up line and tell the supervisor."""
        from . import __version__, _accel, events

        for srv, _ in self.servers:
            srv.start()
        addresses = tuple(display(b) for b in binds)
        events.notify(events.ServerStarting(addresses=addresses, app=self.app_spec))
        s = self.settings
        extras = lifecycle.describe()
        first = addresses[0] if addresses[0].startswith("http") else "http://localhost"
        if s.dashboard_path:
            extras.append("dashboard: %s%s/" % (first, s.dashboard_path.rstrip("/")))
        if s.metrics_path:
            extras.append("metrics: %s%s" % (first, s.metrics_path))
        extras.append("request path: %s" % _accel.status())
        log.info("greenqueue %s serving %s on %s (pid %d%s)", __version__, self.app_spec,
                 ", ".join(addresses), os.getpid(), "".join(", " + e for e in extras))
        if self.link is not None:
            self.link.ready(lifecycle.started_pools())
        else:
            run_hook(s, "when_ready", HookServer(s, self.app_spec))

    def _room_again(self) -> None:
        for srv, http in self.servers:
            if not http.shutting_down:
                srv._start_accepting_if_started()  # type: ignore[attr-defined]

    def stop_accepting(self, reason: str) -> str:
        """Close the listeners and refuse new requests on kept-alive connections."""
        from . import events

        events.notify(events.ServerStopping(reason=reason))
        self.retiring = reason == RETIRE
        for srv, http in self.servers:
            srv.stop_accepting()
            http.shutting_down = True
            if self.retiring:
                http.retire_grace = RETIRE_IDLE
            try:
                srv.socket.close()
            except OSError:
                pass  # already closed
        self._remove_unix_sockets()
        busy = sum(1 for c in self.connections if not c.idle)
        sockets = sum(1 for c in self.connections if c.ws is not None)
        return "stopped accepting; draining %d busy connection(s)%s" % (
            busy, " (%d WebSocket(s), kept open until the graceful timeout)" % sockets if sockets else "")

    def drain(self, deadline: float) -> None:
        """Let busy connections finish until ``deadline``, close idle ones now, then close what is left."""
        for conn in list(self.connections):
            if self.retiring:
                conn.retire(RETIRE_IDLE)  # its client may be sending; it gets Connection: close, or a moment
            else:
                conn.close_if_idle()
        self.connections.wait_empty(max(0.0, deadline - time.monotonic()))
        sockets = [c for c in self.connections if c.ws is not None]
        if sockets:
            # WebSockets served on through the drain; now they hear "going away" (1001), and
            # their handlers get a moment to return on their own before what is left is killed.
            log.info("graceful timeout: closing %d WebSocket(s) with 1001", len(sockets))
            for conn in sockets:
                conn.going_away()
            self.connections.wait_empty(_GOING_AWAY_WAIT)
        left = len(self.connections)
        if left:
            log.warning("graceful timeout: closing %d connection(s) still busy", left)
            self.dispatcher.kill_busy(timeout=5)
            for conn in list(self.connections):
                conn.close_if_idle()
        else:
            log.info("connections drained")

    def _remove_unix_sockets(self) -> None:
        for path in self.unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # never created, or already gone
        self.unix_paths = []


def _unused_handle(*args: Any) -> None:
    """gevent's servers need a handle; connections go to the dispatcher instead (see ``adopt``)."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m greenqueue.server`` and the ``greenqueue`` command."""
    return run_main("greenqueue", argv, _serve_or_supervise)


def _serve_or_supervise(app_spec: str, settings: "Settings") -> int:
    run_hook(settings, "on_starting", HookServer(settings, app_spec))
    if settings.supervised:
        from ._supervisor import Supervisor
        return Supervisor(app_spec, settings, serve).run()
    return serve(app_spec, settings)


def serve(app_spec: str, settings: "Settings", listeners: Optional[Sequence[Listener]] = None,
          link: Optional["ChildLink"] = None) -> int:
    """Run one server process until it is told to stop; returns its exit status."""
    prepare_process(settings)
    try:
        return Server(app_spec, settings, listeners, link).run()
    except StartupError as exc:
        return startup_failed("greenqueue", exc)


if __name__ == "__main__":
    sys.exit(main())
