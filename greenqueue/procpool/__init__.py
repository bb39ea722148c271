"""Process pools: DirtyApp instances in gipc worker processes, called and streamed from greenlets.

Concurrency model: in the server process, the greenlet holding a worker
(a caller during ``call()`` or while iterating ``stream()``) reads that
worker's replies itself; an idle worker's pipe is watched by a plain I/O
watcher, so a crash is noticed even between calls. A worker
runs one call at a time (apps are stateful and single-threaded); callers
beyond the free workers wait in a bounded FIFO (``Overloaded`` past it).
Each child is forked by gipc, re-initialises gevent, monkey-patches (so an
app's blocking sleeps and I/O let it notice cancellation), imports the app by
its ``module:Class`` path (no app state crosses the fork) and serves calls in
a greenlet while its main greenlet reads the pipe, so a ``cancel`` closes a
running generator at once. Children die with the parent (PR_SET_PDEATHSIG)
and ignore SIGINT: Ctrl-C is the parent's to handle.

Failure handling: a dead child (EOF on its pipe) fails its call with
WorkerCrashed at once and is replaced; a call past ``timeout`` gets
WorkerTimeout and the child is killed and replaced; an exception in the app
becomes RemoteError (type, message, traceback), is logged once here with the
worker's traceback, and the worker lives on.
"""

import collections
import itertools
import logging
import os
import time
import weakref
from typing import Any, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Type, Union, cast

import gevent
from gevent.event import AsyncResult

from .. import events
from .._default import Default
from ..errors import GreenqueueError, Overloaded, UnknownPool, WorkerError, WorkerTimeout, from_dict
from ._app import STREAM_CREDIT, DirtyApp, _load_class, _spec_of
from ._worker import BadReply as _BadReply
from ._worker import Worker as _Worker

log = logging.getLogger(__name__)

__all__ = ["DirtyApp", "ProcessPool", "Pools", "start_pools", "get", "stop_all", "reset", "get_pools",
           "DEFAULT_MAX_QUEUE", "STREAM_CREDIT", "CPU_CORES"]

#: Calls that may wait for a busy pool by default: as many as the server's default
#: --max-connections, so an ordinary burst of chat requests queues instead of failing.
DEFAULT_MAX_QUEUE = 1000

#: Cores the idle-polling budget may count on; None means the CPUs this process may run on.
#: Set it lower where a CPU quota (a container's) grants fewer cores than the machine shows.
CPU_CORES: Optional[int] = None

_RELEASE_WAIT = 2.0   # seconds a cancelled stream may take to close before its worker is killed
_REFILL = STREAM_CREDIT // 2  # a stream's consumer gives credit back in halves of the window


class ProcessPool:
    """A pool of worker processes, each running one instance of a DirtyApp."""

    def __init__(self, app_or_path: Union[str, Type[DirtyApp]], workers: Optional[int] = None,
                 timeout: Optional[float] = None, max_requests: Optional[int] = None,
                 max_queue: Optional[int] = None) -> None:
        self.spec = _spec_of(app_or_path)
        cls = app_or_path if isinstance(app_or_path, type) else _load_class(self.spec)
        self.name = cls.__name__
        self.size = int(workers or cls.workers or 1)
        self.timeout = float(cls.timeout if timeout is None else timeout) or None
        self.max_requests = int(cls.max_requests if max_requests is None else max_requests)
        self.max_queue = int(max_queue if max_queue is not None else max(DEFAULT_MAX_QUEUE, self.size * 32))
        self._idle_poll_wanted = max(0.0, float(cls.idle_poll or 0))
        self.idle_poll = 0.0  # granted at start() if there are cores to spare
        self._workers: List[_Worker] = []
        self._idle: List[_Worker] = []
        self._waiters: Deque["AsyncResult[_Worker]"] = collections.deque()
        self._ids = itertools.count(1)
        self._restarts = 0
        self._failures = 0
        self._stopping = False
        self._started = False
        self._watchdog: Optional[gevent.Greenlet] = None

    def __repr__(self) -> str:
        return "<ProcessPool %s workers=%d>" % (self.spec, self.size)

    def start(self) -> "ProcessPool":
        """Start every worker; raise WorkerError (and start none) if one fails to initialise."""
        self.idle_poll = _grant_idle_poll(self)
        try:
            for index in range(self.size):
                w = _Worker(self, index, self._worker_gone).start()
                self._workers.append(w)
                self._idle.append(w)
        except WorkerError:
            self.stop(5)
            raise
        self._started = True
        if self.idle_poll:
            how = "polling up to %d us after each call" % round(self.idle_poll * 1e6)
        elif self._idle_poll_wanted:
            how = "sleeping between calls: more polling workers would outnumber the %d cores" % _cores()
        else:
            how = "sleeping between calls (idle_poll = 0)"
        log.info("started %d worker(s) for %s, %s", self.size, self.spec, how)
        return self

    # -- dispatch -----------------------------------------------------------------------

    def _acquire(self) -> _Worker:
        if self._stopping:
            raise WorkerError("the pool for %s is stopping" % self.spec)
        if self._idle:
            # Least busy: the idle worker that has served the fewest calls.
            w = min(self._idle, key=lambda w: w.calls)
            self._idle.remove(w)
            return self._hold(w)
        if len(self._waiters) >= self.max_queue:
            raise Overloaded("all %d %s workers are busy and %d calls are waiting; try again later, or raise "
                             "the app's workers or the pool's max_queue"
                             % (self.size, self.name, len(self._waiters)))
        waiter: "AsyncResult[_Worker]" = AsyncResult()
        self._waiters.append(waiter)
        timer = gevent.Timeout.start_new(self.timeout) if self.timeout else None
        # The waiter only ever succeeds with a worker (_hand_over sets one, never None);
        # gevent's stubs type get() and value as Optional for every AsyncResult.
        try:
            return self._hold(cast(_Worker, waiter.get()))
        except BaseException as exc:
            if waiter.successful():
                if exc is timer:
                    # handed a worker in the same instant the wait ran out
                    return self._hold(cast(_Worker, waiter.value))
                # Killed (or an outer timeout) just as a worker was handed over: pass it on, or it is lost.
                w = cast(_Worker, waiter.value)
                w.busy = False
                self._hand_over(w)
                raise
            if exc is timer:
                raise WorkerTimeout("no %s worker became free within %ss; add workers or shorten the calls"
                                    % (self.name, self.timeout)) from None
            raise  # someone else's timeout, or a kill: theirs to report
        finally:
            if timer is not None:
                timer.close()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _arm(self, w: _Worker) -> None:
        """Start the timeout clock for ``w``'s current wait."""
        if self.timeout is None:
            return
        w.deadline = time.monotonic() + self.timeout
        if self._watchdog is None:
            self._watchdog = gevent.spawn(self._watch)

    def _watch(self) -> None:
        # One greenlet per pool enforces timeouts: cheaper than a timer per call,
        # which cost a third of an empty call's round trip.
        try:
            while True:
                armed = [w for w in self._workers if w.deadline is not None]
                if not armed:
                    return
                now = time.monotonic()
                for w in armed:
                    if cast(float, w.deadline) <= now:  # armed holds only workers with a deadline
                        w.deadline = None
                        w.kill("timeout")
                earliest = min((w.deadline for w in armed if w.deadline is not None), default=None)
                if earliest is not None:
                    gevent.sleep(max(0.001, earliest - now))
        finally:
            self._watchdog = None

    def _hold(self, w: _Worker) -> _Worker:
        w.busy = True
        w.unwatch()
        return w

    def _release(self, w: _Worker) -> None:
        w.busy = False
        w.deadline = None
        if w.dead:
            return
        w.calls += 1
        if w.limit and w.calls >= w.limit:
            w.reason = "recycled"
            log.info("recycling worker %d (pid %s) of %s after %d calls", w.index, w.pid, self.spec, w.calls)
            gevent.spawn(self._recycle, w)
            return
        self._hand_over(w)

    def _hand_over(self, w: _Worker) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.ready():
                w.busy = True
                waiter.set(w)
                return
        self._idle.append(w)
        w.watch()

    def _recycle(self, w: _Worker) -> None:
        w.send(("stop",))
        w.proc.join(timeout=10)
        if w.proc.is_alive():
            w.kill()
        w.on_exit()  # nobody reads this worker's pipe any more; account for it and replace it

    def _worker_gone(self, w: _Worker) -> None:
        if w in self._idle:
            self._idle.remove(w)
        if w in self._workers:
            self._workers.remove(w)
        if not self._stopping:
            self._restarts += 1
            gevent.spawn(self._replace, w.index, w.reason)

    def _replace(self, index: int, reason: Optional[str]) -> None:
        while not self._stopping:
            # Back off on repeated failures so a broken init() cannot eat the CPU.
            delay = 0 if self._failures == 0 else min(30.0, 0.5 * 2 ** (self._failures - 1))
            if delay:
                gevent.sleep(delay)
            if self._stopping:
                return
            try:
                w = _Worker(self, index, self._worker_gone).start()
            except WorkerError as exc:
                self._failures += 1
                log.error("%s; retrying in %.1fs", exc, min(30.0, 0.5 * 2 ** (self._failures - 1)))
                continue
            self._failures = 0
            if self._stopping:
                w.send(("stop",))
                return
            self._workers.append(w)
            self._hand_over(w)
            return

    # -- calls -----------------------------------------------------------------------------

    def call(self, action: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``action`` in a worker and return its value (only this greenlet waits)."""
        started = time.monotonic()
        w = self._acquire()
        call_id = next(self._ids)
        self._arm(w)
        w.send(("call", call_id, action, args, kwargs, False))
        try:
            msg = self._reply(w, call_id)  # the watchdog kills the worker past the timeout
        except _BadReply as exc:
            self._release(w)  # the worker answered and is free; only its answer is unusable
            raise WorkerError("%s.%s returned a value the server cannot unpickle (%s); return plain data "
                              "(dicts, lists, str, numbers) or types the server can import"
                              % (self.name, action, exc)) from exc.args[0]
        except BaseException:
            # The caller went away mid-call: the worker is in an unknown state; replace it.
            w.kill("abandoned")
            gevent.spawn(self._drain_to_exit, w)
            raise
        kind = msg[0]
        if kind == "exc":
            raise msg[2]
        self._release(w)
        if _subscribers and events.wanted(events.PoolCallFinished):
            events.notify(events.PoolCallFinished(self, kind="call", seconds=time.monotonic() - started))
        if kind == "err":
            raise self._app_error(w, action, msg[2])
        return msg[2]

    def _app_error(self, w: _Worker, action: str, data: Dict[str, Any]) -> GreenqueueError:
        """Log an exception the app raised, with the worker's traceback, and return it to raise here."""
        # Logged once, here: the traceback exists only in the worker, and callers often turn
        # the error into a 500 or an SSE error event that shows just the message.
        tb = (data.get("traceback") or "").rstrip()
        log.error("%s.%s() raised %s: %s (worker %d, pid %s, pool %s)%s", self.name, action, data.get("type"),
                  data.get("message"), w.index, w.pid, self.spec, "\n" + tb if tb else "")
        return from_dict(data)

    @staticmethod
    def _drain_to_exit(w: _Worker) -> None:
        """Read a killed worker's pipe up to its EOF, which accounts for it and starts a replacement."""
        while True:
            try:
                if w.recv()[0] == "exc":
                    return
            except _BadReply:
                continue

    @staticmethod
    def _reply(w: _Worker, call_id: int) -> Tuple[Any, ...]:
        """The next message for ``call_id`` (stale ones from an abandoned call are skipped)."""
        while True:
            msg = w.recv()
            if msg[0] == "exc" or msg[1] == call_id:
                return msg

    def stream(self, action: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Iterate the chunks a generator ``action`` yields; closing the iterator stops the worker's generator."""
        started = time.monotonic()
        w = self._acquire()
        return self._stream(w, action, args, kwargs, started)

    def _stream(self, w: _Worker, action: str, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                started: float) -> Iterator[Any]:
        call_id = next(self._ids)
        w.send(("call", call_id, action, args, kwargs, True))
        finished = False
        consumed = 0
        refill = _REFILL
        try:
            while True:
                self._arm(w)  # the timeout covers the wait for each chunk, not the consumer's time
                try:
                    msg = self._reply(w, call_id)
                except _BadReply as exc:
                    w.deadline = None
                    raise WorkerError("%s.%s streamed a chunk the server cannot unpickle (%s); stream plain "
                                      "data or types the server can import" % (self.name, action, exc)) from exc.args[0]
                w.deadline = None
                kind = msg[0]
                if kind == "chunk":
                    consumed += 1
                    if consumed == refill:
                        consumed = 0
                        w.send(("credit", call_id, refill))
                    yield msg[2]
                elif kind == "ok":
                    finished = True
                    self._release(w)
                    if msg[2] is not None:
                        yield msg[2]
                    return
                elif kind == "end":
                    finished = True
                    self._release(w)
                    return
                elif kind == "err":
                    finished = True
                    self._release(w)
                    raise self._app_error(w, action, msg[2])
                elif kind == "exc":
                    finished = True
                    raise msg[2]
        finally:
            if _subscribers and events.wanted(events.PoolCallFinished):
                events.notify(events.PoolCallFinished(self, kind="stream", seconds=time.monotonic() - started))
            if not finished:
                # The consumer stopped early (client gone): close the worker's generator now,
                # and hand the worker back once it says the generator is closed.
                w.send(("cancel", call_id))
                gevent.spawn(self._await_cancel, w, call_id)

    def _await_cancel(self, w: _Worker, call_id: int) -> None:
        timer = gevent.Timeout.start_new(_RELEASE_WAIT)
        try:
            while True:
                try:
                    msg = self._reply(w, call_id)
                except _BadReply:
                    continue  # a chunk nobody will read anyway
                if msg[0] in ("end", "err", "ok"):
                    timer.close()
                    self._release(w)
                    return
                if msg[0] == "exc":
                    return
        except gevent.Timeout:
            log.warning("worker %d of %s did not close a cancelled stream in %ss; killing it",
                        w.index, self.spec, _RELEASE_WAIT)
            w.kill("timeout")
            # Read up to the EOF, which marks the worker dead and replaces it: whatever the child
            # wrote before it died (an unpicklable chunk included) must not end this greenlet first.
            while not w.dead:
                try:
                    w.recv()
                except _BadReply:
                    continue
        finally:
            timer.close()

    # -- lifecycle -------------------------------------------------------------------------

    def stats(self) -> dict:
        """Pool state for health checks and the dashboard."""
        return {"app": self.spec, "size": self.size, "queued": len(self._waiters), "max_queue": self.max_queue,
                "restarts": self._restarts, "idle_poll": self.idle_poll,
                "workers": [{"index": w.index, "pid": w.pid, "busy": w.busy, "calls": w.calls}
                            for w in sorted(self._workers, key=lambda w: w.index)]}

    def stop(self, timeout: float = 10.0) -> None:
        """Ask each worker to run close() and exit; kill those still running after ``timeout``."""
        self._stopping = True
        _polling.pop(self, None)
        workers = list(self._workers)
        for w in workers:
            w.reason = "stopped"
            w.send(("stop",))
        deadline = time.monotonic() + (timeout or 0)
        for w in workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                log.warning("worker %d (pid %s) of %s did not stop in time; killing it", w.index, w.pid, self.spec)
                w.kill()
                w.proc.join(timeout=2)
        for w in workers:
            w.on_exit()  # an idle worker's EOF may not have been read yet
        for waiter in list(self._waiters):
            waiter.set_exception(WorkerError("the pool for %s stopped" % self.spec))
        self._waiters.clear()
        self._workers.clear()
        self._idle.clear()


_subscribers = events.subscribers


# Polling workers must not outnumber the cores: a polling process holds its core, and
# the server needs one of its own. Pools started first get to poll; the rest sleep.
# pool -> number of its workers that poll
_polling: "weakref.WeakKeyDictionary[ProcessPool, int]" = weakref.WeakKeyDictionary()


def _cores() -> int:
    if CPU_CORES:
        return int(CPU_CORES)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _grant_idle_poll(pool: ProcessPool) -> float:
    if not pool._idle_poll_wanted or pool in _polling:
        return pool.idle_poll
    polling, cores = sum(_polling.values()), _cores()
    if polling + pool.size + 1 > cores:
        log.debug("%s: workers will not poll (%d polling already, %d cores)", pool.spec, polling, cores)
        return 0.0
    _polling[pool] = pool.size
    return pool._idle_poll_wanted


class Pools:
    """The process pools a runtime started, by ``module:Class`` spec."""

    def __init__(self) -> None:
        self._by_spec: "dict[str, ProcessPool]" = {}

    def __len__(self) -> int:
        return len(self._by_spec)

    def all(self) -> "list[ProcessPool]":
        """Every running pool, in start order."""
        return list(self._by_spec.values())

    def start(self, specs: Iterable[str], workers: Optional[int] = None,
              timeout: Optional[float] = None) -> "list[ProcessPool]":
        """Start a pool for each ``module:Class`` spec; stop the ones started if one fails."""
        started = []
        try:
            for spec in specs:
                pool = ProcessPool(spec, workers=workers, timeout=timeout).start()
                self._by_spec[pool.spec] = pool
                started.append(pool)
        except BaseException:
            for pool in started:
                pool.stop(5)
                self._by_spec.pop(pool.spec, None)
            raise
        return started

    def get(self, name_or_path: str) -> "ProcessPool":
        """The running pool for a ``module:Class`` path or a class name (UnknownPool lists the known ones)."""
        pool = self._by_spec.get(name_or_path)
        if pool is None:
            matches = [p for p in self._by_spec.values() if p.name == name_or_path]
            if len(matches) == 1:
                pool = matches[0]
        if pool is None:
            raise UnknownPool("no process pool %r is running (known: %s); start the server with --dirty-app %s"
                              % (name_or_path, ", ".join(sorted(self._by_spec)) or "none", name_or_path))
        return pool

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every pool."""
        for pool in list(self._by_spec.values()):
            pool.stop(timeout)
        self._by_spec.clear()

    def stats(self) -> "list[dict]":
        """Each pool's stats() with its name."""
        return [dict(p.stats(), name=p.name) for p in self._by_spec.values()]


_default: Default[Pools] = Default(Pools)


def get_pools() -> Pools:
    """The pools of the default runtime (``--dirty-app``)."""
    return _default.get()


def start_pools(specs: Sequence[str], workers: Optional[int] = None,
                timeout: Optional[float] = None) -> List[ProcessPool]:
    """Start (and register on the default runtime) a pool for each ``module:Class`` spec."""
    return get_pools().start(specs, workers, timeout)


def get(name_or_path: str) -> ProcessPool:
    """The running pool for a ``module:Class`` path or a class name (UnknownPool lists the known ones)."""
    return get_pools().get(name_or_path)


def stop_all(timeout: float = 10.0) -> None:
    """Stop every pool of the default runtime."""
    pools = _default.peek()
    if pools is not None:
        pools.stop(timeout)


def reset() -> None:
    """Stop all pools (tests)."""
    stop_all(5)
