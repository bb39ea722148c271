"""The site's background work: a welcome email per sign-up (Django's task framework), a digest (greenqueue's scheduler)."""

from django.conf import settings
from django.core.mail import send_mail
from django.utils import timezone

from greenqueue import every, periodic

try:
    from django.tasks import task
except ImportError:  # Django 5.2 with the django-tasks backport
    from django_tasks import task


@task()
def send_welcome(email: str, name: str) -> str:
    """Email a new user; returns the address written to."""
    send_mail("Welcome, %s" % name, "Thanks for signing up, %s." % name, None, [email])
    return email


@periodic(every(hours=24))
def daily_digest() -> int:
    """Email the team how many people signed up in the last day; returns that number."""
    from .models import Signup
    since = timezone.now() - timezone.timedelta(days=1)
    count = Signup.objects.filter(created__gte=since).count()
    send_mail("Sign-ups today: %d" % count, "%d people signed up in the last 24 hours." % count, None,
              [settings.DIGEST_TO])
    return count
