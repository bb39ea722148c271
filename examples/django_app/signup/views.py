"""The sign-up form (its welcome email is a task) and the page of recent task results."""

from django import forms
from django.shortcuts import redirect, render

from .models import Signup
from .tasks import send_welcome


class SignupForm(forms.Form):
    """Name and email."""

    name = forms.CharField(max_length=100)
    email = forms.EmailField()


def signup(request):
    """Show the form; on a valid post, save the sign-up and enqueue its welcome email."""
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        person = Signup.objects.create(**form.cleaned_data)
        result = send_welcome.enqueue(person.email, person.name)
        Signup.objects.filter(pk=person.pk).update(welcome_task=result.id)
        return redirect("results")
    return render(request, "signup/form.html", {"form": form})


def results(request):
    """The latest sign-ups and where their welcome email stands (from any node, after restarts too)."""
    rows = []
    for person in Signup.objects.order_by("-created")[:20]:
        status = "-"
        if person.welcome_task:
            try:
                status = send_welcome.get_result(person.welcome_task).status
            except Exception:  # pruned after the result TTL
                status = "gone"
        rows.append({"person": person, "status": status})
    return render(request, "signup/results.html", {"rows": rows})
