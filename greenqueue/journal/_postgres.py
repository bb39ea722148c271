"""The PostgreSQL engine: one database shared by every node of a cluster.

Concurrency model: every method runs in the calling greenlet and blocks only
that greenlet (psycopg waits through gevent's patched ``select`` once
``monkey.patch_all()`` ran; without patching they block the calling thread,
which is what tests and the CLI want). Statements borrow a connection from a
``psycopg_pool.ConnectionPool`` (its maintenance workers are threads, i.e.
greenlets under patching) in autocommit mode, so a one-statement method is one
round trip and one transaction; the few multi-statement methods open an
explicit transaction. ``wait_for_work`` owns a separate connection that only
LISTENs, used by one greenlet at a time (the node's claimer). The engine keeps
no task state in memory: claims, leases, the leader lease and periodic keys
live in the database, and every time is read from its clock
(``statement_timestamp()``) as epoch seconds. Nothing survives a fork: a child
process opens its own engine.

Failure model: a connection that cannot be had within ``timeout`` seconds, or
a statement that fails, raises :class:`JournalError` naming the DSN with its
password masked. The pool replaces broken connections by itself, so once
PostgreSQL is back the same engine works again; the LISTEN connection is
re-opened by the next ``wait_for_work``. A borrowed connection is pinged
first unless it worked within the last second and no connection has failed
since: a ping on every borrow would double the round trips of a busy node,
while this way a restart costs at most the calls already on their way.
"""

import json
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import conninfo as _conninfo
from psycopg.rows import tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import JournalError
from ._engine import FINAL, UNFINISHED, Heartbeat, NodeInfo, TaskRow, checked_finishes, rows_query
from ._gate import Candidate, decide
from ._links import follow
from ._postgres_sql import (ANY_READY, CHANNEL, CLAIM, CLAIM_EVERY, CLAIM_IDS, CLAIM_QUEUES, CLAIMABLE, COLS, FIELDS,
                            FINISH, FINISH_FIELDS, FINISH_MANY, GATE_CANDIDATES, GATE_EVERY, GATE_EVERY_PREFIX, GATED,
                            GATED_ANYWHERE, GATED_FLAG, GATED_ON_QUEUES, HEARTBEAT, HELD, INSERT, INSERT_FIELDS, LEAD,
                            LOCK_BUCKETS, MIGRATION_LOCK, MIN_SERVER, NEXT_DUE, NOW, PARKED, READY, READY_OR_GATED,
                            LIMITS, REAP, RELEASE, RESULTS_HINT, RETRY, RUNNING_IN, SCHEMA_VERSION, SWEEP,
                            UNFINISHED as UNFINISHED_SQL, mask_dsn, migrate)

__all__ = ["PostgresEngine", "SCHEMA_VERSION", "mask_dsn"]

log = logging.getLogger(__name__)
#: Seconds between two looks at the task table's statistics (from the heartbeat).
STATS_EVERY = 10.0
#: The table is analyzed when it holds this many times the rows its statistics say ...
GROWN_BY = 4
#: ... counting a table the statistics call smaller than this as this size.
GROWN_FROM = 1000

_PRIORITY = FIELDS.index("priority")

# A connection that worked this recently is lent without a ping (see the docstring).
_TRUST_FOR = 1.0

# Errors a statement may be retried after: the database rolled it back whole, nothing was half-written.
_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


def _secrets(dsn: str) -> List[str]:
    """Every spelling of the DSN's password that a message could echo."""
    found = set()
    try:
        password = _conninfo.conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        password = None
    if password:
        found.add(str(password))
    if "://" in dsn:
        raw = urlsplit(dsn).password
        if raw:
            found.update((raw, unquote(raw)))
    return sorted(found, key=len, reverse=True)


class _Tx:
    """The workflow rules' view of an open transaction (they write ``?`` placeholders)."""

    ready_or_gated = READY_OR_GATED

    def __init__(self, conn: Any, now: float, result_ttl: float) -> None:
        self.conn, self.now, self.result_ttl = conn, now, result_ttl

    def rows(self, sql: str, params: Sequence[Any]) -> List[tuple]:
        """The rows of a statement."""
        return list(self.conn.execute(sql.replace("?", "%s"), params).fetchall())

    def run(self, sql: str, params: Sequence[Any]) -> int:
        """Run a statement; the rows it changed."""
        return int(self.conn.execute(sql.replace("?", "%s"), params).rowcount)


def _linked(items: Sequence[tuple], done: Optional[List[bool]]) -> List[str]:
    """Ids of finish items whose rows workflow steps wait for (finished ones, when ``done`` is given)."""
    return [item[0] for n, item in enumerate(items)
            if len(item) > 10 and item[10] and (done is None or done[n])]


def _first(row: Optional[tuple]) -> Any:
    """The first column of a row a statement always returns (an aggregate, the clock)."""
    if row is None:
        raise JournalError("a statement that always returns a row returned none")
    return row[0]


def _rows_as_arrays(rows: Sequence[TaskRow], owner: Optional[str], lease: float) -> Dict[str, Any]:
    """INSERT's parameters: one array per column, the owner and the lease."""
    params: Dict[str, Any] = {f: [getattr(r, f) for r in rows] for f in INSERT_FIELDS}
    params.update(payload=[r.payload or b"" for r in rows], owner=owner, lease=lease)
    return params


class _Connection(psycopg.Connection):
    """A pooled connection that remembers when it last worked, and in which failure generation."""

    __slots__ = ("worked_at", "generation")


class PostgresEngine:
    """The Engine protocol on PostgreSQL 13+ through psycopg 3 and psycopg_pool."""

    #: The schema version this engine writes.
    schema_version = SCHEMA_VERSION

    #: Seconds within which a spawn fails while PostgreSQL is unreachable (the README's
    #: promise); a group-committing store keeps it for spawns queued behind a stuck batch.
    spawn_deadline = 5.0

    def __init__(self, dsn: str, lease_timeout: float = 30.0, pool_size: int = 8,
                 timeout: float = 3.0, result_ttl: float = 3600.0) -> None:
        self.dsn = dsn
        self.display = mask_dsn(dsn)
        self.lease_timeout = float(lease_timeout)
        #: Seconds a call waits for a connection before raising JournalError.
        self.timeout = float(timeout)
        #: How long rows the engine finishes by itself (poison pill, cancel at reap) are kept.
        self.result_ttl = float(result_ttl)
        self._pool_size = max(2, int(pool_size))
        self._secrets = _secrets(dsn)
        self._pool: Optional[ConnectionPool[_Connection]] = None
        self._listener: Optional[psycopg.Connection] = None
        self._listen_lock = threading.Lock()
        self._closed = threading.Event()
        self._listen_down = False
        self._generation = 0   # grows whenever a pooled connection fails
        self._stats_checked = 0.0  # monotonic time of the last look at the task table's statistics

    def __repr__(self) -> str:
        return "PostgresEngine(%r)" % self.display

    # -- connections and errors ------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _error(self, doing: str, exc: BaseException) -> JournalError:
        if isinstance(exc, PoolTimeout):
            reason = ("cannot reach PostgreSQL within %.0f s (is it running and reachable? greenqueue "
                      "reconnects by itself once it is)" % self.timeout)
        elif isinstance(exc, psycopg.OperationalError):
            reason = "lost PostgreSQL (%s); greenqueue reconnects by itself once it is back" % exc
        else:
            reason = "%s: %s" % (type(exc).__name__, exc)
        return JournalError(self._scrub("journal %s: %s failed: %s" % (self.display, doing, reason)))

    def _connect_kwargs(self) -> Dict[str, Any]:
        try:
            given = _conninfo.conninfo_to_dict(self.dsn)
        except psycopg.Error as exc:
            raise JournalError(self._scrub("journal %s: not a PostgreSQL DSN (%s); use "
                                           "postgresql://user:password@host:port/database"
                                           % (self.display, exc))) from None
        # libpq's connect_timeout has a floor of 2 s; a dead host must not hold a spawn longer.
        defaults = {"connect_timeout": max(2, int(self.timeout)), "application_name": "greenqueue",
                    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                    "keepalives_count": 3, "tcp_user_timeout": int(self.timeout * 1000) + 2000}
        kwargs: Dict[str, Any] = {k: v for k, v in defaults.items() if k not in given}
        kwargs["autocommit"] = True
        return kwargs

    @contextmanager
    def _conn(self, doing: str) -> Iterator[psycopg.Connection]:
        if self._pool is None:
            raise JournalError("journal %s: %s failed: the engine is not open" % (self.display, doing))
        try:
            with self._pool.connection(timeout=self.timeout) as conn:
                yield conn
                self._worked(conn)
        except psycopg.OperationalError as exc:
            # Every other idle connection may be as dead as this one: ping each before use.
            self._generation += 1
            raise self._error(doing, exc) from None
        except (PoolTimeout, psycopg.Error) as exc:
            raise self._error(doing, exc) from None

    def _worked(self, conn: Any) -> None:
        conn.worked_at = time.monotonic()
        conn.generation = self._generation

    def _check(self, conn: Any) -> None:
        if (getattr(conn, "generation", -1) == self._generation
                and time.monotonic() - getattr(conn, "worked_at", 0.0) < _TRUST_FOR):
            return
        ConnectionPool.check_connection(conn)
        self._worked(conn)

    def _one(self, doing: str, sql: str, params: Any = None) -> Optional[tuple]:
        with self._conn(doing) as conn:
            return conn.execute(sql, params).fetchone()

    def _all(self, doing: str, sql: str, params: Any = None) -> List[tuple]:
        with self._conn(doing) as conn:
            return conn.execute(sql, params).fetchall()

    def _count(self, doing: str, sql: str, params: Any = None) -> int:
        with self._conn(doing) as conn:
            return conn.execute(sql, params).rowcount

    def _value(self, doing: str, sql: str, params: Any = None) -> Any:
        """The first column of a statement that always returns one row (an aggregate, RETURNING of an upsert)."""
        found = self._one(doing, sql, params)
        if found is None:
            raise JournalError("journal %s: %s failed: the statement returned no row" % (self.display, doing))
        return found[0]

    # -- open / close ------------------------------------------------------------------

    def open(self) -> None:
        """Connect, create or migrate the schema under a lock, check the version (JournalError)."""
        if self._pool is not None:
            return
        kwargs = self._connect_kwargs()
        # One plain connection first: its error says why (refused, no such database, bad
        # password), where a pool would only time out.
        try:
            with psycopg.connect(self.dsn, **kwargs) as conn:
                if conn.info.server_version < MIN_SERVER:
                    raise JournalError("journal %s: PostgreSQL %s is too old; greenqueue needs 13 or newer"
                                       % (self.display, conn.info.parameter_status("server_version")))
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                    migrate(conn, self.display)
        except psycopg.Error as exc:
            raise JournalError(self._scrub(
                "journal %s: cannot open it: %s. Check that PostgreSQL runs and the URL's host, port, user, "
                "password and database (and pg_hba.conf)" % (self.display, str(exc).strip()))) from None
        # reconnect_timeout bounds the pool's own backoff: after it gives up, the next
        # borrow starts a fresh attempt, so recovery after an outage takes seconds, not minutes.
        pool = ConnectionPool(self.dsn, kwargs=kwargs, min_size=1, max_size=self._pool_size, open=False,
                              name="greenqueue", timeout=self.timeout, check=self._check,
                              connection_class=_Connection, reconnect_timeout=max(5.0, self.timeout * 2))
        try:
            pool.open(wait=True, timeout=self.timeout)
        except PoolTimeout:
            pool.close(timeout=1.0)
            raise JournalError("journal %s: cannot connect to PostgreSQL within %.0f s; check that it runs "
                               "and accepts %d connections from here" % (self.display, self.timeout,
                                                                        self._pool_size + 1)) from None
        self._pool = pool
        self._closed.clear()

    def close(self) -> None:
        """Release connections; rows keep their state."""
        self._closed.set()
        self._drop_listener()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=5.0)

    # -- tasks ---------------------------------------------------------------------------

    def enqueue(self, rows: Sequence[TaskRow], owner: Optional[str] = None,
                connection: Any = None) -> List[TaskRow]:
        """Insert ``rows`` in one commit (or the caller's transaction) and return what is stored, in order."""
        rows = list(rows)
        if not rows:
            return []
        params = _rows_as_arrays(rows, owner, self.lease_timeout)
        if connection is not None:
            if not isinstance(connection, psycopg.Connection):
                raise JournalError("journal %s: connection= takes an open psycopg 3 connection, not %s"
                                   % (self.display, type(connection).__name__))
            # The caller's transaction: never commit or roll it back here.
            try:
                return self._enqueue_on(connection, rows, params)
            except psycopg.Error as exc:
                raise self._error("enqueue (in the caller's transaction)", exc) from None
        # One INSERT is one commit; the lookup of rows that were already there comes after it.
        with self._conn("enqueue") as conn:
            return self._enqueue_on(conn, rows, params)

    def _enqueue_on(self, conn: Any, rows: List[TaskRow], params: Dict[str, Any]) -> List[TaskRow]:
        # The caller's connection may have any row factory; these rows are read by position.
        with conn.cursor(row_factory=tuple_row) as cur:
            stored = {r[0]: TaskRow(*r[:-1]) for r in cur.execute(INSERT, params).fetchall()}
            if len(stored) < len(rows):
                missing = [r for r in rows if r.id not in stored]
                keys = [r.idempotency_key for r in missing if r.idempotency_key]
                cur.execute("SELECT %s FROM greenqueue_tasks WHERE id = ANY(%%s) OR idempotency_key = ANY(%%s)"
                            % COLS, ([r.id for r in missing], keys))
                existing = [TaskRow(*r) for r in cur.fetchall()]
            else:
                existing = []
        by_id = dict(stored)
        by_id.update((r.id, r) for r in existing)
        by_key = {r.idempotency_key: r for r in list(stored.values()) + existing if r.idempotency_key}
        out: List[TaskRow] = []
        for row in rows:
            found = by_key.get(row.idempotency_key) if row.idempotency_key else None
            found = found or by_id.get(row.id)
            if found is None:
                raise JournalError("journal %s: task %s conflicted with a row that is gone (pruned or purged "
                                   "meanwhile); spawn it again" % (self.display, row.id))
            out.append(found)
        return out

    def claim(self, node: str, queues: Optional[Sequence[str]], limit: int) -> List[TaskRow]:
        """Claim up to ``limit`` due, unowned rows (oldest due first) for ``node``."""
        if limit <= 0 or (queues is not None and not queues):
            return []
        sql = CLAIM.format(queues=CLAIM_QUEUES if queues is not None else CLAIM_EVERY,
                           gated=GATED_ON_QUEUES if queues is not None else GATED_ANYWHERE)
        params = {"node": node, "limit": int(limit), "lease": self.lease_timeout,
                  "queues": list(queues) if queues is not None else None}
        got = self._all("claim", sql, params)
        if got and got[0][-1] and got[0][-1] < GATED_FLAG:
            got = self._all("claim", sql, params)  # rows became ready: claim among them too
        if got and got[0][-1] >= GATED_FLAG:
            return self._gate_claim(node, queues, params)
        got = [r for r in got if r[0] is not None]
        # UPDATE ... RETURNING does not keep the subquery's order.
        got.sort(key=lambda r: (-r[_PRIORITY], r[-2]))
        return [TaskRow(*r[:-2]) for r in got]

    def _gate_claim(self, node: str, queues: Optional[Sequence[str]], params: Dict[str, Any]) -> List[TaskRow]:
        """The claim when limited rows wait: the gate decides in one transaction, the buckets locked."""
        sql = GATE_CANDIDATES.format(prefix=GATE_EVERY_PREFIX if queues is None else "",
                                     queues=GATE_EVERY if queues is None else CLAIM_QUEUES)
        with self._conn("claim") as conn, conn.transaction():
            candidates = [Candidate(*r) for r in conn.execute(sql, params).fetchall()]
            buckets = sorted({b for c in candidates if c.gated for b in (c.rate_bucket, c.limit_bucket) if b})
            if buckets:
                conn.execute(LOCK_BUCKETS, (buckets,))
            now = _first(conn.execute("SELECT " + NOW).fetchone())
            verdict = decide(candidates, params["limit"], now,
                             lambda buckets: dict(conn.execute(RUNNING_IN, (buckets,)).fetchall()),
                             lambda bucket, since, n: self._starts_in(conn, bucket, since, n),
                             lambda bucket, at, task_id: conn.execute(
                                 "SELECT 1 FROM greenqueue_starts WHERE bucket = %s AND at = %s AND task_id = %s",
                                 (bucket, at, task_id)).fetchone() is not None)
            if verdict.park:
                conn.execute("UPDATE greenqueue_tasks SET hold = 'limit' WHERE id = ANY(%s)", (verdict.park,))
            if verdict.hold:
                conn.execute("UPDATE greenqueue_tasks t SET hold = 'rate', due = h.due FROM unnest(%s::text[], "
                             "%s::float8[]) AS h(id, due) WHERE t.id = h.id",
                             ([i for i, _ in verdict.hold], [d for _, d in verdict.hold]))
            if verdict.starts:
                conn.execute("INSERT INTO greenqueue_starts (bucket, at, until, task_id) SELECT * FROM "
                             "unnest(%s::text[], %s::float8[], %s::float8[], %s::text[])",
                             tuple(map(list, zip(*verdict.starts))))
            if not verdict.take:
                return []
            got = conn.execute(CLAIM_IDS, dict(params, ids=verdict.take)).fetchall()
        order = {row_id: n for n, row_id in enumerate(verdict.take)}
        return sorted((TaskRow(*r) for r in got), key=lambda r: order[r.id])

    @staticmethod
    def _starts_in(conn: Any, bucket: str, since: float, n: int) -> List[Tuple[float, str]]:
        """``bucket``'s latest ``n`` starts (made or reserved) after ``since``, oldest first; older ones go."""
        conn.execute("DELETE FROM greenqueue_starts WHERE bucket = %s AND at <= %s", (bucket, since))
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT at, task_id FROM greenqueue_starts WHERE bucket = %s ORDER BY at DESC LIMIT %s",
            (bucket, n)).fetchall()][::-1]

    def finish(self, row_id: str, node: str, attempt: int, state: str, result: Optional[bytes] = None,
               error_type: Optional[str] = None, error: Optional[str] = None,
               traceback: Optional[str] = None, ttl: float = 3600.0) -> bool:
        """Record the final state of ``node``'s attempt ``attempt``; False when fenced off."""
        if state not in FINAL:
            raise JournalError("journal %s: finish() takes a final state (%s), not %r"
                               % (self.display, ", ".join(FINAL), state))
        return self._value("finish", FINISH, (state, result, error_type, error, traceback, float(ttl),
                                              row_id, node, attempt)) == 1

    def finish_many(self, items: Sequence[tuple]) -> List[bool]:
        """``finish(*args)`` for each item in one statement and one commit (a node's group commit of results)."""
        items = checked_finishes(self.display, items)
        done = [False] * len(items)
        if not items:
            return done
        rounds = self._finish_rounds(items)
        with self._conn("finish") as conn:
            if len(rounds) == 1 and not _linked(items, None):
                self._finish_round(conn, items, rounds[0], done, retry=True)
            else:
                with conn.transaction():
                    for part in rounds:
                        self._finish_round(conn, items, part, done, retry=False)
                    self._follow(conn, _linked(items, done))
        return done

    def _follow(self, conn: Any, ended: List[str]) -> None:
        """Workflow steps waiting on ``ended`` rows get their turn or end, in the caller's transaction."""
        if ended:
            queues = follow(_Tx(conn, _first(conn.execute("SELECT " + NOW).fetchone()), self.result_ttl), ended)
            for queue in sorted(queues):  # delivered at commit, like every other hint
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, queue))

    @staticmethod
    def _finish_rounds(items: List[tuple]) -> List[List[int]]:
        # A row finished twice in one batch must behave as two finish() calls in a row
        # (the first may win, the second is fenced off): repeats go into a later round.
        rounds: List[List[int]] = []
        seen: Dict[str, int] = {}
        for n, item in enumerate(items):
            k = seen[item[0]] = seen.get(item[0], -1) + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(n)
        return rounds

    def _finish_round(self, conn: Any, items: List[tuple], part: List[int], done: List[bool],
                      retry: bool) -> None:
        params: Dict[str, Any] = {f: [items[n][k] for n in part] for k, f in enumerate(FINISH_FIELDS)}
        params["ttl"] = [float(t) for t in params["ttl"]]
        finished: Set[str] = set()
        for tries_left in (2, 1, 0):
            try:
                finished = {r[0] for r in conn.execute(FINISH_MANY, params).fetchall()}
                break
            except _RETRYABLE:
                # A heartbeat renewing the same rows may lock them in another order. Alone in
                # autocommit, the statement was rolled back whole, so running it again is safe.
                if tries_left == 0 or not retry:
                    raise
        for n in part:
            done[n] = items[n][0] in finished

    def write(self, node: str, claimed: Sequence[TaskRow], unclaimed: Sequence[TaskRow],
              finishes: Sequence[tuple]) -> Tuple[List[TaskRow], List[TaskRow], List[bool]]:
        """Insert ``claimed`` (owned by ``node``) and ``unclaimed`` rows and record ``finishes``, in one commit."""
        claimed, unclaimed = list(claimed), list(unclaimed)
        items = checked_finishes(self.display, finishes)
        # One part alone is one statement in autocommit: no BEGIN and COMMIT round trips.
        if not (claimed or unclaimed):
            return [], [], self.finish_many(items) if items else []
        if not items and not (claimed and unclaimed):
            return self.enqueue(claimed, owner=node), self.enqueue(unclaimed), []
        rounds = self._finish_rounds(items)
        tries = 3
        with self._conn("write") as conn:
            while True:
                tries -= 1
                try:
                    return self._write_on(conn, node, claimed, unclaimed, items, rounds)
                except _RETRYABLE:
                    # Deadlocked with a heartbeat over the same rows: the whole transaction was
                    # rolled back, nothing of it is written, so it runs again from the start.
                    if tries == 0:
                        raise

    def _write_on(self, conn: Any, node: str, claimed: List[TaskRow], unclaimed: List[TaskRow],
                  items: List[tuple], rounds: List[List[int]]) -> Tuple[List[TaskRow], List[TaskRow], List[bool]]:
        done = [False] * len(items)
        with conn.transaction():
            mine = self._enqueue_on(conn, claimed, _rows_as_arrays(claimed, node, self.lease_timeout)) \
                if claimed else []
            others = self._enqueue_on(conn, unclaimed, _rows_as_arrays(unclaimed, None, self.lease_timeout)) \
                if unclaimed else []
            for part in rounds:
                self._finish_round(conn, items, part, done, retry=False)
            self._follow(conn, _linked(items, done))
        return mine, others, done

    def retry(self, row_id: str, node: str, attempt: int, delay: float,
              error_type: Optional[str] = None, error: Optional[str] = None, counted: bool = True) -> bool:
        """Give the row back as RETRY, due in ``delay`` seconds; False when fenced off (``counted``: see Engine)."""
        params = {"id": row_id, "node": node, "attempt": attempt, "delay": max(0.0, float(delay)),
                  "error_type": error_type, "error": error, "ttl": self.result_ttl, "uncount": 0 if counted else 1}
        return bool(self._value("retry", RETRY, params) == 1)

    def release(self, row_ids: Iterable[str], node: str) -> int:
        """Hand rows this node holds back unowned (graceful shutdown), keeping their attempt count."""
        ids = list(row_ids)
        if not ids:
            return 0
        return int(self._value("release", RELEASE, {"ids": ids, "node": node, "ttl": self.result_ttl}))

    def cancel(self, row_id: str) -> Optional[str]:
        """Cancel a row: unowned rows end CANCELLED now, running ones get ``cancel_requested``."""
        with self._conn("cancel") as conn, conn.transaction():
            found = conn.execute("SELECT state, owner FROM greenqueue_tasks WHERE id = %s FOR UPDATE",
                                 (row_id,)).fetchone()
            if found is None:
                return None
            state, owner = found
            if state not in UNFINISHED:
                return state
            if owner is None:
                conn.execute("UPDATE greenqueue_tasks SET state = 'CANCELLED', finished_at = {now}, hold = NULL, "
                             "updated_at = {now}, expires_at = {now} + %s WHERE id = %s".format(now=NOW),
                             (self.result_ttl, row_id))
                self._follow(conn, [row_id])
            else:
                conn.execute("UPDATE greenqueue_tasks SET cancel_requested = true, updated_at = {now} "
                             "WHERE id = %s".format(now=NOW), (row_id,))
            return state

    def get(self, row_id: str) -> Optional[TaskRow]:
        """One row by id, or None."""
        found = self._one("get", "SELECT %s FROM greenqueue_tasks WHERE id = %%s" % COLS, (row_id,))
        return TaskRow(*found) if found else None

    def get_many(self, ids: Sequence[str]) -> List[TaskRow]:
        """The rows with these ids that exist, in one query (any order)."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            return []
        return [TaskRow(*r) for r in self._all("get_many", "SELECT %s FROM greenqueue_tasks WHERE id = ANY(%%s)"
                                               % COLS, (ids,))]

    def count_unfinished(self, name: str) -> int:
        """How many rows of task ``name`` are PENDING, SCHEDULED, STARTED or RETRY."""
        return int(self._value("count_unfinished", "SELECT count(*) FROM greenqueue_tasks WHERE name = %%s "
                               "AND state IN %s" % UNFINISHED_SQL, (name,)))

    def waiting(self, state: str, limit: int) -> List[TaskRow]:
        """Up to ``limit`` unowned rows in a waiting ``state``: ready ones in start order, then held ones by due time."""
        ready = self._all("waiting", "SELECT %s FROM greenqueue_tasks WHERE (%s OR %s OR %s) AND state = %%s "
                          "ORDER BY priority DESC, due, created_at LIMIT %%s" % (COLS, READY, GATED, PARKED),
                          (state, int(limit)))
        held = self._all("waiting", "SELECT %s FROM greenqueue_tasks WHERE %s AND state = %%s ORDER BY due "
                         "LIMIT %%s" % (COLS, HELD), (state, int(limit) - len(ready))) if len(ready) < limit else []
        return [TaskRow(*r) for r in ready + held]

    def count_waiting(self) -> Dict[str, int]:
        """``{state: rows}`` for the waiting states (PENDING, SCHEDULED, RETRY)."""
        return dict(self._all("count_waiting", "SELECT state, count(*) FROM greenqueue_tasks WHERE state IN %s "
                              "GROUP BY state" % CLAIMABLE))

    def next_due(self, queues: Optional[Sequence[str]]) -> Optional[float]:
        """Seconds (database clock) until the earliest unowned row is due; 0 if one is due now."""
        if queues is not None and not queues:
            return None
        sql = NEXT_DUE.format(queues=CLAIM_QUEUES if queues is not None else ANY_READY)
        wait = self._value("next_due", sql, {"queues": list(queues) if queues is not None else None})
        return None if wait is None else max(0.0, wait)

    def reap(self, max_lease_losses: int) -> List[TaskRow]:
        """Take back rows whose lease expired; returns them after the change."""
        with self._conn("reap") as conn, conn.transaction():
            got = conn.execute(REAP, {"max": int(max_lease_losses or 0), "ttl": self.result_ttl}).fetchall()
            rows = [TaskRow(*r[:-1]) for r in got]
            # A run that ended here (cancelled, poisoned) ends or releases the steps after it too.
            self._follow(conn, [r.id for r in rows if r.state in FINAL and (r.then_ids or r.error_ids)])
        self._value("reap", SWEEP)
        return rows

    def enqueue_workflow(self, rows: Sequence[TaskRow], groups: Dict[str, List[str]]) -> List[TaskRow]:
        """Insert a workflow's steps and its groups' member lists in one commit."""
        rows = list(rows)
        with self._conn("enqueue") as conn, conn.transaction():
            stored = self._enqueue_on(conn, rows, _rows_as_arrays(rows, None, self.lease_timeout))
            if groups:
                conn.execute("INSERT INTO greenqueue_groups (id, members, created_at) SELECT g, m, {now} "
                             "FROM unnest(%s::text[], %s::text[]) AS u(g, m) ON CONFLICT DO NOTHING".format(now=NOW),
                             (list(groups), [json.dumps(m) for m in groups.values()]))
        return stored

    def group(self, group_id: str) -> Optional[List[str]]:
        """The member ids of a group a workflow recorded, or None."""
        found = self._one("group", "SELECT members FROM greenqueue_groups WHERE id = %s", (group_id,))
        return list(json.loads(found[0])) if found else None

    def prune(self, periodic_ttl: float) -> int:
        """Delete finished rows past ``expires_at`` and periodic keys older than ``periodic_ttl``."""
        with self._conn("prune") as conn:
            tasks = conn.execute("DELETE FROM greenqueue_tasks WHERE expires_at < {now} AND state IN {final}"
                                 .format(now=NOW, final=str(tuple(FINAL))), ()).rowcount
            # A job's latest key stays: it is what last_fired() and catch_up start from.
            keys = conn.execute(
                "DELETE FROM greenqueue_periodic p WHERE fired_at < {now} - %s AND due < "
                "(SELECT max(due) FROM greenqueue_periodic q WHERE q.job = p.job)".format(now=NOW),
                (float(periodic_ttl),)).rowcount
            # Nodes that died without unregistering would otherwise be listed forever.
            conn.execute("DELETE FROM greenqueue_nodes WHERE heartbeat_at < {now} - %s".format(now=NOW),
                         (max(float(periodic_ttl), 10 * self.lease_timeout),))
            # Starts out of every window (a bucket's own gate drops its old ones as it goes).
            conn.execute("DELETE FROM greenqueue_starts WHERE until <= {now}".format(now=NOW))
            # A group's members are pruned with their rows; its list a day after that.
            conn.execute("DELETE FROM greenqueue_groups WHERE created_at < {now} - %s".format(now=NOW),
                         (self.result_ttl + 86400,))
        return tasks + keys

    def limits(self) -> List[Tuple[str, str, Optional[int], int, int]]:
        """(kind, bucket, limit, in use, waiting) for each bucket of a rate or concurrency limit in use."""
        return [(r[0], r[1], r[2], int(r[3]), int(r[4])) for r in self._all("limits", LIMITS)]

    # -- nodes -----------------------------------------------------------------------------

    def register(self, node: NodeInfo) -> None:
        """Add or refresh this node's row."""
        self._count("register", """
            INSERT INTO greenqueue_nodes (id, host, pid, queues, started_at, heartbeat_at, running)
            VALUES (%s, %s, %s, %s, coalesce(%s, {now}), {now}, %s)
            ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid, queues = excluded.queues,
                heartbeat_at = excluded.heartbeat_at, running = excluded.running""".format(now=NOW),
                    (node.id, node.host, node.pid, node.queues, node.started_at, node.running))

    def heartbeat(self, node: str, running: int) -> Heartbeat:
        """Renew the leases of every row ``node`` owns, in one statement, and report news."""
        found = self._one("heartbeat", HEARTBEAT,
                          {"node": node, "running": int(running), "lease": self.lease_timeout})
        if found is None:
            raise JournalError("journal %s: heartbeat failed: the statement returned no row" % self.display)
        renewed, cancel, lost, now, _ = found
        self._analyze_if_grown()
        return Heartbeat(renewed=renewed, cancel=list(cancel), lost=list(lost), now=now)

    def _analyze_if_grown(self) -> None:
        """ANALYZE the task table when it holds several times the rows its statistics say.

        A prepared statement's generic plan made while the table held a few rows updates
        the claimed ids through a sequential scan, and keeps it until the statistics change:
        claims run at half their rate after a burst into a fresh database until autoanalyze
        comes round (a minute by default). The heartbeat looks at most every STATS_EVERY s.
        """
        now = time.monotonic()
        if now - self._stats_checked < STATS_EVERY:
            return
        self._stats_checked = now
        found = self._one("statistics", "SELECT greatest(c.reltuples, 0), coalesce(s.n_live_tup, 0) FROM pg_class c "
                                        "LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid "
                                        "WHERE c.oid = 'greenqueue_tasks'::regclass")
        if found is None:
            return
        planned, live = found
        if live > GROWN_BY * max(planned, GROWN_FROM):
            log.info("journal %s: the task table holds %d rows against the %d its statistics say; analyzing it "
                     "so the claim's plan follows", self.display, live, planned)
            with self._conn("analyze") as conn:
                conn.execute("ANALYZE greenqueue_tasks")

    def unregister(self, node: str) -> None:
        """Remove this node's row (clean exit)."""
        with self._conn("unregister") as conn:
            conn.execute("DELETE FROM greenqueue_nodes WHERE id = %s", (node,))
            # A leader that leaves cleanly hands over now instead of after a lease timeout.
            conn.execute("UPDATE greenqueue_leader SET lease_expires = {now} WHERE node = %s".format(now=NOW),
                         (node,))

    def nodes(self) -> List[NodeInfo]:
        """Every node with a recent heartbeat, oldest first."""
        got = self._all("nodes", "SELECT id, host, pid, queues, started_at, heartbeat_at, running "
                                 "FROM greenqueue_nodes WHERE heartbeat_at >= {now} - %s "
                                 "ORDER BY started_at, id".format(now=NOW), (self.lease_timeout,))
        return [NodeInfo(*r) for r in got]

    # -- scheduler ----------------------------------------------------------------------------

    def lead(self, node: str) -> Optional[int]:
        """Take or renew the scheduler's leader lease; the epoch while ``node`` leads, else None."""
        found = self._one("lead", LEAD, {"node": node, "lease": self.lease_timeout})
        return found[0] if found else None

    def fire(self, job: str, due: float, epoch: int, row: TaskRow) -> bool:
        """Enqueue ``row`` as ``job``'s run for instant ``due``, once, while ``epoch`` still leads."""
        with self._conn("fire") as conn, conn.transaction():
            # FOR SHARE holds off a new leader's lead() until this commit, so a fire either
            # lands before the hand-over or sees the new epoch and stops.
            current = conn.execute("SELECT epoch FROM greenqueue_leader WHERE id = 1 FOR SHARE").fetchone()
            if current is None or current[0] != epoch:
                return False
            if conn.execute("INSERT INTO greenqueue_periodic (job, due, fired_at, task_id) "
                            "VALUES (%s, %s, {now}, %s) ON CONFLICT DO NOTHING".format(now=NOW),
                            (job, float(due), row.id)).rowcount != 1:
                return False
            self._enqueue_on(conn, [row], _rows_as_arrays([row], None, self.lease_timeout))
            return True

    def last_fired(self, job: str) -> Optional[float]:
        """The latest due instant enqueued for ``job``, or None."""
        return self._value("last_fired", "SELECT max(due) FROM greenqueue_periodic WHERE job = %s", (job,))

    def anchor(self, job: str, phase: float) -> float:
        """Store ``phase`` as ``job``'s anchor unless one exists; return the stored anchor."""
        with self._conn("anchor") as conn:
            conn.execute("INSERT INTO greenqueue_anchors (job, phase, created_at) VALUES (%s, %s, {now}) "
                         "ON CONFLICT (job) DO NOTHING".format(now=NOW), (job, float(phase)))
            # A separate statement: its snapshot includes a concurrent node's insert that won.
            found = conn.execute("SELECT phase FROM greenqueue_anchors WHERE job = %s", (job,)).fetchone()
        if found is None:
            raise JournalError("journal %s: anchor of %s failed: the statement returned no row"
                               % (self.display, job))
        return float(found[0])

    # -- reading (CLI, dashboard) -----------------------------------------------------------------

    def counts(self) -> dict:
        """``{state: count}`` over all rows."""
        return dict(self._all("counts", "SELECT state, count(*) FROM greenqueue_tasks GROUP BY state"))

    def rows(self, state: Optional[str] = None, limit: int = 50,
             name: Optional[str] = None) -> List[TaskRow]:
        """Rows, newest first, optionally of one state and task name."""
        sql, params = rows_query(COLS, "%s", state, name, limit)
        return [TaskRow(*r) for r in self._all("rows", sql, params)]

    def requeue(self, row_id: Optional[str] = None) -> int:
        """FAILURE/CANCELLED rows (one, or all) back to PENDING with a fresh attempt budget."""
        sql = """WITH back AS (
                     UPDATE greenqueue_tasks SET state = 'PENDING', eta = NULL, due = {now}, hold = {ready_or_gated}, attempts = 0,
                         lease_losses = 0, cancel_requested = false, lost_by = NULL, finished_at = NULL,
                         expires_at = NULL, result = NULL, error_type = NULL, error = NULL, traceback = NULL,
                         updated_at = {now}
                     WHERE state IN ('FAILURE', 'CANCELLED') {one} RETURNING queue),
                 hint AS (SELECT pg_notify('{channel}', q) FROM (SELECT DISTINCT queue AS q FROM back) d)
                 SELECT count(*), (SELECT count(*) FROM hint) FROM back""".format(
            now=NOW, channel=CHANNEL, one="AND id = %s" if row_id else "", ready_or_gated=READY_OR_GATED)
        return int(self._value("requeue", sql, (row_id,) if row_id else None))

    def purge(self, state: str) -> int:
        """Delete rows of one final state; JournalError for unfinished states."""
        state = state.upper()
        if state not in FINAL:
            raise JournalError("journal %s: refusing to purge %s tasks; purge one of %s (cancel unfinished "
                               "tasks first)" % (self.display, state, ", ".join(FINAL)))
        return self._count("purge", "DELETE FROM greenqueue_tasks WHERE state = %s", (state,))

    # -- wake-ups ------------------------------------------------------------------------------------

    def wait_for_work(self, timeout: float) -> str:
        """Block this greenlet until a hint ("work": a queue's name; "news": results, ``*``) or ``timeout``."""
        timeout = max(0.0, float(timeout))
        with self._listen_lock:
            conn, fresh = self._listening()
            if conn is None:
                # PostgreSQL is away: degrade to polling (the claimer's own calls report the outage).
                self._closed.wait(timeout)
                return ""
            if fresh:
                # Hints sent while nobody listened are lost; make the caller look now.
                return "work"
            try:
                got = list(conn.notifies(timeout=timeout, stop_after=1))
                if got:
                    # One look at the table answers every hint already here.
                    got += list(conn.notifies(timeout=0))
                if not got:
                    return ""
                return "work" if any(n.payload != RESULTS_HINT for n in got) else "news"
            except psycopg.Error as exc:
                if not self._closed.is_set():
                    log.warning("journal %s: the LISTEN connection broke (%s); re-opening it",
                                self.display, self._scrub(str(exc)))
                self._drop_listener()
                return "" if self._closed.is_set() else "work"

    def _listening(self) -> Tuple[Optional[psycopg.Connection], bool]:
        """The LISTEN connection and whether it was (re)opened just now; (None, False) when unreachable."""
        conn = self._listener
        if conn is not None and not conn.closed and not conn.broken:
            return conn, False
        self._drop_listener()
        if self._closed.is_set():
            return None, False
        try:
            conn = psycopg.connect(self.dsn, **self._connect_kwargs())
            conn.execute("LISTEN %s" % CHANNEL)
        except psycopg.Error as exc:
            if not self._listen_down:
                log.warning("journal %s: cannot LISTEN for wake-ups (%s); polling until PostgreSQL is back",
                            self.display, self._scrub(str(exc)))
            self._listen_down = True
            return None, False
        if self._listen_down:
            log.info("journal %s: listening for wake-ups again", self.display)
        self._listen_down = False
        self._listener = conn
        return conn, True

    def _drop_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass  # already broken; closing is only about freeing the socket
