"""The production nginx config in front of the real server: streaming stays streaming."""

import json

import pytest
import requests

from .nginx_support import NginxFront, read_sse

pytestmark = [pytest.mark.realproc, pytest.mark.nginx]


@pytest.fixture
def front(tmp_path):
    f = NginxFront(tmp_path, env={"CHAT_TOKEN_DELAY": "0.05"})
    f.start()
    yield f
    assert f.stop() == 0


def test_first_token_arrives_long_before_the_last_through_nginx(front):
    with requests.post(front.url + "/chat", json={"prompt": "explain"}, stream=True, timeout=30) as r:
        assert r.status_code == 200
        events = list(read_sse(r))
    assert events[-1][2] == "[DONE]"
    arrivals = [t for t, _, _ in events[:-1]]
    span = arrivals[-1] - arrivals[0]
    # ~50 tokens at 50 ms: buffering anywhere would deliver them in one lump.
    assert len(arrivals) > 40
    assert span > 1.0
    assert arrivals[0] < arrivals[-1] - span * 0.8
    # Tokens keep trickling in: no gap swallows most of the stream.
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert max(gaps) < span / 2


def test_static_files_come_from_nginx_and_pages_from_flask(front):
    css = requests.get(front.url + "/static/chat.css", timeout=5)
    assert css.status_code == 200 and "--accent" in css.text
    assert "Expires" in css.headers  # set by nginx's `expires`, not by Flask
    page = requests.get(front.url + "/", timeout=5)
    assert page.status_code == 200 and "greenqueue chat" in page.text


def test_bad_input_and_sync_through_nginx(front):
    assert requests.post(front.url + "/chat", data="x", timeout=5).status_code == 400
    r = requests.post(front.url + "/chat/sync", json={"prompt": "hi"}, timeout=30)
    assert r.status_code == 200 and r.json()["response"].startswith("Hello!")


def test_body_limit_is_enforced_by_nginx(front):
    r = requests.post(front.url + "/chat", data=b"x" * (2 * 1024 * 1024),
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 413
    assert json.loads(requests.get(front.url + "/health", timeout=5).text)["status"] == "ok"
