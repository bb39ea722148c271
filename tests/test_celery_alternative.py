"""The celery_alternative example: four real worker pools, a real SMTP server, SSE progress."""

import base64
import io
import json
import os
import signal
import time

import pytest
import requests

from .nginx_support import read_sse
from .test_contact_app import SMTPServer

pytestmark = pytest.mark.realproc

APP = "examples.celery_alternative.app:app"
POOLS = ["examples.celery_alternative.workers:%s" % n for n in ("EmailWorker", "ImageWorker", "DataWorker",
                                                                "ScheduledWorker")]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("celeryalt")
    smtp = SMTPServer(tmp).start()
    (tmp / "old").mkdir()
    yield {"tmp": tmp, "smtp": smtp}
    smtp.stop()


@pytest.fixture(scope="module")
def srv(env):
    from .conftest import ServerProcess

    args = []
    for p in POOLS:
        args += ["--dirty-app", p]
    s = ServerProcess(APP, *args, env={"CELERYALT_SMTP_PORT": str(env["smtp"].port),
                                        "CELERYALT_REPORT_DIR": str(env["tmp"]),
                                        "CELERYALT_CLEANUP_DIR": str(env["tmp"] / "old"),
                                        "CELERYALT_REPORT_CRON": "*/2 * * * * *"},
                      tmp_path=env["tmp"])
    s.start()
    yield s
    assert s.stop() == 0


def png(w, h, color=(10, 120, 200)):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def sse(srv, path, payload):
    with requests.post(srv.url + path, json=payload, stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
        return [(t, e, d) for t, e, d in read_sse(r)]


def test_health_lists_all_four_pools(srv):
    body = requests.get(srv.url + "/health", timeout=5).json()
    assert body["status"] == "ok"
    assert set(body["pools"]) == {"EmailWorker", "ImageWorker", "DataWorker", "ScheduledWorker"}


def test_send_email_reuses_one_smtp_connection(srv, env):
    before = len(env["smtp"].messages())
    first = requests.post(srv.url + "/api/email/send", json={"to": "a@example.com", "subject": "Hi",
                                                             "body": "one"}, timeout=10).json()
    second = requests.post(srv.url + "/api/email/send", json={"to": "b@example.com", "subject": "Hi",
                                                              "body": "two"}, timeout=10).json()
    assert first["status"] == "sent" and second["connections"] == first["connections"]
    assert len(env["smtp"].messages()) == before + 2


def test_bulk_email_streams_progress_before_completion(srv, env):
    recipients = ["user%d@example.com" % i for i in range(5)]
    events = sse(srv, "/api/email/send-bulk", {"recipients": recipients, "subject": "News", "body": "Hello!"})
    items = [json.loads(d) for _, _, d in events[:-1]]
    assert [i["type"] for i in items] == ["progress"] * 5 + ["complete"]
    assert [i["percent"] for i in items[:-1]] == [20, 40, 60, 80, 100]
    assert items[-1]["sent"] == 5 and events[-1][2] == "[DONE]"
    tos = {m["To"] for m in env["smtp"].messages()}
    assert set(recipients) <= tos


def test_resize_returns_the_resized_png(srv):
    from PIL import Image
    out = requests.post(srv.url + "/api/image/resize", json={"image_data": png(300, 200), "width": 60,
                                                             "height": 40}, timeout=10).json()
    assert (out["width"], out["height"]) == (60, 40)
    assert Image.open(io.BytesIO(base64.b64decode(out["image"]))).size == (60, 40)


def test_batch_progress_arrives_before_completion(srv):
    events = sse(srv, "/api/image/process-batch", {"images": [png(400, 300)] * 4, "operation": "thumbnail"})
    items = [json.loads(d) for _, _, d in events[:-1]]
    assert [i["type"] for i in items] == ["progress"] * 4 + ["complete"]
    times = [t for t, _, _ in events]
    assert times == sorted(times)
    assert items[-1]["results"][0] == {"width": 128, "height": 96, "mode": "RGB"}


def test_worker_crash_during_a_batch_is_an_error_event_not_a_hang(srv):
    pid = requests.get(srv.url + "/health", timeout=5).json()["pools"]["ImageWorker"]["workers"][0]["pid"]
    started = time.monotonic()
    with requests.post(srv.url + "/api/image/process-batch", stream=True, timeout=30,
                       json={"images": [png(2500, 2500)] * 40, "operation": "grayscale"}) as r:
        events = read_sse(r)
        first = next(events)
        assert json.loads(first[2])["type"] == "progress"
        os.kill(pid, signal.SIGKILL)
        rest = list(events)
    assert time.monotonic() - started < 20
    errors = [json.loads(d) for _, e, d in rest if e == "error"]
    assert errors and errors[0]["type"] == "WorkerCrashed"
    assert rest[-1][2] == "[DONE]"
    # The pool healed: the next batch works.
    assert json.loads(sse(srv, "/api/image/process-batch", {"images": [png(10, 10)], "operation": "grayscale"})
                      [-2][2])["type"] == "complete"


def test_aggregate(srv):
    data = [{"city": "Berlin", "n": 2}, {"city": "Paris", "n": 5}, {"city": "Berlin", "n": 3}]
    out = requests.post(srv.url + "/api/data/aggregate", json={"data": data, "group_by": "city",
                                                               "agg_field": "n"}, timeout=10).json()
    assert out == {"groups": {"Berlin": 5, "Paris": 5}, "rows": 3}


def test_etl_streams_each_step(srv):
    rows = [{"v": i} for i in range(10)]
    steps = [{"op": "filter_gt", "field": "v", "value": 4}, {"op": "multiply", "field": "v", "value": 10},
             {"op": "rename", "field": "v", "to": "value"}]
    items = [json.loads(d) for _, _, d in sse(srv, "/api/data/etl", {"source_data": rows,
                                                                     "transformations": steps})[:-1]]
    assert [i.get("step") for i in items[:-1]] == [1, 2, 3]
    assert items[-1]["rows"] == [{"value": v * 10} for v in range(5, 10)]


def test_cached_query_is_cached_in_the_worker(srv):
    first = requests.post(srv.url + "/api/data/query", json={"query_key": "top-users"}, timeout=10).json()
    second = requests.post(srv.url + "/api/data/query", json={"query_key": "top-users"}, timeout=10).json()
    assert first["cached"] is False and second["cached"] is True
    assert second["result"] == first["result"]


def test_scheduled_jobs_run_from_greenqueues_scheduler(srv, env):
    from .conftest import wait_for
    wait_for(lambda: list(env["tmp"].glob("report-*.txt")), 10, message="the scheduled daily report")
    old = env["tmp"] / "old" / "stale.log"
    old.write_text("x")
    os.utime(old, (time.time() - 10 * 86400,) * 2)
    out = requests.post(srv.url + "/api/scheduled/cleanup", json={"max_age_days": 7}, timeout=10).json()
    assert out == {"removed": ["stale.log"]}


@pytest.mark.parametrize("path, payload, message", [
    ("/api/email/send", {"to": "a@example.com"}, "'subject' is required"),
    ("/api/email/send-bulk", {"recipients": [], "subject": "s", "body": "b"}, "must not be empty"),
    ("/api/image/resize", {"image_data": "x", "width": 0, "height": 10}, "between 1 and 4096"),
    ("/api/image/process-batch", {"images": ["x"], "operation": "explode"}, "'operation' must be"),
    ("/api/data/aggregate", {"data": "nope", "group_by": "a", "agg_field": "b"}, "'data' must be list"),
    ("/api/data/etl", {"source_data": [], "transformations": []}, "must not be empty"),
    ("/api/data/query", {"query_key": 5}, "'query_key' must be str"),
    ("/api/scheduled/cleanup", {"max_age_days": "7"}, "'max_age_days' must be int"),
])
def test_bad_input_is_a_400_json_error(srv, path, payload, message):
    r = requests.post(srv.url + path, json=payload, timeout=10)
    assert r.status_code == 400 and message in r.json()["error"]
