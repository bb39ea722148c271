"""The streaming_chat example over real HTTP, with a real ChatApp worker process.

The first half ports gunicorn's examples/streaming_chat/test_streaming.py: it
uses only gunicorn's API, so it passes against gunicorn's example too (set
``STREAMING_CHAT_URL=http://host:port`` to point it elsewhere; the
greenqueue-only half is then skipped). The second half checks what greenqueue
adds: the thinking phase field, /stats, a task per exchange on the dashboard,
JSON errors, and a worker freed when the client leaves.
"""

import json
import os
import time

import pytest
import requests

from .conftest import ServerProcess, wait_for
from .nginx_support import CHAT_APP, CHAT_POOL, read_sse

pytestmark = pytest.mark.realproc

EXTERNAL = os.environ.get("STREAMING_CHAT_URL")


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """The chat server, started as `make run` starts it."""
    if EXTERNAL:
        pytest.skip("greenqueue-only behaviour; STREAMING_CHAT_URL points elsewhere")
    # The command `make run` uses, on a free port and with fast tokens.
    srv = ServerProcess(CHAT_APP, "--dirty-app", CHAT_POOL, "--dirty-workers", "1", "--dashboard-path",
                        "/_greenqueue", "--metrics-path", "/metrics", env={"CHAT_TOKEN_DELAY": "0.002"},
                        tmp_path=tmp_path_factory.mktemp("chat"))
    srv.start()
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def url(request):
    """Base URL of the chat under test: ours, or STREAMING_CHAT_URL."""
    return EXTERNAL or request.getfixturevalue("chat").url


def tokens(url, prompt, thinking=False):
    """POST /chat and return the ``token`` of each event before [DONE], as gunicorn's client reads them."""
    with requests.post(url + "/chat", json={"prompt": prompt, "thinking": thinking}, stream=True,
                       headers={"Accept": "text/event-stream"}, timeout=30) as r:
        assert r.status_code == 200, r.text
        out = []
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                if line[6:] == "[DONE]":
                    return out
                out.append(json.loads(line[6:])["token"])
    raise AssertionError("the stream ended without [DONE]")


# -- gunicorn's API --------------------------------------------------------------------------------

def test_health_is_exactly_ok(url):
    r = requests.get(url + "/health", timeout=5)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_chat_streams_tokens_as_sse(url):
    with requests.post(url + "/chat", json={"prompt": "hello"}, stream=True, timeout=30,
                       headers={"Accept": "text/event-stream"}) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert r.headers["Cache-Control"] == "no-cache" and r.headers["X-Accel-Buffering"] == "no"
        lines = list(r.iter_lines(decode_unicode=True))
    assert all(line == "" or line.startswith("data: ") for line in lines), lines
    data = [line[6:] for line in lines if line]
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    text = "".join(json.loads(d)["token"] for d in data[:-1])
    assert len(data) > 10 and "hello" in text.lower()


def test_sync_returns_the_whole_response(url):
    r = requests.post(url + "/chat/sync", json={"prompt": "hello"}, timeout=30)
    assert r.status_code == 200 and len(r.json()["response"]) > 10


def test_thinking_mode_streams_the_bracketed_thinking_phase_first(url):
    toks = tokens(url, "hello", thinking=True)
    text = "".join(toks)
    assert toks[:5] == ["[thinking", ".", ".", ".", "]\n\n"]
    assert text.startswith("[thinking...]\n\n") and "...]" in text
    assert "hello" in text[len("[thinking...]\n\n"):].lower()


def test_different_prompts_get_different_responses(url):
    prompts = ["hello", "explain dirty workers", "how does streaming work?", "show me code", "what is this?"]
    responses = [requests.post(url + "/chat/sync", json={"prompt": p}, timeout=30).json()["response"]
                 for p in prompts]
    assert len(set(responses)) == len(prompts)


def test_sync_matches_the_streamed_text(url):
    for thinking in (False, True):
        streamed = "".join(tokens(url, "explain", thinking))
        r = requests.post(url + "/chat/sync", json={"prompt": "explain", "thinking": thinking}, timeout=30)
        assert r.json() == {"response": streamed}


# -- what greenqueue adds --------------------------------------------------------------------------

def events(srv, prompt, thinking=False):
    """POST /chat and return the parsed JSON items before [DONE]."""
    with requests.post(srv.url + "/chat", json={"prompt": prompt, "thinking": thinking}, stream=True,
                       timeout=30) as r:
        assert r.status_code == 200, r.text
        items = [data for _, _, data in read_sse(r)]
    assert items[-1] == "[DONE]"
    return [json.loads(d) for d in items[:-1]]


@pytest.mark.parametrize("prompt, start", [
    ("hello there", "Hello! I'm a simulated assistant"),
    ("please explain", "greenqueue keeps your web app"),
    ("how does streaming work", "Streaming works like this"),
    ("show me code", "Here is a tiny example"),
    ("what is the meaning of life", "That's an interesting question"),
])
def test_keyword_replies(chat, prompt, start):
    items = events(chat, prompt)
    assert all(set(t) == {"token"} for t in items)
    assert "".join(t["token"] for t in items).startswith(start)


def test_thinking_tokens_carry_a_phase_field(chat):
    items = events(chat, "hi", thinking=True)
    phases = [t.get("phase", "answer") for t in items]
    assert phases[:5] == ["thinking"] * 5 and set(phases[5:]) == {"answer"}
    assert "".join(t["token"] for t in items[5:]).startswith("Hello!")


def test_each_exchange_is_recorded_by_a_task_the_dashboard_shows(chat):
    before = requests.get(chat.url + "/stats", timeout=5).json()["totals"].get("exchanges", 0)
    items = events(chat, "show me code")
    stats = wait_for(lambda: (lambda s: s["totals"].get("exchanges", 0) > before and s)(
        requests.get(chat.url + "/stats", timeout=5).json()), 10, message="the recorded exchange")
    last = stats["exchanges"][-1]
    assert (last["tokens"], last["prompt_chars"], last["outcome"]) == (len(items), len("show me code"), "done")
    assert last["seconds"] > 0
    assert stats["pool"]["app"] == CHAT_POOL and stats["pool"]["workers"][0]["pid"]
    recent = requests.get(chat.url + "/_greenqueue/state.json", timeout=5).json()["tasks"]["recent"]
    assert any(t["name"].endswith("record_exchange") and t["state"] == "SUCCESS" for t in recent), recent
    metrics = requests.get(chat.url + "/metrics", timeout=5).text
    assert "greenqueue_tasks_finished_total{" in metrics and "record_exchange" in metrics


@pytest.mark.parametrize("kwargs, message", [
    ({"data": "not json", "headers": {"Content-Type": "application/json"}}, "JSON object"),
    ({"data": "prompt=hi"}, "JSON object"),
    ({"json": {}}, '"prompt"'),
    ({"json": {"prompt": "   "}}, '"prompt"'),
    ({"json": {"prompt": 42}}, '"prompt"'),
    ({"json": {"prompt": "x" * 5000}}, "longer than"),
    ({"json": {"prompt": "hi", "thinking": "yes"}}, '"thinking"'),
    ({"json": ["prompt"]}, "JSON object"),
])
@pytest.mark.parametrize("path", ["/chat", "/chat/sync"])
def test_bad_input_is_a_400_with_a_json_error(chat, path, kwargs, message):
    r = requests.post(chat.url + path, timeout=10, **kwargs)
    assert r.status_code == 400
    assert message in r.json()["error"]


@pytest.mark.parametrize("path", ["/chat", "/chat/sync"])
def test_without_the_pool_chat_is_a_json_503_naming_the_flag(server_factory, path):
    srv = server_factory(CHAT_APP)
    r = requests.post(srv.url + path, json={"prompt": "hi"}, timeout=10)
    assert r.status_code == 503 and r.headers["Content-Type"] == "application/json"
    assert "--dirty-app %s" % CHAT_POOL in r.json()["error"]
    assert requests.get(srv.url + "/health", timeout=5).json() == {"status": "ok"}
    assert requests.get(srv.url + "/stats", timeout=5).json()["pool"] is None


def test_client_disconnect_frees_the_only_worker(server_factory):
    # One worker and slow tokens: the abandoned reply would take ~3 s more to finish.
    srv = server_factory(CHAT_APP, "--dirty-app", CHAT_POOL, "--dirty-workers", "1",
                         env={"CHAT_TOKEN_DELAY": "0.1"})
    r = requests.post(srv.url + "/chat", json={"prompt": "explain"}, stream=True, timeout=30)
    first = next(read_sse(r))
    assert json.loads(first[2])["token"]
    r.close()
    started = time.monotonic()
    with requests.post(srv.url + "/chat", json={"prompt": "hi"}, stream=True, timeout=30) as again:
        arrival, _, data = next(read_sse(again))
    waited = time.monotonic() - started
    assert json.loads(data)["token"] == "Hello!"
    assert waited < 1.0, "the worker was still busy with the abandoned stream (%.2fs)" % waited
    stopped = wait_for(lambda: [e for e in requests.get(srv.url + "/stats", timeout=5).json()["exchanges"]
                                if e["outcome"] == "stopped"], 10, message="the stopped exchange recorded")
    assert stopped[0]["tokens"] < 20
