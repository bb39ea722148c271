"""One attempt of a task: call the function, then succeed, retry or fail it, telling the store and the events.

Concurrency model: ``run`` runs in the task's own greenlet on the task
hub, started by the engine when a slot is free; ``finish`` runs in the
greenlet that ends a task (its own, a cancel, a batch). The runner's state
is touched through its methods only. A timeout kills only the task's
greenlet (``gevent.Timeout`` raised into it); KeyboardInterrupt and
SystemExit still reach the hub after the result is recorded.
"""

import logging
import pickle
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Optional, Tuple

import gevent

from .. import events
from ..errors import MaxRetriesExceeded, Retry, SoftTimeLimitExceeded, TaskExpired, TaskTimeout
from ..journal import TaskRow, dumps
from ._engine import ABANDONED, Entry
from ._result import CANCELLED, EXPIRED, FAILURE, READY_STATES, RETRY, SUCCESS, TaskResult, mark_started, resolve

if TYPE_CHECKING:
    from ._runner import Runner

# The runner's logger: attempts were the runner's until they got their own module, and
# logging config written for the runner should keep seeing their lines by name.
log = logging.getLogger("greenqueue.tasks._runner")

__all__ = ["run", "finish", "run_eager", "final_row", "announce_final"]

_monotonic = time.monotonic
_time = time.time
_subscribers = events.subscribers
_THIS_FILE = __file__


class _Expired(BaseException):
    """Raised into a task greenlet by its own timeout (never escapes the runner)."""


def _user_frames(exc: BaseException) -> BaseException:
    """``exc`` with this module's frames cut from the front of its traceback: it starts at the user's code."""
    tb: Optional[TracebackType] = exc.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename == _THIS_FILE:
        tb = tb.tb_next
    return exc.with_traceback(tb)


def _call(e: Entry) -> Any:
    fn = e.fn
    if fn is None:
        raise TypeError("task %s[%s] has nothing to run" % (e.handle.name, e.handle.id))
    if e.app is not None:
        with e.app.app_context():
            return fn(*e.args, **e.kwargs)
    return fn(*e.args, **e.kwargs)


def run(runner: "Runner", e: Entry) -> None:
    """Run one attempt of ``e`` in this (its task) greenlet and settle what came of it."""
    r = e.handle
    opts = e.opts
    if opts.start_by is not None and _time() > opts.start_by:
        finish(runner, e, EXPIRED, exc=_expired(r, opts.start_by))
        return
    mark_started(r, _time())
    if e.serializer is not None:
        runner.store.started(r.id)
    if _subscribers:
        events.notify(events.TaskStarted(r))
    exc: Optional[BaseException] = None
    value = None
    timer = soft = None
    expired = False
    t0 = _monotonic()
    try:
        if opts.timeout is not None:
            timer = gevent.Timeout.start_new(opts.timeout, _Expired())
        if opts.soft_timeout is not None:
            # Raised inside the task, where its own code may catch it and clean up.
            soft = gevent.Timeout.start_new(opts.soft_timeout, SoftTimeLimitExceeded(
                "task %s[%s] passed its soft time limit of %ss" % (r.name, r.id, opts.soft_timeout)))
        value = _call(e)
    except _Expired:
        exc = None  # decided below from the timer, which also catches a swallowed expiry
    except gevent.GreenletExit as ge:
        if r.state == CANCELLED or e.where == ABANDONED:
            return  # cancel() already finished the result, or the lease went to another node
        exc = ge
    except (KeyboardInterrupt, SystemExit) as stop:
        finish(runner, e, FAILURE, exc=stop, duration=_monotonic() - t0)
        raise  # the process is stopping; let the hub see it
    except BaseException as failed:
        # gevent.Timeout and other BaseExceptions become GreenqueueErrors in resolve().
        exc = _user_frames(failed)
    finally:
        if soft is not None:
            soft.close()
        if timer is not None:
            expired = not timer.pending
            timer.close()
    duration = _monotonic() - t0
    if r.state == CANCELLED:
        return
    if timer is not None and expired:
        exc = TaskTimeout("task %s[%s] timed out after %ss" % (r.name, r.id, opts.timeout))
    if exc is None:
        finish(runner, e, SUCCESS, value=value, duration=duration)
    elif isinstance(exc, gevent.GreenletExit):
        # Killed by someone other than cancel() (killall, shutdown): still a result.
        finish(runner, e, CANCELLED, exc=exc, duration=duration)
    else:
        retry, failure = decide(e, exc)
        if retry:
            _retry(runner, e, exc, duration, exc.countdown if isinstance(exc, Retry) else None)
        else:
            finish(runner, e, FAILURE, exc=failure, duration=duration)


def _expired(r: Any, start_by: float) -> TaskExpired:
    return TaskExpired("task %s[%s] was not started by its expiry (%.3f s ago); it never ran"
                       % (r.name, r.id, _time() - start_by))


def decide(e: Entry, exc: BaseException) -> Tuple[bool, BaseException]:
    """Whether a failed attempt of ``e`` runs again, and the error it fails with if not."""
    r = e.handle
    opts = e.opts
    if isinstance(exc, Retry):
        # The task asked for it: an attempt like any other, with its own budget if it gave one.
        limit = opts.retries if exc.max_retries is None else exc.max_retries
        if r.retries < limit:
            return True, exc
        return False, exc.exc if exc.exc is not None else MaxRetriesExceeded(
            "task %s[%s] asked to retry after %d attempt(s); no retry is left (retries=%d)"
            % (r.name, r.id, r.retries + 1, limit))
    return r.retries < opts.retries and opts.retries_on(exc), exc


def _retry(runner: "Runner", e: Entry, exc: BaseException, duration: float, countdown: Optional[float]) -> None:
    r = e.handle
    r.retries += 1
    r.duration = duration
    r.state = RETRY
    delay = e.opts.delay_for(r.retries) if countdown is None else max(0.0, float(countdown))
    log.debug("task %s[%s] attempt %d failed, retrying in %.3fs", r.name, r.id, r.retries, delay)
    handed_over = e.serializer is not None and runner.store.retrying(r.id, r.name, delay, exc)
    if _subscribers:
        events.notify(events.TaskRetrying(r, exception=exc, delay=delay))
    if handed_over:
        runner.follow_elsewhere(e)  # the store has it; any node claims it when due
    elif delay > 0:
        runner.engine.schedule(e, delay)
    else:
        # This greenlet still holds its slot; queue behind waiting tasks for fairness.
        runner.engine.queue_behind(e)


def error_type(exc: BaseException) -> str:
    """How a store names an exception's class: a builtin's or greenqueue's by name, the app's by module and name.

    The module lets a node where it is imported raise the same class from ``get()``.
    """
    cls = type(exc)
    if cls.__module__ in ("builtins", "greenqueue.errors"):
        return cls.__name__
    return "%s.%s" % (cls.__module__, cls.__qualname__)


def final_row(e: Entry) -> TaskRow:
    """The row a store records for ``e``'s final state (its result serialized, or its error)."""
    r = e.handle
    blob = None
    if r.state == SUCCESS:
        try:
            blob = dumps(e.serializer or "json", r.result)
        except (TypeError, ValueError, pickle.PicklingError):
            blob = dumps("json", repr(r.result))
    exc = r.exception
    row = TaskRow(r.id, r.name, b"", e.serializer or "json", e.opts.queue, r.state)
    row.result = blob
    if exc is not None:
        row.error_type = getattr(exc, "remote_type", None) or error_type(exc)
        row.error = str(exc)
        row.traceback = r.traceback
    return row


def finish(runner: "Runner", e: Entry, state: str, value: Any = None, exc: Optional[BaseException] = None,
           duration: Optional[float] = None, tb: Optional[str] = None) -> None:
    """Make ``e``'s result final, drop what it held, and tell the store and the listeners."""
    r = e.handle
    if r.state in READY_STATES:
        return
    if duration is not None:
        r.duration = duration
    e.where = None
    if not resolve(r, state, value, exc, tb):
        return
    # Drop the call's inputs so nothing pins big arguments after the end.
    e.fn = e.app = None
    e.args, e.kwargs = (), {}
    runner.settled(e)
    if e.serializer is not None:
        runner.store.finished(final_row(e))
    if _subscribers:
        announce_final(r, r.duration or 0.0)


def announce_final(r: TaskResult[Any], duration: float) -> None:
    """Publish the event of ``r``'s final state: succeeded, failed, or cancelled (expiry included)."""
    if r.state == SUCCESS:
        events.notify(events.TaskSucceeded(r, duration=duration))
    elif r.state == FAILURE:
        events.notify(events.TaskFailed(r, exception=r.exception, duration=duration))
    else:
        events.notify(events.TaskCancelled(r))


def run_eager(runner: "Runner", e: Entry) -> None:
    """Run inline in the caller (tests): no delay, no timeout, exceptions propagate."""
    r = e.handle
    if _subscribers:
        events.notify(events.TaskSpawned(r))
    while True:
        if e.opts.start_by is not None and _time() > e.opts.start_by:
            finish(runner, e, EXPIRED, exc=_expired(r, e.opts.start_by))
            return
        mark_started(r, _time())
        if _subscribers:
            events.notify(events.TaskStarted(r))
        t0 = _monotonic()
        runner.eager_running.append(r)
        try:
            value = _call(e)
        except Exception as failed:
            retry, failure = decide(e, failed)
            if retry:
                r.retries += 1
                r.state = RETRY
                if _subscribers:
                    events.notify(events.TaskRetrying(r, exception=failed, delay=0.0))
                continue
            finish(runner, e, FAILURE, exc=_user_frames(failure), duration=_monotonic() - t0)
            if failure is failed:
                raise
            raise failure from failed
        finally:
            runner.eager_running.pop()
        finish(runner, e, SUCCESS, value=value, duration=_monotonic() - t0)
        return

