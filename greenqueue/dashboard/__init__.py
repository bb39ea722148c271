"""Observability: Prometheus metrics and a live dashboard, both built on greenqueue's events.

``install(app, ...)`` returns the app wrapped so ``--metrics-path`` and
``--dashboard-path`` are served; the server calls it when either is set.
"""

from .metrics import Metrics
from .web import Observability

__all__ = ["Metrics", "Observability", "install"]


def install(app, metrics_path=None, dashboard_path=None, allow_ips=None, token=None, connections=None,
            runtime=None):
    """Start collecting metrics and return ``(wrapped app, metrics)``."""
    metrics = Metrics(connections, runtime).install()
    return Observability(app, metrics, metrics_path, dashboard_path, allow_ips, token), metrics
