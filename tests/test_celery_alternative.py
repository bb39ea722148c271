"""The celery_alternative example: gunicorn's HTTP API, four real worker pools, a real SMTP server.

The first half speaks only gunicorn's API (examples/celery_alternative in
gunicorn: paths, bodies, fields, status values) and asserts nothing greenqueue
adds, so it passes against gunicorn's own example too: set
``CELERYALT_URL=http://host:port`` to point it at another server (the
greenqueue-only half is then skipped). The second half checks what greenqueue
does beyond it: real email and images, safe cleanup, 422s instead of worker
tracebacks, a crash mid-stream.
"""

import base64
import concurrent.futures
import io
import json
import os
import signal
import time

import pytest
import requests

from .conftest import ServerProcess, wait_for
from .test_contact_app import SMTPServer

pytestmark = pytest.mark.realproc

APP = "examples.celery_alternative.app:app"
POOLS = ["examples.celery_alternative.workers:%s" % n for n in ("EmailWorker", "ImageWorker", "DataWorker",
                                                                "ScheduledWorker")]
EXTERNAL = os.environ.get("CELERYALT_URL")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A real SMTP server and the directories the example is configured with."""
    tmp = tmp_path_factory.mktemp("celeryalt")
    smtp = SMTPServer(tmp).start()
    (tmp / "cleanup" / "uploads").mkdir(parents=True)
    (tmp / "outside").mkdir()
    yield {"tmp": tmp, "smtp": smtp, "root": tmp / "cleanup"}
    smtp.stop()


@pytest.fixture(scope="module")
def srv(env):
    """The example with its four pools, as its README starts it."""
    if EXTERNAL:
        pytest.skip("greenqueue-only behaviour; CELERYALT_URL points elsewhere")
    args = []
    for p in POOLS:
        args += ["--dirty-app", p]
    s = ServerProcess(APP, *args, env={"CELERYALT_SMTP_PORT": str(env["smtp"].port),
                                       "CELERYALT_REPORT_DIR": str(env["tmp"]),
                                       "CELERYALT_STATE_DIR": str(env["tmp"]),
                                       "CELERYALT_CLEANUP_DIR": str(env["root"]),
                                       "CELERYALT_REPORT_CRON": "*/2 * * * * *"},
                      tmp_path=env["tmp"])
    s.start()
    yield s
    assert s.stop() == 0
    assert not list(env["tmp"].glob("celeryalt-*.sqlite3")), "the shared state file outlived the server"


@pytest.fixture(scope="module")
def url(request):
    """Base URL of the API under test: ours, or CELERYALT_URL."""
    return EXTERNAL or request.getfixturevalue("srv").url


def png(w, h, color=(10, 120, 200)):
    """A w x h PNG, base64-encoded."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def sse_lines(url, path, payload, timeout=60):
    """POST and return every line of the event stream."""
    with requests.post(url + path, json=payload, stream=True, timeout=timeout) as r:
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("text/event-stream")
        return list(r.iter_lines(decode_unicode=True))


def sse_data(url, path, payload):
    """POST and return the JSON of each ``data:`` line, as gunicorn's clients read them."""
    return [json.loads(line[6:]) for line in sse_lines(url, path, payload) if line.startswith("data: ")]


def post(url, path, payload=None, **kwargs):
    """POST ``payload`` as JSON."""
    kwargs.setdefault("timeout", 30)
    return requests.post(url + path, json=payload, **kwargs)


# -- gunicorn's API --------------------------------------------------------------------------------

def test_health_is_healthy(url):
    r = requests.get(url + "/health", timeout=5)
    assert r.status_code == 200
    assert r.json()["status"] == "healthy" and r.json()["workers"] == "connected"


def test_send_email(url):
    r = post(url, "/api/email/send", {"to": "test@example.com", "subject": "Integration Test", "body": "Hello"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["status"] == "sent" and data["to"] == "test@example.com" and data["subject"] == "Integration Test"
    assert data["message_id"] and data["timestamp"]


def test_send_bulk_streams_a_progress_event_per_recipient_then_complete(url):
    recipients = ["a@test.com", "b@test.com", "c@test.com", "d@test.com"]
    lines = sse_lines(url, "/api/email/send-bulk", {"recipients": recipients, "subject": "Bulk", "body": "Hi"})
    assert all(line == "" or line.startswith("data: ") for line in lines), lines
    events = [json.loads(line[6:]) for line in lines if line]
    assert len(events) == len(recipients) + 1
    for i, event in enumerate(events[:-1]):
        assert (event["type"], event["current"], event["total"]) == ("progress", i + 1, 4)
        assert (event["percent"], event["last_sent"], event["status"]) == (25 * (i + 1), recipients[i], "sent")
    assert events[-1] == dict(events[-1], type="complete", total=4, sent=4, failed=0)


def test_email_stats(url):
    post(url, "/api/email/send", {"to": "x@x.com", "subject": "S", "body": "B"})
    data = requests.get(url + "/api/email/stats", timeout=10).json()
    assert data["emails_sent"] >= 1 and data["smtp_connected"] is True and "worker_pid" in data


def test_resize_image(url):
    image = png(300, 200)
    r = post(url, "/api/image/resize", {"image_data": image, "width": 60, "height": 40})
    assert r.status_code == 200, r.text
    data = r.json()
    assert (data["status"], data["target_dimensions"], data["original_size"]) == ("resized", "60x40", len(image))
    assert data["result_id"].startswith("img-") and "pil_used" in data


def test_generate_thumbnail(url):
    data = post(url, "/api/image/thumbnail", {"image_data": png(300, 200), "size": 150}).json()
    assert (data["status"], data["target_dimensions"]) == ("resized", "150x150")


def test_batch_streams_a_progress_event_per_image_then_complete(url):
    images = [{"id": "img%d" % i, "data": png(40 + i, 30)} for i in range(3)]
    events = sse_data(url, "/api/image/process-batch", {"images": images, "operation": "resize", "width": 20,
                                                        "height": 10})
    assert len(events) == len(images) + 1
    assert [(e["type"], e["current"], e["image_id"]) for e in events[:-1]] == [
        ("progress", 1, "img0"), ("progress", 2, "img1"), ("progress", 3, "img2")]
    assert all(e["result"]["target_dimensions"] == "20x10" for e in events[:-1])
    assert events[-1]["type"] == "complete" and events[-1]["total"] == 3


def test_image_stats(url):
    data = requests.get(url + "/api/image/stats", timeout=10).json()
    assert "images_processed" in data and "worker_pid" in data


def test_aggregate(url):
    rows = [{"category": "A", "value": 10}, {"category": "B", "value": 20}, {"category": "A", "value": 30}]
    for func, expected in (("sum", {"A": 40, "B": 20}), ("count", {"A": 2, "B": 1}),
                           ("list", {"A": [10, 30], "B": [20]})):
        data = post(url, "/api/data/aggregate", {"data": rows, "group_by": "category", "agg_field": "value",
                                                 "agg_func": func}).json()
        assert (data["status"], data["result"], data["record_count"]) == ("completed", expected, 3)
        assert (data["group_by"], data["agg_func"]) == ("category", func)


def test_etl_streams_extract_transform_load_then_complete(url):
    source = [{"name": "alice", "status": "active"}, {"name": "bob", "status": "inactive"},
              {"name": "charlie", "status": "active"}]
    steps = [{"name": "filter", "type": "filter", "field": "status", "value": "active"},
             {"name": "shout", "type": "map", "field": "name", "func": "upper"}]
    events = sse_data(url, "/api/data/etl", {"source_data": source, "transformations": steps})
    assert [e.get("phase") for e in events] == ["extract", "transform", "transform", "load", None]
    assert [e["step"] for e in events[:-1]] == [1, 2, 3, 4] and events[0]["total_steps"] == 4
    assert events[-1] == dict(events[-1], type="complete", records_processed=3, records_output=2,
                              transformations_applied=2)


def test_cached_query_misses_then_hits(url):
    key = "test_query_%s" % time.time()
    first = post(url, "/api/data/query", {"query_key": key, "ttl": 300}).json()
    second = post(url, "/api/data/query", {"query_key": key, "ttl": 300}).json()
    assert (first["status"], second["status"]) == ("cache_miss", "cache_hit")
    assert second["data"] == first["data"] and second["age_seconds"] >= 0


def test_data_stats(url):
    data = requests.get(url + "/api/data/stats", timeout=10).json()
    assert "tasks_completed" in data and "cache_size" in data


def test_cleanup(url, env):
    r = post(url, "/api/scheduled/cleanup", {"directory": str(env["root"] / "uploads"), "max_age_days": 7})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "completed" and "files_deleted" in r.json() and "space_freed_mb" in r.json()


def test_daily_report(url):
    data = post(url, "/api/scheduled/daily-report").json()
    assert data["status"] == "completed" and "metrics" in data and data["report_date"]


def test_sync(url):
    data = post(url, "/api/scheduled/sync", {"source": "test_source"}).json()
    assert (data["status"], data["source"]) == ("completed", "test_source") and data["records_synced"] >= 0


def test_scheduled_stats(url):
    post(url, "/api/scheduled/daily-report")
    data = requests.get(url + "/api/scheduled/stats", timeout=10).json()
    assert data["run_counts"]["generate_daily_report"] >= 1 and "generate_daily_report" in data["last_runs"]


def test_concurrent_mixed_requests_all_succeed(url):
    calls = [("/api/email/send", {"to": "x@x.com", "subject": "Concurrent", "body": "Test"}),
             ("/api/image/resize", {"image_data": png(20, 20), "width": 10, "height": 10}),
             ("/api/data/aggregate", {"data": [{"a": 1}], "group_by": "a", "agg_field": "a", "agg_func": "sum"})]
    with concurrent.futures.ThreadPoolExecutor(max_workers=9) as pool:
        results = list(pool.map(lambda c: post(url, *c), calls * 4))
    assert [r.status_code for r in results] == [200] * 12


@pytest.mark.parametrize("path, payload, loc", [
    ("/api/email/send", {}, ["body", "to"]),
    ("/api/email/send", {"to": "a@example.com", "body": "b"}, ["body", "subject"]),
    ("/api/email/send-bulk", {"subject": "s", "body": "b"}, ["body", "recipients"]),
    ("/api/data/aggregate", {"data": [], "agg_field": "v"}, ["body", "group_by"]),
    ("/api/data/etl", {"transformations": []}, ["body", "source_data"]),
    ("/api/data/query", {"ttl": 5}, ["body", "query_key"]),
    ("/api/image/process-batch", {"operation": "resize"}, ["body", "images"]),
])
def test_missing_fields_are_a_422_naming_them(url, path, payload, loc):
    r = post(url, path, payload)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert any(e["loc"] == loc and e["type"] == "missing" for e in detail), detail


# -- what greenqueue adds --------------------------------------------------------------------------

def test_emails_really_go_out_over_one_connection_per_worker(srv, env):
    before = len(env["smtp"].messages())
    answers = [post(srv.url, "/api/email/send", {"to": "u%d@example.com" % i, "subject": "Hi", "body": "one",
                                                 "html": i == 0}).json() for i in range(4)]
    assert {a["connections"] for a in answers} == {1}
    wait_for(lambda: len(env["smtp"].messages()) == before + 4, 10, message="four emails at the SMTP server")
    got = {m["To"]: m for m in env["smtp"].messages()}
    assert got["u0@example.com"].get_content_type() == "text/html"
    assert got["u1@example.com"]["Message-ID"] == answers[1]["message_id"]


def test_stats_count_every_worker_not_just_the_one_that_answers(srv):
    before = requests.get(srv.url + "/api/email/stats", timeout=10).json()["emails_sent"]
    for i in range(5):  # the pool alternates between its two workers
        assert post(srv.url, "/api/email/send", {"to": "c%d@example.com" % i, "subject": "s", "body": "b"}).ok
    assert requests.get(srv.url + "/api/email/stats", timeout=10).json()["emails_sent"] == before + 5


def test_resize_and_thumbnail_return_real_images(srv):
    from PIL import Image
    out = post(srv.url, "/api/image/resize", {"image_data": png(300, 200), "width": 60, "height": 40}).json()
    assert Image.open(io.BytesIO(base64.b64decode(out["image"]))).size == (60, 40) == (out["width"], out["height"])
    thumb = post(srv.url, "/api/image/thumbnail", {"image_data": png(300, 200), "size": 150}).json()
    assert (thumb["width"], thumb["height"]) == (150, 100)  # the aspect ratio is kept
    assert Image.open(io.BytesIO(base64.b64decode(thumb["image"]))).size == (150, 100)


@pytest.mark.parametrize("path, payload, field, words", [
    ("/api/image/resize", {"image_data": "not base64!", "width": 10, "height": 10}, "image_data", "base64"),
    ("/api/image/resize", {"image_data": base64.b64encode(b"hello").decode()}, "image_data", "not an image"),
    ("/api/image/resize", {}, "image_data", "empty"),
    ("/api/image/thumbnail", {"image_data": base64.b64encode(b"GIF89a..").decode()}, "image_data", "not an image"),
])
def test_image_data_that_does_not_decode_is_a_422_naming_the_field(srv, path, payload, field, words):
    r = post(srv.url, path, payload)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", field] and words in error["msg"]
    assert "0x" not in r.text and "Traceback" not in r.text


def test_one_bad_image_in_a_batch_is_reported_and_the_batch_goes_on(srv):
    images = [{"id": "good1", "data": png(30, 30)}, {"id": "bad", "data": base64.b64encode(b"junk").decode()},
              {"id": "good2", "data": png(30, 30)}]
    events = sse_data(srv.url, "/api/image/process-batch", {"images": images, "operation": "thumbnail", "size": 10})
    assert [(e["type"], e.get("image_id")) for e in events] == [
        ("progress", "good1"), ("progress", "bad"), ("progress", "good2"), ("complete", None)]
    bad = events[1]
    assert bad["status"] == "failed" and "images.1.data" in bad["error"] and "not an image" in bad["error"]
    assert "result" in events[0] and "result" in events[2]
    assert (events[-1]["processed"], events[-1]["failed"]) == (2, 1)


@pytest.mark.parametrize("path, payload, loc", [
    ("/api/email/send", {"to": 5, "subject": "s", "body": "b"}, ["body", "to"]),
    ("/api/email/send", {"to": "nobody", "subject": "s", "body": "b"}, ["body", "to"]),
    ("/api/email/send", {"to": "a@example.com", "subject": "s\r\nBcc: x@y.z", "body": "b"}, ["body", "subject"]),
    ("/api/email/send", {"to": "a@example.com", "subject": "s", "body": "b", "html": "yes"}, ["body", "html"]),
    ("/api/email/send-bulk", {"recipients": ["a@example.com", 7], "subject": "s", "body": "b"},
     ["body", "recipients", 1]),
    ("/api/email/send-bulk", {"recipients": "a@example.com", "subject": "s", "body": "b"}, ["body", "recipients"]),
    ("/api/image/resize", {"image_data": "", "width": "7"}, ["body", "width"]),
    ("/api/image/resize", {"width": 0}, ["body", "width"]),
    ("/api/image/resize", {"height": 100000}, ["body", "height"]),
    ("/api/image/process-batch", {"images": ["x"]}, ["body", "images", 0]),
    ("/api/image/process-batch", {"images": [{"id": 1}]}, ["body", "images", 0, "data"]),
    ("/api/image/process-batch", {"images": [{"data": 5}]}, ["body", "images", 0, "data"]),
    ("/api/image/process-batch", {"images": [], "operation": "explode"}, ["body", "operation"]),
    ("/api/data/aggregate", {"data": "nope", "group_by": "a", "agg_field": "b"}, ["body", "data"]),
    ("/api/data/aggregate", {"data": [{"a": "x", "b": "1"}], "group_by": "a", "agg_field": "b"},
     ["body", "data", 0, "b"]),
    ("/api/data/aggregate", {"data": [], "group_by": "a", "agg_field": "b", "agg_func": "max"},
     ["body", "agg_func"]),
    ("/api/data/etl", {"source_data": [], "transformations": [{"type": "explode"}]},
     ["body", "transformations", 0, "type"]),
    ("/api/data/etl", {"source_data": [], "transformations": [{"type": "map", "field": "n", "func": "rot13"}]},
     ["body", "transformations", 0, "func"]),
    ("/api/data/etl", {"source_data": [1, 2]}, ["body", "source_data", 0]),
    ("/api/data/query", {"query_key": 5}, ["body", "query_key"]),
    ("/api/data/query", {"query_key": "k", "ttl": True}, ["body", "ttl"]),
    ("/api/scheduled/cleanup", {"max_age_days": "7"}, ["body", "max_age_days"]),
    ("/api/scheduled/cleanup", {"max_age_days": -1}, ["body", "max_age_days"]),
    ("/api/scheduled/sync", {"source": ["a"]}, ["body", "source"]),
])
def test_wrong_types_and_values_are_a_422_with_a_json_detail(srv, path, payload, loc):
    r = post(srv.url, path, payload)
    assert r.status_code == 422, r.text
    assert loc in [e["loc"] for e in r.json()["detail"]], r.json()
    assert "Traceback" not in r.text and "Error:" not in r.text


@pytest.mark.parametrize("kwargs, kind", [
    ({"data": "{not json", "headers": {"Content-Type": "application/json"}}, "json_invalid"),
    ({"json": ["to"]}, "model_attributes_type"),
    ({}, "missing"),
])
def test_bodies_that_are_not_objects_are_a_422(srv, kwargs, kind):
    r = requests.post(srv.url + "/api/email/send", timeout=10, **kwargs)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == kind


def test_a_recipient_that_is_not_a_string_sends_nothing(srv, env):
    before = len(env["smtp"].messages())
    r = post(srv.url, "/api/email/send-bulk", {"recipients": ["ok@example.com", {"evil": 1}], "subject": "s",
                                               "body": "b"})
    assert r.status_code == 422
    assert post(srv.url, "/api/email/send", {"to": "sync@example.com", "subject": "marker", "body": "b"}).ok
    wait_for(lambda: any(m["To"] == "sync@example.com" for m in env["smtp"].messages()), 10, message="the marker")
    assert len(env["smtp"].messages()) == before + 1


def test_aggregate_rows_without_the_fields_fall_in_group_unknown(srv):
    out = post(srv.url, "/api/data/aggregate", {"data": [{"x": 1}, {"a": 2, "b": 3}, {"a": None, "b": 1}],
                                                "group_by": "a", "agg_field": "b"})
    assert out.status_code == 200, out.text
    assert out.json()["result"] == {"unknown": 0, "2": 3, "null": 1}


def test_etl_returns_the_rows_it_produced(srv):
    events = sse_data(srv.url, "/api/data/etl", {"source_data": [{"n": "a", "s": 1}, {"n": "b", "s": 2}],
                                                 "transformations": [{"type": "filter", "field": "s", "value": 2},
                                                                     {"type": "map", "field": "n"}]})
    assert events[-1]["output"] == [{"n": "B", "s": 2}]


def test_cleanup_deletes_only_old_files_inside_the_configured_directory(srv, env):
    root, outside = env["root"], env["tmp"] / "outside"
    old = time.time() - 10 * 86400
    for path in (root / "stale.log", root / "uploads" / "stale.png", outside / "precious.txt"):
        path.write_text("x")
        os.utime(path, (old, old))
    (root / "fresh.log").write_text("x")
    (root / "escape").symlink_to(outside)
    for directory in (str(outside), "../outside", "escape", "/etc"):
        r = post(srv.url, "/api/scheduled/cleanup", {"directory": directory, "max_age_days": 7})
        assert r.status_code == 403 and "outside" in r.json()["detail"], (directory, r.text)
    assert (outside / "precious.txt").exists()
    out = post(srv.url, "/api/scheduled/cleanup", {"max_age_days": 7}).json()  # no directory: the configured one
    assert (out["directory"], out["removed"], out["files_deleted"]) == (str(root.resolve()), ["stale.log"], 1)
    assert (root / "fresh.log").exists() and (root / "uploads" / "stale.png").exists()
    out = post(srv.url, "/api/scheduled/cleanup", {"directory": "uploads"}).json()
    assert out["removed"] == ["stale.png"]
    r = post(srv.url, "/api/scheduled/cleanup", {"directory": "missing"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "directory"]


def test_scheduled_jobs_run_from_greenqueues_scheduler(srv, env):
    def runs():
        """How often the daily report ran."""
        return requests.get(srv.url + "/api/scheduled/stats", timeout=10).json()["run_counts"].get(
            "generate_daily_report", 0)
    before = runs()
    wait_for(lambda: runs() >= before + 2, 10, message="two scheduled runs of the daily report (every 2 s)")
    report = next(env["tmp"].glob("report-*.json"))
    assert set(json.loads(report.read_text())["metrics"]) >= {"emails_sent", "images_processed"}


def test_worker_crash_during_a_batch_is_an_error_event_not_a_hang(srv):
    images = [{"id": str(i), "data": png(2500, 2500)} for i in range(40)]
    started = time.monotonic()
    with requests.post(srv.url + "/api/image/process-batch", stream=True, timeout=30,
                       json={"images": images, "operation": "resize", "width": 2000, "height": 2000}) as r:
        lines = r.iter_lines(decode_unicode=True)
        first = next(line for line in lines if line)
        assert json.loads(first[6:])["type"] == "progress"
        workers = requests.get(srv.url + "/health", timeout=5).json()["pools"]["ImageWorker"]["workers"]
        (busy,) = [w["pid"] for w in workers if w["busy"]]
        os.kill(busy, signal.SIGKILL)
        rest = [line for line in lines if line]
    assert time.monotonic() - started < 20
    assert rest[-2] == "event: error"
    error = json.loads(rest[-1][6:])
    assert (error["type"], error["exception"]) == ("error", "WorkerCrashed") and error["error"]
    events = sse_data(srv.url, "/api/image/process-batch", {"images": [{"data": png(10, 10)}]})
    assert events[-1]["type"] == "complete" and events[-1]["processed"] == 1  # the pool healed


def test_errors_are_json_like_fastapis(srv):
    r = requests.get(srv.url + "/api/nope", timeout=5)
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    assert requests.get(srv.url + "/api/email/send", timeout=5).status_code == 405
    assert "email" in requests.get(srv.url + "/", timeout=5).json()["endpoints"]


def test_a_missing_pool_is_a_503_naming_the_flag(server_factory, tmp_path):
    bare = server_factory(APP, "--dirty-app", POOLS[0], env={"CELERYALT_STATE_DIR": str(tmp_path)})
    health = requests.get(bare.url + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["detail"]["status"] == "degraded"
    assert health.json()["detail"]["missing"] == ["ImageWorker", "DataWorker", "ScheduledWorker"]
    r = requests.get(bare.url + "/api/data/stats", timeout=5)
    assert r.status_code == 503 and "--dirty-app examples.celery_alternative.workers:DataWorker" in r.json()["detail"]
