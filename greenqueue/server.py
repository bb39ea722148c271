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

from ._startup import EXIT_STARTUP, EXIT_USAGE, StartupError, display, listen, load_app, parse_bind, where

__all__ = ["main", "load_app", "parse_bind"]

def _setup_logging(settings):

    level = getattr(logging, settings["log_level"].upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    access = logging.getLogger("greenqueue.access")
    access.propagate = False
    access.handlers[:] = []
    if settings["access_log"]:
        target = settings["access_log"]
        ah = logging.StreamHandler(sys.stderr) if target == "-" else logging.FileHandler(target)
        ah.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(ah)
        access.setLevel(logging.INFO)


def _watch_blocking(max_blocking_ms):

    import gevent
    from gevent import events as gevent_events

    log = logging.getLogger("greenqueue.server")
    gevent.config.monitor_thread = True
    gevent.config.max_blocking_time = max_blocking_ms / 1000.0
    # One log line per event instead of gevent's multi-line report on stderr.
    gevent.config.print_blocking_reports = False

    def on_blocked(event):
        if isinstance(event, gevent_events.EventLoopBlocked):
            stack = next((item for item in event.info if 'File "' in item), "")
            frames = [line.strip() for line in stack.splitlines() if line.strip().startswith('File "')]
            where = frames[-1] if frames else "unknown location"
            name = getattr(event.greenlet, "name", None) or type(event.greenlet).__name__
            log.warning("hub blocked for more than %.0f ms by greenlet %s at %s",
                        event.blocking_time * 1000, name, where)

    import zope.event
    zope.event.subscribers.append(on_blocked)
    import warnings
    # The hub is a greenlet and is falsy until it first runs; gevent's monitor
    # thread takes a falsy hub for a dead one and quits. Let the hub run first.
    gevent.sleep(0)
    with warnings.catch_warnings():
        # gevent would also watch memory if psutil were installed; blocking is what we asked for.
        warnings.filterwarnings("ignore", message="Unable to monitor memory usage")
        gevent.get_hub().start_periodic_monitoring_thread()


class Server:
    """Owns listeners, the connection pool and the shutdown sequence."""

    def __init__(self, app_spec, settings):
        self.app_spec = app_spec
        self.settings = settings
        self.servers = []
        self.unix_paths = []
        self.connections = set()

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

            if self.metrics is not None:
                http.observe = self.metrics.observe_http
            srv = StreamServer(sock, handle, spawn=pool)
            srv.http_settings = http
            self.servers.append(srv)
        self.pool = pool

    def run(self):
        """Start everything, serve until a signal, shut down; return the exit status."""

        import gevent
        from gevent.event import Event

        from . import events, hooks

        log = logging.getLogger("greenqueue.server")
        s = self.settings
        app = self._observed(load_app(self.app_spec))
        listeners = []
        try:
            for bind in s["bind"]:
                listeners.append((bind, listen(bind, s["backlog"])))
                if bind.startswith("unix:"):
                    self.unix_paths.append(bind[5:])
        except StartupError:
            for _, sock in listeners:
                sock.close()
            self._remove_unix_sockets()
            raise
        self._stream_servers(app, listeners)
        self._configure_tasks()
        try:
            hooks.run_startup()
        except Exception as exc:
            self._remove_unix_sockets()
            raise StartupError("startup hook failed: %s: %s (at %s)" % (type(exc).__name__, exc, where(exc)),
                               EXIT_STARTUP) from None
        pools_started = self._start_pools()
        self._open_journal()
        self._start_scheduler()
        consumers = sys.modules.get("greenqueue.consumers")
        if consumers is not None:
            consumers.start_all()  # only apps that declared @consume handlers imported the module
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
        if pools_started:
            extras.append("dirty apps: " + ", ".join(pools_started))
        first = addresses[0] if addresses[0].startswith("http") else "http://localhost"
        if s["dashboard_path"]:
            extras.append("dashboard: %s%s/" % (first, s["dashboard_path"].rstrip("/")))
        if s["metrics_path"]:
            extras.append("metrics: %s%s" % (first, s["metrics_path"]))
        log.info("greenqueue %s serving %s on %s (pid %d%s)", _version(), self.app_spec,
                 ", ".join(addresses), os.getpid(), "".join(", " + e for e in extras))
        stop.wait()
        return self.shutdown(reason[0] if reason else "stop")

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
                                                  self.connections)
        return wrapped

    def _configure_tasks(self):
        s = self.settings
        opts = {k: s[k] for k in ("max_concurrency", "max_pending") if s.get(k) is not None}
        if opts:
            from . import tasks
            tasks.configure(**opts)

    def _start_pools(self):
        s = self.settings
        if not s["dirty_apps"]:
            return []
        from . import procpool
        try:
            procpool.start_pools(s["dirty_apps"], workers=s["dirty_workers"], timeout=s["dirty_timeout"])
        except Exception as exc:
            self._remove_unix_sockets()
            raise StartupError("--dirty-app: %s: %s" % (type(exc).__name__, exc), EXIT_STARTUP) from None
        return list(s["dirty_apps"])

    def _open_journal(self):
        path = self.settings["journal"]
        if not path:
            return
        from . import journal
        try:
            journal.enable(path)
        except Exception as exc:
            self._remove_unix_sockets()
            procpool = sys.modules.get("greenqueue.procpool")
            if procpool is not None:
                procpool.stop_all(5)
            raise StartupError("--journal: %s" % exc) from None

    def _start_scheduler(self):
        scheduler = sys.modules.get("greenqueue.scheduler")
        if scheduler is not None:
            # Only apps that declared @periodic jobs imported the scheduler; others pay nothing.
            scheduler.get_scheduler().start()

    def shutdown(self, reason):
        """Graceful shutdown: stop accepting, drain connections and tasks, stop pools, run hooks."""

        from . import events, hooks

        log = logging.getLogger("greenqueue.server")
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
        scheduler = sys.modules.get("greenqueue.scheduler")
        if scheduler is not None:
            scheduler.get_scheduler().stop()
        consumers = sys.modules.get("greenqueue.consumers")
        if consumers is not None and consumers.consumers():
            # Stop taking messages first; batches in hand finish (and ack) before anything closes.
            consumers.stop_all(max(1.0, deadline - time.monotonic()))
            log.info("consumers stopped")
        for conn in list(self.connections):
            conn.close_if_idle()
        self.pool.join(timeout=max(0.0, deadline - time.monotonic()))
        left = len(self.pool)
        if left:
            log.warning("graceful timeout: closing %d connection(s) still busy", left)
            self.pool.kill(block=True, timeout=5)
        else:
            log.info("connections drained")
        self._drain_tasks(log, deadline)
        procpool = sys.modules.get("greenqueue.procpool")
        if procpool is not None:
            procpool.stop_all(max(1.0, deadline - time.monotonic()))
            log.info("worker pools stopped")
        journal = sys.modules.get("greenqueue.journal")
        if journal is not None:
            journal.close()
        hooks.run_shutdown()
        log.info("shutdown complete")
        return 0

    def _drain_tasks(self, log, deadline):
        tasks = sys.modules.get("greenqueue.tasks")
        if tasks is None:
            return
        report = tasks.drain(max(0.0, deadline - time.monotonic()))
        journal = sys.modules.get("greenqueue.journal")
        if journal is not None and journal.get() is not None:
            # From here on, what is unfinished stays unfinished in the file and runs at the next start.
            journal.stop_recording()
            log.info("journal: %d delayed and %d unfinished task(s) kept for the next start",
                     report.scheduled, report.running + report.pending)
        if not report.complete:
            log.warning("graceful timeout: cancelling %d running and %d waiting task(s)",
                        report.running, report.pending)
            tasks.get_runner().kill()

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
    _setup_logging(settings)
    from . import eventlog
    eventlog.install()  # one log line per task/job/worker/server event
    if settings["max_blocking_ms"]:
        _watch_blocking(settings["max_blocking_ms"])
    try:
        return Server(app_spec, settings).run()
    except StartupError as exc:
        print("greenqueue: error: %s" % exc, file=sys.stderr)
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
