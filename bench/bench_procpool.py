"""Process-pool calls and streams: greenqueue vs a bare gipc pipe vs gunicorn 27's dirty workers.

Usage: ``python bench/bench_procpool.py [--quick]``. One worker on each
side. greenqueue's worker polls its pipe for a moment after each call (it
has a spare core here); the "no polling" rows show it sleeping between
calls, as it does when polling workers would outnumber the cores. greenqueue and the gipc
baseline run in this process (one gevent hub, like a server greenlet would);
gunicorn's figures are timed inside a gunicorn sync worker calling its dirty
arbiter with ``gunicorn.dirty.get_dirty_client()``, the path its docs show.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gevent  # noqa: E402
import gipc  # noqa: E402

from bench._common import PY, bench_main, free_port, percentile, row, server  # noqa: E402
from greenqueue.procpool import ProcessPool  # noqa: E402

APP = "bench.apps.procpool_app:EchoApp"
NOPOLL = "bench.apps.procpool_app:EchoAppNoPoll"
DICT = {"key-%d" % i: i for i in range(1000)}
REPEAT = 3  # every side runs this many times and reports its best


def _pct(values, p):
    return percentile(values, p, 1e6)  # microseconds


def _best(runs):
    """Each figure's best over ``runs`` (lowest latency, highest rate)."""
    return {k: (min if k in ("p50", "p99") else max)(r[k] for r in runs) for k in runs[0]}


def _gipc_child(conn):
    while True:
        msg = conn.get()
        if msg is None:
            return
        if msg[0] == "stream":
            block = b"x" * msg[2] if msg[2] else 0
            for _ in range(msg[1]):
                conn.put(block)
            conn.put(None)
        else:
            conn.put(msg[1])


def bare_gipc(n, n_chunks, size):
    """Baseline: a gipc duplex pipe to a child that echoes (no pool, no errors, no flow control)."""
    with gipc.pipe(duplex=True) as (parent, child):
        proc = gipc.start_process(_gipc_child, args=(child,))
        parent.put(("echo", None))
        parent.get()
        lat = []
        t0 = time.perf_counter()
        for _ in range(n):
            s = time.perf_counter()
            parent.put(("echo", None))
            parent.get()
            lat.append(time.perf_counter() - s)
        calls = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        parent.put(("stream", n_chunks, 16))
        while parent.get() is not None:
            pass
        chunks = n_chunks / (time.perf_counter() - t0)
        big = max(1, n_chunks // 100)
        t0 = time.perf_counter()
        parent.put(("stream", big, size))
        while parent.get() is not None:
            pass
        mbs = big * size / (time.perf_counter() - t0) / 1e6
        parent.put(None)
        proc.join()
    return {"calls": calls, "p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99), "chunks": chunks, "mbs": mbs}


def _empty_calls(pool, n):
    """``n`` empty calls one after another: calls/s, p50 and p99."""
    pool.call("echo")
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        s = time.perf_counter()
        pool.call("echo")
        lat.append(time.perf_counter() - s)
    return {"calls": n / (time.perf_counter() - t0), "p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99)}


def sleeping_calls(n):
    """Empty calls to a pool whose worker sleeps between calls (idle_poll = 0): the transport alone."""
    pool = ProcessPool(NOPOLL, workers=1).start()
    try:
        return _empty_calls(pool, n)
    finally:
        pool.stop()


def greenqueue(n, n_chunks, size):
    """greenqueue's ProcessPool: 1 and 8 concurrent callers, dict echo, small and large chunks."""
    pool = ProcessPool(APP, workers=1).start()
    try:
        res = _empty_calls(pool, n)
        t0 = time.perf_counter()
        gevent.joinall([gevent.spawn(lambda: [pool.call("echo") for _ in range(n // 8)]) for _ in range(8)])
        res["calls8"] = (n // 8 * 8) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(max(1, n // 10)):
            pool.call("echo", DICT)
        res["dict"] = max(1, n // 10) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert sum(1 for _ in pool.stream("chunks", n_chunks, 16)) == n_chunks
        res["chunks"] = n_chunks / (time.perf_counter() - t0)
        big = max(1, n_chunks // 100)
        t0 = time.perf_counter()
        sum(1 for _ in pool.stream("chunks", big, size))
        res["mbs"] = big * size / (time.perf_counter() - t0) / 1e6
    finally:
        pool.stop()
    return res


def gunicorn_dirty(n, n_chunks, size, n_dict=None, n_big=None):
    """gunicorn 27 dirty workers, timed inside a gunicorn worker; None with a reason if it cannot run."""
    import requests

    gunicorn = Path(PY).with_name("gunicorn")
    if not gunicorn.exists():
        return None, "gunicorn is not installed (pip install gunicorn)"
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "conf.py"
        conf.write_text("dirty_apps = ['bench.apps.dirty_peer:EchoDirty']\ndirty_workers = 1\n"
                        "dirty_timeout = 60\nworkers = 1\ntimeout = 120\nloglevel = 'warning'\n")
        cmd = [str(gunicorn), "-c", str(conf), "-b", "127.0.0.1:%d" % port, "bench.apps.dirty_peer:app"]
        try:
            with server(cmd, port):
                url = "http://127.0.0.1:%d/" % port
                deadline = time.monotonic() + 30
                while True:  # the dirty arbiter boots after the HTTP port is open
                    warm = requests.get(url, params={"n": 10}, timeout=60)
                    if warm.status_code == 200:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError("dirty arbiter not ready: HTTP %d" % warm.status_code)
                    time.sleep(0.2)
                def elapsed(method, params, data=None):
                    # Best of REPEAT, as for greenqueue and bare gipc: the fairest figure on a noisy machine.
                    runs = [requests.request(method, url, params=params, data=data, timeout=300).json()
                            for _ in range(REPEAT)]
                    return min(runs, key=lambda r: r["elapsed"])

                r = elapsed("GET", {"n": n})
                res = {"calls": n / r["elapsed"], "p50": _pct(r["latencies"], 0.5),
                       "p99": _pct(r["latencies"], 0.99)}
                m = n_dict or max(1, n // 10)
                res["dict"] = m / elapsed("POST", {"n": m}, json.dumps(DICT))["elapsed"]
                res["chunks"] = n_chunks / elapsed("GET", {"n": n_chunks, "kind": "stream", "size": 16})["elapsed"]
                big = n_big or max(1, n_chunks // 100)
                res["mbs"] = big * size / elapsed("GET", {"n": big, "kind": "stream", "size": size})["elapsed"] / 1e6
                return res, ""
        except Exception as exc:
            return None, "gunicorn dirty workers could not be driven: %s: %s" % (type(exc).__name__, exc)


def run(quick: bool = False, smoke: bool = False) -> list:
    """Measure and return rows (ratio > 1: greenqueue better)."""
    n = 300 if smoke else (2000 if quick else 10000)
    n_chunks = 3000 if smoke else (30000 if quick else 200000)
    size = 64 * 1024
    ours_runs, bare_runs, sleeping_runs = [], [], []
    for _ in range(REPEAT):  # interleaved, so a slow moment of the machine does not land on one side only
        ours_runs.append(greenqueue(n, n_chunks, size))
        bare_runs.append(bare_gipc(n, n_chunks, size))
        sleeping_runs.append(sleeping_calls(n))
    ours, bare, sleeping = _best(ours_runs), _best(bare_runs), _best(sleeping_runs)
    if quick:
        # gunicorn's side is most of the quick run's time: each chunk and each dict echo is a round
        # trip to its arbiter, so its rates hold steady over fewer of them (~3 s instead of ~15).
        peer, why = gunicorn_dirty(n, 5000, size, n_dict=50, n_big=max(1, n_chunks // 100))
    else:
        peer, why = gunicorn_dirty(n, n_chunks, size)
    rows = []
    for base_name, base in (("bare gipc pipe", bare), ("gunicorn 27 dirty", peer)):
        note = "" if base is not None else why
        b = base or {}
        rows += [
            row("procpool", "empty call, 1 caller", ours["calls"], "calls/s", base_name, b.get("calls"), True, note),
            row("procpool", "empty call p50", ours["p50"], "us", base_name, b.get("p50"), False),
            row("procpool", "empty call p99", ours["p99"], "us", base_name, b.get("p99"), False),
            row("procpool", "16-byte stream chunks", ours["chunks"], "chunks/s", base_name, b.get("chunks"), True),
            row("procpool", "64 KiB stream chunks", ours["mbs"], "MB/s", base_name, b.get("mbs"), True),
        ]
        if base_name != "bare gipc pipe":
            rows.append(row("procpool", "1,000-key dict echo", ours["dict"], "calls/s", base_name, b.get("dict"), True))
    rows.append(row("procpool", "empty call, 8 callers (1 worker)", ours["calls8"], "calls/s", "greenqueue, 1 caller",
                    ours["calls"], True))
    # Workers poll only while cores are to spare; these rows are a pool whose worker sleeps.
    note = "worker sleeps between calls (idle_poll = 0, or no spare core)"
    for base_name, base in (("bare gipc pipe", bare), ("gunicorn 27 dirty", peer)):
        b = base or {}
        rows.append(row("procpool", "empty call, 1 caller, no polling", sleeping["calls"], "calls/s", base_name,
                        b.get("calls"), True, note))
        rows.append(row("procpool", "empty call p50, no polling", sleeping["p50"], "us", base_name,
                        b.get("p50"), False, note))
    return rows


def main(argv=None):
    """Command-line entry point."""
    return bench_main(run, __doc__, argv, footer='targets: >= 5x gunicorn calls/s, >= 10x gunicorn chunks/s, p50 <= 1.25x bare gipc')


if __name__ == "__main__":
    sys.exit(main())
