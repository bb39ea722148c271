"""Task runner benchmark: greenqueue vs raw gevent.spawn+joinall vs huey's MiniHuey.

Usage: ``python bench/bench_tasks.py [--quick]``. Prints a markdown table;
``run(quick)`` returns the rows for an aggregator. Every ratio reads "how
many times better greenqueue is" (>1 = greenqueue faster or smaller):
value/baseline for throughput, baseline/value for times and memory.
Targets: >= 0.5x raw gevent, >= 1x MiniHuey.

Concurrency model: single process, single hub, no monkey patching; each
system runs the same no-op function, one after the other, with a fresh
runner and a gc pass between runs; the one-task rows instead reuse one warm
runner (and one MiniHuey) per system, since a spawn in a server lands on a
running one and a cold start times the allocator, not the spawn.
"""

import gc
import logging
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402

from bench._common import bench_main, row  # noqa: E402
from greenqueue import tasks  # noqa: E402

log = logging.getLogger(__name__)

TARGETS = {"gevent": 0.5, "MiniHuey": 1.0}


def noop():
    """The task body every system runs."""
    return None


def _fresh_runner():
    tasks.reset()
    gc.collect()
    return tasks.configure(hub="current", max_concurrency=100, max_pending=10_000_000, max_results=10_000)


def _minihuey():
    from huey.contrib.mini import MiniHuey
    huey = MiniHuey()
    gc.collect()
    return huey.task()(noop)


# -- one timed run per system: spawn n no-ops, wait for all ------------------------------


_WARM = {}


def _warm(name, make):
    """One instance per system, kept across runs: the n=1 rows time a spawn in a running process."""
    if name not in _WARM:
        _WARM[name] = make()
    return _WARM[name]


def _greenqueue_run(n):
    runner = _warm("greenqueue", _fresh_runner) if n == 1 else _fresh_runner()
    spawn = runner.spawn
    t0 = time.perf_counter()
    results = [spawn(noop) for _ in range(n)]
    t1 = time.perf_counter()
    for r in results:  # as a user (and the MiniHuey run) waits: on each result
        r.get()
    return t1 - t0, time.perf_counter() - t0


def _gevent_run(n):
    gc.collect()
    spawn = gevent.spawn
    t0 = time.perf_counter()
    greenlets = [spawn(noop) for _ in range(n)]
    t1 = time.perf_counter()
    gevent.joinall(greenlets)
    return t1 - t0, time.perf_counter() - t0


def _minihuey_run(n):
    call = _warm("MiniHuey", _minihuey) if n == 1 else _minihuey()
    t0 = time.perf_counter()
    results = [call() for _ in range(n)]
    t1 = time.perf_counter()
    for r in results:
        r.get()
    return t1 - t0, time.perf_counter() - t0


SYSTEMS = {"greenqueue": _greenqueue_run, "gevent": _gevent_run, "MiniHuey": _minihuey_run}


def _best(fn, n, repeat):
    """(spawn seconds, total seconds) of the fastest of ``repeat`` runs."""
    runs = [fn(n) for _ in range(repeat)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def _row(metric, value, unit, baseline, baseline_value, higher_is_better):
    r = row("tasks", metric, value, unit, baseline, baseline_value, higher_is_better)
    target = TARGETS.get(baseline)
    if target is not None and r["ratio"] is not None:
        r["note"] = ("target >= %.1fx met" if r["ratio"] >= target else "target >= %.1fx MISSED") % target
    return r


# -- memory per waiting task -----------------------------------------------------------------


def _memory_per_task(kind, n):
    """Bytes held per waiting (never started) task, measured with tracemalloc."""
    gate = Event()
    if kind == "greenqueue":
        runner = _fresh_runner()
        runner.configure(max_concurrency=1)
        runner.spawn(gate.wait)
        make = lambda: runner.spawn(noop)  # noqa: E731
    elif kind == "greenqueue-scheduled":
        runner = _fresh_runner()
        make = lambda: runner.spawn(noop, delay=3600)  # noqa: E731
    elif kind == "gevent":
        make = lambda: gevent.spawn(noop)  # noqa: E731
    else:
        call = _minihuey()
        make = call
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    keep = [make() for _ in range(n)]
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    gate.set()
    if kind.startswith("greenqueue"):
        tasks.reset()
    else:
        gevent.wait(timeout=30)  # let the greenlets run and finish
    del keep
    return (after - before) / n


def run(quick: bool = False) -> list:
    """Run every measurement and return the rows (see the module docstring)."""
    n_throughput = 20_000 if quick else 100_000
    sizes = (1, 1000, 20_000) if quick else (1, 1000, 100_000)
    repeat = 2 if quick else 3
    rows = []

    best = {name: _best(fn, n_throughput, repeat) for name, fn in SYSTEMS.items()}
    ours = n_throughput / best["greenqueue"][1]
    for name in ("gevent", "MiniHuey"):
        rows.append(_row("throughput_noop_%d" % n_throughput, ours, "tasks/s", name,
                         n_throughput / best[name][1], True))

    for n in sizes:
        rep = 200 if n == 1 else (20 if n <= 1000 else repeat)
        results = {name: _best(fn, n, rep) for name, fn in SYSTEMS.items()}
        for name in ("gevent", "MiniHuey"):
            rows.append(_row("spawn_latency_n%d" % n, results["greenqueue"][0] / n * 1e6,
                             "us/spawn", name, results[name][0] / n * 1e6, False))
            rows.append(_row("spawn_to_complete_n%d" % n, results["greenqueue"][1] * 1e3,
                             "ms", name, results[name][1] * 1e3, False))

    _WARM.clear()
    tasks.reset()
    n_mem = 5000 if quick else 20_000
    pending = _memory_per_task("greenqueue", n_mem)
    scheduled = _memory_per_task("greenqueue-scheduled", n_mem)
    for name in ("gevent", "MiniHuey"):
        base = _memory_per_task(name, n_mem)
        rows.append(_row("memory_per_pending_task", pending, "bytes", name, base, False))
        rows.append(_row("memory_per_scheduled_task", scheduled, "bytes", name, base, False))
    tasks.reset()
    return rows


def main(argv=None):
    """Command-line entry point."""
    return bench_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
