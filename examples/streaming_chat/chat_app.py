"""ChatApp: a simulated language model living in greenqueue worker processes.

Concurrency model: each worker process runs one ChatApp; ``init()`` runs once
per process (where a real app would load model weights), and every call runs
to completion or until the parent closes the stream. ``generate`` is a
generator, so the pool streams each token to the web process as it is made.
"""

import os
import re
import time

from greenqueue import DirtyApp

RESPONSES = {
    "greeting": ("Hello! I'm a simulated assistant running in a greenqueue worker process. "
                 "Every word you see was sent to your browser the moment it was generated."),
    "explain": ("greenqueue keeps your web app and its heavy work in one deployment. The web "
                "process serves requests on greenlets, while CPU-heavy, stateful work such as "
                "model inference runs in a small pool of worker processes that keep their state "
                "between calls and stream results back over pipes."),
    "streaming": ("Streaming works like this: the worker yields a token, the pool forwards it "
                  "over a pipe, the view wraps it as a server-sent event, and the server flushes "
                  "it to the socket at once. If you press Stop, the worker's generator is closed "
                  "and the worker is free for the next prompt."),
    "code": ("Here is a tiny example:\n\n```python\nclass ChatApp(DirtyApp):\n    def init(self):\n"
             "        self.model = load_model()\n\n    def generate(self, prompt):\n"
             "        for token in self.model(prompt):\n            yield token\n```\n\n"
             "The generator streams; the pool does the rest."),
    "default": ("That's an interesting question. I'm a simulation, so I can't really think about "
                "it, but a real model would stream its answer token by token just like this, "
                "without holding up any other request the server is handling."),
}

KEYWORDS = [
    (("hello", "hi", "hey"), "greeting"),
    (("explain",), "explain"),
    (("streaming", "stream"), "streaming"),
    (("code",), "code"),
]

_TOKEN = re.compile(r"\s+|[^\s]+")


def tokens(text):
    """Split text into word and whitespace tokens, the way the UI shows them."""
    return _TOKEN.findall(text)


def pick_response(prompt):
    """Choose the canned answer whose keyword appears in the prompt."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    for keys, name in KEYWORDS:
        if words.intersection(keys):
            return RESPONSES[name]
    return RESPONSES["default"]


THINKING = ["[thinking", ".", ".", ".", "]\n\n"]


class ChatApp(DirtyApp):
    """Streams a canned reply token by token, optionally after a thinking phase."""

    workers = 2
    timeout = 120

    def init(self):
        """Load the 'model' once per worker process."""
        # Seconds per token; CHAT_TOKEN_DELAY lets tests and demos speed it up or slow it down.
        self.delay = float(os.environ.get("CHAT_TOKEN_DELAY", "0.03"))
        self.responses = dict(RESPONSES)

    def generate(self, prompt, thinking=False):
        """Yield ``{"token": ...}`` dicts; thinking mode first sends "[thinking...]" with ``"phase": "thinking"``."""
        if thinking:
            # gunicorn's example streams the same markers, a dot every ten tokens' time.
            for tok in THINKING:
                if tok == ".":
                    time.sleep(self.delay * 10)
                yield {"token": tok, "phase": "thinking"}
        for tok in tokens(pick_response(prompt)):
            time.sleep(self.delay)
            yield {"token": tok}

    def generate_sync(self, prompt, thinking=False):
        """Return the whole text at once, thinking markers included (what the stream's tokens add up to)."""
        return "".join(item["token"] for item in self.generate(prompt, thinking))
