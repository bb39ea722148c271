"""The view: enqueue one task per request through the queue the settings name."""

import itertools

from django.conf import settings
from django.http import HttpResponse

if settings.QUEUE == "celery":
    # The app first, so the shared task binds to it (Celery's guide imports it in the project's __init__).
    from .celery_app import app as celery_app  # noqa: F401
    from .celery_tasks import noop

    send = noop.delay
else:
    from .tasks import noop

    send = noop.enqueue

_ids = itertools.count()


def enqueue(request):
    """Enqueue one no-op task; no database work, so only the task queue differs between the stacks."""
    send(next(_ids))
    return HttpResponse("enqueued")
