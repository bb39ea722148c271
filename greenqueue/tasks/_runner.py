"""The task runner: accepts tasks, records them in the store, and answers for them until they finish.

Concurrency model: the runner lives on one gevent hub, the *task hub*
(``_hub.TaskHub`` picks it at the first spawn: the server's main-thread hub,
the spawning thread's hub, or a daemon thread of the runner's own outside
the server). Slots, waiting lines, the delay heap and the task greenlets are
the engine's (``_engine.TaskEngine``, this class's base); this module adds
spawning, the shared-store handles, cancel, lookups, drain and kill.

All runner state is touched on the task hub's thread only. A spawn, cancel
or drain from another thread is handed over with
``loop.run_callback_threadsafe`` and the calling thread waits on a plain
lock (never the task hub). Spawning never blocks the hub: it raises
Overloaded instead; a durable spawn waits, in its own greenlet (or thread),
for the store's commit. The store (``greenqueue.journal.Store``) is told
about every transition through its methods; it never calls back. A forked
child drops the parent's default runner (its task thread does not exist there).
"""

import contextvars
import datetime
import heapq
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import gevent

from .. import events
from ..errors import CancelledError, ConfigError, GreenqueueError, Overloaded
from ..journal import MemoryStore, Store, TaskRow
from ._engine import TaskEngine
from ._hub import MODES, TaskHub, real_ident
from ._options import NO_OPTIONS, TaskOptions, callable_name, check_number, new_id
from ._result import CANCELLED, FAILURE, PENDING, READY_STATES, RETRY, SCHEDULED, STARTED, SUCCESS, TaskResult

log = logging.getLogger(__name__)

__all__ = ["Runner", "DrainReport", "TaskOptions", "get_runner", "reset"]

_UTC = datetime.timezone.utc
_monotonic = time.monotonic
_time = time.time
_subscribers = events.subscribers

#: Seconds a process outside the server waits at exit for tasks still running or waiting.
EXIT_DRAIN = 5.0


@dataclass
class DrainReport:
    """What :meth:`Runner.drain` saw: finished and unfinished tasks, delayed ones left."""

    finished: int
    running: int
    pending: int
    scheduled: int
    elapsed: float

    @property
    def complete(self) -> bool:
        """True when every task that was running or waiting has finished."""
        return self.running == 0 and self.pending == 0

    def __str__(self) -> str:
        return ("%d task(s) finished, %d still running, %d still waiting, "
                "%d delayed task(s) not due, in %.2fs"
                % (self.finished, self.running, self.pending, self.scheduled, self.elapsed))


def _now() -> datetime.datetime:
    return datetime.datetime.now(_UTC)


_flask_var: Any = None  # Flask's app-context ContextVar, once seen


def _flask_app() -> Any:
    """The Flask app whose context the caller is in, or None; never imports Flask."""
    # Flask keeps the app context in a ContextVar named "flask.app_ctx". Finding it in
    # the caller's context, rather than importing flask, keeps scripts that never
    # use Flask from paying for its import.
    global _flask_var
    var = _flask_var
    if var is None:
        ctx = contextvars.copy_context()
        if not len(ctx):
            return None
        var = next((v for v in ctx if v.name == "flask.app_ctx"), None)
        if var is None:
            return None
        _flask_var = var
    app_ctx = var.get(None)
    return app_ctx.app if app_ctx is not None else None


class Runner(TaskEngine):
    """Runs tasks in greenlets with bounded concurrency, waiting queue and kept results."""

    def __init__(self, max_concurrency: int = 100, max_pending: int = 10000, result_ttl: float = 3600,
                 max_results: int = 10000, eager: bool = False, store: Optional[Store] = None,
                 mode: str = "auto"):
        if mode not in MODES:
            raise ConfigError("mode must be one of %s, got %r" % (", ".join(MODES), mode))
        super().__init__(store if store is not None else MemoryStore())
        self.max_pending = 10000
        self.result_ttl = 3600.0
        self.max_results = 10000
        self.eager = False
        self._taskhub = TaskHub(mode, self._at_exit)
        self._batchers: Dict[Any, Any] = {}
        self._closed = False
        self._options: Dict[str, Dict[str, Any]] = {}   # task id -> apply_async options, until recorded
        #: The app whose context tasks claimed from a shared store run in (the server's Flask app).
        self.app: Any = None
        self.configure(max_concurrency=max_concurrency, max_pending=max_pending,
                       result_ttl=result_ttl, max_results=max_results, eager=eager)

    @property
    def mode(self) -> str:
        """Where tasks run: "auto", "current" or "thread" (see ``configure(hub=...)``)."""
        return self._taskhub.mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self._taskhub.mode = mode

    # -- configuration and counters -----------------------------------------

    def configure(self, max_concurrency: Optional[int] = None, max_pending: Optional[int] = None,
                  result_ttl: Optional[float] = None, max_results: Optional[int] = None,
                  eager: Optional[bool] = None, hub: Optional[str] = None) -> "Runner":
        """Change limits in place (None keeps a value); returns the runner.

        ``hub`` picks where tasks run, before the first spawn: "auto" (the default),
        "current" (the spawning thread's gevent hub) or "thread" (a daemon thread of its own).
        """
        if hub is not None:
            if hub not in MODES:
                raise ConfigError("hub must be one of %s, got %r" % (", ".join(MODES), hub))
            if self._taskhub.hub is not None and hub != self.mode:
                raise ConfigError("hub=%r: the runner already runs tasks (mode %r); set it before the "
                                  "first spawn" % (hub, self.mode))
            self.mode = hub
        if max_concurrency is not None:
            self.max_concurrency = check_number("max_concurrency", max_concurrency, 1)
        if max_pending is not None:
            self.max_pending = check_number("max_pending", max_pending, 0)
        if result_ttl is not None:
            self.result_ttl = check_number("result_ttl", result_ttl, 0, float)
        if max_results is not None:
            self.max_results = check_number("max_results", max_results, 0)
        if eager is not None:
            self.eager = bool(eager)
        for target in (self.store, getattr(self.store, "memory", None)):
            if isinstance(target, MemoryStore):
                target.result_ttl, target.max_results = self.result_ttl, self.max_results
        if hasattr(self.store, "result_ttl"):
            self.store.result_ttl = self.result_ttl
        thread = self._taskhub.thread
        if thread is not None and thread == real_ident():
            self._dispatch()
        return self

    def use_store(self, store: Store) -> None:
        """Record tasks in ``store`` from now on (the journal); its unfinished rows are not replayed here."""
        self.store = store
        self.configure()

    @property
    def running(self) -> int:
        """Number of task greenlets started and not finished."""
        return len(self._running)

    @property
    def pending(self) -> int:
        """Number of tasks waiting for a slot (idle tasks included)."""
        return self._pending_count

    @property
    def scheduled(self) -> int:
        """Number of delayed tasks (spawn_later/spawn_at/retry backoff) not due yet."""
        return self._scheduled_count

    @property
    def slots_in_use(self) -> int:
        """Slots held right now (a task blocked in ``get()`` lends its slot out)."""
        return self._active

    def stats(self) -> dict:
        """Counters as a dict for metrics and the dashboard."""
        return {"running": self.running, "pending": self.pending, "scheduled": self.scheduled,
                "results": len(self.store), "max_concurrency": self.max_concurrency,
                "max_pending": self.max_pending}

    def snapshot(self, limit: int = 50) -> Dict[str, List[TaskResult]]:
        """Up to ``limit`` running, waiting, delayed (soonest first) and recent (newest first) tasks."""
        waiting = [r for r in list(self._pending) + list(self._idle_q) if r._where in ("pending", "idle")]
        scheduled = [e[-1] for e in heapq.nsmallest(limit, self._heap) if e[-1]._where == "scheduled"]
        recent = self.store.recent(limit)
        return {"running": list(self._running.values())[:limit], "pending": waiting[:limit],
                "scheduled": scheduled, "recent": recent}

    # -- the task hub -----------------------------------------------------------

    @property
    def threaded(self) -> bool:
        """True when tasks run on the runner's own daemon thread (outside the server)."""
        return self._taskhub.threaded

    def call(self, fn: Callable[..., Any], *args: Any, timeout: Optional[float] = None) -> Any:
        """Run ``fn(*args)`` in a greenlet on the task hub and return its value (from any thread)."""
        return self._taskhub.call(fn, *args, timeout=timeout)

    def _at_exit(self) -> None:
        # Interpreter exit outside the server: give what was spawned a short drain, so
        # `r = t.delay(); sys.exit()` still runs the task (the journal keeps the rest).
        if not self._taskhub.threaded or self._closed:
            return
        try:
            # Spawns handed over just before exit may not be accepted yet; the drain is queued
            # behind them on the same hub, so it sees them.
            self.call(self.drain, EXIT_DRAIN, timeout=EXIT_DRAIN + 5)
        except Exception:
            log.exception("task drain at exit failed")

    # -- spawning -------------------------------------------------------------

    def spawn(self, fn: Callable[..., Any], args: tuple = (), kwargs: Optional[dict] = None, *,
              name: Optional[str] = None, opts: Optional[TaskOptions] = None, delay: Optional[float] = None,
              eta: Optional[datetime.datetime] = None, idle: bool = False, force: bool = False,
              on_done: Optional[Callable[[TaskResult], None]] = None, task_id: Optional[str] = None,
              retries: int = 0, serializer: Optional[str] = None,
              options: Optional[Dict[str, Any]] = None) -> TaskResult:
        """Accept ``fn(*args, **kwargs)`` as a task and return its TaskResult at once.

        ``force`` skips the max_pending check (work already accepted in another
        form, such as a batch); ``on_done(result)`` runs when it is ready.
        ``serializer`` (set for ``@task`` functions) lets a durable store record
        the task; ``task_id`` and ``retries`` restore a task read back from one.
        ``options`` (queue, idempotency_key, connection) go to a shared store.
        """
        if self._closed:
            raise GreenqueueError("this task runner was reset; use greenqueue.tasks.get_runner()")
        r: TaskResult[Any] = TaskResult(self, task_id or new_id(), name or callable_name(fn), fn, args,
                                        kwargs or {}, opts or NO_OPTIONS, _flask_app(), idle)
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
        if serializer is not None and self.store.durable:
            r._serializer = serializer
            if options and getattr(self.store, "clustered", False):
                self._options[r.id] = options
        taskhub = self._taskhub
        if real_ident() != taskhub.thread and not taskhub.on_hub():
            return self._accept_from_thread(r, delay, force)
        return self._accept(r, delay, force)

    def _accept(self, r: TaskResult, delay: Optional[float], force: bool) -> TaskResult:
        if r.state == SCHEDULED:
            r = self._record(r)
            if r._where is None:
                self._schedule(r, delay)
            return r
        if not force and self._pending_count >= self.max_pending and (
                r._idle or self._pending or self._active >= self.max_concurrency):
            raise Overloaded("%d tasks are already waiting (max_pending=%d); try again later, or raise "
                             "max_pending with greenqueue.configure()" % (self._pending_count, self.max_pending))
        r = self._record(r)
        if r._where is None:
            self._enqueue(r)
        return r

    def _accept_from_thread(self, r: TaskResult, delay: Optional[float], force: bool) -> TaskResult:
        # The caller is on another thread (a Werkzeug request thread, a script's main
        # thread): the runner's state is the task hub's, so hand the spawn over.
        if r._serializer is None:
            # Nothing to commit: the caller need not wait for the hub to take it.
            if not force and self._pending_count >= self.max_pending:
                raise Overloaded("%d tasks are already waiting (max_pending=%d); try again later"
                                 % (self._pending_count, self.max_pending))
            self._taskhub.hand_over(self._accept_quietly, r, delay)
            return r
        return self.call(self._accept, r, delay, force)

    def _accept_quietly(self, r: TaskResult, delay: Optional[float]) -> None:
        try:
            self._accept(r, delay, True)
        except Exception as exc:
            log.exception("task %s[%s] could not be accepted", r.name, r.id)
            r._set(FAILURE, exc=exc)

    def _record(self, r: TaskResult) -> TaskResult:
        """Record a new task in the store; returns the handle to give the caller."""
        if r._serializer is not None:
            if getattr(self.store, "clustered", False):
                return self._record_shared(r)
            # A durable spawn returns only once its row is committed; if that fails the
            # caller gets the JournalError and the task never existed.
            self.store.spawned(r, r._args, r._kwargs, r._serializer)
        self._live[r.id] = r
        if _subscribers:
            events.notify(events.TaskSpawned(r))
        return r

    def _record_shared(self, r: TaskResult) -> TaskResult:
        # A node that has a free slot runs what it spawns (no round trip through the
        # queue); anything else waits in the shared store for whichever node is free.
        store = self.store
        opts = self._options.pop(r.id, None) or {}
        queue = opts.get("queue") or "default"
        claim = (r.state != SCHEDULED and not r._idle and opts.get("connection") is None
                 and self._active < self.max_concurrency and not self._pending and store.serves(queue))
        row = store.spawned(r, r._args, r._kwargs, r._serializer, claim=claim, queue=queue,
                            max_attempts=r._opts.retries + 1, idempotency_key=opts.get("idempotency_key"),
                            connection=opts.get("connection"))
        if row.id != r.id:
            # The idempotency key was used before: hand back the first task's result.
            return self.result(row.id) or self.handle(row)
        if store.holds(r.id):
            self._live[r.id] = r
        else:
            r._where = "store"
            r.state = row.state if row.state in (PENDING, SCHEDULED) else PENDING
            self._elsewhere[r.id] = r
        if _subscribers:
            events.notify(events.TaskSpawned(r))
        return r

    def handle(self, row: TaskRow) -> TaskResult:
        """A TaskResult for a row of a shared store: final now, or updated when it finishes elsewhere."""
        if row.state in READY_STATES:
            return TaskResult.restored(self, row)
        r = self._live.get(row.id) or self._elsewhere.get(row.id)
        if r is None:
            r = TaskResult(self, row.id, row.name, None, (), {}, NO_OPTIONS, None)
            r.state = row.state if row.state in (PENDING, SCHEDULED, STARTED, RETRY) else PENDING
            r.retries = max(0, row.attempts - 1)
            r._where = "store"
            self._elsewhere[r.id] = r
        return r

    def elsewhere(self, waited_only: bool = False) -> List[TaskResult]:
        """Unfinished handles held in this process for tasks that wait or run elsewhere."""
        handles = [r for r in list(self._elsewhere.values()) if r.state not in READY_STATES]
        if waited_only:
            handles = [r for r in handles if r._done is not None or r._twaiters or r._callbacks]
        return handles

    def settle(self, r: TaskResult, row: TaskRow) -> None:
        """Finish a handle whose task ended elsewhere, from its row."""
        if r.state in READY_STATES or row.state not in READY_STATES:
            if row.state in (STARTED, RETRY, SCHEDULED, PENDING) and r.state not in READY_STATES:
                r.state = row.state
            return
        done = TaskResult.restored(self, row)
        r.retries = done.retries
        r._started_ts, r._finished_ts = row.started_at, row.finished_at
        r._where = None
        self._elsewhere.pop(r.id, None)
        r._set(done.state, done.result, done.exception, done.traceback)
        if _subscribers:
            if done.state == SUCCESS:
                events.notify(events.TaskSucceeded(r, duration=0.0))
            elif done.state == FAILURE:
                events.notify(events.TaskFailed(r, exception=r.exception, duration=0.0))
            else:
                events.notify(events.TaskCancelled(r))

    def free_slots(self) -> int:
        """Slots free for claimed work: nothing waits locally and fewer than max_concurrency run."""
        return max(0, self.max_concurrency - self._active - self._pending_count)

    def run_row(self, row: TaskRow, t: Any) -> TaskResult:
        """Start a row this node claimed, as task ``t``, in a free slot."""
        from ..journal import loads
        data = loads(row.serializer, row.payload)
        r = self._live.get(row.id) or self._elsewhere.pop(row.id, None)
        if r is not None:
            self._live[r.id] = r
        if r is None or r.state in READY_STATES:
            r = TaskResult(self, row.id, t.name, t.fn, tuple(data["args"]), data["kwargs"], t.opts, self.app)
            self._live[r.id] = r
        else:
            # A handle this process made when it spawned the task without a free slot.
            r._fn, r._args, r._kwargs, r._opts = t.fn, tuple(data["args"]), data["kwargs"], t.opts
            r._app = r._app or self.app
        r.retries = max(0, row.attempts - 1)
        r._serializer = row.serializer
        r.eta = None if row.eta is None else datetime.datetime.fromtimestamp(row.eta, _UTC)
        r.state = PENDING
        r._where = None
        self._start(r)
        return r

    def abandon(self, r: TaskResult) -> None:
        """Stop running ``r`` here without a result: its lease went to another node."""
        g = r._greenlet
        r._where = "store"
        r.state = PENDING
        self._live.pop(r.id, None)
        self._elsewhere[r.id] = r
        if g is not None and not g.dead and g is not gevent.getcurrent():
            g.kill(block=False)

    # -- used by TaskResult and batches -------------------------------------------------

    def on_hub_thread(self) -> bool:
        """True when the caller runs on the task hub's thread (or no hub is bound yet)."""
        return self._taskhub.on_hub_thread()

    def track(self, r: TaskResult) -> None:
        """Hold an unfinished result made elsewhere (a batch item) so lookups and cancel find it."""
        self._live[r.id] = r
        if _subscribers:
            events.notify(events.TaskSpawned(r))

    def mark_started(self, r: TaskResult, ts: float) -> None:
        """Mark a tracked result STARTED at wall-clock ``ts`` (batch items when their batch runs)."""
        r.state = STARTED
        r._started_ts = ts

    def finish(self, r: TaskResult, state: str, value: Any = None, exc: Optional[BaseException] = None,
               duration: Optional[float] = None, tb: Optional[str] = None) -> None:
        """Make a tracked result final (batch items mirror their batch)."""
        self._finish(r, state, value, exc, duration, tb)

    def cancel(self, r: TaskResult) -> bool:
        """Cancel ``r``: drop it if waiting or delayed, kill its greenlet if running."""
        if not self.on_hub_thread():
            return self.call(self.cancel, r)
        where = r._where
        if r.state in READY_STATES:
            return False
        if where == "store":
            before = self.store.cancel(r.id)
            if before in (PENDING, SCHEDULED, RETRY):
                r._where = None
                self._elsewhere.pop(r.id, None)
                self._finish(r, CANCELLED, exc=CancelledError("task %s[%s] was cancelled" % (r.name, r.id)))
                return True
            return before == STARTED  # the node running it stops it at its next heartbeat
        if where in ("pending", "idle"):
            self._pending_count -= 1
        elif where == "scheduled":
            self._scheduled_count -= 1
        g = r._greenlet
        self._finish(r, CANCELLED, exc=CancelledError("task %s[%s] was cancelled" % (r.name, r.id)))
        if g is not None and not g.dead and g is not gevent.getcurrent():
            g.kill(block=False)
        return True

    def batcher(self, key: Any, make: Callable[[], Any]) -> Any:
        """The batch collector for ``key`` (a batch task), made by ``make()`` on first use."""
        b = self._batchers.get(key)
        if b is None:
            b = self._batchers[key] = make()
        return b

    # -- results, restarts ----------------------------------------------------------------

    def result(self, task_id: str) -> Optional[TaskResult]:
        """The TaskResult with this id, or None if unknown or expired (asks the store too)."""
        r = self._live.get(task_id) or self._elsewhere.get(task_id)
        if r is not None:
            return r
        found = self.store.lookup(task_id) if self.on_hub_thread() else self.call(self.store.lookup, task_id)
        if isinstance(found, TaskRow):
            if found.state in READY_STATES:
                return TaskResult.restored(self, found)
            return self.handle(found) if self.on_hub_thread() else self.call(self.handle, found)
        return found

    # -- shutdown ---------------------------------------------------------------------------

    def drain(self, timeout: Optional[float] = None) -> DrainReport:
        """Wait up to ``timeout`` s for the tasks running or waiting now; report what is left."""
        if not self.on_hub_thread():
            return self.call(self.drain, timeout)
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

    def kill(self, timeout: float = 1.0) -> None:
        """Cancel every waiting, delayed and running task, and stop the helper greenlets."""
        if not self.on_hub_thread():
            if self._taskhub.hub is not None and self._taskhub.threaded:
                try:
                    self.call(self.kill, timeout, timeout=timeout + 5)
                except Exception:
                    log.exception("stopping the task thread failed")
            return
        self._closed = True
        for r in list(self._live.values()):
            if r.state not in READY_STATES:
                self.cancel(r)
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
        self._taskhub.stop()  # our own task thread ends once this greenlet returns

    def forget_after_fork(self) -> None:
        """Drop everything without touching the hub (the child of a fork has neither thread nor tasks)."""
        self._closed = True
        self._taskhub.forget()


_default: Optional[Runner] = None


def get_runner() -> Runner:
    """The default runner that @task and the module-level spawn functions use."""
    global _default
    if _default is None:
        _default = Runner()
    return _default


def reset() -> None:
    """Kill the default runner's tasks and start a fresh one (the task registry is reset by the caller)."""
    global _default
    old, _default = _default, None
    if old is not None:
        old.kill()
        old.store.close()


def _after_fork_in_child() -> None:
    # A forked child (a gipc worker, a --workers process) must not share the parent's
    # runner: its task thread does not exist here and its results are the parent's.
    global _default
    old, _default = _default, None
    if old is not None:
        old.forget_after_fork()


import os as _os  # noqa: E402  (only for the fork hook below)

_os.register_at_fork(after_in_child=_after_fork_in_child)
