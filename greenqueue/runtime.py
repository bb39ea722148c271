"""The runtime: the one object that owns what a greenqueue process runs.

A :class:`Runtime` holds the task runner, the scheduler, the process pools,
the store (memory, or the journal), the consumers and the lifecycle hooks.
The server and ``greenqueue.start()`` ask it for its parts and drive them
through its methods; no component finds another by looking up imported modules or
another's private attributes. Module-level decorators (``@task``,
``@periodic``, ``@consume``, ``@on_startup``) register on the default parts,
which the default runtime (``get_runtime()``) owns; ``reset()`` stops and
forgets all of it in one call (the test suite's only fixture).

Concurrency model: lifecycle methods (``open_store``, ``start``, ``stop``)
run in the server's main greenlet, or in the caller's thread outside the
server, where work that must live on the task hub (the scheduler loop,
consumers, the store's writer) is handed to the runner's hub with
``Runner.call``. Snapshots read the parts on the task hub's thread and
never switch greenlets while they read, so what they return is consistent.
Across ``fork()`` the child starts with a fresh default runtime (the
runner's fork hook); pools and the store are never shared with a child.
"""

import logging
import os
import time
from typing import Any, Callable, Dict, Generic, List, Optional, Sequence, Tuple, TypeVar

from gevent import monkey

from . import consumers as _consumers
from . import hooks as _hooks
from . import procpool as _procpool
from . import scheduler as _scheduler
from . import tasks as _tasks
from ._default import Default
from .errors import ConfigError, GreenqueueError
from .journal import MemoryStore, Store, mask_dsn, open_store
from .tasks._node import Node

log = logging.getLogger(__name__)

__all__ = ["Runtime", "get_runtime", "reset", "start", "configure", "health"]

T = TypeVar("T")


class _Part(Generic[T]):
    """A part of the runtime: the module default its decorators registered on, asked for at each use."""

    def __init__(self, get: Callable[[], T], doc: str) -> None:
        self._get = get
        self.__doc__ = doc

    def __get__(self, runtime: object, owner: Optional[type] = None) -> T:
        return self._get()


class Runtime:
    """Owns runner, scheduler, pools, store, consumers and hooks; the server drives it."""

    # The parts are the module defaults the decorators (@task, @periodic, @consume, hooks)
    # registered on, where they must be before any runtime exists; asking each time keeps
    # a module-level reset of one part visible here.
    runner = _Part(_tasks.get_runner, "The task runner (``@task`` spawns run here).")
    scheduler = _Part(_scheduler.get_scheduler, "The periodic-job scheduler (``@periodic`` registers here).")
    pools = _Part(_procpool.get_pools, "The process pools started from ``--dirty-app``.")
    hooks = _Part(_hooks.get_hooks, "Start-up and shutdown hooks.")

    def __init__(self) -> None:
        self.started = False
        #: A node's loops (claims, heartbeat, reaper, following tasks elsewhere) while a journal is open.
        self.node: Optional[Node] = None

    @property
    def store(self) -> Store:
        """Where tasks are recorded: a MemoryStore, or the journal when one is open."""
        return self.runner.store

    def consumers(self) -> List[Any]:
        """The ``@consume`` handlers declared in this process."""
        return _consumers.consumers()

    # -- configuration ----------------------------------------------------------------

    def configure(self, max_concurrency: Optional[int] = None, max_pending: Optional[int] = None,
                  result_ttl: Optional[float] = None, max_results: Optional[int] = None,
                  eager: Optional[bool] = None, journal: Optional[str] = None,
                  hub: Optional[str] = None) -> _tasks.Runner:
        """Set the runner's limits and, with ``journal=PATH``, open the journal (replaying what is left)."""
        runner = self.runner.configure(max_concurrency=max_concurrency, max_pending=max_pending,
                                       result_ttl=result_ttl, max_results=max_results, eager=eager, hub=hub)
        if journal is not None:
            self.open_store(journal)
        return runner

    def open_store(self, path: str, lease_timeout: float = 30.0, queues: Optional[Sequence[str]] = None,
                   sync: str = "normal") -> Store:
        """Open the journal at ``path`` (an SQLite file or a postgresql:// URL) for the runner and scheduler;
        its unfinished tasks are claimed by whichever node has a free slot, this one included."""
        runner = self.runner
        current = runner.store
        path = os.fspath(path)
        if current.durable:
            if current.display in (path, mask_dsn(path)):
                return current
            raise ConfigError("a journal (%s) is already open" % current.display)
        store: Store = runner.call(self._open_journal, path, lease_timeout, queues, sync)
        return store

    def _open_journal(self, path: str, lease_timeout: float, queues: Optional[Sequence[str]],
                      sync: str = "normal") -> Store:
        runner = self.runner
        store = open_store(path, lease_timeout=lease_timeout, result_ttl=runner.result_ttl, synchronous=sync,
                           queues=queues)
        runner.use_store(store)
        # LISTEN blocks its greenlet cooperatively only where sockets are gevent's.
        self.node = Node(runner, store, _tasks.find_task, listen=monkey.is_module_patched("socket")).start()
        log.info("cluster %s: this node is %s (%s)", store.display, store.node,
                 "claims every queue" if queues is None else
                 "claims queues %s" % ", ".join(queues) if queues else "only enqueues (--queues '')")
        return store

    # -- lifecycle ----------------------------------------------------------------------

    def start_scheduler(self) -> None:
        """Start the scheduler on the task hub when it has jobs and is not running yet."""
        if len(self.scheduler) and not self.scheduler.running:
            self.runner.call(self.scheduler.start)

    def start(self, dirty_apps: Sequence[str] = (), dirty_workers: Optional[int] = None,
              dirty_timeout: Optional[float] = None, journal: Optional[str] = None,
              lease_timeout: float = 30.0, queues: Optional[Sequence[str]] = None,
              journal_sync: str = "normal", scheduler: bool = True) -> "Runtime":
        """Start what the process declared: pools, the journal, the scheduler (when it has jobs), consumers.

        ``scheduler=False`` leaves the scheduler for :meth:`start_scheduler` (a process replacing
        another without a journal starts it once the other has exited).
        """
        if dirty_apps and not monkey.is_module_patched("os"):
            raise ConfigError("process pools need the main thread's gevent loop (gipc watches its children "
                              "there): call gevent.monkey.patch_all() first, or run the greenqueue server "
                              "with --dirty-app")
        started_pools = []
        if dirty_apps:
            started_pools = self.pools.start(dirty_apps, workers=dirty_workers, timeout=dirty_timeout)
        try:
            if journal:
                self.open_store(journal, lease_timeout, queues, journal_sync)
        except BaseException:
            for pool in started_pools:
                pool.stop(5)
            raise
        runner = self.runner
        if scheduler:
            self.start_scheduler()
        if self.consumers():
            runner.call(_consumers.start_all)
        self.started = True
        return self

    def stop_intake(self, timeout: float) -> None:
        """Stop the scheduler and the consumers (their batches in hand finish first)."""
        runner = self.runner
        if self.node is not None:
            runner.call(self.node.stop)  # claim nothing more; what runs here drains below
            self.node = None
        if self.scheduler.running:
            runner.call(self.scheduler.stop)
        if self.consumers():
            runner.call(_consumers.stop_all, max(1.0, timeout))
            log.info("consumers stopped")

    def drain(self, timeout: float) -> _tasks.DrainReport:
        """Wait up to ``timeout`` s for running and waiting tasks; cancel what is left."""
        runner = self.runner
        report = runner.drain(max(0.0, timeout))
        store = runner.store
        if store.durable:
            # From here on, what is unfinished stays unfinished in the store and runs at the next start.
            store.stop_recording()
            log.info("journal: %d delayed and %d unfinished task(s) kept for the next start",
                     report.scheduled, report.running + report.pending)
        if not report.complete:
            log.warning("graceful timeout: cancelling %d running and %d waiting task(s)",
                        report.running, report.pending)
            runner.kill()
        return report

    def stop(self, timeout: float = 10.0, drain_front: Optional[Callable[[float], None]] = None) -> None:
        """Stop intake, drain tasks, stop pools and close the store, all within about ``timeout`` s.

        ``drain_front(deadline)`` drains what feeds tasks from outside (the server's connections)
        after intake stopped and before the tasks drain, on the same deadline.
        """
        deadline = time.monotonic() + timeout
        # Stop claiming, firing and consuming before anything drains: batches in hand finish (and ack) first.
        self.stop_intake(timeout)
        if drain_front is not None:
            drain_front(deadline)
        self.drain(deadline - time.monotonic())
        if len(self.pools):
            self.pools.stop(max(1.0, deadline - time.monotonic()))
            log.info("worker pools stopped")
        self.close_store()
        self.started = False

    def close_store(self) -> None:
        """Flush and close the journal (a no-op for the memory store)."""
        runner = self.runner
        store = runner.store
        if self.node is not None:
            runner.call(self.node.stop)  # its loops use the store
            self.node = None
        if store.durable:
            runner.call(store.close)
            runner.use_store(MemoryStore())

    # -- what the dashboard and metrics show -------------------------------------------------

    def snapshot(self, limit: int = 50) -> Dict[str, Any]:
        """Tasks (running, waiting, delayed, recent), counts, jobs, pools and the store, as plain objects.

        Waiting and delayed tasks are this process's and the store's (a journal's rows wait there
        for any node), so the dashboard shows and cancels both alike.
        """
        runner = self.runner
        if not runner.on_hub_thread():
            snap: Dict[str, Any] = runner.call(self.snapshot, limit)
            return snap
        store = runner.store
        tasks = runner.snapshot(limit)
        waits = runner.waits(limit)
        nodes: List[Dict[str, Any]] = []
        limits: List[Tuple[str, str, Optional[int], int, int]] = []
        try:
            nodes = [vars(n) for n in store.nodes()]
            for key, states in _WAITING.items():
                rows = [row for state in states for row in store.waiting(state, limit)]
                if key == "scheduled":
                    rows.sort(key=lambda row: row.eta or 0.0)
                top = max((row.priority for row in rows if row.hold is None), default=0)
                for row in rows:
                    waits[row.id] = _HOLDS.get(row.hold or "", "priority" if row.priority < top else "slot")
                tasks[key] = (tasks[key] + [runner.handle(row) for row in rows])[:limit]
            limits = self.limits()
        except GreenqueueError as exc:  # the dashboard still shows this node when the store is away
            log.warning("store %s: cannot list its tasks: %s", store.display, exc)
        return {"tasks": tasks, "waits": waits, "limits": limits, "counts": self.counts(), "jobs": self.scheduler.jobs(),
                "pools": self.pools.stats(), "store": store.display, "durable": store.durable,
                "nodes": nodes, "node": store.node if nodes else None,
                "leader": self.scheduler.leading if nodes else None}

    def counts(self) -> Dict[str, int]:
        """Tasks running here, and waiting or delayed here and in the store (for any node), and limits."""
        runner = self.runner
        if not runner.on_hub_thread():
            counted: Dict[str, int] = runner.call(self.counts)
            return counted
        counts = runner.stats()
        try:
            stored = runner.store.count_waiting()
        except GreenqueueError as exc:
            log.warning("store %s: cannot count its tasks: %s", runner.store.display, exc)
            return counts
        # The store's rows in these states wait for any node; rows this node runs are STARTED
        # there and counted by the runner already.
        for key, states in _WAITING.items():
            counts[key] += sum(stored.get(state, 0) for state in states)
        return counts

    def limits(self) -> List[Tuple[str, str, Optional[int], int, int]]:
        """(kind, bucket, limit, in use, waiting) per bucket of a rate or concurrency limit: the store's and this process's."""
        runner = self.runner
        if not runner.on_hub_thread():
            found: List[Tuple[str, str, Optional[int], int, int]] = runner.call(self.limits)
            return found
        return runner.store.limits() + runner.limits()

    def health(self) -> Dict[str, Any]:
        """What the store is doing: ``{"status": "ok" | "degraded", "store": ..., ...}`` (no password)."""
        store = self.runner.store
        out: Dict[str, Any] = {"status": "ok", "store": store.display, "durable": store.durable}
        node = self.node
        if node is not None:
            out.update(node=store.node, leader=self.scheduler.leading, reachable=node.healthy)
            if not node.healthy:
                out["status"] = "degraded"
                out["detail"] = "the shared store is unreachable; spawns fail with JournalError until it is back"
        return out

    def retry(self, task_id: str) -> _tasks.TaskResult[Any]:
        """Run a failed or cancelled journaled task again, same id, fresh attempt budget (any node claims it)."""
        runner = self.runner
        row = runner.call(runner.store.requeue, task_id)
        handle: _tasks.TaskResult[Any] = runner.call(runner.handle, row)
        if self.node is not None:
            self.node.wake()
        return handle

    # -- tests -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Stop and forget everything: tasks, jobs, pools, consumers, hooks, the store (tests)."""
        if self.node is not None:
            try:
                self.runner.call(self.node.stop)
            except Exception:
                log.exception("runtime reset: stopping the cluster loops failed")
            self.node = None
        for step in (_consumers.reset, _scheduler.reset, _procpool.reset, _tasks.reset, _hooks.reset):
            try:
                step()
            except Exception:
                log.exception("runtime reset: %s failed", step.__module__)


#: The dashboard's lists of tasks that wait, and the store states that feed each.
_WAITING = {"pending": ("PENDING",), "scheduled": ("SCHEDULED", "RETRY")}
# Why a store's waiting row waits, by its hold (a ready row waits for a slot, or behind a higher priority).
_HOLDS = {"eta": "eta", "gate": "limits (checked at the next claim)", "rate": "rate limit",
          "limit": "concurrency limit", "after": "its parent steps (workflow)"}

_default: Default[Runtime] = Default(Runtime)


def get_runtime() -> Runtime:
    """The default runtime: what the module-level decorators registered on."""
    return _default.get()


def reset() -> None:
    """Reset the default runtime: one call, for tests and a REPL."""
    get_runtime().reset()


def health() -> Dict[str, Any]:
    """The default runtime's health: the store and, in a cluster, this node (for your /health view)."""
    return get_runtime().health()


def start(dirty_apps: Sequence[str] = (), journal: Optional[str] = None) -> Runtime:
    """Start the scheduler and consumers outside the server (Celery's beat is explicit too)."""
    rt = get_runtime()
    if rt.started and not dirty_apps and journal is None:
        return rt  # under greenqueue's own server (a gunicorn.conf.py's post_worker_init, say): started already
    return rt.start(dirty_apps=dirty_apps, journal=journal)


def configure(max_concurrency: Optional[int] = None, max_pending: Optional[int] = None,
              result_ttl: Optional[float] = None, max_results: Optional[int] = None,
              eager: Optional[bool] = None, journal: Optional[str] = None,
              hub: Optional[str] = None) -> _tasks.Runner:
    """Set the default runner's limits (defaults 100, 10000, 3600 s, 10000, False); ``journal=PATH`` opens the journal.

    ``hub="current"`` runs tasks on the calling thread's gevent hub even in an unpatched process
    (a program that drives gevent itself); ``"thread"`` always uses a thread of its own.
    """
    return get_runtime().configure(max_concurrency, max_pending, result_ttl, max_results, eager, journal, hub)
