"""The ``@task`` decorator, the task-name registry and batch tasks.

Concurrency model: decoration runs at import time in whatever greenlet
imports the module; the registry is a plain dict touched only then and by
``reset()``. A Task looks up the default runner on every spawn (never at
decoration time) so ``reset()`` between tests takes effect. A batch task
collects items in a per-runner buffer; the buffer is flushed by the spawn
that fills it or by one ``gevent.spawn_later`` greenlet per open batch.
"""

import functools
import logging
import time
from typing import Callable, Generic, Optional, ParamSpec, TypeVar, overload

import gevent
import zope.event

from .. import events
from ..errors import ConfigError
from ._result import READY_STATES, STARTED, SUCCESS, FAILURE, TaskResult
from ._runner import TaskOptions, _callable_name, _new_id, get_runner

log = logging.getLogger(__name__)

__all__ = ["Task", "task", "get_task", "registered", "PerItem"]

P = ParamSpec("P")
R = TypeVar("R")

_registry = {}


class PerItem:
    """Returned by a batch task: one outcome per item, in order (an exception instance fails that item).

    ``return PerItem([doc_id, ValueError("no title"), doc_id2])`` succeeds the
    first and third items with their ids and fails the second; a plain return
    value (or a raised exception) still goes to every item of the batch.
    """

    __slots__ = ("outcomes",)

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)

    def __repr__(self):
        return "PerItem(%r)" % (self.outcomes,)


class Task(Generic[P, R]):
    """A function registered as a task: call it inline, or ``.spawn()`` it in a greenlet."""

    def __init__(self, fn: Callable[P, R], name: str, opts: TaskOptions,
                 batch_size: Optional[int] = None, batch_interval: Optional[float] = None):
        self.fn = fn
        self.name = name
        self.opts = opts
        self.batch_size = batch_size
        self.batch_interval = batch_interval
        functools.update_wrapper(self, fn)

    def __repr__(self):
        return "<Task %s>" % self.name

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run inline in the calling greenlet and return the value (no retries, no timeout)."""
        return self.fn(*args, **kwargs)

    def spawn(self, *args: P.args, **kwargs: P.kwargs) -> TaskResult[R]:
        """Run soon in its own greenlet; returns a TaskResult at once."""
        return self._spawn(args, kwargs)

    #: Celery's spelling of :meth:`spawn`.
    delay = spawn

    def spawn_later(self, seconds: float, *args: P.args, **kwargs: P.kwargs) -> TaskResult[R]:
        """Run after ``seconds`` (monotonic clock)."""
        return self._spawn(args, kwargs, delay=seconds)

    def spawn_at(self, when, *args: P.args, **kwargs: P.kwargs) -> TaskResult[R]:
        """Run at the datetime ``when`` (naive means UTC)."""
        return self._spawn(args, kwargs, eta=when)

    def spawn_idle(self, *args: P.args, **kwargs: P.kwargs) -> TaskResult[R]:
        """Run when the hub is idle, after every normal waiting task."""
        return self._spawn(args, kwargs, idle=True)

    def apply_async(self, args=(), kwargs=None, countdown=None, eta=None) -> TaskResult[R]:
        """Celery-style spawn: ``countdown`` seconds or an ``eta`` datetime."""
        return self._spawn(tuple(args), dict(kwargs or {}), delay=countdown, eta=eta)

    def _spawn(self, args, kwargs, delay=None, eta=None, idle=False):
        runner = get_runner()
        if self.batch_size is not None:
            batcher = runner._batchers.get(self)
            if batcher is None:
                batcher = runner._batchers[self] = _Batcher(runner, self)
            return batcher.add(args, kwargs, delay, eta, idle)
        return runner.spawn(self.fn, args, kwargs, name=self.name, opts=self.opts,
                            delay=delay, eta=eta, idle=idle)


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(*, retries: int = 0, retry_delay: float = 0.0, retry_backoff: float = 1.0,
         retry_jitter: float = 0.0, timeout: Optional[float] = None, name: Optional[str] = None,
         batch_size: Optional[int] = None, batch_interval: Optional[float] = None,
         serializer: str = "json") -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(fn=None, /, *, retries=0, retry_delay=0.0, retry_backoff=1.0, retry_jitter=0.0,
         timeout=None, name=None, batch_size=None, batch_interval=None, serializer="json"):
    """Register a function as a task; works as ``@task`` and ``@task(retries=3, ...)``."""
    if serializer not in ("json", "pickle"):
        raise ConfigError("serializer must be 'json' or 'pickle', got %r" % (serializer,))
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError("batch_size must be an integer >= 1 or None, got %r" % (batch_size,))
    if batch_interval is not None and batch_interval <= 0:
        raise ConfigError("batch_interval must be a number > 0 or None, got %r" % (batch_interval,))
    if batch_interval is not None and batch_size is None:
        batch_size = 2 ** 31  # only the interval flushes
    for label, value in (("retries", retries), ("retry_delay", retry_delay),
                         ("retry_backoff", retry_backoff), ("retry_jitter", retry_jitter)):
        if not isinstance(value, (int, float)) or value < 0:
            raise ConfigError("%s must be a number >= 0, got %r" % (label, value))
    if timeout is not None and timeout <= 0:
        raise ConfigError("timeout must be a number > 0 or None, got %r" % (timeout,))
    opts = TaskOptions(int(retries), float(retry_delay), float(retry_backoff),
                       float(retry_jitter), timeout)

    def decorate(f):
        if isinstance(f, Task):
            f = f.fn
        t = Task(f, name or _callable_name(f), opts, batch_size, batch_interval)
        t.serializer = serializer  # how the journal stores this task's arguments and result
        _register(t)
        return t

    return decorate(fn) if fn is not None else decorate


def _identity(fn):
    code = getattr(fn, "__code__", None)
    return (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None),
            getattr(code, "co_filename", None))


def _register(t):
    old = _registry.get(t.name)
    # The same definition seen again (module reload, re-import in tests)
    # replaces the old one; a different function under the same name is a bug.
    if old is not None and old.fn is not t.fn and _identity(old.fn) != _identity(t.fn):
        raise ConfigError("task name %r is already used by %s.%s; pass name= to tell them apart"
                          % (t.name, old.fn.__module__, old.fn.__qualname__))
    _registry[t.name] = t


def get_task(name: str) -> Task:
    """The registered Task called ``name`` (KeyError if none)."""
    return _registry[name]


def registered() -> dict:
    """A copy of the name -> Task registry."""
    return dict(_registry)


class _Batcher:
    """Collects a batch task's items; the batch runs as one task, each item mirrors its outcome."""

    def __init__(self, runner, t):
        self.runner = runner
        self.task = t
        self.items = []
        self.timer = None

    def add(self, args, kwargs, delay, eta, idle):
        if kwargs or len(args) != 1:
            raise TypeError("%s is a batch task: spawn it with exactly one item" % self.task.name)
        if delay is not None or eta is not None or idle:
            raise NotImplementedError("batch tasks are collected by size and interval only")
        runner = self.runner
        r = TaskResult(runner, _new_id(), self.task.name, None, args, {}, self.task.opts, None)
        r._where = "batch"
        runner._live[r.id] = r
        if zope.event.subscribers:
            events.notify(events.TaskSpawned(r))
        self.items.append(r)
        if len(self.items) >= self.task.batch_size or runner.eager:
            self.flush()
        elif self.timer is None and self.task.batch_interval is not None:
            self.timer = gevent.spawn_later(self.task.batch_interval, self.flush)
        return r

    def flush(self):
        """Spawn the collected items as one batch (no-op when empty)."""
        timer, self.timer = self.timer, None
        if timer is not None and timer is not gevent.getcurrent():
            timer.kill(block=False)
        items = [r for r in self.items if r.state not in READY_STATES]
        self.items = []
        if not items:
            return None
        return self.runner.spawn(self._run, (items,), name=self.task.name + "[batch]",
                                 opts=self.task.opts, force=True,
                                 on_done=functools.partial(self._mirror, items))

    def _run(self, items):
        started = time.time()
        values, taken = [], []
        for r in items:
            if r.state not in READY_STATES:
                r.state = STARTED
                r._started_ts = started
                values.append(r._args[0])
                taken.append(r)
        value = self.task.fn(values)
        if isinstance(value, PerItem):
            if len(value.outcomes) != len(taken):
                raise TypeError("%s returned PerItem with %d outcomes for a batch of %d items"
                                % (self.task.name, len(value.outcomes), len(taken)))
            return _Outcomes((r.id, outcome) for r, outcome in zip(taken, value.outcomes))
        return value

    def _mirror(self, items, batch):
        runner = self.runner
        for r in items:
            r.retries = batch.retries
            if batch.state == SUCCESS and isinstance(batch.result, _Outcomes):
                outcome = batch.result.get(r.id, _NOT_TAKEN)
                if outcome is _NOT_TAKEN:
                    runner._cancel(r)  # cancelled after the flush, before the batch started
                elif isinstance(outcome, BaseException):
                    runner._finish(r, FAILURE, exc=outcome, duration=batch.duration)
                else:
                    runner._finish(r, SUCCESS, value=outcome, duration=batch.duration)
            elif batch.state == SUCCESS:
                runner._finish(r, SUCCESS, value=batch.result, duration=batch.duration)
            elif batch.state == FAILURE:
                runner._finish(r, FAILURE, exc=batch.exception, duration=batch.duration,
                               tb=batch.traceback)
            else:
                runner._cancel(r)


_NOT_TAKEN = object()


class _Outcomes(dict):
    """The batch greenlet's result when the function returned PerItem: item task id -> outcome."""

    def __repr__(self):
        return "<%d per-item outcomes>" % len(self)
