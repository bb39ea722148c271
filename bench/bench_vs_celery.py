"""End to end: a Flask view spawns a task doing 5 ms of I/O, at a fixed rate — greenqueue vs gunicorn + Celery + Redis.

Usage: ``python bench/bench_vs_celery.py [--quick]``. greenqueue is one
process. The peer is Flask on ``gunicorn -k gevent -w 1``, a Celery worker
(gevent pool, concurrency 100) and redis-server, all started and stopped
here. The driver sends POSTs at a fixed rate over keep-alive connections;
each task records the time from the request to its own end. Figures:
requests served, task completion latency p50/p99, and the total RSS of
every process involved.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gevent  # noqa: E402
from gevent import socket as gsocket  # noqa: E402

from bench._common import PY, bench_main, free_port, percentile, row, rss_kib, server  # noqa: E402


def _post(sock, path):
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n\r\n" % path.encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(4096)
    return head.split(b" ", 2)[1] == b"200"


def drive(port, rate, seconds, conns=20):
    """POST /work at ``rate`` per second for ``seconds``; returns requests answered 200."""
    interval = conns / rate
    ok = [0]

    def client(offset):
        s = gsocket.create_connection(("127.0.0.1", port), timeout=30)
        start = time.monotonic() + offset * interval / conns
        i = 0
        try:
            while True:
                due = start + i * interval
                if due - time.monotonic() > 0:
                    gevent.sleep(due - time.monotonic())
                if time.monotonic() - start > seconds:
                    return
                if _post(s, "/work?t=%.6f" % time.time()):
                    ok[0] += 1
                i += 1
        finally:
            s.close()

    gevent.joinall([gevent.spawn(client, k) for k in range(conns)], timeout=seconds + 30)
    return ok[0]


def _pct(values, p):
    return percentile(values, p, 1000)  # milliseconds


def _settle(fetch, expected, timeout=30):
    deadline = time.monotonic() + timeout
    lat = fetch()
    while len(lat) < expected and time.monotonic() < deadline:
        gevent.sleep(0.2)
        lat = fetch()
    return lat


def greenqueue_run(rate, seconds):
    """One greenqueue process."""
    import requests

    port = free_port()
    cmd = [PY, "-m", "greenqueue.server", "--bind", "127.0.0.1:%d" % port, "--log-level", "warning",
           "bench.apps.e2e_gq:app"]
    with server(cmd, port) as proc:
        sent = drive(port, rate, seconds)
        lat = _settle(lambda: requests.get("http://127.0.0.1:%d/stats" % port, timeout=30).json()["latencies"], sent)
        rss = rss_kib(proc.pid) / 1024
    return {"served": sent / seconds, "done": len(lat), "p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99), "rss": rss}


def celery_run(rate, seconds):
    """gunicorn + Celery worker + redis-server; (None, why) when they cannot run here."""
    redis_server = shutil.which("redis-server")
    if not redis_server:
        return None, "redis-server is not installed (apt-get install redis-server)"
    try:
        import importlib
        importlib.import_module("celery")  # only checking it is installed
        import redis
    except ImportError as exc:
        return None, "celery/redis client missing (pip install 'celery[redis]'): %s" % exc
    rport, hport = free_port(), free_port()
    url = "redis://127.0.0.1:%d/0" % rport
    env = {"BENCH_REDIS_URL": url}
    gunicorn = str(Path(PY).with_name("gunicorn"))
    celery_bin = str(Path(PY).with_name("celery"))
    with server([redis_server, "--port", str(rport), "--save", "", "--appendonly", "no", "--daemonize", "no"],
                rport, core=0) as rproc:
        worker = subprocess.Popen([celery_bin, "-A", "bench.apps.e2e_celery:celery", "worker", "-P", "gevent",
                                   "-c", "100", "--without-heartbeat", "--without-gossip", "--without-mingle",
                                   "-l", "warning"],
                                  cwd=str(Path(__file__).resolve().parent.parent),
                                  env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent),
                                           **env),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            cmd = [gunicorn, "-k", "gevent", "-w", "1", "-b", "127.0.0.1:%d" % hport, "--log-level", "warning",
                   "bench.apps.e2e_celery:app"]
            with server(cmd, hport, env=env) as hproc:
                r = redis.Redis.from_url(url)
                r.delete("bench:latency")
                _post_ok = drive(hport, rate, 1)  # warm-up: the worker connects and consumes
                _settle(lambda: r.lrange("bench:latency", 0, -1), _post_ok, 30)
                r.delete("bench:latency")
                sent = drive(hport, rate, seconds)
                lat = [float(x) for x in _settle(lambda: r.lrange("bench:latency", 0, -1), sent)]
                rss = (rss_kib(hproc.pid) + rss_kib(worker.pid) + rss_kib(rproc.pid)) / 1024
        finally:
            try:
                os.killpg(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            worker.wait(10)
    return {"served": sent / seconds, "done": len(lat), "p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99),
            "rss": rss}, ""


def run(quick: bool = False, smoke: bool = False) -> list:
    """Measure and return rows (ratio > 1: greenqueue better)."""
    rate = 100 if smoke else (500 if quick else 1000)
    seconds = 2 if smoke else (3 if quick else 20)  # quick: 1,500 tasks a side still give a steady p99
    ours = greenqueue_run(rate, seconds)
    try:
        peer, why = celery_run(rate, seconds)
    except Exception as exc:
        peer, why = None, "Celery could not be run: %s: %s" % (type(exc).__name__, exc)
    p = peer or {}
    label = "gunicorn + Celery + Redis"
    note = "rate %d req/s for %ds; tasks done %d vs %s" % (rate, seconds, ours["done"], p.get("done", "-"))
    return [
        row("vs_celery", "requests served", ours["served"], "req/s", label, p.get("served"), True, note if peer else why),
        row("vs_celery", "task completion p50", ours["p50"], "ms", label, p.get("p50"), False),
        row("vs_celery", "task completion p99", ours["p99"], "ms", label, p.get("p99"), False),
        row("vs_celery", "total RSS of all processes", ours["rss"], "MiB", label, p.get("rss"), False),
    ]


def main(argv=None):
    """Command-line entry point."""
    return bench_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
