"""Observability: Prometheus metrics and a live dashboard, both built on greenqueue's events.

``install(app, ...)`` returns the app wrapped so ``--metrics-path`` and
``--dashboard-path`` are served; the server calls it when either is set.
"""

from typing import TYPE_CHECKING, Any, Collection, Optional, Sequence, Tuple

from .metrics import Metrics
from .web import LOOPBACK, Observability, _Network

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication

    from ..runtime import Runtime

__all__ = ["Metrics", "Observability", "install"]


def install(app: "WSGIApplication", metrics_path: Optional[str] = None, dashboard_path: Optional[str] = None,
            allow_ips: Optional[Sequence[_Network]] = LOOPBACK, token: Optional[str] = None,
            connections: Optional[Collection[Any]] = None, runtime: Optional["Runtime"] = None) -> Tuple[Observability, Metrics]:
    """Start collecting metrics and return ``(wrapped app, metrics)``."""
    metrics = Metrics(connections, runtime).install()
    return Observability(app, metrics, metrics_path, dashboard_path, allow_ips, token), metrics
