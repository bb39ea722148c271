"""Background tasks: ``@task``, the spawn family, TaskResult and the runner.

Concurrency model: one gevent hub thread. Every task attempt runs in its own
greenlet, started by the default :class:`Runner` (``get_runner()``), which
lets at most ``max_concurrency`` of them hold a slot; the rest wait in FIFO
order (idle tasks last, released from ``gevent.idle()``), and delayed tasks
wait in one heap served by one timer greenlet. Spawning never blocks: past
``max_pending`` waiting tasks it raises :class:`greenqueue.Overloaded`. A task
blocked in ``TaskResult.get()`` lends its slot out, so tasks waiting on tasks
never deadlock. Code in a task must yield to the hub (I/O under monkey
patching, :func:`cooperate`, :func:`run_in_thread`) or it stalls every other
request and task. State lives in this process only; a forked child (gipc
worker) must not use the parent's runner. Flask is imported by nobody here:
a spawn made inside an app or request context runs in ``app.app_context()``.
"""

import datetime
import functools
import logging
from typing import Any, Callable, Optional, ParamSpec, TypeVar

import gevent

from ._canvas import GroupResult
from ._options import TaskOptions
from ._result import (CANCELLED, EXPIRED, FAILURE, PENDING, READY_STATES, RETRY, SCHEDULED, STARTED,
                      SUCCESS, TaskResult)
from ._runner import DrainReport, Runner, get_runner
from ._runner import reset as _reset_runner
from ._task import (APPLY_OPTIONS, PerItem, Request, Task, clear_registry, find_task, get_task, registered,
                    shared_task, task)

log = logging.getLogger(__name__)

__all__ = [
    "task", "shared_task", "Task", "Request", "TaskResult", "spawn", "spawn_later", "spawn_at", "spawn_idle",
    "result", "configure", "drain", "cooperate", "run_in_thread", "get_runner", "reset", "progress",
    "current", "Runner", "DrainReport", "AsyncResult", "TaskOptions", "get_task", "find_task", "registered",
    "clear_registry", "PerItem", "APPLY_OPTIONS",
    "PENDING", "SCHEDULED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "CANCELLED", "EXPIRED",
    "READY_STATES",
]

P = ParamSpec("P")
R = TypeVar("R")


def _callable(fn: Any, where: str) -> None:
    if not callable(fn):
        from ..errors import ConfigError
        raise ConfigError("%s() needs a function to run first, got %r (a %s)" % (where, fn, type(fn).__name__))


def spawn(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> TaskResult[R]:
    """Run ``fn(*args, **kwargs)`` soon in a task greenlet; returns a TaskResult at once."""
    if isinstance(fn, Task):
        return fn.spawn(*args, **kwargs)
    _callable(fn, "spawn")
    return get_runner().spawn(fn, args, kwargs)


def spawn_later(seconds: float, fn: Optional[Callable[..., Any]] = None, /, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` after ``seconds``; ``@spawn_later(s)`` makes every call schedule the function."""
    if fn is None:
        def decorate(f: Callable[..., Any]) -> Callable[..., TaskResult]:
            _callable(f, "spawn_later")

            @functools.wraps(f)
            def schedule(*a: Any, **kw: Any) -> TaskResult:
                return spawn_later(seconds, f, *a, **kw)
            return schedule
        return decorate
    if isinstance(fn, Task):
        return fn.spawn_later(seconds, *args, **kwargs)
    _callable(fn, "spawn_later")
    return get_runner().spawn(fn, args, kwargs, delay=seconds)


def spawn_at(when: datetime.datetime, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> TaskResult[R]:
    """Run ``fn`` at the datetime ``when`` (naive means UTC)."""
    if isinstance(fn, Task):
        return fn.spawn_at(when, *args, **kwargs)
    _callable(fn, "spawn_at")
    return get_runner().spawn(fn, args, kwargs, eta=when)


def spawn_idle(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> TaskResult[R]:
    """Run ``fn`` when the hub has nothing else to do, after normal waiting tasks."""
    if isinstance(fn, Task):
        return fn.spawn_idle(*args, **kwargs)
    _callable(fn, "spawn_idle")
    return get_runner().spawn(fn, args, kwargs, idle=True)


def result(task_id: str) -> Any:
    """Look up a TaskResult (or a group's GroupResult) by id; None when unknown or expired. Asks the journal too."""
    runner = get_runner()
    found = runner.result(task_id)
    if found is not None:
        return found
    members = runner.group_members(task_id)
    if members is None:
        return None
    return GroupResult(task_id, [runner.follow(member) for member in members])


class _AsyncResultType(type):
    """Makes ``isinstance(r, AsyncResult)`` true of every TaskResult, as Celery's results all are."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, TaskResult)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, TaskResult)


class AsyncResult(metaclass=_AsyncResultType):
    """Celery's ``AsyncResult(id)``: the TaskResult for ``id`` from any node; PENDING while the id is unknown."""

    # The instances are TaskResults (the one a spawn returned, when this process holds it),
    # so a port's isinstance checks and attribute reads work on either.
    def __new__(cls, task_id: str) -> "TaskResult[Any]":  # type: ignore[misc]
        """The TaskResult with this id, or a PENDING one that a journal brings up to date when it appears."""
        return get_runner().follow(task_id)


def configure(max_concurrency: Optional[int] = None, max_pending: Optional[int] = None,
              result_ttl: Optional[float] = None, max_results: Optional[int] = None,
              eager: Optional[bool] = None, hub: Optional[str] = None) -> Runner:
    """Set the default runner's limits (defaults 100, 10000, 3600 s, 10000, False); None keeps one."""
    return get_runner().configure(max_concurrency=max_concurrency, max_pending=max_pending,
                                  result_ttl=result_ttl, max_results=max_results, eager=eager, hub=hub)


def drain(timeout: Optional[float] = None) -> DrainReport:
    """Wait up to ``timeout`` s for running and waiting tasks of the default runner (shutdown)."""
    return get_runner().drain(timeout)


def reset() -> None:
    """Kill the default runner's tasks, start a fresh one and forget registered task names."""
    _reset_runner()
    clear_registry()


def cooperate() -> None:
    """Yield to the hub so other greenlets run (call it inside CPU-heavy loops)."""
    gevent.sleep(0)


def run_in_thread(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Run blocking ``fn`` in gevent's threadpool; only this greenlet waits for the value."""
    return gevent.get_hub().threadpool.apply(fn, args, kwargs)


def current() -> Optional[TaskResult]:
    """The TaskResult of the task running in this greenlet (None outside a task)."""
    return get_runner().current()


def progress(done: float, total: Optional[float] = None, message: Optional[str] = None) -> None:
    """Report progress of the current task (shown on the dashboard, read as ``TaskResult.progress``)."""
    r = current()
    if r is not None:
        r.progress = {"done": done, "total": total, "message": message}
