"""Task options, ids, names and drain reports: small helpers and values shared by the runner and ``@task``.

Concurrency model: immutable values and pure functions; safe from any thread.
"""

import contextvars
import os
import random
from time import time as _time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from ..errors import ConfigError

__all__ = ["TaskOptions", "NO_OPTIONS", "new_id", "callable_name", "check_number", "check_priority", "DrainReport",
           "flask_app"]

#: The range of ``priority`` (Django's: -100..100, larger first).
PRIORITY_RANGE = (-100, 100)

_rand = random.Random()
# A forked child (--workers N, a gipc worker) would otherwise draw the parent's ids.
os.register_at_fork(after_in_child=_rand.seed)


@dataclass(frozen=True)
class TaskOptions:
    """A task's policy, shared by all its spawns: retries, timeout, how it is stored and which queue it is on."""

    retries: int = 0
    retry_delay: float = 0.0
    retry_backoff: float = 1.0
    retry_jitter: float = 0.0
    timeout: Optional[float] = None
    #: How a durable store keeps the task's arguments and result ("json" or "pickle").
    serializer: str = "json"
    #: The queue a node claims the task from (``--queues``).
    queue: str = "default"
    #: The longest wait between attempts, however far the backoff grew (None: no cap).
    retry_backoff_max: Optional[float] = None
    #: Errors that are retried (None: every one, as before these options existed).
    autoretry_for: Optional[Tuple[type, ...]] = None
    #: Errors never retried, even when ``autoretry_for`` matches them too.
    dont_autoretry_for: Tuple[type, ...] = ()
    #: Seconds after which SoftTimeLimitExceeded is raised inside the task (the hard ``timeout`` follows).
    soft_timeout: Optional[float] = None
    #: Seconds after its spawn by which a run must start, else it ends EXPIRED without running.
    expires: Optional[float] = None
    #: The wall-clock time (epoch seconds) one spawn must start by: set per spawn from ``expires``.
    start_by: Optional[float] = None
    #: -100..100: waiting tasks start larger first, then by due time, then in spawn order.
    priority: int = 0
    #: At most (starts, per seconds) in any window of that length, per bucket, the whole cluster together.
    rate_limit: Optional[Tuple[int, float]] = None
    #: ``key(*args, **kwargs)``: one rate window per key (None: one for the task).
    rate_key: Optional[Callable[..., Any]] = None
    #: At most this many running at once per bucket, the whole cluster together.
    concurrency_limit: Optional[int] = None
    #: ``key(*args, **kwargs)``: one concurrency count per key (None: one for the task).
    concurrency_key: Optional[Callable[..., Any]] = None
    #: True when either limit is set (checked on every start: a field, not a property).
    limited: bool = False
    #: The buckets one spawn counts in, set per spawn from the keys.
    rate_bucket: Optional[str] = None
    limit_bucket: Optional[str] = None

    def delay_for(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        delay = self.retry_delay * (self.retry_backoff ** (retry - 1))
        if self.retry_jitter:
            delay += _rand.uniform(0, self.retry_jitter)
        if self.retry_backoff_max is not None:
            delay = min(delay, self.retry_backoff_max)
        return delay

    def retries_on(self, exc: BaseException) -> bool:
        """True when a failure with ``exc`` is retried (attempts left aside)."""
        if self.dont_autoretry_for and isinstance(exc, self.dont_autoretry_for):
            return False
        return self.autoretry_for is None or isinstance(exc, self.autoretry_for)


NO_OPTIONS = TaskOptions()


def new_id() -> str:
    """A fresh task id: 32 hex digits, the first 12 the creation time in ms (ids sort by age, as UUIDv7's do)."""
    # Time first: a journal's primary-key index then grows at one end, so a commit of many
    # spawns dirties a few pages instead of one random page per task.
    return "%012x%020x" % (int(_time() * 1000) & 0xFFFFFFFFFFFF, _rand.getrandbits(80))


def callable_name(fn: Any) -> str:
    """``module.qualname`` of a callable (its repr when it has no name)."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        return repr(fn)
    return "%s.%s" % (getattr(fn, "__module__", None) or "?", name)


def check_number(name: str, value: Any, minimum: float, kind: type = int, allow_none: bool = False,
                 strict: bool = False) -> Any:
    """``value`` as ``kind`` when it is a number >= ``minimum`` (> with ``strict``); else ConfigError naming ``name``."""
    if value is None and allow_none:
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum \
            or (strict and value == minimum) or (kind is int and int(value) != value):
        raise ConfigError("%s must be %s %s %s%s, got %r" % (
            name, "an integer" if kind is int else "a number", ">" if strict else ">=", minimum,
            " or None" if allow_none else "", value))
    return kind(value)


def check_priority(name: str, value: Any) -> int:
    """``value`` as a priority (an integer in -100..100); else ConfigError naming ``name``."""
    low, high = PRIORITY_RANGE
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError("%s must be an integer from %d to %d (larger starts first; default 0), got %r"
                          % (name, low, high, value))
    return value


@dataclass
class DrainReport:
    """What :meth:`Runner.drain` saw: finished and unfinished tasks, delayed ones left."""

    finished: int
    running: int
    pending: int
    scheduled: int
    elapsed: float

    @property
    def complete(self) -> bool:
        """True when every task that was running or waiting has finished."""
        return self.running == 0 and self.pending == 0

    def __str__(self) -> str:
        return ("%d task(s) finished, %d still running, %d still waiting, "
                "%d delayed task(s) not due, in %.2fs"
                % (self.finished, self.running, self.pending, self.scheduled, self.elapsed))


_flask_var: Any = None  # Flask's app-context ContextVar, once seen


def flask_app() -> Any:
    """The Flask app whose context the caller is in, or None; never imports Flask."""
    # Flask keeps the app context in a ContextVar named "flask.app_ctx". Finding it in
    # the caller's context, rather than importing flask, keeps scripts that never
    # use Flask from paying for its import.
    global _flask_var
    var = _flask_var
    if var is None:
        ctx = contextvars.copy_context()
        if not len(ctx):
            return None
        var = next((v for v in ctx if v.name == "flask.app_ctx"), None)
        if var is None:
            return None
        _flask_var = var
    app_ctx = var.get(None)
    return app_ctx.app if app_ctx is not None else None
