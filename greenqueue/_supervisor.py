"""``--workers N``: a supervising parent and N server processes sharing its listening sockets.

Concurrency model: the parent runs no gevent hub of its own and imports
none of the user's code (neither the app nor the ``--dirty-app`` classes).
It binds every ``--bind`` address, then forks N children with the original
``os.fork``; each child re-initialises gevent (``gevent.reinit``), imports
the app itself, serves the inherited sockets (the kernel spreads
connections over the processes accepting on them) and tells the parent it
is ready, and which pool worker processes it started, with one JSON message
on a pipe. The parent polls, ten times a second, for exited children and
ready pipes: a child that dies after it was ready is replaced, with a
growing pause when it keeps dying; a child that fails before it is ready
(bad app, refused settings) stops them all with its exit status. Once every
child has reported, the parent logs the start-up line. SIGTERM/SIGINT go to
every child, which drain as a single server does; the parent exits 0 when
they all exited 0. A second signal kills them and exits 1. Signal handlers
only set a flag (:class:`greenqueue._lifecycle.StopSignals`, the server's
and the worker's own); the polling loop acts on it.
"""

import json
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

from gevent import monkey

from ._lifecycle import STOP_SIGNALS, Ready, StopSignals
from ._startup import EXIT_STARTUP, StartupError, display, listen

if TYPE_CHECKING:
    from gevent import socket as gsocket

    from .config import Settings

log = logging.getLogger("greenqueue.supervisor")

__all__ = ["Supervisor"]

#: Seconds a child must live before its next crash counts as a fresh one.
STABLE = 30.0
MAX_PAUSE = 30.0
TICK = 0.1
#: Most bytes of a ready message the parent reads (a message up to PIPE_BUF arrives in one piece).
READY_MAX = 65536

# The parent must not run gevent's loop (a forked child would inherit its greenlets).
_fork = monkey.get_original("os", "fork")
_waitpid = monkey.get_original("os", "waitpid")
_sleep = monkey.get_original("time", "sleep")
_select = monkey.get_original("select", "select")


class _Child:
    """One server process and what the parent knows of it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = 0
        self.started = 0.0
        self.ready = False
        self.ready_fd: Optional[int] = None
        self.crashes = 0
        self.respawn_at: Optional[float] = None
        self.exit_code: Optional[int] = None
        #: Pool worker processes the child said it started, by dirty app.
        self.pools: Dict[str, int] = {}


class Supervisor:
    """Binds once, forks N servers, replaces crashed ones, drains them all on a signal."""

    def __init__(self, app_spec: str, settings: "Settings",
                 serve: Callable[[str, "Settings", Sequence[Tuple[str, "gsocket.socket"]], Ready], int]) -> None:
        self.app_spec = app_spec
        self.settings = settings
        #: Runs one server process: ``serve(app_spec, settings, listeners, ready)`` -> exit status.
        self.serve = serve
        self.children: List[_Child] = []
        self.listeners: List[Tuple[str, "gsocket.socket"]] = []
        self.signals = StopSignals()
        self.fatal: Optional[int] = None
        self.announced = False

    def run(self) -> int:
        """Serve with N processes until a signal; returns the exit status."""
        s = self.settings
        for bind in s.bind:
            try:
                self.listeners.append((bind, listen(bind, s.backlog)))
            except StartupError:
                self._close()
                raise
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.signals.on_signal)
        for index in range(s.workers):
            child = _Child(index)
            self.children.append(child)
            self._spawn(child)
        while self.signals.first is None and self.fatal is None:
            self._tick()
        if self.fatal is not None:
            self._signal_all(signal.SIGTERM)
            self._wait_all(10)
            self._close()
            return self.fatal
        log.info("%s: stopping %d worker(s)", self.signals.first, len(self.children))
        self._signal_all(signal.SIGTERM)
        clean = self._wait_all(s.graceful_timeout + 10)
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
            self._read_ready(waiting[fd], fd)
        if not self.announced and self.children and all(c.ready for c in self.children):
            self._say_what_runs()
        self._reap()
        now = time.monotonic()
        for child in self.children:
            if child.respawn_at is not None and now >= child.respawn_at and self.signals.first is None:
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
            if self.signals.first is not None or self.fatal is not None:
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

    def _read_ready(self, child: _Child, fd: int) -> None:
        """Take a child's ready message: it serves, with the pool worker processes it names."""
        message = os.read(fd, READY_MAX)
        os.close(fd)
        child.ready_fd = None
        if not message:
            return  # closed without a message: the child failed before serving, and _reap says how
        child.ready = True
        try:
            child.pools = {str(k): int(v) for k, v in json.loads(message)["pools"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("worker %d (pid %d) is serving but sent an unreadable ready message %r",
                        child.index, child.pid, message[:200])
        pools = sum(child.pools.values())
        log.info("worker %d (pid %d) is serving%s", child.index, child.pid,
                 " with %d pool worker process(es)" % pools if pools else "")

    def _say_what_runs(self) -> None:
        """The start-up line, once every server process has said what it started."""
        self.announced = True
        s = self.settings
        counts = [sum(c.pools.values()) for c in self.children]
        extras = []
        if any(counts):
            each = "%d pool worker process(es) each, " % counts[0] if len(set(counts)) == 1 else ""
            extras.append("%s%d in all" % (each, sum(counts)))
        if not s.journal:
            extras.append("no --journal: each process keeps its own tasks and results")
        else:
            extras.append("one cluster through the journal")
        log.info("greenqueue supervisor (pid %d): %d server processes for %s on %s; %s", os.getpid(),
                 s.workers, self.app_spec, ", ".join(display(b) for b, _ in self.listeners), "; ".join(extras))

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
            def ready(pools: Dict[str, int]) -> None:
                os.write(ready_fd, json.dumps({"pools": pools}).encode())
                os.close(ready_fd)
            status = self.serve(self.app_spec, self.settings, self.listeners, ready)
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
            if self.signals.second is not None:
                self._kill_all_and_exit()
            self._reap()
            if time.monotonic() > deadline and not killed:
                log.warning("workers still running after the graceful timeout; killing them")
                self._signal_all(signal.SIGKILL)
                killed = True
            _sleep(TICK / 2)
        return not killed and all(c.exit_code in (0, None) for c in self.children)

    def _kill_all_and_exit(self) -> None:
        self._signal_all(signal.SIGKILL)
        log.warning("second %s: killed every worker; exiting now without draining", self.signals.second)
        sys.stderr.flush()
        os._exit(1)

    def _close(self) -> None:
        for bind, sock in self.listeners:
            sock.close()
            if bind.startswith("unix:"):
                try:
                    os.unlink(bind[5:])
                except FileNotFoundError:
                    pass
        self.listeners = []
