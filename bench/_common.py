"""Shared bench helpers: result rows, a markdown table, servers and wrk on loopback.

Every bench talks to 127.0.0.1 only, bounds its own time, and stops every
process it started (process groups, killed on any exit path).
"""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def row(bench, metric, value, unit, baseline, baseline_value, higher_is_better=True, note=""):
    """One result row; ``ratio`` > 1 always means greenqueue is better."""
    ratio = None
    if value and baseline_value:
        ratio = value / baseline_value if higher_is_better else baseline_value / value
    return {"bench": bench, "metric": metric, "value": value, "unit": unit, "baseline": baseline,
            "baseline_value": baseline_value, "ratio": ratio, "note": note}


def fmt(value):
    """Short human form of a number (or '-')."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return "%.3g" % value if abs(value) < 1000 else "{:,.0f}".format(value)


def markdown(rows):
    """Render rows as one markdown table."""
    lines = ["| bench | metric | greenqueue | unit | baseline | baseline value | ratio | note |",
             "|---|---|---:|---|---|---:|---:|---|"]
    for r in rows:
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r.get("bench", ""), r["metric"], fmt(r["value"]), r.get("unit", ""), r.get("baseline", ""),
            fmt(r.get("baseline_value")), (fmt(r["ratio"]) + "x") if r.get("ratio") else "-",
            r.get("note", "")))
    return "\n".join(lines)


def free_port():
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cmd, core):
    """Prefix ``cmd`` with taskset so server and load generator use different cores."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(core)] + cmd
    return cmd


def wait_port(port, proc, timeout=20.0):
    """Wait until ``port`` accepts connections; fail fast if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited with %s before listening" % proc.returncode)
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("server did not listen on %d within %.0fs" % (port, timeout))


@contextlib.contextmanager
def server(cmd, port, env=None, core=0):
    """Run a server command in its own process group; yield the Popen; always kill it."""
    home = tempfile.mkdtemp(prefix="gq-bench-home-")  # gunicorn writes ~/.gunicorn
    full_env = dict(os.environ, HOME=home, PYTHONPATH=str(ROOT), **(env or {}))
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(pinned(cmd, core), cwd=str(ROOT), env=full_env, stdout=log, stderr=log,
                            start_new_session=True)
    try:
        wait_port(port, proc)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def rss_kib(pid):
    """Resident set size of ``pid`` and its children, in KiB (from /proc)."""
    total = 0
    pids = [pid] + children(pid)
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path("/proc/%d/status" % p).read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def children(pid):
    """All descendant pids of ``pid``."""
    out = []
    with contextlib.suppress(OSError):
        for task in Path("/proc/%d/task" % pid).iterdir():
            for child in (task / "children").read_text().split():
                out.append(int(child))
                out.extend(children(int(child)))
    return out


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url, connections, seconds, core=1, script=None):
    """Run wrk; return {"rps", "p50_ms", "p99_ms", "max_ms", "errors"} or raise if wrk is missing."""
    if not shutil.which("wrk"):
        raise FileNotFoundError("wrk is not installed (apt-get install wrk)")
    cmd = ["wrk", "-t1", "-c%d" % connections, "-d%ds" % max(1, int(seconds)), "--latency", url]
    out = subprocess.run(pinned(cmd, core), capture_output=True, text=True, timeout=seconds + 30).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "errors": 0}
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(r"\s%s(?:\.0+)?%%\s+([\d.]+)(us|ms|s)" % pct, out)
        result[key] = float(m.group(1)) * _UNITS[m.group(2)] if m else None
    # "Latency  avg  stdev  max  +/- stdev": the slowest request, the one fairness is about.
    m = re.search(r"Latency\s+[\d.]+\w+\s+[\d.]+\w+\s+([\d.]+)(us|ms|s)", out)
    result["max_ms"] = float(m.group(1)) * _UNITS[m.group(2)] if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        result["errors"] = sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        result["errors"] += int(m.group(1))
    return result


def percentile(values, p, scale=1.0):
    """The ``p`` quantile (0..1) of ``values`` times ``scale`` (None when empty)."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] * scale


def bench_main(run, doc, argv=None, footer=""):
    """The command line every bench shares: ``[--quick]``, then the table (and ``footer``)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short run make bench QUICK=1 uses")
    args = parser.parse_args(argv)
    started = time.monotonic()
    print(markdown(run(quick=args.quick)))
    print("\n%sratio > 1 means greenqueue is better (%.0fs)" % (footer + "; " if footer else "",
                                                              time.monotonic() - started))
    return 0
