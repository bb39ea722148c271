"""greenqueue's exception hierarchy: one base, one class per failure.

Concurrency model: plain data, no state. Errors that cross a worker pipe are
turned into dicts by :func:`to_dict` and back by :func:`from_dict`, so one
table decides what a parent process can rebuild.
"""

from typing import Any, Dict, Mapping, Optional

__all__ = [
    "GreenqueueError", "ConfigError", "Overloaded", "TaskTimeout", "WaitTimeout",
    "CancelledError", "WorkerError", "RemoteError", "WorkerCrashed",
    "WorkerTimeout", "to_dict", "from_dict",
]


class GreenqueueError(Exception):
    """Base class of every error greenqueue raises."""


class ConfigError(GreenqueueError, ValueError):
    """A setting, CLI flag or config file value is invalid."""


class SerializationError(ConfigError, TypeError):
    """Task arguments or a result the task's serializer cannot carry (JSON by default)."""


class Overloaded(GreenqueueError):
    """A queue is full; retry later (views turn this into 503)."""


class TaskTimeout(GreenqueueError):
    """A task ran past its own time limit (``@task(timeout=...)``) and was killed."""


class WaitTimeout(TaskTimeout):
    """``TaskResult.get(timeout)`` ran out before the task finished; the task itself goes on.

    It derives from TaskTimeout so code written when both were one error still catches it.
    """


class SoftTimeLimitExceeded(GreenqueueError):
    """Raised inside a task when its ``soft_timeout`` passes: clean up now, the hard ``timeout`` follows."""


class ChordError(GreenqueueError):
    """A chord's header member failed, so its body never ran (the message names the member)."""


class TaskExpired(GreenqueueError):
    """The task was not started before its ``expires`` time, so it never ran (state EXPIRED)."""


class Retry(GreenqueueError):
    """Raise from inside a task to run it again later: an attempt like any other, never logged as a failure.

    ``countdown`` seconds (default: the task's retry delay), ``exc`` the error to fail with when no
    attempt is left (default ``MaxRetriesExceeded``), ``max_retries`` this task's retries for the decision.
    """

    def __init__(self, message: str = "", countdown: Optional[float] = None, exc: Optional[BaseException] = None,
                 max_retries: Optional[int] = None) -> None:
        super().__init__(message or "retry requested")
        self.countdown = countdown
        self.exc = exc
        self.max_retries = max_retries


class MaxRetriesExceeded(GreenqueueError):
    """A task asked to retry (``raise Retry``) with no attempt left, and gave no error of its own."""


class CancelledError(GreenqueueError):
    """The task was cancelled before it could finish (the event is ``events.TaskCancelled``)."""


class WorkerError(GreenqueueError):
    """Base of the errors a process-pool call can end with."""


class RemoteError(WorkerError):
    """The worker's app raised; carries the remote type, message and traceback."""

    def __init__(self, message: str, remote_type: str = "Exception", remote_traceback: str = "") -> None:
        super().__init__(message)
        #: The remote exception's message, without its type name.
        self.remote_message = message
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return "%s: %s" % (self.remote_type, self.args[0] if self.args else "")


class WorkerCrashed(WorkerError):
    """The worker process died during the call; a new one is being started."""


class WorkerTimeout(WorkerError):
    """The call ran past the pool's timeout; the worker was killed and replaced."""


_WIRE_TYPES = {cls.__name__: cls for cls in (
    GreenqueueError, ConfigError, Overloaded, TaskTimeout, WaitTimeout, CancelledError,
    WorkerError, RemoteError, WorkerCrashed, WorkerTimeout)}


def to_dict(exc: BaseException, traceback_text: str = "") -> Dict[str, str]:
    """Describe an exception as a plain dict that can cross a process pipe."""
    cls = type(exc)
    name = cls.__name__ if cls.__module__ in ("builtins", __name__) else (
        "%s.%s" % (cls.__module__, cls.__qualname__))
    return {"type": name, "message": str(exc), "traceback": traceback_text}


def from_dict(data: Mapping[str, Any]) -> GreenqueueError:
    """Rebuild an error sent by :func:`to_dict`; foreign types become RemoteError."""
    cls = _WIRE_TYPES.get(data.get("type", ""))
    if cls is not None and cls is not RemoteError:
        return cls(data.get("message", ""))
    return RemoteError(data.get("message", ""), data.get("type", "Exception"),
                       data.get("traceback", ""))


class JournalError(GreenqueueError):
    """The task journal cannot be opened or written (names the file and what to do)."""


class UnknownPool(GreenqueueError, KeyError):
    """``procpool.get()`` was asked for a pool the server did not start."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_WIRE_TYPES["JournalError"] = JournalError
__all__ += ["JournalError", "UnknownPool"]

#: Exit statuses of the server's start-up failures.
EXIT_USAGE = 2
EXIT_STARTUP = 1


class StartupError(GreenqueueError):
    """A one-line, user-facing reason the server cannot start; ``status`` is the exit code."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


__all__ += ["StartupError", "EXIT_USAGE", "EXIT_STARTUP"]
