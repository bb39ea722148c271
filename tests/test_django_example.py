"""examples/django_app: its own Django test-client tests, and the site as a real server with real SMTP and PostgreSQL."""

import os
import re
import subprocess
import sys

import pytest
import requests

from .conftest import ROOT, wait_for
from .test_contact_app import SMTPServer

pytest.importorskip("django")

pytestmark = [pytest.mark.realproc, pytest.mark.slow]

APP = "examples.django_app.mysite.wsgi:application"
# Named outright: this process may have set up another Django project for other tests.
SETTINGS = {"DJANGO_SETTINGS_MODULE": "examples.django_app.mysite.settings"}
MANAGE = str(ROOT / "examples" / "django_app" / "manage.py")


def test_the_examples_own_tests_pass_with_djangos_test_client(tmp_path):
    env = dict(os.environ, DATABASE_URL="", **SETTINGS)
    run = subprocess.run([sys.executable, MANAGE, "test", "examples.django_app.signup", "-v", "1"], cwd=str(ROOT),
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "OK" in run.stderr


@pytest.mark.postgres
def test_a_signup_on_the_real_site_sends_its_welcome_through_a_task(server_factory, pg_dsn, tmp_path):
    smtp = SMTPServer(tmp_path).start()
    env = dict(SETTINGS, DATABASE_URL=pg_dsn, EMAIL_HOST="127.0.0.1", EMAIL_PORT=str(smtp.port))
    try:
        migrate = subprocess.run([sys.executable, MANAGE, "migrate", "--noinput", "-v", "0"], cwd=str(ROOT),
                                 env=dict(os.environ, **env), capture_output=True, text=True, timeout=120)
        assert migrate.returncode == 0, migrate.stderr
        srv = server_factory(APP, "--journal", pg_dsn, env=env)
        session = requests.Session()
        form = session.get(srv.url + "/", timeout=10)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text).group(1)
        done = session.post(srv.url + "/", data={"name": "Ada", "email": "ada@example.com",
                                                 "csrfmiddlewaretoken": token},
                            headers={"Referer": srv.url + "/"}, timeout=10)
        assert done.status_code == 200 and done.url.endswith("/results")
        wait_for(lambda: smtp.messages() or None, 20, message="the welcome email")
        msg = smtp.messages()[0]
        assert msg["To"] == "ada@example.com" and msg["Subject"] == "Welcome, Ada"
        wait_for(lambda: "SUCCESSFUL" in session.get(srv.url + "/results", timeout=10).text or None, 20,
                 message="the results page to show the task's success")
        assert session.get(srv.url + "/admin/login/", timeout=10).status_code == 200
    finally:
        smtp.stop()
