"""The runner's engine: slots, waiting lines, the delay heap, the idle worker; running and finishing attempts.

Concurrency model: everything here runs on the task hub's thread (the
``Runner`` hands calls from other threads over before they reach this
code), so the state needs no lock. Every started attempt gets its own
greenlet; at most ``max_concurrency`` of them hold a slot. Waiting tasks
sit in a deque (idle tasks in a second deque served only from
``gevent.idle()`` by one idle-worker greenlet); delayed tasks sit in one
heap keyed by ``time.monotonic()`` and are released by one timer greenlet.
A task blocked on another lends its slot out (``release_slot``) and takes
it back when it wakes, so a task waiting on another never deadlocks the
pool. Nothing here blocks the hub; the store is told about every
transition through its methods and never calls back.
"""

import collections
import datetime
import heapq
import logging
import time
import weakref
from typing import Any, Callable, Dict, Optional

import gevent
from gevent import Greenlet
from gevent.event import Event

from .. import events
from ..errors import TaskTimeout
from ._result import CANCELLED, FAILURE, PENDING, READY_STATES, RETRY, SCHEDULED, STARTED, SUCCESS, TaskResult

# The runner's logger: this code was the runner's until it got its own module, and
# logging config written for the runner should keep seeing its lines by name.
log = logging.getLogger("greenqueue.tasks._runner")

__all__ = ["TaskEngine"]

_UTC = datetime.timezone.utc
_monotonic = time.monotonic
_time = time.time
_subscribers = events.subscribers


class _TaskGreenlet(Greenlet):
    """The greenlet a task runs in."""

    # No snapshot of the spawning stack: it is a third of the cost of creating the
    # greenlet, and would show the runner's dispatch loop rather than the caller.
    spawning_stack_limit = 0


class _Expired(BaseException):
    """Raised into a task greenlet by its own timeout (never escapes the runner)."""


class TaskEngine:
    """The task state machine under ``Runner``: queues and slots in, finished results out."""

    def __init__(self, store: Any) -> None:
        self.max_concurrency = 100
        self.store: Any = store
        self._active = 0                     # slots in use
        self._pending: collections.deque = collections.deque()  # waiting normal tasks (may hold cancelled ones)
        self._idle_q: collections.deque = collections.deque()   # waiting idle tasks (may hold cancelled ones)
        self._pending_count = 0              # live entries of both deques
        self._heap: list = []                # (due monotonic, seq, TaskResult)
        self._scheduled_count = 0
        self._seq = 0
        self._running: Dict[Any, TaskResult] = {}   # task greenlet -> TaskResult
        self._live: Dict[str, TaskResult] = {}      # id -> unfinished TaskResult
        self._timer: Any = None
        self._timer_wake: Any = None
        self._idle_worker: Any = None
        self._idle_wake: Any = None
        # Handles of tasks queued in (or running from) a shared store, not here; weak, so a
        # handle nobody holds costs nothing once its caller drops it.
        self._elsewhere: "weakref.WeakValueDictionary[str, TaskResult]" = weakref.WeakValueDictionary()
        #: Called when a slot frees and nothing waits here (a node's claimer listens).
        self.on_free_slot: Optional[Callable[[], None]] = None

    # -- slots ------------------------------------------------------------------------

    def holds_slot(self, greenlet: Any) -> Optional[TaskResult]:
        """The task running in ``greenlet`` if it holds a slot now, else None."""
        r = self._running.get(greenlet)
        return r if r is not None and r._slot else None

    def release_slot(self, r: TaskResult) -> None:
        """Lend ``r``'s slot out while it waits on another task."""
        r._slot = False
        self._active -= 1
        self._dispatch()

    def reacquire_slot(self, r: TaskResult) -> None:
        """Give ``r`` its slot back when its wait ends."""
        # May exceed max_concurrency for a moment: the woken task must not wait
        # behind tasks that started while it was blocked (that could deadlock).
        r._slot = True
        self._active += 1

    def current(self) -> Optional[TaskResult]:
        """The TaskResult running in the calling greenlet (None outside a task)."""
        return self._running.get(gevent.getcurrent())

    # -- waiting lines -------------------------------------------------------------

    def _enqueue(self, r: TaskResult) -> None:
        """Put a due task in line (or straight into a free slot); never raises Overloaded."""
        if r._idle:
            r._where = "idle"
            self._idle_q.append(r)
            self._pending_count += 1
            self._kick_idle()
        elif self._active < self.max_concurrency and not self._pending:
            self._start(r)
        else:
            r._where = "pending"
            self._pending.append(r)
            self._pending_count += 1

    def _start(self, r: TaskResult) -> None:
        self._active += 1
        r._slot = True
        r._where = "running"
        g = _TaskGreenlet(self._run, r)
        r._greenlet = g
        self._running[g] = r
        g.start()

    def _dispatch(self) -> None:
        """Start waiting tasks while slots are free; wake the idle worker when only idle ones wait."""
        pending = self._pending
        while pending and self._active < self.max_concurrency:
            r = pending.popleft()
            if r._where != "pending":
                continue  # cancelled while waiting
            self._pending_count -= 1
            self._start(r)
        if self._idle_q and not pending and self._active < self.max_concurrency and self._idle_wake is not None:
            self._idle_wake.set()
        if self.on_free_slot is not None and not pending and self._active < self.max_concurrency:
            self.on_free_slot()

    # -- delayed tasks ----------------------------------------------------------

    def _schedule(self, r: TaskResult, delay: Optional[float]) -> None:
        due = _monotonic() + (delay or 0.0)
        self._seq += 1
        r._where = "scheduled"
        self._scheduled_count += 1
        heap = self._heap
        earliest = heap[0][0] if heap else None
        heapq.heappush(heap, (due, self._seq, r))
        if self._timer is None:
            self._timer_wake = Event()
            self._timer = gevent.spawn(self._timer_loop)
        elif earliest is None or due < earliest:
            self._timer_wake.set()

    def _timer_loop(self) -> None:
        heap = self._heap
        wake = self._timer_wake
        while True:
            now = _monotonic()
            while heap and heap[0][0] <= now:
                r = heapq.heappop(heap)[2]
                if r._where != "scheduled":
                    continue  # cancelled while delayed
                self._scheduled_count -= 1
                if r.state == SCHEDULED:
                    r.state = PENDING
                self._enqueue(r)
            if len(heap) > 64 and len(heap) > 2 * self._scheduled_count:
                # Cancelled entries would otherwise stay until their due time.
                heap[:] = [e for e in heap if e[2]._where == "scheduled"]
                heapq.heapify(heap)
            wake.clear()
            wake.wait(heap[0][0] - now if heap else None)

    # -- idle tasks ---------------------------------------------------------------

    def _kick_idle(self) -> None:
        if self._idle_worker is None:
            self._idle_wake = Event()
            self._idle_worker = gevent.spawn(self._idle_loop)
        else:
            self._idle_wake.set()

    def _idle_loop(self) -> None:
        idle_q = self._idle_q
        try:
            while idle_q:
                gevent.idle()
                if self._pending or self._active >= self.max_concurrency:
                    self._idle_wake.clear()
                    self._idle_wake.wait()
                    continue
                r = idle_q.popleft()
                if r._where != "idle":
                    continue
                self._pending_count -= 1
                self._start(r)
        finally:
            self._idle_worker = None

    # -- running --------------------------------------------------------------------

    def _run(self, r: TaskResult) -> None:
        g = r._greenlet
        try:
            if r.state not in READY_STATES:  # cancelled between _start and now
                self._attempt(r)
        finally:
            del self._running[g]
            if r._slot:
                r._slot = False
                self._active -= 1
            self._dispatch()

    def _attempt(self, r: TaskResult) -> None:
        opts = r._opts
        r.state = STARTED
        r._started_ts = _time()
        if r._serializer is not None:
            self.store.started(r)
        if _subscribers:
            events.notify(events.TaskStarted(r))
        exc: Optional[BaseException] = None
        value = None
        timer = None
        expired = False
        t0 = _monotonic()
        try:
            if opts.timeout is not None:
                timer = gevent.Timeout.start_new(opts.timeout, _Expired())
            if r._app is not None:
                with r._app.app_context():
                    value = r._fn(*r._args, **r._kwargs)
            else:
                value = r._fn(*r._args, **r._kwargs)
        except _Expired:
            exc = None  # decided below from the timer, which also catches a swallowed expiry
        except gevent.GreenletExit as e:
            if r.state == CANCELLED or r._where == "store":
                return  # cancel() already finished the result, or abandon() gave the lease up
            exc = e
        except (KeyboardInterrupt, SystemExit) as e:
            self._finish(r, FAILURE, exc=e, duration=_monotonic() - t0)
            raise  # the process is stopping; let the hub see it
        except BaseException as e:
            # gevent.Timeout and other BaseExceptions become GreenqueueErrors in _set.
            exc = e
        finally:
            if timer is not None:
                expired = not timer.pending
                timer.close()
        duration = _monotonic() - t0
        if r.state == CANCELLED:
            return
        if timer is not None and expired:
            exc = TaskTimeout("task %s[%s] timed out after %ss" % (r.name, r.id, opts.timeout))
        if exc is None:
            self._finish(r, SUCCESS, value=value, duration=duration)
        elif isinstance(exc, gevent.GreenletExit):
            # Killed by someone other than cancel() (killall, shutdown): still a result.
            self._finish(r, CANCELLED, exc=exc, duration=duration)
        elif r.retries < opts.retries:
            self._retry(r, exc, duration)
        else:
            self._finish(r, FAILURE, exc=exc, duration=duration)

    def _retry(self, r: TaskResult, exc: BaseException, duration: float) -> None:
        r.retries += 1
        r.duration = duration
        r.state = RETRY
        delay = r._opts.delay_for(r.retries)
        log.debug("task %s[%s] attempt %d failed, retrying in %.3fs", r.name, r.id, r.retries, delay)
        handed_back = r._serializer is not None and self.store.retrying(r, delay, exc)
        if _subscribers:
            events.notify(events.TaskRetrying(r, exception=exc, delay=delay))
        if handed_back:
            r._where = "store"  # the shared store has it; any node claims it when due
            self._live.pop(r.id, None)
            self._elsewhere[r.id] = r
            return
        if delay > 0:
            self._schedule(r, delay)
        else:
            # This greenlet still holds its slot; queue behind waiting tasks for fairness.
            r._where = "pending"
            self._pending.append(r)
            self._pending_count += 1

    def _finish(self, r: TaskResult, state: str, value: Any = None, exc: Optional[BaseException] = None,
                duration: Optional[float] = None, tb: Optional[str] = None) -> None:
        if r.state in READY_STATES:
            return
        if duration is not None:
            r.duration = duration
        r._finished_ts = _time()
        r._where = None
        serializer = r._serializer
        if not r._set(state, value, exc, tb):
            return
        self._live.pop(r.id, None)
        self.store.finished(r, serializer)
        if _subscribers:
            if state == SUCCESS:
                events.notify(events.TaskSucceeded(r, duration=r.duration or 0.0))
            elif state == FAILURE:
                events.notify(events.TaskFailed(r, exception=r.exception, duration=r.duration or 0.0))
            else:
                events.notify(events.TaskCancelled(r))

    def _run_eager(self, r: TaskResult, delay: Optional[float], eta: Optional[datetime.datetime]) -> TaskResult:
        """Run inline in the caller (tests): no delay, no timeout, exceptions propagate."""
        if eta is not None:
            r.eta = eta if eta.tzinfo is not None else eta.replace(tzinfo=_UTC)
        if _subscribers:
            events.notify(events.TaskSpawned(r))
        while True:
            r.state = STARTED
            r._started_ts = _time()
            if _subscribers:
                events.notify(events.TaskStarted(r))
            t0 = _monotonic()
            try:
                value = r._fn(*r._args, **r._kwargs)
            except Exception as e:
                if r.retries < r._opts.retries:
                    r.retries += 1
                    r.state = RETRY
                    if _subscribers:
                        events.notify(events.TaskRetrying(r, exception=e, delay=0.0))
                    continue
                self._finish(r, FAILURE, exc=e, duration=_monotonic() - t0)
                raise
            self._finish(r, SUCCESS, value=value, duration=_monotonic() - t0)
            return r
