"""The bench project's WSGI application (greenqueue.server or gunicorn serve ``...wsgi:application``)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.apps.django_bench.settings")
application = get_wsgi_application()
