"""HTTP throughput, latency and CPU per request: greenqueue against the gevent floor, granian, gunicorn, pywsgi.

Usage: ``python bench/bench_http.py [--quick]``. The load generator is wrk
(one thread, keep-alive) pinned to core 1, each server to core 0, at 1, 50
and 500 connections. Three apps: a bare WSGI callable answering 13 bytes,
the Flask hello and a 4 KiB Flask JSON document. Peers, all in the same
run: a 30-line gevent StreamServer writing a canned answer (the floor of
any gevent server; bare rows only), granian (Rust, one worker; at 500
connections with ``--backpressure``, as its default lets 512 requests
queue for the GIL until wrk times out), gunicorn -k gevent (one worker) and
a plain monkey-patched gevent.pywsgi. Every server of an app is started
before the first measurement and the runs are interleaved round by round,
so a noisy neighbour hits them all alike; each figure is the best of its
rounds. ``server CPU`` rows divide the CPU time of the server's process
tree by the requests served: on a shared machine that moves far less than
requests per second do.
"""

import os
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import PY, bench_main, children, free_port, row, server, wrk  # noqa: E402

BARE = "bench.apps.http_bare:app"
FLASK = "bench.apps.http_app:app"
GRANIAN = str(Path(PY).with_name("granian"))
GUNICORN = str(Path(PY).with_name("gunicorn"))
GRANIAN_BACKPRESSURE = 64
#: (label, app, path, peers to race): the floor only answers a canned response, so only the bare app races it.
CASES = (
    ("bare WSGI", BARE, "/", ("gevent floor", "granian", "gunicorn -k gevent", "gevent.pywsgi")),
    ("Flask hello", FLASK, "/", ("granian", "gunicorn -k gevent", "gevent.pywsgi")),
    ("Flask json 4KiB", FLASK, "/json", ("granian", "gunicorn -k gevent", "gevent.pywsgi")),
)
TARGETS = {("bare WSGI", 50, "gevent floor"): 0.5, ("Flask hello", 50, "granian"): 1.0,
           ("Flask hello", 500, "granian"): 1.0}


def granian_flags(conns):
    """The granian options used at ``conns`` connections (printed in the rows' notes)."""
    flags = ["--interface", "wsgi", "--workers", "1"]
    if conns >= 500:
        flags += ["--backpressure", str(GRANIAN_BACKPRESSURE)]
    return flags


def command(name, app, port, conns):
    """The command line of server ``name`` serving ``app`` on ``port`` (None when it is not installed)."""
    bind = "127.0.0.1:%d" % port
    if name == "greenqueue":
        return [PY, "-m", "greenqueue.server", "--bind", bind, "--log-level", "warning",
                "--max-connections", "2000", "--backlog", "4096", app]
    if name == "gevent floor":
        return [PY, "-m", "bench.apps.http_floor", str(port)]
    if name == "gevent.pywsgi":
        return [PY, "-m", "bench.apps.http_pywsgi", str(port), app]
    if name == "granian":
        if not os.path.exists(GRANIAN):
            return None
        return [GRANIAN] + granian_flags(conns) + ["--host", "127.0.0.1", "--port", str(port), "--backlog",
                                                   "4096", "--log-level", "warning", app]
    if name == "gunicorn -k gevent":
        if not os.path.exists(GUNICORN):
            return None
        return [GUNICORN, "-k", "gevent", "-w", "1", "--worker-connections", "2000", "--backlog", "4096",
                "-b", bind, "--log-level", "warning", app]
    raise ValueError(name)


def cpu_seconds(pid):
    """User plus system CPU seconds of ``pid`` and its descendants so far."""
    total = 0.0
    for p in [pid] + children(pid):
        try:
            with open("/proc/%d/stat" % p) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _measure(proc, url, conns, seconds):
    before = cpu_seconds(proc.pid)
    result = wrk(url, conns, seconds)
    served = result["rps"] * max(1, int(seconds))
    result["cpu_us"] = (cpu_seconds(proc.pid) - before) / served * 1e6 if served else None
    return result


def _best(runs):
    """Best of interleaved rounds: highest req/s, lowest p99 and CPU per request, errors of the best run."""
    top = max(runs, key=lambda r: r["rps"])
    pick = lambda key: min((r[key] for r in runs if r[key] is not None), default=None)  # noqa: E731
    return {"rps": top["rps"], "p99_ms": pick("p99_ms"), "cpu_us": pick("cpu_us"), "errors": top["errors"],
            "runs": [round(r["rps"]) for r in runs]}


def measure_case(app, path, names, conn_counts, seconds, rounds):
    """Return {(server, conns): best result}; servers run side by side, wrk rounds interleaved."""
    runs = {}
    with ExitStack() as stack:
        instances = {}  # (name, granian flags) -> (proc, port): granian runs twice, with and without backpressure
        for name in names:
            for flags in sorted({tuple(granian_flags(c)) if name == "granian" else () for c in conn_counts}):
                port = free_port()
                cmd = command(name, app, port, 500 if "--backpressure" in flags else 1)
                if cmd is None:
                    continue
                instances[(name, flags)] = (stack.enter_context(server(cmd, port)), port)
                wrk("http://127.0.0.1:%d%s" % (port, path), 10, 1)  # warm-up
        for _ in range(rounds):
            for conns in conn_counts:
                for name in names:
                    got = instances.get((name, tuple(granian_flags(conns)) if name == "granian" else ()))
                    if got is not None:
                        proc, port = got
                        runs.setdefault((name, conns), []).append(
                            _measure(proc, "http://127.0.0.1:%d%s" % (port, path), conns, seconds))
    return {key: _best(got) for key, got in runs.items()}


def _note(label, conns, peer, mine, theirs):
    parts = []
    if peer == "granian":
        parts.append("granian " + " ".join(granian_flags(conns)))
    if mine["errors"] or theirs["errors"]:
        parts.append("errors: %d/%d" % (mine["errors"], theirs["errors"]))
    target = TARGETS.get((label, conns, peer))
    if target is not None and mine["rps"] and theirs["rps"]:
        ratio = mine["rps"] / theirs["rps"]
        parts.append("target >= %.1fx %s" % (target, "met" if ratio >= target else "MISSED"))
    return "; ".join(parts)


def run(quick: bool = False, smoke: bool = False) -> list:
    """Measure and return result rows (ratio > 1: greenqueue better)."""
    seconds = 1 if smoke or quick else 5
    rounds = 1 if smoke or quick else 3
    conn_counts = (1, 50) if smoke else (1, 50, 500)
    cases = CASES[:2] if smoke or quick else CASES
    rows = []
    for label, app, path, peers in cases:
        if smoke:
            peers = peers[:1]
        try:
            results = measure_case(app, path, ("greenqueue",) + peers, conn_counts, seconds,
                                   1 if path == "/json" else rounds)
        except FileNotFoundError as exc:
            return [row("http", "all", None, "", "-", None, note=str(exc))]
        for conns in conn_counts:
            mine = results[("greenqueue", conns)]
            name = "%s c=%d" % (label, conns)
            for peer in peers:
                theirs = results.get((peer, conns))
                if theirs is None:
                    rows.append(row("http", name + " req/s", mine["rps"], "req/s", peer, None,
                                    note="not installed"))
                    continue
                note = _note(label, conns, peer, mine, theirs)
                rows.append(row("http", name + " req/s", mine["rps"], "req/s", peer, theirs["rps"], True, note))
                rows.append(row("http", name + " p99", mine["p99_ms"], "ms", peer, theirs["p99_ms"], False))
                if conns == 50:
                    rows.append(row("http", name + " server CPU", mine["cpu_us"], "us/req", peer,
                                    theirs["cpu_us"], False))
    return rows


def main(argv=None):
    """Command-line entry point."""
    footer = ("load generator: wrk, 1 thread, keep-alive; best of 3 interleaved rounds (1 with --quick); "
              "granian --backpressure %d at 500 connections" % GRANIAN_BACKPRESSURE)
    return bench_main(run, __doc__, argv, footer=footer)


if __name__ == "__main__":
    sys.exit(main())
