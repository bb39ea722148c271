"""Django: a view that enqueues one task per request, greenqueue's Django backend vs gunicorn + Celery.

Usage: ``python bench/bench_django.py``. One Django project
(bench/apps/django_bench, its own database an SQLite file the view never
touches) served two ways, in the same run, on the same cores as
bench_cluster's http rows (servers and workers on core 0, wrk on core 1):

- greenqueue: ``python -m greenqueue.server --journal <PostgreSQL>
  bench.apps.django_bench.wsgi:application``; the view calls Django's
  ``task.enqueue()`` (TASKS backend greenqueue.django.GreenqueueBackend) and
  the same process runs the task;
- the usual Django stack: ``gunicorn -k gevent -w 1`` serving the project, the
  view calling a Celery ``@shared_task``'s ``delay()``, one Celery worker
  (``-P gevent -c 100``, late acks), Redis as broker and result backend.

Figures: requests/s under wrk (50 connections) at saturation, and the memory
(PSS) of every process each stack runs, PostgreSQL and Redis included. The
engines are private (bench_cluster's PostgreSQL with durable commits, a
redis-server with ``appendonly yes``), in temporary directories, stopped at
the end. Full bench only: the quick run skips it (it must not get slower), the
smoke run serves a second of each stack.
"""

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import PY, bench_main, free_port, row, wait_port, wrk  # noqa: E402
from bench.bench_cluster import WORKER_CONCURRENCY, Postgres, Procs, find_pg_bindir, pss_kib  # noqa: E402

NAME = "django"
PROJECT = "bench.apps.django_bench"
CONNECTIONS = 50  # bench_cluster's http rows
STACK = "gunicorn -k gevent + Celery worker + Redis"


def _start(procs, cmd, env, port):
    """Start a server on core 0 and wait until it listens (its log tail in the error when it does not)."""
    proc = procs.start(cmd, env, core=0)
    try:
        wait_port(port, proc, 60)
    except RuntimeError as exc:
        raise RuntimeError("%s: %s" % (exc, procs.log_tail(proc))) from None
    return proc


def _load(port, seconds):
    """wrk on the view; a second of warm-up first (connections, imports) unless the run is that short."""
    url = "http://127.0.0.1:%d/enqueue" % port
    if seconds > 1:
        wrk(url, 10, 1)
    return wrk(url, CONNECTIONS, seconds)


def _kill(proc):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def http_greenqueue(pg, procs, env, seconds):
    """One greenqueue node serving the project: wrk's figures, PSS (MiB) per process, tasks left unfinished."""
    import psycopg

    dsn = pg.new_database()
    port = free_port()
    node = _start(procs, [PY, "-m", "greenqueue.server", "--journal", dsn, "--bind", "127.0.0.1:%d" % port,
                          "--log-level", "warning", "--max-concurrency",
                          str(WORKER_CONCURRENCY), PROJECT + ".wsgi:application"],
                  dict(env, BENCH_DJANGO_QUEUE="greenqueue"), port)
    try:
        result = _load(port, seconds)
        parts = {"node": pss_kib(node.pid) / 1024, "PostgreSQL": pss_kib(pg.pid()) / 1024}
        with psycopg.connect(dsn) as conn:
            states = dict(conn.execute("SELECT state, count(*) FROM greenqueue_tasks GROUP BY state").fetchall())
    finally:
        _kill(node)
    if not states.get("SUCCESS"):
        raise RuntimeError("the node ran none of its tasks: %s" % (states or "no rows"))
    return result, parts, sum(n for state, n in states.items() if state != "SUCCESS")


def http_celery(redis_port, redis_pid, procs, env, seconds):
    """gunicorn and one Celery worker serving the project: wrk's figures, PSS (MiB) per process, tasks queued."""
    import redis

    env = dict(env, BENCH_DJANGO_QUEUE="celery", BENCH_REDIS_URL="redis://127.0.0.1:%d/0" % redis_port)
    client = redis.Redis(port=redis_port)
    client.flushall()
    worker = procs.start([str(Path(PY).with_name("celery")), "-A", PROJECT + ".celery_app", "worker", "-P",
                          "gevent", "-c", str(WORKER_CONCURRENCY), "--without-heartbeat", "--without-gossip",
                          "--without-mingle", "-l", "warning", "-n", "w0@bench"], env, core=0)
    try:
        deadline = time.monotonic() + 60
        while not any(c.get("cmd") == "brpop" for c in client.client_list()):  # consuming
            if worker.poll() is not None:
                raise RuntimeError("celery worker exited: %s" % procs.log_tail(worker))
            if time.monotonic() > deadline:
                raise RuntimeError("celery worker did not start consuming within 60 s")
            time.sleep(0.05)
        port = free_port()
        web = _start(procs, [str(Path(PY).with_name("gunicorn")), "-k", "gevent", "-w", "1", "-b",
                             "127.0.0.1:%d" % port, "--log-level", "warning", PROJECT + ".wsgi:application"],
                     env, port)
        try:
            result = _load(port, seconds)
            parts = {"gunicorn": pss_kib(web.pid) / 1024, "worker": pss_kib(worker.pid) / 1024,
                     "Redis": pss_kib(redis_pid) / 1024}
            backlog = client.llen("celery")
        finally:
            _kill(web)
    finally:
        _kill(worker)
    return result, parts, backlog


def _split(parts):
    return ", ".join("%s %.0f" % kv for kv in parts.items())


def run(quick: bool = False, smoke: bool = False) -> list:
    """Measure and return rows (ratio > 1: greenqueue better)."""
    if quick and not smoke:
        return [row(NAME, "(skipped)", None, "", "-", None, note="full bench only (the quick run must not get "
                    "slower): python bench/bench_django.py")]
    missing = [why for ok, why in (
        (find_pg_bindir(), "PostgreSQL is not installed (apt-get install postgresql)"),
        (shutil.which("redis-server"), "redis-server is not installed (apt-get install redis-server)"),
        (shutil.which("wrk"), "wrk is not installed (apt-get install wrk)")) if not ok]
    try:
        import celery  # noqa: F401 -- only checking they are installed
        import django  # noqa: F401
        import gunicorn  # noqa: F401
        import redis  # noqa: F401
        if django.VERSION < (6,):
            import django_tasks  # noqa: F401
    except ImportError as exc:
        missing.append("%s is not installed (pip install -e '.[bench]')" % exc.name)
    if missing:
        return [row(NAME, "(skipped)", None, "", "-", None, note="; ".join(missing) + "; nothing measured")]
    seconds = 1 if smoke else 10
    procs = Procs()
    pg = Postgres(find_pg_bindir())
    tmp = tempfile.mkdtemp(prefix="gq-bench-django-")
    env = {"BENCH_DJANGO_DB": os.path.join(tmp, "django.db"),
           "DJANGO_SETTINGS_MODULE": PROJECT + ".settings"}
    try:
        pg.start()
        redis_port = free_port()
        redis_proc = procs.start([shutil.which("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "yes", "--dir", tmp, "--daemonize", "no"])
        wait_port(redis_port, redis_proc)
        # greenqueue first, while PostgreSQL holds no other run's data (as in bench_cluster).
        ours, our_mib, unfinished = http_greenqueue(pg, procs, env, seconds)
        theirs, their_mib, backlog = http_celery(redis_port, redis_proc.pid, procs, env, seconds)
    finally:
        procs.close()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    errors = "; wrk errors %d vs %d" % (ours["errors"], theirs["errors"]) if ours["errors"] or theirs["errors"] else ""
    return [
        row(NAME, "Django view enqueueing a task, req/s", ours["rps"], "req/s", STACK, theirs["rps"], True,
            "1 node, wrk -c%d %ds; p99 %.1f ms vs %.1f ms; left unrun at the end: %d vs %d queued%s" % (
                CONNECTIONS, seconds, ours["p99_ms"] or 0, theirs["p99_ms"] or 0, unfinished, backlog, errors)),
        row(NAME, "Django view enqueueing a task, memory (PSS) of every process", sum(our_mib.values()), "MiB",
            STACK, sum(their_mib.values()), False, "MiB: %s; %s" % (_split(our_mib), _split(their_mib))),
    ]


def main(argv=None):
    """Command-line entry point."""
    return bench_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
