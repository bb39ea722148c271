"""``python -m greenqueue.server examples.django_app.mysite.wsgi:application`` serves the site and runs its tasks."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.mysite.settings")
application = get_wsgi_application()
