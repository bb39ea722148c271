"""The runner's store on an engine shared by several nodes (PostgreSQL, or SQLite on one host).

Concurrency model: the runner calls this store from greenlets on the task
hub; each call is one engine call, which blocks the calling greenlet only
(psycopg is cooperative under gevent; the SQLite engine keeps the hub free
its own way). The store keeps, per task this node holds, the attempt number
the engine gave it: finishing or retrying is fenced by that attempt, so a
late result from a node that lost its lease is discarded by the database.
The node's loops (claiming due rows, heartbeat, reaping, results of tasks
that run elsewhere) live with the runner (``greenqueue.tasks._node``); this
module never calls the runner.

Group commit (``batch=True``, what the server uses: on SQLite and on
PostgreSQL a commit costs more than the statement): spawns and final states
queue up, and one writer greenlet commits everything queued, spawns and
final states together, in one transaction (``Engine.write``) while the
previous commit was on its way. A spawn still returns only after its batch
committed; final states are written behind (a crash before their commit
runs the task again: at-least-once). An engine that promises a
bound on a failing spawn (``spawn_deadline``) gets it: a spawn queued behind
a stuck batch gives up before it is sent, so it never waits for two
timeouts in a row.
"""

import datetime
import logging
import socket
import os
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import gevent
from gevent import Timeout, get_hub
from gevent.event import Event
from gevent.hub import Waiter

from ..errors import JournalError
from ._engine import Engine, Heartbeat, NodeInfo, TaskRow

log = logging.getLogger(__name__)

__all__ = ["ClusterStore", "node_id"]

_UTC = datetime.timezone.utc


def node_id() -> str:
    """A name for this process in the cluster: host, pid and a random suffix (pids are reused)."""
    return "%s-%d-%s" % (socket.gethostname(), os.getpid(), uuid.uuid4().hex[:6])


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # unknown: let its lease decide
    if pid == os.getpid():
        return False  # an earlier run of a container whose server is always pid 1, say: not us
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process with that pid
    return True


def _discarded(name: str, task_id: str, attempt: int) -> None:
    log.warning("task %s[%s]: result of attempt %d discarded: its lease expired and another node took the "
                "task over", name, task_id, attempt)


def _error_type(exc: Optional[BaseException]) -> Optional[str]:
    if exc is None:
        return None
    return getattr(exc, "remote_type", None) or type(exc).__name__


class _Batch:
    """Spawns waiting for one commit: their rows (claimed here or not), and what the commit answered."""

    __slots__ = ("rows", "waiters", "sent", "stored", "error", "withdrawn")

    def __init__(self) -> None:
        # [claimed rows, unclaimed rows]; None: withdrawn by a spawn that gave up before it was sent.
        self.rows: Tuple[List[Optional[TaskRow]], List[Optional[TaskRow]]] = ([], [])
        # One per spawn: gevent's bare Waiter, since an Event's wait() costs a Timeout context
        # per call even without a timeout (a microsecond of every journaled spawn).
        self.waiters: "List[Waiter[None]]" = []
        self.sent = False
        self.stored: Tuple[List[Optional[TaskRow]], List[Optional[TaskRow]]] = ([], [])
        self.error: Optional[BaseException] = None
        self.withdrawn = False  # a spawn gave up before the batch was sent

    def sendable(self, part: int) -> Tuple[List[TaskRow], Optional[List[int]]]:
        """The rows of ``part`` still to send, and where each one's answer goes (None: in order, all sent)."""
        if not self.withdrawn:
            return cast(List[TaskRow], self.rows[part]), None
        kept = [(i, row) for i, row in enumerate(self.rows[part]) if row is not None]
        return [row for _, row in kept], [i for i, _ in kept]

    def wake(self) -> None:
        """Wake every spawn waiting for this batch (from the hub)."""
        for waiter in self.waiters:
            waiter.switch(None)

    def done(self) -> None:
        """The commit answered (or failed): wake the spawns from the hub's next turn."""
        get_hub().loop.run_callback(self.wake)

    def answer(self, part: int, places: Optional[List[int]], stored: List[TaskRow]) -> None:
        """Put the commit's answers where their spawns look for them (a withdrawn row's place stays empty)."""
        out: List[Optional[TaskRow]]
        if places is None:
            out = cast(List[Optional[TaskRow]], stored)
        else:
            out = [None] * len(self.rows[part])
            for i, got in zip(places, stored):
                out[i] = got
        self.stored = (out, self.stored[1]) if part == 0 else (self.stored[0], out)


class ClusterStore:
    """Store protocol over an Engine: rows shared by every node, attempts fenced, runs claimed."""

    durable = True

    def __init__(self, engine: Engine, node: Optional[str] = None, queues: Optional[Sequence[str]] = None,
                 result_ttl: float = 3600.0, max_lease_losses: int = 3, batch: bool = False) -> None:
        self.engine = engine
        self.display = engine.display
        self.node = node or node_id()
        #: Queues this node claims from (None: all; [] : none, a web node that only enqueues).
        self.queues = None if queues is None else list(queues)
        self.result_ttl = result_ttl
        self.max_lease_losses = max_lease_losses
        self._attempts: Dict[str, int] = {}   # task id -> the attempt this node holds
        # task id -> (the concurrency key its run holds, whether workflow steps wait for it): for
        # limited runs and workflow steps only, whose finish does more in the same commit.
        self.on_work: Optional[Callable[[], None]] = None
        self._extras: Dict[str, Tuple[Optional[str], bool]] = {}
        self._recording = True
        self.epoch: Optional[int] = None      # the scheduler leader's epoch while this node leads
        self.batch = batch
        self._batch: Optional[_Batch] = None  # spawns not sent yet
        self._finishes: List[tuple] = []      # engine.finish arguments not sent yet
        self._finish_names: List[str] = []    # their task names, for the log of a fenced-off one
        self._wake: Any = None                # set when a spawn or a final state is queued
        self._writer: Any = None
        self._stopping = False
        # Engines that promise a bound on a failing spawn say so; the SQLite engine's own timeout is the bound.
        deadline: Optional[float] = getattr(engine, "spawn_deadline", None)
        # The rest of the deadline is for the batch's own call, which the engine's timeout
        # bounds, plus a second of slack for what that call does after the timeout.
        self._queue_wait: Optional[float] = (
            None if deadline is None else max(0.5, deadline - getattr(engine, "timeout", 0.0) - 1.0))

    @property
    def lease_timeout(self) -> float:
        """Seconds a lease lasts without a heartbeat (``--lease-timeout``)."""
        return self.engine.lease_timeout

    # -- lifecycle ----------------------------------------------------------------------

    def open(self) -> "ClusterStore":
        """Open the engine, register this node and take back what dead processes on this host held."""
        self.engine.open()
        if self.batch:
            self._wake = Event()
            self._writer = gevent.spawn(self._write_loop, self._wake)
        self.engine.register(NodeInfo(id=self.node, host=socket.gethostname(), pid=os.getpid(),
                                      queues=self.queues, started_at=time.time()))
        self._take_back_from_dead_local_nodes()
        return self

    def _take_back_from_dead_local_nodes(self) -> int:
        """Release at once the rows of nodes on this host whose process is gone (a kill -9, a crash).

        Their leases would expire by themselves after --lease-timeout; a process that restarts on
        the same host knows sooner, so a restart after a crash does not wait for it.
        """
        me = socket.gethostname()
        nodes = [n for n in self.engine.nodes() if n.id != self.node]
        dead = [n for n in nodes if n.host == me and not _alive(n.pid)]
        quiet = [n for n in nodes if n not in dead and self._quiet_for(n) > self._quiet_after()]
        held: Dict[str, List[str]] = {}
        if dead or quiet:  # the running rows are read only when a node's fate depends on them
            for row in self.engine.rows("STARTED", 1000000):
                if row.owner is not None:
                    held.setdefault(row.owner, []).append(row.id)
        total = 0
        for node in dead:
            released = self.engine.release(held.get(node.id, []), node.id) if held.get(node.id) else 0
            total += released
            # Unregistering also ends its scheduler leader lease, if it held it: leadership moves now.
            self.engine.unregister(node.id)
            log.info("journal %s: node %s (pid %d) on this host is gone: its %d running task(s) run again and "
                     "its leases (the scheduler's too, if it led) end now instead of in %.0fs", self.display,
                     node.id, node.pid, released, self.engine.lease_timeout)
        self._say_what_waits(quiet, held)
        return total

    @staticmethod
    def _quiet_for(node: NodeInfo) -> float:
        """Seconds since ``node`` was last heard from."""
        now = time.time()
        return now - (node.heartbeat_at or node.started_at or now)

    def _quiet_after(self) -> float:
        """Silence after which a node looks gone (its heartbeats come every third of a lease)."""
        return min(self.engine.lease_timeout / 3, 10.0)

    def _say_what_waits(self, quiet_nodes: Sequence[NodeInfo], held: Dict[str, List[str]]) -> None:
        """Log the tasks held by nodes that look gone but cannot be judged from here, and when they move."""
        timeout = self.engine.lease_timeout
        for node in quiet_nodes:
            quiet = self._quiet_for(node)
            if held.get(node.id):
                log.info("journal %s: node %s on %s has not been heard from for %.0fs; its %d running task(s) "
                         "run elsewhere when its lease ends, in at most %.0fs", self.display, node.id,
                         node.host or "another host", quiet, len(held[node.id]), max(0.0, timeout - quiet))

    # -- options -------------------------------------------------------------------------

    def check_options(self, task: str, options: Dict[str, object]) -> None:
        """Every option is honoured here (a connection only by an engine that can join it)."""

    def configure(self, result_ttl: float) -> None:
        """Keep finished rows ``result_ttl`` seconds from now on."""
        self.result_ttl = result_ttl

    def serves(self, queue: str) -> bool:
        """True when this node claims tasks of ``queue``."""
        return self.queues is None or queue in self.queues

    # -- spawning and attempts ---------------------------------------------------------------

    def spawned(self, row: TaskRow, claim: bool = False, connection: object = None) -> TaskRow:
        """Commit the row; with ``claim`` this node runs it (the local fast path). Returns the stored row."""
        owner = self.node if claim and connection is None else None
        if self._writer is not None and connection is None:
            return self._queued_enqueue(row, owner is not None)  # the writer notes the attempt it claimed
        stored = self.engine.enqueue([row], owner=owner, connection=connection)[0]
        if owner is not None and stored.id == row.id and stored.owner == self.node:
            self._attempts[stored.id] = stored.attempts
        return stored

    def spawned_many(self, rows: Sequence[TaskRow], connection: object = None) -> List[TaskRow]:
        """Commit many rows at once (``task.map``); none is claimed here, any node takes them."""
        return self.engine.enqueue(rows, connection=connection)

    def spawned_workflow(self, rows: Sequence[TaskRow], groups: Dict[str, List[str]]) -> List[TaskRow]:
        """Commit a workflow's steps and groups at once; steps with parents wait in the store for them."""
        return self.engine.enqueue_workflow(rows, groups)

    def group(self, group_id: str) -> Optional[List[str]]:
        """The member ids of a group of a recorded workflow, or None."""
        return self.engine.group(group_id)

    def started(self, task_id: str) -> None:
        """Nothing to write: the claim already counted the attempt and started the lease."""

    def retrying(self, task_id: str, name: str, delay: float, exc: Optional[BaseException]) -> bool:
        """Give the row back as RETRY, due in ``delay`` s; any node claims it then. Always True."""
        attempt = self._attempts.pop(task_id, None)
        self._extras.pop(task_id, None)  # the engine unparks from the row itself
        if attempt is None or not self._recording:
            return True
        if not self.engine.retry(task_id, self.node, attempt, delay, _error_type(exc), str(exc) if exc else None):
            log.warning("task %s[%s]: lease lost before the retry was recorded; the node that holds it "
                        "decides", name, task_id)
        return True

    def offer_again(self, task_id: str, name: str, delay: float, why: str) -> None:
        """A claimed row this node cannot run: back to the others in ``delay`` s, its attempt not counted."""
        attempt = self._attempts.pop(task_id, None)
        self._extras.pop(task_id, None)
        if attempt is not None and self._recording:
            self.engine.retry(task_id, self.node, attempt, delay, "GreenqueueError", why, counted=False)

    def finished(self, row: TaskRow) -> bool:
        """Write the final state, fenced by attempt; False when another node took the task over."""
        attempt = self._attempts.pop(row.id, None)
        if attempt is None or not self._recording:
            return True
        args: tuple = (row.id, self.node, attempt, row.state, row.result, row.error_type, row.error,
                       row.traceback, self.result_ttl)
        extra = self._extras.pop(row.id, None) if self._extras else None
        if extra is not None:
            args += extra  # its end unparks the next run of its key, and releases the steps after it
        if self._writer is not None:
            self._finishes.append(args)
            self._finish_names.append(row.name)
            self._wake.set()
            return True
        ok = self.engine.finish_many([args])[0]
        if not ok:
            _discarded(row.name, row.id, attempt)
        return ok

    # -- group commit ------------------------------------------------------------------------

    def _queued_enqueue(self, row: TaskRow, claim: bool) -> TaskRow:
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
        part = 0 if claim else 1
        rows = batch.rows[part]
        index = len(rows)
        rows.append(row)
        waiter: "Waiter[None]" = Waiter()
        batch.waiters.append(waiter)
        self._wake.set()
        if self._queue_wait is None:
            waiter.get()
        else:
            timer = Timeout.start_new(self._queue_wait)
            try:
                waiter.get()
            except Timeout as fired:
                if fired is not timer:
                    raise
                if not batch.sent:
                    # Never sent, so never written: failing it now leaves nothing in doubt.
                    rows[index] = None
                    batch.withdrawn = True
                    raise JournalError("journal %s: spawn of %s not written within %.1f s: the journal is "
                                       "unreachable or too slow; try again"
                                       % (self.display, row.id, self._queue_wait)) from None
                waiter.get()  # sent: the engine's own timeout ends the wait
            finally:
                timer.close()
        if batch.error is not None:
            raise batch.error
        stored = batch.stored[part][index]
        assert stored is not None  # every row the writer sent has its answer
        return stored

    def _write_loop(self, wake: Any) -> None:
        while True:
            wake.wait()
            wake.clear()
            self.flush()
            if self._stopping:
                return

    def _stop_writers(self) -> None:
        """Let the writer finish the batch on its way, then commit what is left in this greenlet."""
        writer = self._writer
        if writer is None:
            return
        # From here on spawns and final states are written directly, by their own greenlets.
        self._writer = None
        self._stopping = True
        self._wake.set()
        # Killing the writer mid-commit would lose its batch of final states (they run again):
        # it gets the engine's timeout to end its call first.
        gevent.joinall([writer], timeout=getattr(self.engine, "timeout", 5.0) + 2.0)
        writer.kill(block=True)
        self.flush()

    def flush(self) -> None:
        """Commit what is queued now, spawns (their callers wait for this) and final states, in one transaction."""
        batch, self._batch = self._batch, None
        finishes, self._finishes = self._finishes, []
        names, self._finish_names = self._finish_names, []
        if batch is None and not finishes:
            return
        claimed: List[TaskRow] = []
        unclaimed: List[TaskRow] = []
        claimed_at: Optional[List[int]] = None
        unclaimed_at: Optional[List[int]] = None
        if batch is not None:
            batch.sent = True
            claimed, claimed_at = batch.sendable(0)
            unclaimed, unclaimed_at = batch.sendable(1)
        try:
            stored_claimed, stored_unclaimed, finished = self.engine.write(
                self.node, claimed, unclaimed, finishes)
        except BaseException as exc:
            # Every caller hears the outcome, even when the writer is killed mid-call (close()).
            failed = exc if isinstance(exc, Exception) else JournalError(
                "journal %s: the store closed while the spawn was being written; it may or may not "
                "be stored" % self.display)
            if batch is not None:
                batch.error = failed
                batch.done()
            if finishes:
                log.error("journal %s: %d final state(s) not written (%s); those tasks run again",
                          self.display, len(finishes), exc)
            if failed is not exc:
                raise
            return
        if batch is not None:
            attempts = self._attempts
            node = self.node
            for row, got in zip(claimed, stored_claimed):
                if got.id == row.id and got.owner == node:
                    attempts[got.id] = got.attempts
            batch.answer(0, claimed_at, stored_claimed)
            batch.answer(1, unclaimed_at, stored_unclaimed)
            batch.done()
        released = False
        for name, args, ok in zip(names, finishes, finished):
            if not ok:
                _discarded(name, args[0], args[2])
            elif len(args) > 10 and args[10]:
                released = True
        if released and self.on_work is not None:
            self.on_work()  # steps waiting on these may be claimable now

    def cancel(self, task_id: str) -> Optional[str]:
        """Cancel a row wherever it is; returns its state before (None: no such row)."""
        return self.engine.cancel(task_id)

    def requeue(self, task_id: str) -> TaskRow:
        """Make a failed or cancelled row run again (fresh attempt budget) and return it."""
        row = self.engine.get(task_id)
        if row is None:
            raise JournalError("task %s is not in the journal %s" % (task_id, self.display))
        if row.state not in ("FAILURE", "CANCELLED"):
            raise JournalError("task %s is %s; only failed or cancelled tasks can be retried" % (task_id, row.state))
        self.engine.requeue(task_id)
        again = self.engine.get(task_id)
        if again is None:
            raise JournalError("task %s was deleted from the journal %s while it was retried" % (task_id, self.display))
        return again

    # -- reading ------------------------------------------------------------------------------

    def lookup(self, task_id: str) -> Optional[TaskRow]:
        """The row, finished or not, from any node."""
        return self.engine.get(task_id)

    def get_many(self, task_ids: Sequence[str]) -> List[TaskRow]:
        """The rows with these ids, in one read."""
        return self.engine.get_many(task_ids) if task_ids else []

    def waiting(self, state: str, limit: int) -> List[TaskRow]:
        """Up to ``limit`` rows waiting for any node in ``state``, soonest first."""
        return self.engine.waiting(state, limit)

    def count_waiting(self) -> Dict[str, int]:
        """``{state: rows}`` of the rows waiting for any node, cluster-wide."""
        return self.engine.count_waiting()

    def limits(self) -> List[Tuple[str, str, Optional[int], int, int]]:
        """(kind, bucket, limit, in use, waiting) per bucket of a rate or concurrency limit, cluster-wide."""
        return self.engine.limits()

    def count_unfinished(self, name: str) -> int:
        """Runs of task ``name`` not finished yet, cluster-wide, counted by the database."""
        return self.engine.count_unfinished(name)

    # -- the node's claims ------------------------------------------------------------------

    def claim(self, limit: int) -> List[TaskRow]:
        """Claim up to ``limit`` due rows for this node."""
        rows = self.engine.claim(self.node, self.queues, limit)
        for row in rows:
            self._attempts[row.id] = row.attempts
            if row.limit_bucket is not None or row.then_ids or row.error_ids:
                self._extras[row.id] = (row.limit_bucket, bool(row.then_ids or row.error_ids))
        return rows

    def next_due(self) -> Optional[float]:
        """Seconds until the next unowned row this node could claim is due."""
        return self.engine.next_due(self.queues)

    def heartbeat(self, running: int) -> Heartbeat:
        """Renew this node's leases; the reply lists rows to cancel and rows lost."""
        beat = self.engine.heartbeat(self.node, running)
        for task_id in beat.lost:
            self._attempts.pop(task_id, None)
            self._extras.pop(task_id, None)
        return beat

    def reap(self) -> List[TaskRow]:
        """Take back rows whose lease expired (any node's)."""
        return self.engine.reap(self.max_lease_losses)

    def prune(self) -> int:
        """Delete finished rows and periodic keys past their time."""
        return self.engine.prune(max(self.result_ttl, 86400.0))

    def wait_for_work(self, timeout: float) -> str:
        """Block this greenlet until another node enqueued work (a hint) or ``timeout`` passes."""
        return self.engine.wait_for_work(timeout)

    # -- the scheduler -------------------------------------------------------------------

    def lead(self) -> bool:
        """Take or renew the scheduler's leader lease; True while this node leads."""
        self.epoch = self.engine.lead(self.node)
        return self.epoch is not None

    def fire(self, job: str, due: datetime.datetime, row: TaskRow) -> Optional[TaskRow]:
        """Enqueue ``row`` as ``job``'s run for ``due``, once cluster-wide, while this node leads."""
        if self.epoch is None or not self.engine.fire(job, due.timestamp(), self.epoch, row):
            return None
        return row

    def last_fired(self, job: str) -> Optional[datetime.datetime]:
        """The latest due instant any node enqueued for ``job``."""
        ts = self.engine.last_fired(job)
        return None if ts is None else datetime.datetime.fromtimestamp(ts, _UTC)

    def anchor(self, job: str, phase: datetime.datetime) -> datetime.datetime:
        """The instant an ``every()`` job's grid is anchored at, shared by every node."""
        ts = self.engine.anchor(job, phase.timestamp())
        return datetime.datetime.fromtimestamp(ts, _UTC)

    # -- shutdown ---------------------------------------------------------------------------

    def stop_recording(self) -> None:
        """Hand what this node still holds back to the cluster now, instead of after a lease timeout."""
        self._stop_writers()
        held = list(self._attempts)
        self._recording = False
        if held:
            released = self.engine.release(held, self.node)
            log.info("journal %s: handed %d unfinished task(s) back to the cluster", self.display, released)
        self._attempts.clear()
        self._extras.clear()

    def close(self) -> None:
        """Release held rows, leave the cluster and close the engine."""
        try:
            if self._recording:
                self.stop_recording()
            else:
                self._stop_writers()
            self.engine.unregister(self.node)
        except Exception as exc:
            log.warning("journal %s: leaving the cluster failed: %s", self.display, exc)
        finally:
            self.engine.close()

    def nodes(self) -> List[NodeInfo]:
        """The cluster's nodes."""
        return self.engine.nodes()


