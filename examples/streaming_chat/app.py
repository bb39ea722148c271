"""The streaming_chat web app: gunicorn's chat API (/chat, /chat/sync, /health) and a chat page.

Run it with the ChatApp pool:
    python -m greenqueue.server --dirty-app examples.streaming_chat.chat_app:ChatApp \
        examples.streaming_chat.app:app

Concurrency model: each request runs in its own greenlet and waits on the
ChatApp worker that streams its answer; finished exchanges are recorded by a
greenqueue task on the same hub, so the dashboard shows the traffic.
"""

import collections
import json
import time

from flask import Flask, jsonify, render_template, request

from greenqueue import Overloaded, WorkerError, procpool, task
from greenqueue.flask import prime, sse_response

from .chat_app import tokens as split_tokens

POOL = "examples.streaming_chat.chat_app:ChatApp"
MAX_PROMPT_CHARS = 4000

app = Flask(__name__)

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
        raise BadInput('send a JSON object like {"prompt": "hello"} with Content-Type: application/json')
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


@app.errorhandler(BadInput)
def bad_input(exc):
    """A request the chat cannot use: 400 with a JSON error."""
    return jsonify(error=str(exc)), 400


@app.errorhandler(NoPool)
def no_pool(exc):
    """The model's worker pool was not started: say which flag starts it."""
    message = "the chat model is not running: start the server with --dirty-app %s" % POOL
    return jsonify(error=message, detail=message), 503


@app.errorhandler(Overloaded)
def overloaded(exc):
    """Every worker busy and the queue full."""
    resp = jsonify(error="the model is busy; try again in a moment")
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
    started = time.monotonic()
    # prime() waits for the first token here, so "busy" or a crash is a proper
    # HTTP status rather than an error event inside a 200 stream.
    source = prime(_pool().stream("generate", prompt, thinking))
    return sse_response(_recorded(source, prompt, thinking, started))


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
