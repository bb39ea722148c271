"""The store protocol the task runner calls, and the in-memory store.

Concurrency model: the runner calls a store from the runner's hub thread
only (a spawning greenlet, a task greenlet, the timer greenlet). The memory
store is plain dicts touched from that thread; a durable store may block the
calling greenlet (never the hub) while it commits. Nothing here survives a
fork: a child process builds its own store.

The runner tells the store about each transition of a task: ``spawned``
(a durable store commits before returning, so a spawn that returned
survives a crash), ``started``, ``retrying``, ``finished`` (False means the
result was fenced off and must be discarded) and asks it for finished
results by id, unfinished rows to run again, and periodic runs. A store
never calls the runner back and never raises from an event listener.
"""

import collections
import datetime
import time
from typing import Any, Dict, List, Optional, Protocol

from ._engine import TaskRow

__all__ = ["Store", "MemoryStore", "TaskRow"]

_monotonic = time.monotonic


class Store(Protocol):
    """What the task runner needs from storage: transitions in, results and due work out."""

    #: True when rows outlive the process (journaled @task spawns wait for their commit).
    durable: bool
    #: Where it lives (a path, or a DSN with the password masked); "memory" for the memory store.
    display: str

    def spawned(self, r: Any, args: tuple, kwargs: dict, serializer: str) -> Optional[TaskRow]:
        """Record a new task; a durable store returns only once it is committed (JournalError if not).

        A shared store returns the committed row (another task's, when its idempotency key was used).
        """

    def started(self, r: Any) -> None:
        """An attempt of ``r`` started."""

    def retrying(self, r: Any, delay: float, exc: Optional[BaseException]) -> Optional[bool]:
        """An attempt failed; another follows after ``delay`` seconds.

        True when the store took the retry over (a shared store: any node claims it when due);
        otherwise this process schedules it.
        """

    def finished(self, r: Any, serializer: Optional[str]) -> bool:
        """``r`` reached a final state; False when its result must be discarded (fenced off)."""

    def lookup(self, task_id: str) -> Any:
        """A finished result by id: a TaskResult kept in memory, a TaskRow from disk, or None."""

    def unfinished(self) -> List[TaskRow]:
        """Rows that must run again (after a restart or crash), oldest first."""

    def fired(self, job: str, due: datetime.datetime) -> bool:
        """Record that ``job``'s run due at ``due`` was enqueued; False if it already was."""

    def last_fired(self, job: str) -> Optional[datetime.datetime]:
        """The latest due instant recorded for ``job``, or None."""

    def recent(self, limit: int) -> List[Any]:
        """The newest ``limit`` results finished in this process, newest first (for the dashboard)."""

    def note(self, task_id: str, text: str) -> None:
        """Attach a note to a stored row (an unfinished task whose function is not registered)."""

    def __len__(self) -> int:
        """How many finished results are kept in memory."""

    def stop_recording(self) -> None:
        """Keep what is unfinished as it is (shutdown): later transitions are not written."""

    def close(self) -> None:
        """Flush and release what the store holds."""


class MemoryStore:
    """Finished results kept in this process, bounded by ``max_results`` and ``result_ttl``."""

    durable = False
    display = "memory"

    def __init__(self, result_ttl: float = 3600.0, max_results: int = 10000):
        self.result_ttl = result_ttl
        self.max_results = max_results
        # id -> (TaskResult, monotonic time it finished), oldest first
        self._finished: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
        self._prune_at = 0.0
        self._periodic: Dict[str, datetime.datetime] = {}

    def __len__(self) -> int:
        return len(self._finished)

    def spawned(self, r: Any, args: tuple, kwargs: dict, serializer: str) -> None:
        """Nothing to record: the runner holds live tasks itself."""

    def started(self, r: Any) -> None:
        """Nothing to record."""

    def retrying(self, r: Any, delay: float, exc: Optional[BaseException]) -> None:
        """Nothing to record."""

    def finished(self, r: Any, serializer: Optional[str] = None) -> bool:
        """Keep ``r`` for lookup, bounded by max_results and result_ttl."""
        store = self._finished
        now = _monotonic()
        if self.max_results:
            store[r.id] = (r, now)
            while len(store) > self.max_results:  # while: configure() may have lowered it
                store.popitem(last=False)
        if now < self._prune_at:
            return True  # lookup() hides expired ones; pruning on each insert is wasted work
        self._prune_at = now + min(1.0, self.result_ttl / 10)
        cutoff = now - self.result_ttl
        while store:
            if next(iter(store.values()))[1] > cutoff:
                break
            store.popitem(last=False)
        return True

    def lookup(self, task_id: str) -> Any:
        """The kept result, or None when unknown or past result_ttl."""
        kept = self._finished.get(task_id)
        if kept is None or kept[1] + self.result_ttl < _monotonic():
            return None
        return kept[0]

    def recent(self, limit: int) -> List[Any]:
        """The newest ``limit`` finished results, newest first."""
        out: List[Any] = []
        for r, _ in reversed(self._finished.values()):
            if len(out) >= limit:
                break
            out.append(r)
        return out

    def unfinished(self) -> List[TaskRow]:
        """Nothing survives in memory."""
        return []

    def note(self, task_id: str, text: str) -> None:
        """No rows to annotate."""

    def fired(self, job: str, due: datetime.datetime) -> bool:
        """Remember the latest due instant per job (this process only)."""
        last = self._periodic.get(job)
        if last is not None and due <= last:
            return False
        self._periodic[job] = due
        return True

    def last_fired(self, job: str) -> Optional[datetime.datetime]:
        """Unknown across restarts: None until this process fired the job."""
        return None

    def stop_recording(self) -> None:
        """Nothing is written."""

    def close(self) -> None:
        """Forget every kept result."""
        self._finished.clear()
