"""Finished results this process keeps for ``result(id)`` and the dashboard, bounded in count and age.

Concurrency model: touched on the task hub's thread only (the runner's
finishing greenlets and its lookups). Whatever the store, a process keeps
the handles of the tasks it finished itself, so ``result(id)`` returns the
same object the spawn did; a durable store adds the rows of every node.
"""

import collections
import time
from typing import Any, List, Optional, Tuple

from ._result import TaskResult

__all__ = ["KeptResults"]

_monotonic = time.monotonic


class KeptResults:
    """Finished TaskResults by id, oldest first, at most ``max_results`` of them and none past ``result_ttl``."""

    def __init__(self, result_ttl: float = 3600.0, max_results: int = 10000) -> None:
        self.result_ttl = result_ttl
        self.max_results = max_results
        # id -> (TaskResult, monotonic time it finished), oldest first
        self._kept: "collections.OrderedDict[str, Tuple[TaskResult[Any], float]]" = collections.OrderedDict()
        self._prune_at = 0.0

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, r: TaskResult[Any]) -> None:
        """Keep ``r`` for lookup, bounded by max_results and result_ttl."""
        kept = self._kept
        now = _monotonic()
        if self.max_results:
            kept[r.id] = (r, now)
            while len(kept) > self.max_results:  # while: configure() may have lowered it
                kept.popitem(last=False)
        if now < self._prune_at:
            return  # lookup() hides expired ones; pruning on each insert is wasted work
        self._prune_at = now + min(1.0, self.result_ttl / 10)
        cutoff = now - self.result_ttl
        while kept:
            if next(iter(kept.values()))[1] > cutoff:
                break
            kept.popitem(last=False)

    def lookup(self, task_id: str) -> Optional[TaskResult[Any]]:
        """The kept result, or None when unknown or past result_ttl."""
        found = self._kept.get(task_id)
        if found is None or found[1] + self.result_ttl < _monotonic():
            return None
        return found[0]

    def recent(self, limit: int) -> List[TaskResult[Any]]:
        """The newest ``limit`` finished results, newest first."""
        out: List[TaskResult[Any]] = []
        for r, _ in reversed(self._kept.values()):
            if len(out) >= limit:
                break
            out.append(r)
        return out

    def clear(self) -> None:
        """Forget every kept result."""
        self._kept.clear()
