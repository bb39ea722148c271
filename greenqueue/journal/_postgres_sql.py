"""The PostgreSQL engine's SQL: the schema, its migrations and the longer statements.

Concurrency model: text and pure functions only; ``migrate`` runs on a
connection its caller owns, inside the caller's transaction (which holds the
migration lock). Nothing here imports psycopg, so this module loads without
the PostgreSQL extra, and nothing here holds state to survive a fork.
"""

import dataclasses
import logging
import re
from typing import Any, Dict, List
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ..errors import JournalError
from ._engine import TaskRow

__all__ = ["SCHEMA_VERSION", "mask_dsn", "migrate"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
MAGIC = "greenqueue-journal"
CHANNEL = "greenqueue"
# Any constant works as long as every greenqueue version uses the same one:
# it serialises schema creation and migration across nodes starting together.
MIGRATION_LOCK = 0x677265656E71  # "greenq"
MIN_SERVER = 130000
TABLES = ("greenqueue_meta", "greenqueue_tasks", "greenqueue_nodes", "greenqueue_leader",
          "greenqueue_periodic", "greenqueue_anchors")

# statement_timestamp(), not now(): a statement in a caller's long transaction
# (enqueue(connection=)) still gets a fresh lease and due time.
NOW = "extract(epoch from statement_timestamp())::float8"
CLAIMABLE = "('PENDING', 'SCHEDULED', 'RETRY')"
# Unowned waiting rows split in two: ready ones (the claim's index), and ones held until a time.
READY = "owner IS NULL AND hold IS NULL AND state IN " + CLAIMABLE
HELD = "owner IS NULL AND hold IN ('eta', 'rate') AND state IN " + CLAIMABLE
# Due rows with a rate or concurrency limit (the claim's gate decides), and rows parked until a
# run of their concurrency key ends.
GATED = "owner IS NULL AND hold = 'gate' AND state IN " + CLAIMABLE
PARKED = "owner IS NULL AND hold = 'limit' AND state IN " + CLAIMABLE
# A row coming back to wait (release, reap, retry, requeue, its time came): the gate's if limited.
READY_OR_GATED = "CASE WHEN rate_bucket IS NULL AND limit_bucket IS NULL THEN NULL ELSE 'gate' END"
# Held rows made ready per claim at most: a burst of due rows is taken in steps, never in one long lock.
PROMOTE_BATCH = 1000
UNFINISHED = "('PENDING', 'SCHEDULED', 'STARTED', 'RETRY')"

FIELDS = [f.name for f in dataclasses.fields(TaskRow)]
COLS = ", ".join(FIELDS)
TCOLS = ", ".join("t." + f for f in FIELDS)

# Version N's statements bring a database from version N - 1 to N.
MIGRATIONS: Dict[int, List[str]] = {1: [
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
    + CLAIMABLE,
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
], 2: [
    # max_instances counts a task's unfinished runs on every fire: an index of those rows
    # alone keeps the count as cheap with a million finished rows as with none.
    "CREATE INDEX greenqueue_tasks_unfinished ON greenqueue_tasks (name, state) WHERE state IN " + UNFINISHED,
], 3: [
    # A run's start-by time (expires=): a node that claims it later ends it EXPIRED unrun.
    "ALTER TABLE greenqueue_tasks ADD COLUMN start_by float8",
], 4: [
    # Priorities, and the claim's index holds only ready rows, queue first and in start order:
    # the claim reads the first rows of one range per queue however many rows wait for a later
    # time or on queues nobody here serves, whatever the statistics or a generic plan say (no
    # clock comparison bounds it). Rows held until a time have their own index, by that time.
    "ALTER TABLE greenqueue_tasks ADD COLUMN priority integer NOT NULL DEFAULT 0",
    "ALTER TABLE greenqueue_tasks ADD COLUMN hold text",
    "UPDATE greenqueue_tasks SET hold = 'eta' WHERE owner IS NULL AND state IN %s "
    "AND due > extract(epoch from statement_timestamp())::float8" % CLAIMABLE,
    "DROP INDEX IF EXISTS greenqueue_tasks_due",
    "CREATE INDEX greenqueue_tasks_ready ON greenqueue_tasks (queue, priority DESC, due, created_at) WHERE "
    + READY,
    "CREATE INDEX greenqueue_tasks_held ON greenqueue_tasks (due) WHERE " + HELD,
    # Rate and concurrency limits: a rate window's starts per bucket, the limits a row carries,
    # its due rows for the gate per queue, its parked rows per key, its running rows per key.
    "ALTER TABLE greenqueue_tasks ADD COLUMN rate_bucket text, ADD COLUMN rate_n integer, "
    "ADD COLUMN rate_per float8, ADD COLUMN limit_bucket text, ADD COLUMN limit_n integer",
    "CREATE INDEX greenqueue_tasks_gated ON greenqueue_tasks (queue, priority DESC, due, created_at) WHERE "
    + GATED,
    "CREATE INDEX greenqueue_tasks_parked ON greenqueue_tasks (limit_bucket, priority DESC, due, created_at) "
    "WHERE " + PARKED,
    "CREATE INDEX greenqueue_tasks_limited ON greenqueue_tasks (limit_bucket) "
    "WHERE owner IS NOT NULL AND limit_bucket IS NOT NULL",
    "CREATE INDEX greenqueue_tasks_rated ON greenqueue_tasks (rate_bucket) WHERE owner IS NULL AND hold = 'rate'",
    "CREATE TABLE greenqueue_starts (bucket text NOT NULL, at float8 NOT NULL, until float8 NOT NULL, "
    "task_id text NOT NULL)",
    # Workflow steps (what they wait for and what waits for them) and groups' member lists.
    "ALTER TABLE greenqueue_tasks ADD COLUMN parents text, ADD COLUMN waits integer, ADD COLUMN takes text, "
    "ADD COLUMN then_ids text, ADD COLUMN error_ids text, ADD COLUMN chord boolean NOT NULL DEFAULT false, "
    "ADD COLUMN wait float8",
    "CREATE TABLE greenqueue_groups (id text PRIMARY KEY, members text NOT NULL, created_at float8 NOT NULL)",
    "CREATE INDEX greenqueue_starts_bucket ON greenqueue_starts (bucket, at)",
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


def migrate(conn: Any, display: str) -> None:
    """Create or upgrade the schema on ``conn`` (the caller holds the migration lock); JournalError if foreign."""
    present = {r[0] for r in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename = ANY(%s)",
        (list(TABLES),))}
    if "greenqueue_meta" not in present:
        if present:
            raise JournalError("journal %s: this database has tables named like greenqueue's (%s) but no "
                               "greenqueue_meta; refusing to touch them. Point --journal at another "
                               "database or schema" % (display, ", ".join(sorted(present))))
        version = 0
    else:
        meta: Dict[str, str] = dict(conn.execute("SELECT key, value FROM greenqueue_meta").fetchall())
        if meta.get("magic") != MAGIC:
            raise JournalError("journal %s: greenqueue_meta in this database belongs to something else "
                               "(magic %r); refusing to touch it. Point --journal at another database "
                               "or schema" % (display, meta.get("magic")))
        try:
            version = int(meta.get("schema_version", ""))
        except ValueError:
            version = -1
        if version > SCHEMA_VERSION:
            raise JournalError("journal %s: written by a newer greenqueue (schema %d, this one knows %d); "
                               "upgrade greenqueue on this node or point --journal at another database"
                               % (display, version, SCHEMA_VERSION))
        if version < 1:
            raise JournalError("journal %s: unknown schema version %r in greenqueue_meta; restore it or "
                               "point --journal at another database" % (display, meta.get("schema_version")))
    if version == SCHEMA_VERSION:
        return
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for stmt in MIGRATIONS[step]:
            conn.execute(stmt)
    conn.execute("INSERT INTO greenqueue_meta (key, value) VALUES ('magic', %s), ('schema_version', %s) "
                 "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (MAGIC, str(SCHEMA_VERSION)))
    log.info("journal %s: schema at version %d (was %d)", display, SCHEMA_VERSION, version)


# -- statements -----------------------------------------------------------------------------

# Rows arrive as one array per column: a batch of spawns is one statement and one commit.
INSERT = """
    WITH src AS (
        SELECT * FROM unnest(%(id)s::text[], %(name)s::text[], %(payload)s::bytea[],
                             %(serializer)s::text[], %(queue)s::text[], %(state)s::text[],
                             %(eta)s::float8[], %(attempts)s::int[], %(max_attempts)s::int[],
                             %(idempotency_key)s::text[], %(note)s::text[], %(start_by)s::float8[],
                             %(priority)s::int[], %(rate_bucket)s::text[], %(rate_n)s::int[],
                             %(rate_per)s::float8[], %(limit_bucket)s::text[], %(limit_n)s::int[],
                             %(parents)s::text[], %(waits)s::int[], %(takes)s::text[], %(then_ids)s::text[],
                             %(error_ids)s::text[], %(chord)s::boolean[], %(wait)s::float8[])
            AS s(id, name, payload, serializer, queue, state, eta, attempts, max_attempts,
                 idempotency_key, note, start_by, priority, rate_bucket, rate_n, rate_per, limit_bucket, limit_n,
                 parents, waits, takes, then_ids, error_ids, chord, wait)),
    ins AS (
        INSERT INTO greenqueue_tasks (id, name, payload, serializer, queue, state, eta, due, attempts,
            max_attempts, idempotency_key, note, owner, lease_expires, started_at, created_at, updated_at,
            start_by, priority, hold, rate_bucket, rate_n, rate_per, limit_bucket, limit_n, parents, waits, takes,
            then_ids, error_ids, chord, wait)
        SELECT id, name, payload, serializer, queue,
               CASE WHEN %(owner)s::text IS NULL THEN state ELSE 'STARTED' END,
               eta, coalesce(eta, {now}),
               attempts + CASE WHEN %(owner)s::text IS NULL THEN 0 ELSE 1 END, max_attempts,
               idempotency_key, note, %(owner)s::text,
               CASE WHEN %(owner)s::text IS NULL THEN NULL ELSE {now} + %(lease)s END,
               CASE WHEN %(owner)s::text IS NULL THEN NULL ELSE {now} END, {now}, {now}, start_by, priority,
               CASE WHEN %(owner)s::text IS NOT NULL THEN NULL WHEN waits > 0 THEN 'after' WHEN eta > {now} THEN 'eta'
                    WHEN rate_bucket IS NOT NULL OR limit_bucket IS NOT NULL THEN 'gate' END,
               rate_bucket, rate_n, rate_per, limit_bucket, limit_n, parents, waits, takes, then_ids, error_ids,
               chord, wait
        FROM src
        ON CONFLICT DO NOTHING
        RETURNING {cols}, due),
    hint AS (
        SELECT pg_notify('{channel}', q) FROM (
            SELECT DISTINCT queue AS q FROM ins WHERE owner IS NULL AND (hold IS NULL OR hold = 'gate')) d)
    SELECT {cols}, (SELECT count(*) FROM hint) FROM ins
    """.format(now=NOW, cols=COLS, channel=CHANNEL)

# Columns enqueue() passes as arrays, besides the payload.
INSERT_FIELDS = ("id", "name", "serializer", "queue", "state", "eta", "attempts", "max_attempts",
                 "idempotency_key", "note", "start_by", "priority", "rate_bucket", "rate_n", "rate_per",
                 "limit_bucket", "limit_n", "parents", "waits", "takes", "then_ids", "error_ids", "chord", "wait")

# Rows to change are named as an array of ids (``id = ANY(ARRAY(...))``), never joined: a
# generic plan cannot know how few there are and would hash-join the whole table.
# The claim, in one statement: held rows whose time came become ready (at most a batch), or
# else the first ready rows of each served queue ({queues} names them: an array, or every
# queue that has a ready row, found by a loose index scan) are merged in start order and
# claimed. Not both: this statement's snapshot predates the rows it makes ready, so a claim
# beside them could pass over a higher priority; the caller claims again at once instead.
CLAIM = """
    WITH RECURSIVE every(name) AS (
        (SELECT queue FROM greenqueue_tasks WHERE {ready} ORDER BY queue LIMIT 1)
        UNION ALL
        SELECT (SELECT queue FROM greenqueue_tasks WHERE {ready} AND queue > every.name ORDER BY queue LIMIT 1)
        FROM every WHERE every.name IS NOT NULL),
    promoted AS (
        UPDATE greenqueue_tasks SET hold = {ready_or_gated}
        WHERE id = ANY(ARRAY(SELECT id FROM greenqueue_tasks WHERE {held} AND due <= {now}
                             ORDER BY due LIMIT {batch} FOR UPDATE SKIP LOCKED))
        RETURNING queue),
    hint AS (SELECT pg_notify('{channel}', q) FROM (SELECT DISTINCT queue AS q FROM promoted) d),
    picked AS (
        SELECT c.id FROM {{queues}} AS q(name) CROSS JOIN LATERAL (
            SELECT id, priority, due, created_at FROM greenqueue_tasks
            WHERE {ready} AND queue = q.name
            ORDER BY priority DESC, due, created_at
            LIMIT %(limit)s FOR UPDATE SKIP LOCKED) c
        WHERE NOT EXISTS (SELECT 1 FROM promoted) AND NOT EXISTS (SELECT 1 FROM gated)
        ORDER BY c.priority DESC, c.due, c.created_at
        LIMIT %(limit)s),
    gated AS ({{gated}}),
    claimed AS (
        UPDATE greenqueue_tasks t
        SET state = 'STARTED', owner = %(node)s, attempts = t.attempts + 1,
            lease_expires = {now} + %(lease)s, started_at = {now}, updated_at = {now},
            lost_by = NULLIF(array_remove(t.lost_by, %(node)s), '{{{{}}}}')
        WHERE t.id = ANY(ARRAY(SELECT id FROM picked))
        RETURNING {tcols}, t.due)
    SELECT c.*, p.n + (SELECT count(*) FROM gated) * 1000000 FROM (SELECT count(*) AS n FROM hint) h
        CROSS JOIN (SELECT count(*) AS n FROM promoted) p LEFT JOIN claimed c ON true
    """.format(ready=READY, held=HELD, now=NOW, batch=PROMOTE_BATCH, channel=CHANNEL, tcols=TCOLS,
               ready_or_gated=READY_OR_GATED)
# CLAIM's last column: rows made ready, plus this when gated rows wait (the gate's claim runs then).
GATED_FLAG = 1000000
CLAIM_QUEUES = "unnest(%(queues)s::text[])"
CLAIM_EVERY = "(SELECT name FROM every WHERE name IS NOT NULL)"
# CLAIM's {gated}: whether a gated row waits on the served queues (then the gate's claim runs).
GATED_ON_QUEUES = """SELECT 1 FROM unnest(%(queues)s::text[]) AS g(name) CROSS JOIN LATERAL (
            SELECT 1 FROM greenqueue_tasks WHERE {gated} AND queue = g.name
            ORDER BY priority DESC, due, created_at LIMIT 1) x LIMIT 1""".format(gated=GATED)
GATED_ANYWHERE = "SELECT 1 FROM greenqueue_tasks WHERE %s ORDER BY queue LIMIT 1" % GATED


def loose_scan(cte: str, where: str) -> str:
    """A recursive CTE ``cte(name)`` of the queues rows matching ``where`` wait on: one index probe per queue."""
    return """{cte}(name) AS (
        (SELECT queue FROM greenqueue_tasks WHERE {where} ORDER BY queue LIMIT 1)
        UNION ALL
        SELECT (SELECT queue FROM greenqueue_tasks WHERE {where} AND queue > {cte}.name ORDER BY queue LIMIT 1)
        FROM {cte} WHERE {cte}.name IS NOT NULL)""".format(cte=cte, where=where)


# The gate's claim (a transaction, when gated rows wait): the first ready and gated rows of each
# served queue, locked; {queues} as in CLAIM ({prefix} defines the loose scans it uses).
GATE_CANDIDATES = """{{prefix}}
    SELECT c.* FROM {{queues}} AS q(name) CROSS JOIN LATERAL (
        SELECT id, priority, due, created_at, false, NULL::text, NULL::int, NULL::float8, NULL::text, NULL::int
        FROM greenqueue_tasks WHERE {ready} AND queue = q.name
        ORDER BY priority DESC, due, created_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED) c
    UNION ALL
    SELECT c.* FROM {{queues}} AS q(name) CROSS JOIN LATERAL (
        SELECT id, priority, due, created_at, true, rate_bucket, rate_n, rate_per, limit_bucket, limit_n
        FROM greenqueue_tasks WHERE {gated} AND queue = q.name
        ORDER BY priority DESC, due, created_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED) c""".format(
    ready=READY, gated=GATED)
GATE_EVERY_PREFIX = "WITH RECURSIVE %s, %s" % (loose_scan("r", READY), loose_scan("g", GATED))
GATE_EVERY = "(SELECT name FROM r WHERE name IS NOT NULL UNION SELECT name FROM g WHERE name IS NOT NULL)"
# Other nodes' gates wait for these (in one order: no deadlock) until this transaction ends.
LOCK_BUCKETS = ("SELECT count(pg_advisory_xact_lock(hashtextextended(b, 0))) FROM "
                "(SELECT DISTINCT b FROM unnest(%s::text[]) AS u(b) ORDER BY b) s")
RUNNING_IN = ("SELECT limit_bucket, count(*) FROM greenqueue_tasks WHERE owner IS NOT NULL "
              "AND limit_bucket IS NOT NULL AND limit_bucket = ANY(%s) AND state = 'STARTED' "
              "AND lease_expires >= {now} GROUP BY limit_bucket".format(now=NOW))
CLAIM_IDS = """UPDATE greenqueue_tasks t
    SET state = 'STARTED', owner = %(node)s, attempts = t.attempts + 1, hold = NULL,
        lease_expires = {now} + %(lease)s, started_at = {now}, updated_at = {now},
        lost_by = NULLIF(array_remove(t.lost_by, %(node)s), '{{}}')
    WHERE t.id = ANY(%(ids)s) RETURNING {tcols}""".format(now=NOW, tcols=TCOLS)


def unparking(source: str) -> str:
    """CTEs that give each run of ``source`` (rows with ``limit_bucket``) that ended the next parked row of its key.

    The statement must read ``unhint`` for the notifications to go out.
    """
    return """freed AS (SELECT limit_bucket AS b, count(*) AS n FROM {source} WHERE limit_bucket IS NOT NULL
                       GROUP BY limit_bucket),
    unparked AS (
        UPDATE greenqueue_tasks t SET hold = 'gate' WHERE t.id = ANY(ARRAY(
            SELECT p.id FROM freed f CROSS JOIN LATERAL (
                SELECT id FROM greenqueue_tasks WHERE {parked} AND limit_bucket = f.b
                ORDER BY priority DESC, due, created_at LIMIT f.n FOR UPDATE SKIP LOCKED) p))
        RETURNING t.queue),
    unhint AS (SELECT pg_notify('{channel}', q) FROM (SELECT DISTINCT queue AS q FROM unparked) d)""".format(
        source=source, parked=PARKED, channel=CHANNEL)

# Seconds until this node may claim: 0 with a ready row on its queues (or a held row already
# due: the claim makes it ready), else until the first held row's time; NULL when none waits.
# Ordered as the ready index is, the look stays one index probe whatever the statistics say (a
# bare EXISTS lets the planner pick a scan that passes every row of the queues not asked for).
NEXT_DUE = """SELECT CASE WHEN EXISTS (SELECT 1 FROM {{queues}} AS q(name) CROSS JOIN LATERAL (
        SELECT 1 FROM greenqueue_tasks WHERE {ready} AND queue = q.name
        ORDER BY priority DESC, due, created_at LIMIT 1) c)
    OR EXISTS (SELECT 1 FROM {{queues}} AS q(name) CROSS JOIN LATERAL (
        SELECT 1 FROM greenqueue_tasks WHERE {gated} AND queue = q.name
        ORDER BY priority DESC, due, created_at LIMIT 1) c)
    THEN 0 ELSE (SELECT min(due) FROM greenqueue_tasks WHERE {held}) - {now} END""".format(
    ready=READY, gated=GATED, held=HELD, now=NOW)
# NEXT_DUE's {queues} for every queue: the first ready or gated row of any.
ANY_READY = ("((SELECT queue FROM greenqueue_tasks WHERE %s ORDER BY queue LIMIT 1) UNION ALL "
             "(SELECT queue FROM greenqueue_tasks WHERE %s ORDER BY queue LIMIT 1))" % (READY, GATED))

# The payload of a hint that only results changed (a queue's name says work arrived): nodes that
# follow tasks running elsewhere look at once, instead of at their next round.
RESULTS_HINT = "*"

# Fenced: only the owner's current attempt may write the final state. A run that ends gives
# the next parked run of its concurrency key to the gate, in the same statement.
FINISH = """WITH done AS (UPDATE greenqueue_tasks
    SET state = %s, result = %s, error_type = %s, error = %s, traceback = %s,
        owner = NULL, lease_expires = NULL, finished_at = {now}, updated_at = {now},
        expires_at = {now} + %s
    WHERE id = %s AND owner = %s AND attempts = %s RETURNING limit_bucket),
    {unparking}
    SELECT count(*), (SELECT count(*) FROM unhint) FROM done""".format(now=NOW, unparking=unparking("done"))

# FINISH for many rows in one statement, each fenced by its own owner and attempt;
# returns the ids it finished (a row id appears at most once per statement).
FINISH_MANY = """WITH done AS (UPDATE greenqueue_tasks t
    SET state = s.state, result = s.result, error_type = s.error_type, error = s.error,
        traceback = s.traceback, owner = NULL, lease_expires = NULL, finished_at = {now},
        updated_at = {now}, expires_at = {now} + s.ttl
    FROM unnest(%(id)s::text[], %(node)s::text[], %(attempt)s::int[], %(state)s::text[], %(result)s::bytea[],
                %(error_type)s::text[], %(error)s::text[], %(traceback)s::text[], %(ttl)s::float8[])
        AS s(id, node, attempt, state, result, error_type, error, traceback, ttl)
    WHERE t.id = s.id AND t.owner = s.node AND t.attempts = s.attempt
    RETURNING t.id, t.limit_bucket),
    {unparking},
    told AS (SELECT pg_notify('{channel}', '{results}') WHERE EXISTS (SELECT 1 FROM done))
    SELECT id, (SELECT count(*) FROM unhint) + (SELECT count(*) FROM told) FROM done""".format(
    now=NOW, unparking=unparking("done"), channel=CHANNEL, results=RESULTS_HINT)

# Columns of FINISH_MANY's arrays, in finish()'s argument order.
FINISH_FIELDS = ("id", "node", "attempt", "state", "result", "error_type", "error", "traceback", "ttl")

# A row whose cancel was requested while it ran ends CANCELLED when it comes back
# unowned (retry, release, reap), instead of running again.
BACK = """state = CASE WHEN t.cancel_requested THEN 'CANCELLED' ELSE {state} END,
           finished_at = CASE WHEN t.cancel_requested THEN {now} END,
           expires_at = CASE WHEN t.cancel_requested THEN {now} + %(ttl)s END,
           owner = NULL, lease_expires = NULL, updated_at = {now}"""

RETRY = """WITH back AS (
        UPDATE greenqueue_tasks t SET {back}, eta = {now} + %(delay)s, due = {now} + %(delay)s,
            hold = CASE WHEN %(delay)s > 0 THEN 'eta' ELSE {ready_or_gated} END,
            attempts = t.attempts - %(uncount)s, error_type = %(error_type)s, error = %(error)s
        WHERE id = %(id)s AND owner = %(node)s AND attempts = %(attempt)s
        RETURNING t.queue, t.state, t.due, t.limit_bucket),
    hint AS (SELECT pg_notify('{channel}', queue) FROM back WHERE state = 'RETRY' AND %(delay)s <= 0),
    {unparking}
    SELECT count(*), (SELECT count(*) FROM hint), (SELECT count(*) FROM unhint) FROM back""".format(
    back=BACK.format(state="'RETRY'", now=NOW), now=NOW, channel=CHANNEL, ready_or_gated=READY_OR_GATED,
    unparking=unparking("back"))

RELEASE = """WITH back AS (
        UPDATE greenqueue_tasks t SET {back}, hold = {ready_or_gated}
        WHERE id = ANY(%(ids)s) AND owner = %(node)s RETURNING t.queue, t.state, t.limit_bucket),
    hint AS (SELECT pg_notify('{channel}', q) FROM (
        SELECT DISTINCT queue AS q FROM back WHERE state = 'PENDING') d),
    {unparking}
    SELECT count(*), (SELECT count(*) FROM hint), (SELECT count(*) FROM unhint) FROM back""".format(
    back=BACK.format(state="'PENDING'", now=NOW), channel=CHANNEL, ready_or_gated=READY_OR_GATED,
    unparking=unparking("back"))

# Expired leases come back PENDING, or end CANCELLED (cancel requested) or FAILURE (poison pill).
REAP = """
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
            owner = NULL, lease_expires = NULL, updated_at = {now}, hold = {ready_or_gated},
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
        SELECT DISTINCT queue AS q FROM reaped WHERE state = 'PENDING') d),
    {unparking}
    SELECT {cols}, (SELECT count(*) FROM hint) + (SELECT count(*) FROM unhint) FROM reaped
    """.format(now=NOW, tcols=TCOLS, cols=COLS, channel=CHANNEL, ready_or_gated=READY_OR_GATED,
               unparking=unparking("reaped"))

# The limits' gauges, per bucket: (kind, bucket, limit, in use, waiting). In use: running runs,
# or starts in the last period (with the gate's margin); waiting: parked, or held for the window.
LIMITS = """
    SELECT 'concurrency', limit_bucket, max(limit_n), count(*) FILTER (WHERE owner IS NOT NULL),
           count(*) FILTER (WHERE owner IS NULL)
    FROM greenqueue_tasks WHERE (owner IS NOT NULL AND limit_bucket IS NOT NULL AND state = 'STARTED')
                             OR ({parked}) GROUP BY limit_bucket
    UNION ALL
    SELECT 'rate', b.bucket, max(r.rate_n), max(b.used), count(r.id)
    FROM (SELECT bucket, count(*) AS used FROM greenqueue_starts WHERE at <= {now} AND until > {now}
          GROUP BY bucket) b
    LEFT JOIN greenqueue_tasks r ON r.rate_bucket = b.bucket AND r.owner IS NULL AND r.hold = 'rate'
    GROUP BY b.bucket""".format(parked=PARKED, now=NOW)

# Parked runs of keys with room again (a node died between a run's end and the unpark, or its
# lease ran out): the reaper gives them to the gate.
SWEEP = """WITH RECURSIVE keys(b) AS (
        (SELECT limit_bucket FROM greenqueue_tasks WHERE {parked} ORDER BY limit_bucket LIMIT 1)
        UNION ALL
        SELECT (SELECT limit_bucket FROM greenqueue_tasks WHERE {parked} AND limit_bucket > keys.b
                ORDER BY limit_bucket LIMIT 1) FROM keys WHERE keys.b IS NOT NULL),
    room AS (
        SELECT k.b, (SELECT max(limit_n) FROM (SELECT limit_n FROM greenqueue_tasks WHERE {parked}
                                               AND limit_bucket = k.b LIMIT 1) x)
                    - (SELECT count(*) FROM greenqueue_tasks WHERE owner IS NOT NULL AND limit_bucket IS NOT NULL
                       AND limit_bucket = k.b AND state = 'STARTED' AND lease_expires >= {now}) AS n
        FROM keys k WHERE k.b IS NOT NULL),
    swept AS (
        UPDATE greenqueue_tasks t SET hold = 'gate' WHERE t.id = ANY(ARRAY(
            SELECT p.id FROM room r CROSS JOIN LATERAL (
                SELECT id FROM greenqueue_tasks WHERE {parked} AND limit_bucket = r.b
                ORDER BY priority DESC, due, created_at LIMIT greatest(r.n, 0) FOR UPDATE SKIP LOCKED) p))
        RETURNING t.queue),
    hint AS (SELECT pg_notify('{channel}', q) FROM (SELECT DISTINCT queue AS q FROM swept) d)
    SELECT count(*), (SELECT count(*) FROM hint) FROM swept""".format(parked=PARKED, now=NOW, channel=CHANNEL)

# One statement renews every lease of a node, reports cancels and lost rows, and its own row.
HEARTBEAT = """
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

# Take the leader lease when free or expired, renew it when held; the epoch grows on every change.
LEAD = """
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
