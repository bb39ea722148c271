"""Prometheus metrics and the live dashboard on a real server, one test in a real browser."""

import shutil

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ARTIFACTS, ROOT, require_binary, wait_for

pytestmark = pytest.mark.realproc

APP = "tests.apps.dash_app:app"
SLOW = "tests.apps.dash_app.slow_report"
BROKEN = "tests.apps.dash_app.broken_import"


@pytest.fixture
def srv(server_factory):
    return server_factory(APP, "--metrics-path", "/metrics", "--dashboard-path", "/_greenqueue")


def sample(srv, name, **labels):
    text = requests.get(srv.url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def spawn(srv, kind):
    return requests.post(srv.url + "/spawn/" + kind, timeout=5).json()["id"]


def test_metrics_move_as_tasks_run(srv):
    assert sample(srv, "greenqueue_tasks_finished_total", task=BROKEN, state="FAILURE") == 0
    spawn(srv, "broken")
    wait_for(lambda: sample(srv, "greenqueue_tasks_finished_total", task=BROKEN, state="FAILURE") == 1, 10)
    spawn(srv, "slow")
    wait_for(lambda: sample(srv, "greenqueue_tasks", state="running") == 1, 10, message="a running task")
    requests.post(srv.url + "/release", timeout=5)
    wait_for(lambda: sample(srv, "greenqueue_tasks_finished_total", task=SLOW, state="SUCCESS") == 1, 10)
    assert sample(srv, "greenqueue_tasks", state="running") == 0
    assert sample(srv, "greenqueue_task_duration_seconds_count", task=SLOW) == 1
    assert sample(srv, "greenqueue_tasks_spawned_total", task=SLOW) == 1
    assert sample(srv, "greenqueue_http_requests_total", status="200") >= 3
    assert sample(srv, "greenqueue_http_connections") >= 1
    assert sample(srv, "greenqueue_process_rss_bytes") > 1e6


def test_worker_pool_metrics(server_factory):
    srv = server_factory("examples.streaming_chat.app:app", "--dirty-app",
                         "examples.streaming_chat.chat_app:ChatApp", "--dirty-workers", "2",
                         "--metrics-path", "/metrics", env={"CHAT_TOKEN_DELAY": "0"})
    requests.post(srv.url + "/chat/sync", json={"prompt": "hi"}, timeout=10)
    assert sample(srv, "greenqueue_workers", pool="ChatApp", state="alive") == 2
    assert sample(srv, "greenqueue_worker_calls_total", pool="ChatApp") == 1
    assert sample(srv, "greenqueue_procpool_seconds_count", pool="ChatApp", kind="call") == 1
    assert sample(srv, "greenqueue_worker_rss_bytes", pool="ChatApp") > 1e6


def test_access_is_loopback_only_by_default_and_token_opens_it(server_factory):
    closed = server_factory(APP, "--metrics-path", "/metrics", "--dashboard-path", "/_greenqueue",
                            "--dashboard-allow-ips", "10.0.0.0/8")
    for path in ("/metrics", "/_greenqueue/", "/_greenqueue/state.json"):
        r = requests.get(closed.url + path, timeout=5)
        assert r.status_code == 403 and "--dashboard-allow-ips" in r.text
    assert requests.get(closed.url + "/release", timeout=5).status_code == 405  # the app itself is untouched
    tokened = server_factory(APP, "--metrics-path", "/metrics", "--dashboard-path", "/_greenqueue",
                             "--dashboard-allow-ips", "10.0.0.0/8", "--dashboard-token", "s3cret")
    assert requests.get(tokened.url + "/metrics", timeout=5).status_code == 401
    assert requests.get(tokened.url + "/metrics", headers={"Authorization": "Bearer nope"}, timeout=5).status_code == 401
    assert requests.get(tokened.url + "/metrics", headers={"Authorization": "Bearer s3cret"},
                        timeout=5).status_code == 200
    session = requests.Session()
    assert session.get(tokened.url + "/_greenqueue/?token=s3cret", timeout=5).status_code == 200
    assert session.get(tokened.url + "/_greenqueue/state.json", timeout=5).status_code == 200  # the cookie


def test_actions_need_post_and_the_csrf_token(srv):
    task_id = spawn(srv, "slow")
    url = srv.url + "/_greenqueue/tasks/%s/cancel" % task_id
    assert requests.get(url, timeout=5).status_code == 405
    assert requests.post(url, timeout=5).status_code == 403
    page = requests.get(srv.url + "/_greenqueue/", timeout=5).text
    csrf = page.split('name="csrf-token" content="')[1].split('"')[0]
    r = requests.post(url, headers={"X-CSRF-Token": csrf}, timeout=5)
    assert r.status_code == 200 and r.json() == {"cancelled": True, "state": "CANCELLED"}
    state = requests.get(srv.url + "/_greenqueue/state.json", timeout=5).json()
    assert state["tasks"]["recent"][0]["state"] == "CANCELLED"
    retry = requests.post(srv.url + "/_greenqueue/tasks/%s/retry" % task_id, headers={"X-CSRF-Token": csrf},
                          timeout=5)
    assert retry.status_code == 409 and "journal" in retry.json()["error"]


def test_retry_button_action_reruns_a_failed_journaled_task(server_factory, tmp_path):
    srv = server_factory(APP, "--dashboard-path", "/_greenqueue", "--journal", str(tmp_path / "j.db"))
    task_id = spawn(srv, "broken")
    wait_for(lambda: requests.get(srv.url + "/_greenqueue/state.json", timeout=5).json()["tasks"]["recent"], 10)
    csrf = requests.get(srv.url + "/_greenqueue/", timeout=5).text.split('content="')[2].split('"')[0]
    r = requests.post(srv.url + "/_greenqueue/tasks/%s/retry" % task_id, headers={"X-CSRF-Token": csrf}, timeout=5)
    assert r.status_code == 200 and r.json()["retried"] is True
    wait_for(lambda: sum(1 for t in requests.get(srv.url + "/_greenqueue/state.json", timeout=5).json()
                         ["tasks"]["recent"] if t["id"] == task_id and t["state"] == "FAILURE") == 1, 10)


def test_durable_delayed_tasks_show_count_and_cancel_like_the_rest(server_factory, tmp_path):
    # With a journal a delayed @task is a row in the store, not in this process's heap:
    # the dashboard and the metrics read it through the store all the same.
    srv = server_factory(APP, "--dashboard-path", "/_greenqueue", "--metrics-path", "/metrics",
                         "--journal", str(tmp_path / "j.db"))
    task_id = requests.post(srv.url + "/later/600", timeout=5).json()["id"]
    state = requests.get(srv.url + "/_greenqueue/state.json", timeout=5).json()
    assert [t["id"] for t in state["tasks"]["scheduled"]] == [task_id]
    assert state["counts"]["scheduled"] == 1
    assert sample(srv, "greenqueue_tasks", state="scheduled") == 1
    csrf = requests.get(srv.url + "/_greenqueue/", timeout=5).text.split('name="csrf-token" content="')[1].split('"')[0]
    r = requests.post(srv.url + "/_greenqueue/tasks/%s/cancel" % task_id, headers={"X-CSRF-Token": csrf}, timeout=5)
    assert r.status_code == 200 and r.json() == {"cancelled": True, "state": "CANCELLED"}
    state = requests.get(srv.url + "/_greenqueue/state.json", timeout=5).json()
    assert state["tasks"]["scheduled"] == [] and state["counts"]["scheduled"] == 0
    assert [t["state"] for t in state["tasks"]["recent"] if t["id"] == task_id] == ["CANCELLED"]


def test_startup_line_links_the_dashboard(srv):
    assert "dashboard: %s/_greenqueue/" % srv.url in srv.log()
    assert "metrics: %s/metrics" % srv.url in srv.log()


@pytest.mark.browser
def test_dashboard_shows_tasks_live_in_a_real_browser(srv):
    chromium = require_binary("/usr/bin/chromium", "Chromium")
    from playwright.sync_api import sync_playwright

    from .test_browser import CHROMIUM_ARGS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1100, "height": 900}).new_page()
            page.goto(srv.url + "/_greenqueue/")
            page.wait_for_selector("#live:not(.off)", timeout=10000)
            slow_id = spawn(srv, "slow")
            row = '#running tr[data-id="%s"]' % slow_id
            page.wait_for_selector(row, timeout=10000)  # appears without a reload
            assert "3 / 3" in page.text_content(row)
            requests.post(srv.url + "/release", timeout=5)
            page.wait_for_selector('#recent tr[data-id="%s"] .state.SUCCESS' % slow_id, timeout=10000)
            assert not page.query_selector(row)
            bad_id = spawn(srv, "broken")
            failed = '#recent tr[data-id="%s"]' % bad_id
            page.wait_for_selector(failed + " .state.FAILURE", timeout=10000)
            assert "ValueError: the CSV has no header row" in page.text_content(failed + " pre.tb")
            assert "tests.apps.dash_app.housekeeping" in page.text_content("#jobs")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    shutil.copy(ARTIFACTS / "dashboard.png", ARTIFACTS / "dashboard-latest.png")
    assert (ROOT / "docs" / "dashboard.png").exists(), "the README's screenshot is missing"


def test_allow_ips_star_admits_every_address_and_the_default_only_this_host():
    from greenqueue.config import parse_ips
    from greenqueue.dashboard.web import Observability

    def admitted(*allow_ips):
        obs = Observability(lambda environ, start_response: [], None, "/metrics", None, *allow_ips)
        return [obs._ip_ok({"REMOTE_ADDR": addr}) for addr in ("10.1.2.3", "127.0.0.1")]

    assert admitted(parse_ips("*")) == [True, True]  # '*' parses to None: every address
    assert admitted() == [False, True]               # nothing said: this host only
    assert admitted(parse_ips("10.0.0.0/8")) == [True, False]
