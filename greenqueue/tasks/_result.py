"""TaskResult: the handle every spawn returns, and the task states.

Concurrency model: a TaskResult is mutated only by its runner, on the task
hub's thread (the spawning greenlet, the task greenlet, the timer greenlet
or a ``cancel()``). Its public attributes may be read from any thread.
Waiters on the task hub block on a gevent Event made lazily (a result nobody
waits for costs no hub objects); waiters on other threads (a Werkzeug
request thread, a script's main thread) block on a plain lock each, which
``resolve()`` releases after the state is final. The underscored slots are
this module's own: the runner changes a handle only through the functions
at the end of this module (``mark_started``, ``resolve``, ``follow_row``),
and keeps what it needs to run a task (function, arguments, slot) in a
record of its own.
"""

import builtins
import datetime
import logging
import traceback as _traceback
from time import time as _time
from typing import TYPE_CHECKING, Any, Callable, Dict, Generic, List, Optional, TypeVar

import gevent
from gevent import monkey
from gevent.event import Event

from .. import errors
from ..errors import CancelledError, GreenqueueError, RemoteError, TaskTimeout, WaitTimeout
from ..journal import TaskRow

if TYPE_CHECKING:
    from ._runner import Runner

log = logging.getLogger(__name__)

R = TypeVar("R")

PENDING = "PENDING"
SCHEDULED = "SCHEDULED"
STARTED = "STARTED"
RETRY = "RETRY"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
CANCELLED = "CANCELLED"
EXPIRED = "EXPIRED"

#: States after which nothing changes any more.
READY_STATES = frozenset((SUCCESS, FAILURE, CANCELLED, EXPIRED))

__all__ = ["TaskResult", "PENDING", "SCHEDULED", "STARTED", "RETRY", "SUCCESS",
           "FAILURE", "CANCELLED", "EXPIRED", "READY_STATES"]


class TaskResult(Generic[R]):
    """Handle on one spawned task: its state, and its value or error once ready."""

    PENDING = PENDING
    SCHEDULED = SCHEDULED
    STARTED = STARTED
    RETRY = RETRY
    SUCCESS = SUCCESS
    FAILURE = FAILURE
    CANCELLED = CANCELLED
    EXPIRED = EXPIRED

    # Slots keep a waiting task small: 100,000 scheduled tasks are a normal load.
    __slots__ = (
        "id", "name", "state", "result", "exception", "traceback", "retries", "progress",
        "eta", "_started_ts", "_finished_ts", "duration", "_runner", "_done", "_callbacks", "parent",
        "__weakref__",
    )

    def __init__(self, runner: Optional["Runner"], task_id: str, name: str, state: str = PENDING) -> None:
        self.id: str = task_id
        self.name: str = name
        self.state: str = state
        self.result: Optional[R] = None
        self.exception: Optional[BaseException] = None
        self.traceback: Optional[str] = None
        self.retries: int = 0
        #: The last ``greenqueue.progress()`` report: {"done", "total", "message"} or None.
        self.progress: Optional[Dict[str, Any]] = None
        self.eta: Optional[datetime.datetime] = None
        #: The step before this one in a chain (Celery's ``r.parent``), else None.
        self.parent: Optional["TaskResult[Any]"] = None
        # Wall-clock floats; the datetimes are built only when someone reads them.
        self._started_ts: Optional[float] = None
        self._finished_ts: Optional[float] = None
        #: Seconds the last attempt ran (None until it ends).
        self.duration: Optional[float] = None
        self._runner = runner
        self._done: Optional[Event] = None
        self._callbacks: Optional[List[Callable[..., Any]]] = None

    def __repr__(self) -> str:
        return "<TaskResult %s %s %s>" % (self.name, self.id, self.state)

    @property
    def started_at(self) -> Optional[datetime.datetime]:
        """When the last attempt started (aware UTC datetime), or None."""
        ts = self._started_ts
        return None if ts is None else datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)

    @property
    def finished_at(self) -> Optional[datetime.datetime]:
        """When the task became ready (aware UTC datetime), or None."""
        ts = self._finished_ts
        return None if ts is None else datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)

    def ready(self) -> bool:
        """True once the task succeeded, failed or was cancelled."""
        return self.state in READY_STATES

    def successful(self) -> bool:
        """True if the task returned a value."""
        return self.state == SUCCESS

    def failed(self) -> bool:
        """True if the task ended in FAILURE or was cancelled."""
        return self.state == FAILURE or self.state == CANCELLED or self.state == EXPIRED

    @property
    def status(self) -> str:
        """Celery's name for :attr:`state`."""
        return self.state

    @property
    def task_id(self) -> str:
        """Celery's name for :attr:`id`."""
        return self.id

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the task is ready or ``timeout`` passes (this greenlet, or this thread); return ready()."""
        if self.state in READY_STATES:
            return True
        runner = self._runner
        if runner is not None and not runner.on_hub_thread():
            return self._wait_from_thread(timeout)
        if self._done is None:
            self._done = Event()
        # A task that waits gives its slot away so the task it waits on can
        # run: with max_concurrency=1 this is what prevents a deadlock.
        lent = runner.lend_slot(self) if runner is not None else None
        try:
            self._done.wait(timeout)
        finally:
            if lent is not None and runner is not None:
                runner.take_slot_back(lent)
        return self.state in READY_STATES

    def _wait_from_thread(self, timeout: Optional[float]) -> bool:
        lock = _allocate_lock()
        lock.acquire()
        # A done callback releases the lock (it runs on the task hub's thread, which never waits on it).
        # resolve() makes the state final before it takes the callbacks: if it ran in between, see it here.
        self.add_done_callback(lambda _: lock.release())
        if self.state not in READY_STATES:
            lock.acquire(True, -1 if timeout is None else max(0.0, timeout))
        return self.state in READY_STATES

    def get(self, timeout: Optional[float] = None) -> R:
        """Return the value, raise the task's exception, or raise WaitTimeout when the wait runs out."""
        if not self.wait(timeout):
            raise WaitTimeout("waited %ss for task %s[%s] (state %s); the task goes on"
                              % (timeout, self.name, self.id, self.state))
        if self.state == SUCCESS:
            return self.result  # type: ignore[return-value]
        raise self.exception  # type: ignore[misc]

    def cancel(self) -> bool:
        """Stop the task: never run it if waiting, kill it if running; False if it already finished."""
        if self._runner is None:
            return False
        return self._runner.cancel(self)

    def revoke(self, terminate: bool = True) -> bool:
        """Celery's name for :meth:`cancel` (a running task is always stopped)."""
        return self.cancel()

    @classmethod
    def restored(cls, runner: Optional["Runner"], row: TaskRow) -> "TaskResult[Any]":
        """A finished result read back from a durable store's row."""
        r: TaskResult[Any] = cls(runner, row.id, row.name)
        follow_row(r, row)
        return r

    def add_done_callback(self, fn: Callable[["TaskResult[R]"], Any]) -> None:
        """Call ``fn(result)`` in the finishing greenlet once this task is ready (at once if it is)."""
        if self.state in READY_STATES:
            fn(self)
        elif self._callbacks is None:
            self._callbacks = [fn]
        else:
            self._callbacks.append(fn)

_allocate_lock = monkey.get_original("_thread", "allocate_lock")


# RemoteErrors that are also the app's exception class, made once per class.
_REMOTE_AS: Dict[type, type] = {}
#: ``finder("module.QualName")`` -> the app's exception class, or None: where the classes a stored
#: failure names are looked up (the task registry adds its own: the modules of registered tasks).
#: Never by importing a module a row names, which could run import-time code.
class_finders: List[Callable[[str], Optional[type]]] = []


def _app_class(name: str) -> Optional[type]:
    """The app's exception class ``module.QualName`` if a finder knows it here."""
    for finder in class_finders:
        found = finder(name)
        if found is not None:
            return found
    return None


def _rebuilt(type_name: Optional[str], message: str) -> Exception:
    """The exception a stored failure describes: builtins and greenqueue errors by type, others as RemoteError.

    A RemoteError of an app's class imported in this process is an instance of that class too,
    so ``except PaymentError`` (and Celery ports' tests) catch it on any node.
    """
    name = type_name or "Exception"
    if "." in name:
        cls = _app_class(name)
        if cls is not None:
            both = _REMOTE_AS.get(cls)
            if both is None:
                try:
                    both = _REMOTE_AS[cls] = type(cls.__name__, (RemoteError, cls), {"__module__": cls.__module__})
                except TypeError:
                    both = None  # a layout Python cannot combine: a plain RemoteError below
            if both is not None:
                try:
                    made: Exception = both(message, name, "")
                    return made
                except TypeError:
                    pass
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:
            pass  # needs other arguments (UnicodeDecodeError...): keep name and message
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, GreenqueueError) and cls is not RemoteError:
        try:
            return cls(message)
        except TypeError:
            pass
    return RemoteError(message, name, "")


def _as_exception(exc: BaseException) -> Exception:
    """Turn BaseExceptions (GreenletExit, gevent.Timeout, ...) into GreenqueueError subclasses."""
    if isinstance(exc, Exception) and not isinstance(exc, gevent.Timeout):
        return exc
    new: GreenqueueError
    if isinstance(exc, gevent.Timeout):
        new = TaskTimeout("task raised gevent.Timeout: %s" % (exc,))
    elif isinstance(exc, gevent.GreenletExit):
        new = CancelledError("task greenlet was killed")
    else:
        new = GreenqueueError("task raised %s: %s" % (type(exc).__name__, exc))
    new.__cause__ = exc
    return new


# -- the runner's side: the only ways a handle changes ---------------------------------------


def mark_started(r: "TaskResult[Any]", ts: float) -> None:
    """An attempt of ``r`` started at wall-clock ``ts``."""
    r.state = STARTED
    r._started_ts = ts


def resolve(r: "TaskResult[Any]", state: str, value: Any = None, exc: Optional[BaseException] = None,
            tb: Optional[str] = None, finished_ts: Optional[float] = None) -> bool:
    """Make ``r`` final and wake its waiters and callbacks; False if it already was."""
    if r.state in READY_STATES:
        return False
    r._finished_ts = finished_ts if finished_ts is not None else _time()
    r.state = state
    r.result = value
    if exc is not None:
        exc = _as_exception(exc)
        r.exception = exc
        r.traceback = tb if tb is not None else "".join(
            _traceback.format_exception(type(exc), exc, exc.__traceback__))
    if r._done is not None:
        r._done.set()
    callbacks, r._callbacks = r._callbacks, None
    for fn in callbacks or ():
        try:
            fn(r)
        except Exception:
            # A callback bug must not leave the other callbacks unrun.
            log.exception("done callback %r of task %s failed", fn, r.id)
    return True


def follow_row(r: "TaskResult[Any]", row: TaskRow) -> bool:
    """Bring ``r`` up to date with its row in a store; True when that made it final."""
    if r.state in READY_STATES:
        return False
    r.retries = max(0, row.attempts - 1)
    if row.state not in READY_STATES:
        if row.state in (STARTED, RETRY, SCHEDULED, PENDING):
            r.state = row.state
        return False
    r._started_ts = row.started_at
    if row.state == SUCCESS:
        from ..journal import loads
        return resolve(r, SUCCESS, loads(row.serializer, row.result), finished_ts=row.finished_at)
    return resolve(r, row.state, exc=_rebuilt(row.error_type, row.error or ""), tb=row.traceback or "",
                   finished_ts=row.finished_at)


def on_done(r: "TaskResult[Any]", fn: Callable[["TaskResult[Any]"], Any]) -> None:
    """Run ``fn(r)`` when ``r`` is ready, before callbacks added later (a batch item's mirror)."""
    if r._callbacks is None:
        r._callbacks = [fn]
    else:
        r._callbacks.insert(0, fn)


def is_waited(r: "TaskResult[Any]") -> bool:
    """True when someone waits on ``r`` or has a callback on it (worth asking the store about often)."""
    return r._done is not None or bool(r._callbacks)
