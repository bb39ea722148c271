"""DirtyApp, and loading an app class by its ``module:Class`` path (both sides of the pipe use these).

Concurrency model: plain definitions; the methods of a DirtyApp run in a
worker process, one call at a time.
"""

import traceback
from typing import Any, Dict, Type, Union

from ..errors import GreenqueueError, to_dict

__all__ = ["DirtyApp", "STREAM_CREDIT"]

#: Chunks a worker may send ahead of a stream's consumer before it waits for more credit.
#: Credit comes back in halves of the window, one wake-up of the worker each; with 16 a
#: stream of small chunks ran at 8 chunks per wake-up, as slow as waking a process is.
STREAM_CREDIT = 64


class DirtyApp:
    """Base class of apps that live in worker processes; public methods are the actions."""

    workers = 1
    timeout = 30.0
    max_requests = 0
    #: Seconds an idle worker keeps polling its pipe after answering a call before it sleeps
    #: (0 = never). Waking a sleeping process costs tens of microseconds, more than a short
    #: call; a worker polls only while calls arrive this close together, and only while
    #: polling workers (of all pools) plus the server fit in the CPU cores.
    idle_poll = 0.0002

    def init(self) -> None:
        """Called once in each worker process before its first call (load models here)."""

    def close(self) -> None:
        """Called once in each worker process when the pool stops it."""

    def __call__(self, action: str, *args: Any, **kwargs: Any) -> Any:
        """Run the method named ``action``; generator methods stream."""
        if not isinstance(action, str) or action.startswith("_") or action in ("init", "close"):
            raise AttributeError("%s has no public action %r" % (type(self).__name__, action))
        method = getattr(self, action, None)
        if not callable(method):
            raise AttributeError("%s has no action %r" % (type(self).__name__, action))
        return method(*args, **kwargs)


def _spec_of(app_or_path: Union[str, Type[DirtyApp]]) -> str:
    if isinstance(app_or_path, str):
        if ":" not in app_or_path:
            raise GreenqueueError("dirty app %r: expected MODULE:CLASS" % app_or_path)
        return app_or_path
    return "%s:%s" % (app_or_path.__module__, app_or_path.__qualname__)


def _load_class(spec: str) -> Type[DirtyApp]:
    # The one loader of user code: its errors point at the app's own line, in the parent and in a child.
    from .._startup import import_spec
    obj = import_spec(spec, "dirty app", "MODULE:CLASS")
    if not (isinstance(obj, type) and issubclass(obj, DirtyApp)):
        raise GreenqueueError("dirty app %s is not a DirtyApp subclass" % spec)
    return obj


def _error_dict(exc: BaseException) -> Dict[str, str]:
    return to_dict(exc, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


# -- the child process ------------------------------------------------------------------
