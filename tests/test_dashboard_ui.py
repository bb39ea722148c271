"""The dashboard page in a real browser: dates on far-off runs, names that wrap at dots, no favicon
request, and a filter for the recently finished list that works on a phone."""

import datetime

import pytest
import requests

from .conftest import ARTIFACTS, require_binary, wait_for

pytestmark = [pytest.mark.realproc, pytest.mark.browser]

TODAY = datetime.datetime.now(datetime.timezone.utc)
# cron counts days of the week from Sunday = 0, Python's weekday() from Monday = 0.
IN_THREE_DAYS = (TODAY.weekday() + 3 + 1) % 7

APP = '''
from flask import Flask, jsonify, request
from greenqueue import crontab, every, periodic, task

app = Flask(__name__)


@periodic(crontab("3 16 * * %d"), name="reports.accounting.weekly_summary_for_the_board")
def weekly():
    pass


@periodic(every(minutes=10), name="maintenance.housekeeping")
def housekeeping():
    pass


@task(name="monitoring.heartbeat.ping_upstream_services")
def ping():
    return "pong"


@task(name="billing.invoices.render_monthly_invoice_pdf")
def invoice():
    raise ValueError("no customer address")


@app.post("/spawn")
def spawn():
    ids = [ping.spawn().id for _ in range(int(request.args["pings"]))]
    ids += [invoice.spawn().id for _ in range(int(request.args["invoices"]))]
    return jsonify(ids=ids)
''' % IN_THREE_DAYS


@pytest.fixture
def srv(server_factory, tmp_path):
    (tmp_path / "dash_ui_app.py").write_text(APP)
    return server_factory("dash_ui_app:app", "--dashboard-path", "/_greenqueue", cwd=tmp_path)


@pytest.fixture
def browser():
    chromium = require_binary("/usr/bin/chromium", "Chromium")
    from playwright.sync_api import sync_playwright

    from .test_browser import CHROMIUM_ARGS

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def phone(browser):
    """A page the size of a phone, in a fixed locale and time zone so dates are predictable."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, locale="en-US", timezone_id="UTC",
                                  is_mobile=True, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(10000)
    return page


def finished(srv):
    return requests.get(srv.url + "/_greenqueue/state.json", timeout=5).json()["tasks"]["recent"]


def test_a_run_that_is_not_today_shows_its_date(srv, browser):
    page = phone(browser)
    page.goto(srv.url + "/_greenqueue/")
    page.wait_for_selector("#live:not(.off)", timeout=10000)
    jobs = requests.get(srv.url + "/_greenqueue/state.json", timeout=5).json()["jobs"]
    weekly = next(j for j in jobs if j["name"].endswith("weekly_summary_for_the_board"))
    due = datetime.datetime.fromisoformat(weekly["next_run"]).astimezone(datetime.timezone.utc)
    assert due.date() != TODAY.date()
    cell = page.text_content('#jobs tr[data-id="%s"] td:nth-child(3)' % weekly["name"])
    assert due.strftime("%a, %b ") + str(due.day) in cell and "4:03:00 PM" in cell, cell


def test_names_wrap_at_dots_and_the_page_fits_a_phone(srv, browser):
    requests.post(srv.url + "/spawn?pings=2&invoices=1", timeout=5)
    wait_for(lambda: len(finished(srv)) == 3, 10, message="three finished tasks")
    page = phone(browser)
    page.goto(srv.url + "/_greenqueue/")
    page.wait_for_selector("#recent td.name", timeout=10000)
    # Every text piece of a name (a word between dots and underscores) sits on one line; names do wrap.
    lines = page.evaluate("""() => [...document.querySelectorAll('td.name')].map((td) => {
        const walker = document.createTreeWalker(td, NodeFilter.SHOW_TEXT, {acceptNode: (n) =>
            n.parentElement.closest('pre') ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
        const pieces = [], tops = new Set();
        for (let n = walker.nextNode(); n; n = walker.nextNode()) {
            const range = document.createRange();
            range.selectNodeContents(n);
            const rects = [...range.getClientRects()];
            rects.forEach((r) => tops.add(Math.round(r.top)));
            pieces.push([n.textContent, rects.length]);
        }
        return {pieces, lines: tops.size};
    })""")
    assert lines, "no name cells"
    for cell in lines:
        for text, rects in cell["pieces"]:
            assert rects == 1, "%r is broken across %d lines" % (text, rects)
    assert any(cell["lines"] > 1 for cell in lines), "no name wrapped, so the test proves nothing"
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_the_page_asks_for_no_favicon(srv, browser):
    # Headless Chromium does not fetch favicons at all, so the inline icon link is what proves
    # a desktop browser has no reason to ask the app for /favicon.ico.
    page = phone(browser)
    asked, missing = [], []
    page.on("request", lambda r: asked.append(r.url))
    page.on("response", lambda r: r.status == 404 and missing.append(r.url))
    page.goto(srv.url + "/_greenqueue/")
    page.wait_for_selector("#live:not(.off)", timeout=10000)
    page.wait_for_function("() => +document.body.dataset.updates >= 2", timeout=10000)
    assert not [u for u in asked if "favicon" in u], asked
    assert not missing
    icon = page.query_selector('link[rel="icon"]')
    assert icon is not None and icon.get_attribute("href").startswith("data:image/svg+xml,")


def test_the_finished_list_filters_by_name_and_state(srv, browser):
    ids = requests.post(srv.url + "/spawn?pings=12&invoices=2", timeout=5).json()["ids"]
    wait_for(lambda: len(finished(srv)) == 14, 10, message="fourteen finished tasks")
    page = phone(browser)
    page.goto(srv.url + "/_greenqueue/")
    rows = "#recent tr[data-id]"
    page.wait_for_function("n => document.querySelectorAll('#recent tr[data-id]').length === n", arg=14,
                           timeout=10000)

    page.select_option("#filter-state", "FAILURE")
    page.wait_for_function("() => document.querySelectorAll('#recent tr[data-id]').length === 2", timeout=5000)
    assert sorted(page.eval_on_selector_all(rows, "rs => rs.map(r => r.dataset.id)")) == sorted(ids[12:])
    assert page.text_content("#n-recent") == "2 of 14"

    page.select_option("#filter-state", "")
    page.fill("#filter-name", "!heartbeat")  # hide the flood
    page.wait_for_function("() => document.querySelectorAll('#recent tr[data-id]').length === 2", timeout=5000)
    page.fill("#filter-name", "ping_upstream")
    page.wait_for_function("() => document.querySelectorAll('#recent tr[data-id]').length === 12", timeout=5000)
    page.select_option("#filter-state", "FAILURE")
    page.wait_for_selector('#recent p.empty:has-text("matches the filter")', timeout=5000)

    # The filter survives live updates and a reload.
    page.fill("#filter-name", "invoice")
    updates = int(page.evaluate("+document.body.dataset.updates || 0"))
    page.wait_for_function("n => +document.body.dataset.updates > n + 1", arg=updates, timeout=10000)
    assert page.locator(rows).count() == 2
    page.reload()
    page.wait_for_function("() => document.querySelectorAll('#recent tr[data-id]').length === 2", timeout=10000)
    assert page.input_value("#filter-name") == "invoice"
    # Big enough to hit with a thumb, and inside the screen.
    for sel in ("#filter-name", "#filter-state"):
        box = page.locator(sel).bounding_box()
        assert box["height"] >= 32 and box["x"] + box["width"] <= 390
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-phone-filtered.png"), full_page=True)
