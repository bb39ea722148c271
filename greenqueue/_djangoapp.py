"""What a Django project gets when greenqueue loads it: its apps' task modules, and connection clean-up.

Concurrency model: runs once, in the thread that loads the app, before any
task runs. The clean-up runs in each task's greenlet: Django opens a database
connection per thread, which under gevent is per greenlet, and only its
request cycle closes them; each task attempt does what a request does
(``close_old_connections`` when it starts and when it ends).
"""

import types
from typing import Any

from . import events

__all__ = ["prepare"]

_ATTEMPT_EVENTS = (events.TaskStarted, events.TaskSucceeded, events.TaskFailed, events.TaskRetrying,
                   events.TaskCancelled)
_installed = False


def prepare(loaded: Any) -> bool:
    """If ``loaded`` (the app, or a worker's module) is a Django project's: import its apps' ``tasks`` modules
    and close tasks' connections as requests do. True when it was one."""
    global _installed
    handler = getattr(loaded, "application", None) if isinstance(loaded, types.ModuleType) else loaded
    # Middleware such as WhiteNoise's or Sentry's wraps Django's handler: look a few layers in.
    for _ in range(4):
        if handler is None or type(handler).__module__.startswith("django."):
            break
        handler = next((getattr(handler, a) for a in ("application", "app", "wsgi_app") if hasattr(handler, a)), None)
    if handler is None or not type(handler).__module__.startswith("django."):
        return False
    from django.utils.module_loading import autodiscover_modules
    # As Django's own autodiscovery: a node knows every task before it claims one.
    autodiscover_modules("tasks")
    if not _installed:
        events.subscribe(_close_old_connections, *_ATTEMPT_EVENTS)
        _installed = True
    return True


def _close_old_connections(event: Any) -> None:
    if getattr(event.result, "name", None) == "greenqueue.django.run":
        return  # the Django backend's runs close their own, around the task itself
    from django.db import close_old_connections
    close_old_connections()
