"""A backend for Django's own task framework (``django.tasks``, or the ``django-tasks`` backport).

``TASKS = {"default": {"BACKEND": "greenqueue.django.GreenqueueBackend"}}``:
``my_task.enqueue(...)`` becomes a greenqueue task run by the server (or
``python -m greenqueue.worker mysite.wsgi``), with priority, queues,
``run_after`` and results by id; with a journal the results outlive restarts
and any node runs the tasks.

Concurrency model: ``enqueue`` and ``get_result`` are called from request
threads or greenlets and go through the default runner (which hands calls
over to its hub). A run is an attempt of the one greenqueue task
``greenqueue.django.run``, which imports the Django task by its module path,
as Django's database backends do. Django opens a database connection per
thread, which under gevent is per greenlet: every attempt closes its
connections as the request cycle does (``close_old_connections`` before and
after), so tasks never leak connections.
"""

import collections
import dataclasses
import datetime
import logging
import sys
import traceback
from typing import Any, Dict, List, Optional, Tuple

from .errors import GreenqueueError, RemoteError
from .tasks import TaskResult, get_runner, task

try:  # Django 6
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import (Task as DjangoTask, TaskContext, TaskError, TaskResult as DjangoResult,
                                   TaskResultStatus)
    from django.tasks.exceptions import TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started
    FRAMEWORK = "django.tasks"
except ImportError:  # Django 5.2 with the django-tasks backport
    from django_tasks.backends.base import BaseTaskBackend  # type: ignore[no-redef]
    from django_tasks.base import (Task as DjangoTask, TaskContext, TaskError,  # type: ignore[no-redef]
                                   TaskResult as DjangoResult, TaskResultStatus)
    from django_tasks.exceptions import TaskResultDoesNotExist  # type: ignore[no-redef]
    from django_tasks.signals import task_enqueued, task_finished, task_started  # type: ignore[no-redef]
    FRAMEWORK = "django_tasks"

from django.utils.module_loading import import_string

__all__ = ["GreenqueueBackend", "run", "FRAMEWORK"]

log = logging.getLogger(__name__)

#: The greenqueue task every Django task runs as.
RUN = "greenqueue.django.run"
# Without a journal a finished run keeps no arguments; what get_result() needs of them is kept
# here, as many as the runner keeps results.
_ARGS: "collections.OrderedDict[str, Tuple[str, list, dict, str]]" = collections.OrderedDict()
_UTC = datetime.timezone.utc


def _close_old_connections() -> None:
    from django.db import close_old_connections
    close_old_connections()


@task(name=RUN)
def run(path: str, args: list, kwargs: dict, takes_context: bool = False, backend: str = "default") -> Any:
    """Run the Django task at ``path`` with its arguments, between the connection clean-ups of a request.

    Sends Django's ``task_started`` and ``task_finished`` signals (its log lines come from them).
    """
    django_task = import_string(path)
    me = get_runner().current()
    result = _as_django(django_task, me, path, args, kwargs, backend) if me is not None else None
    if result is not None:
        task_started.send(sender=GreenqueueBackend, task_result=result)
    _close_old_connections()
    try:
        try:
            if takes_context:
                value = django_task.call(TaskContext(task_result=result), *args, **kwargs)
            else:
                value = django_task.call(*args, **kwargs)
        except SystemExit as exit:
            # A task that exits fails, as under Django's own backends; the server goes on.
            raise RemoteError(str(exit), "SystemExit", _traceback(exit)) from None
        value = _normalized(value)
    except BaseException:
        if result is not None:
            # Inside the handler, so the signal's log line carries the traceback (as Django's own).
            exc = sys.exc_info()[1]
            assert exc is not None
            failed = dataclasses.replace(result, status=TaskResultStatus.FAILED, finished_at=_now(), errors=[
                TaskError(exception_class_path=_class_path(exc), traceback=_traceback(exc))])
            task_finished.send(sender=GreenqueueBackend, task_result=failed)
        raise
    finally:
        _close_old_connections()
    if result is not None:
        done = dataclasses.replace(result, status=TaskResultStatus.SUCCESSFUL, finished_at=_now())
        object.__setattr__(done, "_return_value", value)
        task_finished.send(sender=GreenqueueBackend, task_result=done)
    return value


def _now() -> datetime.datetime:
    return datetime.datetime.now(_UTC)


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


class GreenqueueBackend(BaseTaskBackend):
    """Django's task backend contract on greenqueue: defer, priority and results by id, on every store."""

    supports_defer = True
    supports_priority = True
    supports_get_result = True
    supports_async_task = False

    def __init__(self, alias: str, params: dict) -> None:
        super().__init__(alias, params)
        #: Write the task in Django's own transaction (PostgreSQL, the journal in Django's database).
        self.transactional = bool(self.options.get("transactional", False))

    def enqueue(self, task: DjangoTask, args: Any, kwargs: Any) -> DjangoResult:
        """Spawn ``task(*args, **kwargs)`` as a greenqueue task; its TaskResult, READY."""
        self.validate_task(task)
        args, kwargs = list(args), dict(kwargs)
        options: Dict[str, Any] = {"queue": task.queue_name, "priority": task.priority}
        if self.transactional:
            options["connection"] = _django_connection()
        try:
            r = run.apply_async((task.module_path, args, kwargs, task.takes_context, self.alias),
                                eta=task.run_after, **options)
        except GreenqueueError as exc:
            raise _invalid()(str(exc)) from exc
        _remember(r.id, task.module_path, args, kwargs, self.alias)
        result = _as_django(task, r, task.module_path, args, kwargs, self.alias)
        task_enqueued.send(sender=type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> DjangoResult:
        """The TaskResult with this id, from any node (ResultDoesNotExist when there is none)."""
        r = get_runner().result(result_id)
        found = _arguments(result_id)
        if r is None or r.name != RUN or found is None:
            raise TaskResultDoesNotExist(result_id)
        path, args, kwargs, alias = found
        return _as_django(import_string(path), r, path, args, kwargs, alias)


def _as_django(django_task: Any, r: TaskResult[Any], path: str, args: list, kwargs: dict,
               alias: str) -> DjangoResult:
    """Django's view of greenqueue's result ``r``."""
    status = _STATUS.get(r.state, TaskResultStatus.READY)
    attempts = 0 if status == TaskResultStatus.READY else r.retries + 1
    errors: List[Any] = []
    if r.state in ("FAILURE", "CANCELLED", "EXPIRED") and r.exception is not None:
        errors.append(TaskError(exception_class_path=_class_path(r.exception), traceback=r.traceback or ""))
    node = get_runner().store.node
    result = DjangoResult(
        task=django_task, id=r.id, status=status, enqueued_at=_enqueued_at(r.id),
        started_at=r.started_at, finished_at=r.finished_at, last_attempted_at=r.started_at,
        args=args, kwargs=kwargs, backend=alias, errors=errors, worker_ids=[node] * attempts)
    if status == TaskResultStatus.SUCCESSFUL:
        object.__setattr__(result, "_return_value", r.result)
    return result


_STATUS = {"PENDING": TaskResultStatus.READY, "SCHEDULED": TaskResultStatus.READY,
           "STARTED": TaskResultStatus.RUNNING, "RETRY": TaskResultStatus.RUNNING,
           "SUCCESS": TaskResultStatus.SUCCESSFUL, "FAILURE": TaskResultStatus.FAILED,
           "CANCELLED": TaskResultStatus.FAILED, "EXPIRED": TaskResultStatus.FAILED}


def _class_path(exc: BaseException) -> str:
    """Django's ``exception_class_path``: the class's module and name, as the failure recorded it."""
    name = getattr(exc, "remote_type", None)
    if name is None:
        cls = type(exc)
        return "%s.%s" % (cls.__module__, cls.__qualname__)
    if "." in name:
        return str(name)
    import builtins
    return ("builtins." if hasattr(builtins, name) else "greenqueue.errors.") + name


def _enqueued_at(task_id: str) -> Optional[datetime.datetime]:
    """When the task was spawned: a greenqueue id begins with its creation time in milliseconds."""
    try:
        return datetime.datetime.fromtimestamp(int(task_id[:12], 16) / 1000.0, _UTC)
    except ValueError:
        return None


def _remember(task_id: str, path: str, args: list, kwargs: dict, alias: str) -> None:
    if get_runner().store.durable:
        return  # the row keeps them
    _ARGS[task_id] = (path, args, kwargs, alias)
    while len(_ARGS) > get_runner().max_results:
        _ARGS.popitem(last=False)


def _arguments(task_id: str) -> Optional[Tuple[str, list, dict, str]]:
    """The Django task path, arguments and backend alias a run was enqueued with."""
    found = _ARGS.get(task_id)
    if found is not None:
        return found
    stored = get_runner().arguments(task_id)
    if stored is None or len(stored[0]) < 3:
        return None
    args = stored[0]
    return str(args[0]), list(args[1]), dict(args[2]), str(args[4]) if len(args) > 4 else "default"


try:  # Django 6's, else the backport's: looked up once (a failed import is not cached, and costs each run)
    from django.utils.json import normalize_json as _normalize_json
except ImportError:
    from django_tasks.utils import normalize_json as _normalize_json  # type: ignore[no-redef]


def _normalized(value: Any) -> Any:
    """A return value as Django keeps it (JSON types)."""
    return _normalize_json(value)


def _invalid() -> type:
    try:
        from django.tasks.exceptions import InvalidTask
        return InvalidTask
    except ImportError:
        from django_tasks.exceptions import InvalidTaskError
        return InvalidTaskError  # type: ignore[no-any-return]


def _django_connection() -> Any:
    """Django's default connection's psycopg connection, for a spawn in its transaction."""
    from django.db import connection
    connection.ensure_connection()
    return connection.connection
