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
from typing import Any, Optional

import zope.event

log = logging.getLogger(__name__)

__all__ = [
    "Event", "TaskSpawned", "TaskStarted", "TaskSucceeded", "TaskFailed",
    "TaskRetrying", "TaskCancelled", "JobFired", "JobSkipped", "JobMissed",
    "WorkerStarted", "WorkerExited", "ServerStarting", "ServerStopping", "MessagesHandled", "MessagesFailed",
    "notify", "subscribe",
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


def notify(event):
    """Publish ``event`` to every zope.event subscriber."""
    zope.event.notify(event)


def subscribe(fn, *types):
    """Call ``fn(event)`` for events of ``types`` (all events when none); return an unsubscribe callable."""
    def listener(event):
        if types and not isinstance(event, types):
            return
        try:
            fn(event)
        except Exception:
            # A broken listener must not break the task or worker that notified.
            log.exception("event listener %r failed on %s", fn, type(event).__name__)

    zope.event.subscribers.append(listener)

    def unsubscribe():
        try:
            zope.event.subscribers.remove(listener)
        except ValueError:
            pass  # already removed; unsubscribing twice is harmless

    return unsubscribe
