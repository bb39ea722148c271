"""Rate and concurrency limits of tasks held in one process (no journal): parsing, and the in-memory gate.

Concurrency model: the gate lives on the task hub's thread like the engine
that owns it; no lock. A durable store judges limits itself for the whole
cluster (its claim), so the gate only sees entries nobody stores.
"""

import bisect
import collections
import dataclasses
import re
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from ..errors import ConfigError
from ..journal._gate import margin

__all__ = ["parse_rate", "bucket_of", "with_buckets", "limits_of", "Gate", "PARKED"]

_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([smh])\s*$")

#: What ``Gate.admit`` answers for an entry that waits for a running one of its key to end.
PARKED = -1.0
#: ``Entry.waits`` of an entry delayed until its rate window has room.
RATE = "rate limit"


def parse_rate(value: Any) -> Optional[Tuple[int, float]]:
    """``"N/s"``, ``"N/m"``, ``"N/h"`` (or a number: per second) as (starts, seconds); ConfigError naming rate_limit."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0 or int(value) != value:
            raise ConfigError("rate_limit must be a positive whole number of starts per second, or \"N/s\", "
                              "\"N/m\" or \"N/h\"; got %r" % (value,))
        return int(value), 1.0
    found = _RATE.match(value) if isinstance(value, str) else None
    if found is None or int(found.group(1)) <= 0:
        raise ConfigError("rate_limit must look like \"10/s\", \"100/m\" or \"1000/h\" (starts per period, the whole "
                          "cluster together), got %r" % (value,))
    return int(found.group(1)), float(found.group(2) or 1) * _PERIODS[found.group(3)]


def with_buckets(task: str, opts: Any, args: tuple, kwargs: dict) -> Any:
    """``opts`` with the buckets this spawn counts in (ConfigError when a key function raises)."""
    return dataclasses.replace(
        opts, rate_bucket=None if opts.rate_limit is None else bucket_of(task, "rate_key", opts.rate_key, args, kwargs),
        limit_bucket=None if opts.concurrency_limit is None
        else bucket_of(task, "concurrency_key", opts.concurrency_key, args, kwargs))


def limits_of(opts: Any) -> Tuple[Optional[Tuple[str, int, float]], Optional[Tuple[str, int]]]:
    """A spawn's rate and concurrency limits as a store row carries them (bucket, limit[, period])."""
    rate = None if opts.rate_bucket is None else (opts.rate_bucket,) + tuple(opts.rate_limit)
    limit = None if opts.limit_bucket is None else (opts.limit_bucket, opts.concurrency_limit)
    return rate, limit


def bucket_of(task: str, label: str, key: Optional[Callable[..., Any]], args: tuple, kwargs: dict) -> str:
    """The bucket one spawn counts in: the task's own, or one per ``key(*args, **kwargs)``."""
    if key is None:
        return task
    try:
        value = key(*args, **kwargs)
    except Exception as exc:
        raise ConfigError("%s: %s(%s) raised %s: %s; it must return the key for these arguments"
                          % (task, label, getattr(key, "__name__", "key"), type(exc).__name__, exc)) from exc
    return "%s|%s" % (task, value)


class Gate:
    """Starts per window and runs at once per bucket, for entries held in this process."""

    def __init__(self) -> None:
        self._starts: Dict[str, Deque[float]] = {}
        self._running: Dict[str, int] = collections.Counter()
        self._parked: Dict[str, Deque[Any]] = {}
        self._most: Dict[Tuple[str, str], int] = {}      # (kind, bucket) -> its limit, for the gauges
        self._held: Dict[str, int] = collections.Counter()  # rate bucket -> entries waiting for its window
        self._period: Dict[str, float] = {}                 # rate bucket -> its window's length

    def admit(self, e: Any) -> Optional[float]:
        """None: start ``e`` now (counted); PARKED: wait for a run of its key to end; else seconds to wait."""
        opts = e.opts
        reserved = e.waits is not None
        if reserved:
            self.unhold(e)
        if opts.limit_bucket is not None and opts.concurrency_limit is not None:
            self._most["concurrency", opts.limit_bucket] = opts.concurrency_limit
            if self._running[opts.limit_bucket] >= opts.concurrency_limit:
                self._parked.setdefault(opts.limit_bucket, collections.deque()).append(e)
                return PARKED
        if opts.rate_bucket is not None and opts.rate_limit is not None:
            n, per = opts.rate_limit
            per += margin(per)  # as a store keeps it: a start is counted a moment before the first line runs
            self._most["rate", opts.rate_bucket] = n
            self._period[opts.rate_bucket] = per
            now = time.monotonic()
            starts = self._starts.setdefault(opts.rate_bucket, collections.deque())
            while starts and starts[0] <= now - per:
                starts.popleft()
            if not reserved:  # else it starts on the start reserved for it
                if len(starts) >= n:
                    # Sliding: the window allows one more when the n-th latest start (made or
                    # reserved) leaves it. Reserve that, behind every reservation already made, so
                    # a backlog is looked at once per entry, not once per window.
                    at = starts[len(starts) - n] + per
                    starts.append(at)
                    e.waits = RATE
                    self._held[opts.rate_bucket] += 1
                    return max(0.0, at - now)
                bisect.insort(starts, now)  # reservations may lie ahead of it
        if opts.limit_bucket is not None:
            self._running[opts.limit_bucket] += 1
        return None

    def ended(self, e: Any) -> None:
        """``e``'s attempt, admitted here, ended: its key has room for one more."""
        bucket = e.opts.limit_bucket
        if bucket is not None:
            self._running[bucket] -= 1
            if self._running[bucket] <= 0:
                del self._running[bucket]

    def unpark(self, bucket: str) -> Optional[Any]:
        """The next parked entry of ``bucket`` (the caller skips ones cancelled meanwhile), or None."""
        parked = self._parked.get(bucket)
        if not parked:
            return None
        waiting = parked.popleft()
        if not parked:
            del self._parked[bucket]
        return waiting

    def parked_entries(self) -> List[Any]:
        """Every parked entry (the caller skips ones cancelled meanwhile)."""
        return [e for line in self._parked.values() for e in line]

    def unhold(self, e: Any) -> None:
        """``e`` no longer waits for its rate window (it is looked at again, or was cancelled)."""
        e.waits = None
        bucket = e.opts.rate_bucket
        self._held[bucket] -= 1
        if self._held[bucket] <= 0:
            del self._held[bucket]

    def stats(self) -> List[Tuple[str, str, Optional[int], int, int]]:
        """(kind, bucket, limit, in use, waiting) per bucket, as a store's ``limits()`` says them."""
        now = time.monotonic()
        out: List[Tuple[str, str, Optional[int], int, int]] = []
        for (kind, bucket), most in self._most.items():
            if kind == "concurrency":
                used, waiting = self._running.get(bucket, 0), len(self._parked.get(bucket, ()))
            else:
                per = self._period.get(bucket, 0.0)
                used = sum(1 for t in self._starts.get(bucket, ()) if now - per < t <= now)
                waiting = self._held.get(bucket, 0)
            if used or waiting:
                out.append((kind, bucket, most, used, waiting))
        return out

    def clear(self) -> None:
        """Forget every window, count and parked entry."""
        self._starts.clear()
        self._running.clear()
        self._parked.clear()
        self._most.clear()
        self._held.clear()
        self._period.clear()
