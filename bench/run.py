"""Run every bench/bench_*.py, write bench/results/latest.json, print one table.

Usage: ``python bench/run.py [--quick] [--only NAME ...]``. Each bench runs in
its own subprocess (a crash or hang in one cannot spoil the others) with a
time limit; a bench that fails becomes a row saying why.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import PY, ROOT, markdown, row  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
MARK = "@@GREENQUEUE-BENCH-ROWS@@"
CHILD = ("import inspect, json, sys; sys.path.insert(0, %r); import bench.{name} as b; "
         "kw = {{'smoke': True}} if {smoke} and 'smoke' in inspect.signature(b.run).parameters else {{}}; "
         "rows = b.run(quick={quick}, **kw); print(%r + json.dumps(rows, default=str))")


def discover():
    """Names of the bench modules, e.g. ['bench_http', 'bench_tasks']."""
    return sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))


def run_one(name, quick, limit, smoke=False):
    """Run one bench module in a subprocess; return its rows (or one row saying why it failed)."""
    code = CHILD.format(name=name, quick=quick, smoke=smoke) % (str(ROOT), MARK)
    started = time.monotonic()
    try:
        proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=limit,
                              cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    except subprocess.TimeoutExpired:
        return [row(name[6:], "(bench)", None, "", "-", None, note="timed out after %ds" % limit)]
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            rows = json.loads(line[len(MARK):])
            for r in rows:
                r.setdefault("bench", name[6:])
            print("%s: %d rows in %.0fs" % (name, len(rows), time.monotonic() - started), file=sys.stderr)
            return rows
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return [row(name[6:], "(bench)", None, "", "-", None, note="failed: %s" % tail[:200])]


def machine():
    """Where the numbers come from."""
    versions = {}
    for pkg in ("greenqueue", "gevent", "gipc", "greenlet", "flask", "httptools", "gunicorn", "huey", "celery",
                "procrastinate", "psycopg"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "packages": versions}


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (the whole suite in ~2 minutes)")
    parser.add_argument("--only", nargs="*", help="bench names, e.g. http tasks")
    args = parser.parse_args(argv)
    names = discover()
    if args.only:
        names = [n for n in names if n[6:] in args.only or n in args.only]
    limit = 120 if args.quick else 900
    rows = []
    for name in names:
        print("running %s%s ..." % (name, " (quick)" if args.quick else ""), file=sys.stderr)
        rows.extend(run_one(name, args.quick, limit))
    out = BENCH_DIR / "results" / "latest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "quick": args.quick, "rows": rows}, indent=1, default=str))
    print(markdown(rows))
    print("\nratio > 1 means greenqueue is better; rows written to bench/results/latest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
