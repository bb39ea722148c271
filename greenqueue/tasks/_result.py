"""TaskResult: the handle every spawn returns, and the task states.

Concurrency model: a TaskResult is mutated only by its runner, from the
greenlet that spawned it, the task greenlet, the runner's timer greenlet or
the greenlet that calls ``cancel()``; all of them live on the one hub thread,
so no locks. Waiters block on a gevent Event that is created lazily, so a
result nobody waits for costs no hub objects.
"""

import datetime
import logging
import traceback as _traceback
from typing import Generic, Optional, TypeVar

import gevent
from gevent.event import Event

from ..errors import GreenqueueError, TaskCancelled, TaskTimeout

log = logging.getLogger(__name__)

R = TypeVar("R")

PENDING = "PENDING"
SCHEDULED = "SCHEDULED"
STARTED = "STARTED"
RETRY = "RETRY"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
CANCELLED = "CANCELLED"

#: States after which nothing changes any more.
READY_STATES = frozenset((SUCCESS, FAILURE, CANCELLED))

__all__ = ["TaskResult", "PENDING", "SCHEDULED", "STARTED", "RETRY", "SUCCESS",
           "FAILURE", "CANCELLED", "READY_STATES"]


class TaskResult(Generic[R]):
    """Handle on one spawned task: its state, and its value or error once ready."""

    PENDING = PENDING
    SCHEDULED = SCHEDULED
    STARTED = STARTED
    RETRY = RETRY
    SUCCESS = SUCCESS
    FAILURE = FAILURE
    CANCELLED = CANCELLED

    # Slots keep a waiting task small: 100,000 scheduled tasks are a normal load.
    __slots__ = (
        "id", "name", "state", "result", "exception", "traceback", "retries", "progress",
        "eta", "_started_ts", "_finished_ts", "duration",
        "_fn", "_args", "_kwargs", "_opts", "_runner", "_greenlet", "_done",
        "_app", "_where", "_slot", "_idle", "_finished_mono", "_callbacks", "__weakref__",
    )

    def __init__(self, runner, task_id, name, fn, args, kwargs, opts, app, idle=False):
        self.id: str = task_id
        self.name: str = name
        self.state: str = PENDING
        self.result: Optional[R] = None
        self.exception: Optional[BaseException] = None
        self.traceback: Optional[str] = None
        self.retries: int = 0
        #: The last ``greenqueue.progress()`` report: {"done", "total", "message"} or None.
        self.progress = None
        self.eta = None
        # Wall-clock floats; the datetimes are built only when someone reads them.
        self._started_ts = None
        self._finished_ts = None
        #: Seconds the last attempt ran (None until it ends).
        self.duration: Optional[float] = None
        self._fn = fn
        self._args = args
        self._kwargs = kwargs
        self._opts = opts
        self._runner = runner
        self._greenlet = None
        self._done = None
        self._app = app
        self._where = None
        self._slot = False
        self._idle = idle
        self._finished_mono = 0.0
        self._callbacks = None

    def __repr__(self):
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
        return self.state == FAILURE or self.state == CANCELLED

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block this greenlet until the task is ready or ``timeout`` passes; return ready()."""
        if self.state in READY_STATES:
            return True
        if self._done is None:
            self._done = Event()
        runner = self._runner
        me = runner._slot_holder(gevent.getcurrent())
        if me is not None and me is not self:
            # A task that waits gives its slot away so the task it waits on can
            # run: with max_concurrency=1 this is what prevents a deadlock.
            runner._release_slot(me)
        try:
            self._done.wait(timeout)
        finally:
            if me is not None and me is not self:
                runner._reacquire_slot(me)
        return self.state in READY_STATES

    def get(self, timeout: Optional[float] = None) -> R:
        """Return the value, raise the task's exception, or raise TaskTimeout when the wait runs out."""
        if not self.wait(timeout):
            raise TaskTimeout("waited %ss for task %s[%s] (state %s)"
                              % (timeout, self.name, self.id, self.state))
        if self.state == SUCCESS:
            return self.result
        raise self.exception

    def cancel(self) -> bool:
        """Stop the task: never run it if waiting, kill it if running; False if it already finished."""
        return self._runner._cancel(self)

    def add_done_callback(self, fn) -> None:
        """Call ``fn(result)`` in the finishing greenlet once this task is ready (at once if it is)."""
        if self.state in READY_STATES:
            fn(self)
        elif self._callbacks is None:
            self._callbacks = [fn]
        else:
            self._callbacks.append(fn)

    # -- runner side -------------------------------------------------------

    def _set(self, state, value=None, exc=None, tb=None):
        """Make the result final and wake waiters; returns False if it already was."""
        if self.state in READY_STATES:
            return False
        self.state = state
        self.result = value
        if exc is not None:
            exc = _as_exception(exc)
            self.exception = exc
            self.traceback = tb if tb is not None else "".join(
                _traceback.format_exception(type(exc), exc, exc.__traceback__))
        # Drop the call's inputs so a kept result does not pin big arguments.
        self._fn = self._args = self._kwargs = self._app = None
        self._greenlet = None
        if self._done is not None:
            self._done.set()
        callbacks, self._callbacks = self._callbacks, None
        for fn in callbacks or ():
            try:
                fn(self)
            except Exception:
                # A callback bug must not leave the other callbacks unrun.
                log.exception("done callback %r of task %s failed", fn, self.id)
        return True


def _as_exception(exc):
    """Turn BaseExceptions (GreenletExit, gevent.Timeout, ...) into GreenqueueError subclasses."""
    if isinstance(exc, Exception) and not isinstance(exc, gevent.Timeout):
        return exc
    if isinstance(exc, gevent.Timeout):
        new = TaskTimeout("task raised gevent.Timeout: %s" % (exc,))
    elif isinstance(exc, gevent.GreenletExit):
        new = TaskCancelled("task greenlet was killed")
    else:
        new = GreenqueueError("task raised %s: %s" % (type(exc).__name__, exc))
    new.__cause__ = exc
    return new
