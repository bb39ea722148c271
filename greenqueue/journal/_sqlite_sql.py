"""The SQLite engine's SQL: the schema, its migration from version 1 and shared statements.

Concurrency model: constants and pure functions; ``write`` runs on the
connection its caller owns (the engine's thread). Nothing here holds state.

Schema: version 3 of the file format the single-process journal started
(version 1, ``greenqueue_tasks`` and ``greenqueue_periodic``). One file holds
one store, so ``open()`` migrates an older file in place under the write
lock, keeping its unfinished tasks and periodic history, rather than keeping
a second set of tables beside rows nobody would replay. An older greenqueue
then refuses the file with its "newer greenqueue" error. Version 3 spells the
due index's states as ORs and adds the index that counts a task's unfinished
runs (``FROM_V2``); a process of version 2 still running on the file when a
newer one migrates it fails its claims until it restarts (its statements
name the old index), so upgrade the processes of one host together.
"""

import sqlite3
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Tuple

from ._engine import TaskRow

SCHEMA_VERSION = 6
MAGIC = "greenqueue-journal"
# ORs, not IN: in a partial index's WHERE, SQLite builds an IN list's lookup table
# again for every row a statement writes (about 1.7 us of each insert and finish).
CLAIMABLE = "(state = 'PENDING' OR state = 'SCHEDULED' OR state = 'RETRY')"
SYNCHRONOUS = ("NORMAL", "FULL")
# Filesystems whose locking or shared memory cannot carry WAL between processes.
NETWORK_FS = frozenset(("nfs", "nfs4", "cifs", "smb3", "smbfs", "afs", "ceph", "glusterfs",
                        "fuse.sshfs", "lustre", "gpfs"))
# Without ANALYZE statistics the planner may pick another index (and read every waiting
# row to sort them); these name the index each query is built for.
READY = "greenqueue_tasks INDEXED BY greenqueue_tasks_ready WHERE owner IS NULL AND hold IS NULL AND " + CLAIMABLE
# Held until a time: due later (eta), or its rate window full until then. ORs for the reason above.
TIMED = "(hold = 'eta' OR hold = 'rate')"
HELD = "greenqueue_tasks INDEXED BY greenqueue_tasks_held WHERE owner IS NULL AND %s AND %s" % (TIMED, CLAIMABLE)
# Due rows with a rate or concurrency limit: the claim's gate decides whether each starts.
GATED = "greenqueue_tasks INDEXED BY greenqueue_tasks_gated WHERE owner IS NULL AND hold = 'gate' AND " + CLAIMABLE
# Rows parked until a run of their concurrency key ends.
PARKED = ("greenqueue_tasks INDEXED BY greenqueue_tasks_parked WHERE owner IS NULL AND hold = 'limit' AND "
          + CLAIMABLE)
# A row coming back to wait (release, reap, retry, requeue, its time came): the gate's if limited.
READY_OR_GATED = "CASE WHEN rate_bucket IS NULL AND limit_bucket IS NULL THEN NULL ELSE 'gate' END"
WAITING_OF = "greenqueue_tasks INDEXED BY greenqueue_tasks_waiting WHERE name = ? AND " + CLAIMABLE
WAITING = "greenqueue_tasks INDEXED BY greenqueue_tasks_waiting WHERE " + CLAIMABLE
RUNNING = "greenqueue_tasks INDEXED BY greenqueue_tasks_owner WHERE owner IS NOT NULL AND state = 'STARTED'"
# Well under SQLite's 32766 host parameters per statement.
CHUNK = 500

FIELDS = [f for f in TaskRow.__dataclass_fields__]
COLS = ", ".join(FIELDS)
CANCEL_AT = FIELDS.index("cancel_requested")

# The due index of versions 2 to 5 (the migrations rebuild it before version 6 drops it).
DUE_INDEX = ("CREATE INDEX greenqueue_tasks_due ON greenqueue_tasks (due, created_at) "
             "WHERE owner IS NULL AND " + CLAIMABLE)
# The claim's index: ready rows only, queue first, in the order they start. No row in it
# waits for a time, so the claim reads the first rows of one range per queue, however many
# rows wait for a later time or on queues this node does not serve.
READY_INDEX = ("CREATE INDEX greenqueue_tasks_ready ON greenqueue_tasks (queue, priority DESC, due, created_at) "
               "WHERE owner IS NULL AND hold IS NULL AND " + CLAIMABLE)
# Rows held until a time, by that time: making the due ones ready reads one range from the start.
HELD_INDEX = ("CREATE INDEX greenqueue_tasks_held ON greenqueue_tasks (due) WHERE owner IS NULL AND %s AND %s"
              % (TIMED, CLAIMABLE))
# Limited rows: due ones for the gate (in start order per queue), parked ones per key (in the
# order they start when released), and running ones per key (what a concurrency limit counts).
GATED_INDEX = ("CREATE INDEX greenqueue_tasks_gated ON greenqueue_tasks (queue, priority DESC, due, created_at) "
               "WHERE owner IS NULL AND hold = 'gate' AND " + CLAIMABLE)
PARKED_INDEX = ("CREATE INDEX greenqueue_tasks_parked ON greenqueue_tasks (limit_bucket, priority DESC, due, "
                "created_at) WHERE owner IS NULL AND hold = 'limit' AND " + CLAIMABLE)
LIMITED_INDEX = ("CREATE INDEX greenqueue_tasks_limited ON greenqueue_tasks (limit_bucket) "
                 "WHERE owner IS NOT NULL AND limit_bucket IS NOT NULL")
# Rows waiting for their rate window, per bucket (the limits' gauges count them).
RATED_INDEX = ("CREATE INDEX greenqueue_tasks_rated ON greenqueue_tasks (rate_bucket) "
               "WHERE owner IS NULL AND hold = 'rate'")
# The starts a rate limit counts, per bucket: made, or reserved for a held row (its task id); out
# of their window (``until``) they are pruned.
STARTS_TABLE = """CREATE TABLE greenqueue_starts (
        bucket TEXT NOT NULL, at REAL NOT NULL, until REAL NOT NULL, task_id TEXT NOT NULL)"""
STARTS_INDEX = "CREATE INDEX greenqueue_starts_bucket ON greenqueue_starts (bucket, at)"
# The index under max_instances' count of a task's waiting runs (its running ones are
# counted through the owner index: a cluster runs few at a time).
# With the state in it, counts read this index alone, never the rows. Only waiting rows
# are in it: a task a node claims as it spawns it never enters it, which spares each such
# task an index entry to insert and delete (every index a row is in costs each spawn and finish).
WAITING_INDEX = ("CREATE INDEX greenqueue_tasks_waiting ON greenqueue_tasks (name, state) WHERE "
                 + CLAIMABLE)

# What version 6 adds besides columns: the claim's indexes, the limits' indexes, the starts.
FLOW = [READY_INDEX, HELD_INDEX, GATED_INDEX, PARKED_INDEX, LIMITED_INDEX, RATED_INDEX, STARTS_TABLE, STARTS_INDEX,
        # A group's members, for greenqueue.result(group_id) on any node.
        """CREATE TABLE greenqueue_groups (id TEXT PRIMARY KEY, members TEXT NOT NULL, created_at REAL NOT NULL)"""]

TABLES = [
    """CREATE TABLE greenqueue_tasks (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        payload BLOB NOT NULL,
        serializer TEXT NOT NULL,
        queue TEXT NOT NULL DEFAULT 'default',
        state TEXT NOT NULL,
        eta REAL,
        due REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL DEFAULT 1,
        lease_losses INTEGER NOT NULL DEFAULT 0,
        idempotency_key TEXT,
        owner TEXT,
        lease_expires REAL,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        expires_at REAL,
        result BLOB,
        error_type TEXT,
        error TEXT,
        traceback TEXT,
        note TEXT,
        start_by REAL,
        priority INTEGER NOT NULL DEFAULT 0,
        hold TEXT,
        rate_bucket TEXT,
        rate_n INTEGER,
        rate_per REAL,
        limit_bucket TEXT,
        limit_n INTEGER,
        parents TEXT,
        waits INTEGER,
        takes TEXT,
        then_ids TEXT,
        error_ids TEXT,
        chord INTEGER NOT NULL DEFAULT 0,
        wait REAL)""",
    # A partial index serves only queries that repeat its WHERE terms verbatim (READY, HELD, WAITING_OF).
] + FLOW + [
    WAITING_INDEX,
    "CREATE INDEX greenqueue_tasks_owner ON greenqueue_tasks (owner) WHERE owner IS NOT NULL",
    "CREATE UNIQUE INDEX greenqueue_tasks_idempotency ON greenqueue_tasks (idempotency_key) "
    "WHERE idempotency_key IS NOT NULL",
    "CREATE INDEX greenqueue_tasks_expires ON greenqueue_tasks (expires_at) WHERE expires_at IS NOT NULL",
    # No index of every row by state or creation time: each would cost every spawn and every
    # finish, for listings only the journal CLI makes (a scan there is fine).
    # PostgreSQL's lost_by array: nodes whose lease on a row was taken back, until their
    # heartbeat hears of it. The cascade drops them with a pruned or purged row.
    """CREATE TABLE greenqueue_lost (
        task_id TEXT NOT NULL REFERENCES greenqueue_tasks (id) ON DELETE CASCADE,
        node TEXT NOT NULL,
        PRIMARY KEY (task_id, node)) WITHOUT ROWID""",
    "CREATE INDEX greenqueue_lost_node ON greenqueue_lost (node)",
    """CREATE TABLE greenqueue_nodes (
        id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, queues TEXT,
        started_at REAL NOT NULL, heartbeat_at REAL NOT NULL, running INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE greenqueue_leader (
        id INTEGER PRIMARY KEY CHECK (id = 1), node TEXT NOT NULL, epoch INTEGER NOT NULL,
        lease_expires REAL NOT NULL, acquired_at REAL NOT NULL)""",
    """CREATE TABLE greenqueue_periodic (
        job TEXT NOT NULL, due REAL NOT NULL, fired_at REAL NOT NULL, task_id TEXT,
        PRIMARY KEY (job, due))""",
    "CREATE TABLE greenqueue_anchors (job TEXT PRIMARY KEY, phase REAL NOT NULL, created_at REAL NOT NULL)",
]

# Rows an older schema kept waiting for a later time, held until then (version 6's split).
HOLD_LATER = ("UPDATE greenqueue_tasks SET hold = 'eta' WHERE owner IS NULL AND %s AND due > "
              "(julianday('now') - 2440587.5) * 86400.0" % CLAIMABLE)

# Version 1 (the single-process journal) to 2: rebuild its two tables, keeping their rows.
# A version 1 row left STARTED belonged to a process that is gone: it becomes claimable.
FROM_V1 = [
    "DROP INDEX IF EXISTS greenqueue_tasks_state",
    "ALTER TABLE greenqueue_tasks RENAME TO greenqueue_v1_tasks",
    "ALTER TABLE greenqueue_periodic RENAME TO greenqueue_v1_periodic",
] + TABLES + [
    """INSERT INTO greenqueue_tasks (id, name, payload, serializer, state, eta, due, attempts, max_attempts,
           created_at, updated_at, started_at, finished_at, expires_at, result, error_type, error, traceback, note)
       SELECT id, name, payload, serializer, CASE WHEN state = 'STARTED' THEN 'PENDING' ELSE state END,
           eta, coalesce(eta, created_at), attempts, max(attempts, 1), created_at, updated_at, started_at,
           finished_at, expires_at, result, error_type, error, traceback, note
       FROM greenqueue_v1_tasks""",
    "INSERT INTO greenqueue_periodic (job, due, fired_at) SELECT job, scheduled_for, fired_at "
    "FROM greenqueue_v1_periodic",
    "DROP TABLE greenqueue_v1_tasks",
    "DROP TABLE greenqueue_v1_periodic",
    HOLD_LATER,
]

# Version 5 to 6: priorities, and rows held until their time leave the claim's index.
FROM_V5 = [
    "ALTER TABLE greenqueue_tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE greenqueue_tasks ADD COLUMN hold TEXT",
    "ALTER TABLE greenqueue_tasks ADD COLUMN rate_bucket TEXT",
    "ALTER TABLE greenqueue_tasks ADD COLUMN rate_n INTEGER",
    "ALTER TABLE greenqueue_tasks ADD COLUMN rate_per REAL",
    "ALTER TABLE greenqueue_tasks ADD COLUMN limit_bucket TEXT",
    "ALTER TABLE greenqueue_tasks ADD COLUMN limit_n INTEGER",
    "ALTER TABLE greenqueue_tasks ADD COLUMN parents TEXT",
    "ALTER TABLE greenqueue_tasks ADD COLUMN waits INTEGER",
    "ALTER TABLE greenqueue_tasks ADD COLUMN takes TEXT",
    "ALTER TABLE greenqueue_tasks ADD COLUMN then_ids TEXT",
    "ALTER TABLE greenqueue_tasks ADD COLUMN error_ids TEXT",
    "ALTER TABLE greenqueue_tasks ADD COLUMN chord INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE greenqueue_tasks ADD COLUMN wait REAL",
    "DROP INDEX IF EXISTS greenqueue_tasks_due",
    HOLD_LATER,
] + FLOW

# Version 4 to 5 (then 6): a run's start-by time (expires=).
FROM_V4 = ["ALTER TABLE greenqueue_tasks ADD COLUMN start_by REAL"] + FROM_V5

# Version 3 to 4: waiting rows get their own index; the indexes of every row by state and by
# creation time go (they cost each spawn and finish more than the listings they served).
FROM_V3 = [
    "DROP INDEX IF EXISTS greenqueue_tasks_unfinished",
    "DROP INDEX IF EXISTS greenqueue_tasks_created",
    "DROP INDEX IF EXISTS greenqueue_tasks_state",
    WAITING_INDEX,
] + FROM_V4

# Version 2 to 3 (then 4): the same tables; the due index's WHERE changes spelling.
FROM_V2 = [
    "DROP INDEX IF EXISTS greenqueue_tasks_due",
    DUE_INDEX,
] + FROM_V3

# Statements that bring a file of version N (the key) to SCHEMA_VERSION.
UPGRADES = {0: TABLES, 1: FROM_V1, 2: FROM_V2, 3: FROM_V3, 4: FROM_V4, 5: FROM_V5}

INSERT = ("INSERT INTO greenqueue_tasks (id, name, payload, serializer, queue, state, eta, due, attempts, "
           "max_attempts, idempotency_key, note, owner, lease_expires, started_at, created_at, updated_at, start_by, "
           "priority, hold, rate_bucket, rate_n, rate_per, limit_bucket, limit_n, parents, waits, takes, then_ids, "
           "error_ids, chord, wait) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
           "?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING")

# INSERT for a row without an idempotency key, note, deadline, limit or workflow link: the
# other columns keep their defaults. Parameters in this order.
PLAIN_INSERT = ("INSERT INTO greenqueue_tasks (id, name, payload, serializer, queue, state, eta, due, attempts, "
                "max_attempts, owner, lease_expires, started_at, created_at, updated_at, priority, hold) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING")

# The claim's writes, for the ids the gate took (a JSON list, so one prepared statement serves every count).
CLAIM_IDS = ("UPDATE greenqueue_tasks SET state = 'STARTED', owner = ?, attempts = attempts + 1, hold = NULL, "
             "lease_expires = ?, started_at = ?, updated_at = ? WHERE id IN (SELECT value FROM json_each(?)) "
             "RETURNING " + COLS)
FORGET_LOST = "DELETE FROM greenqueue_lost WHERE node = ? AND task_id IN (SELECT value FROM json_each(?))"

# A row whose cancel was requested while it ran ends CANCELLED when it comes back
# unowned (retry, release), instead of running again.
BACK = """state = CASE WHEN cancel_requested THEN 'CANCELLED' ELSE :state END,
           finished_at = CASE WHEN cancel_requested THEN :now END,
           expires_at = CASE WHEN cancel_requested THEN :now + :ttl END,
           owner = NULL, lease_expires = NULL, updated_at = :now"""


def task_row(r: Sequence[Any]) -> TaskRow:
    """A TaskRow from a SELECT of COLS."""
    r = list(r[:len(FIELDS)])
    r[CANCEL_AT] = bool(r[CANCEL_AT])
    return TaskRow(*r)


def chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """``values`` in slices small enough for one statement's parameters."""
    for i in range(0, len(values), CHUNK):
        yield values[i:i + CHUNK]


def marks(values: Sequence[Any]) -> str:
    """``?, ?, ?`` for ``values``."""
    return ", ".join("?" * len(values))


def queue_filter(queues: Optional[Sequence[str]]) -> Tuple[str, list]:
    """The AND clause and parameters that keep a claim to ``queues`` (None: every queue)."""
    if queues is None:
        return "", []
    return "AND queue IN (%s)" % marks(queues), list(queues)


def filesystem_of(path: str, mountinfo: str) -> str:
    """The filesystem type ``/proc/self/mountinfo`` text gives for ``path`` ("" if unknown)."""
    best, kind = "", ""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mount = fields[4].replace("\\040", " ")
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, right.split()[0]
    return kind


@contextmanager
def write(conn: sqlite3.Connection) -> Iterator[float]:
    """One write transaction under SQLite's write lock; yields the database's clock."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Read after the lock is ours, so times follow the order writers commit in.
        yield time.time()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


# Plain ? placeholders: Python's sqlite3 takes ?NNN for names (a sequence for them is an error
# from Python 3.14). Parameters: finish_params()'s.
FINISH = ("UPDATE greenqueue_tasks SET state = ?, result = ?, error_type = ?, error = ?, traceback = ?, "
          "owner = NULL, lease_expires = NULL, finished_at = ?, updated_at = ?, expires_at = ? "
          "WHERE id = ? AND owner = ? AND attempts = ?")
# FINISH for a success, the common end: Python's sqlite3 binds a None through its adapter lookup,
# so the NULLs are written here instead (a fifth of a finish's cost).
SUCCEED = ("UPDATE greenqueue_tasks SET state = 'SUCCESS', result = ?, error_type = NULL, error = NULL, "
           "traceback = NULL, owner = NULL, lease_expires = NULL, finished_at = ?, updated_at = ?, expires_at = ? "
           "WHERE id = ? AND owner = ? AND attempts = ?")


def finish_params(now: float, p: Sequence[Any]) -> Tuple[str, tuple]:
    """The statement and its parameters at ``now`` for ``finish()``'s arguments (row_id, node, attempt, state, result, error_type, error, traceback, ttl, ...)."""
    if p[3] == "SUCCESS" and p[5] is None and p[6] is None and p[7] is None:
        return SUCCEED, (p[4], now, now, now + p[8], p[0], p[1], p[2])
    return FINISH, (p[3], p[4], p[5], p[6], p[7], now, now, now + p[8], p[0], p[1], p[2])
