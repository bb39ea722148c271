"""The task runner: a FIFO of waiting tasks, a slot counter, a heap of delayed tasks.

Concurrency model: everything runs on the one gevent hub thread. Each started
attempt gets its own greenlet; at most ``max_concurrency`` of them hold a slot.
Waiting tasks sit in a deque (idle tasks in a second deque that is served only
from ``gevent.idle()``). Delayed tasks sit in one heap keyed by
``time.monotonic()`` and are released by one timer greenlet, so 100,000
scheduled tasks cost 100,000 small tuples, not 100,000 greenlets. A running
task that blocks in ``TaskResult.get()`` lends its slot out until it wakes, so
a task waiting on another never deadlocks the pool. Nothing here blocks the
hub; spawning never blocks the caller (it raises Overloaded instead).
"""

import collections
import datetime
import heapq
import logging
import random
import sys
import time
from dataclasses import dataclass

import gevent
import zope.event
from gevent import Greenlet
from gevent.event import Event

from .. import events
from ..errors import ConfigError, GreenqueueError, Overloaded, TaskCancelled, TaskTimeout
from ._result import (CANCELLED, FAILURE, PENDING, READY_STATES, RETRY, SCHEDULED, STARTED,
                      SUCCESS, TaskResult)

log = logging.getLogger(__name__)

__all__ = ["Runner", "DrainReport", "TaskOptions", "get_runner", "reset"]

_UTC = datetime.timezone.utc
_monotonic = time.monotonic
_time = time.time
_rand = random.Random()


class _TaskGreenlet(Greenlet):
    """The greenlet a task runs in."""

    # No snapshot of the spawning stack: it is a third of the cost of creating the
    # greenlet, and would show the runner's dispatch loop rather than the caller.
    spawning_stack_limit = 0


@dataclass(frozen=True)
class TaskOptions:
    """Retry and timeout policy of a task (shared by all its spawns)."""

    retries: int = 0
    retry_delay: float = 0.0
    retry_backoff: float = 1.0
    retry_jitter: float = 0.0
    timeout: float = None

    def delay_for(self, retry):
        """Seconds to wait before retry number ``retry`` (1-based)."""
        delay = self.retry_delay * (self.retry_backoff ** (retry - 1))
        if self.retry_jitter:
            delay += _rand.uniform(0, self.retry_jitter)
        return delay


_NO_OPTIONS = TaskOptions()


@dataclass
class DrainReport:
    """What :meth:`Runner.drain` saw: finished and unfinished tasks, delayed ones left."""

    finished: int
    running: int
    pending: int
    scheduled: int
    elapsed: float

    @property
    def complete(self):
        """True when every task that was running or waiting has finished."""
        return self.running == 0 and self.pending == 0

    def __str__(self):
        return ("%d task(s) finished, %d still running, %d still waiting, "
                "%d delayed task(s) not due, in %.2fs"
                % (self.finished, self.running, self.pending, self.scheduled, self.elapsed))


class _Expired(BaseException):
    """Raised into a task greenlet by its own timeout (never escapes the runner)."""


def _now():
    return datetime.datetime.now(_UTC)


def _new_id():
    return "%032x" % _rand.getrandbits(128)


def _callable_name(fn):
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        return repr(fn)
    return "%s.%s" % (getattr(fn, "__module__", None) or "?", name)


def _flask_app():
    # Import nothing: only an app that is already in use can have a context.
    flask = sys.modules.get("flask")
    if flask is not None and flask.has_app_context():
        return flask.current_app._get_current_object()
    return None


def _check(name, value, minimum, kind=int, allow_none=False):
    if value is None and allow_none:
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum \
            or (kind is int and int(value) != value):
        raise ConfigError("%s must be %s >= %s%s, got %r" % (
            name, "an integer" if kind is int else "a number", minimum,
            " or None" if allow_none else "", value))
    return kind(value)


class Runner:
    """Runs tasks in greenlets with bounded concurrency, waiting queue and kept results."""

    def __init__(self, max_concurrency=100, max_pending=10000, result_ttl=3600,
                 max_results=10000, eager=False):
        self.max_concurrency = 100
        self.max_pending = 10000
        self.result_ttl = 3600.0
        self.max_results = 10000
        self.eager = False
        self._active = 0                     # slots in use
        self._pending = collections.deque()  # waiting normal tasks (may hold cancelled ones)
        self._idle_q = collections.deque()   # waiting idle tasks (may hold cancelled ones)
        self._pending_count = 0              # live entries of both deques
        self._heap = []                      # (due monotonic, seq, TaskResult)
        self._scheduled_count = 0
        self._seq = 0
        self._running = {}                   # task greenlet -> TaskResult
        self._live = {}                      # id -> unfinished TaskResult
        self._finished = collections.OrderedDict()  # id -> TaskResult, oldest first
        self._prune_at = 0.0                         # monotonic time of the next pass over expired results
        self._timer = None
        self._timer_wake = Event()
        self._idle_worker = None
        self._idle_wake = Event()
        self._batchers = {}
        self._closed = False
        self.configure(max_concurrency=max_concurrency, max_pending=max_pending,
                       result_ttl=result_ttl, max_results=max_results, eager=eager)

    # -- configuration and counters -----------------------------------------

    def configure(self, max_concurrency=None, max_pending=None, result_ttl=None,
                  max_results=None, eager=None):
        """Change limits in place (None keeps a value); returns the runner."""
        if max_concurrency is not None:
            self.max_concurrency = _check("max_concurrency", max_concurrency, 1)
        if max_pending is not None:
            self.max_pending = _check("max_pending", max_pending, 0)
        if result_ttl is not None:
            self.result_ttl = _check("result_ttl", result_ttl, 0, float)
        if max_results is not None:
            self.max_results = _check("max_results", max_results, 0)
        if eager is not None:
            self.eager = bool(eager)
        self._dispatch()
        return self

    @property
    def running(self):
        """Number of task greenlets started and not finished."""
        return len(self._running)

    @property
    def pending(self):
        """Number of tasks waiting for a slot (idle tasks included)."""
        return self._pending_count

    @property
    def scheduled(self):
        """Number of delayed tasks (spawn_later/spawn_at/retry backoff) not due yet."""
        return self._scheduled_count

    def stats(self):
        """Counters as a dict for metrics and the dashboard."""
        return {"running": self.running, "pending": self.pending, "scheduled": self.scheduled,
                "results": len(self._finished), "max_concurrency": self.max_concurrency,
                "max_pending": self.max_pending}

    # -- spawning -------------------------------------------------------------

    def spawn(self, fn, args=(), kwargs=None, *, name=None, opts=None, delay=None,
              eta=None, idle=False, force=False, on_done=None, task_id=None, retries=0):
        """Accept ``fn(*args, **kwargs)`` as a task and return its TaskResult at once.

        ``force`` skips the max_pending check (work already accepted in another
        form, such as a batch); ``on_done(result)`` runs when it is ready.
        ``task_id`` and ``retries`` restore a task replayed from the journal.
        """
        if self._closed:
            raise GreenqueueError("this task runner was reset; use greenqueue.tasks.get_runner()")
        r = TaskResult(self, task_id or _new_id(), name or _callable_name(fn), fn, args, kwargs or {},
                       opts or _NO_OPTIONS, _flask_app(), idle)
        r.retries = retries
        if on_done is not None:
            r._callbacks = [on_done]
        if self.eager:
            return self._run_eager(r, delay, eta)
        if eta is not None:
            if eta.tzinfo is None:
                eta = eta.replace(tzinfo=_UTC)  # naive means UTC (DESIGN.md)
            delay = (eta - _now()).total_seconds()
            r.eta = eta
        elif delay is not None:
            r.eta = _now() + datetime.timedelta(seconds=delay)
        if delay is not None and delay > 0:
            r.state = SCHEDULED
            self._live[r.id] = r
            self._notify_spawned(r)
            self._schedule(r, delay)
            return r
        if not force and self._pending_count >= self.max_pending and (
                idle or self._pending or self._active >= self.max_concurrency):
            raise Overloaded("%d tasks are already waiting (max_pending=%d); try again later, or raise "
                             "max_pending with greenqueue.configure()" % (self._pending_count, self.max_pending))
        self._live[r.id] = r
        self._notify_spawned(r)
        self._enqueue(r)
        return r

    def _notify_spawned(self, r):
        if zope.event.subscribers:
            events.notify(events.TaskSpawned(r))

    def _enqueue(self, r):
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

    def _start(self, r):
        self._active += 1
        r._slot = True
        r._where = "running"
        g = _TaskGreenlet(self._run, r)
        r._greenlet = g
        self._running[g] = r
        g.start()

    def _dispatch(self):
        """Start waiting tasks while slots are free; wake the idle worker when only idle ones wait."""
        pending = self._pending
        while pending and self._active < self.max_concurrency:
            r = pending.popleft()
            if r._where != "pending":
                continue  # cancelled while waiting
            self._pending_count -= 1
            self._start(r)
        if self._idle_q and not pending and self._active < self.max_concurrency:
            self._idle_wake.set()

    # -- delayed tasks ----------------------------------------------------------

    def _schedule(self, r, delay):
        due = _monotonic() + delay
        self._seq += 1
        r._where = "scheduled"
        self._scheduled_count += 1
        heap = self._heap
        earliest = heap[0][0] if heap else None
        heapq.heappush(heap, (due, self._seq, r))
        if self._timer is None:
            self._timer = gevent.spawn(self._timer_loop)
        elif earliest is None or due < earliest:
            self._timer_wake.set()

    def _timer_loop(self):
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

    def _kick_idle(self):
        if self._idle_worker is None:
            self._idle_worker = gevent.spawn(self._idle_loop)
        else:
            self._idle_wake.set()

    def _idle_loop(self):
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

    def _run(self, r):
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

    def _attempt(self, r):
        opts = r._opts
        r.state = STARTED
        r._started_ts = _time()
        if zope.event.subscribers:
            events.notify(events.TaskStarted(r))
        exc = value = None
        timer = None
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
            if r.state == CANCELLED:
                return  # cancel() already finished the result
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

    def _retry(self, r, exc, duration):
        r.retries += 1
        r.duration = duration
        r.state = RETRY
        delay = r._opts.delay_for(r.retries)
        log.debug("task %s[%s] attempt %d failed, retrying in %.3fs", r.name, r.id, r.retries, delay)
        if zope.event.subscribers:
            events.notify(events.TaskRetrying(r, exception=exc, delay=delay))
        if delay > 0:
            self._schedule(r, delay)
        else:
            # This greenlet still holds its slot; queue behind waiting tasks for fairness.
            r._where = "pending"
            self._pending.append(r)
            self._pending_count += 1

    def _finish(self, r, state, value=None, exc=None, duration=None, tb=None):
        if r.state in READY_STATES:
            return
        if duration is not None:
            r.duration = duration
        r._finished_ts = _time()
        r._where = None
        if not r._set(state, value, exc, tb):
            return
        self._live.pop(r.id, None)
        self._keep(r)
        if zope.event.subscribers:
            if state == SUCCESS:
                events.notify(events.TaskSucceeded(r, duration=r.duration or 0.0))
            elif state == FAILURE:
                events.notify(events.TaskFailed(r, exception=r.exception, duration=r.duration or 0.0))
            else:
                events.notify(events.TaskCancelled(r))

    def _keep(self, r):
        """Store a finished result for lookup, bounded by max_results and result_ttl."""
        store = self._finished
        now = r._finished_mono = _monotonic()
        if self.max_results:
            store[r.id] = r
            while len(store) > self.max_results:  # while: configure() may have lowered it
                store.popitem(last=False)
        if now < self._prune_at:
            return  # result() hides expired ones; pruning each insert is wasted work
        self._prune_at = now + min(1.0, self.result_ttl / 10)
        cutoff = now - self.result_ttl
        while store:
            oldest = next(iter(store.values()))
            if oldest._finished_mono > cutoff:
                break
            store.popitem(last=False)

    def _run_eager(self, r, delay, eta):
        """Run inline in the caller (tests): no delay, no timeout, exceptions propagate."""
        if eta is not None:
            r.eta = eta if eta.tzinfo is not None else eta.replace(tzinfo=_UTC)
        self._notify_spawned(r)
        while True:
            r.state = STARTED
            r._started_ts = _time()
            if zope.event.subscribers:
                events.notify(events.TaskStarted(r))
            t0 = _monotonic()
            try:
                value = r._fn(*r._args, **r._kwargs)
            except Exception as e:
                if r.retries < r._opts.retries:
                    r.retries += 1
                    r.state = RETRY
                    if zope.event.subscribers:
                        events.notify(events.TaskRetrying(r, exception=e, delay=0.0))
                    continue
                self._finish(r, FAILURE, exc=e, duration=_monotonic() - t0)
                raise
            self._finish(r, SUCCESS, value=value, duration=_monotonic() - t0)
            return r

    # -- waiting, cancelling ----------------------------------------------------------

    def _slot_holder(self, greenlet):
        r = self._running.get(greenlet)
        return r if r is not None and r._slot else None

    def _release_slot(self, r):
        r._slot = False
        self._active -= 1
        self._dispatch()

    def _reacquire_slot(self, r):
        # May exceed max_concurrency for a moment: the woken task must not wait
        # behind tasks that started while it was blocked (that could deadlock).
        r._slot = True
        self._active += 1

    def _cancel(self, r):
        where = r._where
        if r.state in READY_STATES:
            return False
        if where in ("pending", "idle"):
            self._pending_count -= 1
        elif where == "scheduled":
            self._scheduled_count -= 1
        g = r._greenlet
        self._finish(r, CANCELLED, exc=TaskCancelled("task %s[%s] was cancelled" % (r.name, r.id)))
        if g is not None and not g.dead and g is not gevent.getcurrent():
            g.kill(block=False)
        return True

    def result(self, task_id):
        """The TaskResult with this id, or None if unknown or expired."""
        r = self._live.get(task_id)
        if r is not None:
            return r
        r = self._finished.get(task_id)
        if r is not None and r._finished_mono + self.result_ttl < _monotonic():
            return None
        return r

    def drain(self, timeout=None):
        """Wait up to ``timeout`` s for the tasks running or waiting now; report what is left."""
        t0 = _monotonic()
        for batcher in list(self._batchers.values()):
            batcher.flush()
        waiting = list(self._running.values())
        waiting.extend(r for r in self._pending if r._where == "pending")
        waiting.extend(r for r in self._idle_q if r._where == "idle")
        deadline = None if timeout is None else t0 + timeout
        for r in waiting:
            left = None if deadline is None else deadline - _monotonic()
            if left is not None and left <= 0:
                break
            r.wait(left)
        running = pending = finished = 0
        for r in waiting:
            if r.state in READY_STATES:
                finished += 1
            elif r.state == STARTED:
                running += 1
            elif r._where == "scheduled":
                continue  # a retry with backoff: counted with the delayed tasks
            else:
                pending += 1
        report = DrainReport(finished, running, pending, self._scheduled_count, _monotonic() - t0)
        log.info("task drain: %s", report)
        return report

    def kill(self, timeout=1.0):
        """Cancel every waiting, delayed and running task, and stop the helper greenlets."""
        self._closed = True
        for r in list(self._live.values()):
            if r.state not in READY_STATES:
                self._cancel(r)
        greenlets = [g for g in (self._timer, self._idle_worker) if g is not None]
        greenlets.extend(self._running)
        self._timer = self._idle_worker = None
        if greenlets:
            gevent.killall(greenlets, block=True, timeout=timeout)
        self._pending.clear()
        self._idle_q.clear()
        self._heap.clear()
        self._pending_count = self._scheduled_count = 0
        self._batchers.clear()


_default = None


def get_runner():
    """The default runner that @task and the module-level spawn functions use."""
    global _default
    if _default is None:
        _default = Runner()
    return _default


def reset():
    """Kill the default runner's tasks, start a fresh one and forget registered task names."""
    global _default
    old, _default = _default, None
    if old is not None:
        old.kill()
    from ._task import _registry
    _registry.clear()
