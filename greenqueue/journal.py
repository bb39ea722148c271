"""The task journal: an embedded SQLite file that lets tasks survive restarts and crashes.

Concurrency model: the journal is a listener on the task events. It runs in
whichever greenlet published the event and only queues a write; one writer
greenlet hands each batch of queued writes to a dedicated one-thread pool,
where the SQLite connection lives, and commits the batch as one transaction
(group commit). The hub never waits for the disk. A journaled ``spawn()``
waits (its own greenlet only) until its row is committed, so every spawn
that returned survives ``kill -9``; state changes after that are written
without waiting. Nothing here survives a fork: worker processes never touch
the journal.

Storage sits behind :class:`SQLiteStore`, whose methods use portable SQL
(upserts, no SQLite-only types) so a PostgreSQL store with leases and
``FOR UPDATE SKIP LOCKED`` claims can be a second class with the same
methods.
"""

import collections
import datetime
import json
import logging
import os
import pickle
import sqlite3
import sys
import time

from . import events
from .errors import JournalError, RemoteError

log = logging.getLogger(__name__)

__all__ = ["SQLiteStore", "Journal", "enable", "get", "lookup", "stop_recording", "close", "reset", "retry",
           "record_periodic_run", "last_periodic_run", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
_MAGIC = "greenqueue-journal"
UNFINISHED = ("PENDING", "SCHEDULED", "STARTED", "RETRY")
_UTC = datetime.timezone.utc

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
        self.conn = None

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
        groups = {}
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
        sql = ("UPDATE greenqueue_tasks SET state = 'PENDING', eta = NULL, updated_at = ?, finished_at = NULL, "
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


class Journal:
    """The running journal: records task events and replays unfinished tasks at start-up."""

    def __init__(self, path):
        from gevent.threadpool import ThreadPool

        self.store = SQLiteStore(path)
        self.path = self.store.path
        self._pool = ThreadPool(1)  # one thread owns the connection
        self._queue = []
        self._wake = None
        self._writer = None
        self._ids = set()
        self._unsubscribe = None
        self.result_ttl = 3600.0

    def call(self, method, *args):
        """Run a store method on the journal thread (this greenlet waits, the hub does not)."""
        ok, value = self._pool.apply(_guarded, (getattr(self.store, method),) + args)
        if not ok:
            raise value
        return value

    def open(self):
        """Open the file and start the writer; JournalError says what is wrong."""
        import gevent
        from gevent.event import Event

        self.call("open")
        self._wake = Event()
        self._writer = gevent.spawn(self._write_loop)
        return self

    # -- writing ------------------------------------------------------------------

    def write(self, op, *args, wait=False):
        """Queue a write; with ``wait`` block this greenlet until it is committed."""
        done = None
        if wait:
            from gevent.event import AsyncResult
            done = AsyncResult()
        self._queue.append((op, args, done))
        if not self._wake.is_set():
            self._wake.set()
        if done is not None:
            done.get()

    def _write_loop(self):
        while True:
            self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            try:
                self.call("apply", [(op, args) for op, args, _ in batch])
            except Exception as exc:
                err = JournalError("journal %s: write failed: %s (disk full?); the task was not recorded"
                                   % (self.path, exc))
                log.error("%s (%d write(s) lost)", err, len(batch))
                for _, _, done in batch:
                    if done is not None:
                        done.set_exception(err)
                continue
            for _, _, done in batch:
                if done is not None:
                    done.set(None)

    def flush(self):
        """Wait until every queued write is committed."""
        if self._writer is not None and not self._writer.dead:
            self.write("expire", time.time(), wait=True)

    # -- recording task events ----------------------------------------------------

    def attach(self):
        """Start recording task events."""
        import zope.event

        zope.event.subscribers.append(self._on_event)

        def unsubscribe():
            if self._on_event in zope.event.subscribers:
                zope.event.subscribers.remove(self._on_event)
        self._unsubscribe = unsubscribe

    def detach(self):
        """Stop recording: unfinished tasks keep their last recorded state (used on shutdown)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _journaled_task(self, r):
        t = _find_task(r.name)
        if t is None or t.fn is not r._fn or t.batch_size is not None:
            return None
        return t

    def _on_event(self, event):
        kind = type(event)
        if kind is events.TaskSpawned:
            r = event.result
            t = self._journaled_task(r)
            if t is not None:
                self._record_spawn(r, t, time.time())
            return
        r = getattr(event, "result", None)
        if r is None or r.id not in self._ids:
            return
        if kind is events.TaskStarted:
            self.write("started", r.id, time.time())
        elif kind is events.TaskRetrying:
            now = time.time()
            exc = event.exception
            self.write("retry", r.id, now + (event.delay or 0), type(exc).__name__ if exc else None,
                       str(exc) if exc else None, now)
        elif kind is events.TaskSucceeded or kind is events.TaskFailed or kind is events.TaskCancelled:
            now = time.time()
            self._ids.discard(r.id)
            serializer = getattr(self._journaled_task_by_name(r.name), "serializer", "json")
            try:
                blob = _dumps(serializer, r.result) if r.state == "SUCCESS" else None
            except (TypeError, ValueError, pickle.PicklingError):
                blob = _dumps("json", repr(r.result))  # keep something readable rather than nothing
            exc = r.exception
            self.write("finish", r.id, r.state, blob, type(exc).__name__ if exc else None,
                       str(exc) if exc else None, r.traceback, now, now + self.result_ttl, 0)

    def _journaled_task_by_name(self, name):
        return _find_task(name)

    def _record_spawn(self, r, t, now):
        serializer = getattr(t, "serializer", "json")
        try:
            payload = _dumps(serializer, {"args": list(r._args), "kwargs": r._kwargs})
        except (TypeError, ValueError) as exc:
            r._runner._live.pop(r.id, None)
            raise TypeError("task %s: arguments cannot be journaled as JSON (%s); pass ids instead "
                            "of objects, or use @task(serializer='pickle')" % (t.name, exc)) from None
        eta = r.eta.timestamp() if r.eta is not None else None
        rec = {"id": r.id, "name": t.name, "serializer": serializer, "payload": payload,
               "state": r.state, "eta": eta, "attempts": r.retries, "now": now}
        self._ids.add(r.id)
        try:
            self.write("enqueue", rec, wait=True)
        except JournalError:
            self._ids.discard(r.id)
            r._runner._live.pop(r.id, None)
            raise

    # -- start-up replay ------------------------------------------------------------

    def replay(self, runner):
        """Spawn every unfinished journaled task again; returns (replayed, kept unknown)."""
        rows = self.call("unfinished")
        replayed, unknown = 0, []
        now = time.time()
        for row in rows:
            t = _find_task(row["name"])
            if t is None:
                unknown.append(row)
                self.write("note", row["id"], "no task named %r was registered at the last start; kept"
                           % row["name"])
                continue
            data = _loads(row["serializer"], row["payload"])
            eta = None
            if row["eta"] is not None and row["eta"] > now:
                eta = datetime.datetime.fromtimestamp(row["eta"], _UTC)
            runner.spawn(t.fn, tuple(data["args"]), data["kwargs"], name=t.name, opts=t.opts,
                         eta=eta, force=True, task_id=row["id"], retries=row["attempts"])
            replayed += 1
        if unknown:
            names = sorted({row["name"] for row in unknown})
            log.warning("journal %s: kept %d task(s) whose function is not registered: %s "
                        "(see python -m greenqueue.journal %s list)", self.path, len(unknown),
                        ", ".join(names), self.path)
        if replayed:
            log.info("journal %s: replayed %d unfinished task(s)", self.path, replayed)
        return replayed, len(unknown)

    def lookup(self, task_id):
        """A finished TaskResult read back from the file, or None."""
        row = self.call("get", task_id)
        if row is None or row["state"] in UNFINISHED:
            return None
        if row["expires_at"] is not None and row["expires_at"] < time.time():
            return None
        return _restored_result(row)

    def close(self):
        """Flush, stop the writer and close the file."""
        self.detach()
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.kill(block=True)
            try:
                self.call("close")
            finally:
                self._pool.kill()


_registry = None


def _find_task(name):
    global _registry
    if _registry is None:
        from .tasks._task import _registry  # read-only peek: this runs on every task event
    return _registry.get(name)


def _guarded(fn, *args):
    # Runs on the journal thread: hand errors back instead of letting gevent's
    # thread pool print a traceback for an error the caller will report anyway.
    try:
        return True, fn(*args)
    except Exception as exc:
        return False, exc


def _restored_result(row):
    from .tasks import TaskResult, get_runner
    from .tasks._runner import _NO_OPTIONS

    r = TaskResult(get_runner(), row["id"], row["name"], None, (), {}, _NO_OPTIONS, None)
    r.retries = max(0, row["attempts"] - 1)
    r._started_ts = row["started_at"]
    r._finished_ts = row["finished_at"]
    if row["state"] == "SUCCESS":
        r._set("SUCCESS", _loads(row["serializer"], row["result"]))
    else:
        # The original exception object did not survive the restart; its type, message
        # and traceback did.
        r._set(row["state"], exc=RemoteError(row["error"] or "", row["error_type"] or "Exception",
                                             row["traceback"] or ""), tb=row["traceback"] or "")
    return r


_current = None


def enable(path, result_ttl=None):
    """Open the journal at ``path``, record task events and replay unfinished tasks."""
    global _current
    if _current is not None:
        if _current.path == os.fspath(path):
            return _current
        raise JournalError("a journal (%s) is already open" % _current.path)
    j = Journal(path)
    from .tasks import get_runner
    runner = get_runner()
    j.result_ttl = result_ttl if result_ttl is not None else runner.result_ttl
    j.open()
    j.attach()
    _current = j
    j.replay(runner)
    return j


def get():
    """The open journal, or None."""
    return _current


def lookup(task_id):
    """A finished result from the open journal (None without one)."""
    return _current.lookup(task_id) if _current is not None else None


def stop_recording():
    """Stop recording events so what is unfinished at shutdown stays unfinished in the file."""
    if _current is not None:
        _current.detach()


def close():
    """Flush and close the open journal."""
    global _current
    j, _current = _current, None
    if j is not None:
        j.close()


def reset():
    """Close the journal without replaying anything (tests)."""
    close()


def retry(task_id):
    """Run a failed or cancelled journaled task again now, with the same id; returns its TaskResult."""
    if _current is None:
        raise JournalError("no journal is open; only journaled tasks can be retried")
    row = _current.call("get", task_id)
    if row is None:
        raise JournalError("task %s is not in the journal %s" % (task_id, _current.path))
    if row["state"] not in ("FAILURE", "CANCELLED"):
        raise JournalError("task %s is %s; only failed or cancelled tasks can be retried" % (task_id, row["state"]))
    t = _find_task(row["name"])
    if t is None:
        raise JournalError("task %s: no task named %r is registered" % (task_id, row["name"]))
    from .tasks import get_runner
    data = _loads(row["serializer"], row["payload"])
    return get_runner().spawn(t.fn, tuple(data["args"]), data["kwargs"], name=t.name, opts=t.opts,
                              task_id=row["id"])


def record_periodic_run(job, scheduled_for):
    """Record that ``job``'s run due at ``scheduled_for`` (aware datetime) fired."""
    if _current is not None:
        _current.write("periodic", job, scheduled_for.timestamp(), time.time())


def last_periodic_run(job):
    """The latest recorded due time of ``job`` as an aware UTC datetime, or None."""
    if _current is None:
        return None
    ts = _current.call("last_periodic", job)
    return None if ts is None else datetime.datetime.fromtimestamp(ts, _UTC)


# -- command line --------------------------------------------------------------------

def _fmt_ts(ts):
    return "-" if ts is None else datetime.datetime.fromtimestamp(ts, _UTC).strftime("%Y-%m-%d %H:%M:%S")


def main(argv=None):
    """``python -m greenqueue.journal PATH [list|retry|purge]``: inspect and repair a journal."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m greenqueue.journal",
                                     description="Show, list, retry or purge tasks in a greenqueue journal.")
    parser.add_argument("path", help="the journal file (the server's --journal)")
    sub = parser.add_subparsers(dest="command")
    p_list = sub.add_parser("list", help="list tasks, newest first")
    p_list.add_argument("--state", help="only this state (e.g. FAILURE, PENDING)")
    p_list.add_argument("--limit", type=int, default=50)
    p_retry = sub.add_parser("retry", help="make failed tasks pending again (run at the next start)")
    p_retry.add_argument("task_id", nargs="?", help="one task id (default: every failed task)")
    p_purge = sub.add_parser("purge", help="delete finished tasks of one state")
    p_purge.add_argument("--state", default="FAILURE")
    args = parser.parse_args(argv)
    if not os.path.exists(args.path):
        print("greenqueue.journal: error: %s does not exist" % args.path, file=sys.stderr)
        return 2
    store = SQLiteStore(args.path)
    try:
        store.open()
    except JournalError as exc:
        print("greenqueue.journal: error: %s" % exc, file=sys.stderr)
        return 2
    try:
        if args.command == "list":
            for row in store.list(args.state, args.limit):
                line = "%s  %-9s %-40s attempts=%d updated=%s" % (
                    row["id"], row["state"], row["name"], row["attempts"], _fmt_ts(row["updated_at"]))
                if row["error"]:
                    line += "  error=%s: %s" % (row["error_type"], row["error"])
                if row["note"]:
                    line += "  note=%s" % row["note"]
                print(line)
        elif args.command == "retry":
            print("%d task(s) will run at the next start" % store.requeue_failed(args.task_id))
        elif args.command == "purge":
            print("%d %s task(s) deleted" % (store.purge(args.state), args.state.upper()))
        else:
            counts = store.counts()
            print("journal %s (schema %d)" % (args.path, SCHEMA_VERSION))
            for state in ("PENDING", "SCHEDULED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "CANCELLED"):
                print("  %-9s %d" % (state, counts.get(state, 0)))
            waiting = store.unfinished()
            if waiting:
                oldest = waiting[0]
                print("oldest unfinished: %s %s since %s" % (oldest["id"], oldest["name"],
                                                             _fmt_ts(oldest["created_at"])))
            noted = [r for r in waiting if r["note"]]
            if noted:
                print("%d task(s) need attention (function not registered):" % len(noted))
                for r in noted:
                    print("  %s %s" % (r["id"], r["name"]))
    except JournalError as exc:
        print("greenqueue.journal: error: %s" % exc, file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
