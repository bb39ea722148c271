"""The admin lists sign-ups."""

from django.contrib import admin

from .models import Signup

admin.site.register(Signup, list_display=("name", "email", "created", "welcome_task"))
