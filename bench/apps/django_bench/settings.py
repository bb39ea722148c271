"""Settings of the bench project; the queue comes from BENCH_DJANGO_QUEUE (see the package docstring).

Environment: BENCH_DJANGO_DB (Django's own SQLite file; the view does no
database work), BENCH_REDIS_URL (the Celery stack's broker and result backend).
"""

import os

QUEUE = os.environ.get("BENCH_DJANGO_QUEUE", "greenqueue")
if QUEUE not in ("greenqueue", "celery"):
    raise ValueError("BENCH_DJANGO_QUEUE must be greenqueue or celery, not %r" % QUEUE)

SECRET_KEY = "greenqueue-bench-only"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "bench.apps.django_bench.urls"
WSGI_APPLICATION = "bench.apps.django_bench.wsgi.application"
INSTALLED_APPS = ["bench.apps.django_bench"]
# What a project keeps of startproject's list that touches no database on a GET.
MIDDLEWARE = ["django.middleware.security.SecurityMiddleware", "django.middleware.common.CommonMiddleware"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                         "NAME": os.environ.get("BENCH_DJANGO_DB", "django-bench.db")}}

if QUEUE == "greenqueue":
    try:
        import django.tasks  # noqa: F401  (Django 6: the framework is Django's own)
    except ImportError:
        INSTALLED_APPS.append("django_tasks")
    TASKS = {"default": {"BACKEND": "greenqueue.django.GreenqueueBackend"}}
else:
    # Read by celery_app through config_from_object(namespace="CELERY"), as Celery's Django guide does.
    CELERY_BROKER_URL = CELERY_RESULT_BACKEND = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    # The rest as bench_cluster's Celery app, for the same reasons (see bench/apps/cluster_celery.py):
    # acknowledged after the run (greenqueue's at-least-once), one result backend for all greenlets,
    # and the prefetch that drained fastest there.
    CELERY_TASK_ACKS_LATE = True
    CELERY_RESULT_BACKEND_THREAD_SAFE = True
    CELERY_WORKER_PREFETCH_MULTIPLIER = 64
    CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
