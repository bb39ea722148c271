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

``--workers 2`` rows (bare callable and Flask hello, 50 connections) race
``greenqueue --workers 2`` against ``granian --workers 2`` and ``gunicorn -k
gevent -w 2``, each server spread over cores 0 and 1. A machine with two
cores has none left for wrk, so wrk shares both with the server: these rows
say how the servers use two processes when the client competes for the
same CPUs, not how they scale on a larger host.
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
#: greenqueue running its request path's Python source (not its compiled build): what the build buys.
PURE = "greenqueue (Python source)"
#: (label, app, path, peers to race): the floor only answers a canned response, so only the bare app races it.
CASES = (
    ("bare WSGI", BARE, "/", ("gevent floor", "granian", "gunicorn -k gevent", "gevent.pywsgi", PURE)),
    ("Flask hello", FLASK, "/", ("granian", "gunicorn -k gevent", "gevent.pywsgi", PURE)),
    ("Flask json 4KiB", FLASK, "/json", ("granian", "gunicorn -k gevent", "gevent.pywsgi")),
)
#: The peers a quick run races (the full run races every one of CASES): those the targets name,
#: and gunicorn for Flask, the server most apps move from. Keeps `make bench QUICK=1` under 180 s.
QUICK_PEERS = {"bare WSGI": ("gevent floor", "granian"), "Flask hello": ("granian", "gunicorn -k gevent")}
#: The --workers rows: (label, app, path, peers), all at 50 connections on cores 0 and 1.
WORKER_CASES = (
    ("bare WSGI", BARE, "/", ("granian", "gunicorn -k gevent")),
    ("Flask hello", FLASK, "/", ("granian", "gunicorn -k gevent")),
)
#: The full run's largest connection count (bare callable and Flask hello only).
HUGE = 5000
#: --max-connections (gunicorn: --worker-connections) for every server: above HUGE.
MAX_CONNS = 6000
WORKERS = 2
WORKER_CONNS = 50
#: Cores of the --workers rows; wrk runs on the same ones (a two-core machine has no third).
WORKER_CORES = "0,1"
TARGETS = {("bare WSGI", 50, "gevent floor"): 0.5, ("Flask hello", 50, "granian"): 1.0,
           ("Flask hello", 500, "granian"): 1.0, ("bare WSGI", 500, "gevent floor"): 1.0}


def granian_flags(conns, workers=1):
    """The granian options used at ``conns`` connections (printed in the rows' notes)."""
    flags = ["--interface", "wsgi", "--workers", str(workers)]
    if conns >= 500:
        flags += ["--backpressure", str(GRANIAN_BACKPRESSURE)]
    return flags


def command(name, app, port, conns, workers=1):
    """The command line of server ``name`` serving ``app`` on ``port`` (None when it is not installed)."""
    bind = "127.0.0.1:%d" % port
    if name == "greenqueue":
        return [PY, "-m", "greenqueue.server", "--bind", bind, "--log-level", "warning"] + (
            ["--workers", str(workers)] if workers > 1 else []) + [
                "--max-connections", str(MAX_CONNS), "--backlog", "4096", app]
    if name == PURE:
        # env execs the server in its own place: the pid measured is the server's.
        return ["env", "GREENQUEUE_PURE_PYTHON=1"] + command("greenqueue", app, port, conns, workers)
    if name == "gevent floor":
        return [PY, "-m", "bench.apps.http_floor", str(port)]
    if name == "gevent.pywsgi":
        return [PY, "-m", "bench.apps.http_pywsgi", str(port), app]
    if name == "granian":
        if not os.path.exists(GRANIAN):
            return None
        return [GRANIAN] + granian_flags(conns, workers) + ["--host", "127.0.0.1", "--port", str(port), "--backlog",
                                                   "4096", "--log-level", "warning", app]
    if name == "gunicorn -k gevent":
        if not os.path.exists(GUNICORN):
            return None
        return [GUNICORN, "-k", "gevent", "-w", str(workers), "--worker-connections", str(MAX_CONNS), "--backlog", "4096",
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


def _measure(proc, url, conns, seconds, core=1):
    before = cpu_seconds(proc.pid)
    result = wrk(url, conns, seconds, core=core)
    served = result["rps"] * max(1, int(seconds))
    result["cpu_us"] = (cpu_seconds(proc.pid) - before) / served * 1e6 if served else None
    return result


def _best(runs):
    """Best of interleaved rounds: highest req/s, lowest p99 and CPU per request, errors of the best run."""
    top = max(runs, key=lambda r: r["rps"])
    pick = lambda key: min((r[key] for r in runs if r[key] is not None), default=None)  # noqa: E731
    return {"rps": top["rps"], "p99_ms": pick("p99_ms"), "cpu_us": pick("cpu_us"), "max_ms": pick("max_ms"),
            "errors": top["errors"], "runs": [round(r["rps"]) for r in runs]}


def measure_case(app, path, names, conn_counts, seconds, rounds, workers=1):
    """Return {(server, conns): best result}; servers run side by side, wrk rounds interleaved."""
    # One process per server on core 0 and wrk on core 1; with more processes both share every core.
    core = 0 if workers == 1 else WORKER_CORES
    wrk_core = 1 if workers == 1 else WORKER_CORES

    def flags_at(name, conns):
        return tuple(granian_flags(conns, workers)) if name == "granian" else ()

    runs = {}
    with ExitStack() as stack:
        instances = {}  # (name, granian flags) -> (proc, port): granian runs twice, with and without backpressure
        for name in names:
            for flags in sorted({flags_at(name, c) for c in conn_counts}):
                port = free_port()
                cmd = command(name, app, port, 500 if "--backpressure" in flags else 1, workers)
                if cmd is None:
                    continue
                instances[(name, flags)] = (stack.enter_context(server(cmd, port, core=core)), port)
                wrk("http://127.0.0.1:%d%s" % (port, path), 10, 1, core=wrk_core)  # warm-up
        for _ in range(rounds):
            for conns in conn_counts:
                for name in names:
                    got = instances.get((name, flags_at(name, conns)))
                    if got is not None:
                        proc, port = got
                        runs.setdefault((name, conns), []).append(
                            _measure(proc, "http://127.0.0.1:%d%s" % (port, path), conns, seconds, wrk_core))
    return {key: _best(got) for key, got in runs.items()}


def _note(label, conns, peer, mine, theirs, workers=1):
    parts = []
    if peer == "granian":
        parts.append("granian " + " ".join(granian_flags(conns, workers)))
    elif workers > 1:
        parts.append("gunicorn -k gevent -w %d" % workers)
    if workers > 1:
        parts.append("wrk shares cores %s with the servers" % WORKER_CORES)
    if mine["errors"] or theirs["errors"]:
        parts.append("errors: %d/%d" % (mine["errors"], theirs["errors"]))
    # The targets are for one process each; the --workers rows have none.
    target = TARGETS.get((label, conns, peer)) if workers == 1 else None
    if target is not None and mine["rps"] and theirs["rps"]:
        ratio = mine["rps"] / theirs["rps"]
        parts.append("target >= %.1fx %s" % (target, "met" if ratio >= target else "MISSED"))
    return "; ".join(parts)


def _rows(label, results, conns, peers, workers=1):
    """The req/s, p99 and (at 50 connections) server CPU rows of one app at ``conns`` connections."""
    rows = []
    mine = results[("greenqueue", conns)]
    name = "%s c=%d" % (label, conns) + (" --workers %d" % workers if workers > 1 else "")
    for peer in peers:
        theirs = results.get((peer, conns))
        if theirs is None:
            rows.append(row("http", name + " req/s", mine["rps"], "req/s", peer, None, note="not installed"))
            continue
        note = _note(label, conns, peer, mine, theirs, workers)
        rows.append(row("http", name + " req/s", mine["rps"], "req/s", peer, theirs["rps"], True, note))
        rows.append(row("http", name + " p99", mine["p99_ms"], "ms", peer, theirs["p99_ms"], False))
        if conns == 50:
            rows.append(row("http", name + " server CPU", mine["cpu_us"], "us/req", peer, theirs["cpu_us"], False))
        if conns >= 500:
            # Fairness: the slowest request of the run (granian's backpressure makes some wait long).
            rows.append(row("http", name + " max latency", mine["max_ms"], "ms", peer, theirs["max_ms"], False))
    return rows


def run_workers(quick: bool = False) -> list:
    """The --workers rows alone (bare callable and Flask hello, 50 connections)."""
    seconds, rounds = (1, 1) if quick else (5, 3)
    rows = []
    for label, app, path, peers in WORKER_CASES:
        results = measure_case(app, path, ("greenqueue",) + peers, (WORKER_CONNS,), seconds, rounds, WORKERS)
        rows.extend(_rows(label, results, WORKER_CONNS, peers, WORKERS))
    return rows


def _rss_kib(pid):
    """Resident memory of ``pid`` and its descendants, in KiB."""
    total = 0
    for p in [pid] + children(pid):
        try:
            with open("/proc/%d/status" % p) as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            continue
    return total


def _ask(sock):
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while not data.endswith(b"Hello, World!"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed by the server")
        data += chunk


def idle_memory(name, app, count):
    """KiB of server memory per idle keep-alive connection: ``count`` held open, each served, then served again."""
    import socket as _socket
    import time as _time

    port = free_port()
    cmd = command(name, app, port, 1)
    if cmd is None:
        return None
    with server(cmd, port, core=0) as proc:
        warm = [_socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
        for c in warm:  # the server's first connections grow caches and pools that are not per connection
            _ask(c)
        for c in warm:
            c.close()
        _time.sleep(0.5)
        before = _rss_kib(proc.pid)
        conns = []
        try:
            for _ in range(count):
                c = _socket.create_connection(("127.0.0.1", port))
                _ask(c)
                conns.append(c)
            _time.sleep(0.5)  # the measure is of idle connections
            held = _rss_kib(proc.pid)
            for c in conns:  # every one is still served
                _ask(c)
        finally:
            for c in conns:
                c.close()
    return (held - before) / count


def run_memory(quick: bool = False) -> list:
    """Memory per idle keep-alive connection: greenqueue beside the gevent floor and granian."""
    import resource
    count = 1000 if quick else 5000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 1000)), hard))
    mine = idle_memory("greenqueue", BARE, count)
    rows = []
    for peer in ("gevent floor", "granian"):
        note = "target <= 6 KiB" + (" met" if mine is not None and mine <= 6 else " MISSED")
        try:
            theirs = idle_memory(peer, BARE, count)
        except ConnectionError:
            # Measured, not skipped: a server that drops some of the held connections has no figure to show.
            theirs, note = None, note + "; %s closed some of the %d held connections" % (peer, count)
        rows.append(row("http", "idle keep-alive memory (%d held)" % count, mine, "KiB/conn", peer, theirs, False, note))
    return rows


def run(quick: bool = False, smoke: bool = False) -> list:
    """Measure and return result rows (ratio > 1: greenqueue better)."""
    import resource
    seconds = 1 if smoke or quick else 5
    rounds = 1 if smoke or quick else 3
    conn_counts = (1, 50) if smoke else (1, 50, 500)
    cases = CASES[:2] if smoke or quick else CASES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # wrk and the servers inherit it
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, MAX_CONNS + 1000)), hard))
    rows = []
    try:
        for label, app, path, peers in cases:
            if smoke:
                peers = peers[:1]
            elif quick:
                peers = QUICK_PEERS.get(label, peers)
            counts = conn_counts + ((HUGE,) if not (smoke or quick) and path == "/" else ())
            results = measure_case(app, path, ("greenqueue",) + peers, counts, seconds,
                                   1 if path == "/json" else rounds)
            for conns in counts:
                rows.extend(_rows(label, results, conns, peers))
        if not smoke:  # the smoke test checks the bench still runs; one process per server shows that
            rows.extend(run_workers(quick))
            rows.extend(run_memory(quick))
    except FileNotFoundError as exc:
        return [row("http", "all", None, "", "-", None, note=str(exc))]
    return rows


def main(argv=None):
    """Command-line entry point."""
    from greenqueue import _accel
    footer = ("greenqueue's request path: %s; " % _accel.status() +
              "load generator: wrk, 1 thread, keep-alive; best of 3 interleaved rounds (1 with --quick); "
              "granian --backpressure %d at 500 connections; --workers %d rows: servers on cores %s and wrk "
              "shares those same cores" % (GRANIAN_BACKPRESSURE, WORKERS, WORKER_CORES))
    return bench_main(run, __doc__, argv, footer=footer)


if __name__ == "__main__":
    sys.exit(main())
