"""Journal cost: journaled spawn->complete throughput vs in-memory tasks, same run.

Usage: ``python bench/bench_journal.py [--quick]``. Many greenlets spawn
no-op ``@task`` calls at once (as concurrent requests would), so journal
writes group-commit; each spawn still returns only after its row is
committed. Then a real server answers wrk (50 connections) on a view that
spawns a task, with and without ``--journal``: the p99 latency a request
pays for a durable spawn. Targets: >= 10,000 journaled tasks/s and >= 0.3x
in-memory.
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gevent  # noqa: E402

from bench._common import PY, bench_main, free_port, row, server, wrk  # noqa: E402
from greenqueue import runtime, tasks  # noqa: E402


def _noop(i):
    return i


def _throughput(n, spawners, path=None, sync="normal"):
    runtime.reset()
    tasks.configure(hub="current", max_pending=10_000_000, max_concurrency=100)
    t = tasks.task(name="bench.noop")(_noop)
    if path:
        runtime.get_runtime().open_store(path, sync=sync)
    results = []

    def spawner(k):
        for i in range(k, n, spawners):
            results.append(t.spawn(i))

    t0 = time.perf_counter()
    gevent.joinall([gevent.spawn(spawner, k) for k in range(spawners)])
    for r in results:
        r.wait(60)
    elapsed = time.perf_counter() - t0
    runtime.reset()
    assert all(r.successful() for r in results)
    return n / elapsed


def _http(seconds, journal_path=None):
    """wrk against a view that spawns one task per request; the server journals if given a path."""
    port = free_port()
    cmd = [PY, "-m", "greenqueue.server", "--bind", "127.0.0.1:%d" % port, "--log-level", "warning"]
    if journal_path:
        cmd += ["--journal", journal_path]
    url = "http://127.0.0.1:%d/spawn" % port
    with server(cmd + ["bench.apps.journal_app:app"], port):
        wrk(url, 10, 1)  # warm-up
        return wrk(url, 50, seconds)


def run(quick: bool = False, smoke: bool = False) -> list:
    """Measure and return rows (ratio > 1: greenqueue better; here ours is the journaled rate)."""
    n = 2_000 if smoke else (20_000 if quick else 100_000)
    spawners = 100
    memory = _throughput(n, spawners)
    with tempfile.TemporaryDirectory() as d:
        journaled = _throughput(n, spawners, d + "/journal.db")
        sequential = _throughput(n // 10, 1, d + "/journal2.db")
        full = _throughput(n, spawners, d + "/journal3.db", sync="full")
        full_sequential = _throughput(n // 10, 1, d + "/journal4.db", sync="full")
    rows = []
    try:
        seconds = 1 if smoke or quick else 5
        plain = _http(seconds)
        with tempfile.TemporaryDirectory() as d:
            durable = _http(seconds, d + "/journal.db")
        rows = [
            row("journal", "view spawning a task, c=50 p99", durable["p99_ms"], "ms", "same view, no journal",
                plain["p99_ms"], False),
            row("journal", "view spawning a task, c=50 req/s", durable["rps"], "req/s", "same view, no journal",
                plain["rps"], True),
        ]
    except FileNotFoundError as exc:  # no wrk
        rows = [row("journal", "view spawning a task", None, "", "-", None, note=str(exc))]
    return rows + [
        row("journal", "journaled spawn->complete (%d concurrent spawners)" % spawners, journaled,
            "tasks/s", "in-memory tasks", memory, True, note="target >= 10,000/s and >= 0.3x"),
        row("journal", "journaled spawn->complete (1 spawner, a commit per spawn)", sequential,
            "tasks/s", "in-memory tasks", memory, True),
        # What --journal-sync full (an fsync per commit) costs against the default, same run.
        row("journal", "--journal-sync full, %d concurrent spawners" % spawners, full, "tasks/s",
            "--journal-sync normal", journaled, True),
        row("journal", "--journal-sync full, 1 spawner", full_sequential, "tasks/s",
            "--journal-sync normal", sequential, True),
    ]


def main(argv=None):
    """Command-line entry point."""
    return bench_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
