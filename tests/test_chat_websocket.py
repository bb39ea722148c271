"""The streaming chat's WebSocket mode (/chat/ws) on a real server with a real ChatApp worker.

First with simple-websocket's client (several prompts over one socket, tokens
as they are made, errors that leave the socket open, stop, a client that
leaves), then the chat page in headless Chromium with ``?transport=ws``.
"""

import json
import time

import pytest
import requests
import simple_websocket

from .conftest import wait_for
from .nginx_support import CHAT_APP, CHAT_POOL, NginxFront, read_sse
from .test_browser import browser, page  # noqa: F401  (headless Chromium, as the SSE page's tests use it)

pytestmark = [pytest.mark.realproc]

EXPLAIN = "greenqueue keeps your web app"


def chat_server(server_factory, delay):
    """The chat with one ChatApp worker and ``delay`` seconds per token."""
    return server_factory(CHAT_APP, "--dirty-app", CHAT_POOL, "--dirty-workers", "1",
                          env={"CHAT_TOKEN_DELAY": str(delay)})


def connect(port):
    """A WebSocket to the chat."""
    return simple_websocket.Client.connect("ws://127.0.0.1:%d/chat/ws" % port)


def ask(ws, message):
    """Send ``message`` (JSON unless a str) and return ``(arrival_seconds, message)`` up to the one ending the answer."""
    ws.send(message if isinstance(message, str) else json.dumps(message))
    started = time.monotonic()
    received = []
    while True:
        raw = ws.receive(timeout=30)
        assert raw is not None, "no message within 30 s; so far: %s" % received
        msg = json.loads(raw)
        received.append((time.monotonic() - started, msg))
        if msg["type"] != "token":
            return received


def text_of(received):
    """The answer's text (thinking tokens left out)."""
    return "".join(m["text"] for _, m in received if m["type"] == "token" and m.get("phase") != "thinking")


def stats(srv):
    """The chat's /stats."""
    return requests.get(srv.url + "/stats", timeout=5).json()


def test_two_prompts_over_one_socket_stream_token_by_token(server_factory):
    srv = chat_server(server_factory, 0.03)
    ws = connect(srv.port)
    first = ask(ws, {"prompt": "please explain", "thinking": False})
    *tokens, (_, end) = first
    assert end == {"type": "done", "tokens": len(tokens)}
    assert text_of(first).startswith(EXPLAIN)
    arrivals = [t for t, _ in tokens]
    span = arrivals[-1] - arrivals[0]
    # ~80 tokens at 30 ms: a socket that buffered the answer would deliver it in one lump.
    assert len(arrivals) > 40 and span > 1.0
    assert arrivals[0] < arrivals[-1] - span * 0.8
    assert max(b - a for a, b in zip(arrivals, arrivals[1:])) < span / 2

    # Bad input gets an error naming what to fix; the socket stays open for the next prompt.
    for bad, names in [({"prompt": 42}, '"prompt"'), ({"prompt": "   "}, '"prompt"'),
                       ("not json", "JSON object"), (["prompt"], "JSON object"),
                       ({"prompt": "x" * 4001}, "longer than"), ({"prompt": "hi", "thinking": "yes"}, '"thinking"')]:
        (_, error), = ask(ws, bad)
        assert error["type"] == "error" and names in error["message"], (bad, error)

    second = ask(ws, {"prompt": "hello", "thinking": True})
    phases = [m.get("phase", "answer") for _, m in second[:-1]]
    assert phases[:5] == ["thinking"] * 5 and set(phases[5:]) == {"answer"}
    assert text_of(second).startswith("Hello! I'm a simulated assistant")
    assert second[-1][1] == {"type": "done", "tokens": len(second) - 1}

    # Both answers are recorded like the SSE route's, for /stats and the dashboard.
    def recorded():
        s = stats(srv)
        return s if s["totals"].get("exchanges") == 2 else None
    s = wait_for(recorded, 10, message="both exchanges recorded")
    assert [(e["tokens"], e["thinking"], e["outcome"]) for e in s["exchanges"]] == \
        [(len(first) - 1, False, "done"), (len(second) - 1, True, "done")]
    ws.close()
    assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()


def test_stop_ends_the_answer_and_a_prompt_sent_meanwhile_is_answered_next(server_factory):
    srv = chat_server(server_factory, 0.05)
    ws = connect(srv.port)
    ws.send(json.dumps({"prompt": "please explain"}))
    assert json.loads(ws.receive(timeout=30))["type"] == "token"
    ws.send(json.dumps({"prompt": "hi"}))  # waits its turn behind the stop below
    ws.send(json.dumps({"type": "stop"}))
    received = []
    while not received or received[-1]["type"] == "token":
        received.append(json.loads(ws.receive(timeout=30)))
    assert received[-1]["type"] == "stopped" and received[-1]["tokens"] < 20, received
    hello = []
    while not hello or hello[-1][1]["type"] == "token":
        hello.append((0, json.loads(ws.receive(timeout=30))))
    assert text_of(hello).startswith("Hello!") and hello[-1][1]["type"] == "done"
    # A stop with nothing streaming is ignored: the next answer is whole.
    ws.send(json.dumps({"type": "stop"}))
    again = ask(ws, {"prompt": "hello"})
    assert again[-1][1]["type"] == "done" and text_of(again) == text_of(hello)
    outcomes = wait_for(lambda: (lambda e: len(e) == 3 and e)([x["outcome"] for x in stats(srv)["exchanges"]]),
                        10, message="three exchanges recorded")
    assert outcomes == ["stopped", "done", "done"]
    ws.close()


def test_a_client_that_leaves_frees_the_only_worker(server_factory):
    # One worker and slow tokens: the abandoned answer would take ~8 s more to finish.
    srv = chat_server(server_factory, 0.1)
    ws = connect(srv.port)
    ws.send(json.dumps({"prompt": "please explain"}))
    assert json.loads(ws.receive(timeout=30))["type"] == "token"
    ws.close()
    started = time.monotonic()
    with requests.post(srv.url + "/chat", json={"prompt": "hi"}, stream=True, timeout=30) as r:
        _, _, data = next(read_sse(r))
    assert json.loads(data)["token"] == "Hello!"
    assert time.monotonic() - started < 1.0, "the worker was still busy with the abandoned answer"
    stopped = wait_for(lambda: [e for e in stats(srv)["exchanges"] if e["outcome"] == "stopped"], 10,
                       message="the abandoned exchange recorded as stopped")
    assert stopped[0]["tokens"] < 20


def test_without_the_pool_the_socket_says_which_flag_starts_it(server_factory):
    srv = server_factory(CHAT_APP)
    ws = connect(srv.port)
    for _ in range(2):  # and stays open
        (_, error), = ask(ws, {"prompt": "hi"})
        assert error == {"type": "error", "message": "the chat model is not running: start the server "
                                                      "with --dirty-app %s" % CHAT_POOL}
    ws.close()


@pytest.mark.nginx
def test_the_socket_streams_through_the_projects_nginx(tmp_path):
    front = NginxFront(tmp_path, env={"CHAT_TOKEN_DELAY": "0.03"}).start()
    try:
        ws = connect(front.port)
        for _ in range(2):
            received = ask(ws, {"prompt": "please explain"})
            arrivals = [t for t, m in received[:-1]]
            assert received[-1][1]["type"] == "done" and text_of(received).startswith(EXPLAIN)
            assert arrivals[0] < arrivals[-1] - 1.0  # tokens one by one, not buffered by nginx
        ws.close()
    finally:
        assert front.stop() == 0


# -- the chat page in WebSocket mode ---------------------------------------------------------------

# Records, on the browser's clock, every length the newest answer's text takes as the page renders it.
WATCH_ANSWERS = """
window.__growth = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll(".bot .answer");
  if (!answers.length) return;
  const n = answers[answers.length - 1].textContent.length;
  const last = window.__growth[window.__growth.length - 1];
  if (n && (!last || last[1] !== n || last[0] !== answers.length)) window.__growth.push([answers.length, n, performance.now()]);
}).observe(document, { childList: true, subtree: true, characterData: true });
"""


def watch(page):
    """Record the page's WebSockets (with their received frames) and its requests to /chat."""
    seen = {"sockets": [], "frames": [], "chat_posts": []}

    def on_socket(ws):
        seen["sockets"].append(ws.url)
        ws.on("framereceived", lambda payload: seen["frames"].append(payload))
    page.on("websocket", on_socket)
    page.on("request", lambda r: r.url.endswith("/chat") and seen["chat_posts"].append(r.url))
    page.add_init_script(WATCH_ANSWERS)
    return seen


def answer_text(page):
    """The text of the newest answer."""
    return page.eval_on_selector_all(".bot .answer", "els => els.length ? els[els.length - 1].textContent : ''")


def send(page, prompt):
    """Type ``prompt`` and send it; return the number of finished answers before it."""
    before = len(page.query_selector_all(".bot[data-done]"))
    page.fill("#prompt", prompt)
    page.click("#send")
    return before


@pytest.mark.browser
@pytest.mark.slow
def test_the_page_streams_answers_over_one_websocket(server_factory, page):  # noqa: F811
    srv = chat_server(server_factory, 0.04)
    seen = watch(page)
    page.goto(srv.url + "/?transport=ws")
    assert page.input_value("#transport") == "ws"
    for n, (prompt, start) in enumerate([("please explain", EXPLAIN), ("how does streaming work", "Streaming works")]):
        send(page, prompt)
        page.wait_for_function("n => document.querySelectorAll('.bot[data-done]').length > n", arg=n,
                               timeout=30000)
        assert answer_text(page).startswith(start)
        growth = [(length, at) for i, length, at in page.evaluate("window.__growth") if i == n + 1]
        # Streamed: the answer took many lengths, the first long before the last (~3 s of tokens).
        assert len(growth) >= 20, "the answer did not grow token by token: %s" % growth
        assert growth[-1][0] == len(answer_text(page))
        assert growth[-1][1] - growth[0][1] > 1000, growth
    assert not page.query_selector(".bot .error")
    assert not page.query_selector(".cursor"), "a cursor was left behind"
    # One WebSocket to /chat/ws carried both answers, and the SSE route was never asked.
    assert seen["sockets"] == ["ws://127.0.0.1:%d/chat/ws" % srv.port]
    tokens = [json.loads(f) for f in seen["frames"]]
    assert [m["type"] for m in tokens].count("done") == 2 and len(tokens) > 100
    assert seen["chat_posts"] == []
    totals = wait_for(lambda: (lambda t: t.get("done") == 2 and t)(stats(srv)["totals"]), 10,
                      message="both exchanges recorded")
    assert totals["exchanges"] == 2


@pytest.mark.browser
@pytest.mark.slow
def test_the_switch_picks_the_websocket_and_errors_and_stop_show_on_the_page(server_factory, page):  # noqa: F811
    srv = chat_server(server_factory, 0.04)
    seen = watch(page)
    page.goto(srv.url + "/")
    assert page.input_value("#transport") == "sse"  # the default
    page.select_option("#transport", "ws")
    assert page.url.endswith("/?transport=ws")  # a reload keeps the mode
    # Over the server's limit (the textarea's maxlength is bypassed): the server's message, socket kept.
    page.eval_on_selector("#prompt", "el => { el.removeAttribute('maxlength'); el.value = 'x'.repeat(4001); }")
    page.click("#send")
    page.wait_for_selector(".bot[data-error] .error", timeout=10000)
    assert "longer than" in page.text_content(".bot .error")
    page.check("#thinking")
    send(page, "hi")
    page.wait_for_selector(".bot[data-done]", timeout=30000)
    assert page.text_content(".bot[data-done] .thinking").strip() == "[thinking...]"
    assert answer_text(page).startswith("Hello!")
    page.uncheck("#thinking")
    send(page, "please explain")
    wait_for(lambda: len(answer_text(page)) > 10, 15, message="the first tokens")
    page.click("#stop")
    page.wait_for_selector(".bot[data-stopped]", timeout=5000)
    stopped_at = len(answer_text(page))
    assert page.is_enabled("#send") and page.is_enabled("#transport")
    # The only worker is free at once (the stopped answer had ~2 s to go).
    started = time.monotonic()
    with requests.post(srv.url + "/chat", json={"prompt": "hi"}, stream=True, timeout=30) as r:
        _, _, data = next(read_sse(r))
    assert json.loads(data)["token"] == "Hello!"
    assert time.monotonic() - started < 1.0
    assert len(answer_text(page)) == stopped_at, "tokens kept arriving after Stop"
    assert seen["sockets"] == ["ws://127.0.0.1:%d/chat/ws" % srv.port] and seen["chat_posts"] == []
    outcomes = wait_for(lambda: (lambda e: len(e) >= 2 and e)([x["outcome"] for x in stats(srv)["exchanges"]]),
                        10, message="the page's two exchanges recorded")
    assert outcomes[:2] == ["done", "stopped"]
