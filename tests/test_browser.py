"""The chat page in a real headless Chromium, through a real nginx."""

import json
import time

import pytest
import requests

from .conftest import ARTIFACTS, require_binary, wait_for
from .nginx_support import CHAT_POOL, NginxFront, read_sse

pytestmark = [pytest.mark.realproc, pytest.mark.nginx, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def front(tmp_path):
    """nginx in front of the chat, with tokens slow enough to watch."""
    f = NginxFront(tmp_path, args=("--dirty-app", CHAT_POOL, "--dirty-workers", "1"),
                   env={"CHAT_TOKEN_DELAY": "0.04"})
    f.start()
    yield f
    assert f.stop() == 0


@pytest.fixture
def fast_front(tmp_path):
    """nginx in front of the chat, with fast tokens."""
    f = NginxFront(tmp_path, args=("--dirty-app", CHAT_POOL, "--dirty-workers", "1"),
                   env={"CHAT_TOKEN_DELAY": "0.004"})
    f.start()
    yield f
    assert f.stop() == 0


@pytest.fixture
def browser():
    """Headless Chromium."""
    require_binary(CHROMIUM, "Chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A phone-sized page."""
    return browser.new_context(viewport={"width": 420, "height": 760}).new_page()


@pytest.fixture
def wide_page(browser):
    """A 1280x800 page."""
    return browser.new_context(viewport={"width": 1280, "height": 800}).new_page()


def gap_above_form(page, selector):
    """Pixels between the bottom of the last ``selector`` element and the top of the input form (< 0: hidden)."""
    return page.evaluate("""sel => {
        const els = document.querySelectorAll(sel);
        const last = els[els.length - 1].getBoundingClientRect();
        return document.getElementById("form").getBoundingClientRect().top - last.bottom;
    }""", selector)


def exchange(page, prompt):
    """Send ``prompt`` and wait until its answer is complete."""
    before = len(page.query_selector_all(".bot[data-done]"))
    page.fill("#prompt", prompt)
    page.click("#send")
    wait_for(lambda: len(page.query_selector_all(".bot[data-done]")) > before, 30, message="the answer to " + prompt)


def answer_text(page):
    """The text of the newest answer."""
    return page.eval_on_selector_all(".bot .answer", "els => els.length ? els[els.length - 1].textContent : ''")


def test_answer_grows_token_by_token_in_the_browser(front, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(front.url + "/")
    page.fill("#prompt", "please explain")
    page.click("#send")
    lengths = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lengths.append(len(answer_text(page)))
        if page.query_selector(".bot[data-done]"):
            break
        page.wait_for_timeout(50)  # the browser's own clock: sample the DOM as it changes
    assert page.query_selector(".bot[data-done]"), "the stream never finished"
    growing = sorted(set(n for n in lengths if n > 0))
    assert len(growing) >= 5, "the answer did not grow token by token: %s" % lengths
    assert answer_text(page).startswith("greenqueue keeps your web app")
    assert not page.query_selector(".bot .error")
    page.screenshot(path=str(ARTIFACTS / "chat-answer.png"), full_page=True)


def test_thinking_is_shown_apart_from_the_answer(front, page):
    page.goto(front.url + "/")
    page.check("#thinking")
    page.fill("#prompt", "hi")
    page.click("#send")
    page.wait_for_selector(".bot[data-done]", timeout=30000)
    assert page.text_content(".bot .thinking").strip() == "[thinking...]"
    assert answer_text(page).startswith("Hello!")
    assert "thinking" not in answer_text(page)


def test_the_newest_exchange_is_never_hidden_behind_the_form(fast_front, wide_page):
    page = wide_page
    page.goto(fast_front.url + "/")
    for prompt in ("please explain", "show me code", "how does streaming work"):
        exchange(page, prompt)
        assert gap_above_form(page, ".bot") >= 0, "answer to %r is under the form" % prompt
    page.fill("#prompt", "explain it again")
    page.click("#send")
    gaps = []
    deadline = time.monotonic() + 30
    while not page.query_selector(".bot:last-child[data-done]") and time.monotonic() < deadline:
        gaps.append(gap_above_form(page, ".bot"))  # while the fourth answer streams in
    gaps.append(gap_above_form(page, ".bot"))
    assert page.evaluate("document.documentElement.scrollHeight > innerHeight"), "the page never filled up"
    assert min(gaps) >= 0, "the streaming answer went under the form: %s" % gaps
    assert gap_above_form(page, ".user") >= 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-four-exchanges.png"))


def test_code_fences_render_as_a_code_block(fast_front, page):
    page.goto(fast_front.url + "/")
    exchange(page, "show me code")
    block = page.query_selector(".bot .answer pre code")
    assert block, "no code block in: %s" % page.inner_html(".bot .answer")
    code = block.text_content()
    assert code.startswith("class ChatApp(DirtyApp):") and "yield token" in code
    assert "```" not in answer_text(page)
    assert answer_text(page).startswith("Here is a tiny example")


def test_stop_button_ends_the_stream_and_frees_the_worker(front, page):
    page.goto(front.url + "/")
    for _ in range(2):
        exchange(page, "show me code")  # fill the page, so the note would land under the form
    page.fill("#prompt", "please explain")
    page.click("#send")
    wait_for(lambda: len(answer_text(page)) > 10, 15, message="the first tokens")
    page.click("#stop")
    page.wait_for_selector(".bot[data-stopped]", timeout=5000)
    assert page.is_visible(".bot .stopped") and gap_above_form(page, ".bot .stopped") >= 0
    stopped_at = len(answer_text(page))
    page.screenshot(path=str(ARTIFACTS / "chat-stopped.png"), full_page=True)
    # The only worker was mid-answer (~2 s left); it must be free for the next prompt now.
    started = time.monotonic()
    with requests.post(front.url + "/chat", json={"prompt": "hi"}, stream=True, timeout=30) as r:
        _, _, data = next(read_sse(r))
    assert json.loads(data)["token"] == "Hello!"
    assert time.monotonic() - started < 1.0
    assert len(answer_text(page)) == stopped_at, "tokens kept arriving after Stop"


def test_server_errors_are_shown_to_the_user(front, page):
    page.goto(front.url + "/")
    page.fill("#prompt", "x" * 4001)  # over the server's limit; the textarea's maxlength is bypassed
    page.eval_on_selector("#prompt", "el => { el.removeAttribute('maxlength'); el.value = 'x'.repeat(4001); }")
    page.click("#send")
    page.wait_for_selector(".bot .error", timeout=10000)
    assert "longer than" in page.text_content(".bot .error")


# Counts the page's fetches, and how many are not yet fully handled (their JSON read); evaluated
# from the test, "0 open" means the page's callbacks for them have run.
COUNT_FETCHES = """
window.__polls = 0; window.__open = 0;
const realFetch = window.fetch;
window.fetch = function (...args) {
  window.__polls++; window.__open++;
  return realFetch.apply(this, args).then(r => {
    const json = r.json.bind(r);
    r.json = () => json().finally(() => { window.__open--; });
    return r;
  }, err => { window.__open--; throw err; });
};
"""


def test_thanks_page_shows_a_failed_thumbnail_and_stops_polling(server_factory, tmp_path, page):
    from .test_contact_app import SMTPServer, contact_server, submit

    smtp = SMTPServer(tmp_path).start()
    try:
        srv = contact_server(server_factory, tmp_path, smtp.port)
        r = submit(srv, files={"image": ("broken.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 50, "image/png")})
        page.add_init_script(COUNT_FETCHES)
        page.clock.install()  # the page's setTimeout runs on a clock the test moves
        page.goto(srv.url + r.headers["Location"])

        def quiet():
            """No fetch of the page is waiting for its answer to be handled."""
            return page.evaluate("window.__open") == 0

        def settled():
            """Advance the page clock a second; true once the failure and the sent email show."""
            wait_for(quiet, 10, message="the page's poll to be handled")
            page.clock.run_for(1000)
            return page.query_selector("#thumb .error") and page.text_content("#email-state") == "SUCCESS"
        wait_for(settled, 20, message="the failed thumbnail and the sent email on the page")
        assert "could not make a thumbnail" in page.text_content("#thumb")
        wait_for(quiet, 10, message="the last poll to be handled")
        seen = page.evaluate("window.__polls")
        for _ in range(5):
            page.clock.run_for(1500)
            wait_for(quiet, 10, message="a poll to be handled")
        assert page.evaluate("window.__polls") == seen, "the page kept polling"
    finally:
        smtp.stop()
