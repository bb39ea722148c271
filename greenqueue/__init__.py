"""greenqueue: one gevent process serves a WSGI app, runs tasks, schedules and process pools.

The public names below are imported lazily (on first use), so ``import
greenqueue`` stays cheap and does not import gevent before the server has
monkey-patched the standard library.
"""

import importlib
from typing import Any, List

__version__ = "0.1.0"

# name -> module that defines it; the one explicit list of the public API.
_EXPORTS = {
    # tasks
    "task": "tasks", "spawn": "tasks", "spawn_later": "tasks", "spawn_at": "tasks",
    "spawn_idle": "tasks", "TaskResult": "tasks", "result": "tasks",
    "cooperate": "tasks", "run_in_thread": "tasks", "progress": "tasks",
    # the runtime: limits, the journal, starting outside the server
    "configure": "runtime", "start": "runtime", "health": "runtime",
    # scheduler
    "periodic": "scheduler", "crontab": "scheduler", "every": "scheduler", "Scheduler": "scheduler",
    # process pool
    "DirtyApp": "procpool", "ProcessPool": "procpool",
    # consumers
    "consume": "consumers",
    # lifecycle hooks
    "on_startup": "hooks", "on_shutdown": "hooks",
    # errors
    "GreenqueueError": "errors", "ConfigError": "errors", "Overloaded": "errors",
    "TaskTimeout": "errors", "WaitTimeout": "errors", "CancelledError": "errors", "WorkerError": "errors",
    "RemoteError": "errors", "WorkerCrashed": "errors", "WorkerTimeout": "errors",
    "JournalError": "errors", "StartupError": "errors", "UnknownPool": "errors",
}
# Celery's names for the same things.
_ALIASES = {"AsyncResult": ("tasks", "result")}

__all__ = sorted(list(_EXPORTS) + list(_ALIASES)) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    attr = name
    if module is None and name in _ALIASES:
        module, attr = _ALIASES[name]
    if module is None:
        raise AttributeError("module 'greenqueue' has no attribute %r" % name)
    value = getattr(importlib.import_module("." + module, __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return __all__
