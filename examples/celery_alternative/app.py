"""The celery_alternative web app: endpoints that call the four worker pools, streaming progress as SSE.

Run it:
    python -m greenqueue.server --config examples/celery_alternative/greenqueue_conf.py \
        examples.celery_alternative.app:app
"""

import os

from flask import Flask, jsonify, request

from greenqueue import Overloaded, WorkerError, crontab, periodic, procpool
from greenqueue.flask import prime, sse_response

EMAIL = "examples.celery_alternative.workers:EmailWorker"
IMAGE = "examples.celery_alternative.workers:ImageWorker"
DATA = "examples.celery_alternative.workers:DataWorker"
SCHEDULED = "examples.celery_alternative.workers:ScheduledWorker"
POOLS = (EMAIL, IMAGE, DATA, SCHEDULED)

app = Flask(__name__)


class BadInput(Exception):
    """The JSON body is missing a field or has the wrong type."""


def body(**fields):
    """The JSON body's fields, checked against ``fields`` (name -> type)."""
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise BadInput("send a JSON object with Content-Type: application/json")
    out = {}
    for name, kind in fields.items():
        optional = name.endswith("_")
        key = name.rstrip("_")
        if key not in data:
            if optional:
                continue
            raise BadInput("%r is required" % key)
        if not isinstance(data[key], kind) or isinstance(data[key], bool) and kind is not bool:
            raise BadInput("%r must be %s" % (key, getattr(kind, "__name__", kind)))
        out[key] = data[key]
    return out


def nonempty(items, name):
    if not items:
        raise BadInput("%r must not be empty" % name)
    return items


@app.errorhandler(BadInput)
def bad_input(exc):
    return jsonify(error=str(exc)), 400


@app.errorhandler(Overloaded)
def overloaded(exc):
    return jsonify(error="busy, try again shortly"), 503, {"Retry-After": "1"}


@app.errorhandler(WorkerError)
def worker_failed(exc):
    return jsonify(error="%s: %s" % (type(exc).__name__, exc)), 502


def stream(pool, action, *args):
    """SSE progress from a worker generator (first event fetched before answering)."""
    return sse_response(prime(procpool.get(pool).stream(action, *args)))


@app.post("/api/email/send")
def email_send():
    b = body(to=str, subject=str, body=str)
    return jsonify(procpool.get(EMAIL).call("send_email", b["to"], b["subject"], b["body"]))


@app.post("/api/email/send-bulk")
def email_bulk():
    b = body(recipients=list, subject=str, body=str)
    return stream(EMAIL, "send_bulk", nonempty(b["recipients"], "recipients"), b["subject"], b["body"])


@app.post("/api/image/resize")
def image_resize():
    b = body(image_data=str, width=int, height=int)
    if not (0 < b["width"] <= 4096 and 0 < b["height"] <= 4096):
        raise BadInput("width and height must be between 1 and 4096")
    return jsonify(procpool.get(IMAGE).call("resize", b["image_data"], b["width"], b["height"]))


@app.post("/api/image/process-batch")
def image_batch():
    b = body(images=list, operation=str)
    if b["operation"] not in ("thumbnail", "grayscale"):
        raise BadInput("'operation' must be 'thumbnail' or 'grayscale'")
    return stream(IMAGE, "process_batch", nonempty(b["images"], "images"), b["operation"])


@app.post("/api/data/aggregate")
def data_aggregate():
    b = body(data=list, group_by=str, agg_field=str)
    return jsonify(procpool.get(DATA).call("aggregate", b["data"], b["group_by"], b["agg_field"]))


@app.post("/api/data/etl")
def data_etl():
    b = body(source_data=list, transformations=list)
    return stream(DATA, "etl_pipeline", b["source_data"], nonempty(b["transformations"], "transformations"))


@app.post("/api/data/query")
def data_query():
    b = body(query_key=str, ttl_=int)
    return jsonify(procpool.get(DATA).call("cached_query", b["query_key"], b.get("ttl", 60)))


@app.post("/api/scheduled/cleanup")
def scheduled_cleanup():
    b = body(max_age_days=int)
    # The directory comes from configuration, never from the client.
    directory = os.environ.get("CELERYALT_CLEANUP_DIR")
    if not directory:
        return jsonify(error="set CELERYALT_CLEANUP_DIR to enable cleanup"), 409
    return jsonify(procpool.get(SCHEDULED).call("cleanup_old_files", directory, b["max_age_days"]))


@app.post("/api/scheduled/report")
def scheduled_report():
    return jsonify(procpool.get(SCHEDULED).call("generate_daily_report"))


@app.get("/health")
def health():
    states = {}
    for path in POOLS:
        try:
            states[path.rpartition(":")[2]] = procpool.get(path).stats()
        except KeyError:
            states[path.rpartition(":")[2]] = None
    ok = all(states.values())
    return jsonify(status="ok" if ok else "degraded", pools=states), 200 if ok else 503


# The jobs an outside cron used to start: now greenqueue's scheduler runs them.
@periodic(crontab(os.environ.get("CELERYALT_REPORT_CRON", "0 6 * * *")), timezone="UTC")
def daily_report():
    """Generate the daily report in the ScheduledWorker."""
    return procpool.get(SCHEDULED).call("generate_daily_report")


@periodic(crontab(os.environ.get("CELERYALT_CLEANUP_CRON", "0 3 * * *")), timezone="UTC")
def nightly_cleanup():
    """Remove old files from the upload directory."""
    directory = os.environ.get("CELERYALT_CLEANUP_DIR")
    if directory:
        return procpool.get(SCHEDULED).call("cleanup_old_files", directory, 7)
    return None
