"""Start-up and shutdown hooks, plus a shared ``state`` namespace they can fill.

Concurrency model: the server's main greenlet runs start-up hooks in order
before it binds, and shutdown hooks in reverse order after requests, tasks
and worker pools have drained. Hooks may block on I/O (the hub is running).
"""

import logging
import types

log = logging.getLogger(__name__)

__all__ = ["on_startup", "on_shutdown", "state", "run_startup", "run_shutdown", "reset"]

_startup = []
_shutdown = []

#: Shared app state hooks set up (connections, caches) and views/tasks read.
state = types.SimpleNamespace()


def on_startup(fn):
    """Register ``fn()`` to run before the server serves; if it raises, the server exits 1."""
    _startup.append(fn)
    return fn


def on_shutdown(fn):
    """Register ``fn()`` to run after requests and tasks have drained."""
    _shutdown.append(fn)
    return fn


def _name(fn):
    return "%s.%s" % (getattr(fn, "__module__", "?"), getattr(fn, "__qualname__", repr(fn)))


def run_startup():
    """Run start-up hooks in registration order; the first failure propagates."""
    for fn in list(_startup):
        log.info("startup hook %s", _name(fn))
        fn()


def run_shutdown():
    """Run shutdown hooks newest first; a failing hook is logged and the rest still run."""
    for fn in reversed(list(_shutdown)):
        try:
            fn()
        except Exception:
            log.exception("shutdown hook %s failed", _name(fn))


def reset():
    """Forget every hook and clear ``state`` (tests)."""
    _startup.clear()
    _shutdown.clear()
    state.__dict__.clear()
