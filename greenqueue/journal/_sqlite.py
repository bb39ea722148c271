"""The SQLite engine: one file shared by the greenqueue processes of one host.

Concurrency model: each engine owns one ``sqlite3`` connection, used only on
the engine's private one-thread gevent ``ThreadPool``; a method hands its
statements to that thread and blocks the calling greenlet, never the hub.
Without monkey-patching the same holds (the pool's hub runs while the caller
waits); a call made from a native thread other than the one that opened the
engine runs in that thread, serialised with the pool thread by a native lock.
The thread hop costs about 0.05-0.13 ms per call (measured: a one-row
enqueue 0.12-0.25 ms called directly, 0.19-0.26 ms through the thread; a
``get()`` 0.01 ms against 0.05-0.14 ms). That buys a hub that keeps serving
while this process waits up to ``timeout`` seconds for another process's
write lock, a checkpoint or an fsync: blocking the caller instead would stall
every greenlet of the process for as long, and with several processes on one
file a wait for the lock is routine, not rare.

Durability: ``synchronous="NORMAL"`` (the default) makes a commit survive a
crash of the process (kill -9); an OS crash or power cut may lose the last
commits (the file stays consistent). ``synchronous="FULL"`` fsyncs every
commit before ``enqueue`` returns, so a returned spawn survives a power cut;
it roughly doubles the cost of a one-row enqueue (measured 0.3-0.5 ms against
0.12-0.25 ms), while a 100-row ``map()`` pays it once (about 2.5-4 ms either
way).

A node's group commit, ``write()``, is one hop to the engine's thread and
one transaction for a batch's spawns and final states; ``enqueue`` and
``finish_many`` are the same call with one part. Its cost is SQLite's own
B-tree work (about 5 us to insert a row and 6 us to finish one, with the
row's five index entries each time), so the Python around it stays thin:
each part is one ``executemany``, and inserted rows are not read back when
none conflicted (the stored row is then exactly what was written).

Several processes may open the same file: it is a cluster with the same
rules as a PostgreSQL one. The file is in WAL mode (readers never wait for
the writer) and every write is one ``BEGIN IMMEDIATE`` transaction: SQLite's
single write lock serialises writers across processes, so a claim's SELECT
and UPDATE run with no other claimer in between (what ``FOR UPDATE SKIP
LOCKED`` gives on PostgreSQL). A writer waits up to ``timeout`` seconds for
the lock (SQLite's busy timeout) and then raises :class:`JournalError`
naming the file. WAL needs shared memory, so the file must live on a local
filesystem: a network filesystem is refused at ``open()``.

The database's clock: every process on one host reads the same OS clock, so
``time.time()`` read after the transaction took the write lock is the
database's clock here; leases, due times and the leader lease are judged by
it. Nothing survives a fork: a child process opens its own engine.

Wake-ups: SQLite has no LISTEN, so ``wait_for_work`` polls every
``poll_interval`` seconds. A poll costs one ``PRAGMA data_version`` (which
changes when another connection commits) and, only after a change, one
indexed look for due, unowned rows.

Schema: see ``_sqlite_sql``.
"""

import json
import logging
import os
import sqlite3
import time
from functools import partial
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import gevent
from gevent.monkey import get_original

from ..errors import ConfigError, JournalError
from ._engine import FINAL, UNFINISHED, TaskRow, checked_finishes, rows_query
from ._gate import START_ORDER, Candidate, Verdict, decide, hold_of
from ._links import follow
from ._sqlite_nodes import NodeRows
from ._sqlite_sql import (BACK, CLAIM_IDS, COLS, FORGET_LOST, INSERT, PLAIN_INSERT, finish_params, MAGIC, NETWORK_FS, RUNNING, SCHEMA_VERSION,
                          FIELDS, GATED, HELD, PARKED, READY, READY_OR_GATED, SYNCHRONOUS, UPGRADES, WAITING, WAITING_OF, chunks, filesystem_of,
                          marks, queue_filter, task_row)
from ._sqlite_sql import write as transaction

__all__ = ["SQLiteEngine", "SCHEMA_VERSION", "filesystem_of"]

_PRIORITY, _CREATED = FIELDS.index("priority"), FIELDS.index("created_at")


class _Tx:
    """The workflow rules' view of an open transaction on the engine's connection."""

    ready_or_gated = READY_OR_GATED

    def __init__(self, conn: sqlite3.Connection, now: float, result_ttl: float) -> None:
        self.conn, self.now, self.result_ttl = conn, now, result_ttl

    def rows(self, sql: str, params: Sequence[Any]) -> List[tuple]:
        """The rows of a statement."""
        return self.conn.execute(sql, params).fetchall()

    def run(self, sql: str, params: Sequence[Any]) -> int:
        """Run a statement; the rows it changed."""
        return self.conn.execute(sql, params).rowcount

log = logging.getLogger(__name__)


def _locked(exc: sqlite3.Error) -> bool:
    """True when ``exc`` is SQLite saying another connection holds the lock it needs."""
    text = str(exc)
    return "locked" in text or "busy" in text


class _Contended(Exception):
    """Another process holds a lock the open needs right now (``error`` is SQLite's)."""

    def __init__(self, error: sqlite3.Error) -> None:
        super().__init__(str(error))
        self.error = error


class SQLiteEngine(NodeRows):
    """The Engine protocol on one SQLite file shared by the processes of one host."""

    #: The schema version this engine writes.
    schema_version = SCHEMA_VERSION

    #: Seconds between two looks at the file while ``wait_for_work`` waits.
    poll_interval = 0.05

    def __init__(self, path: str, lease_timeout: float = 30.0, timeout: float = 5.0,
                 result_ttl: float = 3600.0, synchronous: str = "NORMAL") -> None:
        self.path = os.fspath(path)
        self.display = self.path
        self.lease_timeout = float(lease_timeout)
        #: Seconds a write waits for another process's write lock before raising JournalError.
        self.timeout = float(timeout)
        #: How long rows the engine finishes by itself (poison pill, cancel at reap) are kept.
        self.result_ttl = float(result_ttl)
        mode = str(synchronous).upper()
        if mode not in SYNCHRONOUS:
            raise ConfigError("synchronous=%r: use one of %s" % (synchronous, ", ".join(SYNCHRONOUS)))
        self.synchronous = mode
        self._conn: Optional[sqlite3.Connection] = None
        self._pool: Any = None
        # A native lock even under monkey-patching: it is only ever taken by native threads.
        self._lock = get_original("_thread", "allocate_lock")()
        self._changes = 0             # this engine's own commits (data_version ignores them)
        self._seen: Optional[Tuple[int, int]] = None

    def __repr__(self) -> str:
        return "SQLiteEngine(%r)" % self.path

    # -- the engine's thread and errors ------------------------------------------------

    def _fail(self, reason: str) -> JournalError:
        return JournalError("journal %s: %s" % (self.path, reason))

    def _error(self, doing: str, exc: sqlite3.Error) -> JournalError:
        if _locked(exc):
            reason = ("another process held the file's write lock for more than %g s (a long transaction, "
                      "or a process stopped while holding it); try again" % self.timeout)
        else:
            reason = "%s: %s (disk full, read-only or corrupt?)" % (type(exc).__name__, exc)
        return self._fail("%s failed: %s" % (doing, reason))

    def _guarded(self, doing: str, fn: Callable[..., Any], args: tuple) -> Tuple[bool, Any]:
        # Runs on the engine's thread: errors travel back as values, so gevent's pool does
        # not print a traceback for an error the caller reports anyway.
        with self._lock:
            try:
                if self._conn is None and fn != self._open:
                    raise self._fail("%s failed: the engine is not open" % doing)
                return True, fn(self._conn, *args)
            except sqlite3.Error as exc:
                return False, self._error(doing, exc)
            except Exception as exc:
                return False, exc

    def _call(self, doing: str, fn: Callable[..., Any], *args: Any) -> Any:
        pool = self._pool
        if pool is None:
            raise self._fail("%s failed: the engine is not open" % doing)
        ok, value = pool.apply(self._guarded, (doing, fn, args))
        if not ok:
            raise value
        return value

    # -- open / close ----------------------------------------------------------------

    def open(self) -> None:
        """Open or create the file, migrate the schema under the write lock, check the version (JournalError)."""
        if self._pool is not None:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise self._fail("directory %s does not exist; create it or pick another path" % directory)
        try:
            with open("/proc/self/mountinfo") as f:
                kind = filesystem_of(os.path.realpath(directory), f.read())
        except OSError:
            kind = ""  # not Linux: nothing to look at, the README's warning stands
        if kind in NETWORK_FS:
            raise self._fail("is on a network filesystem (%s); SQLite's WAL needs a local disk shared by "
                             "the processes of one host. Use a local path, or PostgreSQL for several hosts"
                             % kind)
        from gevent.threadpool import ThreadPool

        self._pool = ThreadPool(1)
        try:
            self._call("open", self._open)
        except BaseException:
            self._pool.kill()
            self._pool = None
            raise

    def _open(self, _: None) -> None:
        # Switching a new file to WAL takes an exclusive lock SQLite does not wait for: when
        # several processes start together on one file, the losers retry until the timeout.
        sleep = get_original("time", "sleep")
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self._open_once()
            except _Contended as contended:
                if time.monotonic() >= deadline:
                    raise self._error("open", contended.error) from None
                sleep(0.02)

    def _open_once(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=self.timeout)
        except sqlite3.Error as exc:
            raise self._fail("cannot open it: %s (permissions? a directory?)" % exc) from None
        try:
            try:
                # Look before WAL mode changes anything: a foreign file stays untouched.
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            except sqlite3.DatabaseError as exc:
                if _locked(exc):
                    raise _Contended(exc) from None
                raise self._fail("not a greenqueue journal or corrupt (%s); move it away or pick another "
                                 "path" % exc) from None
            if tables and "greenqueue_meta" not in tables:
                raise self._fail("is an SQLite database of something else (tables: %s); refusing to touch "
                                 "it. Point --journal at another file" % ", ".join(sorted(tables)))
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise self._fail("cannot use WAL mode (SQLite kept %r); several processes cannot "
                                     "share it. Use a file on a local disk" % mode)
                conn.execute("PRAGMA synchronous=%s" % self.synchronous)
                conn.execute("PRAGMA foreign_keys=ON")
                with transaction(conn) as now:
                    self._migrate(conn)
                    # A write proves now, not at the first spawn, that the disk takes it.
                    conn.execute("INSERT INTO greenqueue_meta (key, value) VALUES ('opened_at', ?) "
                                 "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (repr(now),))
            except sqlite3.OperationalError as exc:
                if _locked(exc):
                    raise _Contended(exc) from None
                raise self._error("open", exc) from None
            except sqlite3.DatabaseError as exc:
                raise self._fail("cannot use it: %s (disk full, read-only or corrupt?)" % exc) from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # Under the write lock: of several processes starting together, one creates or migrates.
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            version = 0
            conn.execute("CREATE TABLE greenqueue_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        elif "greenqueue_meta" not in tables:
            raise self._fail("is an SQLite database of something else (tables: %s); refusing to touch it. "
                             "Point --journal at another file" % ", ".join(sorted(tables)))
        else:
            meta = dict(conn.execute("SELECT key, value FROM greenqueue_meta"))
            if meta.get("magic") != MAGIC:
                raise self._fail("has a greenqueue_meta table but is not a greenqueue journal (magic %r); "
                                 "refusing to touch it. Point --journal at another file" % meta.get("magic"))
            try:
                version = int(meta.get("schema_version", ""))
            except ValueError:
                version = -1
            if version > SCHEMA_VERSION:
                raise self._fail("was written by a newer greenqueue (schema %d, this one knows %d); upgrade "
                                 "greenqueue or point --journal at another file" % (version, SCHEMA_VERSION))
            if version < 1:
                raise self._fail("has an unknown schema version %r; restore it or point --journal at "
                                 "another file" % meta.get("schema_version"))
        if version == SCHEMA_VERSION:
            return
        for stmt in UPGRADES[version]:
            conn.execute(stmt)
        conn.executemany("INSERT INTO greenqueue_meta (key, value) VALUES (?, ?) ON CONFLICT (key) "
                         "DO UPDATE SET value = excluded.value",
                         [("magic", MAGIC), ("schema_version", str(SCHEMA_VERSION))])
        conn.execute("PRAGMA user_version=%d" % SCHEMA_VERSION)
        log.info("journal %s: schema at version %d (was %d)", self.path, SCHEMA_VERSION, version)

    def close(self) -> None:
        """Close the connection and stop the engine's thread; rows keep their state."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            pool.apply(self._guarded, ("close", self._close, ()))
        finally:
            pool.kill()

    def _close(self, conn: sqlite3.Connection) -> None:
        self._conn = None
        conn.close()

    # -- tasks -------------------------------------------------------------------------

    def enqueue(self, rows: Sequence[TaskRow], owner: Optional[str] = None,
                connection: Any = None) -> List[TaskRow]:
        """Insert ``rows`` in one commit and return what is stored, in order."""
        if connection is not None:
            raise ConfigError("connection= needs a PostgreSQL journal (%s is an SQLite file)" % self.path)
        if owner is not None:
            return self._batch("enqueue", owner, rows, (), ())[0]
        return self._batch("enqueue", "", (), rows, ())[1]

    def enqueue_workflow(self, rows: Sequence[TaskRow], groups: Dict[str, List[str]]) -> List[TaskRow]:
        """Insert a workflow's steps and its groups' member lists in one commit."""
        return self._call("enqueue", self._workflow, list(rows), dict(groups))

    def _workflow(self, conn: sqlite3.Connection, rows: List[TaskRow], groups: Dict[str, List[str]]) -> List[TaskRow]:
        with transaction(conn) as now:
            stored = self._insert(conn, now, rows, None)
            conn.executemany("INSERT INTO greenqueue_groups (id, members, created_at) VALUES (?, ?, ?) "
                             "ON CONFLICT DO NOTHING", [(g, json.dumps(m), now) for g, m in groups.items()])
        return stored

    def group(self, group_id: str) -> Optional[List[str]]:
        """The member ids of a group a workflow recorded, or None."""
        found = self._call("group", self._read, "SELECT members FROM greenqueue_groups WHERE id = ?", (group_id,))
        return list(json.loads(found[0][0])) if found else None

    def write(self, node: str, claimed: Sequence[TaskRow], unclaimed: Sequence[TaskRow],
              finishes: Sequence[tuple]) -> Tuple[List[TaskRow], List[TaskRow], List[bool]]:
        """Insert ``claimed`` (owned by ``node``) and ``unclaimed`` rows and record ``finishes``, in one commit."""
        return self._batch("write", node, claimed, unclaimed, finishes)

    def _batch(self, doing: str, node: str, claimed: Sequence[TaskRow], unclaimed: Sequence[TaskRow],
               finishes: Sequence[tuple]) -> Tuple[List[TaskRow], List[TaskRow], List[bool]]:
        claimed, unclaimed = list(claimed), list(unclaimed)
        params = checked_finishes(self.path, finishes)
        if not (claimed or unclaimed or params):
            return [], [], []
        # One hop to the engine's thread and one transaction for the whole batch.
        return self._call(doing, self._write, node, claimed, unclaimed, params)

    def _write(self, conn: sqlite3.Connection, node: str, claimed: List[TaskRow], unclaimed: List[TaskRow],
               params: List[tuple]) -> Tuple[List[TaskRow], List[TaskRow], List[bool]]:
        with transaction(conn) as now:
            mine = self._insert(conn, now, claimed, node) if claimed else []
            others = self._insert(conn, now, unclaimed, None) if unclaimed else []
            done = self._finish_rows(conn, now, params) if params else []
            self._changes += 1
        return mine, others, done

    def _insert(self, conn: sqlite3.Connection, now: float, rows: List[TaskRow],
                owner: Optional[str]) -> List[TaskRow]:
        mine = owner is not None
        lease = now + self.lease_timeout if mine else None
        started = now if mine else None
        state = "STARTED" if mine else None
        plain, full, holds = [], [], []
        for r in rows:
            hold = None if mine else hold_of(r, now)
            holds.append(hold)
            eta = r.eta
            due = now if eta is None else eta
            if (r.idempotency_key is None and r.note is None and r.start_by is None and r.rate_bucket is None
                    and r.limit_bucket is None and r.parents is None and r.then_ids is None
                    and r.error_ids is None and r.wait is None):
                plain.append((r.id, r.name, r.payload or b"", r.serializer, r.queue, state or r.state, eta, due,
                              r.attempts + mine, r.max_attempts, owner, lease, started, now, now, r.priority, hold))
            else:
                full.append((r.id, r.name, r.payload or b"", r.serializer, r.queue, state or r.state, eta, due,
                             r.attempts + mine, r.max_attempts, r.idempotency_key, r.note, owner, lease, started,
                             now, now, r.start_by, r.priority, hold, r.rate_bucket, r.rate_n, r.rate_per,
                             r.limit_bucket, r.limit_n, r.parents, r.waits, r.takes, r.then_ids, r.error_ids,
                             r.chord, r.wait))
        self._changes += 1
        # Most spawns fill a third of the columns; binding the rest as NULLs doubled an insert's cost.
        inserted = conn.executemany(PLAIN_INSERT, plain).rowcount if plain else 0
        if full:
            inserted += conn.executemany(INSERT, full).rowcount
        if inserted == len(rows):
            # Nothing conflicted, so each row is now what was just written: no read back, and the
            # caller's rows become the stored ones (building new ones cost a spawn more than this).
            for r, hold in zip(rows, holds):
                if mine:
                    r.state, r.attempts = "STARTED", r.attempts + 1
                    r.owner, r.lease_expires, r.started_at = owner, lease, started
                r.hold, r.created_at = hold, now
            return rows
        # Read back in the same transaction: rows that were already there answer for the new ones.
        ids = [r.id for r in rows]
        keys = [r.idempotency_key for r in rows if r.idempotency_key]
        found: List[TaskRow] = []
        for column, wanted in (("id", ids), ("idempotency_key", keys)):
            for part in chunks(wanted):
                found += map(task_row, conn.execute("SELECT %s FROM greenqueue_tasks WHERE %s IN (%s)"
                                                 % (COLS, column, marks(part)), part))
        by_id = {r.id: r for r in found}
        by_key = {r.idempotency_key: r for r in found if r.idempotency_key}
        out = []
        for r in rows:
            got = (by_key.get(r.idempotency_key) if r.idempotency_key else None) or by_id.get(r.id)
            if got is None:
                raise self._fail("task %s conflicted with a row that is gone; spawn it again" % r.id)
            out.append(got)
        return out

    def claim(self, node: str, queues: Optional[Sequence[str]], limit: int) -> List[TaskRow]:
        """Claim up to ``limit`` due, unowned rows (oldest due first) for ``node``."""
        if limit <= 0 or (queues is not None and not queues):
            return []
        return self._call("claim", self._claim, node, queues, int(limit))

    def _claim(self, conn: sqlite3.Connection, node: str, queues: Optional[Sequence[str]],
               limit: int) -> List[TaskRow]:
        # An idle claimer should not take the write lock every poll that other processes need.
        if not self._claimable(conn, queues, time.time()):
            return []
        with transaction(conn) as now:
            self._promote(conn, now)
            names = list(queues) if queues is not None else self._waiting_queues(conn)
            candidates: List[Candidate] = []
            for name in names:
                # One range of the ready index, and of the gated one, per queue, already in start order.
                candidates += [Candidate(*r) for r in conn.execute(
                    "SELECT id, priority, due, created_at FROM %s AND queue = ? ORDER BY %s LIMIT ?"
                    % (READY, START_ORDER), (name, limit))]
                candidates += [Candidate(r[0], r[1], r[2], r[3], True, r[4], r[5], r[6], r[7], r[8]) for r in conn.execute(
                    "SELECT id, priority, due, created_at, rate_bucket, rate_n, rate_per, limit_bucket, limit_n "
                    "FROM %s AND queue = ? ORDER BY %s LIMIT ?" % (GATED, START_ORDER), (name, limit))]
            verdict = decide(candidates, limit, now, partial(self._running_in, conn, now),
                             partial(self._starts_in, conn), partial(self._reserved, conn))
            self._gate(conn, verdict)
            ids = verdict.take
            if not ids:
                return []
            # The ids as one JSON parameter: one statement whatever their number, prepared once
            # (a list of marks per count filled the statement cache and cost a compile per claim).
            listed = json.dumps(ids)
            got = conn.execute(CLAIM_IDS, (node, now + self.lease_timeout, now, now, listed)).fetchall()
            conn.execute(FORGET_LOST, (node, listed))
            self._changes += 1
        order = {row_id: i for i, row_id in enumerate(ids)}
        return sorted(map(task_row, got), key=lambda r: order[r.id])

    @staticmethod
    def _running_in(conn: sqlite3.Connection, now: float, buckets: List[str]) -> Dict[str, int]:
        """Runs of each of ``buckets`` whose lease is alive (a dead node's share ends with its lease)."""
        return dict(conn.execute(
            "SELECT limit_bucket, count(*) FROM greenqueue_tasks INDEXED BY greenqueue_tasks_limited "
            "WHERE owner IS NOT NULL AND limit_bucket IS NOT NULL AND limit_bucket IN (%s) "
            "AND state = 'STARTED' AND lease_expires >= ? GROUP BY limit_bucket" % marks(buckets),
            list(buckets) + [now]).fetchall())

    @staticmethod
    def _starts_in(conn: sqlite3.Connection, bucket: str, since: float, n: int) -> List[Tuple[float, str]]:
        """``bucket``'s latest ``n`` starts (made or reserved) after ``since``, oldest first; older ones go."""
        conn.execute("DELETE FROM greenqueue_starts WHERE bucket = ? AND at <= ?", (bucket, since))
        return conn.execute("SELECT at, task_id FROM greenqueue_starts WHERE bucket = ? ORDER BY at DESC LIMIT ?",
                            (bucket, n)).fetchall()[::-1]

    @staticmethod
    def _reserved(conn: sqlite3.Connection, bucket: str, at: float, task_id: str) -> bool:
        """True when a start at ``at`` is reserved for ``task_id``."""
        return conn.execute("SELECT 1 FROM greenqueue_starts WHERE bucket = ? AND at = ? AND task_id = ?",
                            (bucket, at, task_id)).fetchone() is not None

    def _gate(self, conn: sqlite3.Connection, verdict: Verdict) -> None:
        """Write what the gate decided besides the claim: parked rows, rows held for their window, starts."""
        if verdict.park:
            conn.execute("UPDATE greenqueue_tasks SET hold = 'limit' WHERE id IN (%s)" % marks(verdict.park),
                         verdict.park)
        if verdict.hold:
            conn.executemany("UPDATE greenqueue_tasks SET hold = 'rate', due = ? WHERE id = ?",
                             [(due, row_id) for row_id, due in verdict.hold])
        if verdict.starts:
            conn.executemany("INSERT INTO greenqueue_starts (bucket, at, until, task_id) VALUES (?, ?, ?, ?)",
                             verdict.starts)

    @staticmethod
    def _unpark(conn: sqlite3.Connection, buckets: Sequence[Optional[str]]) -> None:
        """A run of each of ``buckets`` ended: the next parked row of each goes back to the gate."""
        for bucket in buckets:
            if bucket is not None:
                conn.execute("UPDATE greenqueue_tasks SET hold = 'gate' WHERE id = (SELECT id FROM %s "
                             "AND limit_bucket = ? ORDER BY %s LIMIT 1)" % (PARKED, START_ORDER), (bucket,))

    @staticmethod
    def _claimable(conn: sqlite3.Connection, queues: Optional[Sequence[str]], now: float) -> bool:
        """True when a ready or gated row of ``queues`` waits, or a held row's time came (a look without the lock)."""
        where, params = queue_filter(queues)
        return (conn.execute("SELECT 1 FROM %s %s LIMIT 1" % (READY, where), params).fetchone() is not None
                or conn.execute("SELECT 1 FROM %s %s LIMIT 1" % (GATED, where), params).fetchone() is not None
                or conn.execute("SELECT 1 FROM %s AND due <= ? LIMIT 1" % HELD, (now,)).fetchone() is not None)

    def _promote(self, conn: sqlite3.Connection, now: float) -> int:
        """Make the held rows whose time came ready, or the gate's (any queue's: whoever serves it claims them)."""
        promoted = conn.execute("UPDATE greenqueue_tasks SET hold = %s WHERE id IN (SELECT id FROM %s AND due <= ?)"
                                % (READY_OR_GATED, HELD), (now,)).rowcount
        if promoted:
            self._changes += 1
        return promoted

    def _waiting_queues(self, conn: sqlite3.Connection) -> List[str]:
        """The queues ready or gated rows wait on."""
        return sorted(set(self._ready_queues(conn, READY)) | set(self._ready_queues(conn, GATED)))

    @staticmethod
    def _ready_queues(conn: sqlite3.Connection, source: str) -> List[str]:
        """The queues rows of ``source`` (READY, GATED) wait on: one index probe per queue (a loose scan)."""
        names: List[str] = []
        while True:
            found = conn.execute("SELECT queue FROM %s %s ORDER BY queue LIMIT 1"
                                 % (source, "AND queue > ?" if names else ""), names[-1:]).fetchone()
            if found is None:
                return names
            names.append(found[0])

    def finish(self, row_id: str, node: str, attempt: int, state: str, result: Optional[bytes] = None,
               error_type: Optional[str] = None, error: Optional[str] = None,
               traceback: Optional[str] = None, ttl: float = 3600.0) -> bool:
        """Record the final state of ``node``'s attempt ``attempt``; False when fenced off."""
        return self._batch("finish", "", (), (), [(row_id, node, attempt, state, result, error_type, error,
                                                   traceback, ttl)])[2][0]

    def finish_many(self, items: Sequence[tuple]) -> List[bool]:
        """``finish(*args)`` for each item, in one transaction (a node's group commit of results)."""
        return self._batch("finish", "", (), (), items)[2]

    def _finish_rows(self, conn: sqlite3.Connection, now: float, params: List[tuple]) -> List[bool]:
        done = self._finish_each(conn, now, params)
        freed = [p[9] for p, ok in zip(params, done) if ok and len(p) > 9 and p[9] is not None]
        if freed:
            self._unpark(conn, freed)
        linked = [p[0] for p, ok in zip(params, done) if ok and len(p) > 10 and p[10]]
        if linked:
            self._follow(conn, now, linked)
        return done

    def _follow(self, conn: sqlite3.Connection, now: float, ended: Sequence[str]) -> None:
        """Workflow steps waiting on ``ended`` rows get their turn or end (same transaction)."""
        if follow(_Tx(conn, now, self.result_ttl), ended):
            self._changes += 1

    @staticmethod
    def _finish_each(conn: sqlite3.Connection, now: float, params: List[tuple]) -> List[bool]:
        made = [finish_params(now, p) for p in params]
        if len(made) > 1:
            conn.execute("SAVEPOINT finish")
            changed = 0
            for sql in {sql for sql, _ in made}:
                changed += conn.executemany(sql, [args for s, args in made if s is sql]).rowcount
            if changed == len(made):
                conn.execute("RELEASE finish")
                return [True] * len(made)
            # One was fenced off, or a row comes twice: undo, and learn which one by one.
            conn.execute("ROLLBACK TO finish")
            conn.execute("RELEASE finish")
        return [conn.execute(sql, args).rowcount == 1 for sql, args in made]

    def retry(self, row_id: str, node: str, attempt: int, delay: float,
              error_type: Optional[str] = None, error: Optional[str] = None, counted: bool = True) -> bool:
        """Give the row back as RETRY, due in ``delay`` seconds; False when fenced off (``counted``: see Engine)."""
        params = {"id": row_id, "node": node, "attempt": attempt, "delay": max(0.0, float(delay)),
                  "error_type": error_type, "error": error, "state": "RETRY", "uncount": 0 if counted else 1}
        return self._call("retry", self._back, "eta = :now + :delay, due = :now + :delay, "
                          "attempts = attempts - :uncount, "
                          "hold = CASE WHEN :delay > 0 THEN 'eta' ELSE %s END, " % READY_OR_GATED +
                          "error_type = :error_type, error = :error", "id = :id AND attempts = :attempt",
                          params) == 1

    def release(self, row_ids: Iterable[str], node: str) -> int:
        """Hand rows this node holds back unowned (graceful shutdown), keeping their attempt count."""
        ids = list(row_ids)
        total = 0
        for part in chunks(ids):
            params = {"node": node, "state": "PENDING"}
            params.update(("i%d" % n, row_id) for n, row_id in enumerate(part))
            where = "id IN (%s)" % ", ".join(":i%d" % n for n in range(len(part)))
            total += self._call("release", self._back, "hold = " + READY_OR_GATED, where, params)
        return total

    def _back(self, conn: sqlite3.Connection, extra: str, where: str, params: dict) -> int:
        with transaction(conn) as now:
            self._changes += 1
            params = dict(params, now=now, ttl=self.result_ttl)
            back = conn.execute("UPDATE greenqueue_tasks SET %s WHERE %s AND owner = :node RETURNING limit_bucket"
                                % (", ".join(filter(None, (BACK, extra))), where), params).fetchall()
            self._unpark(conn, [r[0] for r in back])
            return len(back)

    def cancel(self, row_id: str) -> Optional[str]:
        """Cancel a row: unowned rows end CANCELLED now, running ones get ``cancel_requested``."""
        return self._call("cancel", self._cancel, row_id)

    def _cancel(self, conn: sqlite3.Connection, row_id: str) -> Optional[str]:
        with transaction(conn) as now:
            found = conn.execute("SELECT state, owner FROM greenqueue_tasks WHERE id = ?", (row_id,)).fetchone()
            if found is None:
                return None
            state, owner = found
            if state not in UNFINISHED:
                return state
            self._changes += 1
            if owner is None:
                conn.execute("UPDATE greenqueue_tasks SET state = 'CANCELLED', finished_at = ?, updated_at = ?, "
                             "expires_at = ?, hold = NULL WHERE id = ?", (now, now, now + self.result_ttl, row_id))
                self._follow(conn, now, [row_id])
            else:
                conn.execute("UPDATE greenqueue_tasks SET cancel_requested = 1, updated_at = ? WHERE id = ?",
                             (now, row_id))
            return state

    def get(self, row_id: str) -> Optional[TaskRow]:
        """One row by id, or None."""
        found = self._call("get", self._read, "SELECT %s FROM greenqueue_tasks WHERE id = ?" % COLS, (row_id,))
        return task_row(found[0]) if found else None

    def get_many(self, ids: Sequence[str]) -> List[TaskRow]:
        """The rows with these ids that exist, in one call (any order)."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            return []
        return [task_row(r) for r in self._call("get_many", self._read_ids, ids)]

    def _read_ids(self, conn: sqlite3.Connection, ids: List[str]) -> List[tuple]:
        found: List[tuple] = []
        for part in chunks(ids):
            found += conn.execute("SELECT %s FROM greenqueue_tasks WHERE id IN (%s)" % (COLS, marks(part)), part)
        return found

    def count_unfinished(self, name: str) -> int:
        """How many rows of task ``name`` are PENDING, SCHEDULED, STARTED or RETRY."""
        # Waiting rows from their index, running ones through the owner index (few at a time).
        return int(self._call("count_unfinished", self._read,
                              "SELECT (SELECT count(*) FROM %s) + (SELECT count(*) FROM %s AND name = ?)"
                              % (WAITING_OF, RUNNING), (name, name))[0][0])

    def waiting(self, state: str, limit: int) -> List[TaskRow]:
        """Up to ``limit`` unowned rows in a waiting ``state``: ready ones in start order, then held ones by due time."""
        return [task_row(r) for r in self._call("waiting", self._waiting, state, int(limit))]

    def _waiting(self, conn: sqlite3.Connection, state: str, limit: int) -> List[tuple]:
        found: List[tuple] = []
        for source in (READY, GATED, PARKED):
            found += conn.execute("SELECT %s FROM %s AND state = ? LIMIT ?" % (COLS, source), (state, limit))
        found.sort(key=lambda r: (-r[_PRIORITY], r[_CREATED]))  # the lines merged, in start order
        del found[limit:]
        return found + conn.execute("SELECT %s FROM %s AND state = ? ORDER BY due LIMIT ?" % (COLS, HELD),
                                    (state, limit - len(found))).fetchall()

    def count_waiting(self) -> Dict[str, int]:
        """``{state: rows}`` for the waiting states (PENDING, SCHEDULED, RETRY), from their index alone."""
        return dict(self._call("count_waiting", self._read,
                               "SELECT state, count(*) FROM %s GROUP BY state" % WAITING, ()))

    def _read(self, conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> List[tuple]:
        return conn.execute(sql, params).fetchall()

    def pragma(self, name: str) -> Any:
        """The value of ``PRAGMA name`` on the engine's own connection (synchronous, journal_mode, ...)."""
        if not name.replace("_", "").isalpha():
            raise ConfigError("pragma name %r: letters and underscores only" % (name,))
        rows = self._call("pragma", self._read, "PRAGMA %s" % name, ())
        return rows[0][0] if rows else None

    def next_due(self, queues: Optional[Sequence[str]]) -> Optional[float]:
        """Seconds (database clock) until the earliest unowned row is due; 0 if one is due now."""
        if queues is not None and not queues:
            return None
        where, params = queue_filter(queues)
        due = self._call("next_due", self._read,
                         "SELECT CASE WHEN EXISTS (SELECT 1 FROM %s %s) OR EXISTS (SELECT 1 FROM %s %s) THEN 0 "
                         "ELSE (SELECT min(due) FROM %s) END" % (READY, where, GATED, where, HELD), params * 2)[0][0]
        return None if due is None else max(0.0, due - time.time())

    def reap(self, max_lease_losses: int) -> List[TaskRow]:
        """Take back rows whose lease expired; returns them after the change."""
        return self._call("reap", self._reap, int(max_lease_losses or 0))

    def _reap(self, conn: sqlite3.Connection, most: int) -> List[TaskRow]:
        # A look without the write lock first: most reaps find nothing, and the running rows
        # (bounded by the nodes' slots) are all the owner index holds.
        if conn.execute("SELECT 1 FROM %s LIMIT 1" % PARKED).fetchone():
            with transaction(conn) as now:
                self._sweep(conn, now)
        if not conn.execute("SELECT 1 FROM %s AND lease_expires < ? LIMIT 1" % RUNNING,
                            (time.time(),)).fetchone():
            return []
        with transaction(conn) as now:
            expired = conn.execute("SELECT id, owner, cancel_requested, lease_losses FROM %s "
                                   "AND lease_expires < ?" % RUNNING, (now,)).fetchall()
            for row_id, owner, cancelled, losses in expired:
                poisoned = not cancelled and most > 0 and losses + 1 >= most
                final = cancelled or poisoned
                conn.execute(
                    "UPDATE greenqueue_tasks SET lease_losses = lease_losses + 1, owner = NULL, hold = %s, "
                    "lease_expires = NULL, updated_at = :now, state = :state, finished_at = :finished, "
                    "expires_at = :expires, "
                    "error_type = CASE WHEN :poisoned THEN 'LeaseLost' ELSE error_type END, "
                    "error = CASE WHEN :poisoned THEN :error ELSE error END WHERE id = :id" % READY_OR_GATED,
                    {"now": now, "id": row_id, "poisoned": poisoned,
                     "state": "CANCELLED" if cancelled else "FAILURE" if poisoned else "PENDING",
                     "finished": now if final else None, "expires": now + self.result_ttl if final else None,
                     "error": "lease lost %d times: the node running it stopped renewing its lease each time "
                              "(max_lease_losses=%d)" % (losses + 1, most)})
                conn.execute("INSERT OR IGNORE INTO greenqueue_lost (task_id, node) VALUES (?, ?)",
                             (row_id, owner))
            self._changes += 1
            ids = [r[0] for r in expired]
            back = [task_row(r) for part in chunks(ids) for r in conn.execute(
                "SELECT %s FROM greenqueue_tasks WHERE id IN (%s)" % (COLS, marks(part)), part)]
            self._unpark(conn, [r.limit_bucket for r in back])
            self._follow(conn, now, [r.id for r in back if r.state in FINAL])
            return back

    def _sweep(self, conn: sqlite3.Connection, now: float) -> None:
        """Unpark rows of keys with room (a node died between a run's end and its unpark, or its lease ran out)."""
        bucket: Optional[str] = None
        while True:
            found = conn.execute("SELECT limit_bucket, limit_n FROM %s %s ORDER BY limit_bucket LIMIT 1"
                                 % (PARKED, "AND limit_bucket > ?" if bucket is not None else ""),
                                 () if bucket is None else (bucket,)).fetchone()
            if found is None:
                return
            bucket, most = found
            room = (most or 1) - self._running_in(conn, now, [bucket]).get(bucket, 0)
            if room > 0:
                self._unpark(conn, [bucket] * room)
                self._changes += 1

    def prune(self, periodic_ttl: float) -> int:
        """Delete finished rows past ``expires_at`` and periodic keys older than ``periodic_ttl``."""
        return self._call("prune", self._prune, float(periodic_ttl))

    def _prune(self, conn: sqlite3.Connection, periodic_ttl: float) -> int:
        with transaction(conn) as now:
            tasks = conn.execute("DELETE FROM greenqueue_tasks WHERE expires_at < ? AND state IN %s"
                                 % str(tuple(FINAL)), (now,)).rowcount
            # A job's latest key stays: it is what last_fired() and catch_up start from.
            keys = conn.execute(
                "DELETE FROM greenqueue_periodic AS p WHERE fired_at < ? AND due < "
                "(SELECT max(due) FROM greenqueue_periodic q WHERE q.job = p.job)", (now - periodic_ttl,)).rowcount
            # Nodes that died without unregistering would otherwise be listed forever.
            conn.execute("DELETE FROM greenqueue_nodes WHERE heartbeat_at < ?",
                         (now - max(periodic_ttl, 10 * self.lease_timeout),))
            # Starts out of every window (a bucket's own gate drops its old ones as it goes).
            conn.execute("DELETE FROM greenqueue_starts WHERE until <= ?", (now,))
            # A group's members are pruned with their rows; its list a day after that.
            conn.execute("DELETE FROM greenqueue_groups WHERE created_at < ?", (now - self.result_ttl - 86400,))
            self._changes += 1
        return tasks + keys

    def limits(self) -> List[Tuple[str, str, Optional[int], int, int]]:
        """(kind, bucket, limit, in use, waiting) for each bucket of a rate or concurrency limit in use."""
        return self._call("limits", self._limits)

    @staticmethod
    def _limits(conn: sqlite3.Connection) -> List[Tuple[str, str, Optional[int], int, int]]:
        out: Dict[Tuple[str, str], List[Any]] = {}
        for kind, sql, params in (
                ("concurrency", "SELECT limit_bucket, max(limit_n), count(*), 0 FROM greenqueue_tasks INDEXED BY "
                 "greenqueue_tasks_limited WHERE owner IS NOT NULL AND limit_bucket IS NOT NULL AND state = 'STARTED' "
                 "GROUP BY limit_bucket", ()),
                ("concurrency", "SELECT limit_bucket, max(limit_n), 0, count(*) FROM %s GROUP BY limit_bucket"
                 % PARKED, ()),
                ("rate", "SELECT bucket, NULL, count(*), 0 FROM greenqueue_starts WHERE at <= ? AND until > ? "
                 "GROUP BY bucket", (time.time(),) * 2),
                ("rate", "SELECT rate_bucket, max(rate_n), 0, count(*) FROM greenqueue_tasks INDEXED BY "
                 "greenqueue_tasks_rated WHERE owner IS NULL AND hold = 'rate' GROUP BY rate_bucket", ())):
            for bucket, most, used, waiting in conn.execute(sql, params):
                got = out.setdefault((kind, bucket), [kind, bucket, None, 0, 0])
                got[2] = most if most is not None else got[2]
                got[3] += used
                got[4] += waiting
        return [(k, b, m, u, w) for k, b, m, u, w in out.values()]

    # -- reading (CLI, dashboard) ---------------------------------------------------------

    def counts(self) -> dict:
        """``{state: count}`` over all rows."""
        return dict(self._call("counts", self._read, "SELECT state, count(*) FROM greenqueue_tasks GROUP BY state",
                               ()))

    def rows(self, state: Optional[str] = None, limit: int = 50,
             name: Optional[str] = None) -> List[TaskRow]:
        """Rows, newest first, optionally of one state and task name."""
        sql, params = rows_query(COLS, "?", state, name, limit)
        if state and state.upper() == "STARTED":
            # Running rows are few and all in the owner index; other listings scan (the CLI's).
            sql = sql.replace("FROM greenqueue_tasks WHERE", "FROM greenqueue_tasks INDEXED BY "
                              "greenqueue_tasks_owner WHERE owner IS NOT NULL AND", 1)
        return [task_row(r) for r in self._call("rows", self._read, sql, params)]

    def requeue(self, row_id: Optional[str] = None) -> int:
        """FAILURE/CANCELLED rows (one, or all) back to PENDING with a fresh attempt budget."""
        return self._call("requeue", self._requeue, row_id)

    def _requeue(self, conn: sqlite3.Connection, row_id: Optional[str]) -> int:
        with transaction(conn) as now:
            back = conn.execute(
                "UPDATE greenqueue_tasks SET state = 'PENDING', eta = NULL, due = :now, hold = %s, attempts = 0, "
                "lease_losses = 0, cancel_requested = 0, finished_at = NULL, expires_at = NULL, result = NULL, "
                "error_type = NULL, error = NULL, traceback = NULL, updated_at = :now "
                "WHERE state IN ('FAILURE', 'CANCELLED') %s RETURNING id" % (READY_OR_GATED, "AND id = :id" if row_id else ""),
                {"now": now, "id": row_id}).fetchall()
            ids = [r[0] for r in back]
            for part in chunks(ids):
                conn.execute("DELETE FROM greenqueue_lost WHERE task_id IN (%s)" % marks(part), part)
            self._changes += 1
            return len(ids)

    def purge(self, state: str) -> int:
        """Delete rows of one final state; JournalError for unfinished states."""
        state = state.upper()
        if state not in FINAL:
            raise self._fail("refusing to purge %s tasks; purge one of %s (cancel unfinished tasks first)"
                             % (state, ", ".join(FINAL)))
        return self._call("purge", self._write_sql, "DELETE FROM greenqueue_tasks WHERE state = :state",
                          {"state": state})

    # -- wake-ups -----------------------------------------------------------------------------

    def wait_for_work(self, timeout: float) -> str:
        """Block this greenlet until the file changed ("work" when something is claimable, else "news") or ``timeout``."""
        deadline = time.monotonic() + max(0.0, float(timeout))
        while self._pool is not None:
            try:
                seen = self._call("wait_for_work", self._look)
                if seen:
                    return seen
            except JournalError as exc:
                # The claimer's own calls report the trouble; this one only stops hinting.
                log.warning("%s; no wake-up hints until it works again", exc)
                gevent.sleep(max(0.0, deadline - time.monotonic()))
                return ""
            left = deadline - time.monotonic()
            if left <= 0:
                return ""
            gevent.sleep(min(self.poll_interval, left))
        return ""

    def _look(self, conn: sqlite3.Connection) -> str:
        mark = (conn.execute("PRAGMA data_version").fetchone()[0], self._changes)
        if mark == self._seen:
            return ""
        first, self._seen = self._seen is None, mark
        if first:
            # This engine has seen nothing yet: whatever is due, the caller should look.
            return "work"
        return "work" if self._claimable(conn, None, time.time()) else "news"
