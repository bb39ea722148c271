"""The streaming_chat example over real HTTP, with a real ChatApp worker process."""

import json
import time

import pytest
import requests

from .conftest import ServerProcess
from .nginx_support import CHAT_APP, CHAT_POOL, read_sse

pytestmark = pytest.mark.realproc


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    srv = ServerProcess(CHAT_APP, "--dirty-app", CHAT_POOL, "--dirty-workers", "1",
                        env={"CHAT_TOKEN_DELAY": "0.002"}, tmp_path=tmp_path_factory.mktemp("chat"))
    srv.start()
    yield srv
    assert srv.stop() == 0


def stream(url, prompt, thinking=False, **kwargs):
    """POST /chat and return the parsed events [(event, data), ...]."""
    with requests.post(url + "/chat", json={"prompt": prompt, "thinking": thinking}, stream=True,
                       timeout=30, **kwargs) as r:
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["X-Accel-Buffering"] == "no"
        return [(event, data) for _, event, data in read_sse(r)]


def test_tokens_stream_as_json_events_and_done_comes_last(chat):
    events = stream(chat.url, "hello there")
    assert events[-1] == ("message", "[DONE]")
    tokens = [json.loads(data) for _, data in events[:-1]]
    assert len(tokens) > 10
    assert all(set(t) == {"token"} for t in tokens)
    assert "".join(t["token"] for t in tokens).startswith("Hello! I'm a simulated assistant")


@pytest.mark.parametrize("prompt, start", [
    ("please explain", "greenqueue keeps your web app"),
    ("how does streaming work", "Streaming works like this"),
    ("show me code", "Here is a tiny example"),
    ("what is the meaning of life", "That's an interesting question"),
])
def test_keyword_replies(chat, prompt, start):
    text = "".join(json.loads(d)["token"] for _, d in stream(chat.url, prompt)[:-1])
    assert text.startswith(start)


def test_thinking_phase_streams_before_the_answer(chat):
    items = [json.loads(d) for _, d in stream(chat.url, "hi", thinking=True)[:-1]]
    phases = [t.get("phase", "answer") for t in items]
    assert phases[0] == "thinking" and phases[-1] == "answer"
    first_answer = phases.index("answer")
    assert all(p == "thinking" for p in phases[:first_answer])
    assert all(p == "answer" for p in phases[first_answer:])


def test_sync_matches_the_streamed_text(chat):
    streamed = "".join(json.loads(d)["token"] for _, d in stream(chat.url, "explain")[:-1])
    r = requests.post(chat.url + "/chat/sync", json={"prompt": "explain"}, timeout=30)
    assert r.status_code == 200
    assert r.json() == {"response": streamed}


def test_health_reports_the_pool(chat):
    body = requests.get(chat.url + "/health", timeout=5).json()
    assert body["status"] == "ok"
    assert "pool" in body


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
