"""The contact_app example with a real SMTP server process (aiosmtpd) and a real Pillow worker."""

import io
import mailbox
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from .conftest import free_port, wait_for

pytestmark = pytest.mark.realproc

APP = "examples.contact_app.app:app"
THUMBS = "examples.contact_app.thumbs:ThumbnailApp"


class SMTPServer:
    """aiosmtpd in its own process, delivering into a Maildir the test reads."""

    def __init__(self, tmp_path, port=None):
        self.port = port or free_port()
        self.maildir = tmp_path / "maildir"
        self.proc = None

    def start(self):
        """Start aiosmtpd and wait until it accepts connections."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aiosmtpd", "-n", "-l", "127.0.0.1:%d" % self.port,
             "-c", "aiosmtpd.handlers.Mailbox", str(self.maildir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

        def up():
            """aiosmtpd is running and accepts a connection."""
            assert self.proc.poll() is None, "aiosmtpd exited"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_for(up, 15, message="aiosmtpd")
        return self

    def messages(self):
        """Every message delivered so far."""
        if not self.maildir.exists():
            return []
        box = mailbox.Maildir(str(self.maildir), create=False)
        return [box[key] for key in box.keys()]

    def body(self, msg):
        """A message's decoded text."""
        return msg.get_payload(decode=True).decode()

    def stop(self):
        """Stop aiosmtpd."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


@pytest.fixture
def smtp(tmp_path):
    """A running SMTP server for one test."""
    s = SMTPServer(tmp_path).start()
    yield s
    s.stop()


def contact_server(server_factory, tmp_path, smtp_port, *args, **env):
    """The contact app with its thumbnail pool, fast retries and ``env`` on top."""
    settings = {"CONTACT_SMTP_PORT": str(smtp_port), "CONTACT_ADMIN_EMAIL": "owner@example.com",
                "CONTACT_FOLLOWUP_DELAY": "0.5", "CONTACT_SMTP_RETRY_DELAY": "0.2",
                "CONTACT_UPLOAD_DIR": str(tmp_path / "uploads"), "CONTACT_SMTP_TIMEOUT": "5"}
    settings.update(env)
    return server_factory(APP, "--dirty-app", THUMBS, *args, env=settings)


def submit(srv, **fields):
    """POST the form (Ada's message unless ``fields`` say otherwise); redirects are not followed."""
    files = fields.pop("files", None)
    data = dict({"name": "Ada", "email": "ada@example.com", "message": "Hello from the form"}, **fields)
    return requests.post(srv.url + "/", data=data, files=files, allow_redirects=False, timeout=10)


def test_form_returns_at_once_and_the_email_and_follow_up_arrive(server_factory, tmp_path, smtp):
    srv = contact_server(server_factory, tmp_path, smtp.port)
    started = time.monotonic()
    r = submit(srv)
    assert r.status_code == 303 and time.monotonic() - started < 2
    wait_for(lambda: len(smtp.messages()) >= 2, 15, message="two emails")
    by_to = {m["To"]: m for m in smtp.messages()}
    owner = by_to["owner@example.com"]
    assert owner["Subject"] == "Contact form: message from Ada"
    assert "Hello from the form" in smtp.body(owner) and "ada@example.com" in smtp.body(owner)
    assert by_to["ada@example.com"]["Subject"] == "We got your message"
    state = requests.get(srv.url + r.headers["Location"] + ".json", timeout=5).json()
    assert state["email_state"] == "SUCCESS"


def test_mail_arrives_once_the_smtp_server_comes_up(server_factory, tmp_path):
    smtp = SMTPServer(tmp_path)
    srv = contact_server(server_factory, tmp_path, smtp.port, CONTACT_FOLLOWUP_DELAY="3600")
    location = submit(srv).headers["Location"]
    wait_for(lambda: requests.get(srv.url + location + ".json", timeout=5).json()["email_state"] == "RETRY", 10,
             message="the email task to retry while SMTP is down")
    smtp.start()
    try:
        wait_for(lambda: smtp.messages(), 30, message="the retried email")
        assert smtp.messages()[0]["To"] == "owner@example.com"
    finally:
        smtp.stop()


@pytest.mark.parametrize("fields, field, text", [
    ({"name": ""}, "name", "Please tell us your name."),
    ({"email": "not-an-email"}, "email", "Please enter an email address"),
    ({"message": ""}, "message", "Please write a message."),
    ({"message": "x" * 5001}, "message", "longer than 5000"),
])
def test_validation_messages(server_factory, tmp_path, smtp, fields, field, text):
    srv = contact_server(server_factory, tmp_path, smtp.port)
    r = submit(srv, **fields)
    assert r.status_code == 400
    assert 'id="error-%s"' % field in r.text and text in r.text
    assert smtp.messages() == []


def test_uploaded_image_gets_a_thumbnail_from_the_worker(server_factory, tmp_path, smtp):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (800, 400), (200, 30, 30)).save(buf, "PNG")
    srv = contact_server(server_factory, tmp_path, smtp.port)
    r = submit(srv, files={"image": ("red.png", buf.getvalue(), "image/png")})
    assert r.status_code == 303
    state = wait_for(lambda: (lambda s: s["thumbnail"] and s)(
        requests.get(srv.url + r.headers["Location"] + ".json", timeout=5).json()), 15, message="the thumbnail")
    assert state["thumbnail_size"] == [128, 64]
    assert (state["thumbnail_state"], state["thumbnail_error"]) == ("SUCCESS", None)
    thumb = requests.get(srv.url + state["thumbnail"], timeout=5)
    assert thumb.headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (128, 64)
    plain = submit(srv).headers["Location"]
    assert requests.get(srv.url + plain + ".json", timeout=5).json()["thumbnail_state"] is None


@pytest.mark.parametrize("name, content, mimetype", [
    ("notes.txt", b"hello", "text/plain"),
    ("photo.png", b"hello, I am not a picture", "image/png"),
    ("photo.jpg", b"", "image/jpeg"),
    ("archive.png", b"PK\x03\x04" + b"\0" * 64, "image/png"),
])
def test_an_upload_that_is_not_an_image_is_refused_on_the_form(server_factory, tmp_path, smtp, name, content,
                                                               mimetype):
    srv = contact_server(server_factory, tmp_path, smtp.port)
    r = submit(srv, files={"image": (name, content, mimetype)})
    assert r.status_code == 400
    assert 'id="error-image"' in r.text and "must be an image" in r.text
    assert 'value="Ada"' in r.text  # what was typed is kept
    assert not any((tmp_path / "uploads").iterdir()), "the refused upload was stored"
    assert smtp.messages() == []


def test_a_picture_that_does_not_decode_reports_a_failed_thumbnail(server_factory, tmp_path, smtp):
    # It starts like a PNG, so the form takes it; only the Pillow worker finds out.
    srv = contact_server(server_factory, tmp_path, smtp.port)
    r = submit(srv, files={"image": ("broken.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 50, "image/png")})
    assert r.status_code == 303
    url = srv.url + r.headers["Location"]
    state = wait_for(lambda: (lambda s: s["thumbnail_state"] != "PENDING" and s)(
        requests.get(url + ".json", timeout=5).json()), 15, message="the thumbnail task to end")
    assert state["thumbnail_state"] == "FAILURE" and state["thumbnail"] is None
    assert "could not make a thumbnail" in state["thumbnail_error"]
    page = requests.get(url, timeout=5).text
    assert "could not make a thumbnail" in page and "Making a thumbnail" not in page


def test_daily_digest_is_sent_on_its_schedule(server_factory, tmp_path, smtp):
    # Every two seconds instead of 18:00, so the test sees a run.
    srv = contact_server(server_factory, tmp_path, smtp.port, CONTACT_DIGEST_CRON="*/2 * * * * *",
                         CONTACT_FOLLOWUP_DELAY="3600")
    submit(srv)
    submit(srv, name="Grace", email="grace@example.com")
    wait_for(lambda: any(m["Subject"].startswith("Daily digest") and "2 message" in m["Subject"]
                         for m in smtp.messages()), 15, message="the digest")
    digest = next(m for m in smtp.messages() if m["Subject"].startswith("Daily digest: 2"))
    assert "Grace <grace@example.com>" in smtp.body(digest)


def test_a_full_task_queue_is_a_friendly_503(server_factory, tmp_path):
    # A tarpit SMTP server: it accepts connections and never says hello, so the one
    # running email task blocks and the next one waits in the (size-1) queue.
    tarpit = socket.socket()
    tarpit.bind(("127.0.0.1", 0))
    tarpit.listen(16)
    try:
        srv = contact_server(server_factory, tmp_path, tarpit.getsockname()[1], "--max-concurrency", "1",
                             "--max-pending", "1", CONTACT_SMTP_TIMEOUT="30", CONTACT_FOLLOWUP_DELAY="3600")
        assert submit(srv).status_code == 303
        assert submit(srv).status_code == 303
        r = submit(srv)
        assert r.status_code == 503 and r.headers["Retry-After"] == "30"
        assert "a little busy" in r.text and "Traceback" not in r.text
    finally:
        tarpit.close()
