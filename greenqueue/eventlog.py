"""The default logging listener: one log line per greenqueue event.

Concurrency model: the listener runs synchronously in whichever greenlet
published the event (see greenqueue.events); it only formats and logs, so
it never blocks the hub beyond what the configured logging handlers do.
``install()`` and ``uninstall()`` are meant for start-up and tests.
The per-task levels set by ``set_task_log_level()`` are a plain dict read
by the listener; they are set at import time (``@periodic``), not per event.
"""

import logging
from typing import Any, Callable, Dict, Optional, Tuple, Union

from . import events
from .errors import Retry

log = logging.getLogger(__name__)

__all__ = ["install", "uninstall", "installed", "describe", "set_task_log_level", "task_log_level"]

_unsubscribe: Optional[Callable[[], None]] = None

# task name -> level of its routine lines (a 2-second periodic job would otherwise log twice a run)
_task_levels: Dict[str, int] = {}

_TaskEvent = Union[events.TaskSpawned, events.TaskStarted, events.TaskSucceeded, events.TaskFailed,
                   events.TaskRetrying, events.TaskCancelled]
_JobEvent = Union[events.JobFired, events.JobSkipped, events.JobMissed]
_WorkerEvent = Union[events.WorkerStarted, events.WorkerExited]


def _task(e: _TaskEvent) -> Tuple[str, str]:
    r = e.result
    return getattr(r, "name", "?"), getattr(r, "id", "?")


def _error(exc: Optional[BaseException]) -> str:
    return "%s: %s" % (type(exc).__name__, exc) if exc is not None else "unknown error"


def _failure(e: events.TaskFailed) -> str:
    # The traceback once, at the final failure; retries log one line each (TaskRetrying).
    tb = (getattr(e.result, "traceback", None) or "").rstrip()
    return "\n" + tb if tb else ""


def _job(e: _JobEvent) -> str:
    job = e.job
    return getattr(job, "name", None) or repr(job)


def _pool(e: _WorkerEvent) -> str:
    pool = e.pool
    return getattr(pool, "name", None) or repr(pool)


# event type -> (level, function returning (format, args)); %-style so nothing
# is formatted when the level is off.
_FORMATS = {
    events.TaskSpawned: (logging.DEBUG, lambda e: (
        "task %s[%s] spawned%s", _task(e) + (
            " for %s" % e.result.eta.isoformat() if getattr(e.result, "eta", None) else "",))),
    events.TaskStarted: (logging.DEBUG, lambda e: (
        "task %s[%s] started (attempt %d)", _task(e) + (getattr(e.result, "retries", 0) + 1,))),
    events.TaskSucceeded: (logging.INFO, lambda e: (
        "task %s[%s] succeeded in %.3fs", _task(e) + (e.duration,))),
    events.TaskFailed: (logging.ERROR, lambda e: (
        "task %s[%s] failed in %.3fs: %s%s", _task(e) + (e.duration, _error(e.exception), _failure(e)))),
    events.TaskRetrying: (logging.WARNING, lambda e: (
        "task %s[%s] retry %d in %.3fs after %s",
        _task(e) + (getattr(e.result, "retries", 0), e.delay, _error(e.exception)))),
    events.TaskCancelled: (logging.INFO, lambda e: (
        "task %s[%s] %s", _task(e) + ("expired unrun" if getattr(e.result, "state", None) == "EXPIRED"
                                      else "cancelled",))),
    events.JobFired: (logging.INFO, lambda e: (
        "job %s fired (scheduled for %s) as task %s",
        (_job(e), e.scheduled_for, getattr(e.result, "id", None)))),
    events.JobSkipped: (logging.WARNING, lambda e: (
        "job %s skipped run for %s: %s", (_job(e), e.scheduled_for, e.reason))),
    events.JobMissed: (logging.WARNING, lambda e: (
        "job %s missed %d run(s), late by %.3fs (scheduled for %s)",
        (_job(e), e.missed_runs, e.late_by, e.scheduled_for))),
    events.WorkerStarted: (logging.INFO, lambda e: (
        "worker %d (pid %d) of pool %s started", (e.index, e.pid, _pool(e)))),
    events.WorkerExited: (logging.INFO, lambda e: (
        "worker %d (pid %d) of pool %s exited: %s (exit code %s)",
        (e.index, e.pid, _pool(e), e.reason or "unknown", e.exitcode))),
    events.ServerStarting: (logging.DEBUG, lambda e: (
        "server starting on %s for %s", (", ".join(map(str, e.addresses)) or "?", e.app or "?"))),
    events.ServerStopping: (logging.INFO, lambda e: (
        "server stopping: %s", (e.reason or "requested",))),
    events.MessagesHandled: (logging.DEBUG, lambda e: (
        "consumer %s handled %d message(s) in %.3fs", (getattr(e.consumer, "name", "?"), e.count, e.seconds))),
    events.MessagesFailed: (logging.WARNING, lambda e: (
        "consumer %s failed on %d message(s): %s; %d requeued",
        (getattr(e.consumer, "name", "?"), e.count, _error(e.exception), e.requeued))),
}

_LOUD_EXITS = ("crashed", "timeout", "init-failed")

# The lines a per-task level applies to: a run's routine story. Failures, retries and
# cancellations keep their own levels.
_OUTCOME = (events.TaskSucceeded, events.JobFired)
_PROGRESS = (events.TaskSpawned, events.TaskStarted)


def set_task_log_level(task_name: str, level: Optional[int]) -> None:
    """Log the success and fired lines of ``task_name`` at ``level`` (None: back to the default)."""
    if level is None:
        _task_levels.pop(task_name, None)
    else:
        _task_levels[task_name] = int(level)


def task_log_level(task_name: str) -> Optional[int]:
    """The level set for ``task_name``'s routine lines, or None when it logs at the defaults."""
    return _task_levels.get(task_name)


def _task_level(event: Any, cls: type, level: int) -> int:
    # A job's run is a task of the job's name; JobFired may come before (or without) its result.
    name = getattr(getattr(event, "result", None), "name", None) or getattr(getattr(event, "job", None), "name", None)
    wanted = _task_levels.get(name) if name is not None else None
    if wanted is None:
        return level
    if cls in _OUTCOME:
        return wanted
    # Spawned and started lines are DEBUG already: a quieter level lowers them, a louder one
    # must not turn them into two more lines per run.
    return min(level, wanted)


def describe(event: Any) -> Tuple[int, str, tuple]:
    """Return ``(level, format, args)`` for the log line of ``event``."""
    for cls in type(event).__mro__:
        entry = _FORMATS.get(cls)
        if entry is not None:
            level, build = entry
            fmt, args = build(event)
            if cls is events.WorkerExited and event.reason in _LOUD_EXITS:
                level = logging.WARNING
            elif cls is events.TaskRetrying and isinstance(event.exception, Retry):
                level = logging.INFO  # the task asked for it: control flow, not a failure
            elif _task_levels and cls in _OUTCOME + _PROGRESS:
                level = _task_level(event, cls, level)
            return level, fmt, args
    return logging.DEBUG, "event %r", (event,)


def _listener(event: Any) -> None:
    level, fmt, args = describe(event)
    if log.isEnabledFor(level):
        log.log(level, fmt, *args)


def install() -> None:
    """Start logging every greenqueue event through this module's logger (idempotent)."""
    global _unsubscribe
    if _unsubscribe is None:
        # Only the events it has a line for: a request or pool-call event costs the log nothing.
        _unsubscribe = events.subscribe(_listener, *_FORMATS)


def uninstall() -> None:
    """Stop logging events (no-op when not installed)."""
    global _unsubscribe
    if _unsubscribe is not None:
        _unsubscribe()
        _unsubscribe = None


def installed() -> bool:
    """True while the listener is subscribed."""
    return _unsubscribe is not None
