"""Start-up and shutdown hooks, plus a shared ``state`` namespace they can fill.

Concurrency model: the server's main greenlet runs start-up hooks in order
before it serves, and shutdown hooks in reverse order after requests, tasks
and worker pools have drained. Hooks may block on I/O (the hub is running).
Registration happens at import time; the default :class:`Hooks` belongs to
the default runtime, which resets it.
"""

import logging
import types
from typing import Callable, List, TypeVar

from ._default import Default

log = logging.getLogger(__name__)

__all__ = ["Hooks", "on_startup", "on_shutdown", "state", "run_startup", "run_shutdown", "reset", "get_hooks"]

F = TypeVar("F", bound=Callable[[], object])

#: Shared app state hooks set up (connections, caches) and views/tasks read.
state = types.SimpleNamespace()


def _name(fn: Callable[..., object]) -> str:
    return "%s.%s" % (getattr(fn, "__module__", "?"), getattr(fn, "__qualname__", repr(fn)))


class Hooks:
    """Functions to run before serving and after draining."""

    def __init__(self) -> None:
        self.startup: List[Callable[[], object]] = []
        self.shutdown: List[Callable[[], object]] = []

    def run_startup(self) -> None:
        """Run start-up hooks in registration order; the first failure propagates."""
        for fn in list(self.startup):
            log.info("startup hook %s", _name(fn))
            fn()

    def run_shutdown(self) -> None:
        """Run shutdown hooks newest first; a failing hook is logged and the rest still run."""
        for fn in reversed(list(self.shutdown)):
            try:
                fn()
            except Exception:
                log.exception("shutdown hook %s failed", _name(fn))

    def clear(self) -> None:
        """Forget every hook."""
        self.startup.clear()
        self.shutdown.clear()


_default: Default[Hooks] = Default(Hooks)


def get_hooks() -> Hooks:
    """The default runtime's hooks (what the decorators register on)."""
    return _default.get()


def on_startup(fn: F) -> F:
    """Register ``fn()`` to run before the server serves; if it raises, the server exits 1."""
    get_hooks().startup.append(fn)
    return fn


def on_shutdown(fn: F) -> F:
    """Register ``fn()`` to run after requests and tasks have drained."""
    get_hooks().shutdown.append(fn)
    return fn


def run_startup() -> None:
    """Run the default start-up hooks in registration order; the first failure propagates."""
    get_hooks().run_startup()


def run_shutdown() -> None:
    """Run the default shutdown hooks newest first."""
    get_hooks().run_shutdown()


def reset() -> None:
    """Forget every hook and clear ``state`` (tests)."""
    get_hooks().clear()
    state.__dict__.clear()
