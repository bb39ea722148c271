"""The example site's URLs: the sign-up form, the task results page, the admin."""

from django.contrib import admin
from django.urls import path

from ..signup import views

urlpatterns = [
    path("", views.signup, name="signup"),
    path("results", views.results, name="results"),
    path("admin/", admin.site.urls),
]
