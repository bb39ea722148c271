"""A view that spawns a @task, for the journal bench's HTTP latency rows."""

import itertools

from flask import Flask

from greenqueue import task

app = Flask(__name__)
_ids = itertools.count()


@task
def record(n):
    """A no-op task with one JSON argument."""
    return n


@app.get("/spawn")
def spawn():
    record.spawn(next(_ids))
    return "spawned"
