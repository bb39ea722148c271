"""The SQLite engine's cluster rows: nodes and their heartbeats, the scheduler's leader and runs.

Concurrency model: methods of :class:`~greenqueue.journal._sqlite.SQLiteEngine`
(this is its base class); each hands its statements to the engine's own
thread through ``_call`` and blocks the calling greenlet, never the hub. The
leader lease and the periodic keys are judged by the database's clock (the
host's, read once the write lock is held).
"""

import json
import sqlite3
import time
from typing import Any, Callable, List, Optional

from ._engine import Heartbeat, NodeInfo, TaskRow
from ._sqlite_sql import write


class NodeRows:
    """Nodes, heartbeats, the leader lease and periodic runs on the engine's connection."""

    # Provided by SQLiteEngine.
    lease_timeout: float
    _changes: int
    _call: Callable[..., Any]
    _read: Callable[..., List[tuple]]
    _insert: Callable[..., List[TaskRow]]

    # -- nodes -----------------------------------------------------------------------------

    def register(self, node: NodeInfo) -> None:
        """Add or refresh this node's row."""
        queues = None if node.queues is None else json.dumps(list(node.queues))
        self._call("register", self._write_sql, """
            INSERT INTO greenqueue_nodes (id, host, pid, queues, started_at, heartbeat_at, running)
            VALUES (:id, :host, :pid, :queues, coalesce(:started, :now), :now, :running)
            ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid, queues = excluded.queues,
                heartbeat_at = excluded.heartbeat_at, running = excluded.running""",
                   {"id": node.id, "host": node.host, "pid": node.pid, "queues": queues,
                    "started": node.started_at, "running": node.running})

    def _write_sql(self, conn: sqlite3.Connection, sql: str, params: dict) -> int:
        with write(conn) as now:
            self._changes += 1
            return conn.execute(sql, dict(params, now=now)).rowcount

    def heartbeat(self, node: str, running: int) -> Heartbeat:
        """Renew the leases of every row ``node`` owns, in one transaction, and report news."""
        return self._call("heartbeat", self._heartbeat, node, int(running))

    def _heartbeat(self, conn: sqlite3.Connection, node: str, running: int) -> Heartbeat:
        with write(conn) as now:
            renewed = conn.execute("UPDATE greenqueue_tasks INDEXED BY greenqueue_tasks_owner "
                                   "SET lease_expires = ? WHERE owner = ? AND state = 'STARTED' "
                                   "RETURNING id, cancel_requested",
                                   (now + self.lease_timeout, node)).fetchall()
            lost = conn.execute("DELETE FROM greenqueue_lost WHERE node = :node AND NOT EXISTS (SELECT 1 FROM "
                                "greenqueue_tasks t WHERE t.id = task_id AND t.owner = :node) RETURNING task_id",
                                {"node": node}).fetchall()
            conn.execute("UPDATE greenqueue_nodes SET heartbeat_at = ?, running = ? WHERE id = ?",
                         (now, running, node))
            self._changes += 1
        return Heartbeat(renewed=len(renewed), cancel=sorted(i for i, c in renewed if c),
                         lost=sorted(r[0] for r in lost), now=now)

    def unregister(self, node: str) -> None:
        """Remove this node's row (clean exit)."""
        self._call("unregister", self._unregister, node)

    def _unregister(self, conn: sqlite3.Connection, node: str) -> None:
        with write(conn) as now:
            conn.execute("DELETE FROM greenqueue_nodes WHERE id = ?", (node,))
            # A leader that leaves cleanly hands over now instead of after a lease timeout.
            conn.execute("UPDATE greenqueue_leader SET lease_expires = ? WHERE node = ?", (now, node))
            self._changes += 1

    def nodes(self) -> List[NodeInfo]:
        """Every node with a recent heartbeat, oldest first."""
        got = self._call("nodes", self._read, "SELECT id, host, pid, queues, started_at, heartbeat_at, running "
                         "FROM greenqueue_nodes WHERE heartbeat_at >= ? ORDER BY started_at, id",
                         (time.time() - self.lease_timeout,))
        return [NodeInfo(i, h, p, None if q is None else json.loads(q), s, b, r) for i, h, p, q, s, b, r in got]

    # -- scheduler ------------------------------------------------------------------------

    def lead(self, node: str) -> Optional[int]:
        """Take or renew the scheduler's leader lease; the epoch while ``node`` leads, else None."""
        return self._call("lead", self._lead, node)

    def _lead(self, conn: sqlite3.Connection, node: str) -> Optional[int]:
        with write(conn) as now:
            current = conn.execute("SELECT node, epoch, lease_expires FROM greenqueue_leader "
                                   "WHERE id = 1").fetchone()
            expires = now + self.lease_timeout
            if current is None:
                conn.execute("INSERT INTO greenqueue_leader (id, node, epoch, lease_expires, acquired_at) "
                             "VALUES (1, ?, 1, ?, ?)", (node, expires, now))
                return 1
            holder, epoch, until = current
            if holder == node and until > now:
                conn.execute("UPDATE greenqueue_leader SET lease_expires = ? WHERE id = 1", (expires,))
                return epoch
            if holder != node and until > now:
                return None
            conn.execute("UPDATE greenqueue_leader SET node = ?, epoch = ?, lease_expires = ?, acquired_at = ? "
                         "WHERE id = 1", (node, epoch + 1, expires, now))
            return epoch + 1

    def fire(self, job: str, due: float, epoch: int, row: TaskRow) -> bool:
        """Enqueue ``row`` as ``job``'s run for instant ``due``, once, while ``epoch`` still leads."""
        return self._call("fire", self._fire, job, float(due), epoch, row)

    def _fire(self, conn: sqlite3.Connection, job: str, due: float, epoch: int, row: TaskRow) -> bool:
        # The write lock holds off a new leader's lead() until this commits, so a fire either
        # lands before the hand-over or sees the new epoch and stops.
        with write(conn) as now:
            current = conn.execute("SELECT epoch FROM greenqueue_leader WHERE id = 1").fetchone()
            if current is None or current[0] != epoch:
                return False
            if conn.execute("INSERT INTO greenqueue_periodic (job, due, fired_at, task_id) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT DO NOTHING", (job, due, now, row.id)).rowcount != 1:
                return False
            self._insert(conn, now, [row], None)
            return True

    def last_fired(self, job: str) -> Optional[float]:
        """The latest due instant enqueued for ``job``, or None."""
        return self._call("last_fired", self._read, "SELECT max(due) FROM greenqueue_periodic WHERE job = ?",
                          (job,))[0][0]

    def anchor(self, job: str, phase: float) -> float:
        """Store ``phase`` as ``job``'s anchor unless one exists; return the stored anchor."""
        return self._call("anchor", self._anchor, job, float(phase))

    def _anchor(self, conn: sqlite3.Connection, job: str, phase: float) -> float:
        with write(conn) as now:
            conn.execute("INSERT INTO greenqueue_anchors (job, phase, created_at) VALUES (?, ?, ?) "
                         "ON CONFLICT (job) DO NOTHING", (job, phase, now))
            return conn.execute("SELECT phase FROM greenqueue_anchors WHERE job = ?", (job,)).fetchone()[0]
