"""The ``@task`` decorator, the task-name registry and batch tasks.

Concurrency model: decoration runs at import time in whatever greenlet
imports the module; the registry is a plain dict touched only then and by
``clear_registry()``. A Task looks up the default runner on every spawn
(never at decoration time) so a reset between tests takes effect. A batch
task collects items in a per-runner buffer on the task hub; the buffer is
flushed by the spawn that fills it or by one ``gevent.spawn_later``
greenlet per open batch.
"""

import datetime
import functools
import importlib
import logging
import time
from typing import (Any, Callable, Dict, Generic, Iterable, List, Literal, NoReturn, Optional, ParamSpec, Tuple, Type,
                    TypeVar, Union, cast, overload)

import gevent

from ..errors import ConfigError, Retry
from ..journal import new_row
from ._canvas import Signature
from ._limits import limits_of, parse_rate, with_buckets
from ._options import TaskOptions, callable_name, check_number, check_priority, new_id
from ._result import FAILURE, READY_STATES, SUCCESS, TaskResult, class_finders
from ._runner import Runner, get_runner


log = logging.getLogger(__name__)

__all__ = ["Task", "task", "shared_task", "Request", "get_task", "registered", "clear_registry", "PerItem", "APPLY_OPTIONS"]

P = ParamSpec("P")
R = TypeVar("R")

_registry: Dict[str, "Task[..., Any]"] = {}

#: Options ``apply_async`` takes besides args/kwargs/countdown/eta; those of a shared store come with it.
APPLY_OPTIONS = ("idempotency_key", "connection", "queue", "expires", "priority")


class PerItem:
    """Returned by a batch task: one outcome per item, in order (an exception instance fails that item).

    ``return PerItem([doc_id, ValueError("no title"), doc_id2])`` succeeds the
    first and third items with their ids and fails the second; a plain return
    value (or a raised exception) still goes to every item of the batch.
    """

    __slots__ = ("outcomes",)

    def __init__(self, outcomes: Iterable[Any]) -> None:
        self.outcomes = list(outcomes)

    def __repr__(self) -> str:
        return "PerItem(%r)" % (self.outcomes,)


class Request:
    """What a running task knows of its own run (Celery's ``task.request``)."""

    __slots__ = ("id", "retries", "eta", "name", "called_directly")

    def __init__(self, r: Optional[TaskResult[Any]]) -> None:
        #: The run's task id (None outside a run: the task was called directly).
        self.id = None if r is None else r.id
        #: Attempts before this one.
        self.retries = 0 if r is None else r.retries
        self.eta = None if r is None else r.eta
        self.name = None if r is None else r.name
        #: True when the function was called inline, not run as a task.
        self.called_directly = r is None

    def __repr__(self) -> str:
        return "<Request %s retries=%d>" % (self.id, self.retries)


class Task(Generic[P, R]):
    """A function registered as a task: call it inline, or ``.spawn()`` it in a greenlet."""

    def __init__(self, fn: Callable[P, R], name: str, opts: TaskOptions,
                 batch_size: Optional[int] = None, batch_interval: Optional[float] = None,
                 bind: bool = False) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = name
        self.opts = opts
        self.batch_size = batch_size
        self.batch_interval = batch_interval
        #: What a run calls: the function, or with ``bind=True`` the function with this task first (Celery's).
        self.target: Callable[..., Any] = functools.partial(cast(Callable[..., Any], fn), self) if bind else fn

    @property
    def request(self) -> "Request":
        """The run this code is part of (Celery's ``self.request``): id, retries, eta; empty outside a run."""
        return Request(get_runner().current())

    def retry(self, exc: Optional[BaseException] = None, countdown: Optional[float] = None,
              max_retries: Optional[int] = None) -> NoReturn:
        """Celery's ``self.retry()``: raise Retry, so this run ends and another follows (``raise self.retry(...)`` works too)."""
        raise Retry(countdown=countdown, exc=exc, max_retries=max_retries)

    @property
    def serializer(self) -> str:
        """How a durable store keeps this task's arguments and result ("json" or "pickle")."""
        return self.opts.serializer

    @property
    def queue(self) -> str:
        """The queue a node claims this task from (``--queues``)."""
        return self.opts.queue

    def __repr__(self) -> str:
        return "<Task %s>" % self.name

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run inline in the calling greenlet and return the value (no retries, no timeout)."""
        value: R = self.target(*args, **kwargs)  # a bound task's partial loses R; the value is the function's
        return value

    def spawn(self, *args: P.args, **kwargs: P.kwargs) -> TaskResult[R]:
        """Run soon in its own greenlet; returns a TaskResult at once."""
        return self._spawn(args, kwargs)

    #: Celery's spelling of :meth:`spawn`.
    delay = spawn

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature of this task (Celery's ``task.s()``): a step of a workflow, or a run to start later."""
        return Signature(self, args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: as a step it does not receive its parent's result."""
        return Signature(self, args, kwargs, immutable=True)

    def signature(self, args: Iterable[Any] = (), kwargs: Optional[dict] = None, **options: Any) -> Signature:
        """Celery's ``task.signature(args, kwargs, **options)``."""
        immutable = bool(options.pop("immutable", False))
        return Signature(self, tuple(args), kwargs, options, immutable)

    def spawn_later(self, seconds: float, *args: P.args, **kwargs: P.kwargs) -> TaskResult[R]:
        """Run after ``seconds`` (monotonic clock)."""
        return self._spawn(args, kwargs, delay=seconds)

    def spawn_at(self, when: datetime.datetime, *args: P.args, **kwargs: P.kwargs) -> TaskResult[R]:
        """Run at the datetime ``when`` (naive means UTC)."""
        return self._spawn(args, kwargs, eta=when)

    def spawn_idle(self, *args: P.args, **kwargs: P.kwargs) -> TaskResult[R]:
        """Run when the hub is idle, after every normal waiting task."""
        return self._spawn(args, kwargs, idle=True)

    def apply_async(self, args: Iterable[Any] = (), kwargs: Optional[dict] = None,
                    countdown: Optional[float] = None, eta: Optional[datetime.datetime] = None,
                    **options: Any) -> TaskResult[R]:
        """Celery-style spawn: ``countdown`` seconds or an ``eta`` datetime; options go here, never on spawn()."""
        unknown = sorted(set(options) - set(APPLY_OPTIONS) - {"link", "link_error"})
        if unknown:
            raise ConfigError("%s.apply_async(): unknown option(s) %s (known: args, kwargs, countdown, eta, %s, "
                              "link, link_error)" % (self.name, ", ".join(unknown), ", ".join(APPLY_OPTIONS)))
        if options.get("link") is not None or options.get("link_error") is not None:
            # Callbacks make this run the first step of a workflow.
            return self.s(*tuple(args), **dict(kwargs or {})).set(
                countdown=countdown, eta=eta, **{k: v for k, v in options.items() if v is not None}).apply_async()
        if isinstance(args, (str, bytes)) or not isinstance(args, Iterable):
            raise ConfigError("%s.apply_async(args=...) takes a tuple or list of arguments, got %r"
                              % (self.name, args))
        options = {k: v for k, v in options.items() if v is not None}
        if options and self.batch_size is not None:
            raise ConfigError("%s is a batch task: apply_async options do not apply" % self.name)
        options.setdefault("queue", self.queue)
        return self._spawn(tuple(args), dict(kwargs or {}), delay=countdown, eta=eta, options=options)

    def map(self, iterable: Iterable[Any]) -> "list[TaskResult[R]]":
        """Spawn ``self(item)`` for each item; a durable store commits all of them at once."""
        runner = get_runner()
        items = list(iterable)
        if self.batch_size is not None or not runner.store.durable:
            return [self._spawn((item,), {}) for item in items]
        opts = self.opts
        rows = []
        for item in items:
            rate, limit = limits_of(with_buckets(self.name, opts, (item,), {}) if opts.limited else opts)
            rows.append(new_row(new_id(), self.name, (item,), {}, self.serializer, self.queue,
                                max_attempts=opts.retries + 1, priority=opts.priority, rate=rate, limit=limit))
        return runner.spawn_rows(rows, self)

    def _spawn(self, args: tuple, kwargs: dict, delay: Optional[float] = None,
               eta: Optional[datetime.datetime] = None, idle: bool = False,
               options: Optional[dict] = None) -> TaskResult[R]:
        runner = get_runner()
        if self.batch_size is not None:
            batcher = runner.batcher(self, lambda: _Batcher(runner, self))
            return batcher.add(args, kwargs, delay, eta, idle)
        if options is None and self.queue != "default":
            options = {"queue": self.queue}
        return runner.spawn(self.target, args, kwargs, name=self.name, opts=self.opts, delay=delay, eta=eta,
                            idle=idle, serializer=self.serializer, options=options)


#: Exception classes, as ``autoretry_for`` and ``dont_autoretry_for`` take them.
Errors = Union[Type[BaseException], Tuple[Type[BaseException], ...]]


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(*, retries: int = 0, retry_delay: float = 0.0, retry_backoff: float = 1.0,
         retry_jitter: float = 0.0, timeout: Optional[float] = None, name: Optional[str] = None,
         batch_size: None = None, batch_interval: None = None,
         serializer: str = "json", queue: str = "default", retry_backoff_max: Optional[float] = None,
         autoretry_for: Optional[Errors] = None, dont_autoretry_for: Errors = (),
         soft_timeout: Optional[float] = None, bind: Literal[False] = False, max_retries: Optional[int] = None,
         default_retry_delay: Optional[float] = None, time_limit: Optional[float] = None,
         soft_time_limit: Optional[float] = None, expires: Optional[float] = None,
         priority: int = 0, rate_limit: Union[str, int, None] = None, rate_key: Optional[Callable[..., Any]] = None,
         concurrency_limit: Optional[int] = None, concurrency_key: Optional[Callable[..., Any]] = None
         ) -> Callable[[Callable[P, R]], Task[P, R]]: ...


# A batch task's function takes the list of items while its spawns take one item each, and a
# bound task's takes the task first: neither Task can keep the function's signature.
@overload
def task(*, retries: int = 0, retry_delay: float = 0.0, retry_backoff: float = 1.0,
         retry_jitter: float = 0.0, timeout: Optional[float] = None, name: Optional[str] = None,
         batch_size: Optional[int] = None, batch_interval: Optional[float] = None,
         serializer: str = "json", queue: str = "default", retry_backoff_max: Optional[float] = None,
         autoretry_for: Optional[Errors] = None, dont_autoretry_for: Errors = (),
         soft_timeout: Optional[float] = None, bind: bool = False, max_retries: Optional[int] = None,
         default_retry_delay: Optional[float] = None, time_limit: Optional[float] = None,
         soft_time_limit: Optional[float] = None, expires: Optional[float] = None,
         priority: int = 0, rate_limit: Union[str, int, None] = None, rate_key: Optional[Callable[..., Any]] = None,
         concurrency_limit: Optional[int] = None, concurrency_key: Optional[Callable[..., Any]] = None
         ) -> Callable[[Callable[..., Any]], "Task[..., Any]"]: ...


def task(fn: Optional[Callable[P, R]] = None, /, *, retries: int = 0, retry_delay: float = 0.0,
         retry_backoff: float = 1.0, retry_jitter: float = 0.0, timeout: Optional[float] = None,
         name: Optional[str] = None, batch_size: Optional[int] = None, batch_interval: Optional[float] = None,
         serializer: str = "json", queue: str = "default", retry_backoff_max: Optional[float] = None,
         autoretry_for: Optional[Errors] = None, dont_autoretry_for: Errors = (),
         soft_timeout: Optional[float] = None, bind: bool = False, max_retries: Optional[int] = None,
         default_retry_delay: Optional[float] = None, time_limit: Optional[float] = None,
         soft_time_limit: Optional[float] = None, expires: Optional[float] = None, priority: int = 0,
         rate_limit: Union[str, int, None] = None, rate_key: Optional[Callable[..., Any]] = None,
         concurrency_limit: Optional[int] = None, concurrency_key: Optional[Callable[..., Any]] = None,
         **unknown: Any
         ) -> Union[Task[P, R], Callable[[Callable[P, R]], Task[P, R]]]:
    """Register a function as a task; works as ``@task`` and ``@task(retries=3, ...)``.

    Celery's names are accepted for the same settings: ``max_retries`` (retries),
    ``default_retry_delay`` (retry_delay), ``time_limit`` (timeout), ``soft_time_limit`` (soft_timeout).
    """
    if unknown:
        raise _UsageError("@task(): unknown option(s) %s (known: %s)" % (", ".join(sorted(unknown)), ", ".join(
            ("retries", "retry_delay", "retry_backoff", "retry_backoff_max", "retry_jitter", "autoretry_for",
             "dont_autoretry_for", "timeout", "soft_timeout", "bind", "name", "batch_size", "batch_interval",
             "serializer", "queue", "expires", "max_retries", "default_retry_delay", "time_limit",
             "soft_time_limit", "priority", "rate_limit", "rate_key", "concurrency_limit", "concurrency_key"))))
    retries = _either("retries", retries, 0, "max_retries", max_retries)
    retry_delay = _either("retry_delay", retry_delay, 0.0, "default_retry_delay", default_retry_delay)
    timeout = _either("timeout", timeout, None, "time_limit", time_limit)
    soft_timeout = _either("soft_timeout", soft_timeout, None, "soft_time_limit", soft_time_limit)
    if fn is not None and not callable(fn):
        raise ConfigError("@task decorates a function; task(%r) got a %s (did you mean "
                          "@task(retries=...)?)" % (fn, type(fn).__name__))
    if serializer not in ("json", "pickle"):
        raise ConfigError("serializer must be 'json' or 'pickle', got %r" % (serializer,))
    if batch_size is not None:
        check_number("batch_size", batch_size, 1, allow_none=True)
    check_number("batch_interval", batch_interval, 0, float, allow_none=True, strict=True)
    if batch_interval is not None and batch_size is None:
        batch_size = 2 ** 31  # only the interval flushes
    if bind and batch_size is not None:
        raise ConfigError("bind=True does not apply to batch tasks (their function takes the list of items)")
    check_number("retries", retries, 0)
    for label, value in (("retry_delay", retry_delay), ("retry_backoff", retry_backoff),
                         ("retry_jitter", retry_jitter)):
        check_number(label, value, 0, float)
    check_number("retry_backoff_max", retry_backoff_max, 0, float, allow_none=True)
    check_number("timeout", timeout, 0, float, allow_none=True, strict=True)
    check_number("soft_timeout", soft_timeout, 0, float, allow_none=True, strict=True)
    check_number("expires", expires, 0, float, allow_none=True)
    if soft_timeout is not None and timeout is not None and soft_timeout >= timeout:
        raise ConfigError("soft_timeout (%s) must be shorter than timeout (%s): the soft limit warns the task "
                          "before the hard one kills it" % (soft_timeout, timeout))
    retry_on = None if autoretry_for is None else _errors("autoretry_for", autoretry_for)
    never_retry = _errors("dont_autoretry_for", dont_autoretry_for)
    if name is not None and (not isinstance(name, str) or not name):
        raise ConfigError("name must be a non-empty string, got %r" % (name,))
    if not isinstance(queue, str) or not queue:
        raise ConfigError("queue must be a non-empty string, got %r" % (queue,))
    opts = TaskOptions(int(retries), float(retry_delay), float(retry_backoff), float(retry_jitter),
                       None if timeout is None else float(timeout), serializer, queue,
                       None if retry_backoff_max is None else float(retry_backoff_max), retry_on, never_retry,
                       None if soft_timeout is None else float(soft_timeout),
                       None if expires is None else float(expires), None, check_priority("priority", priority),
                       *_limits(rate_limit, rate_key, concurrency_limit, concurrency_key))
    if opts.limited and batch_size is not None:
        raise ConfigError("rate_limit and concurrency_limit do not apply to batch tasks (one run takes many items)")

    def decorate(f: Callable[P, R]) -> Task[P, R]:
        if isinstance(f, Task):
            f = f.fn
        if not callable(f):
            raise ConfigError("@task decorates a function, got a %s: %r" % (type(f).__name__, f))
        t = Task(f, name or callable_name(f), opts, batch_size, batch_interval, bool(bind))
        _register(t)
        return t

    return decorate(fn) if fn is not None else decorate


def _limits(rate_limit: Any, rate_key: Any, concurrency_limit: Any, concurrency_key: Any) -> tuple:
    """TaskOptions' limit fields from ``@task``'s arguments; ConfigError naming the bad one."""
    rate = parse_rate(rate_limit)
    check_number("concurrency_limit", concurrency_limit, 1, allow_none=True)
    for label, key, limit in (("rate_key", rate_key, rate), ("concurrency_key", concurrency_key, concurrency_limit)):
        if key is not None and not callable(key):
            raise ConfigError("%s takes a function of the task's arguments that returns the key, got %r"
                              % (label, key))
        if key is not None and limit is None:
            raise ConfigError("%s needs %s" % (label, label.replace("_key", "_limit")))
    return (rate, rate_key, None if concurrency_limit is None else int(concurrency_limit), concurrency_key,
            rate is not None or concurrency_limit is not None)


def _either(ours: str, value: Any, default: Any, theirs: str, celery_value: Any) -> Any:
    """Our setting or Celery's name for it (ConfigError when both are given)."""
    if celery_value is None:
        return value
    if value != default:
        raise ConfigError("@task(): give %s or Celery's %s, not both" % (ours, theirs))
    return celery_value


def _errors(label: str, value: Any) -> Tuple[type, ...]:
    """``value`` as a tuple of exception classes; ConfigError naming ``label`` otherwise."""
    found = value if isinstance(value, tuple) else (value,)
    if not all(isinstance(c, type) and issubclass(c, BaseException) for c in found):
        raise ConfigError("%s takes an exception class or a tuple of them, got %r" % (label, value))
    return found


#: Celery's name for ``task``: a port's ``@shared_task`` keeps working.
shared_task = task


def _identity(fn: Callable[..., Any]) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    code = getattr(fn, "__code__", None)
    return (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None),
            getattr(code, "co_filename", None))


def _register(t: "Task[..., Any]") -> None:
    old = _registry.get(t.name)
    # The same definition seen again (module reload, re-import in tests)
    # replaces the old one; a different function under the same name is a bug.
    if old is not None and old.fn is not t.fn and _identity(old.fn) != _identity(t.fn):
        raise ConfigError("task name %r is already used by %s.%s; pass name= to tell them apart"
                          % (t.name, old.fn.__module__, old.fn.__qualname__))
    _registry[t.name] = t


def get_task(name: str) -> "Task[..., Any]":
    """The registered Task called ``name`` (KeyError if none)."""
    return _registry[name]


def find_task(name: str) -> "Optional[Task[..., Any]]":
    """The registered Task called ``name``, or None.

    greenqueue's own tasks (the Django backend's runner) are found in their module even before
    it was imported, or after a runtime reset forgot them: those modules are safe to import. An
    app's module is never imported for a name read from a row (it could run import-time code).
    """
    found = _registry.get(name)
    if found is None and name.startswith("greenqueue."):
        module, _, attr = name.rpartition(".")
        try:
            candidate = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            return None
        if isinstance(candidate, Task) and candidate.name == name:
            _registry[name] = found = candidate
    return found


def _class_in_task_modules(name: str) -> Optional[type]:
    """The exception class ``module.QualName`` as the module of a registered task sees it, or None."""
    module, _, qualname = name.rpartition(".")
    for t in list(_registry.values()):
        fn = t.fn
        if getattr(fn, "__module__", None) != module:
            continue
        found: Any = getattr(fn, "__globals__", {}).get(qualname.split(".")[0])
        for part in qualname.split(".")[1:]:
            found = getattr(found, part, None)
        if isinstance(found, type) and issubclass(found, Exception):
            return found
    return None


class_finders.append(_class_in_task_modules)


def registered() -> "Dict[str, Task[..., Any]]":
    """A copy of the name -> Task registry."""
    return dict(_registry)


def clear_registry() -> None:
    """Forget every registered task name (tests, a runtime reset)."""
    _registry.clear()


class _Batcher:
    """Collects a batch task's items; the batch runs as one task, each item mirrors its outcome."""

    def __init__(self, runner: Runner, t: "Task[..., Any]") -> None:
        self.runner = runner
        self.task = t
        self.items: List[Tuple[TaskResult[Any], Any]] = []
        self.timer: Optional[gevent.Greenlet[[], Any]] = None

    def add(self, args: tuple, kwargs: dict, delay: Optional[float], eta: Optional[datetime.datetime],
            idle: bool) -> TaskResult[Any]:
        if kwargs or len(args) != 1:
            raise _UsageError("%s is a batch task: spawn it with exactly one item" % self.task.name)
        if delay is not None or eta is not None or idle:
            raise ConfigError("%s is a batch task: items are collected by size and interval only, so "
                              "spawn_later, spawn_at and spawn_idle do not apply" % self.task.name)
        runner = self.runner
        r: TaskResult[Any] = TaskResult(runner, new_id(), self.task.name)
        runner.track(r)
        self.items.append((r, args[0]))
        size = self.task.batch_size  # never None: only batch tasks have a _Batcher
        if (size is not None and len(self.items) >= size) or runner.eager:
            self.flush()
        elif self.timer is None and self.task.batch_interval is not None:
            self.timer = gevent.spawn_later(self.task.batch_interval, self.flush)
        return r

    def flush(self) -> Optional[TaskResult[Any]]:
        """Spawn the collected items as one batch (no-op when empty)."""
        timer, self.timer = self.timer, None
        if timer is not None and timer is not gevent.getcurrent():
            timer.kill(block=False)
        items = [(r, item) for r, item in self.items if r.state not in READY_STATES]
        self.items = []
        if not items:
            return None
        return self.runner.spawn(self._run, (items,), name=self.task.name + "[batch]",
                                 opts=self.task.opts, force=True,
                                 on_done=functools.partial(self._mirror, [r for r, _ in items]))

    def _run(self, items: List[Tuple[TaskResult[Any], Any]]) -> Any:
        started = time.time()
        values: List[Any] = []
        taken: List[TaskResult[Any]] = []
        for r, item in items:
            if r.state not in READY_STATES:
                self.runner.mark_started(r, started)
                values.append(item)
                taken.append(r)
        value = self.task.fn(values)
        if isinstance(value, PerItem):
            if len(value.outcomes) != len(taken):
                raise _UsageError("%s returned PerItem with %d outcomes for a batch of %d items"
                                % (self.task.name, len(value.outcomes), len(taken)))
            return _Outcomes((r.id, outcome) for r, outcome in zip(taken, value.outcomes))
        return value

    def _mirror(self, items: List[TaskResult[Any]], batch: TaskResult[Any]) -> None:
        runner = self.runner
        for r in items:
            r.retries = batch.retries
            if batch.state == SUCCESS and isinstance(batch.result, _Outcomes):
                outcome = batch.result.get(r.id, _NOT_TAKEN)
                if outcome is _NOT_TAKEN:
                    runner.cancel(r)  # cancelled after the flush, before the batch started
                elif isinstance(outcome, BaseException):
                    runner.finish(r, FAILURE, exc=outcome, duration=batch.duration)
                else:
                    runner.finish(r, SUCCESS, value=outcome, duration=batch.duration)
            elif batch.state == SUCCESS:
                runner.finish(r, SUCCESS, value=batch.result, duration=batch.duration)
            elif batch.state == FAILURE:
                runner.finish(r, FAILURE, exc=batch.exception, duration=batch.duration,
                               tb=batch.traceback)
            else:
                runner.cancel(r)


_NOT_TAKEN = object()


class _UsageError(ConfigError, TypeError):
    """A task called the wrong way (a TypeError, as Python's own call errors are, and a greenqueue error)."""


class _Outcomes(Dict[str, Any]):
    """The batch greenlet's result when the function returned PerItem: item task id -> outcome."""

    def __repr__(self) -> str:
        return "<%d per-item outcomes>" % len(self)
