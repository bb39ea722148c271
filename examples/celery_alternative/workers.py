"""The four stateful workers of gunicorn's celery_alternative example, doing the work for real.

Concurrency model: each class runs in its own pool of worker processes
(``--dirty-app``); a worker handles one call at a time and keeps its state
(an SMTP connection, Pillow, an open SQLite connection) between calls.
Generator actions stream progress dicts to the web process as they happen.

The pool sends each call to its least busy worker, so two calls in a row
usually land on different processes. Counters and the query cache therefore
live in one small SQLite file shared by the workers of one server process
(``CELERYALT_STATE_DIR``, default the system temp directory), so ``stats``
and a cache hit do not depend on which worker answered.

The action names, arguments and result fields are gunicorn's; extra fields
(the resized image, real message ids, what a cleanup removed) sit beside them.
"""

import base64
import binascii
import datetime
import hashlib
import io
import json
import os
import smtplib
import sqlite3
import stat
import tempfile
import time
from email.message import EmailMessage
from email.utils import make_msgid

from greenqueue import DirtyApp

MAX_PIXELS = 40_000_000   # larger images are refused rather than decoded (decompression bombs)
IMAGE_FORMATS = "PNG, JPEG, GIF, WebP or another format Pillow reads"


def _setting(name, default):
    return os.environ.get("CELERYALT_" + name, default)


def state_path(server_pid=None):
    """The shared state file of the workers started by server process ``server_pid``."""
    directory = _setting("STATE_DIR", tempfile.gettempdir())
    return os.path.join(directory, "celeryalt-%d.sqlite3" % (server_pid or os.getppid()))


class InvalidInput(ValueError):
    """A value the client sent cannot be used; the message reads ``field.path: what is wrong``."""

    def __init__(self, loc, msg):
        super().__init__("%s: %s" % (".".join(str(p) for p in loc), msg))


class CleanupRefused(PermissionError):
    """A cleanup outside the configured directory (or with none configured) was asked for."""


class _SharedState:
    """Counters, timestamps and the query cache shared by the workers of one server (one SQLite file)."""

    def __init__(self):
        self.db = sqlite3.connect(state_path(), timeout=10, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (name TEXT PRIMARY KEY, value)")
        self.db.execute("CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, stored_at REAL, data TEXT)")

    def incr(self, name, n=1):
        """Add ``n`` to counter ``name``."""
        self.db.execute("INSERT INTO kv VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
                        (name, n, n))

    def put(self, name, value):
        """Set ``name`` to ``value``."""
        self.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (name, value))

    def get(self, name, default=0):
        """The value of ``name``."""
        row = self.db.execute("SELECT value FROM kv WHERE name = ?", (name,)).fetchone()
        return default if row is None else row[0]

    def prefixed(self, prefix):
        """Every ``prefix``-named value, keyed by the rest of its name."""
        rows = self.db.execute("SELECT name, value FROM kv WHERE substr(name, 1, ?) = ?", (len(prefix), prefix))
        return {name[len(prefix):]: value for name, value in rows}

    def cache_get(self, key):
        """``(stored_at, data)`` for a cached query, or None."""
        row = self.db.execute("SELECT stored_at, data FROM cache WHERE key = ?", (key,)).fetchone()
        return None if row is None else (row[0], json.loads(row[1]))

    def cache_put(self, key, stored_at, data):
        """Cache ``data`` for ``key``."""
        self.db.execute("INSERT OR REPLACE INTO cache VALUES (?, ?, ?)", (key, stored_at, json.dumps(data)))

    def cache_size(self):
        """How many queries are cached."""
        return self.db.execute("SELECT count(*) FROM cache").fetchone()[0]

    def close(self):
        """Close the connection."""
        self.db.close()


# -- email ---------------------------------------------------------------------------------------

class EmailWorker(DirtyApp):
    """Sends email over one SMTP connection per worker, opened at start and reused."""

    workers = 2
    timeout = 60

    def init(self):
        """Open the shared state and, if the SMTP server is up, the connection."""
        self.state = _SharedState()
        self.smtp = None
        self.connections = 0
        self.last_connected = None
        try:
            self._connection(timeout=3)  # short: a server that does not answer must not hold up the pool's start
        except OSError:
            pass  # the SMTP server is down; the first email connects (and reports a failure if still down)

    def _connection(self, timeout=10):
        if self.smtp is not None:
            try:
                self.smtp.noop()
                return self.smtp
            except (smtplib.SMTPException, OSError):
                self.smtp = None  # the server dropped the idle connection; open a new one
        self.smtp = smtplib.SMTP(_setting("SMTP_HOST", "127.0.0.1"), int(_setting("SMTP_PORT", "25")),
                                 timeout=timeout)
        self.connections += 1
        self.last_connected = datetime.datetime.now().isoformat()
        return self.smtp

    def send_email(self, to, subject, body, html=False):
        """Send one email; gunicorn's fields plus ``connections`` (opened by this worker so far)."""
        sender = _setting("FROM", "noreply@example.com")
        msg = EmailMessage()
        msg["From"] = sender
        msg["To"] = to
        msg["Subject"] = subject
        msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
        msg.set_content(body, subtype="html" if html else "plain")
        self._connection().send_message(msg)
        self.state.incr("emails_sent")
        return {"status": "sent", "to": to, "subject": subject, "message_id": msg["Message-ID"],
                "timestamp": datetime.datetime.now().isoformat(), "connections": self.connections}

    def send_bulk_emails(self, recipients, subject, body):
        """Send to each recipient, streaming one progress event each; a failed one does not stop the rest."""
        total = len(recipients)
        sent = failed = 0
        for i, to in enumerate(recipients, 1):
            event = {"type": "progress", "current": i, "total": total, "percent": int(i * 100 / total),
                     "last_sent": to}
            try:
                self.send_email(to, subject, body)
                sent += 1
                event["status"] = "sent"
            except (smtplib.SMTPException, OSError, ValueError) as exc:
                failed += 1
                event.update(status="failed", error="%s: %s" % (type(exc).__name__, exc))
            yield event
        yield {"type": "complete", "total": total, "sent": sent, "failed": failed}

    def stats(self):
        """Emails sent by this server's workers, and this worker's connection."""
        return {"emails_sent": self.state.get("emails_sent"), "smtp_connected": self.smtp is not None,
                "last_connected": self.last_connected, "worker_pid": os.getpid(), "connections": self.connections}

    def close(self):
        """Say goodbye to the SMTP server."""
        if self.smtp is not None:
            try:
                self.smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass  # closing anyway; the server will notice
        self.state.close()


# -- images --------------------------------------------------------------------------------------

class ImageWorker(DirtyApp):
    """Resizes and thumbnails images with Pillow, imported once per worker."""

    workers = 2
    timeout = 60

    def init(self):
        """Import Pillow and refuse decompression bombs."""
        import warnings
        from PIL import Image
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        self.Image = Image
        self.pil_available = True
        self.state = _SharedState()

    def _open(self, image_data, loc):
        if not isinstance(image_data, str):
            raise InvalidInput(loc, "must be a base64 string")
        if image_data.startswith("data:") and "," in image_data:
            image_data = image_data.partition(",")[2]  # a data: URL as browsers make them
        try:
            raw = base64.b64decode(image_data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(loc, "is not valid base64") from None
        if not raw:
            raise InvalidInput(loc, "is empty; send a base64-encoded image")
        try:
            img = self.Image.open(io.BytesIO(raw))
            img.load()
        except (self.Image.DecompressionBombWarning, self.Image.DecompressionBombError):
            raise InvalidInput(loc, "is larger than %d pixels" % MAX_PIXELS) from None
        except Exception:  # Pillow raises many types for undecodable data; all mean the same here
            raise InvalidInput(loc, "is not an image (%s)" % IMAGE_FORMATS) from None
        return raw, img

    def _result(self, image_data, raw, img, target):
        if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I"):
            img = img.convert("RGBA" if "A" in img.mode else "RGB")  # PNG cannot hold CMYK and friends
        out = io.BytesIO()
        img.save(out, "PNG")
        png = out.getvalue()
        self.state.incr("images_processed")
        # original_size is the length of what the client sent, as gunicorn reports it; original_bytes is decoded.
        return {"status": "resized", "original_size": len(image_data), "original_bytes": len(raw),
                "target_dimensions": "%dx%d" % target,
                "result_id": "img-" + hashlib.sha256(png).hexdigest()[:16], "pil_used": True,
                "width": img.width, "height": img.height, "image": base64.b64encode(png).decode()}

    def resize(self, image_data, width, height, loc=("image_data",)):
        """Resize to exactly width x height; the PNG comes back base64-encoded in ``image``."""
        raw, img = self._open(image_data, loc)
        return self._result(image_data, raw, img.resize((width, height)), (width, height))

    def generate_thumbnail(self, image_data, size=150, loc=("image_data",)):
        """Shrink to fit a size x size box, keeping the aspect ratio."""
        raw, img = self._open(image_data, loc)
        img.thumbnail((size, size))
        return self._result(image_data, raw, img, (size, size))

    def process_batch(self, images, operation, width=800, height=600, size=150):
        """Resize or thumbnail each ``{"id", "data"}`` item; an item that fails is reported and skipped."""
        total = len(images)
        processed = 0
        for i, item in enumerate(images):
            event = {"type": "progress", "current": i + 1, "total": total, "percent": int((i + 1) * 100 / total),
                     "image_id": item.get("id", "img-%d" % i)}
            loc = ("images", i, "data")
            try:
                if operation == "thumbnail":
                    event["result"] = self.generate_thumbnail(item.get("data"), size, loc=loc)
                else:
                    event["result"] = self.resize(item.get("data"), width, height, loc=loc)
                processed += 1
            except InvalidInput as exc:
                event.update(status="failed", error=str(exc))
            except (OSError, ValueError) as exc:  # decoded, but Pillow could not process it
                event.update(status="failed", error="images.%d.data: could not be processed (%s)" % (i, exc))
            yield event
        yield {"type": "complete", "total": total, "processed": processed, "failed": total - processed}

    def stats(self):
        """Images processed by this server's workers."""
        return {"images_processed": self.state.get("images_processed"), "pil_available": self.pil_available,
                "worker_pid": os.getpid()}

    def close(self):
        """Close the shared state."""
        self.state.close()


# -- data ----------------------------------------------------------------------------------------

def _group_key(value):
    # JSON object keys are strings; render other values the way JSON writes them.
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


class DataWorker(DirtyApp):
    """Aggregations, an ETL pipeline and a cached query, with one database connection per worker."""

    workers = 4
    timeout = 60

    def init(self):
        """Open the database (the shared state) once."""
        self.state = _SharedState()
        self.query_cost = float(_setting("QUERY_SECONDS", "0.2"))

    def aggregate(self, data, group_by, agg_field, agg_func="sum"):
        """Sum, count or list ``agg_field`` per ``group_by`` value (a row without it is in group "unknown")."""
        result = {}
        for row in data:
            key = _group_key(row.get(group_by, "unknown"))
            if agg_func == "sum":
                result[key] = result.get(key, 0) + row.get(agg_field, 0)
            elif agg_func == "count":
                result[key] = result.get(key, 0) + 1
            else:
                result.setdefault(key, []).append(row.get(agg_field))
        self.state.incr("tasks_completed")
        return {"status": "completed", "group_by": group_by, "agg_func": agg_func, "result": result,
                "record_count": len(data)}

    def etl_pipeline(self, source_data, transformations):
        """Extract, apply each filter/map transformation, load; one progress event per phase."""
        total = len(transformations) + 2
        rows = [dict(r) for r in source_data]
        yield {"type": "progress", "phase": "extract", "step": 1, "total_steps": total,
               "message": "Extracting %d records" % len(rows)}
        for i, t in enumerate(transformations):
            yield {"type": "progress", "phase": "transform", "step": i + 2, "total_steps": total,
                   "message": "Applying %s" % t.get("name", "transform_%d" % i)}
            kind, field = t.get("type", "passthrough"), t.get("field")
            if kind == "filter":
                rows = [r for r in rows if r.get(field) == t.get("value")]
            elif kind == "map":
                change = str.upper if t.get("func", "upper") == "upper" else str.lower
                rows = [dict(r, **{field: change(r[field])}) if isinstance(r.get(field), str) else r
                        for r in rows]
        yield {"type": "progress", "phase": "load", "step": total, "total_steps": total,
               "message": "Loading %d records" % len(rows)}
        self.state.incr("tasks_completed")
        yield {"type": "complete", "records_processed": len(source_data), "records_output": len(rows),
               "transformations_applied": len(transformations), "output": rows}

    def cached_query(self, query_key, ttl=300):
        """Answer a (simulated, slow) query from the shared cache while it is younger than ``ttl`` seconds."""
        now = time.time()
        hit = self.state.cache_get(query_key)
        if hit is not None and now - hit[0] < ttl:
            return {"status": "cache_hit", "data": hit[1], "cached_at": hit[0], "age_seconds": int(now - hit[0]),
                    "cached": True}
        time.sleep(self.query_cost)  # stands in for the expensive query a real app would run here
        digest = hashlib.sha256(query_key.encode()).digest()
        data = {"query": query_key, "rows": 10 + digest[0] % 91, "computed_at": now}
        self.state.cache_put(query_key, now, data)
        return {"status": "cache_miss", "data": data, "cached_at": now, "cached": False}

    def stats(self):
        """Tasks completed by this server's workers and the size of the shared cache."""
        return {"tasks_completed": self.state.get("tasks_completed"), "cache_size": self.state.cache_size(),
                "db_connected": True, "worker_pid": os.getpid()}

    def close(self):
        """Close the database connection."""
        self.state.close()


# -- scheduled -----------------------------------------------------------------------------------

def cleanup_root():
    """The directory cleanups may delete in (``CELERYALT_CLEANUP_DIR``, resolved), or None when unset."""
    root = _setting("CLEANUP_DIR", "")
    return os.path.realpath(root) if root else None


def resolve_cleanup_dir(requested=None):
    """The real directory to clean for a client's ``directory`` (None: the configured one), inside the root."""
    root = cleanup_root()
    if root is None:
        raise CleanupRefused("cleanup is off on this server: the operator has not set CELERYALT_CLEANUP_DIR")
    if not requested:
        return root
    path = os.path.realpath(os.path.join(root, requested))  # an absolute path replaces the root here
    if os.path.commonpath([root, path]) != root:
        raise CleanupRefused("directory %r is outside the cleanup directory %s" % (requested, root))
    return path


class ScheduledWorker(DirtyApp):
    """The jobs gunicorn leaves to an outside cron; greenqueue's own scheduler runs them (see app.py)."""

    workers = 1
    timeout = 300

    def init(self):
        """Open the shared state (run counts survive a worker restart)."""
        self.state = _SharedState()

    def __call__(self, action, *args, **kwargs):
        """Run ``action``, counting runs of the jobs."""
        if action != "stats":
            self.state.put("last_run:" + str(action), datetime.datetime.now().isoformat())
            self.state.incr("runs:" + str(action))
        return super().__call__(action, *args, **kwargs)

    def cleanup_old_files(self, directory=None, max_age_days=7):
        """Delete regular files older than ``max_age_days`` directly in ``directory`` (inside the cleanup root)."""
        path = resolve_cleanup_dir(directory)
        cutoff = time.time() - max_age_days * 86400
        removed, freed = [], 0
        try:
            # Opened without following links, and every entry acted on relative to it, so a directory
            # swapped for a symlink mid-run cannot send the deletions elsewhere.
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            raise InvalidInput(("directory",), "%s is not a directory" % path) from None
        try:
            for entry in sorted(os.scandir(fd), key=lambda e: e.name):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
                    os.unlink(entry.name, dir_fd=fd)
                    removed.append(entry.name)
                    freed += st.st_size
        finally:
            os.close(fd)
        return {"status": "completed", "directory": path, "files_deleted": len(removed),
                "space_freed_mb": round(freed / 1e6, 6), "removed": removed}

    def generate_daily_report(self):
        """Write today's report (what the other workers did) to ``CELERYALT_REPORT_DIR``."""
        today = datetime.date.today().isoformat()
        metrics = {"emails_sent": self.state.get("emails_sent"),
                   "images_processed": self.state.get("images_processed"),
                   "data_tasks_completed": self.state.get("tasks_completed")}
        path = os.path.join(_setting("REPORT_DIR", tempfile.gettempdir()), "report-%s.json" % today)
        tmp = path + ".part"
        with open(tmp, "w") as fh:
            json.dump({"report_date": today, "generated_at": datetime.datetime.now().isoformat(),
                       "metrics": metrics}, fh, indent=2)
        os.replace(tmp, path)  # readers never see half a report
        return {"status": "completed", "report_date": today, "metrics": metrics, "report": path}

    def sync_external_data(self, source="default"):
        """A stand-in for pulling records from an outside system (there is none in this example)."""
        records = 50 + hashlib.sha256(source.encode()).digest()[0]
        self.state.incr("synced:" + source, records)
        return {"status": "completed", "source": source, "records_synced": records,
                "sync_time": datetime.datetime.now().isoformat(), "simulated": True}

    def stats(self):
        """When each job last ran and how often."""
        return {"last_runs": self.state.prefixed("last_run:"), "run_counts": self.state.prefixed("runs:"),
                "worker_pid": os.getpid()}

    def close(self):
        """Close the shared state."""
        self.state.close()
