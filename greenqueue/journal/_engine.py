"""The engine protocol: durable task rows shared by one or more nodes (a cluster).

Concurrency model: an engine method blocks the calling greenlet only (psycopg
under monkey-patching, or SQLite on a journal thread), never the hub. Engines
hold no in-process task state: everything a node must agree on with other
nodes (claims, leases, the scheduler's leader, periodic keys) lives in the
database, and every expiry is judged by the database's clock, never a node's.
A forked child must open its own engine.

The runner does not call an engine directly: a :class:`greenqueue.journal.Store`
adapter turns runner transitions (spawned, started, retrying, finished,
cancelled) into these calls and runs a node's claimer, heartbeat and reaper.

Rules every engine keeps (``DESIGN.md``, "Storage and clusters"):

* ``enqueue`` commits before it returns; rows passed with ``owner`` are
  claimed by that node in the same commit (the local fast path).
* ``write`` is a node's group commit: its claimed and unclaimed spawns and
  its final states in one transaction and one commit, with the same rules
  as ``enqueue`` and ``finish_many`` (which do one part of it each).
* An unowned waiting row is either ready (``hold`` NULL) or held until its
  due time (``hold = 'eta'``). ``claim`` first makes held rows whose time
  came ready, then takes ready rows of the node's queues by priority, due
  time and spawn order, at most ``limit`` (the node's free slots), skipping
  rows other nodes are claiming right now (``FOR UPDATE SKIP LOCKED`` on
  PostgreSQL). Both are one index range whatever the backlog holds: the
  ready index leads with the queue and holds no future rows, so no clock
  comparison has to bound it, and the held index is ordered by due time.
* A claim starts an attempt: ``attempts`` grows by one and the row's lease
  runs until the database's ``now() + lease``. ``heartbeat`` renews every
  lease the node holds in one statement.
* ``finish`` and ``retry`` are fenced: they change the row only while
  ``owner`` and ``attempts`` still match what the node was given. After a
  lease expired and the row was reaped or claimed elsewhere, the old
  owner's late result is discarded (the method returns False).
* ``reap`` puts rows whose lease expired back to PENDING, counting a lost
  lease; a row that lost ``max_lease_losses`` leases fails ("lease lost N
  times") instead of running forever (the poison-pill stop).
* Periodic runs: one node holds the scheduler's leader lease (an epoch that
  grows at every change of leader). ``fire`` inserts the unique
  ``(job, due)`` key and the run's task row in one transaction, only while
  the caller's epoch is still current: each due instant is enqueued once.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple

from ..errors import JournalError

__all__ = ["TaskRow", "NodeInfo", "Heartbeat", "Engine", "UNFINISHED", "FINAL", "rows_query", "checked_finishes"]

#: Row states that may still run.
UNFINISHED = ("PENDING", "SCHEDULED", "STARTED", "RETRY")
#: Row states after which nothing changes.
FINAL = ("SUCCESS", "FAILURE", "CANCELLED", "EXPIRED")


# Slots: a row is built for every spawn and every finish, and with as many fields as it has a
# dict-backed instance costs twice as much to make.
@dataclass(slots=True)
class TaskRow:
    """One task as the store keeps it; times are epoch seconds by the database's clock."""

    id: str
    name: str
    payload: bytes = b""
    serializer: str = "json"
    queue: str = "default"
    state: str = "PENDING"
    eta: Optional[float] = None           # due time; None means now
    attempts: int = 0                     # attempts started (a claim adds one)
    max_attempts: int = 1                 # retries + 1, for display and the CLI
    lease_losses: int = 0                 # leases that expired while this row ran
    idempotency_key: Optional[str] = None
    owner: Optional[str] = None           # node id holding the lease while it runs
    lease_expires: Optional[float] = None
    cancel_requested: bool = False        # cancel() of a running row; the owner's heartbeat sees it
    created_at: Optional[float] = None
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    expires_at: Optional[float] = None    # finished rows are pruned after this
    result: Optional[bytes] = None
    error_type: Optional[str] = None
    error: Optional[str] = None
    traceback: Optional[str] = None
    note: Optional[str] = None
    start_by: Optional[float] = None      # a run not started by then ends EXPIRED without running
    priority: int = 0                     # -100..100; waiting rows start larger first
    # Why an unowned waiting row does not simply start: "eta" (due later), "gate" (due, limited: the
    # claim checks its limits), "rate" (its rate window is full until due), "limit" (its concurrency
    # key is full until a run of it ends), "after" (a workflow step whose parents have not all
    # ended). None: ready.
    hold: Optional[str] = None
    rate_bucket: Optional[str] = None     # the rate window this run counts in (task, or task|key)
    rate_n: Optional[int] = None          # at most rate_n starts in any rate_per seconds
    rate_per: Optional[float] = None
    limit_bucket: Optional[str] = None    # the concurrency count this run counts in
    limit_n: Optional[int] = None         # at most limit_n running at once
    # A workflow step: the steps it waits for (JSON list, in the order their results come), how many
    # of them have not ended (hold "after" until none), what its arguments begin with then
    # ("result", "results", "id" or None), the steps its success and its failure release (JSON
    # lists), whether it is a chord's body (a failed parent is a ChordError), and the seconds it
    # waits once released (its countdown).
    parents: Optional[str] = None
    waits: Optional[int] = None
    takes: Optional[str] = None
    then_ids: Optional[str] = None
    error_ids: Optional[str] = None
    chord: bool = False
    wait: Optional[float] = None


def checked_finishes(display: str, items: Sequence[tuple]) -> List[tuple]:
    """``finish()`` argument tuples as a list, each ending in a final state (JournalError naming ``display`` if not).

    An item: row_id, node, attempt, state, result, error_type, error, traceback, ttl, and
    optionally the concurrency key its run held (its end unparks the next run of that key)
    and whether workflow steps wait for it.
    """
    items = list(items)
    for item in items:
        if item[3] not in FINAL:
            raise JournalError("journal %s: finish() takes a final state (%s), not %r"
                               % (display, ", ".join(FINAL), item[3]))
    return items


def rows_query(cols: str, mark: str, state: Optional[str], name: Optional[str], limit: int) -> Tuple[str, list]:
    """The SELECT behind ``Engine.rows()`` and its parameters, in an engine's parameter style (``?``, ``%s``)."""
    where, params = [], []
    if state:
        where.append("state = " + mark)
        params.append(state.upper())
    if name:
        where.append("name = " + mark)
        params.append(name)
    sql = "SELECT %s FROM greenqueue_tasks %s ORDER BY created_at DESC, id DESC LIMIT %s" % (
        cols, ("WHERE " + " AND ".join(where)) if where else "", mark)
    return sql, params + [int(limit)]


@dataclass
class NodeInfo:
    """A process taking part in the cluster (a server worker or a ``greenqueue.worker``)."""

    id: str                               # unique per process start, e.g. "host-pid-random"
    host: str = ""
    pid: int = 0
    queues: Optional[List[str]] = None    # None: every queue
    started_at: Optional[float] = None
    heartbeat_at: Optional[float] = None
    running: int = 0


@dataclass
class Heartbeat:
    """What one heartbeat learned: leases renewed, rows to cancel, rows this node no longer owns."""

    renewed: int = 0
    cancel: List[str] = field(default_factory=list)   # running here, cancel() asked elsewhere
    lost: List[str] = field(default_factory=list)     # given to this node, now someone else's or gone
    now: float = 0.0                                  # the database's clock


class Engine(Protocol):
    """Durable storage for task rows, nodes, the leader lease and periodic keys."""

    #: Where it lives, with any password masked (for logs, the dashboard and errors).
    display: str
    #: Seconds a lease lasts without a heartbeat (``--lease-timeout``).
    lease_timeout: float
    #: The version of the schema this engine writes (the journal CLI shows it).
    schema_version: int

    def open(self) -> None:
        """Connect, create or migrate the schema under a lock, check the version (JournalError)."""

    def close(self) -> None:
        """Release connections; rows keep their state."""

    # -- tasks -------------------------------------------------------------------

    def enqueue_workflow(self, rows: Sequence[TaskRow], groups: Dict[str, List[str]]) -> List[TaskRow]:
        """Insert a workflow's steps and its groups' member lists in one commit."""

    def group(self, group_id: str) -> Optional[List[str]]:
        """The member ids of a group a workflow recorded, or None."""

    def enqueue(self, rows: Sequence[TaskRow], owner: Optional[str] = None,
                connection: Any = None) -> List[TaskRow]:
        """Insert ``rows`` in one commit and return what is stored, in order.

        With ``owner`` the rows are claimed by that node at once (state
        STARTED, attempts + 1, a fresh lease). A row whose ``idempotency_key``
        already exists is not inserted; the existing row is returned in its
        place. With ``connection`` (a caller's open psycopg connection) the
        insert joins the caller's transaction and commits with it.
        """

    def claim(self, node: str, queues: Optional[Sequence[str]], limit: int) -> List[TaskRow]:
        """Claim up to ``limit`` due, unowned rows (oldest due first) for ``node``."""

    def finish(self, row_id: str, node: str, attempt: int, state: str, result: Optional[bytes] = None,
               error_type: Optional[str] = None, error: Optional[str] = None,
               traceback: Optional[str] = None, ttl: float = 3600.0) -> bool:
        """Record the final state of ``node``'s attempt ``attempt``; False when fenced off."""

    def finish_many(self, items: Sequence[tuple]) -> List[bool]:
        """``finish(*item)`` for each item in one commit (a node's group commit); one answer per item."""

    def write(self, node: str, claimed: Sequence[TaskRow], unclaimed: Sequence[TaskRow],
              finishes: Sequence[tuple]) -> Tuple[List[TaskRow], List[TaskRow], List[bool]]:
        """Spawns and final states in one transaction and one commit (a node's group commit).

        ``claimed`` rows are inserted as ``enqueue(claimed, owner=node)`` does,
        ``unclaimed`` ones as ``enqueue(unclaimed)`` does (an existing
        idempotency key returns the existing row in its place), then each of
        ``finishes`` (``finish()``'s arguments) is recorded, fenced as
        ``finish_many`` does. Returns the stored claimed rows and unclaimed
        rows, each in order, and one answer per finish. Any part may be
        empty; when all are, nothing is written.
        """

    def retry(self, row_id: str, node: str, attempt: int, delay: float,
              error_type: Optional[str] = None, error: Optional[str] = None, counted: bool = True) -> bool:
        """Give the row back as RETRY, due in ``delay`` seconds; False when fenced off.

        ``counted=False`` takes back the attempt the claim counted (the node could not run it at all).
        """

    def release(self, row_ids: Iterable[str], node: str) -> int:
        """Hand rows this node holds back unowned (graceful shutdown), keeping their attempt count."""

    def cancel(self, row_id: str) -> Optional[str]:
        """Cancel a row: unowned rows end CANCELLED now, running ones get ``cancel_requested``.

        Returns the row's state before the call, or None when there is no such row.
        """

    def get(self, row_id: str) -> Optional[TaskRow]:
        """One row by id, or None."""

    def get_many(self, ids: Sequence[str]) -> List[TaskRow]:
        """The rows with these ids that exist, read in one query (any order; missing ids are left out)."""

    def count_unfinished(self, name: str) -> int:
        """How many rows of task ``name`` are unfinished (PENDING, SCHEDULED, STARTED, RETRY), uncapped."""

    def waiting(self, state: str, limit: int) -> List[TaskRow]:
        """Up to ``limit`` unowned rows in a waiting ``state`` (PENDING, SCHEDULED, RETRY), soonest due first."""

    def count_waiting(self) -> Dict[str, int]:
        """``{state: rows}`` for the waiting states, read from an index (the dashboard asks every second)."""

    def limits(self) -> List[Tuple[str, str, Optional[int], int, int]]:
        """(kind, bucket, limit, in use, waiting) for each bucket of a rate or concurrency limit in use."""

    def next_due(self, queues: Optional[Sequence[str]]) -> Optional[float]:
        """Seconds (database clock) until the earliest unowned row is due; 0 if one is due now."""

    def reap(self, max_lease_losses: int) -> List[TaskRow]:
        """Take back rows whose lease expired; returns them after the change."""

    def prune(self, periodic_ttl: float) -> int:
        """Delete finished rows past ``expires_at`` and periodic keys older than ``periodic_ttl``."""

    # -- nodes ---------------------------------------------------------------------

    def register(self, node: NodeInfo) -> None:
        """Add or refresh this node's row."""

    def heartbeat(self, node: str, running: int) -> Heartbeat:
        """Renew the leases of every row ``node`` owns, in one statement, and report news."""

    def unregister(self, node: str) -> None:
        """Remove this node's row (clean exit)."""

    def nodes(self) -> List[NodeInfo]:
        """Every node with a recent heartbeat, oldest first."""

    # -- scheduler -----------------------------------------------------------------

    def lead(self, node: str) -> Optional[int]:
        """Take or renew the scheduler's leader lease; the epoch while ``node`` leads, else None."""

    def fire(self, job: str, due: float, epoch: int, row: TaskRow) -> bool:
        """Enqueue ``row`` as ``job``'s run for instant ``due``, once, while ``epoch`` still leads."""

    def last_fired(self, job: str) -> Optional[float]:
        """The latest due instant enqueued for ``job``, or None."""

    def anchor(self, job: str, phase: float) -> float:
        """Store ``phase`` as ``job``'s anchor unless one exists; return the stored anchor."""

    # -- reading (CLI, dashboard) -----------------------------------------------------

    def counts(self) -> dict:
        """``{state: count}`` over all rows."""

    def rows(self, state: Optional[str] = None, limit: int = 50,
             name: Optional[str] = None) -> List[TaskRow]:
        """Rows, newest first, optionally of one state and task name."""

    def requeue(self, row_id: Optional[str] = None) -> int:
        """FAILURE/CANCELLED rows (one, or all) back to PENDING with a fresh attempt budget."""

    def purge(self, state: str) -> int:
        """Delete rows of one final state; JournalError for unfinished states."""

    # -- wake-ups --------------------------------------------------------------------

    def wait_for_work(self, timeout: float) -> str:
        """Block this greenlet until another node wrote (a hint) or ``timeout`` passes.

        "work": something may be claimable now; "news": only results changed (a task finished);
        "": nothing in that time.
        """
