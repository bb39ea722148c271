"""The sign-up app."""

from django.apps import AppConfig


class SignupConfig(AppConfig):
    """Sign-ups, their welcome emails and the daily digest."""

    name = "examples.django_app.signup"
    label = "signup"
    default_auto_field = "django.db.models.BigAutoField"
