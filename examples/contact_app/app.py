"""The contact_app example: the form returns at once; email, follow-up, digest and thumbnails happen in the background.

Run it (SMTP settings from the environment, see README.md):
    python -m greenqueue.server --dirty-app examples.contact_app.thumbs:ThumbnailApp \
        examples.contact_app.app:app
"""

import datetime
import itertools
import os
import re
import smtplib
import ssl
from email.message import EmailMessage

from flask import Flask, abort, jsonify, redirect, render_template, request, send_file, url_for

import greenqueue
from greenqueue import Overloaded, WorkerError, crontab, periodic, procpool, spawn_idle, task

THUMBS = "examples.contact_app.thumbs:ThumbnailApp"
MAX_MESSAGE = 5000
MAX_UPLOAD = 5 * 1024 * 1024
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
IMAGE_ERROR = "The attachment must be an image (PNG, JPEG, GIF or WebP)."


def setting(name, default):
    """A CONTACT_* environment setting."""
    return os.environ.get("CONTACT_" + name, default)


app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD + 64 * 1024
UPLOADS = setting("UPLOAD_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "uploads"))
os.makedirs(UPLOADS, exist_ok=True)

#: Messages received, newest last (a real site would use its database).
messages = []
_ids = itertools.count(1)


# -- email ---------------------------------------------------------------------------------

def send_mail(to, subject, body):
    """Send one email over SMTP with the CONTACT_SMTP_* settings (STARTTLS when asked)."""
    msg = EmailMessage()
    msg["From"] = setting("FROM", "website@example.com")
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    host, port = setting("SMTP_HOST", "127.0.0.1"), int(setting("SMTP_PORT", "25"))
    with smtplib.SMTP(host, port, timeout=float(setting("SMTP_TIMEOUT", "10"))) as smtp:
        if setting("SMTP_STARTTLS", "") in ("1", "true", "yes"):
            smtp.starttls(context=ssl.create_default_context())
        user = setting("SMTP_USER", "")
        if user:
            smtp.login(user, setting("SMTP_PASSWORD", ""))
        smtp.send_message(msg)


RETRIES = int(setting("SMTP_RETRIES", "8"))
RETRY_DELAY = float(setting("SMTP_RETRY_DELAY", "2"))


@task(retries=RETRIES, retry_delay=RETRY_DELAY, retry_backoff=2.0, retry_jitter=RETRY_DELAY / 4, timeout=60)
def send_contact_email(message_id):
    """Email the site owner about a new message (retried with backoff while SMTP is down)."""
    m = _get(message_id)
    send_mail(setting("ADMIN_EMAIL", "admin@example.com"), "Contact form: message from %s" % m["name"],
              "From: %s <%s>\n\n%s\n" % (m["name"], m["email"], m["message"]))
    m["emailed"] = True
    return "sent"


@task(retries=RETRIES, retry_delay=RETRY_DELAY, retry_backoff=2.0, timeout=60)
def send_followup(message_id):
    """Tell the sender we got their message."""
    m = _get(message_id)
    send_mail(m["email"], "We got your message",
              "Hi %s,\n\nthanks for writing; we read every message and will answer soon.\n" % m["name"])
    return "sent"


@periodic(crontab(setting("DIGEST_CRON", "0 18 * * *")), timezone=setting("TIMEZONE", "Europe/Berlin"),
          retries=3, retry_delay=30)
def daily_digest():
    """Email the day's messages to the site owner in one digest."""
    since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    today = [m for m in messages if m["received"] >= since]
    if not today:
        return 0
    lines = ["%s <%s>: %s" % (m["name"], m["email"], m["message"][:200]) for m in today]
    send_mail(setting("ADMIN_EMAIL", "admin@example.com"), "Daily digest: %d message(s)" % len(today),
              "\n".join(lines) + "\n")
    return len(today)


# -- thumbnails ----------------------------------------------------------------------------------

def make_thumbnail(message_id):
    """Ask the Pillow worker for a thumbnail; runs as an idle task so page views come first."""
    m = _get(message_id)
    dst = os.path.join(UPLOADS, "%d-thumb.jpg" % message_id)
    try:
        m["thumb_size"] = procpool.get(THUMBS).call("thumbnail", m["upload"], dst, 128)
    except WorkerError as exc:
        # A picture that starts like an image but does not decode gets this far; the thanks
        # page stops waiting and says so, and the task shows as failed on the dashboard.
        m["thumb_error"] = "We could not make a thumbnail of your picture; the file may be damaged."
        app.logger.warning("thumbnail of message %d failed: %s", message_id, exc)
        raise
    m["thumb"] = dst


def _thumb_state(m):
    if not m["upload"]:
        return None
    if m["thumb"]:
        return "SUCCESS"
    return "FAILURE" if m.get("thumb_error") else "PENDING"


def _looks_like_image(upload):
    """True when the upload starts with a PNG, JPEG, GIF or WebP signature (whatever its name and type say)."""
    head = upload.stream.read(12)
    upload.stream.seek(0)
    return (head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a"))
            or head[:4] == b"RIFF" and head[8:12] == b"WEBP")


# -- views ---------------------------------------------------------------------------------------

def _get(message_id):
    for m in messages:
        if m["id"] == message_id:
            return m
    raise KeyError(message_id)


def _validate(form, upload):
    errors = {}
    name = form.get("name", "").strip()
    email = form.get("email", "").strip()
    text = form.get("message", "").strip()
    if not name:
        errors["name"] = "Please tell us your name."
    elif len(name) > 100:
        errors["name"] = "Your name is longer than 100 characters."
    if not EMAIL_RE.match(email):
        errors["email"] = "Please enter an email address like you@example.com."
    if not text:
        errors["message"] = "Please write a message."
    elif len(text) > MAX_MESSAGE:
        errors["message"] = "Your message is longer than %d characters." % MAX_MESSAGE
    if upload is not None and upload.filename and not (
            (upload.mimetype or "").startswith("image/") and _looks_like_image(upload)):
        errors["image"] = IMAGE_ERROR
    return errors, {"name": name, "email": email, "message": text}


@app.get("/")
def form():
    """The empty contact form."""
    return render_template("contact.html", errors={}, values={})


@app.post("/")
def submit():
    """Validate and store a message, start its email and thumbnail in the background, redirect."""
    upload = request.files.get("image")
    errors, values = _validate(request.form, upload)
    if errors:
        return render_template("contact.html", errors=errors, values=values), 400
    m = dict(values, id=next(_ids), received=datetime.datetime.now(datetime.timezone.utc), emailed=False,
             upload=None, thumb=None, thumb_error=None)
    messages.append(m)
    try:
        m["email_task"] = send_contact_email.spawn(m["id"]).id
        send_followup.spawn_later(float(setting("FOLLOWUP_DELAY", "3600")), m["id"])
    except Overloaded:
        messages.remove(m)
        return render_template("busy.html"), 503, {"Retry-After": "30"}
    if upload is not None and upload.filename:
        path = os.path.join(UPLOADS, "%d-upload" % m["id"])
        upload.save(path)
        m["upload"] = path
        spawn_idle(make_thumbnail, m["id"])
    return redirect(url_for("message", message_id=m["id"]), code=303)


@app.errorhandler(Overloaded)
def busy(exc):
    """The task queue is full: a friendly page and Retry-After."""
    return render_template("busy.html"), 503, {"Retry-After": "30"}


@app.errorhandler(413)
def too_large(exc):
    """An upload over the limit: the form again, with a message."""
    # The form cannot be read back (it was too large), so the user retypes it; say so.
    return render_template("contact.html", errors={"image": "The upload is larger than 5 MB; please pick a "
                                                   "smaller picture and type your message again."},
                           values={}), 413


@app.get("/messages/<int:message_id>")
def message(message_id):
    """The thanks page, which follows the email and the thumbnail."""
    m = _find(message_id)
    return render_template("thanks.html", m=m, email_state=_email_state(m), thumb_state=_thumb_state(m))


@app.get("/messages/<int:message_id>.json")
def message_json(message_id):
    """Where the email and the thumbnail of a message are."""
    m = _find(message_id)
    return jsonify(id=m["id"], email_state=_email_state(m), emailed=m["emailed"],
                   thumbnail=url_for("thumbnail", message_id=m["id"]) if m["thumb"] else None,
                   thumbnail_size=m.get("thumb_size"), thumbnail_state=_thumb_state(m),
                   thumbnail_error=m["thumb_error"])


@app.get("/messages/<int:message_id>/thumbnail.jpg")
def thumbnail(message_id):
    """The thumbnail of a message's picture."""
    m = _find(message_id)
    if not m["thumb"]:
        abort(404)
    return send_file(m["thumb"], mimetype="image/jpeg")


def _find(message_id):
    try:
        return _get(message_id)
    except KeyError:
        abort(404)


def _email_state(m):
    r = greenqueue.result(m.get("email_task", ""))
    return r.state if r is not None else ("SUCCESS" if m["emailed"] else "UNKNOWN")
