"""The store protocol the task runner and the scheduler call, the row they pass, and the memory store.

Concurrency model: callers use a store from the task hub's greenlets only
(a spawning greenlet, a task greenlet, a node's loops, the scheduler's
loop). The memory store is plain dicts touched from that thread; a durable
store may block the calling greenlet (never the hub) while it commits.
Nothing here survives a fork: a child process builds its own store.

What crosses the seam is a :class:`TaskRow` (id, name, serialized
arguments, queue, state, attempts, eta, result), never a result handle.
A store answers every call the same way whatever it is; what differs is
its behaviour:

* ``spawned``/``spawned_many``/``fire`` return the stored row; its
  ``owner`` says who runs it. The memory store has no other node, so every
  row it returns is this node's; a shared store gives this node only the
  rows it claimed and keeps the rest for whichever node is free.
* ``retrying`` returns True when the store took the retry over (any node
  claims the row when due); the memory store returns False and the runner
  keeps the retry itself.
* ``durable`` says whether a spawn must be written before it returns. A
  runner records nothing in a store that is not durable (no row is built,
  nothing is serialized): that is the in-memory fast path.
"""

import datetime
import time
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from ..errors import ConfigError, GreenqueueError, SerializationError
from ._codec import dumps_call
from ._engine import Heartbeat, NodeInfo, TaskRow

__all__ = ["Store", "MemoryStore", "TaskRow", "new_row"]

_UTC = datetime.timezone.utc


def new_row(task_id: str, name: str, args: Sequence[object], kwargs: Dict[str, object], serializer: str,
            queue: str = "default", eta: Optional[datetime.datetime] = None, attempts: int = 0,
            max_attempts: int = 1, idempotency_key: Optional[str] = None, start_by: Optional[float] = None,
            priority: int = 0, rate: Optional[Tuple[str, int, float]] = None,
            limit: Optional[Tuple[str, int]] = None) -> TaskRow:
    """The row a spawn becomes; SerializationError when ``serializer`` cannot carry the arguments."""
    try:
        payload = dumps_call(serializer, args, kwargs)
    except (TypeError, ValueError) as exc:
        raise SerializationError("task %s: arguments cannot be journaled as %s (%s); pass ids instead of "
                                 "objects, or use @task(serializer='pickle')"
                                 % (name, serializer.upper(), exc)) from None
    if eta is None:
        # Positional: a spawn builds one of these every time, and keywords cost a third more.
        row = TaskRow(task_id, name, payload, serializer, queue, "PENDING", None, attempts, max_attempts, 0,
                      idempotency_key)
    else:
        ts = eta.timestamp()
        row = TaskRow(task_id, name, payload, serializer, queue, "SCHEDULED" if ts > time.time() else "PENDING",
                      ts, attempts, max_attempts, 0, idempotency_key)
    if start_by is not None:
        row.start_by = start_by
    if priority:
        row.priority = priority
    if rate is not None:
        row.rate_bucket, row.rate_n, row.rate_per = rate
    if limit is not None:
        row.limit_bucket, row.limit_n = limit
    return row


class Store(Protocol):
    """What the runner, its node loops and the scheduler need from storage."""

    #: True when a spawn is written before it returns (rows outlive the process).
    durable: bool
    #: Where it lives (a path, or a DSN with the password masked); "memory" for the memory store.
    display: str
    #: This process's node id (rows it runs carry it as ``owner``).
    node: str
    #: Called when this process's own commit made work claimable (a workflow step released): the
    #: node's claimer listens, as other nodes hear of it through the store.
    on_work: Optional[Callable[[], None]]

    @property
    def lease_timeout(self) -> float:
        """Seconds a lease lasts without a heartbeat (how often a node and a leader must renew)."""

    # -- options ----------------------------------------------------------------------

    def check_options(self, task: str, options: Dict[str, object]) -> None:
        """ConfigError unless this store can honour ``apply_async`` options (queue, idempotency_key, connection)."""

    def configure(self, result_ttl: float) -> None:
        """How long finished rows are kept (``greenqueue.configure(result_ttl=...)``)."""

    # -- spawning and attempts --------------------------------------------------------------

    def serves(self, queue: str) -> bool:
        """True when this node runs tasks of ``queue``."""

    def spawned(self, row: TaskRow, claim: bool = False, connection: object = None) -> TaskRow:
        """Record a new row; a durable store returns once it is committed (JournalError if not).

        With ``claim`` this node asks to run it now (it has a free slot). Returns the stored
        row: another task's when its idempotency key was used before.
        """

    def spawned_many(self, rows: Sequence[TaskRow], connection: object = None) -> List[TaskRow]:
        """Record many rows in one commit (``task.map``); none is claimed on the way in."""

    def spawned_workflow(self, rows: Sequence[TaskRow], groups: Dict[str, List[str]]) -> List[TaskRow]:
        """Record a workflow's steps (those with parents held until they end) and its groups, in one commit."""

    def group(self, group_id: str) -> Optional[List[str]]:
        """The member ids of a group of a recorded workflow, or None."""

    def started(self, task_id: str) -> None:
        """An attempt of a row this node runs started."""

    def retrying(self, task_id: str, name: str, delay: float, exc: Optional[BaseException]) -> bool:
        """An attempt failed and another follows after ``delay`` s; True when the store took it over."""

    def offer_again(self, task_id: str, name: str, delay: float, why: str) -> None:
        """A claimed row this node cannot run (an unknown task): back to the others in ``delay`` s, no attempt counted."""

    def finished(self, row: TaskRow) -> bool:
        """A row this node ran reached its final state; False when the result was fenced off."""

    def cancel(self, task_id: str) -> Optional[str]:
        """Cancel a row wherever it is; its state before, or None when the store has no such row."""

    def requeue(self, task_id: str) -> TaskRow:
        """Make a failed or cancelled row run again with a fresh attempt budget."""

    # -- reading ---------------------------------------------------------------------------

    def lookup(self, task_id: str) -> Optional[TaskRow]:
        """The row with this id (finished or not), or None."""

    def get_many(self, task_ids: Sequence[str]) -> List[TaskRow]:
        """The rows with these ids that exist, in one read."""

    def waiting(self, state: str, limit: int) -> List[TaskRow]:
        """Up to ``limit`` rows waiting for any node in ``state`` (PENDING, SCHEDULED, RETRY), soonest first."""

    def count_waiting(self) -> Dict[str, int]:
        """``{state: rows}`` of the rows waiting for any node (the dashboard's and the metrics' counts)."""

    def limits(self) -> List[Tuple[str, str, Optional[int], int, int]]:
        """(kind, bucket, limit, in use, waiting) per bucket of a rate or concurrency limit, cluster-wide."""

    def count_unfinished(self, name: str) -> int:
        """Rows of task ``name`` not finished yet (``max_instances``), counted by the store."""

    def nodes(self) -> List[NodeInfo]:
        """The nodes sharing this store (none for the memory store)."""

    # -- a node's claims ---------------------------------------------------------------------

    def claim(self, limit: int) -> List[TaskRow]:
        """Claim up to ``limit`` due rows for this node (never more: no prefetch)."""

    def next_due(self) -> Optional[float]:
        """Seconds until the next row this node could claim is due (None: none waits)."""

    def heartbeat(self, running: int) -> Heartbeat:
        """Renew this node's leases; the reply lists rows to cancel and rows lost."""

    def reap(self) -> List[TaskRow]:
        """Take back rows whose lease expired (any node's)."""

    def prune(self) -> int:
        """Delete finished rows and periodic keys past their time."""

    def wait_for_work(self, timeout: float) -> str:
        """Block this greenlet until another node wrote (a hint) or ``timeout`` passes.

        "work": something may be claimable now; "news": only results changed (a task finished);
        "": nothing in that time.
        """

    # -- the scheduler -------------------------------------------------------------------

    def lead(self) -> bool:
        """Take or renew the scheduler's leadership; True while this node leads."""

    def fire(self, job: str, due: datetime.datetime, row: TaskRow) -> Optional[TaskRow]:
        """Record ``row`` as ``job``'s run for ``due``, once; the stored row, or None if already fired."""

    def last_fired(self, job: str) -> Optional[datetime.datetime]:
        """The latest due instant recorded for ``job`` across restarts, or None."""

    def anchor(self, job: str, phase: datetime.datetime) -> datetime.datetime:
        """The instant an ``every()`` job's grid is anchored at, agreed by every node."""

    # -- lifecycle ---------------------------------------------------------------------------

    def stop_recording(self) -> None:
        """Keep what is unfinished as it is (shutdown): later transitions are not written."""

    def close(self) -> None:
        """Flush and release what the store holds."""


class MemoryStore:
    """The store of a process alone: nothing is written, every row is this node's, it always leads."""

    durable = False
    display = "memory"
    lease_timeout = float("inf")

    def __init__(self, node: str = "local") -> None:
        self.node = node
        self.on_work: Optional[Callable[[], None]] = None
        self._periodic: Dict[str, datetime.datetime] = {}

    def check_options(self, task: str, options: Dict[str, object]) -> None:
        """Queues need no store (this process runs them all); keys and transactions need a journal."""
        needs = sorted(k for k, v in options.items() if k != "queue" and v is not None)
        if needs:
            raise ConfigError("%s.apply_async(%s=...) needs a journal shared by the processes that spawn "
                              "(--journal PATH or postgresql://...), which this process does not use"
                              % (task, needs[0]))

    def configure(self, result_ttl: float) -> None:
        """Nothing is kept here: the runner keeps finished results itself."""

    def serves(self, queue: str) -> bool:
        """A process alone runs every queue."""
        return True

    def spawned(self, row: TaskRow, claim: bool = False, connection: object = None) -> TaskRow:
        """Nothing to write: the row is this node's to run."""
        if connection is not None:
            raise ConfigError("a spawn inside a caller's transaction needs a postgresql:// journal")
        row.owner = self.node
        return row

    def spawned_many(self, rows: Sequence[TaskRow], connection: object = None) -> List[TaskRow]:
        """Nothing to write: every row is this node's to run."""
        return [self.spawned(row, False, connection) for row in rows]

    def spawned_workflow(self, rows: Sequence[TaskRow], groups: Dict[str, List[str]]) -> List[TaskRow]:
        """Nothing to write: the runner holds a workflow's steps itself."""
        return [self.spawned(row, False, None) for row in rows]

    def group(self, group_id: str) -> Optional[List[str]]:
        """No groups here: the runner keeps them."""
        return None

    def started(self, task_id: str) -> None:
        """Nothing to record."""

    def retrying(self, task_id: str, name: str, delay: float, exc: Optional[BaseException]) -> bool:
        """The runner keeps the retry: there is no other node to hand it to."""
        return False

    def offer_again(self, task_id: str, name: str, delay: float, why: str) -> None:
        """Nothing claims here: no row to give back."""

    def finished(self, row: TaskRow) -> bool:
        """Nothing to record; never fenced off."""
        return True

    def cancel(self, task_id: str) -> Optional[str]:
        """No rows here: the runner cancels what it holds."""
        return None

    def requeue(self, task_id: str) -> TaskRow:
        """Nothing is kept to run again."""
        raise GreenqueueError("retry needs the journal (--journal PATH); only journaled tasks can be retried")

    def lookup(self, task_id: str) -> Optional[TaskRow]:
        """No rows here: finished results live in the runner."""
        return None

    def get_many(self, task_ids: Sequence[str]) -> List[TaskRow]:
        """No rows here."""
        return []

    def waiting(self, state: str, limit: int) -> List[TaskRow]:
        """No rows here: the runner lists what it holds."""
        return []

    def count_waiting(self) -> Dict[str, int]:
        """No rows here: the runner counts what it holds."""
        return {}

    def limits(self) -> List[Tuple[str, str, Optional[int], int, int]]:
        """No rows here: the runner's own gate holds the limits."""
        return []

    def count_unfinished(self, name: str) -> int:
        """No rows here: the runner counts what it holds."""
        return 0

    def nodes(self) -> List[NodeInfo]:
        """A process alone is no cluster."""
        return []

    def claim(self, limit: int) -> List[TaskRow]:
        """Nothing waits here."""
        return []

    def next_due(self) -> Optional[float]:
        """Nothing waits here."""
        return None

    def heartbeat(self, running: int) -> Heartbeat:
        """No leases to renew."""
        return Heartbeat()

    def reap(self) -> List[TaskRow]:
        """No leases to expire."""
        return []

    def prune(self) -> int:
        """Nothing kept to prune."""
        return 0

    def wait_for_work(self, timeout: float) -> str:
        """No other node writes here."""
        return ""

    def lead(self) -> bool:
        """A process alone always leads."""
        return True

    def fire(self, job: str, due: datetime.datetime, row: TaskRow) -> Optional[TaskRow]:
        """Once per due instant and job, in this process; the row is this node's."""
        last = self._periodic.get(job)
        if last is not None and due <= last:
            return None
        self._periodic[job] = due
        row.owner = self.node
        return row

    def last_fired(self, job: str) -> Optional[datetime.datetime]:
        """Unknown across restarts: nothing is written."""
        return None

    def anchor(self, job: str, phase: datetime.datetime) -> datetime.datetime:
        """Nobody else to agree with: the grid starts where this process first saw the job."""
        return phase

    def stop_recording(self) -> None:
        """Nothing is written."""

    def close(self) -> None:
        """Nothing to release."""

