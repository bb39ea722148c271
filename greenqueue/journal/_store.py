"""Journal storage: one SQLite file behind a small, portable interface.

Concurrency model: every method runs on the journal's own thread (or in the
command-line tool); nothing here touches the hub. The SQL is portable
(upserts, plain types) so a PostgreSQL store with leases and
``FOR UPDATE SKIP LOCKED`` claims can be a second class with these methods.
"""

import collections
import json
import os
import pickle
import sqlite3
import time
from typing import Any, Dict, List

from ..errors import JournalError

__all__ = ["SQLiteStore", "SCHEMA_VERSION", "UNFINISHED"]

SCHEMA_VERSION = 1
_MAGIC = "greenqueue-journal"
UNFINISHED = ("PENDING", "SCHEDULED", "STARTED", "RETRY")

_SCHEMA = [
    """CREATE TABLE greenqueue_meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE greenqueue_tasks (
        id VARCHAR(32) PRIMARY KEY,
        name VARCHAR(255) NOT NULL,
        serializer VARCHAR(16) NOT NULL,
        payload BLOB NOT NULL,
        state VARCHAR(16) NOT NULL,
        eta DOUBLE PRECISION,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        expires_at DOUBLE PRECISION,
        result BLOB,
        error_type VARCHAR(255),
        error TEXT,
        traceback TEXT,
        note TEXT)""",
    """CREATE INDEX greenqueue_tasks_state ON greenqueue_tasks (state, eta)""",
    """CREATE TABLE greenqueue_periodic (
        job VARCHAR(255) NOT NULL,
        scheduled_for DOUBLE PRECISION NOT NULL,
        fired_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (job, scheduled_for))""",
]


# json.dumps() with arguments builds a new encoder per call; reuse one.
_json_encode = json.JSONEncoder(separators=(",", ":")).encode


def _dumps(serializer, value):
    if serializer == "pickle":
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _json_encode(value).encode()


def _loads(serializer, blob):
    if blob is None:
        return None
    if serializer == "pickle":
        return pickle.loads(blob)
    return json.loads(blob)


class SQLiteStore:
    """Journal storage in one SQLite file; every method runs on the journal's thread."""

    def __init__(self, path):
        self.path = os.fspath(path)
        # Any, not Optional: open() sets it before any other method runs.
        self.conn: Any = None

    def _fail(self, reason):
        raise JournalError("journal %s: %s" % (self.path, reason))

    def open(self):
        """Open (creating if new) and check the file is a greenqueue journal of a known version."""
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            self._fail("directory %s does not exist" % directory)
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            self._fail("not a greenqueue journal or corrupt (%s); move it away or pick another path" % exc)
        self.conn = conn
        try:
            if not tables:
                self._create()
            elif "greenqueue_meta" not in tables:
                self._fail("is an SQLite database of something else (tables: %s); refusing to touch it"
                           % ", ".join(sorted(tables)))
            else:
                self._check_version()
            conn.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit survives a process crash (kill -9); only an OS
            # crash or power cut can lose the last transactions.
            conn.execute("PRAGMA synchronous=NORMAL")
            # Prove we can write now, so a full disk or read-only file fails at start-up.
            self._set_meta("opened_at", repr(time.time()))
        except sqlite3.DatabaseError as exc:
            self._fail("cannot use it: %s (disk full, read-only or corrupt?)" % exc)

    def _create(self):
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        for stmt in _SCHEMA:
            c.execute(stmt)
        c.execute("INSERT INTO greenqueue_meta (key, value) VALUES ('magic', ?)", (_MAGIC,))
        c.execute("INSERT INTO greenqueue_meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        c.execute("PRAGMA user_version=%d" % SCHEMA_VERSION)
        c.execute("COMMIT")

    def _check_version(self):
        meta = dict(self.conn.execute("SELECT key, value FROM greenqueue_meta"))
        if meta.get("magic") != _MAGIC:
            self._fail("has a greenqueue_meta table but is not a greenqueue journal")
        version = int(meta.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            self._fail("was written by a newer greenqueue (schema %d, this one knows %d); upgrade "
                       "greenqueue or point --journal at another file" % (version, SCHEMA_VERSION))
        if version < 1:
            self._fail("has an unknown schema version %r" % meta.get("schema_version"))

    def _set_meta(self, key, value):
        self.conn.execute("INSERT INTO greenqueue_meta (key, value) VALUES (?, ?) "
                          "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    def close(self):
        """Close the connection (checkpoints the WAL)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # -- writes: applied in batches, one transaction per batch --------------------

    _BULK = {
        "enqueue": "INSERT INTO greenqueue_tasks (id, name, serializer, payload, state, eta, attempts, "
                   "created_at, updated_at) VALUES (:id, :name, :serializer, :payload, :state, :eta, :attempts, "
                   ":now, :now) ON CONFLICT (id) DO UPDATE SET state = excluded.state, eta = excluded.eta, "
                   "updated_at = excluded.updated_at, note = NULL",
        "started": "UPDATE greenqueue_tasks SET state = 'STARTED', attempts = attempts + 1, started_at = ?2, "
                   "updated_at = ?2 WHERE id = ?1",
        "finish": "UPDATE greenqueue_tasks SET state = ?2, result = ?3, error_type = ?4, error = ?5, "
                  "traceback = ?6, finished_at = ?7, updated_at = ?7, expires_at = ?8, "
                  "attempts = attempts + ?9 WHERE id = ?1",
    }
    # Lifecycle order, so grouping a batch by operation keeps each task's story in order.
    _ORDER = ("enqueue", "started", "retry", "finish")

    def apply(self, ops):
        """Apply ``[(method name, args), ...]`` in one transaction, like operations together."""
        c = self.conn
        groups: Dict[str, List[Any]] = {}
        for name, args in ops:
            groups.setdefault(name, []).append(args)
        # A task that started and finished within one batch needs one UPDATE, not two:
        # fold its "started" rows into the attempt count its "finish" row writes.
        if "started" in groups and "finish" in groups:
            finishing = {a[0] for a in groups["finish"]}
            folded = collections.Counter(a[0] for a in groups["started"] if a[0] in finishing)
            if folded:
                groups["started"] = [a for a in groups["started"] if a[0] not in folded]
                groups["finish"] = [a[:8] + (folded.get(a[0], 0),) for a in groups["finish"]]
        c.execute("BEGIN IMMEDIATE")
        try:
            for name in self._ORDER + tuple(n for n in groups if n not in self._ORDER):
                batch = groups.get(name)
                if not batch:
                    continue
                if name in self._BULK:
                    c.executemany(self._BULK[name], [a[0] if name == "enqueue" else a for a in batch])
                else:
                    method = getattr(self, "w_" + name)
                    for args in batch:
                        method(*args)
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def w_retry(self, task_id, eta, error_type, error, now):
        self.conn.execute("UPDATE greenqueue_tasks SET state = 'RETRY', eta = ?, error_type = ?, error = ?, "
                          "updated_at = ? WHERE id = ?", (eta, error_type, error, now, task_id))


    def w_note(self, task_id, note):
        self.conn.execute("UPDATE greenqueue_tasks SET note = ? WHERE id = ?", (note, task_id))

    def w_periodic(self, job, scheduled_for, fired_at):
        self.conn.execute("INSERT INTO greenqueue_periodic (job, scheduled_for, fired_at) VALUES (?, ?, ?) "
                          "ON CONFLICT (job, scheduled_for) DO NOTHING", (job, scheduled_for, fired_at))

    def w_expire(self, now):
        self.conn.execute("DELETE FROM greenqueue_tasks WHERE expires_at IS NOT NULL AND expires_at < ?", (now,))

    # -- reads ----------------------------------------------------------------------

    _COLUMNS = ("id", "name", "serializer", "payload", "state", "eta", "attempts", "created_at",
                "updated_at", "started_at", "finished_at", "expires_at", "result", "error_type",
                "error", "traceback", "note")

    def _rows(self, sql, args=()):
        cols = ", ".join(self._COLUMNS)
        return [dict(zip(self._COLUMNS, row)) for row in self.conn.execute(sql % cols, args)]

    def unfinished(self):
        """Every task row not in a final state, oldest first."""
        return self._rows("SELECT %s FROM greenqueue_tasks WHERE state IN ('PENDING', 'SCHEDULED', "
                          "'STARTED', 'RETRY') ORDER BY created_at")

    def get(self, task_id):
        """One task row by id, or None."""
        rows = self._rows("SELECT %s FROM greenqueue_tasks WHERE id = ?", (task_id,))
        return rows[0] if rows else None

    def list(self, state=None, limit=50):
        """Task rows (optionally of one state), newest first."""
        if state:
            return self._rows("SELECT %s FROM greenqueue_tasks WHERE state = ? ORDER BY updated_at DESC "
                              "LIMIT ?", (state.upper(), limit))
        return self._rows("SELECT %s FROM greenqueue_tasks ORDER BY updated_at DESC LIMIT ?", (limit,))

    def counts(self):
        """``{state: count}``."""
        return dict(self.conn.execute("SELECT state, COUNT(*) FROM greenqueue_tasks GROUP BY state"))

    def last_periodic(self, job):
        """Latest scheduled time recorded for ``job`` (epoch seconds) or None."""
        row = self.conn.execute("SELECT MAX(scheduled_for) FROM greenqueue_periodic WHERE job = ?",
                                (job,)).fetchone()
        return row[0] if row else None

    def requeue_failed(self, task_id=None):
        """Make FAILURE rows (one, or all) PENDING again; returns how many."""
        now = time.time()
        sql = ("UPDATE greenqueue_tasks SET state = 'PENDING', eta = NULL, attempts = 0, updated_at = ?, finished_at = NULL, "
               "expires_at = NULL WHERE state IN ('FAILURE', 'CANCELLED')")
        args = [now]
        if task_id:
            sql += " AND id = ?"
            args.append(task_id)
        return self.conn.execute(sql, args).rowcount

    def purge(self, state):
        """Delete rows of one final state; returns how many."""
        if state.upper() in UNFINISHED:
            raise JournalError("refusing to purge unfinished tasks (%s); cancel them first" % state)
        return self.conn.execute("DELETE FROM greenqueue_tasks WHERE state = ?", (state.upper(),)).rowcount
