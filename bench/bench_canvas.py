"""Canvas: a chord and a chain, greenqueue (PostgreSQL node; in memory) vs Celery (Redis), same run, 1 worker process.

Usage: ``python bench/bench_canvas.py [--quick]``. The bench starts its own
PostgreSQL and redis-server (bench_cluster's), each in a temporary directory
and stopped at the end. Workflows, each launched and waited on by a producer
process (``bench.apps.canvas_producer``), one at a time after an untimed
small one:

* a chord of N ``add(i, i)`` members whose body sums their results (1,000
  members; 100 in the quick run);
* a chain of 100 ``inc`` steps passing a number along (full run only).

Stacks, each one worker process with 100 slots:

* greenqueue on PostgreSQL: one server node (``--journal``) runs the steps;
  the producer opens the same journal claiming nothing (``queues=[]``, as a
  web node), so every step is a row and the join happens in the store;
* greenqueue in memory: the producer's own process runs the steps, no journal;
* Celery: one worker (gevent pool, ``-c 100``, late acks), Redis broker and
  result backend (its chord counts finished members in Redis).

Figures per workflow, from just before the call: time to body (the chord's
body, or the chain's last step, starts: it reports over UDP like the cluster
bench's probes) and end-to-end (the producer's ``.get()`` returned). The full
run takes the median of 3 of each; ratio > 1: greenqueue took less time.
PostgreSQL commits durably (fsync, ``synchronous_commit=on``); Redis appends
to its file and fsyncs once a second. On PostgreSQL, end-to-end includes how
the producer hears of a finish on another node: its watcher reads the rows of
the tasks it waits on.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import PY, ROOT, bench_main, free_port, pinned, row, wait_port  # noqa: E402
from bench.bench_cluster import Celery, Collector, Greenqueue, Postgres, Procs, find_pg_bindir  # noqa: E402

NAME = "canvas"
PRODUCER = "bench.apps.canvas_producer"
CELERY_LABEL = "Celery (Redis broker + backend), 1 worker"


class CanvasGreenqueue(Greenqueue):
    """One greenqueue server node on the bench's PostgreSQL, serving the canvas tasks."""

    app = "bench.apps.canvas_gq:app"


class CanvasCelery(Celery):
    """One Celery worker (gevent pool) registering the canvas tasks."""

    app = "bench.apps.canvas_celery:celery"


def produce(key, env, chord_n, chain_n, repeats, core):
    """Run the producer for stack ``key`` (gq, mem, celery); returns its {"chord": [...], "chain": [...]}."""
    timeout = 60 + 2 * repeats * 120
    done = subprocess.run(pinned([PY, "-m", PRODUCER, key, str(chord_n), str(chain_n), str(repeats)], core),
                          cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT), **env), capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError("producer (%s) failed: %s" % (key, done.stderr.strip()[-600:]))
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(stack, key, collector, chord_n, chain_n, repeats, core):
    """Runs of both workflows on one stack: {case: [{"body", "call", "e2e", "why"}, ...]}, seconds or None.

    The body reports ``its start - t0``; runs are one at a time, so the reports arrive in the runs' order.
    """
    if stack is not None:
        stack.fresh()
        stack.start_workers(1)
    env = dict(stack.env) if stack is not None else {"BENCH_PROBE_PORT": str(collector.port)}
    try:
        collector.reset()
        runs = produce(key, env, chord_n, chain_n, repeats, core)
        expected = len(runs["chord"]) + len(runs["chain"])
        bodies = collector.wait(expected, stall=2.0)
    finally:
        if stack is not None:
            stack.stop_workers()
    out = {}
    paired = len(bodies) == expected
    for case in ("chord", "chain"):
        out[case] = []
        for run in runs[case]:
            why = run["why"]
            if not paired:
                why = (why + "; " if why else "") + "%d body starts reported for %d runs" % (len(bodies), expected)
            out[case].append({"body": bodies.pop(0) if paired else None, "call": run["call"], "e2e": run["e2e"],
                              "why": why})
    return out


def _median(values):
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def _summary(runs):
    """(median time to body ms, median end-to-end ms, note) of one stack's runs of one case."""
    if isinstance(runs, str):
        return None, None, runs
    if not runs:
        return None, None, "not run"
    body = _median([r["body"] for r in runs])
    e2e = _median([r["e2e"] for r in runs])
    whys = sorted({r["why"] for r in runs if r["why"]})
    ms = (lambda v: v * 1000 if v is not None else None)
    call = _median([r["call"] for r in runs])
    note = ["the call returned after %.1f ms" % (call * 1000)] if call is not None else []
    if len(runs) > 1:
        e2es = [r["e2e"] * 1000 for r in runs if r["e2e"] is not None]
        note.append("median of %d%s" % (len(runs), ", end-to-end %.0f-%.0f ms" % (min(e2es), max(e2es))
                                        if e2es else ""))
    if whys:
        note.append("%d of %d runs wrong: %s" % (sum(1 for r in runs if r["why"]), len(runs), "; ".join(whys)))
    return ms(body), ms(e2e), ", ".join(note)


def _rows(results, missing, case, label, started):
    """Rows for ``case``: greenqueue on PostgreSQL and in memory, each vs Celery: time to ``started``, end-to-end."""
    def runs(key):
        got = results.get(key, "not run")
        return got[case] if isinstance(got, dict) else got  # a string says why the stack has no runs

    c_body, c_e2e, c_note = _summary(runs("celery"))
    out = []
    for key, where in (("gq", "greenqueue PostgreSQL node"), ("mem", "greenqueue in memory")):
        g_body, g_e2e, g_note = _summary(runs(key))
        if g_body is None and g_e2e is None:
            # "(skipped)": nothing to run it on here; "(bench)": it ran and broke (the smoke test fails on it).
            metric, how = ("(skipped)", "not run") if key in missing else ("(bench)", "failed")
            out.append(row(NAME, metric, None, "", "-", None, note="%s, %s, %s: %s" % (where, label, how, g_note)))
            continue
        note = "; ".join(x for x in ("greenqueue: " + g_note if g_note else "",
                                     "Celery: " + c_note if c_note else "") if x)
        out += [row(NAME, "%s, %s: time to %s" % (label, where, started), g_body, "ms", CELERY_LABEL, c_body, False,
                    note),
                row(NAME, "%s, %s: end-to-end" % (label, where), g_e2e, "ms", CELERY_LABEL, c_e2e, False, note)]
    return out


def start_redis(procs, directory):
    """A private redis-server (append-only file, as the cluster bench's); returns its port, or None if missing."""
    binary = shutil.which("redis-server")
    if not binary:
        return None
    port = free_port()
    proc = procs.start([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                        "--dir", directory, "--daemonize", "no"])
    wait_port(port, proc)
    return port


def _attempt(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # one stack failing must not hide the others' figures
        return "%s: %s" % (type(exc).__name__, str(exc)[-300:])


def run(quick: bool = False, smoke: bool = False) -> list:
    """Measure and return rows (ratio > 1: greenqueue better)."""
    if smoke:
        chord_n, chain_n, repeats = 20, 5, 1
    elif quick:
        chord_n, chain_n, repeats = 100, 0, 1  # the quick run adds ~7 s: engines and workers dominate it
    else:
        chord_n, chain_n, repeats = 1000, 100, 3
    cores = os.cpu_count() or 1
    worker_core, producer_core = 0, 1 % cores
    procs = Procs()
    collector = Collector()
    bindir = find_pg_bindir()
    pg = Postgres(bindir) if bindir else None
    redis_dir = tempfile.mkdtemp(prefix="gq-bench-redis-")
    results, missing = {}, {}
    try:
        started = _attempt(pg.start) if pg is not None else None
        if pg is None:
            results["gq"] = missing["gq"] = "PostgreSQL is not installed (apt-get install postgresql)"
        elif isinstance(started, str):
            results["gq"] = "PostgreSQL did not start: " + started
        else:
            results["gq"] = _attempt(measure, CanvasGreenqueue(procs, collector.port, pg), "gq", collector,
                                     chord_n, chain_n, repeats, producer_core)
        redis_port = _attempt(start_redis, procs, redis_dir)
        if redis_port is None:
            redis_port = "redis-server is not installed (apt-get install redis-server)"
        results["celery"] = redis_port if isinstance(redis_port, str) else _attempt(
            measure, CanvasCelery(procs, collector.port, redis_port), "celery", collector, chord_n, chain_n,
            repeats, producer_core)
        # One process runs the steps and waits on them: pinned where the other stacks' worker runs.
        results["mem"] = _attempt(measure, None, "mem", collector, chord_n, chain_n, repeats, worker_core)
    finally:
        procs.close()
        collector.close()
        if pg is not None:
            pg.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)
    rows = _rows(results, missing, "chord", "chord of %d members -> body" % chord_n, "body")
    if chain_n:
        rows += _rows(results, missing, "chain", "chain of %d steps" % chain_n, "last step")
    return rows


def main(argv=None):
    """Command-line entry point."""
    return bench_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
