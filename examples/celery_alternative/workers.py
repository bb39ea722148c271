"""The four stateful workers: each keeps what Celery tasks would rebuild on every call.

Concurrency model: each class runs in its own pool of worker processes
(``--dirty-app``); a worker handles one call at a time and keeps its state
(SMTP connection, Pillow, caches) between calls. Generator actions stream
progress dicts back to the web process as they happen.
"""

import base64
import io
import os
import smtplib
import time
from email.message import EmailMessage

from greenqueue import DirtyApp


def _setting(name, default):
    return os.environ.get("CELERYALT_" + name, default)


class EmailWorker(DirtyApp):
    """Sends email over one SMTP connection kept open across calls."""

    workers = 1
    timeout = 60

    def init(self):
        self.smtp = None
        self.connections = 0

    def _connection(self):
        if self.smtp is not None:
            try:
                self.smtp.noop()
                return self.smtp
            except smtplib.SMTPException:
                self.smtp = None  # the server dropped us; reconnect below
        self.smtp = smtplib.SMTP(_setting("SMTP_HOST", "127.0.0.1"), int(_setting("SMTP_PORT", "25")), timeout=10)
        self.connections += 1
        return self.smtp

    def send_email(self, to, subject, body):
        """Send one email; returns the status and how many connections this worker opened so far."""
        msg = EmailMessage()
        msg["From"] = _setting("FROM", "noreply@example.com")
        msg["To"] = to
        msg["Subject"] = subject
        msg.set_content(body)
        self._connection().send_message(msg)
        return {"status": "sent", "to": to, "connections": self.connections}

    def send_bulk(self, recipients, subject, body):
        """Send to each recipient, streaming progress."""
        total = len(recipients)
        for i, to in enumerate(recipients, 1):
            self.send_email(to, subject, body)
            yield {"type": "progress", "current": i, "total": total, "percent": round(100 * i / total)}
        yield {"type": "complete", "sent": total, "connections": self.connections}

    def close(self):
        if self.smtp is not None:
            try:
                self.smtp.quit()
            except smtplib.SMTPException:
                pass  # closing anyway


class ImageWorker(DirtyApp):
    """Resizes images with Pillow, imported once per worker."""

    workers = 1
    timeout = 60

    def init(self):
        from PIL import Image, ImageOps
        self.Image, self.ImageOps = Image, ImageOps

    def _open(self, data_b64):
        return self.Image.open(io.BytesIO(base64.b64decode(data_b64)))

    def _encode(self, img):
        out = io.BytesIO()
        img.save(out, "PNG")
        return base64.b64encode(out.getvalue()).decode()

    def resize(self, image_data, width, height):
        """Resize to exactly width x height; returns the PNG (base64) and its size."""
        img = self._open(image_data).resize((width, height))
        return {"image": self._encode(img), "width": img.width, "height": img.height}

    def process_batch(self, images, operation):
        """Apply ``thumbnail`` or ``grayscale`` to each image, streaming progress."""
        total = len(images)
        results = []
        for i, data in enumerate(images, 1):
            img = self._open(data)
            if operation == "thumbnail":
                img.thumbnail((128, 128))
            else:
                img = self.ImageOps.grayscale(img)
            results.append({"width": img.width, "height": img.height, "mode": img.mode})
            yield {"type": "progress", "current": i, "total": total, "percent": round(100 * i / total)}
        yield {"type": "complete", "results": results}


class DataWorker(DirtyApp):
    """Aggregations and an ETL pipeline, with a query cache kept in the worker."""

    workers = 1
    timeout = 60

    def init(self):
        self.cache = {}

    def aggregate(self, data, group_by, agg_field):
        """Sum ``agg_field`` per ``group_by`` value."""
        totals = {}
        for item in data:
            key = str(item[group_by])
            totals[key] = totals.get(key, 0) + item[agg_field]
        return {"groups": totals, "rows": len(data)}

    def etl_pipeline(self, source_data, transformations):
        """Apply each transformation (filter_gt, multiply, rename) in turn, streaming progress."""
        rows = list(source_data)
        total = len(transformations)
        for i, t in enumerate(transformations, 1):
            op, field = t["op"], t["field"]
            if op == "filter_gt":
                rows = [r for r in rows if r[field] > t["value"]]
            elif op == "multiply":
                rows = [dict(r, **{field: r[field] * t["value"]}) for r in rows]
            elif op == "rename":
                rows = [{(t["to"] if k == field else k): v for k, v in r.items()} for r in rows]
            yield {"type": "progress", "step": i, "total": total, "op": op, "rows": len(rows)}
        yield {"type": "complete", "rows": rows}

    def cached_query(self, query_key, ttl=60):
        """An 'expensive query' (0.2 s) whose result this worker caches for ``ttl`` seconds."""
        hit = self.cache.get(query_key)
        if hit is not None and hit[0] > time.monotonic():
            return {"key": query_key, "result": hit[1], "cached": True}
        time.sleep(0.2)
        result = {"count": len(query_key) * 7, "computed_at": time.time()}
        self.cache[query_key] = (time.monotonic() + ttl, result)
        return {"key": query_key, "result": result, "cached": False}


class ScheduledWorker(DirtyApp):
    """Housekeeping that greenqueue's scheduler runs (no outside cron)."""

    workers = 1
    timeout = 300

    def cleanup_old_files(self, directory, max_age_days):
        """Delete files older than ``max_age_days`` in ``directory``."""
        cutoff = time.time() - max_age_days * 86400
        removed = []
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if os.path.isfile(path) and os.path.getmtime(path) < cutoff:
                os.remove(path)
                removed.append(name)
        return {"removed": removed}

    def generate_daily_report(self):
        """Write a small report file and return where it is."""
        directory = _setting("REPORT_DIR", "/tmp")
        path = os.path.join(directory, "report-%s.txt" % time.strftime("%Y-%m-%d"))
        with open(path, "w") as fh:
            fh.write("daily report generated at %s\n" % time.strftime("%H:%M:%S"))
        return {"report": path}
