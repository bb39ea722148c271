"""The example's own tests, with Django's test client (``python examples/django_app/manage.py test``)."""

from django.core import mail
from django.test import TestCase, override_settings

from greenqueue import testing

from .models import Signup
from .tasks import daily_digest


@override_settings(EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend")
class SignupTests(TestCase):
    def test_the_form_saves_the_signup_and_its_task_sends_the_welcome(self):
        with testing.eager():  # the task runs inline, so its email is in the outbox at once
            response = self.client.post("/", {"name": "Ada", "email": "ada@example.com"})
        self.assertRedirects(response, "/results")
        person = Signup.objects.get()
        self.assertTrue(person.welcome_task)
        self.assertEqual([m.to for m in mail.outbox], [["ada@example.com"]])
        self.assertIn("Welcome, Ada", mail.outbox[0].subject)

    def test_a_bad_email_is_refused_and_nothing_is_enqueued(self):
        response = self.client.post("/", {"name": "Bob", "email": "not-an-address"})
        self.assertEqual(response.status_code, 200)
        self.assertFalse(Signup.objects.exists())

    def test_the_results_page_lists_signups(self):
        Signup.objects.create(name="Cy", email="cy@example.com")
        self.assertContains(self.client.get("/results"), "cy@example.com")

    def test_the_digest_counts_the_days_signups(self):
        Signup.objects.create(name="Di", email="di@example.com")
        self.assertEqual(daily_digest(), 1)
        self.assertEqual(mail.outbox[-1].subject, "Sign-ups today: 1")
