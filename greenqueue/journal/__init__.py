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

import datetime
import logging
import os
import pickle
import time

from .. import events
from ..errors import JournalError, RemoteError
from ._store import SCHEMA_VERSION, UNFINISHED, SQLiteStore, _dumps, _loads

log = logging.getLogger(__name__)

__all__ = ["SQLiteStore", "Journal", "enable", "get", "lookup", "stop_recording", "close", "reset", "retry",
           "record_periodic_run", "last_periodic_run", "SCHEMA_VERSION"]

_UTC = datetime.timezone.utc


class _Batch:
    """The commit of one batch of writes, which many spawns may wait for."""

    __slots__ = ("event", "error")

    def __init__(self):
        from gevent.event import Event

        self.event = Event()
        self.error = None

    def wait(self):
        """Block this greenlet until the batch is committed; raise its JournalError if it failed."""
        self.event.wait()
        if self.error is not None:
            raise self.error

    def done(self, error):
        """Mark the batch committed (or failed with ``error``) and wake its waiters."""
        self.error = error
        self.event.set()


class Journal:
    """The running journal: records task events and replays unfinished tasks at start-up."""

    def __init__(self, path):
        from gevent.threadpool import ThreadPool

        self.store = SQLiteStore(path)
        self.path = self.store.path
        self._pool = ThreadPool(1)  # one thread owns the connection
        self._queue = []         # (op, args) not yet handed to the journal thread
        self._batch = _Batch()   # what waiters of the queued writes wait on
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
        self._queue.append((op, args))
        batch = self._batch
        if not self._wake.is_set():
            self._wake.set()
        if wait:
            batch.wait()

    def _write_loop(self):
        while True:
            self._wake.wait()
            self._wake.clear()
            ops, self._queue = self._queue, []
            # Everyone waiting on this batch shares one Event: one wake-up pass, not one per write.
            batch, self._batch = self._batch, _Batch()
            if not ops:
                batch.done(None)
                continue
            try:
                self.call("apply", ops)
            except Exception as exc:
                err = JournalError("journal %s: write failed: %s (disk full?); the task was not recorded"
                                   % (self.path, exc))
                log.error("%s (%d write(s) lost)", err, len(ops))
                batch.done(err)
                continue
            batch.done(None)

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
        from ..tasks._task import _registry  # read-only peek: this runs on every task event
    return _registry.get(name)


def _guarded(fn, *args):
    # Runs on the journal thread: hand errors back instead of letting gevent's
    # thread pool print a traceback for an error the caller will report anyway.
    try:
        return True, fn(*args)
    except Exception as exc:
        return False, exc


def _restored_result(row):
    from ..tasks import TaskResult, get_runner
    from ..tasks._runner import _NO_OPTIONS

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
    from ..tasks import get_runner
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
    from ..tasks import get_runner
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
