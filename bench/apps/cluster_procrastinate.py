"""procrastinate side of the cluster bench: the probe task as a native coroutine (its fastest kind)."""

import os

from procrastinate import App, PsycopgConnector

from bench.apps.cluster_probe import report

# A pool as large as the worker's concurrency, so no job waits for a connection.
POOL = int(os.environ.get("BENCH_PQ_POOL", "20"))
app = App(connector=PsycopgConnector(conninfo=os.environ.get("BENCH_PQ_DSN", ""), min_size=2, max_size=POOL))


@app.task(name="bench.probe")
async def probe(t):
    """Report when this run started, relative to ``t`` (0: the absolute time)."""
    report(t)
