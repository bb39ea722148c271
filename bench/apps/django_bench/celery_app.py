"""The Celery app of the Celery stack, set up as Celery's "First steps with Django" guide does.

``celery -A bench.apps.django_bench.celery_app worker`` runs it; Celery's
Django fix-up calls django.setup() in the worker.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.apps.django_bench.settings")
app = Celery("django_bench", include=["bench.apps.django_bench.celery_tasks"])
app.config_from_object("django.conf:settings", namespace="CELERY")
