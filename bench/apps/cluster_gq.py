"""greenqueue side of the cluster bench: the probe task and a view that spawns a no-op task."""

import itertools

from flask import Flask

from bench.apps.cluster_probe import report
from greenqueue import task

app = Flask(__name__)
_ids = itertools.count()


@task(name="bench.probe")
def probe(t):
    """Report when this run started, relative to ``t`` (0: the absolute time)."""
    report(t)


@task(name="bench.noop")
def noop(n):
    """A no-op task with one JSON argument."""
    return n


@app.get("/spawn")
def spawn():
    """Spawn one task per request (the node runs it itself when it has a free slot)."""
    noop.spawn(next(_ids))
    return "spawned"
