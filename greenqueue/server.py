"""The greenqueue server: CLI, listeners, and the start-up and shutdown lifecycle.

Concurrency model: ``main()`` monkey-patches the standard library before it
imports gevent's servers, greenqueue's runners or the app (the plain stdlib
modules imported at the top are patched in place, so that order is safe),
then runs in the main greenlet: it binds, starts the
process pools and the scheduler, serves (gevent's StreamServer spawns one
greenlet per connection, see ``_http``), and waits for a signal. Signal
handlers only set an event; the shutdown itself runs in the main greenlet:
stop accepting, drain connections, drain tasks, stop pools, run shutdown
hooks, exit 0. A second signal exits at once with status 1.
"""

import logging
import os
import signal
import sys
import time
from typing import Any

from ._startup import (EXIT_STARTUP, EXIT_USAGE, StartupError, display, listen, load_app, parse_bind,
                       setup_logging, watch_blocking, where)

__all__ = ["main", "load_app", "parse_bind"]

class Server:
    """Owns listeners, the connection pool and the shutdown sequence."""

    def __init__(self, app_spec, settings, listeners=None, ready=None):
        self.app_spec = app_spec
        self.settings = settings
        self.servers = []
        self.unix_paths = []
        self.connections = set()
        # Under --workers the supervisor binds and owns the sockets; this process serves them.
        self.listeners = listeners
        self.ready = ready
        # Any: run() sets the runtime before any method that uses it.
        self.runtime: Any = None

    def _stream_servers(self, app, listeners):
        from gevent.pool import Pool
        from gevent.server import StreamServer

        from . import _http
        from .config import parse_ips

        s = self.settings
        pool = Pool(s["max_connections"])
        for bind, sock in listeners:
            family, address = parse_bind(bind)
            name, port = (address[0], address[1]) if isinstance(address, tuple) else ("localhost", "")
            http = _http.HTTPSettings(
                app, max_request_line=s["max_request_line"], max_header_size=s["max_header_size"],
                max_headers=s["max_headers"], header_timeout=s["header_timeout"],
                keepalive_timeout=s["keepalive_timeout"], forwarded_allow=parse_ips(s["forwarded_allow_ips"]),
                server_name=name, server_port=port, access_log_enabled=bool(s["access_log"]))

            def handle(client, address, http=http):
                _http.Connection(client, address, http, self.connections).handle()

            srv = StreamServer(sock, handle, spawn=pool)
            # shutdown() flips this server's settings to refuse new requests on kept-alive connections.
            srv.http_settings = http  # type: ignore[attr-defined]
            self.servers.append(srv)
        self.pool = pool

    def run(self):
        """Start everything, serve until a signal, shut down; return the exit status."""

        import gevent
        from gevent.event import Event

        from . import events
        from .runtime import get_runtime

        log = logging.getLogger("greenqueue.server")
        s = self.settings
        self.runtime = rt = get_runtime()
        user_app = load_app(self.app_spec)
        if hasattr(user_app, "app_context"):
            # Tasks claimed from a shared store were spawned in another process: they run in
            # this server's Flask app context, as a task spawned in a request here would.
            rt.runner.app = user_app
        if s["workers"] > 1 and not s["journal"] and len(rt.scheduler):
            raise StartupError("--workers %d without --journal: every process would fire the @periodic jobs "
                               "of %s; give them a shared journal (a file or postgresql://...) so one leader "
                               "fires each run" % (s["workers"], self.app_spec))
        app = self._observed(user_app)
        listeners = self.listeners if self.listeners is not None else self._bind()
        self._stream_servers(app, listeners)
        opts = {k: s[k] for k in ("max_concurrency", "max_pending") if s.get(k) is not None}
        if opts:
            rt.configure(**opts)
        try:
            rt.hooks.run_startup()
        except Exception as exc:
            self._remove_unix_sockets()
            raise StartupError("startup hook failed: %s: %s (at %s)" % (type(exc).__name__, exc, where(exc)),
                               EXIT_STARTUP) from None
        self._start_runtime()
        stop = Event()
        reason = []

        def on_signal(signum):
            if stop.is_set():
                log.warning("second %s: exiting now without draining", signal.Signals(signum).name)
                sys.stderr.flush()
                os._exit(1)
            reason.append(signal.Signals(signum).name)
            stop.set()

        gevent.signal_handler(signal.SIGTERM, on_signal, signal.SIGTERM)
        gevent.signal_handler(signal.SIGINT, on_signal, signal.SIGINT)
        for srv in self.servers:
            srv.start()
        addresses = tuple(display(b) for b, _ in listeners)
        events.notify(events.ServerStarting(addresses=addresses, app=self.app_spec))
        extras = []
        if s["dirty_apps"]:
            extras.append("dirty apps: " + ", ".join(s["dirty_apps"]))
        if rt.store.durable:
            extras.append("journal: " + rt.store.display)
        first = addresses[0] if addresses[0].startswith("http") else "http://localhost"
        if s["dashboard_path"]:
            extras.append("dashboard: %s%s/" % (first, s["dashboard_path"].rstrip("/")))
        if s["metrics_path"]:
            extras.append("metrics: %s%s" % (first, s["metrics_path"]))
        log.info("greenqueue %s serving %s on %s (pid %d%s)", _version(), self.app_spec,
                 ", ".join(addresses), os.getpid(), "".join(", " + e for e in extras))
        if self.ready is not None:
            self.ready()
        stop.wait()
        return self.shutdown(reason[0] if reason else "stop")

    def _bind(self):
        """Listen on every --bind address; StartupError (and nothing left bound) if one fails."""
        listeners = []
        try:
            for bind in self.settings["bind"]:
                listeners.append((bind, listen(bind, self.settings["backlog"])))
                if bind.startswith("unix:"):
                    self.unix_paths.append(bind[5:])
        except StartupError:
            for _, sock in listeners:
                sock.close()
            self._remove_unix_sockets()
            raise
        return listeners

    def _observed(self, app):
        """Wrap the app with /metrics and the dashboard when asked for."""
        s = self.settings
        self.metrics = None
        if not (s["metrics_path"] or s["dashboard_path"]):
            return app
        from . import dashboard
        from .config import parse_ips
        for name in ("metrics_path", "dashboard_path"):
            if s[name] and not s[name].startswith("/"):
                raise StartupError("--%s %r: must start with /" % (name.replace("_", "-"), s[name]))
        wrapped, self.metrics = dashboard.install(app, s["metrics_path"], s["dashboard_path"],
                                                  parse_ips(s["dashboard_allow_ips"]), s["dashboard_token"],
                                                  self.connections, runtime=self.runtime)
        return wrapped

    def _start_runtime(self):
        """Start pools, the journal, the scheduler and consumers; a failure stops what started."""
        s = self.settings
        try:
            self.runtime.start(dirty_apps=s["dirty_apps"], dirty_workers=s["dirty_workers"],
                               dirty_timeout=s["dirty_timeout"], journal=s["journal"] or None,
                               lease_timeout=s["lease_timeout"], queues=s["queues"],
                               journal_sync=s["journal_sync"])
        except Exception as exc:
            self._remove_unix_sockets()
            self.runtime.pools.stop(5)
            from .errors import JournalError
            if isinstance(exc, JournalError):
                raise StartupError("--journal: %s" % exc) from None
            raise StartupError("--dirty-app: %s: %s" % (type(exc).__name__, exc)) from None

    def shutdown(self, reason):
        """Graceful shutdown: stop accepting, drain connections and tasks, stop pools, run hooks."""

        from . import events

        log = logging.getLogger("greenqueue.server")
        rt = self.runtime
        deadline = time.monotonic() + self.settings["graceful_timeout"]
        events.notify(events.ServerStopping(reason=reason))
        for srv in self.servers:
            srv.stop_accepting()
            srv.http_settings.shutting_down = True
            try:
                srv.socket.close()
            except OSError:
                pass  # already closed
        self._remove_unix_sockets()
        busy = sum(1 for c in self.connections if not c.idle)
        log.info("%s: stopped accepting; draining %d busy connection(s), graceful timeout %.0fs",
                 reason, busy, self.settings["graceful_timeout"])
        # Stop taking messages and firing jobs first; batches in hand finish (and ack) before anything closes.
        rt.stop_intake(deadline - time.monotonic())
        for conn in list(self.connections):
            conn.close_if_idle()
        self.pool.join(timeout=max(0.0, deadline - time.monotonic()))
        left = len(self.pool)
        if left:
            log.warning("graceful timeout: closing %d connection(s) still busy", left)
            self.pool.kill(block=True, timeout=5)
        else:
            log.info("connections drained")
        rt.drain(deadline - time.monotonic())
        if len(rt.pools):
            rt.pools.stop(max(1.0, deadline - time.monotonic()))
            log.info("worker pools stopped")
        rt.close_store()
        rt.hooks.run_shutdown()
        log.info("shutdown complete")
        return 0

    def _remove_unix_sockets(self):
        for path in self.unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.unix_paths = []


def _version():
    from . import __version__
    return __version__


def main(argv=None):
    """Entry point of ``python -m greenqueue.server`` and the ``greenqueue`` command."""
    # Patch before anything imports socket/threading users, and before the app is imported.
    from gevent import monkey
    monkey.patch_all()

    from .config import load
    from .errors import ConfigError

    try:
        app_spec, settings = load(argv)
    except ConfigError as exc:
        print("greenqueue: error: %s" % exc, file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings)
    if settings["workers"] > 1:
        from ._supervisor import Supervisor
        try:
            return Supervisor(app_spec, settings, serve).run()
        except StartupError as exc:
            print("greenqueue: error: %s" % exc, file=sys.stderr)
            return exc.status
    return serve(app_spec, settings)


def serve(app_spec, settings, listeners=None, ready=None):
    """Run one server process until it is told to stop; returns its exit status."""
    from . import eventlog
    eventlog.install()  # one log line per task/job/worker/server event
    if settings["max_blocking_ms"]:
        watch_blocking(settings["max_blocking_ms"])
    try:
        return Server(app_spec, settings, listeners, ready).run()
    except StartupError as exc:
        print("greenqueue: error: %s" % exc, file=sys.stderr)
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
