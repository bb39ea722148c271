"""The streaming_chat web app: a chat page, an SSE endpoint and a sync endpoint.

Run it with the ChatApp pool:
    python -m greenqueue.server --dirty-app examples.streaming_chat.chat_app:ChatApp \
        examples.streaming_chat.app:app
"""

import json

from flask import Flask, jsonify, render_template, request

from greenqueue import Overloaded, WorkerError, procpool
from greenqueue.flask import prime, sse_response

POOL = "examples.streaming_chat.chat_app:ChatApp"
MAX_PROMPT_CHARS = 4000

app = Flask(__name__)


class BadInput(Exception):
    """The request body is not a usable chat request."""


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


@app.errorhandler(BadInput)
def bad_input(exc):
    return jsonify(error=str(exc)), 400


@app.errorhandler(Overloaded)
def overloaded(exc):
    resp = jsonify(error="the model is busy; try again in a moment")
    resp.status_code = 503
    resp.headers["Retry-After"] = "1"
    return resp


@app.errorhandler(WorkerError)
def worker_error(exc):
    app.logger.warning("chat worker failed: %s", exc)
    return jsonify(error="the model failed: %s" % exc), 502


@app.get("/")
def index():
    return render_template("index.html")


@app.post("/chat")
def chat():
    prompt, thinking = _chat_request()
    # prime() waits for the first token here, so "busy" or a crash is a proper
    # HTTP status rather than an error event inside a 200 stream.
    return sse_response(prime(procpool.get(POOL).stream("generate", prompt, thinking)))


@app.post("/chat/sync")
def chat_sync():
    prompt, thinking = _chat_request()
    return jsonify(response=procpool.get(POOL).call("generate_sync", prompt, thinking))


@app.get("/health")
def health():
    try:
        stats = procpool.get(POOL).stats()
    except KeyError:
        return jsonify(status="degraded", error="the ChatApp pool is not running (start the server "
                       "with --dirty-app %s)" % POOL), 503
    return jsonify(status="ok", pool=json.loads(json.dumps(stats, default=str)))
