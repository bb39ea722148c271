"""Parent-side handle of one worker process: start it, watch its pipe while idle, account for its exit.

Concurrency model: runs in the server process. Whoever holds a worker
reads its pipe: the caller greenlet during a call or stream, an I/O
watcher (which spawns a short greenlet to read) while it is idle, so a
crash shows up as EOF even between calls. ``start()`` forks the child
through gipc and blocks only the calling greenlet until the child says it
is ready. A dead worker tells its pool through the ``on_gone`` callback,
once; the pool decides whether to replace it.
"""

import logging
import os
import random
import signal
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple

import gevent
import gipc

from .. import events
from ..errors import WorkerCrashed, WorkerError, WorkerTimeout, from_dict
from ._child import _worker_main
from ._wire import Channel

if TYPE_CHECKING:
    from . import ProcessPool

# The pool's logger: these lines were the pool's before the worker got its own module,
# and logging config written for "greenqueue.procpool" should keep seeing them by name.
log = logging.getLogger("greenqueue.procpool")


class BadReply(Exception):
    """A message from a worker arrived but cannot be unpickled in the server."""

    def __str__(self) -> str:
        exc = self.args[0]
        return "%s: %s" % (type(exc).__name__, exc)


class Worker:
    """Parent-side handle of one worker process.

    Whoever holds the worker reads its replies: the caller during a call or
    stream (no hop through another greenlet), an I/O watcher while it is
    idle (so a crash, seen as EOF on the pipe, is noticed even then).
    """

    def __init__(self, pool: "ProcessPool", index: int, on_gone: Callable[["Worker"], None]) -> None:
        self.pool = pool
        self.index = index
        self._on_gone = on_gone  # the pool's bookkeeping once this worker is dead
        # Any, not Optional: start() sets both before any other method runs.
        self.proc: Any = None
        self.conn: Any = None
        self.pid: Optional[int] = None
        self.calls = 0
        self.limit = 0
        self.busy = False
        self.deadline: Optional[float] = None  # monotonic time the current wait must end by (the watchdog checks)
        self.dead = False
        self.reason: Optional[str] = None  # why we ended it: "timeout", "recycled", "stopped", "abandoned"
        self.exit_error: Optional[WorkerError] = None  # what a caller waiting on this worker gets once it is dead
        # The idle watcher, made by start(); _readable runs only as its callback.
        self._io: Any = None

    def start(self) -> "Worker":
        """Fork the child and wait for it to initialise; raise WorkerError if init fails."""
        parent_end, child_end = gipc.pipe(duplex=True)
        self.conn = Channel(parent_end)
        self.proc = gipc.start_process(_worker_main, args=(child_end, self.pool.spec, os.getpid(), self.pool.idle_poll),
                                       daemon=True)
        try:
            with gevent.Timeout(max(self.pool.timeout or 0, 60.0)):
                msg = self.conn.get()
        except (EOFError, gevent.Timeout):
            self._reap()
            raise WorkerError("worker for %s exited during start-up (exit code %s)"
                              % (self.pool.spec, self.proc.exitcode)) from None
        if msg[0] == "init_failed":
            self._reap()
            err = from_dict(msg[1])
            raise WorkerError("%s init() failed: %s" % (self.pool.spec, err))
        self.pid = msg[1]
        mr = self.pool.max_requests
        # Jitter so workers started together do not all recycle at once.
        self.limit = mr + random.randint(0, max(0, mr // 10)) if mr else 0
        self._io = gevent.get_hub().loop.io(self.conn.rfd, 1)
        self.watch()
        events.notify(events.WorkerStarted(self.pool, pid=self.pid, index=self.index))
        return self

    # -- idle watching ------------------------------------------------------------------

    def watch(self) -> None:
        """While idle, wake up if the pipe becomes readable (EOF after a crash, or the stop ack)."""
        if not self.dead and self._io is not None:
            if self.conn.pending():
                gevent.spawn(self._drain_idle)  # already read into the buffer: the fd will not wake us
            else:
                self._io.start(self._readable)

    def unwatch(self) -> None:
        """Stop the idle watcher: the new holder reads the pipe itself."""
        if self._io is not None:
            self._io.stop()

    def _readable(self) -> None:
        self._io.stop()
        gevent.spawn(self._drain_idle)  # runs in the hub: do the reading in a greenlet

    def _drain_idle(self) -> None:
        if self.busy or self.dead:
            return
        try:
            msg = self.recv()
        except BadReply as exc:
            log.warning("worker %d of %s sent a message the server cannot unpickle while idle: %s",
                        self.index, self.pool.spec, exc)
            msg = ("late",)
        if msg[0] != "exc":
            self.watch()  # a late or "stopped" message; keep watching for the EOF

    # -- talking to the child ------------------------------------------------------------

    def recv(self) -> Tuple[Any, ...]:
        """Next message from the child; ``("exc", None, error)`` once it is dead."""
        if self.dead:
            return ("exc", None, self.exit_error)
        try:
            return self.conn.get()
        except (EOFError, OSError, gipc.GIPCClosed):
            self.on_exit()
            return ("exc", None, self.exit_error)
        except Exception as exc:
            # A frame that arrived whole but does not unpickle here (a class only the worker
            # can import, say). It is consumed; the next recv() reads the next message.
            raise BadReply(exc) from exc

    def send(self, msg: Tuple[Any, ...]) -> None:
        """Send a message to the child (a dead child is noticed by whoever reads next)."""
        try:
            self.conn.put(msg)
        except (OSError, EOFError, gipc.GIPCClosed):
            pass

    def on_exit(self) -> None:
        """Mark the worker dead once: reap it, set the error a waiting caller gets, tell the pool."""
        if self.dead:
            return
        self.dead = True
        self.unwatch()
        self._reap()
        reason = self.reason or "crashed"
        exitcode = self.proc.exitcode if self.proc is not None else None
        if reason == "timeout":
            self.exit_error = WorkerTimeout("%s call ran past %ss; the worker was killed and is being replaced"
                                            % (self.pool.spec, self.pool.timeout))
        elif reason == "stopped":
            self.exit_error = WorkerError("the pool for %s stopped during the call" % self.pool.spec)
        else:
            self.exit_error = WorkerCrashed("worker %d (pid %s) of %s died during the call (exit code %s); "
                                            "a new one is being started" % (self.index, self.pid, self.pool.spec,
                                                                           exitcode))
        if reason == "crashed":
            log.warning("worker %d (pid %s) of %s died (exit code %s)", self.index, self.pid,
                        self.pool.spec, exitcode)
        events.notify(events.WorkerExited(self.pool, pid=self.pid or 0, index=self.index,
                                          exitcode=exitcode, reason=reason))
        self._on_gone(self)

    def _reap(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass  # already closed
        if self.proc is not None:
            self.proc.join(timeout=2)
            if self.proc.is_alive():
                self.kill()
                self.proc.join(timeout=2)

    def kill(self, reason: Optional[str] = None) -> None:
        """SIGKILL the child; the next read sees EOF and finishes the bookkeeping."""
        if reason and not self.reason:
            self.reason = reason
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
