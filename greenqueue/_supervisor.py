"""``--workers N``: a supervising parent and N server processes sharing its listening sockets.

Concurrency model: the parent runs no gevent hub of its own. It binds every
``--bind`` address, then forks N children with the original ``os.fork``;
each child re-initialises gevent (``gevent.reinit``), imports the app itself,
serves the inherited sockets (the kernel spreads connections over the
processes accepting on them) and tells the parent it is ready through a
pipe. The parent polls, ten times a second, for exited children and ready
pipes: a child that dies after it was ready is replaced, with a growing
pause when it keeps dying; a child that fails before it is ready (bad app,
refused settings) stops them all with its exit status. SIGTERM/SIGINT go to
every child, which drain as a single server does; the parent exits 0 when
they all exited 0. A second signal kills them and exits 1. Signal handlers
only set a flag.
"""

import logging
import os
import select
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from gevent import monkey

from ._startup import EXIT_STARTUP, StartupError, display, listen

log = logging.getLogger("greenqueue.supervisor")

__all__ = ["Supervisor"]

#: Seconds a child must live before its next crash counts as a fresh one.
STABLE = 30.0
MAX_PAUSE = 30.0
TICK = 0.1

# The parent must not run gevent's loop (a forked child would inherit its greenlets).
_fork = monkey.get_original("os", "fork")
_waitpid = monkey.get_original("os", "waitpid")
_sleep = monkey.get_original("time", "sleep")
_select = monkey.get_original("select", "select")


class _Child:
    """One server process and what the parent knows of it."""

    def __init__(self, index: int):
        self.index = index
        self.pid = 0
        self.started = 0.0
        self.ready = False
        self.ready_fd: Optional[int] = None
        self.crashes = 0
        self.respawn_at: Optional[float] = None
        self.exit_code: Optional[int] = None


class Supervisor:
    """Binds once, forks N servers, replaces crashed ones, drains them all on a signal."""

    def __init__(self, app_spec: str, settings: Dict[str, Any], serve: Callable[..., int]):
        self.app_spec = app_spec
        self.settings = settings
        #: Runs one server process: ``serve(app_spec, settings, listeners=, ready=)`` -> exit status.
        self.serve = serve
        self.children: List[_Child] = []
        self.listeners: List[Tuple[str, Any]] = []
        self.stopping: Optional[str] = None
        self.fatal: Optional[int] = None

    def run(self) -> int:
        """Serve with N processes until a signal; returns the exit status."""
        s = self.settings
        for bind in s["bind"]:
            try:
                self.listeners.append((bind, listen(bind, s["backlog"])))
            except StartupError:
                self._close()
                raise
        self._say_what_runs()

        def on_signal(signum: int, frame: Any) -> None:
            if self.stopping is not None:
                self._signal_all(signal.SIGKILL)
                os.write(2, b"greenqueue: second signal: killed every worker\n")
                os._exit(1)
            self.stopping = signal.Signals(signum).name

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        for index in range(s["workers"]):
            child = _Child(index)
            self.children.append(child)
            self._spawn(child)
        while self.stopping is None and self.fatal is None:
            self._tick()
        if self.fatal is not None:
            self._signal_all(signal.SIGTERM)
            self._wait_all(10)
            self._close()
            return self.fatal
        log.info("%s: stopping %d worker(s)", self.stopping, len(self.children))
        self._signal_all(signal.SIGTERM)
        clean = self._wait_all(s["graceful_timeout"] + 10)
        self._close()
        log.info("supervisor: all workers stopped")
        return 0 if clean else 1

    def _tick(self) -> None:
        waiting = {c.ready_fd: c for c in self.children if c.ready_fd is not None}
        try:
            readable = _select(list(waiting), [], [], TICK)[0] if waiting else []
        except InterruptedError:
            readable = []
        if not waiting:
            _sleep(TICK)
        for fd in readable:
            child = waiting[fd]
            child.ready = os.read(fd, 1) == b"R"
            os.close(fd)
            child.ready_fd = None
            if child.ready:
                log.info("worker %d (pid %d) is serving", child.index, child.pid)
        self._reap()
        now = time.monotonic()
        for child in self.children:
            if child.respawn_at is not None and now >= child.respawn_at and self.stopping is None:
                child.respawn_at = None
                self._spawn(child)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = _waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            child = next((c for c in self.children if c.pid == pid), None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            child.pid, child.exit_code = 0, code
            if child.ready_fd is not None:
                os.close(child.ready_fd)
                child.ready_fd = None
            if self.stopping is not None or self.fatal is not None:
                continue  # we asked it to stop
            if not child.ready:
                log.error("worker %d (pid %d) failed to start (exit %d); stopping", child.index, pid, code)
                self.fatal = code if code > 0 else EXIT_STARTUP
                return
            lived = time.monotonic() - child.started
            child.crashes = 1 if lived > STABLE else child.crashes + 1
            pause = min(MAX_PAUSE, 0.5 * 2 ** (child.crashes - 1))
            log.warning("worker %d (pid %d) died (%s) after %.1fs; starting a new one in %.1fs", child.index,
                        pid, "signal %d" % -code if code < 0 else "exit %d" % code, lived, pause)
            child.respawn_at = time.monotonic() + pause

    def _say_what_runs(self) -> None:
        s = self.settings
        pools = 0
        from .procpool._app import _load_class
        for spec in s["dirty_apps"]:
            try:
                cls = _load_class(spec)
            except Exception as exc:
                raise StartupError("--dirty-app %s: %s: %s" % (spec, type(exc).__name__, exc)) from None
            pools += int(s["dirty_workers"] or getattr(cls, "workers", 1) or 1)
        extras = []
        if pools:
            extras.append("%d pool worker process(es) each, %d in all" % (pools, pools * s["workers"]))
        if not s["journal"]:
            extras.append("no --journal: each process keeps its own tasks and results")
        else:
            extras.append("one cluster through the journal")
        log.info("greenqueue supervisor (pid %d): %d server processes for %s on %s; %s", os.getpid(),
                 s["workers"], self.app_spec, ", ".join(display(b) for b, _ in self.listeners), "; ".join(extras))

    def _spawn(self, child: _Child) -> None:
        read_fd, write_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = _fork()
        if pid == 0:
            os.close(read_fd)
            self._child_main(child, write_fd)  # never returns
        os.close(write_fd)
        child.pid, child.started, child.ready, child.ready_fd = pid, time.monotonic(), False, read_fd

    def _child_main(self, child: _Child, ready_fd: int) -> None:
        import gevent
        gevent.reinit()  # a fresh loop for this process (the parent forked with the plain os.fork)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        status = EXIT_STARTUP
        try:
            def ready() -> None:
                os.write(ready_fd, b"R")
                os.close(ready_fd)
            status = self.serve(self.app_spec, self.settings, listeners=self.listeners, ready=ready)
        except BaseException:
            log.exception("worker %d failed", child.index)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)

    def _signal_all(self, sig: int) -> None:
        for child in self.children:
            if child.pid:
                try:
                    os.kill(child.pid, sig)
                except ProcessLookupError:
                    pass  # already gone

    def _wait_all(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        killed = False
        while any(c.pid for c in self.children):
            self._reap()
            if time.monotonic() > deadline and not killed:
                log.warning("workers still running after the graceful timeout; killing them")
                self._signal_all(signal.SIGKILL)
                killed = True
            _sleep(TICK / 2)
        return not killed and all(c.exit_code in (0, None) for c in self.children)

    def _close(self) -> None:
        for bind, sock in self.listeners:
            sock.close()
            if bind.startswith("unix:"):
                try:
                    os.unlink(bind[5:])
                except FileNotFoundError:
                    pass
        self.listeners = []
