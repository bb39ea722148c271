"""Page views are counted by a consumer that reads them back from RabbitMQ in batches.

Run (RabbitMQ on localhost:5672):
    python -m greenqueue.server examples.consumer.app:app
Every GET / publishes a 'view' event; the consumer handles them 50 at a time
(or every second) and the page shows the running totals.
"""

import collections
import os

from flask import Flask, jsonify

import greenqueue
from greenqueue.consumers import publish
from greenqueue.hooks import state

BROKER = os.environ.get("CONSUMER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
QUEUE = os.environ.get("CONSUMER_QUEUE", "page-views")

app = Flask(__name__)


@greenqueue.on_startup
def set_up():
    """Shared state the consumer writes and the views read."""
    state.views = collections.Counter()
    state.batches = 0


@greenqueue.consume(BROKER, queues=[QUEUE], batch_size=50, batch_interval=1.0)
def count_views(messages):
    """Add a batch of view events to the totals (acked when this returns, requeued if it raises)."""
    for m in messages:
        state.views[m.body["path"]] += 1
    state.batches += 1


@app.get("/")
def index():
    """Publish a view event and show the totals so far."""
    publish(BROKER, QUEUE, {"path": "/"})
    return jsonify(views=dict(state.views), batches=state.batches)


@app.get("/stats")
def stats():
    """The totals the consumer counted, and its handled and failed messages."""
    return jsonify(views=dict(state.views), batches=state.batches,
                   handled=count_views.consumer.handled, failed=count_views.consumer.failed)
