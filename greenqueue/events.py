"""Event objects published through ``zope.event`` on every state change.

Concurrency model: events are created and delivered synchronously in the
greenlet that changed the state (a task greenlet, the scheduler loop, a pool
monitor, the server's main greenlet). Listeners must be quick and must not
block the hub; a listener that raises is logged and skipped so one bad
listener cannot break the runner.
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import zope.event

log = logging.getLogger(__name__)

__all__ = [
    "Event", "TaskSpawned", "TaskStarted", "TaskSucceeded", "TaskFailed",
    "TaskRetrying", "TaskCancelled", "JobFired", "JobSkipped", "JobMissed",
    "WorkerStarted", "WorkerExited", "ServerStarting", "ServerStopping", "MessagesHandled", "MessagesFailed",
    "RequestFinished", "PoolCallFinished", "WorkflowStarted", "WorkflowFinished", "notify", "subscribe", "wanted",
    "subscribers",
]


@dataclass
class Event:
    """Base of every greenqueue event; ``timestamp`` is wall-clock seconds."""

    timestamp: float = field(default_factory=time.time, kw_only=True)


@dataclass
class TaskSpawned(Event):
    """A task was accepted (pending, or scheduled when it has an eta)."""

    result: Any


@dataclass
class TaskStarted(Event):
    """A task greenlet began running an attempt."""

    result: Any


@dataclass
class TaskSucceeded(Event):
    """A task returned; ``duration`` is the last attempt's seconds."""

    result: Any
    duration: float = 0.0


@dataclass
class TaskFailed(Event):
    """A task ended in FAILURE after its last attempt."""

    result: Any
    exception: Optional[BaseException] = None
    duration: float = 0.0


@dataclass
class TaskRetrying(Event):
    """An attempt failed and another one is scheduled after ``delay`` seconds."""

    result: Any
    exception: Optional[BaseException] = None
    delay: float = 0.0


@dataclass
class TaskCancelled(Event):
    """A task was cancelled before it finished."""

    result: Any


@dataclass
class JobFired(Event):
    """A periodic job was due and its run was spawned as a task."""

    job: Any
    result: Any = None
    scheduled_for: Any = None


@dataclass
class JobSkipped(Event):
    """A due run was skipped (``reason``: e.g. max_instances reached)."""

    job: Any
    reason: str = ""
    scheduled_for: Any = None


@dataclass
class JobMissed(Event):
    """A run was late (hub blocked, suspend, downtime) by ``late_by`` seconds."""

    job: Any
    scheduled_for: Any = None
    late_by: float = 0.0
    missed_runs: int = 1


@dataclass
class WorkerStarted(Event):
    """A process-pool worker process is up and initialised."""

    pool: Any
    pid: int = 0
    index: int = 0


@dataclass
class WorkerExited(Event):
    """A process-pool worker ended (``reason``: stopped, crashed, timeout, recycled, init-failed)."""

    pool: Any
    pid: int = 0
    index: int = 0
    exitcode: Optional[int] = None
    reason: str = ""


@dataclass
class ServerStarting(Event):
    """The server bound its sockets and is about to serve."""

    addresses: tuple = ()
    app: str = ""


@dataclass
class ServerStopping(Event):
    """The server begins its graceful shutdown."""

    reason: str = ""


@dataclass
class MessagesHandled(Event):
    """A consumer's handler took a batch of ``count`` messages in ``seconds``.

    ``requeued``/``rejected`` count the messages the handler itself sent back
    or dropped with ``message.reject()``; the rest were settled by ``on_success``.
    """

    consumer: Any
    count: int = 0
    seconds: float = 0.0
    requeued: int = 0
    rejected: int = 0


@dataclass
class MessagesFailed(Event):
    """A consumer's handler raised on a batch; ``requeued`` messages go back to the queue, ``rejected`` are dropped."""

    consumer: Any
    count: int = 0
    seconds: float = 0.0
    exception: Optional[BaseException] = None
    requeued: int = 0
    rejected: int = 0


@dataclass
class RequestFinished(Event):
    """The server answered one HTTP request: ``status`` (0 when no response started) in ``seconds``."""

    method: str = ""
    path: str = ""
    status: int = 0
    seconds: float = 0.0


@dataclass
class PoolCallFinished(Event):
    """A process-pool call (``kind`` "call") or stream ("stream") ended after ``seconds``."""

    pool: Any
    kind: str = "call"
    seconds: float = 0.0


@dataclass
class WorkflowStarted(Event):
    """A chain, group or chord (``kind``) of ``steps`` runs was started; ``result`` stands for it."""

    result: Any
    kind: str = "chain"
    steps: int = 0


@dataclass
class WorkflowFinished(Event):
    """A workflow started in this process ended: ``state`` is its result's (a group's: SUCCESS or FAILURE)."""

    result: Any
    kind: str = "chain"
    state: str = "SUCCESS"


def notify(event: Event) -> None:
    """Publish ``event`` through ``zope.event`` (greenqueue's listeners and any raw zope subscriber)."""
    zope.event.notify(event)


#: The very list ``zope.event`` notifies; producers test ``if subscribers:`` before building an event.
subscribers = zope.event.subscribers

_listeners: List[Tuple[Callable[[Any], None], Tuple[type, ...]]] = []
_by_type: Dict[type, Tuple[Callable[[Any], None], ...]] = {}


def _for_type(kind: type) -> Tuple[Callable[[Any], None], ...]:
    fns = tuple(fn for fn, types in _listeners if not types or issubclass(kind, types))
    _by_type[kind] = fns
    return fns


def _dispatch(event: Any) -> None:
    # The one zope.event subscriber greenqueue installs; it fans out by event type.
    kind = type(event)
    fns = _by_type.get(kind)
    if fns is None:
        fns = _for_type(kind)
    for fn in fns:
        try:
            fn(event)
        except Exception:
            # A broken listener must not break the task, request or worker that notified.
            log.exception("event listener %r failed on %s", fn, kind.__name__)


def subscribe(fn: Callable[[Any], None], *types: type) -> Callable[[], None]:
    """Call ``fn(event)`` for events of ``types`` (all events when none); return an unsubscribe callable."""
    entry = (fn, tuple(types))
    _listeners.append(entry)
    _by_type.clear()
    if _dispatch not in subscribers:
        subscribers.append(_dispatch)

    def unsubscribe() -> None:
        try:
            _listeners.remove(entry)
        except ValueError:
            return  # already removed; unsubscribing twice is harmless
        _by_type.clear()
        if not _listeners and _dispatch in subscribers:
            # No listener left: producers see an empty list and skip building events.
            subscribers.remove(_dispatch)

    return unsubscribe


def wanted(kind: type) -> bool:
    """True when some listener would receive an event of type ``kind`` (cheap; for hot paths)."""
    subs = subscribers
    if not subs:
        return False
    if len(subs) > 1 or subs[0] is not _dispatch:
        return True  # a raw zope.event subscriber sees everything
    fns = _by_type.get(kind)
    if fns is None:
        fns = _for_type(kind)
    return bool(fns)


def clear() -> None:
    """Remove every greenqueue listener (tests, runtime reset)."""
    _listeners.clear()
    _by_type.clear()
    if _dispatch in subscribers:
        subscribers.remove(_dispatch)
