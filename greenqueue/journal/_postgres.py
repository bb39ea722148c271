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

import dataclasses
import logging
import re
import threading
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import psycopg
from psycopg import conninfo as _conninfo
from psycopg.rows import tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import JournalError
from ._engine import FINAL, UNFINISHED, Heartbeat, NodeInfo, TaskRow

__all__ = ["PostgresEngine", "SCHEMA_VERSION", "mask_dsn"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_MAGIC = "greenqueue-journal"
_CHANNEL = "greenqueue"
# Any constant works as long as every greenqueue version uses the same one:
# it serialises schema creation and migration across nodes starting together.
_MIGRATION_LOCK = 0x677265656E71  # "greenq"
_MIN_SERVER = 130000
_TABLES = ("greenqueue_meta", "greenqueue_tasks", "greenqueue_nodes", "greenqueue_leader",
           "greenqueue_periodic", "greenqueue_anchors")

# statement_timestamp(), not now(): a statement in a caller's long transaction
# (enqueue(connection=)) still gets a fresh lease and due time.
NOW = "extract(epoch from statement_timestamp())::float8"
_CLAIMABLE = "('PENDING', 'SCHEDULED', 'RETRY')"

# A connection that worked this recently is lent without a ping (see the docstring).
_TRUST_FOR = 1.0

_FIELDS = [f.name for f in dataclasses.fields(TaskRow)]
_COLS = ", ".join(_FIELDS)
_TCOLS = ", ".join("t." + f for f in _FIELDS)

# Version N's statements bring a database from version N - 1 to N.
_MIGRATIONS: Dict[int, List[str]] = {1: [
    "CREATE TABLE greenqueue_meta (key text PRIMARY KEY, value text NOT NULL)",
    """CREATE TABLE greenqueue_tasks (
        id text PRIMARY KEY,
        name text NOT NULL,
        payload bytea NOT NULL,
        serializer text NOT NULL,
        queue text NOT NULL,
        state text NOT NULL,
        eta float8,
        due float8 NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        max_attempts integer NOT NULL DEFAULT 1,
        lease_losses integer NOT NULL DEFAULT 0,
        idempotency_key text,
        owner text,
        lease_expires float8,
        cancel_requested boolean NOT NULL DEFAULT false,
        lost_by text[],
        created_at float8 NOT NULL,
        updated_at float8 NOT NULL,
        started_at float8,
        finished_at float8,
        expires_at float8,
        result bytea,
        error_type text,
        error text,
        traceback text,
        note text) WITH (fillfactor = 90)""",
    "CREATE INDEX greenqueue_tasks_due ON greenqueue_tasks (due) WHERE owner IS NULL AND state IN "
    + _CLAIMABLE,
    # Reap finds expired leases through this index too: an index on lease_expires would
    # make every heartbeat's renewal a non-HOT update of every running row.
    "CREATE INDEX greenqueue_tasks_owner ON greenqueue_tasks (owner) WHERE owner IS NOT NULL",
    "CREATE INDEX greenqueue_tasks_lost ON greenqueue_tasks (id) WHERE lost_by IS NOT NULL",
    "CREATE UNIQUE INDEX greenqueue_tasks_idempotency ON greenqueue_tasks (idempotency_key) "
    "WHERE idempotency_key IS NOT NULL",
    "CREATE INDEX greenqueue_tasks_expires ON greenqueue_tasks (expires_at) WHERE expires_at IS NOT NULL",
    "CREATE INDEX greenqueue_tasks_created ON greenqueue_tasks (created_at)",
    "CREATE INDEX greenqueue_tasks_state ON greenqueue_tasks (state, created_at)",
    """CREATE TABLE greenqueue_nodes (
        id text PRIMARY KEY, host text NOT NULL, pid integer NOT NULL, queues text[],
        started_at float8 NOT NULL, heartbeat_at float8 NOT NULL, running integer NOT NULL DEFAULT 0)""",
    """CREATE TABLE greenqueue_leader (
        id integer PRIMARY KEY CHECK (id = 1), node text NOT NULL, epoch bigint NOT NULL,
        lease_expires float8 NOT NULL, acquired_at float8 NOT NULL)""",
    """CREATE TABLE greenqueue_periodic (
        job text NOT NULL, due float8 NOT NULL, fired_at float8 NOT NULL, task_id text,
        PRIMARY KEY (job, due))""",
    "CREATE TABLE greenqueue_anchors (job text PRIMARY KEY, phase float8 NOT NULL, created_at float8 NOT NULL)",
]}


def mask_dsn(dsn: str) -> str:
    """``dsn`` with its password replaced by ``***`` (URL or key=value form)."""
    if "://" not in dsn:
        return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = "%s%s@%s" % (user, ":***" if colon else "", hostinfo)
    query = "&".join("%s=%s" % (k, "***" if k == "password" else v)
                     for k, v in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


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


def _values(rows: Sequence[TaskRow], field: str) -> list:
    return [getattr(r, field) for r in rows]


class _Connection(psycopg.Connection):
    """A pooled connection that remembers when it last worked, and in which failure generation."""

    __slots__ = ("worked_at", "generation")


class PostgresEngine:
    """The Engine protocol on PostgreSQL 13+ through psycopg 3 and psycopg_pool."""

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
        self._pool: Optional[ConnectionPool] = None
        self._listener: Optional[psycopg.Connection] = None
        self._listen_lock = threading.Lock()
        self._closed = threading.Event()
        self._listen_down = False
        self._generation = 0   # grows whenever a pooled connection fails

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
                if conn.info.server_version < _MIN_SERVER:
                    raise JournalError("journal %s: PostgreSQL %s is too old; greenqueue needs 13 or newer"
                                       % (self.display, conn.info.parameter_status("server_version")))
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                    self._migrate(conn)
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

    def _migrate(self, conn: psycopg.Connection) -> None:
        present = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename = ANY(%s)",
            (list(_TABLES),))}
        if "greenqueue_meta" not in present:
            if present:
                raise JournalError("journal %s: this database has tables named like greenqueue's (%s) but no "
                                   "greenqueue_meta; refusing to touch them. Point --journal at another "
                                   "database or schema" % (self.display, ", ".join(sorted(present))))
            version = 0
        else:
            meta = dict(conn.execute("SELECT key, value FROM greenqueue_meta").fetchall())
            if meta.get("magic") != _MAGIC:
                raise JournalError("journal %s: greenqueue_meta in this database belongs to something else "
                                   "(magic %r); refusing to touch it. Point --journal at another database "
                                   "or schema" % (self.display, meta.get("magic")))
            try:
                version = int(meta.get("schema_version", ""))
            except ValueError:
                version = -1
            if version > SCHEMA_VERSION:
                raise JournalError("journal %s: written by a newer greenqueue (schema %d, this one knows %d); "
                                   "upgrade greenqueue on this node or point --journal at another database"
                                   % (self.display, version, SCHEMA_VERSION))
            if version < 1:
                raise JournalError("journal %s: unknown schema version %r in greenqueue_meta; restore it or "
                                   "point --journal at another database"
                                   % (self.display, meta.get("schema_version")))
        if version == SCHEMA_VERSION:
            return
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for stmt in _MIGRATIONS[step]:
                conn.execute(stmt)
        conn.execute("INSERT INTO greenqueue_meta (key, value) VALUES ('magic', %s), ('schema_version', %s) "
                     "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (_MAGIC, str(SCHEMA_VERSION)))
        log.info("journal %s: schema at version %d (was %d)", self.display, SCHEMA_VERSION, version)

    def close(self) -> None:
        """Release connections; rows keep their state."""
        self._closed.set()
        self._drop_listener()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=5.0)

    # -- tasks ---------------------------------------------------------------------------

    _INSERT = """
        WITH src AS (
            SELECT * FROM unnest(%(id)s::text[], %(name)s::text[], %(payload)s::bytea[],
                                 %(serializer)s::text[], %(queue)s::text[], %(state)s::text[],
                                 %(eta)s::float8[], %(attempts)s::int[], %(max_attempts)s::int[],
                                 %(idempotency_key)s::text[], %(note)s::text[])
                AS s(id, name, payload, serializer, queue, state, eta, attempts, max_attempts,
                     idempotency_key, note)),
        ins AS (
            INSERT INTO greenqueue_tasks (id, name, payload, serializer, queue, state, eta, due, attempts,
                max_attempts, idempotency_key, note, owner, lease_expires, started_at, created_at, updated_at)
            SELECT id, name, payload, serializer, queue,
                   CASE WHEN %(owner)s::text IS NULL THEN state ELSE 'STARTED' END,
                   eta, coalesce(eta, {now}),
                   attempts + CASE WHEN %(owner)s::text IS NULL THEN 0 ELSE 1 END, max_attempts,
                   idempotency_key, note, %(owner)s::text,
                   CASE WHEN %(owner)s::text IS NULL THEN NULL ELSE {now} + %(lease)s END,
                   CASE WHEN %(owner)s::text IS NULL THEN NULL ELSE {now} END, {now}, {now}
            FROM src
            ON CONFLICT DO NOTHING
            RETURNING {cols}, due),
        hint AS (
            SELECT pg_notify('{channel}', q) FROM (
                SELECT DISTINCT queue AS q FROM ins WHERE owner IS NULL AND due <= {now}) d)
        SELECT {cols}, (SELECT count(*) FROM hint) FROM ins
        """.format(now=NOW, cols=_COLS, channel=_CHANNEL)

    def enqueue(self, rows: Sequence[TaskRow], owner: Optional[str] = None,
                connection: Any = None) -> List[TaskRow]:
        """Insert ``rows`` in one commit (or the caller's transaction) and return what is stored, in order."""
        rows = list(rows)
        if not rows:
            return []
        params = {f: _values(rows, f) for f in ("id", "name", "serializer", "queue", "state", "eta",
                                                 "attempts", "max_attempts", "idempotency_key", "note")}
        params.update(payload=[r.payload or b"" for r in rows], owner=owner, lease=self.lease_timeout)
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

    def _enqueue_on(self, conn: Any, rows: List[TaskRow], params: dict) -> List[TaskRow]:
        # The caller's connection may have any row factory; these rows are read by position.
        with conn.cursor(row_factory=tuple_row) as cur:
            stored = {r[0]: TaskRow(*r[:-1]) for r in cur.execute(self._INSERT, params).fetchall()}
            if len(stored) < len(rows):
                missing = [r for r in rows if r.id not in stored]
                keys = [r.idempotency_key for r in missing if r.idempotency_key]
                cur.execute("SELECT %s FROM greenqueue_tasks WHERE id = ANY(%%s) OR idempotency_key = ANY(%%s)"
                            % _COLS, ([r.id for r in missing], keys))
                existing = [TaskRow(*r) for r in cur.fetchall()]
            else:
                existing = []
        by_id = dict(stored)
        by_id.update((r.id, r) for r in existing)
        by_key = {r.idempotency_key: r for r in list(stored.values()) + existing if r.idempotency_key}
        out = []
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
        sql = """
            WITH picked AS (
                SELECT id FROM greenqueue_tasks
                WHERE owner IS NULL AND state IN {claimable} AND due <= {now} {queue_filter}
                ORDER BY due, created_at
                LIMIT %(limit)s
                FOR UPDATE SKIP LOCKED)
            UPDATE greenqueue_tasks t
            SET state = 'STARTED', owner = %(node)s, attempts = t.attempts + 1,
                lease_expires = {now} + %(lease)s, started_at = {now}, updated_at = {now},
                lost_by = NULLIF(array_remove(t.lost_by, %(node)s), '{{}}')
            FROM picked WHERE t.id = picked.id
            RETURNING {tcols}, t.due
            """.format(claimable=_CLAIMABLE, now=NOW, tcols=_TCOLS,
                       queue_filter="AND queue = ANY(%(queues)s)" if queues is not None else "")
        params = {"node": node, "limit": int(limit), "lease": self.lease_timeout,
                  "queues": list(queues) if queues is not None else None}
        got = self._all("claim", sql, params)
        # UPDATE ... RETURNING does not keep the subquery's order.
        got.sort(key=lambda r: r[-1])
        return [TaskRow(*r[:-1]) for r in got]

    def finish(self, row_id: str, node: str, attempt: int, state: str, result: Optional[bytes] = None,
               error_type: Optional[str] = None, error: Optional[str] = None,
               traceback: Optional[str] = None, ttl: float = 3600.0) -> bool:
        """Record the final state of ``node``'s attempt ``attempt``; False when fenced off."""
        if state not in FINAL:
            raise JournalError("journal %s: finish() takes a final state (%s), not %r"
                               % (self.display, ", ".join(FINAL), state))
        sql = """UPDATE greenqueue_tasks
                 SET state = %s, result = %s, error_type = %s, error = %s, traceback = %s,
                     owner = NULL, lease_expires = NULL, finished_at = {now}, updated_at = {now},
                     expires_at = {now} + %s
                 WHERE id = %s AND owner = %s AND attempts = %s""".format(now=NOW)
        return self._count("finish", sql, (state, result, error_type, error, traceback, float(ttl),
                                           row_id, node, attempt)) == 1

    # A row whose cancel was requested while it ran ends CANCELLED when it comes back
    # unowned (retry, release, reap), instead of running again.
    _BACK = """state = CASE WHEN t.cancel_requested THEN 'CANCELLED' ELSE {state} END,
               finished_at = CASE WHEN t.cancel_requested THEN {now} END,
               expires_at = CASE WHEN t.cancel_requested THEN {now} + %(ttl)s END,
               owner = NULL, lease_expires = NULL, updated_at = {now}"""

    def retry(self, row_id: str, node: str, attempt: int, delay: float,
              error_type: Optional[str] = None, error: Optional[str] = None) -> bool:
        """Give the row back as RETRY, due in ``delay`` seconds; False when fenced off."""
        sql = """WITH back AS (
                     UPDATE greenqueue_tasks t SET {back}, eta = {now} + %(delay)s, due = {now} + %(delay)s,
                         error_type = %(error_type)s, error = %(error)s
                     WHERE id = %(id)s AND owner = %(node)s AND attempts = %(attempt)s
                     RETURNING t.queue, t.state, t.due),
                 hint AS (SELECT pg_notify('{channel}', queue) FROM back WHERE state = 'RETRY' AND due <= {now})
                 SELECT count(*), (SELECT count(*) FROM hint) FROM back""".format(
            back=self._BACK.format(state="'RETRY'", now=NOW), now=NOW, channel=_CHANNEL)
        params = {"id": row_id, "node": node, "attempt": attempt, "delay": max(0.0, float(delay)),
                  "error_type": error_type, "error": error, "ttl": self.result_ttl}
        return self._one("retry", sql, params)[0] == 1

    def release(self, row_ids: Iterable[str], node: str) -> int:
        """Hand rows this node holds back unowned (graceful shutdown), keeping their attempt count."""
        ids = list(row_ids)
        if not ids:
            return 0
        sql = """WITH back AS (
                     UPDATE greenqueue_tasks t SET {back}
                     WHERE id = ANY(%(ids)s) AND owner = %(node)s RETURNING t.queue, t.state),
                 hint AS (SELECT pg_notify('{channel}', q) FROM (
                     SELECT DISTINCT queue AS q FROM back WHERE state = 'PENDING') d)
                 SELECT count(*), (SELECT count(*) FROM hint) FROM back""".format(
            back=self._BACK.format(state="'PENDING'", now=NOW), channel=_CHANNEL)
        return self._one("release", sql, {"ids": ids, "node": node, "ttl": self.result_ttl})[0]

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
                conn.execute("UPDATE greenqueue_tasks SET state = 'CANCELLED', finished_at = {now}, "
                             "updated_at = {now}, expires_at = {now} + %s WHERE id = %s".format(now=NOW),
                             (self.result_ttl, row_id))
            else:
                conn.execute("UPDATE greenqueue_tasks SET cancel_requested = true, updated_at = {now} "
                             "WHERE id = %s".format(now=NOW), (row_id,))
            return state

    def get(self, row_id: str) -> Optional[TaskRow]:
        """One row by id, or None."""
        found = self._one("get", "SELECT %s FROM greenqueue_tasks WHERE id = %%s" % _COLS, (row_id,))
        return TaskRow(*found) if found else None

    def next_due(self, queues: Optional[Sequence[str]]) -> Optional[float]:
        """Seconds (database clock) until the earliest unowned row is due; 0 if one is due now."""
        if queues is not None and not queues:
            return None
        sql = ("SELECT min(due) - {now} FROM greenqueue_tasks WHERE owner IS NULL "
               "AND state IN {claimable} {queue_filter}").format(
            now=NOW, claimable=_CLAIMABLE, queue_filter="AND queue = ANY(%s)" if queues is not None else "")
        wait = self._one("next_due", sql, (list(queues),) if queues is not None else None)[0]
        return None if wait is None else max(0.0, wait)

    def reap(self, max_lease_losses: int) -> List[TaskRow]:
        """Take back rows whose lease expired; returns them after the change."""
        sql = """
            WITH expired AS (
                SELECT id, cancel_requested AS cancelled,
                       NOT cancel_requested AND %(max)s > 0 AND lease_losses + 1 >= %(max)s AS poisoned
                FROM greenqueue_tasks
                WHERE owner IS NOT NULL AND state = 'STARTED' AND lease_expires < {now}
                FOR UPDATE SKIP LOCKED),
            reaped AS (
                UPDATE greenqueue_tasks t SET
                    lease_losses = t.lease_losses + 1,
                    lost_by = array_append(coalesce(t.lost_by, '{{}}'), t.owner),
                    owner = NULL, lease_expires = NULL, updated_at = {now},
                    state = CASE WHEN x.cancelled THEN 'CANCELLED' WHEN x.poisoned THEN 'FAILURE'
                                 ELSE 'PENDING' END,
                    finished_at = CASE WHEN x.cancelled OR x.poisoned THEN {now} END,
                    expires_at = CASE WHEN x.cancelled OR x.poisoned THEN {now} + %(ttl)s END,
                    error_type = CASE WHEN x.poisoned THEN 'LeaseLost' ELSE t.error_type END,
                    error = CASE WHEN x.poisoned
                                 THEN format('lease lost %%s times: the node running it stopped renewing its '
                                             'lease each time (max_lease_losses=%%s)',
                                             t.lease_losses + 1, %(max)s)
                                 ELSE t.error END
                FROM expired x WHERE t.id = x.id
                RETURNING {tcols}),
            hint AS (SELECT pg_notify('{channel}', q) FROM (
                SELECT DISTINCT queue AS q FROM reaped WHERE state = 'PENDING') d)
            SELECT {cols}, (SELECT count(*) FROM hint) FROM reaped
            """.format(now=NOW, tcols=_TCOLS, cols=_COLS, channel=_CHANNEL)
        got = self._all("reap", sql, {"max": int(max_lease_losses or 0), "ttl": self.result_ttl})
        return [TaskRow(*r[:-1]) for r in got]

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
        return tasks + keys

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
        sql = """
            WITH renewed AS (
                UPDATE greenqueue_tasks SET lease_expires = {now} + %(lease)s
                WHERE owner = %(node)s AND state = 'STARTED'
                RETURNING id, cancel_requested),
            lost AS (
                UPDATE greenqueue_tasks SET lost_by = NULLIF(array_remove(lost_by, %(node)s), '{{}}')
                WHERE lost_by IS NOT NULL AND %(node)s = ANY(lost_by) AND owner IS DISTINCT FROM %(node)s
                RETURNING id),
            me AS (
                UPDATE greenqueue_nodes SET heartbeat_at = {now}, running = %(running)s
                WHERE id = %(node)s RETURNING id)
            SELECT (SELECT count(*) FROM renewed),
                   ARRAY(SELECT id FROM renewed WHERE cancel_requested ORDER BY id),
                   ARRAY(SELECT id FROM lost ORDER BY id),
                   {now}, (SELECT count(*) FROM me)""".format(now=NOW)
        renewed, cancel, lost, now, _ = self._one(
            "heartbeat", sql, {"node": node, "running": int(running), "lease": self.lease_timeout})
        return Heartbeat(renewed=renewed, cancel=list(cancel), lost=list(lost), now=now)

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
        sql = """
            INSERT INTO greenqueue_leader AS l (id, node, epoch, lease_expires, acquired_at)
            VALUES (1, %(node)s, 1, {now} + %(lease)s, {now})
            ON CONFLICT (id) DO UPDATE SET
                epoch = CASE WHEN l.node = excluded.node AND l.lease_expires > {now} THEN l.epoch
                             ELSE l.epoch + 1 END,
                acquired_at = CASE WHEN l.node = excluded.node AND l.lease_expires > {now} THEN l.acquired_at
                                   ELSE {now} END,
                node = excluded.node, lease_expires = excluded.lease_expires
            WHERE l.node = excluded.node OR l.lease_expires <= {now}
            RETURNING epoch""".format(now=NOW)
        found = self._one("lead", sql, {"node": node, "lease": self.lease_timeout})
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
            params = {f: [getattr(row, f)] for f in ("id", "name", "serializer", "queue", "state", "eta",
                                                     "attempts", "max_attempts", "idempotency_key", "note")}
            params.update(payload=[row.payload or b""], owner=None, lease=self.lease_timeout)
            self._enqueue_on(conn, [row], params)
            return True

    def last_fired(self, job: str) -> Optional[float]:
        """The latest due instant enqueued for ``job``, or None."""
        return self._one("last_fired", "SELECT max(due) FROM greenqueue_periodic WHERE job = %s", (job,))[0]

    def anchor(self, job: str, phase: float) -> float:
        """Store ``phase`` as ``job``'s anchor unless one exists; return the stored anchor."""
        with self._conn("anchor") as conn:
            conn.execute("INSERT INTO greenqueue_anchors (job, phase, created_at) VALUES (%s, %s, {now}) "
                         "ON CONFLICT (job) DO NOTHING".format(now=NOW), (job, float(phase)))
            # A separate statement: its snapshot includes a concurrent node's insert that won.
            return conn.execute("SELECT phase FROM greenqueue_anchors WHERE job = %s", (job,)).fetchone()[0]

    # -- reading (CLI, dashboard) -----------------------------------------------------------------

    def counts(self) -> dict:
        """``{state: count}`` over all rows."""
        return dict(self._all("counts", "SELECT state, count(*) FROM greenqueue_tasks GROUP BY state"))

    def rows(self, state: Optional[str] = None, limit: int = 50,
             name: Optional[str] = None) -> List[TaskRow]:
        """Rows, newest first, optionally of one state and task name."""
        where, params = [], []
        if state:
            where.append("state = %s")
            params.append(state.upper())
        if name:
            where.append("name = %s")
            params.append(name)
        sql = "SELECT %s FROM greenqueue_tasks %s ORDER BY created_at DESC, id DESC LIMIT %%s" % (
            _COLS, ("WHERE " + " AND ".join(where)) if where else "")
        return [TaskRow(*r) for r in self._all("rows", sql, params + [int(limit)])]

    def requeue(self, row_id: Optional[str] = None) -> int:
        """FAILURE/CANCELLED rows (one, or all) back to PENDING with a fresh attempt budget."""
        sql = """WITH back AS (
                     UPDATE greenqueue_tasks SET state = 'PENDING', eta = NULL, due = {now}, attempts = 0,
                         lease_losses = 0, cancel_requested = false, lost_by = NULL, finished_at = NULL,
                         expires_at = NULL, result = NULL, error_type = NULL, error = NULL, traceback = NULL,
                         updated_at = {now}
                     WHERE state IN ('FAILURE', 'CANCELLED') {one} RETURNING queue),
                 hint AS (SELECT pg_notify('{channel}', q) FROM (SELECT DISTINCT queue AS q FROM back) d)
                 SELECT count(*), (SELECT count(*) FROM hint) FROM back""".format(
            now=NOW, channel=_CHANNEL, one="AND id = %s" if row_id else "")
        return self._one("requeue", sql, (row_id,) if row_id else None)[0]

    def purge(self, state: str) -> int:
        """Delete rows of one final state; JournalError for unfinished states."""
        state = state.upper()
        if state not in FINAL:
            raise JournalError("journal %s: refusing to purge %s tasks; purge one of %s (cancel unfinished "
                               "tasks first)" % (self.display, state, ", ".join(FINAL)))
        return self._count("purge", "DELETE FROM greenqueue_tasks WHERE state = %s", (state,))

    # -- wake-ups ------------------------------------------------------------------------------------

    def wait_for_work(self, timeout: float) -> bool:
        """Block this greenlet until another node enqueued work (a hint) or ``timeout`` passes."""
        timeout = max(0.0, float(timeout))
        with self._listen_lock:
            conn, fresh = self._listening()
            if conn is None:
                # PostgreSQL is away: degrade to polling (the claimer's own calls report the outage).
                self._closed.wait(timeout)
                return False
            if fresh:
                # Hints sent while nobody listened are lost; make the caller look now.
                return True
            try:
                got = list(conn.notifies(timeout=timeout, stop_after=1))
                if got:
                    # One look at the table answers every hint already here.
                    list(conn.notifies(timeout=0))
                return bool(got)
            except psycopg.Error as exc:
                if not self._closed.is_set():
                    log.warning("journal %s: the LISTEN connection broke (%s); re-opening it",
                                self.display, self._scrub(str(exc)))
                self._drop_listener()
                return not self._closed.is_set()

    def _listening(self):
        """The LISTEN connection and whether it was (re)opened just now; (None, False) when unreachable."""
        conn = self._listener
        if conn is not None and not conn.closed and not conn.broken:
            return conn, False
        self._drop_listener()
        if self._closed.is_set():
            return None, False
        try:
            conn = psycopg.connect(self.dsn, **self._connect_kwargs())
            conn.execute("LISTEN %s" % _CHANNEL)
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
