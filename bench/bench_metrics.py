"""What metrics cost: no-op task throughput with the Prometheus listener installed vs without, same run.

Usage: ``python bench/bench_metrics.py [--quick]``. Target: under 10 % overhead.
"""

import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gevent  # noqa: E402

from bench._common import bench_main, row  # noqa: E402
from greenqueue import tasks  # noqa: E402
from greenqueue.dashboard import Metrics  # noqa: E402


def _noop():
    return None


def _ignore(event):
    return None


def throughput(n, mode):
    """Tasks/s spawning n no-op @task calls and waiting for all of them.

    ``mode``: "bare" (nobody listens, so no event objects are even built),
    "events" (a no-op listener: events are published, as in the server,
    whose log is a listener), "metrics" (the Prometheus listener).
    """
    from greenqueue import events

    tasks.reset()
    tasks.configure(hub="current", max_pending=10_000_000, max_results=1000)
    t = tasks.task(name="bench.metrics_noop")(_noop)
    metrics = Metrics().install() if mode == "metrics" else None
    unsubscribe = events.subscribe(_ignore) if mode == "events" else None
    try:
        t0 = time.perf_counter()
        results = [t.spawn() for _ in range(n)]
        for r in results:
            r.wait(60)
        return n / (time.perf_counter() - t0)
    finally:
        if metrics is not None:
            metrics.uninstall()
        if unsubscribe is not None:
            unsubscribe()
        tasks.reset()


def run(quick: bool = False, smoke: bool = False) -> list:
    """Best of several alternating runs each way (ratio = with / without; 0.9 is the target)."""
    n = 5_000 if smoke else (20_000 if quick else 100_000)
    repeat = 2 if smoke else 5  # the machine's noise is the size of the effect measured
    best = {"bare": 0.0, "events": 0.0, "metrics": 0.0}
    for _ in range(repeat):
        for mode in best:
            gc.collect()  # a collection due from the previous run must not land in this one
            best[mode] = max(best[mode], throughput(n, mode))
            gevent.sleep(0)
    return [row("metrics", "task throughput with metrics on", best["metrics"], "tasks/s",
                "events published, no metrics", best["events"], True,
                note="target: ratio >= 0.9 (under 10% overhead)"),
            row("metrics", "task throughput with metrics on", best["metrics"], "tasks/s",
                "no listener at all (no events built)", best["bare"], True)]


def main(argv=None):
    """Command-line entry point."""
    return bench_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
