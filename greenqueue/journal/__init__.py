"""The task journal: an embedded SQLite file that lets tasks survive restarts and crashes.

Concurrency model: the journal is the runner's :class:`Store`. The runner
calls it from task greenlets and the spawning greenlet on the runner's hub
thread; each call only queues a write, except ``spawned``, which waits (its
own greenlet only) until its row is committed, so every spawn that returned
survives ``kill -9``. One writer greenlet hands each batch of queued writes
to a dedicated one-thread pool, where the SQLite connection lives, and
commits the batch as one transaction (group commit). The hub never waits
for the disk. Nothing here survives a fork: worker processes never touch
the journal.

Storage sits behind :class:`SQLiteStore`; the rules a store shared by
several nodes must keep are in ``_engine.py`` (a PostgreSQL engine is the
second implementation).
"""

import datetime
import logging
import pickle
import time
from typing import Any, List, Optional

from ..errors import JournalError
from ._base import MemoryStore, Store
from ._engine import FINAL, UNFINISHED, TaskRow
from ._store import SCHEMA_VERSION, SQLiteStore, _dumps, _loads

log = logging.getLogger(__name__)

__all__ = ["Store", "MemoryStore", "Journal", "SQLiteStore", "TaskRow", "SCHEMA_VERSION", "open_store",
           "loads", "dumps", "UNFINISHED", "FINAL"]

_UTC = datetime.timezone.utc

#: How stored arguments and results are turned into bytes and back ("json" or "pickle").
dumps = _dumps
loads = _loads


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
    """The runner's durable store on an SQLite file: records transitions, returns unfinished rows."""

    durable = True

    def __init__(self, path: str, result_ttl: float = 3600.0, max_results: int = 10000):
        from gevent.threadpool import ThreadPool

        self.store = SQLiteStore(path)
        self.path = self.store.path
        self.display = self.path
        self._pool = ThreadPool(1)  # one thread owns the connection
        self._queue: list = []   # (op, args) not yet handed to the journal thread
        self._batch = _Batch()   # what waiters of the queued writes wait on
        self._wake: Any = None
        self._writer: Any = None
        self._recording = True
        self.result_ttl = result_ttl
        # Recent results stay in memory too: lookups of fresh results never touch the disk.
        self.memory = MemoryStore(result_ttl, max_results)

    def __len__(self) -> int:
        return len(self.memory)

    def recent(self, limit: int) -> List[Any]:
        """The newest ``limit`` results finished in this process, newest first."""
        return self.memory.recent(limit)

    def call(self, method: str, *args: Any) -> Any:
        """Run a store method on the journal thread (this greenlet waits, the hub does not)."""
        ok, value = self._pool.apply(_guarded, (getattr(self.store, method),) + args)
        if not ok:
            raise value
        return value

    def open(self) -> "Journal":
        """Open the file and start the writer; JournalError says what is wrong."""
        import gevent
        from gevent.event import Event

        self.call("open")
        self._wake = Event()
        self._writer = gevent.spawn(self._write_loop)
        return self

    # -- writing ------------------------------------------------------------------

    def write(self, op: str, *args: Any, wait: bool = False) -> None:
        """Queue a write; with ``wait`` block this greenlet until it is committed."""
        self._queue.append((op, args))
        batch = self._batch
        if not self._wake.is_set():
            self._wake.set()
        if wait:
            batch.wait()

    def _write_loop(self) -> None:
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

    def flush(self) -> None:
        """Wait until every queued write is committed."""
        if self._writer is not None and not self._writer.dead:
            self.write("expire", time.time(), wait=True)

    # -- the Store protocol ----------------------------------------------------------

    def spawned(self, r: Any, args: tuple, kwargs: dict, serializer: str) -> None:
        """Write the task's row and wait for its commit (JournalError when it cannot be written)."""
        try:
            payload = _dumps(serializer, {"args": list(args), "kwargs": kwargs})
        except (TypeError, ValueError) as exc:
            raise TypeError("task %s: arguments cannot be journaled as JSON (%s); pass ids instead "
                            "of objects, or use @task(serializer='pickle')" % (r.name, exc)) from None
        eta = r.eta.timestamp() if r.eta is not None else None
        rec = {"id": r.id, "name": r.name, "serializer": serializer, "payload": payload,
               "state": r.state, "eta": eta, "attempts": r.retries, "now": time.time()}
        self.write("enqueue", rec, wait=True)

    def started(self, r: Any) -> None:
        """Count the attempt."""
        if self._recording:
            self.write("started", r.id, time.time())

    def retrying(self, r: Any, delay: float, exc: Optional[BaseException]) -> None:
        """Record the failed attempt and when the next one is due."""
        if self._recording:
            now = time.time()
            self.write("retry", r.id, now + (delay or 0), type(exc).__name__ if exc else None,
                       str(exc) if exc else None, now)

    def finished(self, r: Any, serializer: Optional[str]) -> bool:
        """Record the final state and result (kept until result_ttl)."""
        self.memory.finished(r)
        if not self._recording or serializer is None:
            return True
        now = time.time()
        try:
            blob = _dumps(serializer, r.result) if r.state == "SUCCESS" else None
        except (TypeError, ValueError, pickle.PicklingError):
            blob = _dumps("json", repr(r.result))  # keep something readable rather than nothing
        exc = r.exception
        self.write("finish", r.id, r.state, blob, _error_type(exc), str(exc) if exc else None, r.traceback,
                   now, now + self.result_ttl, 0)
        return True

    def lookup(self, task_id: str) -> Any:
        """A finished result: from memory when recent, else the row read back from the file."""
        r = self.memory.lookup(task_id)
        if r is not None:
            return r
        row = self.call("get", task_id)
        if row is None or row["state"] in UNFINISHED:
            return None
        if row["expires_at"] is not None and row["expires_at"] < time.time():
            return None
        return _row(row)

    def unfinished(self) -> List[TaskRow]:
        """Every row not in a final state, oldest first."""
        return [_row(d) for d in self.call("unfinished")]

    def note(self, task_id: str, text: str) -> None:
        """Attach a note to a row (shown by the journal CLI)."""
        self.write("note", task_id, text)

    def requeue(self, task_id: str) -> TaskRow:
        """Check that a failed or cancelled row may run again and return it (fresh attempt budget)."""
        row = self.call("get", task_id)
        if row is None:
            raise JournalError("task %s is not in the journal %s" % (task_id, self.path))
        if row["state"] not in ("FAILURE", "CANCELLED"):
            raise JournalError("task %s is %s; only failed or cancelled tasks can be retried"
                               % (task_id, row["state"]))
        row["attempts"] = 0
        return _row(row)

    def fired(self, job: str, due: datetime.datetime) -> bool:
        """Record that ``job``'s run due at ``due`` fired."""
        self.write("periodic", job, due.timestamp(), time.time())
        return True

    def last_fired(self, job: str) -> Optional[datetime.datetime]:
        """The latest recorded due time of ``job`` as an aware UTC datetime, or None."""
        ts = self.call("last_periodic", job)
        return None if ts is None else datetime.datetime.fromtimestamp(ts, _UTC)

    def stop_recording(self) -> None:
        """Stop writing transitions: what is unfinished now stays unfinished in the file (shutdown)."""
        self._recording = False

    def close(self) -> None:
        """Flush, stop the writer and close the file."""
        self._recording = False
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.kill(block=True)
            try:
                self.call("close")
            finally:
                self._pool.kill()


def open_store(path: str, result_ttl: float = 3600.0, max_results: int = 10000) -> Journal:
    """Open the journal at ``path`` (JournalError names the file and what to do)."""
    return Journal(path, result_ttl, max_results).open()


def _error_type(exc: Optional[BaseException]) -> Optional[str]:
    if exc is None:
        return None
    # A RemoteError read back from the file keeps the original type's name.
    return getattr(exc, "remote_type", None) or type(exc).__name__


def _row(d: dict) -> TaskRow:
    fields = {k: v for k, v in d.items() if k != "updated_at"}
    return TaskRow(**fields)


def _guarded(fn, *args):
    # Runs on the journal thread: hand errors back instead of letting gevent's
    # thread pool print a traceback for an error the caller will report anyway.
    try:
        return True, fn(*args)
    except Exception as exc:
        return False, exc
