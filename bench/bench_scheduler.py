"""Scheduler lateness under HTTP load, and CPU used while idle.

Usage: ``python bench/bench_scheduler.py [--quick]``. 1,000 jobs fire every
second (due times spread over the second, as jobs added at different times
are) while the same hub serves HTTP to wrk; lateness is JobFired's time minus
the due time. Idle CPU is measured with one job due in a minute. MiniHuey,
the in-process peer, checks its cron tasks once a minute, so its lateness is
up to 60 s by design; that row is its documented resolution, not a run.
"""

import datetime
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gevent import monkey  # noqa: E402

monkey.patch_all(thread=False)

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from bench._common import bench_main, free_port, percentile, pinned, row  # noqa: E402
from greenqueue import events, every, tasks  # noqa: E402
from greenqueue.scheduler import Job, Scheduler  # noqa: E402

UTC = datetime.timezone.utc


def _hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def lateness(seconds, n_jobs=1000, with_load=True):
    """Lateness (ms) of every run of n_jobs 1-second jobs over ``seconds``."""
    tasks.reset()
    tasks.configure(hub="current", max_pending=10_000_000, max_concurrency=1000)
    s = Scheduler()
    now = datetime.datetime.now(UTC)
    for i in range(n_jobs):
        def noop():
            return None
        noop.__qualname__ = "bench_job_%d" % i
        job = s.add(Job(noop, every(seconds=1), name="bench_job_%d" % i))
        job.next_run = now + datetime.timedelta(seconds=1 + i / n_jobs)
    late = []

    def on_fired(e):
        late.append((e.timestamp - e.scheduled_for.timestamp()) * 1000)
    unsubscribe = events.subscribe(on_fired, events.JobFired)
    srv = load = None
    if with_load and shutil.which("wrk"):
        port = free_port()
        srv = WSGIServer(("127.0.0.1", port), _hello, log=None)
        srv.start()
        load = subprocess.Popen(pinned(["wrk", "-t1", "-c20", "-d%ds" % (seconds + 2),
                                        "http://127.0.0.1:%d/" % port], 1),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s.start()
    try:
        gevent.sleep(seconds + 1)
    finally:
        s.stop()
        unsubscribe()
        if load is not None:
            load.kill()
            load.wait()
        if srv is not None:
            srv.stop()
        tasks.reset()
    return sorted(late)


def idle_cpu(seconds):
    """CPU seconds per second used by a started scheduler with one job due in a minute."""
    s = Scheduler()
    s.add(Job(lambda: None, every(minutes=1), name="idle_job"))
    s.start()
    gevent.sleep(0.1)
    c0, t0 = _cpu(), time.monotonic()
    gevent.sleep(seconds)
    used = (_cpu() - c0) / (time.monotonic() - t0)
    s.stop()
    tasks.reset()
    return used


def _pct(values, p):
    return percentile(values, p)


def run(quick: bool = False, smoke: bool = False) -> list:
    """Measure and return rows."""
    seconds = 2 if smoke else (3 if quick else 20)  # quick: 3,000 runs still give a steady p99
    n_jobs = 100 if smoke else 1000
    late = lateness(seconds, n_jobs)
    note = "%d runs of %d jobs, HTTP load from wrk" % (len(late), n_jobs)
    rows = [row("scheduler", "lateness p50", _pct(late, 0.5), "ms", "MiniHuey (checks once a minute)", 30000.0,
                False, note),
            row("scheduler", "lateness p99", _pct(late, 0.99), "ms", "target", 10.0, False),
            row("scheduler", "lateness max", late[-1] if late else None, "ms", "MiniHuey worst case", 60000.0, False),
            row("scheduler", "CPU while idle", idle_cpu(1 if smoke else (2 if quick else 3)) * 100, "% of a core",
                "target ~0", None)]
    return rows


def main(argv=None):
    """Command-line entry point."""
    return bench_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
