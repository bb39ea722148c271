"""A JSON-ready snapshot of everything running in this process, for the dashboard.

Concurrency model: built in the requesting greenlet from the runners' own
structures (read-only; no greenlet switch happens while it is built, so the
view is consistent).
"""

import os
import sys
import sysconfig

__all__ = ["snapshot"]

LIMIT = 50


def _iso(dt):
    return dt.isoformat() if dt is not None else None


def _short_paths(text):
    """Tracebacks with project paths relative and library paths shortened: easier to read on a phone."""
    for prefix, short in ((sysconfig.get_paths()["purelib"] + os.sep, "site-packages/"),
                          (os.getcwd() + os.sep, "")):
        text = text.replace(prefix, short)
    return text


def _task(r, full=False):
    d = {"id": r.id, "name": r.name, "state": r.state, "retries": r.retries, "eta": _iso(r.eta),
         "started_at": _iso(r.started_at), "finished_at": _iso(r.finished_at), "duration": r.duration,
         "progress": r.progress}
    if full and r.exception is not None:
        d["error"] = "%s: %s" % (type(r.exception).__name__, r.exception)
        d["traceback"] = _short_paths(r.traceback or "")
    return d


def snapshot(metrics=None):
    """Tasks (running, waiting, scheduled, recent), jobs, pools and the last hour's history."""
    out = {"tasks": {}, "counts": {}, "jobs": [], "pools": [], "history": [], "journal": False}
    tasks = sys.modules.get("greenqueue.tasks")
    if tasks is not None:
        runner = tasks.get_runner()
        out["counts"] = runner.stats()
        out["tasks"]["running"] = [_task(r) for r in list(runner._running.values())[:LIMIT]]
        waiting = [r for r in list(runner._pending) + list(runner._idle_q) if r._where in ("pending", "idle")]
        out["tasks"]["pending"] = [_task(r) for r in waiting[:LIMIT]]
        scheduled = sorted(runner._heap)[:LIMIT]
        out["tasks"]["scheduled"] = [_task(entry[-1]) for entry in scheduled if entry[-1]._where == "scheduled"]
        recent = list(runner._finished.values())[-LIMIT:]
        recent.reverse()
        out["tasks"]["recent"] = [_task(r, full=True) for r in recent]
    journal = sys.modules.get("greenqueue.journal")
    out["journal"] = bool(journal is not None and journal.get() is not None)
    scheduler = sys.modules.get("greenqueue.scheduler")
    if scheduler is not None:
        out["jobs"] = [dict(j, next_run=_iso(j["next_run"]), last_run=_iso(j["last_run"]))
                       for j in scheduler.get_scheduler().jobs()]
    procpool = sys.modules.get("greenqueue.procpool")
    if procpool is not None:
        out["pools"] = [dict(p.stats(), name=p.name) for p in procpool._pools.values()]
    if metrics is not None:
        out["history"] = metrics.history.series()
    return out
