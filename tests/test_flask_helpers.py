"""sse_response and stream_response: framing, headers, errors and closing the source."""

import json

import gevent
from flask import Flask
from gevent.event import Event

from greenqueue.flask import sse_event, sse_frames, sse_response, stream_response


class Source:
    """An iterator that records whether it was closed."""

    def __init__(self, items, fail_at=None):
        self.items = list(items)
        self.fail_at = fail_at
        self.closed = False
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == self.fail_at:
            raise RuntimeError("source broke")
        if self.i >= len(self.items):
            raise StopIteration
        self.i += 1
        return self.items[self.i - 1]

    def close(self):
        self.closed = True


def make_app(source_factory, helper):
    app = Flask(__name__)
    app.view_functions.clear()

    @app.get("/")
    def view():
        return helper(source_factory())
    return app


def test_sse_frames_json_data_lines_and_done_last():
    src = Source([{"token": "a"}, "b", 3])
    app = make_app(lambda: src, sse_response)
    resp = app.test_client().get("/")
    assert resp.mimetype == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache" and resp.headers["X-Accel-Buffering"] == "no"
    events = [e for e in resp.get_data(as_text=True).split("\n\n") if e]
    assert [json.loads(e[6:]) for e in events[:-1]] == [{"token": "a"}, "b", 3]
    assert events[-1] == "data: [DONE]"
    assert src.closed


def test_sse_source_error_becomes_an_error_event_then_done():
    src = Source(["ok"], fail_at=1)
    resp = make_app(lambda: src, sse_response).test_client().get("/")
    body = resp.get_data(as_text=True)
    assert 'event: error\ndata: {"error":"source broke","type":"RuntimeError"}' in body
    assert body.endswith("data: [DONE]\n\n")
    assert src.closed


def test_closing_the_response_early_closes_the_source():
    src = Source(range(100))
    app = make_app(lambda: src, sse_response)
    resp = app.test_client().get("/", buffered=False)
    it = iter(resp.response)
    next(it)
    resp.close()
    assert src.closed


def test_stream_response_passes_chunks_through():
    src = Source([b"a", b"b"])
    resp = make_app(lambda: src, lambda s: stream_response(s, "text/plain")).test_client().get("/")
    assert resp.get_data() == b"ab" and resp.mimetype == "text/plain"
    assert src.closed


def test_sse_event_with_name_and_id():
    assert sse_event({"x": 1}, "tick", 7) == 'id: 7\nevent: tick\ndata: {"x":1}\n\n'


def test_prime_raises_before_the_response_and_keeps_every_item():
    import pytest

    from greenqueue.flask import prime

    failing = Source([], fail_at=0)
    with pytest.raises(RuntimeError, match="source broke"):
        prime(failing)
    assert failing.closed
    src = Source([1, 2, 3])
    it = prime(src)
    assert src.i == 1  # the first item was taken at once
    assert list(it) == [1, 2, 3] and src.closed
    assert list(prime(Source([]))) == []


def test_a_timeout_escaping_the_source_becomes_an_error_event():
    def source():
        yield {"n": 1}
        gevent.Timeout.start_new(0.01)
        Event().wait(5)  # never set: only the timeout ends this wait
        yield {"n": 2}

    frames = list(sse_frames(source()))
    assert frames[0] == 'data: {"n":1}\n\n'
    assert frames[1].startswith("event: error\n") and "Timeout" in frames[1]
    assert frames[-1] == "data: [DONE]\n\n"
