"""A sign-up, and the id of the task that sends its welcome email."""

from django.db import models


class Signup(models.Model):
    """Someone who signed up."""

    name = models.CharField(max_length=100)
    email = models.EmailField()
    created = models.DateTimeField(auto_now_add=True)
    welcome_task = models.CharField(max_length=64, blank=True)

    def __str__(self):
        return "%s <%s>" % (self.name, self.email)
