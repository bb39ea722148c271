"""A small Django project for the backend tests: its tasks run on greenqueue.

Environment: DJANGO_DB (an SQLite file; default in the working directory) or
DJANGO_PG (a postgresql:// URL for Django's own database).
"""

import os
from urllib.parse import urlsplit

SECRET_KEY = "greenqueue-tests-only"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.django_site.urls"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "tests.django_site"]
try:
    import django.tasks  # noqa: F401  (Django 6: the framework is Django's own)
except ImportError:
    INSTALLED_APPS.append("django_tasks")

if os.environ.get("DJANGO_PG"):
    url = urlsplit(os.environ["DJANGO_PG"])
    DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": url.path.lstrip("/"),
                             "USER": url.username, "HOST": url.hostname, "PORT": url.port,
                             # Tells Django's connections from the journal's in pg_stat_activity.
                             "OPTIONS": {"application_name": "django-site"}}}
else:
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                             "NAME": os.environ.get("DJANGO_DB", "django-tests.db")}}

TASKS = {"default": {"BACKEND": "greenqueue.django.GreenqueueBackend", "QUEUES": []},
         # Writes the task in Django's own transaction (PostgreSQL: the journal is Django's database).
         "tx": {"BACKEND": "greenqueue.django.GreenqueueBackend", "QUEUES": [], "OPTIONS": {"transactional": True}}}
