"""The streaming_chat web app: gunicorn's chat API (/chat, /chat/sync, /health), a WebSocket, a chat page.

Run it with the ChatApp pool:
    python -m greenqueue.server --dirty-app examples.streaming_chat.chat_app:ChatApp \
        examples.streaming_chat.app:app

Concurrency model: each request runs in its own greenlet and waits on the
ChatApp worker that streams its answer; an open WebSocket (/chat/ws) holds its
greenlet for as long as it is open and answers its prompts one after the
other. Finished exchanges are recorded by a greenqueue task on the same hub,
so the dashboard shows the traffic.
"""

import collections
import json
import time
from typing import Any, Deque, Dict, Generator, Tuple

import gevent
from flask import Flask, jsonify, render_template, request
from flask_sock import Sock
from simple_websocket import Server as WebSocket

from greenqueue import Overloaded, WorkerError, procpool, task
from greenqueue.flask import prime, sse_response

from .chat_app import tokens as split_tokens

POOL = "examples.streaming_chat.chat_app:ChatApp"
MAX_PROMPT_CHARS = 4000

NOT_JSON = 'send a JSON object like {"prompt": "hello"}'
NO_POOL = "the chat model is not running: start the server with --dirty-app %s" % POOL
BUSY = "the model is busy; try again in a moment"

app = Flask(__name__)
# Pings keep an idle chat socket under nginx's proxy_read_timeout and notice dead
# peers; a message far over MAX_PROMPT_CHARS closes the socket (1009) unread.
app.config["SOCK_SERVER_OPTIONS"] = {"ping_interval": 25, "max_message_size": 64 * 1024}
sock = Sock(app)

#: The latest finished exchanges, newest last (what /stats shows).
exchanges = collections.deque(maxlen=50)
totals = collections.Counter()


class BadInput(Exception):
    """The request body is not a usable chat request."""


class NoPool(Exception):
    """The server was started without the ChatApp pool."""


def _chat_request():
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise BadInput(NOT_JSON + " with Content-Type: application/json")
    return _parse_chat(data)


def _parse_chat(data: Any) -> Tuple[str, bool]:
    """The prompt and thinking flag of a chat request's JSON, or BadInput naming what to fix."""
    if not isinstance(data, dict):
        raise BadInput(NOT_JSON)
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadInput('"prompt" must be a non-empty string')
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadInput('"prompt" is longer than %d characters' % MAX_PROMPT_CHARS)
    thinking = data.get("thinking", False)
    if not isinstance(thinking, bool):
        raise BadInput('"thinking" must be true or false')
    return prompt, thinking


def _pool():
    try:
        return procpool.get(POOL)
    except KeyError:
        raise NoPool() from None


@task
def record_exchange(prompt_chars, tokens, seconds, thinking, outcome):
    """Keep the size, duration and outcome of a finished exchange for /stats and the dashboard."""
    entry = {"prompt_chars": prompt_chars, "tokens": tokens, "seconds": seconds, "thinking": thinking,
             "outcome": outcome, "finished_at": time.time()}
    exchanges.append(entry)
    totals["exchanges"] += 1
    totals["tokens"] += tokens
    totals[outcome] += 1
    return entry


def _record(prompt, thinking, tokens, started, outcome):
    try:
        record_exchange.spawn(len(prompt), tokens, round(time.monotonic() - started, 3), thinking, outcome)
    except Overloaded:
        app.logger.info("task queue full; this exchange is not recorded")  # the answer itself went out


def _recorded(source, prompt, thinking, started):
    """Pass the tokens through, then record how the exchange ended (done, stopped by the client, failed)."""
    count, outcome = 0, "stopped"
    try:
        for item in source:
            count += 1
            yield item
        outcome = "done"
    except Exception:
        outcome = "failed"
        raise
    finally:
        close = getattr(source, "close", None)  # an empty stream is a plain iterator without close()
        if close is not None:
            close()
        _record(prompt, thinking, count, started, outcome)


def _answer(prompt: str, thinking: bool) -> Generator[Dict[str, Any], None, None]:
    """The answer's token items from the ChatApp pool, recorded when the stream ends or is closed."""
    started = time.monotonic()
    # prime() waits for the first token here, so "busy" or a crash is raised
    # before anything is sent: a proper HTTP status, or an error message on a socket.
    source = prime(_pool().stream("generate", prompt, thinking))
    return _recorded(source, prompt, thinking, started)


@app.errorhandler(BadInput)
def bad_input(exc):
    """A request the chat cannot use: 400 with a JSON error."""
    return jsonify(error=str(exc)), 400


@app.errorhandler(NoPool)
def no_pool(exc):
    """The model's worker pool was not started: say which flag starts it."""
    return jsonify(error=NO_POOL, detail=NO_POOL), 503


@app.errorhandler(Overloaded)
def overloaded(exc):
    """Every worker busy and the queue full."""
    resp = jsonify(error=BUSY)
    resp.status_code = 503
    resp.headers["Retry-After"] = "1"
    return resp


@app.errorhandler(WorkerError)
def worker_error(exc):
    """The worker failed before the first token."""
    app.logger.warning("chat worker failed: %s", exc)
    return jsonify(error="the model failed: %s" % exc), 502


@app.get("/")
def index():
    """The chat page."""
    return render_template("index.html")


@app.post("/chat")
def chat():
    """Stream the answer as server-sent events: one ``{"token": ...}`` per event, then ``[DONE]``."""
    prompt, thinking = _chat_request()
    return sse_response(_answer(prompt, thinking))


@sock.route("/chat/ws")
def chat_ws(ws: WebSocket) -> None:
    """Answer each ``{"prompt": ...}`` message with ``token`` messages, then ``done``; the socket stays open.

    ``{"type": "stop"}`` ends the answer being streamed (``stopped``); bad
    input, a missing or busy pool and a failing model get an ``error`` message.
    """
    pending: Deque[Any] = collections.deque()  # prompts that arrived while an answer streamed
    while True:
        message = _decode(pending.popleft() if pending else ws.receive())
        if _is_stop(message):
            continue  # the answer it meant to stop has ended already
        try:
            prompt, thinking = _parse_chat(message)
            source = _answer(prompt, thinking)
        except (BadInput, NoPool, Overloaded, WorkerError) as exc:
            _send(ws, type="error", message=_problem(exc))
            continue
        _send(ws, **_stream_to(ws, source, pending))


def _decode(raw: Any) -> Any:
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return None  # _parse_chat says what to send instead


def _is_stop(message: Any) -> bool:
    return isinstance(message, dict) and message.get("type") == "stop"


def _problem(exc: Exception) -> str:
    """What the HTTP routes' error handlers say for ``exc``, for an error message on the socket."""
    if isinstance(exc, NoPool):
        return NO_POOL
    if isinstance(exc, Overloaded):
        return BUSY
    if isinstance(exc, WorkerError):
        return "the model failed: %s" % exc
    return str(exc)


def _send(ws: WebSocket, **fields: Any) -> None:
    ws.send(json.dumps(fields))


def _stream_to(ws: WebSocket, source: Generator[Dict[str, Any], None, None],
               pending: Deque[Any]) -> Dict[str, Any]:
    """Send each token of ``source`` as it comes; return the message that ends the answer."""
    count = 0
    # Closing the source stops the worker's generator and records the outcome,
    # including when the client goes away (ws.send or ws.receive raise ConnectionClosed).
    try:
        while True:
            try:
                item = next(source)
            except StopIteration:
                return {"type": "done", "tokens": count}
            except (Exception, gevent.Timeout) as exc:
                # Tokens went out already: say so in-band, as the SSE route's error event does.
                app.logger.warning("chat worker failed mid-answer: %s: %s", type(exc).__name__, exc)
                return {"type": "error", "message": "the model failed: %s" % exc, "tokens": count}
            token = {"type": "token", "text": item["token"]}
            if "phase" in item:
                token["phase"] = item["phase"]
            _send(ws, **token)
            count += 1
            if _stop_requested(ws, pending):
                return {"type": "stopped", "tokens": count}
    finally:
        source.close()


def _stop_requested(ws: WebSocket, pending: Deque[Any]) -> bool:
    """Read what the client sent meanwhile without waiting: true on a stop, other messages kept for later."""
    while True:
        raw = ws.receive(timeout=0)
        if raw is None:
            return False
        if _is_stop(_decode(raw)):
            return True
        pending.append(raw)


@app.post("/chat/sync")
def chat_sync():
    """The whole answer at once: ``{"response": ...}``."""
    prompt, thinking = _chat_request()
    started = time.monotonic()
    text = _pool().call("generate_sync", prompt, thinking)
    _record(prompt, thinking, len(split_tokens(text)), started, "done")
    return jsonify(response=text)


@app.get("/health")
def health():
    """The web process answers (exactly gunicorn's body); the pool's state is at /stats."""
    return jsonify(status="ok")


@app.get("/stats")
def stats():
    """The ChatApp pool's workers and the latest exchanges (null pool: not started)."""
    try:
        pool = json.loads(json.dumps(procpool.get(POOL).stats(), default=str))
    except KeyError:
        pool = None
    return jsonify(pool=pool, totals=dict(totals), exchanges=list(exchanges)[-10:])
