"""WebSockets: flask-sock echo round trips per second, and the memory of 1,000 idle WebSockets.

Usage: ``python bench/bench_websocket.py [--quick]``. One flask-sock app
(``bench/apps/ws_app.py``, simple-websocket underneath) served unchanged by
greenqueue and by ``gunicorn -k gevent -w 1``, beside the floor: a gevent
StreamServer echoing frames with wsproto (``bench/apps/ws_floor.py``), no
HTTP server and no app. Every server is pinned to core 0 and started before
the first measurement; the load generator (``bench/apps/ws_clients.py``, one
gevent process, precomputed frames; why not simple_websocket.Client is said
there) runs on core 1. At 1 and 50 connections each client sends a 31-byte
text message and waits for its echo, back to back; the runs are interleaved
round by round and each figure is the best of its rounds. ``server CPU``
rows divide the CPU time of the server's process tree by the round trips.

The full run also opens 1,000 WebSockets on a fresh process of each server,
each checked with one echo and then left idle, and reads the server's RSS
before and after (``--quick`` skips it).
"""

import json
import os
import selectors
import subprocess
import sys
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import PY, ROOT, bench_main, free_port, pinned, row, rss_kib, server  # noqa: E402
from bench.bench_http import cpu_seconds  # noqa: E402

APP = "bench.apps.ws_app:app"
GUNICORN = str(Path(PY).with_name("gunicorn"))
PEERS = ("gunicorn -k gevent", "gevent floor")
SERVER_CORE, CLIENT_CORE = 0, 1
IDLE = 1000


def command(name: str, port: int) -> Optional[List[str]]:
    """The command line of server ``name`` on ``port`` (None when it is not installed)."""
    bind = "127.0.0.1:%d" % port
    if name == "greenqueue":
        return [PY, "-m", "greenqueue.server", "--bind", bind, "--log-level", "warning",
                "--max-connections", "2000", "--backlog", "4096", APP]
    if name == "gunicorn -k gevent":
        if not os.path.exists(GUNICORN):
            return None
        return [GUNICORN, "-k", "gevent", "-w", "1", "--worker-connections", "2000", "--backlog", "4096",
                "-b", bind, "--log-level", "warning", APP]
    if name == "gevent floor":
        return [PY, "-m", "bench.apps.ws_floor", str(port)]
    raise ValueError(name)


def _client(*args: str) -> list:
    return pinned([PY, "-m", "bench.apps.ws_clients"] + list(args), CLIENT_CORE)


def echo(port: int, conns: int, seconds: float) -> dict:
    """Run the echo client once; return its JSON report (round_trips, seconds, cpu, failed, errors)."""
    proc = subprocess.run(_client("echo", str(port), str(conns), str(seconds)), capture_output=True, text=True,
                          timeout=seconds + 60, cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        raise RuntimeError("echo client failed: %s" % (proc.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(lines[-1])


def _measure(proc: subprocess.Popen, port: int, conns: int, seconds: float) -> dict:
    before = cpu_seconds(proc.pid)
    got = echo(port, conns, seconds)
    used = cpu_seconds(proc.pid) - before
    return {"rps": got["round_trips"] / got["seconds"],
            "cpu_us": used / got["round_trips"] * 1e6 if got["round_trips"] else None,
            "client_cpu": got["cpu"] / got["seconds"], "errors": got["failed"] + got["error_count"],
            "first_error": (got["errors"] or [""])[0]}


def _best(runs: list) -> dict:
    """Best of interleaved rounds: highest round trips/s, lowest CPU per round trip."""
    top = dict(max(runs, key=lambda r: r["rps"]))
    top["cpu_us"] = min((r["cpu_us"] for r in runs if r["cpu_us"] is not None), default=None)
    top["runs"] = [round(r["rps"]) for r in runs]
    return top


def round_trips(names: tuple, conn_counts: tuple, seconds: float, rounds: int) -> dict:
    """Return {(server, conns): best result}; servers run side by side, client rounds interleaved."""
    runs: dict = {}
    with ExitStack() as stack:
        instances = {}
        for name in names:
            port = free_port()
            cmd = command(name, port)
            if cmd is None:
                continue
            instances[name] = (stack.enter_context(server(cmd, port, core=SERVER_CORE)), port)
            # Warm-up: gunicorn's first seconds ran at half speed here, and the first WebSocket loads code in both.
            echo(port, 10, 0.5)
        for _ in range(rounds):
            for conns in conn_counts:
                for name, (proc, port) in instances.items():
                    runs.setdefault((name, conns), []).append(_measure(proc, port, conns, seconds))
    return {key: _best(got) for key, got in runs.items()}


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of ``proc``'s stdout, or '' when none comes within ``timeout`` (a hung client must not hang us)."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline()


def idle_memory(name: str, n: int) -> dict:
    """Open ``n`` idle WebSockets on a fresh server; return {"held", "base_kib", "rss_kib"}."""
    port = free_port()
    cmd = command(name, port)
    if cmd is None:
        return {}
    with server(cmd, port, core=SERVER_CORE) as proc:
        # Open and close a few first, so what the first WebSocket loads or caches is in the baseline.
        echo(port, 20, 0.2)
        base = rss_kib(proc.pid)
        client = subprocess.Popen(_client("hold", str(port), str(n)), cwd=str(ROOT),
                                  env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            line = _read_line(client, 120).split()
            held = int(line[1]) if line and line[0] == "ready" else 0
            rss = rss_kib(proc.pid)
        finally:
            client.stdin.close()
            try:
                client.wait(30)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(client.pid, 9)
                client.wait(10)
            client.stdout.close()
    return {"held": held, "base_kib": base, "rss_kib": rss}


def _note(mine: dict, theirs: dict) -> str:
    parts = ["client CPU %.0f%%/%.0f%% of a core" % (100 * mine["client_cpu"], 100 * theirs["client_cpu"])]
    if len(mine["runs"]) > 1:  # the spread says how far one run's ratio can be trusted on a shared machine
        parts.append("rounds %s/%s" % (",".join(map(str, mine["runs"])), ",".join(map(str, theirs["runs"]))))
    if mine["errors"] or theirs["errors"]:
        parts.append("errors: %d/%d %s" % (mine["errors"], theirs["errors"],
                                           mine["first_error"] or theirs["first_error"]))
    return "; ".join(parts)


def _rows(results: dict, conn_counts: tuple, peers: tuple) -> list:
    rows = []
    for conns in conn_counts:
        mine = results[("greenqueue", conns)]
        name = "flask-sock echo c=%d" % conns
        for peer in peers:
            theirs = results.get((peer, conns))
            if theirs is None:
                rows.append(row("websocket", name + " round trips/s", mine["rps"], "round trips/s", peer, None,
                                note="not installed"))
                continue
            rows.append(row("websocket", name + " round trips/s", mine["rps"], "round trips/s", peer, theirs["rps"],
                            True, _note(mine, theirs)))
            rows.append(row("websocket", name + " server CPU", mine["cpu_us"], "us/round trip", peer,
                            theirs["cpu_us"], False))
    return rows


def _memory_rows(n: int, peers: tuple) -> list:
    got = {name: idle_memory(name, n) for name in ("greenqueue",) + peers}
    mine = got["greenqueue"]

    def per_conn(r: dict) -> Optional[float]:
        return (r["rss_kib"] - r["base_kib"]) / r["held"] if r.get("held") else None

    rows = []
    for peer in peers:
        theirs = got[peer]
        note = "held %d/%d of %d" % (mine["held"], theirs.get("held", 0), n)
        rows.append(row("websocket", "memory per idle WebSocket (%d open)" % n, per_conn(mine), "KiB", peer,
                        per_conn(theirs), False, note))
        rows.append(row("websocket", "server RSS with %d idle WebSockets" % n, mine["rss_kib"] / 1024, "MiB", peer,
                        theirs["rss_kib"] / 1024 if theirs else None, False,
                        "gunicorn: master and worker" if peer.startswith("gunicorn") else ""))
    return rows


def run(quick: bool = False, smoke: bool = False) -> list:
    """Measure and return rows (ratio > 1: greenqueue better)."""
    seconds = 0.5 if smoke else (1.5 if quick else 5)
    rounds = 1 if smoke or quick else 3
    conn_counts = (1, 50)
    rows = _rows(round_trips(("greenqueue",) + PEERS, conn_counts, seconds, rounds), conn_counts, PEERS)
    if not (quick or smoke):
        rows.extend(_memory_rows(IDLE, PEERS))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point."""
    footer = ("client: one gevent process on core %d, servers on core %d; best of 3 interleaved rounds of 5 s "
              "(1 of 1.5 s with --quick, which skips the %d idle WebSockets)" % (CLIENT_CORE, SERVER_CORE, IDLE))
    return bench_main(run, __doc__, argv, footer=footer)


if __name__ == "__main__":
    sys.exit(main())
