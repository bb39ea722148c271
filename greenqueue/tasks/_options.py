"""Task options, ids and names: small pure helpers shared by the runner and ``@task``.

Concurrency model: immutable values and pure functions; safe from any thread.
"""

import random
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ConfigError

__all__ = ["TaskOptions", "NO_OPTIONS", "new_id", "callable_name", "check_number"]

_rand = random.Random()


@dataclass(frozen=True)
class TaskOptions:
    """Retry and timeout policy of a task (shared by all its spawns)."""

    retries: int = 0
    retry_delay: float = 0.0
    retry_backoff: float = 1.0
    retry_jitter: float = 0.0
    timeout: Optional[float] = None

    def delay_for(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        delay = self.retry_delay * (self.retry_backoff ** (retry - 1))
        if self.retry_jitter:
            delay += _rand.uniform(0, self.retry_jitter)
        return delay


NO_OPTIONS = TaskOptions()


def new_id() -> str:
    """A fresh task id: 32 hex digits."""
    return "%032x" % _rand.getrandbits(128)


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
