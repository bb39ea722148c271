"""greenqueue side of the flow-control and claim-at-scale benches.

The cluster bench's probe task, the same probe under a rate limit and under
a per-key concurrency limit, and a view through which a web node (one that
claims nothing, ``--queues ""``) enqueues probes for the worker nodes.
"""

import os

from flask import Flask, request

from bench.apps.cluster_gq import probe
from bench.apps.cluster_probe import report
from greenqueue import task

__all__ = ["app", "probe", "rated", "keyed", "RATE", "BATCH"]

#: The rate limit of ``rated`` (the bench sets it; see bench_cluster.RATE_LIMIT).
RATE = os.environ.get("BENCH_RATE_LIMIT", "10000/s")
#: Rows per commit when the view enqueues (``task.map``).
BATCH = 1000

app = Flask(__name__)


@task(name="bench.flow.rated", rate_limit=RATE)
def rated(t):
    """The probe under a rate limit that holds across every node."""
    report(t)


@task(name="bench.flow.keyed", concurrency_limit=1, concurrency_key=lambda key: key)
def keyed(key):
    """The probe, one run at a time per ``key`` across every node."""
    report(0.0)


@app.post("/enqueue")
def enqueue():
    """Enqueue ``?n=N`` probes in commits of BATCH rows; answers once all are committed."""
    n = int(request.args["n"])
    for i in range(0, n, BATCH):
        probe.map([0.0] * min(BATCH, n - i))  # the handles are dropped: nothing follows them
    return "enqueued %d" % n
