"""The test site's URLs."""

from django.urls import path

from . import views

urlpatterns = [
    path("enqueue", views.enqueue),
    path("tx", views.in_transaction),
    path("result/<str:result_id>", views.result),
]
