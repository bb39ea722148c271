"""The test site's WSGI application (``python -m greenqueue.server tests.django_site.wsgi:application``)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_site.settings")
application = get_wsgi_application()
