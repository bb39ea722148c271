"""The one lifecycle of a greenqueue process: start, serve until a signal, drain, stop.

Both ``python -m greenqueue.server`` and ``python -m greenqueue.worker`` run
it; they differ only in their *front* (the server's HTTP listeners, the
worker has none). :class:`StopSignals` is the one reading of SIGTERM/SIGINT,
shared with the supervisor: the first asks for a graceful stop, the second
for an exit at once with status 1.

Concurrency model: everything here runs in the process's main greenlet
after ``monkey.patch_all()``, except the signal handlers, which gevent runs
in a greenlet of their own and which only record the signal and set an
event. :meth:`Lifecycle.wait` blocks the main greenlet on that event;
:meth:`Lifecycle.shutdown` then runs in it, each step once and logged
once: stop intake (the front stops accepting, the runtime stops claiming,
firing and consuming), drain (the front's connections, then tasks, within
one ``--graceful-timeout`` deadline), stop pools, close the store, run the
shutdown hooks. A greenlet started with the handlers waits for a second
signal and ends the process from there, whatever the main greenlet is
waiting on. Across ``fork()`` (the supervisor's children) nothing of this
is inherited: each child builds its own lifecycle after ``gevent.reinit``.
"""

import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

from ._startup import EXIT_STARTUP, EXIT_USAGE, StartupError, setup_logging, watch_blocking, where
from .errors import JournalError

if TYPE_CHECKING:
    from gevent import Greenlet
    from gevent.hub import signal as SignalHandle

    from .config import Settings
    from .runtime import Runtime

__all__ = ["StopSignals", "Front", "Lifecycle", "STOP_SIGNALS", "RETIRE", "run_main", "prepare_process",
           "startup_failed"]

#: The signals that stop a process: the first gracefully, the second at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: The stop reason of a supervised process asked to retire (SIGUSR2 from its supervisor).
RETIRE = "SIGUSR2"


def _nothing() -> None:
    """The default wake-up: the supervisor polls the flags instead."""


class StopSignals:
    """SIGTERM/SIGINT as two flags: ``first`` asks for a graceful stop, ``second`` for an exit at once."""

    def __init__(self, on_first: Callable[[], None] = _nothing, on_second: Callable[[], None] = _nothing) -> None:
        self.first: Optional[str] = None
        self.second: Optional[str] = None
        self._on_first = on_first
        self._on_second = on_second

    def on_signal(self, signum: int, frame: object = None) -> None:
        """The handler itself: record which signal came and wake whoever waits; nothing else."""
        name = signal.Signals(signum).name
        if self.first is None:
            self.first = name
            self._on_first()
        else:
            self.second = name
            self._on_second()


class Front:
    """What a process serves besides the runtime's own intake; the worker's front serves nothing."""

    def stop_accepting(self, reason: str) -> str:
        """Take no new work; return what is left to drain, for the one log line that starts a shutdown."""
        return "stopping"

    def drain(self, deadline: float) -> None:
        """Wait, until ``deadline`` (``time.monotonic()``), for the work in hand; then end what is left."""


class Lifecycle:
    """Start the runtime, serve until a signal, then drain and stop it: the server's and the worker's one sequence."""

    def __init__(self, runtime: "Runtime", settings: "Settings", log: logging.Logger,
                 front: Optional[Front] = None, alone: bool = False,
                 scheduler_after: Optional[Callable[[], None]] = None) -> None:
        self.runtime = runtime
        #: True for a server with no supervisor: SIGHUP, a reload elsewhere, stops it gracefully here.
        #: False for a supervised one, which retires on SIGUSR2.
        self.alone = alone
        #: Blocks until this process may fire schedules (its predecessor exited); None: at once.
        self.scheduler_after = scheduler_after
        self.settings = settings
        self.log = log
        self.front = front if front is not None else Front()
        # Imported here, not at the top: the commands import this module before main() monkey-patches.
        from gevent.event import Event
        self._stopping, self._aborting = Event(), Event()
        self.signals = StopSignals(self._stopping.set, self._aborting.set)
        self._watcher: Optional["Greenlet[[], None]"] = None
        self._handlers: List["SignalHandle"] = []

    def start(self) -> None:
        """Apply the runner limits, run the start-up hooks and start the runtime; StartupError if one fails."""
        rt, s = self.runtime, self.settings
        if s.max_concurrency is not None or s.max_pending is not None:
            # None keeps the runner's own limit, so an app's greenqueue.configure() stands.
            rt.configure(max_concurrency=s.max_concurrency, max_pending=s.max_pending)
        try:
            rt.hooks.run_startup()
        except Exception as exc:
            raise StartupError("startup hook failed: %s: %s (at %s)" % (type(exc).__name__, exc, where(exc)),
                               EXIT_STARTUP) from None
        try:
            rt.start(dirty_apps=s.dirty_apps, dirty_workers=s.dirty_workers, dirty_timeout=s.dirty_timeout,
                     journal=s.journal or None, lease_timeout=s.lease_timeout, queues=s.queues,
                     journal_sync=s.journal_sync, scheduler=self.scheduler_after is None)
        except Exception as exc:
            # Whatever did start must not outlive the process that is about to exit 2.
            rt.pools.stop(5)
            rt.close_store()
            raise _start_error(exc, bool(s.dirty_apps)) from None
        if self.scheduler_after is not None and len(rt.scheduler):
            import gevent
            gevent.spawn(self._start_scheduler_later, self.scheduler_after)

    def _start_scheduler_later(self, wait: Callable[[], None]) -> None:
        # Without a journal two processes would both fire each run: the one being replaced fires
        # until it exits, this one from then on.
        self.log.info("the scheduler starts once the process this one replaces has exited")
        wait()
        if not self._stopping.is_set():
            self.runtime.start_scheduler()
            self.log.info("scheduler started: the process this one replaced has exited")

    def describe(self) -> List[str]:
        """What the start-up line says besides the addresses: the dirty apps and the journal."""
        extras = []
        if self.settings.dirty_apps:
            extras.append("dirty apps: " + ", ".join(self.settings.dirty_apps))
        store = self.runtime.store
        if store.durable:
            extras.append("journal: " + store.display)
        return extras

    def started_pools(self) -> Dict[str, int]:
        """The pool worker processes this process started, by ``module:Class`` spec."""
        return {pool.spec: pool.size for pool in self.runtime.pools.all()}

    def listen_for_signals(self) -> None:
        """Install the SIGTERM/SIGINT handlers: the first wakes :meth:`wait`, the second exits at once."""
        import gevent

        signums = STOP_SIGNALS + ((signal.SIGHUP,) if self.alone else (signal.SIGUSR2,))
        self._handlers = [gevent.signal_handler(signum, self.signals.on_signal, signum) for signum in signums]
        self._watcher = gevent.spawn(self._exit_on_second_signal)

    def _exit_on_second_signal(self) -> None:
        self._aborting.wait()
        self.log.warning("second %s: exiting now without draining", self.signals.second)
        sys.stderr.flush()
        os._exit(1)

    def wait(self) -> str:
        """Block the calling greenlet until the first signal; return its name."""
        self._stopping.wait()
        return self.signals.first or "stop"

    def shutdown(self, reason: str) -> int:
        """Stop intake, drain, stop pools, close the store, run the shutdown hooks; return the exit status (0)."""
        rt = self.runtime
        timeout = self.settings.graceful_timeout
        deadline = time.monotonic() + timeout
        left = self.front.stop_accepting(reason)
        if reason == RETIRE:
            reason = "retiring (a replacement serves)"
        elif reason == "SIGHUP":
            self.log.info("SIGHUP stops a server that runs alone (it drains as for SIGTERM); for reloads that "
                          "keep serving, start it with --workers N (1 included) and send SIGHUP to the supervisor")
        self.log.info("%s: %s, graceful timeout %.0fs", reason, left, timeout)
        rt.stop(deadline - time.monotonic(), drain_front=self.front.drain)
        rt.hooks.run_shutdown()
        self.log.info("shutdown complete")
        self._stop_listening()
        return 0

    def _stop_listening(self) -> None:
        # A process that goes on after its shutdown (a test, an embedding program) keeps no handler of ours.
        for handler in self._handlers:
            handler.cancel()
        self._handlers = []
        if self._watcher is not None:
            self._watcher.kill(block=False)
            self._watcher = None

    def serve(self, announce: Callable[[], None]) -> int:
        """Listen for signals, ``announce()`` that the process serves, wait for a signal, shut down."""
        self.listen_for_signals()
        announce()
        return self.shutdown(self.wait())


def _start_error(exc: Exception, dirty_apps: bool) -> StartupError:
    """The one line a failed runtime start prints (the loader's own message when a dirty app failed to import)."""
    if isinstance(exc, JournalError):
        return StartupError("--journal: %s" % exc)
    if isinstance(exc, StartupError):
        return StartupError("--dirty-app: %s" % exc, exc.status)
    return StartupError("%s%s: %s" % ("--dirty-app: " if dirty_apps else "", type(exc).__name__, exc))


def run_main(prog: str, argv: Optional[Sequence[str]], run: Callable[[str, "Settings"], int],
             worker: bool = False) -> int:
    """A command's ``main()``: patch, read the settings, set up logging, ``run(spec, settings)``; one line per error."""
    # Patch before anything imports socket/threading users, and before the user's code is imported.
    from gevent import monkey
    monkey.patch_all()

    from .config import load
    from .errors import ConfigError

    try:
        spec, settings = load(argv, worker=worker)
    except ConfigError as exc:
        print("%s: error: %s" % (prog, exc), file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings)
    try:
        return run(spec, settings)
    except StartupError as exc:
        return startup_failed(prog, exc)


def startup_failed(prog: str, exc: StartupError) -> int:
    """Print the one line that says why the process could not start; return its exit status."""
    print("%s: error: %s" % (prog, exc), file=sys.stderr)
    return exc.status


def prepare_process(settings: "Settings") -> None:
    """Before the user's code is imported: one log line per greenqueue event, and the blocking watch if asked."""
    from . import eventlog
    eventlog.install()
    if settings.max_blocking_ms:
        watch_blocking(settings.max_blocking_ms)


class HookServer:
    """What a gunicorn server hook gets as ``server``: the parts of gunicorn's arbiter hooks use."""

    def __init__(self, settings: "Settings", app_spec: str) -> None:
        self.cfg = settings
        self.app_spec = app_spec
        self.pid = os.getpid()
        self.log = logging.getLogger("greenqueue.server")


class HookWorker:
    """What a gunicorn server hook gets as ``worker``: one server process."""

    def __init__(self, settings: "Settings", app_spec: str, age: int = 0) -> None:
        self.cfg = settings
        self.app_spec = app_spec
        self.pid = os.getpid()
        self.ppid = os.getppid()
        self.age = age
        self.alive = True
        self.log = logging.getLogger("greenqueue.server")


def run_hook(settings: "Settings", name: str, *args: object) -> None:
    """Call the gunicorn hook ``name`` from the --config file, if it has one; log (not raise) its failure."""
    hook = settings.server_hooks.get(name)
    if hook is None:
        return
    try:
        hook(*args)
    except Exception as exc:
        logging.getLogger("greenqueue.server").exception("the %s hook of %s failed: %s: %s (at %s)", name,
                                                         settings.config, type(exc).__name__, exc, where(exc))
