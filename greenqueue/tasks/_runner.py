"""The task runner: accepts tasks, records them in the store, and answers for them until they finish.

Concurrency model: the runner lives on one gevent hub, the *task hub*
(``_hub.TaskHub`` picks it at the first spawn: the server's main-thread hub,
the spawning thread's hub, or a daemon thread of the runner's own outside
the server). Slots, waiting lines, the delay heap and the task greenlets are
the engine's (``_engine.TaskEngine``, a part the runner holds, over records
of its own: ``Entry``); one attempt is ``_attempt.run``; finished results
are kept in ``_kept.KeptResults``. This module adds spawning, the rows a
store gives this node, handles of tasks that run elsewhere, cancel,
lookups, drain and kill.

All runner state is touched on the task hub's thread only. A spawn, cancel
or drain from another thread is handed over with
``loop.run_callback_threadsafe`` and the calling thread waits on a plain
lock (never the task hub). Spawning never blocks the hub: it raises
Overloaded instead; a durable spawn waits, in its own greenlet (or thread),
for the store's commit. The store (``greenqueue.journal.Store``) is told
about every transition through its methods; it never calls back. A forked
child drops the parent's default runner (its task thread does not exist there).
"""

import datetime
import json
import logging
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import gevent

from .. import events
from ..errors import CancelledError, ConfigError, GreenqueueError, Overloaded
from .._default import Default
from ..journal import MemoryStore, Store, TaskRow, loads, new_row
from ._attempt import finish as finish_attempt
from ._attempt import run as run_attempt
from ._attempt import run_eager
from ._engine import ABANDONED, DELAYED, Entry, TaskEngine
from ._followed import Followed
from ._hub import MODES, TaskHub, real_ident
from ._kept import KeptResults
from ._limits import limits_of, with_buckets
from ._options import (NO_OPTIONS, DrainReport, TaskOptions, callable_name, check_number, check_priority, flask_app,
                       new_id)
from ._result import (CANCELLED, FAILURE, PENDING, READY_STATES, RETRY, SCHEDULED, STARTED, TaskResult,
                      mark_started, resolve)
from ._workflow import TAKES_ID, Step, Workflows

log = logging.getLogger(__name__)

__all__ = ["Runner", "DrainReport", "TaskOptions", "get_runner", "reset"]

_UTC = datetime.timezone.utc
# A spawn of a task without limits: no bucket to compute or store.
_NO_LIMITS = (None, None)
_monotonic = time.monotonic
_time = time.time
_subscribers = events.subscribers

#: Seconds a process outside the server waits at exit for tasks still running or waiting.
EXIT_DRAIN = 5.0


def _start_by(name: str, expires: Any) -> float:
    """The wall-clock time a spawn must start by: ``expires`` seconds from now, or an (aware) datetime."""
    if isinstance(expires, datetime.datetime):
        return (expires if expires.tzinfo is not None else expires.replace(tzinfo=_UTC)).timestamp()
    if isinstance(expires, datetime.timedelta):
        expires = expires.total_seconds()
    return _time() + check_number("%s: expires" % name, expires, 0, float)


def _now() -> datetime.datetime:
    return datetime.datetime.now(_UTC)


class Runner:
    """Runs tasks in greenlets with bounded concurrency, a waiting line and kept results; records them in a store."""

    def __init__(self, max_concurrency: int = 100, max_pending: int = 10000, result_ttl: float = 3600,
                 max_results: int = 10000, eager: bool = False, store: Optional[Store] = None,
                 mode: str = "auto") -> None:
        if mode not in MODES:
            raise ConfigError("mode must be one of %s, got %r" % (", ".join(MODES), mode))
        #: Slots, waiting lines and the delay heap: the part that decides when an attempt starts.
        self.engine = TaskEngine(self._run_attempt)
        #: Where tasks are recorded: the memory store, or the journal once one is open.
        self.store: Store = store if store is not None else MemoryStore()
        #: Results of tasks finished in this process, for ``result(id)`` and the dashboard.
        self.kept = KeptResults()
        self.max_pending = 10000
        self.eager = False
        self._taskhub = TaskHub(mode, self._at_exit)
        self._batchers: Dict[Any, Any] = {}
        self._closed = False
        self._live: Dict[str, Entry] = {}           # id -> entry of an unfinished task held here
        #: Handles of tasks queued in (or running from) the store, not here.
        self.followed = Followed(self)
        #: Workflow steps waiting for their parents, when no durable store holds them.
        self.workflows = Workflows(self._start_step, self.kept.keep)
        #: The app whose context tasks claimed from a shared store run in (the server's Flask app).
        self.app: Any = None
        #: Results of tasks running inline now (eager mode), innermost last: what ``current()`` answers there.
        self.eager_running: List[TaskResult[Any]] = []
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

    @property
    def max_concurrency(self) -> int:
        """Task greenlets that may hold a slot at once."""
        return self.engine.max_concurrency

    @property
    def result_ttl(self) -> float:
        """Seconds a finished result is kept."""
        return self.kept.result_ttl

    @property
    def max_results(self) -> int:
        """Finished results kept in this process at most."""
        return self.kept.max_results

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
            self.engine.max_concurrency = check_number("max_concurrency", max_concurrency, 1)
        if max_pending is not None:
            self.max_pending = check_number("max_pending", max_pending, 0)
        if result_ttl is not None:
            self.kept.result_ttl = check_number("result_ttl", result_ttl, 0, float)
        if max_results is not None:
            self.kept.max_results = check_number("max_results", max_results, 0)
        if eager is not None:
            self.eager = bool(eager)
        self.store.configure(self.kept.result_ttl)
        thread = self._taskhub.thread
        if thread is not None and thread == real_ident():
            self.engine.dispatch()
        return self

    def use_store(self, store: Store) -> None:
        """Record tasks in ``store`` from now on (the journal, or the memory store again)."""
        if self.store.durable:
            # The closed journal's rows are the truth now (another process may requeue them):
            # results kept from it would answer for rows that have moved on.
            self.kept.clear()
        self.store = store
        self.configure()

    @property
    def running(self) -> int:
        """Number of task greenlets started and not finished."""
        return self.engine.running

    @property
    def pending(self) -> int:
        """Number of tasks waiting for a slot (idle tasks included) or for a run of their concurrency key to end."""
        return self.engine.pending_count + self.engine.limited_count

    @property
    def scheduled(self) -> int:
        """Number of delayed tasks (spawn_later/spawn_at/retry backoff) held here and not due yet."""
        return self.engine.scheduled_count

    @property
    def slots_in_use(self) -> int:
        """Slots held right now (a task blocked in ``get()`` lends its slot out)."""
        return self.engine.active

    def stats(self) -> dict:
        """Counters as a dict for metrics and the dashboard."""
        return {"running": self.running, "pending": self.pending, "scheduled": self.scheduled,
                "results": len(self.kept), "max_concurrency": self.max_concurrency,
                "max_pending": self.max_pending}

    def snapshot(self, limit: int = 50) -> Dict[str, List[TaskResult[Any]]]:
        """Up to ``limit`` running, waiting, delayed (soonest first) and recent (newest first) tasks held here."""
        engine = self.engine
        return {"running": [e.handle for e in engine.running_entries()[:limit]],
                "pending": [e.handle for e in engine.waiting_entries()[:limit]],
                "scheduled": [e.handle for e in engine.delayed_entries(limit)],
                "recent": self.kept.recent(limit)}

    def limits(self) -> List[Tuple[str, str, Optional[int], int, int]]:
        """(kind, bucket, limit, in use, waiting) per bucket of the limits this process judges (no journal)."""
        return self.engine.gate.stats()

    def waits(self, limit: int = 50) -> Dict[str, str]:
        """Why each waiting or delayed task held here waits: slot, priority, eta, rate limit, concurrency limit."""
        return {e.handle.id: reason for e, reason in self.engine.waiting_reasons(limit)}

    # -- the task hub -----------------------------------------------------------

    @property
    def threaded(self) -> bool:
        """True when tasks run on the runner's own daemon thread (outside the server)."""
        return self._taskhub.threaded

    def call(self, fn: Callable[..., Any], *args: Any, timeout: Optional[float] = None) -> Any:
        """Run ``fn(*args)`` in a greenlet on the task hub and return its value (from any thread)."""
        return self._taskhub.call(fn, *args, timeout=timeout)

    def on_hub_thread(self) -> bool:
        """True when the caller runs on the task hub's thread (or no hub is bound yet)."""
        return self._taskhub.on_hub_thread()

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

    # -- slots, for TaskResult.wait() ----------------------------------------------------

    def current(self) -> Optional[TaskResult[Any]]:
        """The TaskResult running in the calling greenlet (None outside a task)."""
        e = self.engine.current()
        if e is not None:
            return e.handle
        return self.eager_running[-1] if self.eager_running else None

    def lend_slot(self, waiting_on: TaskResult[Any]) -> Optional[Entry]:
        """Free the calling task's slot while it waits on ``waiting_on`` (None: not a task holding one)."""
        return self.engine.lend_slot(waiting_on)

    def take_slot_back(self, lent: Entry) -> None:
        """Give back the slot ``lend_slot`` freed."""
        self.engine.take_slot_back(lent)

    # -- spawning -------------------------------------------------------------

    def spawn(self, fn: Callable[..., Any], args: tuple = (), kwargs: Optional[dict] = None, *,
              name: Optional[str] = None, opts: Optional[TaskOptions] = None, delay: Optional[float] = None,
              eta: Optional[datetime.datetime] = None, idle: bool = False, force: bool = False,
              on_done: Optional[Callable[[TaskResult[Any]], None]] = None, task_id: Optional[str] = None,
              retries: int = 0, serializer: Optional[str] = None,
              options: Optional[Dict[str, Any]] = None, handle: Optional[TaskResult[Any]] = None) -> TaskResult[Any]:
        """Accept ``fn(*args, **kwargs)`` as a task and return its TaskResult at once.

        ``force`` skips the max_pending check (work already accepted in another
        form, such as a batch); ``on_done(result)`` runs when it is ready.
        ``serializer`` (set for ``@task`` functions) lets a durable store record
        the task; ``task_id`` and ``retries`` restore a task read back from one.
        ``options`` (queue, idempotency_key, connection) go to the store, which says
        whether it can honour them.
        """
        if self._closed:
            raise GreenqueueError("this task runner was reset; use greenqueue.tasks.get_runner()")
        r: TaskResult[Any] = handle if handle is not None else TaskResult(self, task_id or new_id(),
                                                                           name or callable_name(fn))
        r.retries = retries
        e = Entry(r, fn, args, kwargs or {}, opts or NO_OPTIONS, flask_app(), idle)
        if on_done is not None:
            r.add_done_callback(on_done)
        if eta is not None:
            if eta.tzinfo is None:
                eta = eta.replace(tzinfo=_UTC)  # naive means UTC (DESIGN.md)
            delay = (eta - _now()).total_seconds()
            r.eta = eta
        elif delay is not None:
            r.eta = _now() + datetime.timedelta(seconds=delay)
        expires = e.opts.expires
        if options and ("expires" in options or "priority" in options):
            options = dict(options)
            expires = options.pop("expires", expires)
            if "priority" in options:
                priority = check_priority("%s: priority" % r.name, options.pop("priority"))
                if priority != e.opts.priority:
                    e.opts = replace(e.opts, priority=priority)
        if expires is not None:
            e.opts = replace(e.opts, start_by=_start_by(r.name, expires))
        if e.opts.limited:
            e.opts = with_buckets(r.name, e.opts, args, e.kwargs)
        if options:
            # Before eager mode too: a test must fail on an option the store would refuse.
            self.store.check_options(r.name, options)
        if self.eager:
            run_eager(self, e)
            return r
        if delay is not None and delay > 0:
            r.state = SCHEDULED
        if options:
            queue = options.get("queue") or "default"
            if queue != e.opts.queue:
                e.opts = replace(e.opts, queue=queue)  # this spawn's own queue (apply_async)
        if serializer is not None and self.store.durable:
            e.serializer = serializer
        taskhub = self._taskhub
        if real_ident() != taskhub.thread and not taskhub.on_hub():
            return self._accept_from_thread(e, delay, force, options)
        return self._accept(e, delay, force, options)

    def _overloaded(self) -> Overloaded:
        return Overloaded("%d tasks are already waiting (max_pending=%d); try again later, or raise "
                          "max_pending with greenqueue.configure()" % (self.engine.pending_count, self.max_pending))

    def _accept(self, e: Entry, delay: Optional[float], force: bool,
                options: Optional[Dict[str, Any]] = None) -> TaskResult[Any]:
        r = e.handle
        engine = self.engine
        scheduled = r.state == SCHEDULED
        if not scheduled and not force and engine.pending_count >= self.max_pending and (e.idle or engine.busy()):
            raise self._overloaded()
        if e.serializer is not None:
            # A durable spawn returns only once its row is committed; if that fails the
            # caller gets the JournalError and the task never existed.
            elsewhere = self._record(e, options or {})
            if elsewhere is not None:
                return elsewhere
        self._live[r.id] = e
        if _subscribers:
            events.notify(events.TaskSpawned(r))
        if scheduled:
            engine.schedule(e, delay)
        else:
            engine.enqueue(e)
        return r

    def _accept_from_thread(self, e: Entry, delay: Optional[float], force: bool,
                            options: Optional[Dict[str, Any]]) -> TaskResult[Any]:
        # The caller is on another thread (a Werkzeug request thread, a script's main
        # thread): the runner's state is the task hub's, so hand the spawn over.
        if e.serializer is None:
            # Nothing to commit: the caller need not wait for the hub to take it.
            if not force and self.engine.pending_count >= self.max_pending:
                raise self._overloaded()
            self._taskhub.hand_over(self._accept_quietly, e, delay)
            return e.handle
        return self.call(self._accept, e, delay, force, options)

    def _accept_quietly(self, e: Entry, delay: Optional[float]) -> None:
        try:
            self._accept(e, delay, True)
        except Exception as exc:
            log.exception("task %s[%s] could not be accepted", e.handle.name, e.handle.id)
            resolve(e.handle, FAILURE, exc=exc)

    def _record(self, e: Entry, options: Dict[str, Any]) -> Optional[TaskResult[Any]]:
        """Write a new task's row; the handle to give the caller when the task is not held here, else None."""
        # A node that has a free slot runs what it spawns (no round trip through the
        # queue); anything else waits in the store for whichever node is free.
        r = e.handle
        store = self.store
        connection = options.get("connection")
        row = new_row(r.id, r.name, e.args, e.kwargs, e.serializer or "json", e.opts.queue, r.eta, r.retries,
                      e.opts.retries + 1, options.get("idempotency_key"), e.opts.start_by, e.opts.priority,
                      *(limits_of(e.opts) if e.opts.limited else _NO_LIMITS))
        # A limited task is never claimed as it is spawned: the store's gate judges its limits.
        claim = (r.state != SCHEDULED and not e.idle and connection is None and self.engine.has_free_slot()
                 and store.serves(e.opts.queue) and not e.opts.limited)
        stored = store.spawned(row, claim=claim, connection=connection)
        if stored.id != row.id:
            # The idempotency key was used before: hand back the first task's result.
            return self.result(stored.id) or self.handle(stored)
        if stored.owner == store.node:
            return None
        r.state = stored.state if stored.state in (PENDING, SCHEDULED) else PENDING
        self.followed.add(r)
        if _subscribers:
            events.notify(events.TaskSpawned(r))
        return r

    def spawn_rows(self, rows: Sequence[TaskRow], t: Any) -> List[TaskResult[Any]]:
        """Record rows of task ``t`` in one commit (``task.map``); hold those the store gives this node."""
        if not self.on_hub_thread():
            return self.call(self.spawn_rows, rows, t)
        return [self.adopt(row, t) for row in self.store.spawned_many(rows)]

    def adopt(self, row: TaskRow, t: Any, announce: bool = False) -> TaskResult[Any]:
        """Hold a row the store gave this node (claimed, or fired here) as task ``t``; follow any other row.

        ``announce`` publishes TaskSpawned (a scheduler's run); a claimed row was announced where it was spawned.
        """
        if row.owner != self.store.node:
            r = self.handle(row)
        else:
            r = self._hold(row, t)
        if announce and _subscribers:
            events.notify(events.TaskSpawned(r))
        return r

    def _hold(self, row: TaskRow, t: Any) -> TaskResult[Any]:
        held = self._live.get(row.id)
        if held is not None:
            return held.handle
        data = loads(row.serializer, row.payload)
        r = self.followed.pop(row.id)  # a handle this process made when it spawned the task
        if r is None or r.state in READY_STATES:
            r = TaskResult(self, row.id, t.name)
        r.retries = max(0, row.attempts - 1)
        r.eta = None if row.eta is None else datetime.datetime.fromtimestamp(row.eta, _UTC)
        e = Entry(r, t.target, tuple(data["args"]), data["kwargs"], t.opts, self.app)
        if row.queue != e.opts.queue or row.start_by != e.opts.start_by or row.priority != e.opts.priority:
            e.opts = replace(e.opts, queue=row.queue, start_by=row.start_by, priority=row.priority)
        if e.opts.limited:
            # The buckets this run counts in (a store's gate judged a claimed row; the memory store's
            # rows, a scheduler's runs, meet this process's gate).
            e.opts = replace(e.opts, rate_bucket=row.rate_bucket, limit_bucket=row.limit_bucket)
        if self.store.durable:
            e.serializer = row.serializer
        self._live[r.id] = e
        delay = None if row.eta is None else row.eta - _time()
        if delay is not None and delay > 0:
            r.state = SCHEDULED
            self.engine.schedule(e, delay)
        else:
            r.state = PENDING
            self.engine.enqueue(e)
        return r

    # -- tasks that run elsewhere ----------------------------------------------------------

    def handle(self, row: TaskRow) -> TaskResult[Any]:
        """A TaskResult for a row of the store: final now, or updated when it finishes elsewhere."""
        if row.state in READY_STATES:
            return TaskResult.restored(self, row)
        held = self._live.get(row.id)
        return held.handle if held is not None else self.followed.handle(row)

    def follow(self, task_id: str) -> TaskResult[Any]:
        """The TaskResult for ``task_id``; unknown yet, a PENDING one the store brings up to date if it appears."""
        if not self.on_hub_thread():
            followed: TaskResult[Any] = self.call(self.follow, task_id)
            return followed
        found = self.result(task_id)
        return found if found is not None else self.followed.unknown(task_id)

    def elsewhere(self, waited_only: bool = False) -> List[TaskResult[Any]]:
        """Unfinished handles held in this process for tasks that wait or run elsewhere."""
        return self.followed.unfinished(waited_only)

    def settle(self, r: TaskResult[Any], row: TaskRow) -> None:
        """Bring a handle whose task runs elsewhere up to date with its row; keep it once final."""
        if self.followed.settle(r, row):
            self.kept.keep(r)

    def follow_elsewhere(self, e: Entry) -> None:
        """The store took ``e`` over (a retry any node claims): keep only its handle, to follow it."""
        e.where = None
        self._live.pop(e.handle.id, None)
        self.followed.add(e.handle)

    def free_slots(self) -> int:
        """Slots free for claimed work: nothing waits locally and fewer than max_concurrency run."""
        return self.engine.free_slots()

    def abandon(self, task_id: str) -> Optional[TaskResult[Any]]:
        """Stop running ``task_id`` here without a result: its lease went to another node."""
        e = self._live.get(task_id)
        if e is None or e.handle.state in READY_STATES:
            return None
        g = self.engine.greenlet_of(e)
        self.engine.remove(e)
        e.handle.state = PENDING
        self.follow_elsewhere(e)
        e.where = ABANDONED
        if g is not None and not g.dead and g is not gevent.getcurrent():
            g.kill(block=False)
        return e.handle

    def unfinished_count(self, name: str) -> int:
        """Runs of task ``name`` not finished yet: the store counts what it records, this runner the rest."""
        here = sum(1 for e in self._live.values()
                   if e.serializer is None and e.handle.name == name and e.handle.state not in READY_STATES)
        return here + self.store.count_unfinished(name)

    # -- attempts ---------------------------------------------------------------------------

    def _run_attempt(self, e: Entry) -> None:
        run_attempt(self, e)

    def settled(self, e: Entry) -> None:
        """``e`` reached its final state: stop holding it and keep its result, and give its children their turn."""
        self._live.pop(e.handle.id, None)
        self.kept.keep(e.handle)
        if self.workflows.watches(e.handle.id):
            self.workflows.ended(e.handle, self.result)

    # -- workflows -------------------------------------------------------------------

    def arguments(self, task_id: str) -> Optional[Tuple[tuple, dict]]:
        """The arguments a task was spawned with, while this process holds it or the store keeps its row."""
        if not self.on_hub_thread():
            found: Optional[Tuple[tuple, dict]] = self.call(self.arguments, task_id)
            return found
        e = self._live.get(task_id)
        if e is not None and e.fn is not None:
            return e.args, e.kwargs
        row = self.store.lookup(task_id)
        if row is None or not row.payload:
            return None
        data = loads(row.serializer, row.payload)
        return tuple(data.get("args", ())), dict(data.get("kwargs", {}))

    def group_members(self, group_id: str) -> Optional[List[str]]:
        """The member ids of the group ``group_id`` (None if unknown here and in the store)."""
        if not self.on_hub_thread():
            found: Optional[List[str]] = self.call(self.group_members, group_id)
            return found
        return self.workflows.groups.get(group_id) or self.store.group(group_id)

    def run_steps(self, steps: Sequence[Step], groups: Dict[str, List[str]]) -> Dict[str, TaskResult[Any]]:
        """Start a workflow's steps: those without parents now, the rest when their parents end; their handles."""
        if not self.on_hub_thread():
            started: Dict[str, TaskResult[Any]] = self.call(self.run_steps, steps, groups)
            return started
        handles: Dict[str, TaskResult[Any]] = {}
        if self.store.durable:
            # One commit: the steps without parents are claimable at once, the others wait in the
            # store, which releases each in the transaction that records its last parent's end.
            for row in self.store.spawned_workflow([self._step_row(step) for step in steps], groups):
                handles[row.id] = self.handle(row)
        for step in steps:
            r = handles.get(step.id)
            if r is None:
                r = handles[step.id] = TaskResult(self, step.id, step.sig.task.name)
            if len(step.parents) == 1 and step.takes != TAKES_ID:
                r.parent = handles.get(step.parents[0])
        if self.store.durable:
            return handles
        self.workflows.groups.update(groups)
        self.workflows.add(steps, handles)
        for step in steps:
            if step.root:
                self._start_step(step, handles[step.id], ())
        return handles

    def _step_row(self, step: Step) -> TaskRow:
        """The store row of a workflow step: its own arguments, what it waits for and who waits for it."""
        sig, t = step.sig, step.sig.task
        opts = sig.options
        countdown, eta = opts.get("countdown"), opts.get("eta")
        when: Optional[datetime.datetime] = None
        if not step.parents:
            when = eta if eta is not None else None if countdown is None else \
                _now() + datetime.timedelta(seconds=float(countdown))
            if when is not None and when.tzinfo is None:
                when = when.replace(tzinfo=_UTC)
        task_opts = t.opts
        if opts.get("priority") is not None:
            task_opts = replace(task_opts, priority=check_priority("%s: priority" % t.name, opts["priority"]))
        if task_opts.limited:
            task_opts = with_buckets(t.name, task_opts, sig.args, sig.kwargs)
        expires = opts.get("expires", task_opts.expires)
        rate, limit = limits_of(task_opts) if task_opts.limited else _NO_LIMITS
        row = new_row(step.id, t.name, sig.args, sig.kwargs, t.serializer, opts.get("queue") or t.queue, when,
                      max_attempts=task_opts.retries + 1, idempotency_key=opts.get("idempotency_key"),
                      start_by=None if expires is None else _start_by(t.name, expires), priority=task_opts.priority,
                      rate=rate, limit=limit)
        if step.parents:
            row.parents, row.waits, row.takes = json.dumps(step.parents), len(step.parents), step.takes
            delay = float(countdown) if countdown is not None else \
                max(0.0, (eta - _now()).total_seconds()) if eta is not None else 0.0
            row.wait = delay or None
        row.then_ids = json.dumps(step.then) if step.then else None
        row.error_ids = json.dumps(step.errors) if step.errors else None
        row.chord = step.chord
        return row

    def _start_step(self, step: Step, handle: TaskResult[Any], first: tuple) -> None:
        """Run a workflow step whose turn came, ``first`` in front of its own arguments."""
        sig = step.sig
        opts = dict(sig.options)
        delay, eta = opts.pop("countdown", None), opts.pop("eta", None)
        opts.pop("link", None), opts.pop("link_error", None)
        options = {k: v for k, v in opts.items() if v is not None}
        options.setdefault("queue", sig.task.queue)
        t = sig.task
        try:
            self.spawn(t.target, first + sig.args, dict(sig.kwargs), name=t.name, opts=t.opts, delay=delay,
                       eta=eta, force=True, serializer=t.serializer, options=options, handle=handle)
        except Exception as exc:
            # The step's turn came inside another task's end: its caller is gone, so it ends here.
            log.exception("task %s[%s]: the workflow step could not start", t.name, handle.id)
            resolve(handle, FAILURE, exc=exc)
            self.kept.keep(handle)

    # -- used by batches -------------------------------------------------

    def track(self, r: TaskResult[Any]) -> None:
        """Hold an unfinished result made elsewhere (a batch item) so lookups and cancel find it."""
        self._live[r.id] = Entry(r, None, (), {}, NO_OPTIONS)
        if _subscribers:
            events.notify(events.TaskSpawned(r))

    def mark_started(self, r: TaskResult[Any], ts: float) -> None:
        """Mark a tracked result STARTED at wall-clock ``ts`` (batch items when their batch runs)."""
        mark_started(r, ts)

    def finish(self, r: TaskResult[Any], state: str, value: Any = None, exc: Optional[BaseException] = None,
               duration: Optional[float] = None, tb: Optional[str] = None) -> None:
        """Make a tracked result final (batch items mirror their batch)."""
        e = self._live.get(r.id) or Entry(r, None, (), {}, NO_OPTIONS)
        finish_attempt(self, e, state, value, exc, duration, tb)

    def batcher(self, key: Any, make: Callable[[], Any]) -> Any:
        """The batch collector for ``key`` (a batch task), made by ``make()`` on first use."""
        b = self._batchers.get(key)
        if b is None:
            b = self._batchers[key] = make()
        return b

    # -- cancel and results --------------------------------------------------------------

    def cancel(self, r: TaskResult[Any]) -> bool:
        """Cancel ``r``: drop it if waiting or delayed, kill its greenlet if running, ask the store if elsewhere."""
        if not self.on_hub_thread():
            return bool(self.call(self.cancel, r))
        if r.state in READY_STATES:
            return False
        cancelled = CancelledError("task %s[%s] was cancelled" % (r.name, r.id))
        e = self._live.get(r.id)
        if e is None and self.workflows.cancel(r.id):
            return True
        if e is None:
            before = self.store.cancel(r.id)
            if before in (PENDING, SCHEDULED, RETRY):
                self.followed.pop(r.id)
                finish_attempt(self, Entry(r, None, (), {}, NO_OPTIONS), CANCELLED, exc=cancelled)
                return True
            return before == STARTED  # the node running it stops it at its next heartbeat
        g = self.engine.greenlet_of(e)
        self.engine.remove(e)
        finish_attempt(self, e, CANCELLED, exc=cancelled)
        if g is not None and not g.dead and g is not gevent.getcurrent():
            g.kill(block=False)
        return True

    def result(self, task_id: str) -> Optional[TaskResult[Any]]:
        """The TaskResult with this id, or None if unknown or expired (asks the store too)."""
        if not self.on_hub_thread():
            found: Optional[TaskResult[Any]] = self.call(self.result, task_id)
            return found
        e = self._live.get(task_id)
        if e is not None:
            return e.handle
        r = self.followed.get(task_id) or self.kept.lookup(task_id) or self.workflows.waiting(task_id)
        if r is not None:
            return r
        row = self.store.lookup(task_id)
        return None if row is None else self.handle(row)

    # -- shutdown ---------------------------------------------------------------------------

    def drain(self, timeout: Optional[float] = None) -> DrainReport:
        """Wait up to ``timeout`` s for the tasks running or waiting now; report what is left."""
        if not self.on_hub_thread():
            report: DrainReport = self.call(self.drain, timeout)
            return report
        t0 = _monotonic()
        for batcher in list(self._batchers.values()):
            batcher.flush()
        waiting = self.engine.running_entries() + self.engine.waiting_entries()
        deadline = None if timeout is None else t0 + timeout
        for e in waiting:
            left = None if deadline is None else deadline - _monotonic()
            if left is not None and left <= 0:
                break
            e.handle.wait(left)
        running = pending = finished = 0
        for e in waiting:
            state = e.handle.state
            if state in READY_STATES:
                finished += 1
            elif state == STARTED:
                running += 1
            elif e.where == DELAYED:
                continue  # a retry with backoff: counted with the delayed tasks
            else:
                pending += 1
        report = DrainReport(finished, running, pending, self.engine.scheduled_count, _monotonic() - t0)
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
        for e in list(self._live.values()):
            if e.handle.state not in READY_STATES:
                self.cancel(e.handle)
        self.engine.stop(timeout)
        self._batchers.clear()
        self._taskhub.stop()  # our own task thread ends once this greenlet returns

    def forget_after_fork(self) -> None:
        """Drop everything without touching the hub (the child of a fork has neither thread nor tasks)."""
        self._closed = True
        self._taskhub.forget()


_default: Default[Runner] = Default(Runner)


def get_runner() -> Runner:
    """The default runner that @task and the module-level spawn functions use."""
    return _default.get()


def reset() -> None:
    """Kill the default runner's tasks and start a fresh one (the task registry is reset by the caller)."""
    old = _default.pop()
    if old is not None:
        old.kill()
        old.store.close()
        old.kept.clear()


def _after_fork_in_child() -> None:
    # A forked child (a gipc worker, a --workers process) must not share the parent's
    # runner: its task thread does not exist here and its results are the parent's.
    old = _default.pop()
    if old is not None:
        old.forget_after_fork()


import os as _os  # noqa: E402  (only for the fork hook below)

_os.register_at_fork(after_in_child=_after_fork_in_child)
