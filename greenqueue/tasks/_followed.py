"""Handles of tasks that wait or run elsewhere: in a store's queue, or on another node.

Concurrency model: touched on the task hub's thread only (spawns, a node's
watcher, lookups). Handles are held weakly: one nobody holds any more costs
nothing. A node's watcher asks the store about those still unfinished, in
one read per round, and ``settle`` brings each up to date from its row.
"""

import weakref
from typing import TYPE_CHECKING, Any, List, Optional

from .. import events
from ..journal import TaskRow
from ._attempt import announce_final
from ._result import PENDING, READY_STATES, RETRY, SCHEDULED, STARTED, TaskResult, follow_row, is_waited

if TYPE_CHECKING:
    from ._runner import Runner

__all__ = ["Followed"]

_subscribers = events.subscribers


class Followed:
    """The handles a runner follows through its store, by task id."""

    def __init__(self, runner: "Runner") -> None:
        self.runner = runner
        self._handles: "weakref.WeakValueDictionary[str, TaskResult[Any]]" = weakref.WeakValueDictionary()
        # Ids no store knows yet (``AsyncResult(id)``), followed until their row appears; kept
        # apart so that result(id) keeps saying None for an id nobody spawned.
        self._unknown: "weakref.WeakValueDictionary[str, TaskResult[Any]]" = weakref.WeakValueDictionary()

    def get(self, task_id: str) -> Optional[TaskResult[Any]]:
        """The followed handle of ``task_id``, or None."""
        return self._handles.get(task_id)

    def add(self, r: TaskResult[Any]) -> None:
        """Follow ``r`` (its task waits or runs elsewhere)."""
        self._handles[r.id] = r

    def pop(self, task_id: str) -> Optional[TaskResult[Any]]:
        """Stop following ``task_id``; its handle, if one was followed."""
        self._unknown.pop(task_id, None)
        return self._handles.pop(task_id, None)

    def handle(self, row: TaskRow) -> TaskResult[Any]:
        """A followed handle for an unfinished row (the one already followed, if any)."""
        r = self._handles.get(row.id)
        if r is None:
            r = TaskResult(self.runner, row.id, row.name,
                           row.state if row.state in (PENDING, SCHEDULED, STARTED, RETRY) else PENDING)
            r.retries = max(0, row.attempts - 1)
            self._handles[r.id] = r
        return r

    def unknown(self, task_id: str) -> TaskResult[Any]:
        """A PENDING handle for an id no store knows yet, brought up to date if its row appears."""
        r = self._unknown.get(task_id)
        if r is None:
            r = self._unknown[task_id] = TaskResult(self.runner, task_id, "unknown")
        return r

    def unfinished(self, waited_only: bool = False) -> List[TaskResult[Any]]:
        """Followed handles not final yet (only those someone waits on, with ``waited_only``)."""
        handles = [r for r in list(self._handles.values()) + list(self._unknown.values())
                   if r.state not in READY_STATES]
        if waited_only:
            handles = [r for r in handles if is_waited(r)]
        return handles

    def settle(self, r: TaskResult[Any], row: TaskRow) -> bool:
        """Bring ``r`` up to date with its row; when that made it final, stop following it and say so."""
        if self._handles.get(r.id) is not r and self._unknown.get(r.id) is not r:
            # Taken to run here (or ended) while its row was read: the row is older than the handle.
            return False
        if not follow_row(r, row):
            return False
        self.pop(r.id)
        if _subscribers:
            announce_final(r, 0.0)  # it ran elsewhere: this process never timed it
        return True
