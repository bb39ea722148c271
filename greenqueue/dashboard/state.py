"""A JSON-ready snapshot of everything running in this process, for the dashboard.

Concurrency model: built in the requesting greenlet from the runtime's
public snapshot (taken on the task hub's thread without a greenlet switch,
so the view is consistent), then turned into JSON-ready dicts.
"""

import os
import sysconfig
from datetime import datetime
from typing import TYPE_CHECKING, Any, Dict, Optional

from .metrics import open_websockets

if TYPE_CHECKING:
    from ..runtime import Runtime
    from ..tasks import TaskResult
    from .metrics import Metrics

__all__ = ["snapshot"]

LIMIT = 50


def _iso(dt: Optional[datetime]) -> Optional[str]:
    return dt.isoformat() if dt is not None else None


def _short_paths(text: str) -> str:
    """Tracebacks with project paths relative and library paths shortened: easier to read on a phone."""
    for prefix, short in ((sysconfig.get_paths()["purelib"] + os.sep, "site-packages/"),
                          (os.getcwd() + os.sep, "")):
        text = text.replace(prefix, short)
    return text


def _task(r: "TaskResult[Any]", full: bool = False) -> Dict[str, Any]:
    d: Dict[str, Any] = {"id": r.id, "name": r.name, "state": r.state, "retries": r.retries, "eta": _iso(r.eta),
         "started_at": _iso(r.started_at), "finished_at": _iso(r.finished_at), "duration": r.duration,
         "progress": r.progress, "parent": r.parent.id if r.parent is not None else None}
    if full and r.exception is not None:
        d["error"] = "%s: %s" % (type(r.exception).__name__, r.exception)
        d["traceback"] = _short_paths(r.traceback or "")
    return d


def snapshot(metrics: Optional["Metrics"] = None, runtime: Optional["Runtime"] = None) -> Dict[str, Any]:
    """Tasks (running, waiting, scheduled, recent), jobs, pools and the last hour's history."""
    if runtime is None:
        from ..runtime import get_runtime
        runtime = get_runtime()
    snap = runtime.snapshot(LIMIT)
    tasks = snap["tasks"]
    waits = snap.get("waits", {})
    out: Dict[str, Any] = {"counts": snap["counts"], "journal": snap["durable"], "store": snap["store"], "history": [],
           "tasks": {"running": [_task(r) for r in tasks["running"]],
                     "pending": [dict(_task(r), waits=waits.get(r.id, "slot")) for r in tasks["pending"]],
                     "scheduled": [dict(_task(r), waits=waits.get(r.id, "eta")) for r in tasks["scheduled"]],
                     "recent": [_task(r, full=True) for r in tasks["recent"]]},
           "jobs": [dict(j, next_run=_iso(j["next_run"]), last_run=_iso(j["last_run"])) for j in snap["jobs"]],
           "pools": snap["pools"], "nodes": snap.get("nodes", []), "node": snap.get("node"),
           "leader": snap.get("leader"),
           # The busiest buckets first: a per-key limit may have thousands of keys.
           "limits": [{"kind": k, "bucket": b, "limit": m, "used": u, "waiting": w}
                      for k, b, m, u, w in sorted(snap.get("limits", []), key=lambda x: (-x[4], -x[3]))[:LIMIT]]}
    if metrics is not None:
        out["history"] = metrics.history.series()
        conns = metrics.connections
        if conns is not None:
            out["http"] = {"connections": len(conns), "websockets": open_websockets(conns)}
    return out
