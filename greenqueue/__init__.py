"""greenqueue: one gevent process serves a WSGI app, runs tasks, schedules and process pools.

The public names below are imported lazily (on first use), so ``import
greenqueue`` stays cheap and does not import gevent before the server has
monkey-patched the standard library.
"""

import importlib
from typing import TYPE_CHECKING, Any, List

from . import _accel

# Before anything imports the HTTP modules: their compiled builds load only from here.
_accel.install()

__version__ = "0.1.0"

# name -> module that defines it; the one explicit list of the public API.
_EXPORTS = {
    # tasks
    "task": "tasks", "spawn": "tasks", "spawn_later": "tasks", "spawn_at": "tasks",
    "spawn_idle": "tasks", "TaskResult": "tasks", "result": "tasks", "AsyncResult": "tasks",
    "shared_task": "tasks",
    # workflows
    "chain": "canvas", "group": "canvas", "chord": "canvas", "signature": "canvas", "Signature": "canvas",
    "GroupResult": "canvas", "ChordError": "errors",
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
    "SerializationError": "errors", "Retry": "errors", "MaxRetriesExceeded": "errors",
    "SoftTimeLimitExceeded": "errors", "TaskExpired": "errors",
}
# Other projects' names for the same things.
_ALIASES: dict = {}

__all__ = sorted(list(_EXPORTS) + list(_ALIASES)) + ["__version__"]

if TYPE_CHECKING:
    # Type checkers do not run __getattr__: without these imports every public
    # name would be Any to them. Keep in step with _EXPORTS and _ALIASES; the
    # "X as X" form marks each one as re-exported.
    from .errors import ChordError as ChordError
    from .canvas import GroupResult as GroupResult
    from .canvas import Signature as Signature
    from .canvas import chain as chain
    from .canvas import chord as chord
    from .canvas import group as group
    from .canvas import signature as signature
    from .consumers import consume as consume
    from .errors import CancelledError as CancelledError
    from .errors import ConfigError as ConfigError
    from .errors import GreenqueueError as GreenqueueError
    from .errors import JournalError as JournalError
    from .errors import Overloaded as Overloaded
    from .errors import RemoteError as RemoteError
    from .errors import MaxRetriesExceeded as MaxRetriesExceeded
    from .errors import Retry as Retry
    from .errors import SerializationError as SerializationError
    from .errors import SoftTimeLimitExceeded as SoftTimeLimitExceeded
    from .errors import StartupError as StartupError
    from .errors import TaskExpired as TaskExpired
    from .errors import TaskTimeout as TaskTimeout
    from .errors import UnknownPool as UnknownPool
    from .errors import WaitTimeout as WaitTimeout
    from .errors import WorkerCrashed as WorkerCrashed
    from .errors import WorkerError as WorkerError
    from .errors import WorkerTimeout as WorkerTimeout
    from .hooks import on_shutdown as on_shutdown
    from .hooks import on_startup as on_startup
    from .procpool import DirtyApp as DirtyApp
    from .procpool import ProcessPool as ProcessPool
    from .runtime import configure as configure
    from .runtime import health as health
    from .runtime import start as start
    from .scheduler import Scheduler as Scheduler
    from .scheduler import crontab as crontab
    from .scheduler import every as every
    from .scheduler import periodic as periodic
    from .tasks import TaskResult as TaskResult
    from .tasks import cooperate as cooperate
    from .tasks import progress as progress
    from .tasks import AsyncResult as AsyncResult
    from .tasks import result as result
    from .tasks import run_in_thread as run_in_thread
    from .tasks import shared_task as shared_task
    from .tasks import spawn as spawn
    from .tasks import spawn_at as spawn_at
    from .tasks import spawn_idle as spawn_idle
    from .tasks import spawn_later as spawn_later
    from .tasks import task as task


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
