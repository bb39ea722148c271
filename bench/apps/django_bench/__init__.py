"""The Django project of bench_django: one view that enqueues one task per request.

``BENCH_DJANGO_QUEUE`` picks the task queue and nothing else: ``greenqueue``
(Django's task framework on greenqueue.django.GreenqueueBackend, run by the
node serving the project) or ``celery`` (a ``@shared_task`` sent to a Celery
worker through Redis, the usual Django stack). Each stack's processes import
only their own queue's modules, so neither's memory carries the other's.
"""
