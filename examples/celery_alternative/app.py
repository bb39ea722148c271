"""The celery_alternative web app: gunicorn's HTTP API for its four worker pools, served by greenqueue.

Paths, request bodies, response fields and status values are those of
gunicorn's examples/celery_alternative (FastAPI: errors are JSON ``detail``,
bad bodies a 422), so its clients and tests keep working. The scheduled jobs
run from greenqueue's own scheduler instead of an outside cron.

Run it:
    python -m greenqueue.server --config examples/celery_alternative/greenqueue_conf.py \
        examples.celery_alternative.app:app

Concurrency model: each request runs in its own greenlet; a pool call or
stream blocks only that greenlet while a worker process does the work.
"""

import json
import logging
import os
import re

import greenqueue
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from greenqueue import (Overloaded, RemoteError, WorkerError, WorkerTimeout, crontab, on_shutdown, periodic,
                        procpool)
from greenqueue.flask import prime, sse_event, stream_response

from .schema import BOOL, DICT, INT, OPT_STR, REQUIRED, STR, Invalid, ListOf, parse, value_error
from .workers import CleanupRefused, resolve_cleanup_dir, state_path

log = logging.getLogger(__name__)

EMAIL = "examples.celery_alternative.workers:EmailWorker"
IMAGE = "examples.celery_alternative.workers:ImageWorker"
DATA = "examples.celery_alternative.workers:DataWorker"
SCHEDULED = "examples.celery_alternative.workers:ScheduledWorker"
POOLS = (EMAIL, IMAGE, DATA, SCHEDULED)
MAX_SIDE = 4096
ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+$")

app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = 32 * 1024 * 1024


class PoolMissing(Exception):
    """The server was started without one of the example's ``--dirty-app`` pools."""


# -- plumbing ------------------------------------------------------------------------------------

def body(**fields):
    """The request's JSON body checked against ``fields`` (name=(kind, default)); a 422 when it does not fit."""
    return parse(request.get_data(as_text=True), fields)


def check(errors):
    """Raise the collected field problems as one 422."""
    if errors:
        raise Invalid(errors)


def pool(path):
    """The running pool for ``path``."""
    try:
        return procpool.get(path)
    except KeyError:
        raise PoolMissing(path) from None


def call(path, action, **kwargs):
    """Run ``action`` in a worker of ``path`` and answer with its result as JSON."""
    return jsonify(pool(path).call(action, **kwargs))


def progress(path, action, **kwargs):
    """Stream a worker generator's progress dicts as server-sent events (``data:`` lines, as gunicorn sends)."""
    # prime() takes the first event now, so a busy or missing worker is a proper 503 rather than
    # an error inside a 200 stream.
    source = prime(pool(path).stream(action, **kwargs))
    return stream_response(_events(source), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


def _events(source):
    try:
        for item in source:
            yield sse_event(item)
    except Exception as exc:  # headers are sent: report in-band, as gunicorn's example does
        log.warning("progress stream failed: %s: %s", type(exc).__name__, exc)
        yield sse_event({"type": "error", "error": str(exc), "exception": type(exc).__name__}, "error")
    finally:
        close = getattr(source, "close", None)  # an empty stream is a plain iterator without close()
        if close is not None:
            close()


def _addresses(values, loc):
    return [value_error(loc + ([i] if isinstance(values, list) else []), "value is not a valid email address",
                        v)
            for i, v in enumerate(values if isinstance(values, list) else [values]) if not ADDRESS.match(v)]


def _no_newlines(value, loc):
    return [value_error(loc, "must be a single line", value)] if "\n" in value or "\r" in value else []


def _side(value, loc):
    return [] if 0 < value <= MAX_SIDE else [value_error(loc, "must be between 1 and %d" % MAX_SIDE, value)]


def _one_of(value, allowed, loc):
    return [] if value in allowed else [value_error(loc, "must be one of %s" % ", ".join(allowed), value)]


# -- errors: FastAPI's shapes --------------------------------------------------------------------

@app.errorhandler(Invalid)
def invalid(exc):
    """A body that does not fit: 422 with the list of problems."""
    return jsonify(detail=exc.errors), 422


@app.errorhandler(CleanupRefused)
def cleanup_refused(exc):
    """A cleanup outside the configured directory: refused, nothing deleted."""
    return jsonify(detail=str(exc)), 403


@app.errorhandler(PoolMissing)
def pool_missing(exc):
    """The server runs without this pool."""
    return jsonify(detail="the %s pool is not running; start the server with --dirty-app %s (or --config "
                   "examples/celery_alternative/greenqueue_conf.py)" % (exc.args[0].rpartition(":")[2],
                                                                        exc.args[0])), 503


@app.errorhandler(Overloaded)
def overloaded(exc):
    """Every worker busy and the queue full."""
    return jsonify(detail="busy, try again shortly"), 503, {"Retry-After": "1"}


@app.errorhandler(WorkerError)
def worker_failed(exc):
    """A worker's verdict on the input is a 4xx; anything else is the worker's failure."""
    if isinstance(exc, RemoteError):
        kind = exc.remote_type.rpartition(".")[2]
        if kind == "InvalidInput":
            field, _, msg = (exc.args[0] if exc.args else "").partition(": ")
            loc = ["body"] + [int(p) if p.isdigit() else p for p in field.split(".")]
            return jsonify(detail=[value_error(loc, msg)]), 422
        if kind == "CleanupRefused":
            return jsonify(detail=exc.args[0] if exc.args else "refused"), 403
    if isinstance(exc, WorkerTimeout):
        return jsonify(detail="Task timed out"), 504
    log.warning("worker call failed: %s", exc)
    return jsonify(detail="%s: %s" % (type(exc).__name__, exc)), 502


@app.errorhandler(HTTPException)
def http_error(exc):
    """404, 405, 413 ... as JSON, like FastAPI."""
    return jsonify(detail=exc.name), exc.code


# -- email ---------------------------------------------------------------------------------------

@app.post("/api/email/send")
def send_email():
    """Send one email (Celery: ``send_email.delay(to, subject, body)``)."""
    b = body(to=(STR, REQUIRED), subject=(STR, REQUIRED), body=(STR, REQUIRED), html=(BOOL, False))
    check(_addresses(b["to"], ["body", "to"]) + _no_newlines(b["subject"], ["body", "subject"]))
    return call(EMAIL, "send_email", to=b["to"], subject=b["subject"], body=b["body"], html=b["html"])


@app.post("/api/email/send-bulk")
def send_bulk_emails():
    """Send to many recipients, streaming one progress event each, then a complete event."""
    b = body(recipients=(ListOf(STR), REQUIRED), subject=(STR, REQUIRED), body=(STR, REQUIRED))
    check(_addresses(b["recipients"], ["body", "recipients"]) + _no_newlines(b["subject"], ["body", "subject"]))
    return progress(EMAIL, "send_bulk_emails", recipients=b["recipients"], subject=b["subject"], body=b["body"])


@app.get("/api/email/stats")
def email_stats():
    """The email workers' counters."""
    return call(EMAIL, "stats")


# -- images --------------------------------------------------------------------------------------

@app.post("/api/image/resize")
def resize_image():
    """Resize a base64 image to width x height."""
    b = body(image_data=(STR, ""), width=(INT, 800), height=(INT, 600))
    check(_side(b["width"], ["body", "width"]) + _side(b["height"], ["body", "height"]))
    return call(IMAGE, "resize", image_data=b["image_data"], width=b["width"], height=b["height"])


@app.post("/api/image/thumbnail")
def generate_thumbnail():
    """Shrink a base64 image to fit a size x size box."""
    b = body(image_data=(STR, ""), size=(INT, 150))
    check(_side(b["size"], ["body", "size"]))
    return call(IMAGE, "generate_thumbnail", image_data=b["image_data"], size=b["size"])


@app.post("/api/image/process-batch")
def process_image_batch():
    """Resize or thumbnail ``{"id", "data"}`` images, streaming one progress event each."""
    b = body(images=(ListOf(DICT), REQUIRED), operation=(STR, "resize"), width=(INT, 800), height=(INT, 600),
             size=(INT, 150))
    errors = _one_of(b["operation"], ("resize", "thumbnail"), ["body", "operation"])
    for name in ("width", "height", "size"):
        errors += _side(b[name], ["body", name])
    for i, item in enumerate(b["images"]):
        if "data" not in item:
            errors.append({"type": "missing", "loc": ["body", "images", i, "data"], "msg": "Field required",
                           "input": {k: v for k, v in item.items() if k != "data"}})
        else:
            errors += STR.errors(item["data"], ["body", "images", i, "data"])
    check(errors)
    return progress(IMAGE, "process_batch", images=b["images"], operation=b["operation"], width=b["width"],
                    height=b["height"], size=b["size"])


@app.get("/api/image/stats")
def image_stats():
    """The image workers' counters."""
    return call(IMAGE, "stats")


# -- data ----------------------------------------------------------------------------------------

@app.post("/api/data/aggregate")
def aggregate_data():
    """Sum, count or list a field per group."""
    b = body(data=(ListOf(DICT), REQUIRED), group_by=(STR, REQUIRED), agg_field=(STR, REQUIRED),
             agg_func=(STR, "sum"))
    errors = _one_of(b["agg_func"], ("sum", "count", "list"), ["body", "agg_func"])
    if b["agg_func"] == "sum":
        field = b["agg_field"]
        errors += [value_error(["body", "data", i, field], "must be a number to sum", row[field])
                   for i, row in enumerate(b["data"])
                   if field in row and (not isinstance(row[field], (int, float)) or isinstance(row[field], bool))]
    check(errors)
    return call(DATA, "aggregate", data=b["data"], group_by=b["group_by"], agg_field=b["agg_field"],
                agg_func=b["agg_func"])


def _transformation_errors(i, t):
    loc = ["body", "transformations", i]
    kind = t.get("type", "passthrough")
    errors = _one_of(kind, ("filter", "map", "passthrough"), loc + ["type"])
    if kind in ("filter", "map"):
        if "field" not in t:
            errors.append({"type": "missing", "loc": loc + ["field"], "msg": "Field required", "input": t})
        else:
            errors += STR.errors(t["field"], loc + ["field"])
    if kind == "map":
        errors += _one_of(t.get("func", "upper"), ("upper", "lower"), loc + ["func"])
    return errors


@app.post("/api/data/etl")
def run_etl():
    """Extract, transform (filter/map), load, streaming one progress event per phase."""
    b = body(source_data=(ListOf(DICT), REQUIRED), transformations=(ListOf(DICT), []))
    check([e for i, t in enumerate(b["transformations"]) for e in _transformation_errors(i, t)])
    return progress(DATA, "etl_pipeline", source_data=b["source_data"], transformations=b["transformations"])


@app.post("/api/data/query")
def cached_query():
    """A slow query answered from the workers' shared cache while fresh."""
    b = body(query_key=(STR, REQUIRED), ttl=(INT, 300))
    return call(DATA, "cached_query", query_key=b["query_key"], ttl=b["ttl"])


@app.get("/api/data/stats")
def data_stats():
    """The data workers' counters."""
    return call(DATA, "stats")


# -- scheduled (also run by greenqueue's scheduler, below) --------------------------------------

@app.post("/api/scheduled/cleanup")
def run_cleanup():
    """Delete old files, only inside ``CELERYALT_CLEANUP_DIR``; ``directory`` may name a folder in it."""
    b = body(directory=(OPT_STR, None), max_age_days=(INT, 7))
    if b["max_age_days"] < 0:
        raise Invalid([value_error(["body", "max_age_days"], "must not be negative", b["max_age_days"])])
    directory = resolve_cleanup_dir(b["directory"])  # refused here (403) before a worker is asked
    return call(SCHEDULED, "cleanup_old_files", directory=directory, max_age_days=b["max_age_days"])


@app.post("/api/scheduled/daily-report")
def run_daily_report():
    """Write today's report now."""
    return call(SCHEDULED, "generate_daily_report")


@app.post("/api/scheduled/sync")
def run_sync():
    """Sync from an outside source (simulated)."""
    b = body(source=(STR, "default"))
    return call(SCHEDULED, "sync_external_data", source=b["source"])


@app.get("/api/scheduled/stats")
def scheduled_stats():
    """When each scheduled job last ran and how often."""
    return call(SCHEDULED, "stats")


@periodic(crontab(os.environ.get("CELERYALT_REPORT_CRON", "0 6 * * *")), timezone="UTC")
def daily_report():
    """Generate the daily report in the ScheduledWorker."""
    return pool(SCHEDULED).call("generate_daily_report")


@periodic(crontab(os.environ.get("CELERYALT_CLEANUP_CRON", "0 3 * * *")), timezone="UTC")
def nightly_cleanup():
    """Remove week-old files from the configured cleanup directory (skipped when none is set)."""
    if not os.environ.get("CELERYALT_CLEANUP_DIR"):
        return None
    return pool(SCHEDULED).call("cleanup_old_files", max_age_days=int(os.environ.get("CELERYALT_CLEANUP_MAX_AGE_DAYS",
                                                                                     "7")))


@periodic(crontab(os.environ.get("CELERYALT_SYNC_CRON", "15 * * * *")), timezone="UTC")
def hourly_sync():
    """Sync the default source."""
    return pool(SCHEDULED).call("sync_external_data", source="default")


@on_shutdown
def remove_shared_state():
    """Delete the workers' shared state file of this server process."""
    for suffix in ("", "-wal", "-shm"):
        try:
            os.remove(state_path(os.getpid()) + suffix)
        except FileNotFoundError:
            pass  # never created: the pools were not started


# -- health and index ----------------------------------------------------------------------------

@app.get("/health")
def health():
    """``healthy`` when all four pools run (greenqueue adds each pool's state under ``pools``)."""
    pools, missing = {}, []
    for path in POOLS:
        name = path.rpartition(":")[2]
        try:
            pools[name] = json.loads(json.dumps(procpool.get(path).stats(), default=str))
        except KeyError:
            missing.append(name)
    if missing:
        return jsonify(detail={"status": "degraded", "workers": "unavailable", "missing": missing}), 503
    # greenqueue's extras beside gunicorn's fields: each pool, and what the task store is doing.
    return jsonify(status="healthy", workers="connected", pools=pools, store=greenqueue.health())


@app.get("/")
def index():
    """What this API offers."""
    return jsonify(name="Celery Replacement Demo", description="gunicorn's celery_alternative API on greenqueue",
                   endpoints={
                       "email": {"POST /api/email/send": "Send single email",
                                 "POST /api/email/send-bulk": "Send bulk emails (streaming)",
                                 "GET /api/email/stats": "Email worker stats"},
                       "image": {"POST /api/image/resize": "Resize image",
                                 "POST /api/image/thumbnail": "Generate thumbnail",
                                 "POST /api/image/process-batch": "Batch process (streaming)",
                                 "GET /api/image/stats": "Image worker stats"},
                       "data": {"POST /api/data/aggregate": "Aggregate data",
                                "POST /api/data/etl": "Run ETL pipeline (streaming)",
                                "POST /api/data/query": "Cached query",
                                "GET /api/data/stats": "Data worker stats"},
                       "scheduled": {"POST /api/scheduled/cleanup": "Run cleanup",
                                     "POST /api/scheduled/daily-report": "Generate report",
                                     "POST /api/scheduled/sync": "Sync external data",
                                     "GET /api/scheduled/stats": "Scheduled worker stats"},
                   })
