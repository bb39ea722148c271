"""procrastinate side of the flow-control bench: the cluster app plus a probe deferred with a per-key ``lock``."""

from bench.apps.cluster_procrastinate import app, probe
from bench.apps.cluster_probe import report

__all__ = ["app", "probe", "keyed"]


@app.task(name="bench.flow.keyed")
async def keyed(key):
    """The probe; the producer defers it with ``lock=key``, so one job of a key runs at a time."""
    report(0.0)
