"""The supervisor: a parent that runs the server processes, replaces them and reloads them.

It runs when ``--workers N`` is given (1 included) or an option needs it
(``--max-requests``, ``--timeout``, ``--reload``).

Concurrency model: the parent runs no gevent hub of its own and imports
none of the user's code (neither the app nor the ``--dirty-app`` classes),
so every process it forks imports the app afresh: that is what makes a
SIGHUP reload serve new code. It binds every ``--bind`` address once; the
children inherit the listening sockets (one accept queue per address, so a
connection waiting to be accepted survives any one process), re-initialise
gevent, import the app and serve. Each child talks to the parent on its own
pipe (:class:`ChildLink`): one line when it serves, one when it has served
its ``--max-requests``, and, under ``--timeout``, a heartbeat written by a
timer of its hub. The parent waits on those pipes with ``select`` (a tenth
of a second at most, to reap exited children and keep its timers) and acts:

- a child that dies after it was ready is replaced, with a growing pause
  when it keeps dying; one that fails before it was ready at start-up stops
  them all with its exit status;
- a replacement (for a recycled child, or every child on SIGHUP) is forked
  first; once it serves, its predecessor gets SIGUSR2 and *retires*: it
  stops accepting, answers each kept-alive connection's next request with
  ``Connection: close``, closes connections left idle, finishes its
  requests, streams and tasks, and exits as soon as that is done;
- a child whose heartbeat stopped for ``--timeout`` seconds gets SIGUSR1
  (its ``faulthandler`` prints the stack that holds the hub, even from
  inside C code) and, half a second later, SIGKILL; then it is replaced;
- SIGTERM/SIGINT stop every child gracefully; a second one kills them.

Each child asks the kernel for SIGTERM when the parent dies
(``PR_SET_PDEATHSIG``), so a supervisor killed with SIGKILL leaves no
orphan holding the port. Signal handlers only set flags; the loop acts.
"""

import json
import logging
import os
import random
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from gevent import monkey

from ._lifecycle import STOP_SIGNALS, HookServer, StopSignals, run_hook
from ._startup import EXIT_STARTUP, StartupError, display, listen

if TYPE_CHECKING:
    from gevent import socket as gsocket

    from .config import Settings

log = logging.getLogger("greenqueue.supervisor")

__all__ = ["Supervisor", "ChildLink", "RETIRE_SIGNAL"]

#: Seconds a child must live before its next crash counts as a fresh one.
STABLE = 30.0
MAX_PAUSE = 30.0
TICK = 0.1
#: Most bytes the parent reads from a child's pipe at once.
READ_MAX = 65536
#: The signal that asks a child to retire (drain and exit), from its supervisor only.
RETIRE_SIGNAL = signal.SIGUSR2
#: The signal that makes a child print its threads' stacks (faulthandler) before a watchdog kill.
STACK_SIGNAL = signal.SIGUSR1
#: Signals held back while a child is forked, until it has its own handlers.
FORK_BLOCKED = STOP_SIGNALS + (signal.SIGHUP,)
#: Seconds between the stack dump and the kill of a child whose hub stopped turning.
DUMP_WAIT = 0.3

# The parent must not run gevent's loop (a forked child would inherit its greenlets).
_fork = monkey.get_original("os", "fork")
_waitpid = monkey.get_original("os", "waitpid")
_sleep = monkey.get_original("time", "sleep")
_select = monkey.get_original("select", "select")

#: ``serve(app_spec, settings, listeners, link)``: runs one server process, returns its exit status.
Serve = Callable[[str, "Settings", Sequence[Tuple[str, "gsocket.socket"]], "ChildLink"], int]


class ChildLink:
    """A server process's side of its supervisor: what it says (ready, recycle me, alive) and what it waits for."""

    def __init__(self, fd: int, predecessor: int, settings: "Settings") -> None:
        self.fd = fd
        #: The process this one replaces (0: none), still serving until this one is ready.
        self.predecessor = predecessor
        jitter = random.randint(0, settings.max_requests_jitter) if settings.max_requests else 0
        #: Requests after which this process asks to be replaced (0: never).
        self.max_requests = settings.max_requests + jitter if settings.max_requests else 0
        self.timeout = settings.timeout
        self._heartbeat: Any = None

    def _say(self, message: Dict[str, Any]) -> None:
        try:
            os.write(self.fd, (json.dumps(message) + "\n").encode())
        except OSError:
            pass  # the supervisor is gone; PR_SET_PDEATHSIG has told us to stop already

    def ready(self, pools: Dict[str, int]) -> None:
        """This process serves, with these pool worker processes; start the heartbeat if asked for."""
        self._say({"ready": {"pools": pools}})
        if self.timeout:
            import gevent
            interval = min(1.0, self.timeout / 4)
            timer = gevent.get_hub().loop.timer(interval, interval, ref=False)
            timer.start(self._beat)
            self._heartbeat = timer

    def _beat(self) -> None:
        # Runs in the hub: that it runs at all is the news.
        try:
            os.write(self.fd, b"h\n")
        except OSError:
            pass  # the supervisor is gone

    def recycle(self, reason: str) -> None:
        """Ask the supervisor for a replacement; this process retires once that one serves."""
        self._say({"recycle": reason})

    def wait_for_predecessor(self) -> None:
        """Block this greenlet until the process this one replaces has exited (at once when there is none)."""
        if not self.predecessor:
            return
        from gevent.socket import wait_read
        try:
            fd = os.pidfd_open(self.predecessor)
        except (ProcessLookupError, OSError, AttributeError):
            return  # gone already (or no pidfd here: the supervisor kills it before it can matter)
        try:
            wait_read(fd)  # a pidfd turns readable when its process exits: no polling
        finally:
            os.close(fd)


class RequestBudget:
    """Counts a server process's requests down to its recycling (``--max-requests``)."""

    __slots__ = ("left", "link")

    def __init__(self, link: ChildLink) -> None:
        self.left = link.max_requests
        self.link = link

    def spend(self) -> None:
        """One more request: at zero, ask for a replacement (once)."""
        self.left -= 1
        if self.left == 0:
            self.link.recycle("served %d requests (--max-requests)" % self.link.max_requests)


class _Child:
    """One server process and what the parent knows of it."""

    def __init__(self, index: int, replaces: Optional["_Child"] = None) -> None:
        self.index = index
        self.replaces = replaces
        self.pid = 0
        self.started = 0.0
        self.ready = False
        self.fd: Optional[int] = None
        self.buffer = b""
        self.crashes = 0
        self.respawn_at: Optional[float] = None
        self.exit_code: Optional[int] = None
        self.recycling = False     # a replacement is on its way
        self.last_beat = 0.0
        self.dumped_at: Optional[float] = None  # when the watchdog asked for its stack
        #: Pool worker processes the child said it started, by dirty app.
        self.pools: Dict[str, int] = {}

    def describe(self) -> str:
        """How the log names it."""
        return "worker %d (pid %d)" % (self.index, self.pid)


class Supervisor:
    """Binds once, runs the server processes, replaces and reloads them, drains them all on a signal."""

    def __init__(self, app_spec: str, settings: "Settings", serve: Serve) -> None:
        self.app_spec = app_spec
        self.settings = settings
        self.serve = serve
        #: The serving generation, one per index.
        self.children: List[_Child] = []
        #: Replacements forked but not serving yet.
        self.starting: List[_Child] = []
        #: Predecessors draining after their replacement took over.
        self.retiring: List[_Child] = []
        self.listeners: List[Tuple[str, "gsocket.socket"]] = []
        self.signals = StopSignals()
        self.reloads = 0
        self.fatal: Optional[int] = None
        self.announced = False
        self.watcher: Any = None  # the --reload file watcher

    def _on_hup(self, signum: int, frame: object = None) -> None:
        self.reloads += 1

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
        signal.signal(signal.SIGHUP, self._on_hup)
        if s.reload:
            from ._reload import Watcher
            self.watcher = Watcher(self.app_spec)
        for index in range(s.processes):
            child = _Child(index)
            self.children.append(child)
            self._spawn(child)
        reloads = 0
        while self.signals.first is None and self.fatal is None:
            if self.reloads != reloads:
                reloads = self.reloads
                self._reload("SIGHUP")
            if self.watcher is not None:
                changed = self.watcher.changed()
                if changed:
                    self._reload("%s changed (--reload)" % changed)
            self._tick()
        if self.fatal is not None:
            self._signal_all(signal.SIGTERM)
            self._wait_all(10)
            self._close()
            return self.fatal
        log.info("%s: stopping %d worker(s)", self.signals.first, len(self._live()))
        self._signal_all(signal.SIGTERM)
        clean = self._wait_all(s.graceful_timeout + 10)
        self._close()
        log.info("supervisor: all workers stopped")
        return 0 if clean else 1

    def _live(self) -> List[_Child]:
        return [c for c in self.children + self.starting + self.retiring if c.pid]

    # The loop ------------------------------------------------------------
    def _tick(self) -> None:
        reading = {c.fd: c for c in self.children + self.starting + self.retiring if c.fd is not None}
        try:
            readable = _select(list(reading), [], [], TICK)[0] if reading else []
        except InterruptedError:
            readable = []
        if not reading:
            _sleep(TICK)
        for fd in readable:
            self._read(reading[fd])
        if not self.announced and self.children and all(c.ready for c in self.children):
            self._say_what_runs()
        self._reap()
        now = time.monotonic()
        for child in self.children:
            if child.respawn_at is not None and now >= child.respawn_at and self.signals.first is None:
                child.respawn_at = None
                self._spawn(child)
        if self.settings.timeout:
            self._watchdog(now)

    def _read(self, child: _Child) -> None:
        assert child.fd is not None
        try:
            data = os.read(child.fd, READ_MAX)
        except OSError:
            data = b""
        if not data:
            os.close(child.fd)
            child.fd = None
            return  # the child exited (or closed its end); _reap says how
        child.last_beat = time.monotonic()
        lines = (child.buffer + data).split(b"\n")
        child.buffer = lines.pop()
        for line in lines:
            if line and line != b"h":
                self._message(child, line)

    def _message(self, child: _Child, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            log.warning("%s sent an unreadable message %r", child.describe(), line[:200])
            return
        if "ready" in message:
            self._became_ready(child, message["ready"])
        elif "recycle" in message and child in self.children and not child.recycling:
            log.info("%s %s; starting its replacement", child.describe(), message["recycle"])
            self._replace(child)

    def _became_ready(self, child: _Child, info: Any) -> None:
        child.ready = True
        child.last_beat = time.monotonic()
        try:
            child.pools = {str(k): int(v) for k, v in info["pools"].items()}
        except (KeyError, TypeError, AttributeError, ValueError):
            child.pools = {}
        pools = sum(child.pools.values())
        log.info("%s is serving%s", child.describe(), " with %d pool worker process(es)" % pools if pools else "")
        old = child.replaces
        if child in self.starting:
            self.starting.remove(child)
            child.replaces = None
            if old is not None and old in self.children:
                self.children[self.children.index(old)] = child
                self._retire(old)
            else:
                self.children.append(child)

    def _replace(self, old: _Child) -> None:
        """Fork a replacement for ``old``; ``old`` retires once the replacement serves."""
        old.recycling = True
        new = _Child(old.index, replaces=old)
        self.starting.append(new)
        self._spawn(new, predecessor=old.pid)

    def _retire(self, old: _Child) -> None:
        old.recycling = True
        self.retiring.append(old)
        if old.pid:
            log.info("%s retires: it finishes what it serves and exits", old.describe())
            try:
                os.kill(old.pid, RETIRE_SIGNAL)
            except ProcessLookupError:
                pass  # gone already

    def _reload(self, why: str) -> None:
        """Replace every serving process with one that imports the app afresh."""
        fresh = [c for c in self.children if c.pid and c.ready and not c.recycling]
        log.info("%s: reloading %d worker(s); the old ones retire once the new ones serve", why, len(fresh))
        for child in fresh:
            self._replace(child)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = _waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            code = os.waitstatus_to_exitcode(status)
            how = "signal %d" % -code if code < 0 else "exit %d" % code
            child = next((c for c in self.retiring if c.pid == pid), None)
            if child is not None:
                self.retiring.remove(child)
                self._exited(child, code)
                log.info("worker %d (pid %d) retired (%s) after %.1fs", child.index, pid, how,
                         time.monotonic() - child.started)
                continue
            child = next((c for c in self.starting if c.pid == pid), None)
            if child is not None:
                self.starting.remove(child)
                self._exited(child, code)
                old = child.replaces
                if old is not None:
                    old.recycling = False  # the old one serves on; a later recycle or reload tries again
                if self.signals.first is None:
                    log.error("worker %d (pid %d) failed to start (%s); %s keeps serving. Fix the error above, "
                              "then send SIGHUP again", child.index, pid, how,
                              old.describe() if old is not None else "the old process")
                continue
            child = next((c for c in self.children if c.pid == pid), None)
            if child is None:
                continue
            self._exited(child, code)
            if self.signals.first is not None or self.fatal is not None:
                continue  # we asked it to stop
            if not child.ready:
                log.error("worker %d (pid %d) failed to start (exit %d); stopping", child.index, pid, code)
                self.fatal = code if code > 0 else EXIT_STARTUP
                return
            lived = time.monotonic() - child.started
            child.crashes = 1 if lived > STABLE else child.crashes + 1
            pause = min(MAX_PAUSE, 0.5 * 2 ** (child.crashes - 1))
            if child.dumped_at is not None and child.crashes == 1:
                pause = 0.0  # the watchdog killed it: its app is fine to start again at once
            log.warning("worker %d (pid %d) died (%s) after %.1fs; starting a new one in %.1fs", child.index,
                        pid, how, lived, pause)
            child.respawn_at = time.monotonic() + pause

    def _exited(self, child: _Child, code: int) -> None:
        child.pid, child.exit_code = 0, code
        if child.fd is not None:
            os.close(child.fd)
            child.fd = None

    def _watchdog(self, now: float) -> None:
        """Kill and replace a ready child whose hub has not turned for --timeout seconds."""
        timeout = self.settings.timeout
        for child in self.children + self.retiring:
            if not child.pid or not child.ready:
                continue
            if child.dumped_at is None and now - child.last_beat > timeout:
                log.error("%s: its hub has not turned for %.1fs (--timeout %s); killing it, the stack that "
                          "holds it follows", child.describe(), now - child.last_beat, timeout)
                child.dumped_at = now
                self._kill(child, STACK_SIGNAL)
            elif child.dumped_at is not None and now - child.dumped_at > DUMP_WAIT:
                child.dumped_at = now + 3600  # once
                self._kill(child, signal.SIGKILL)

    def _kill(self, child: _Child, sig: int) -> None:
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass  # gone already

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
        if s.max_requests:
            extras.append("each replaced after %d%s requests" % (
                s.max_requests, "+0..%d" % s.max_requests_jitter if s.max_requests_jitter else ""))
        if s.timeout:
            extras.append("a hub stuck for %ss is killed and replaced" % s.timeout)
        if s.reload:
            extras.append("reloading when a file under %s changes" % self.watcher.root)
        run_hook(s, "when_ready", HookServer(s, self.app_spec))
        log.info("greenqueue supervisor (pid %d): %d server process%s for %s on %s; %s; SIGHUP reloads",
                 os.getpid(), s.processes, "es" if s.processes > 1 else "", self.app_spec, ", ".join(display(b) for b, _ in self.listeners),
                 "; ".join(extras))

    def _spawn(self, child: _Child, predecessor: int = 0) -> None:
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        # A stop signal landing in the child before it drops the parent's handlers would only set the
        # child's copy of our flags: it would then serve on, unstoppable. Blocked across the fork, the
        # signal waits until the child's own handling is in place.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORK_BLOCKED)
        try:
            pid = _fork()
            if pid == 0:
                os.close(read_fd)
                self._child_main(child, write_fd, predecessor, parent, mask)  # never returns
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(write_fd)
        child.pid, child.started, child.ready, child.fd = pid, time.monotonic(), False, read_fd
        child.buffer, child.recycling, child.dumped_at = b"", False, None

    def _child_main(self, child: _Child, fd: int, predecessor: int, parent: int, mask: Iterable[int]) -> None:
        _die_with_parent(parent)
        for other in self.children + self.starting + self.retiring:
            if other.fd is not None:
                os.close(other.fd)  # the siblings' pipes are the parent's business
        if self.watcher is not None:
            self.watcher.close_in_child()
        import gevent
        gevent.reinit()  # a fresh loop for this process (the parent forked with the plain os.fork)
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        # A terminal's hangup reaches the whole process group; reloading is the supervisor's business.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a stop signal sent meanwhile acts now
        if self.settings.timeout:
            import faulthandler
            faulthandler.register(STACK_SIGNAL, file=sys.stderr, all_threads=True)
        status = EXIT_STARTUP
        try:
            status = self.serve(self.app_spec, self.settings, self.listeners, ChildLink(fd, predecessor, self.settings))
        except BaseException:
            log.exception("worker %d failed", child.index)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)

    def _signal_all(self, sig: int) -> None:
        for child in self.children + self.starting:
            if child.pid:
                self._kill(child, sig)
        if sig == signal.SIGKILL:
            for child in self.retiring:
                if child.pid:
                    self._kill(child, sig)

    def _wait_all(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        killed = False
        while self._live():
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
        if self.watcher is not None:
            self.watcher.stop()


def _die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies, however it dies (Linux)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: a supervisor killed with SIGKILL leaves its children to the service manager
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)  # the parent died before the request was in place
