"""HTTP throughput and latency: greenqueue vs raw gevent.pywsgi vs gunicorn -k gevent.

Usage: ``python bench/bench_http.py [--quick]``. The load generator is wrk
(one thread) pinned to core 1, each server to core 0, keep-alive at 1, 50
and 500 connections, for a hello world and a 4 KiB JSON document. All three
servers run the same Flask app with one process and gevent.
"""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import PY, bench_main, free_port, row, server, wrk  # noqa: E402

APP = "bench.apps.http_app:app"


def _servers():
    yield "greenqueue", lambda port: [PY, "-m", "greenqueue.server", "--bind", "127.0.0.1:%d" % port,
                                      "--log-level", "warning", "--max-connections", "2000", APP]
    yield "gevent.pywsgi", lambda port: [PY, "-m", "bench.apps.raw_gevent", str(port)]
    if shutil.which("gunicorn") or Path(PY).with_name("gunicorn").exists():
        gunicorn = str(Path(PY).with_name("gunicorn"))
        yield "gunicorn -k gevent", lambda port: [gunicorn, "-k", "gevent", "-w", "1", "--worker-connections",
                                                  "2000", "-b", "127.0.0.1:%d" % port, "--log-level",
                                                  "warning", APP]


def measure(quick=False, smoke=False):
    """Return {server: {(path, conns): wrk result}}."""
    seconds = 1 if smoke or quick else 5
    conns = (1, 50) if smoke else (1, 50, 500)
    paths = ("/",) if smoke else ("/", "/json")
    results = {}
    for name, make_cmd in _servers():
        port = free_port()
        with server(make_cmd(port), port):
            wrk("http://127.0.0.1:%d/" % port, 10, 1)  # warm-up
            for path in paths:
                for c in conns:
                    results.setdefault(name, {})[(path, c)] = wrk(
                        "http://127.0.0.1:%d%s" % (port, path), c, seconds)
    return results


def run(quick: bool = False, smoke: bool = False) -> list:
    """Measure and return result rows (ratio > 1: greenqueue better)."""
    try:
        results = measure(quick, smoke)
    except FileNotFoundError as exc:
        return [row("http", "all", None, "", "-", None, note=str(exc))]
    rows = []
    ours = results["greenqueue"]
    for key, mine in ours.items():
        path, c = key
        label = "%s c=%d" % ("hello" if path == "/" else "json 4KiB", c)
        for base, theirs in results.items():
            if base == "greenqueue":
                continue
            other = theirs[key]
            note = "errors: %d/%d" % (mine["errors"], other["errors"]) if mine["errors"] or other["errors"] else ""
            rows.append(row("http", label + " req/s", mine["rps"], "req/s", base, other["rps"], True, note))
            rows.append(row("http", label + " p99", mine["p99_ms"], "ms", base, other["p99_ms"], False))
    return rows


def main(argv=None):
    """Command-line entry point."""
    return bench_main(run, __doc__, argv, footer='load generator: wrk, 1 thread, keep-alive')


if __name__ == "__main__":
    sys.exit(main())
