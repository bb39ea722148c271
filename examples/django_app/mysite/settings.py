"""The example site's settings: its tasks run on greenqueue, its mail goes to an SMTP server.

Environment: DATABASE_URL (postgresql://...; default: an SQLite file here),
EMAIL_HOST / EMAIL_PORT (SMTP; without them mail is printed), DIGEST_TO (who gets the digest).
"""

import os
from pathlib import Path
from urllib.parse import urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = os.environ.get("SECRET_KEY", "example-only-change-me")
DEBUG = os.environ.get("DEBUG", "") == "1"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "examples.django_app.mysite.urls"
WSGI_APPLICATION = "examples.django_app.mysite.wsgi.application"
USE_TZ = True
STATIC_URL = "static/"

INSTALLED_APPS = [
    "django.contrib.admin", "django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions",
    "django.contrib.messages", "django.contrib.staticfiles", "examples.django_app.signup",
]
try:
    import django.tasks  # noqa: F401  (Django 6: the task framework is Django's own)
except ImportError:
    INSTALLED_APPS.append("django_tasks")  # Django 5.2: the backport

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware", "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware", "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware", "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True, "DIRS": [],
              "OPTIONS": {"context_processors": ["django.template.context_processors.request",
                                                 "django.contrib.auth.context_processors.auth",
                                                 "django.contrib.messages.context_processors.messages"]}}]

if os.environ.get("DATABASE_URL", "").startswith("postgres"):
    url = urlsplit(os.environ["DATABASE_URL"])
    DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": url.path.lstrip("/"),
                             "USER": url.username or "", "PASSWORD": url.password or "",
                             "HOST": url.hostname or "", "PORT": url.port or ""}}
else:
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(BASE_DIR / "site.db")}}

# Django's own task framework, run by greenqueue in the server process.
TASKS = {"default": {"BACKEND": "greenqueue.django.GreenqueueBackend"}}

# Without EMAIL_HOST, mail is printed to the server's log (the demo); with it, sent over SMTP.
EMAIL_BACKEND = ("django.core.mail.backends.smtp.EmailBackend" if os.environ.get("EMAIL_HOST")
                 else "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", "1025"))
DEFAULT_FROM_EMAIL = "welcome@example.com"
DIGEST_TO = os.environ.get("DIGEST_TO", "team@example.com")
