"""Flask helpers that stream: server-sent events and plain chunked responses.

Concurrency model: the returned response's iterator runs in the request's
greenlet, one chunk at a time; the server flushes each chunk as it comes.
When the client goes away the server closes the response, which closes the
source iterator here (so a worker's generator behind ``pool.stream()`` is
stopped at once instead of running to the end for nobody).
"""

import json
import logging
from typing import Any, Dict, Iterable, Iterator, Optional

import gevent
from flask import Response, stream_with_context

log = logging.getLogger(__name__)

__all__ = ["sse_response", "stream_response", "sse_event", "sse_frames", "prime"]

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: Any, event: Optional[str] = None, id: Any = None) -> str:
    """Format one server-sent event; ``data`` becomes a JSON ``data:`` line."""
    lines = []
    if id is not None:
        lines.append("id: %s" % id)
    if event:
        lines.append("event: %s" % event)
    lines.append("data: %s" % json.dumps(data, separators=(",", ":"), default=str))
    return "\n".join(lines) + "\n\n"


def _closing(source: object, frames: Iterable[Any]) -> Iterator[Any]:
    """Yield ``frames`` and close ``source`` however the iteration ends."""
    try:
        yield from frames
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def prime(iterable: Iterable[Any]) -> Iterator[Any]:
    """Take the first item now, so errors (busy pool, crash) surface before the response starts.

    Returns an iterator over every item, the first included, that closes the
    source however iteration ends. A view raising here still gets to answer
    with a proper status (503, 502) instead of an error event inside a 200.
    """
    source = iter(iterable)
    try:
        first = next(source)
    except StopIteration:
        return iter(())
    except BaseException:
        close = getattr(source, "close", None)
        if close is not None:
            close()
        raise
    return _closing(source, _chain_first(first, source))


def _chain_first(first: Any, rest: Iterable[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def sse_frames(source: Iterable[Any], event: Optional[str] = None) -> Iterator[str]:
    """Yield one SSE frame per item of ``source``, an ``error`` event if it fails, then ``data: [DONE]``."""
    try:
        for item in source:
            yield sse_event(item, event)
    except (Exception, gevent.Timeout) as exc:
        # Headers are gone already: tell the client in-band, then end the stream properly.
        log.warning("SSE source failed: %s: %s", type(exc).__name__, exc)
        yield sse_event({"error": str(exc), "type": type(exc).__name__}, "error")
    yield "data: [DONE]\n\n"


def sse_response(iterable: Iterable[Any], event: Optional[str] = None, status: int = 200,
                 headers: Optional[Dict[str, str]] = None) -> Response:
    """Stream ``iterable`` as ``text/event-stream``: one JSON ``data:`` event per item, then ``[DONE]``."""
    source = iter(iterable)
    body = _closing(source, sse_frames(source, event))
    resp = Response(_with_context(body), status=status, mimetype="text/event-stream")
    resp.headers.update(SSE_HEADERS)
    resp.headers.update(headers or {})
    return resp


def stream_response(iterable: Iterable[Any], mimetype: str = "application/octet-stream", status: int = 200,
                    headers: Optional[Dict[str, str]] = None) -> Response:
    """Stream ``iterable`` (bytes or str chunks) with chunked encoding, flushing each chunk."""
    source = iter(iterable)
    resp = Response(_with_context(_closing(source, source)), status=status, mimetype=mimetype)
    resp.headers["X-Accel-Buffering"] = "no"
    resp.headers.update(headers or {})
    return resp


def _with_context(gen: Iterator[Any]) -> Iterator[Any]:
    """Keep the request context for the generator when there is one (views may read ``request``)."""
    from flask import has_request_context
    return stream_with_context(gen) if has_request_context() else gen
