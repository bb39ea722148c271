"""Cluster: greenqueue nodes on PostgreSQL vs procrastinate (PostgreSQL) and Celery (Redis), same run, same processes.

Usage: ``python bench/bench_cluster.py [--quick]``. The bench starts its own
engines, each in a temporary directory and stopped at the end: PostgreSQL
(``synchronous_commit=on``, fsync on) and redis-server (``appendonly yes``).
Each stack runs the same number of worker processes (1, then 2): greenqueue
server nodes, ``procrastinate worker`` processes, or Celery workers (gevent
pool, 100 greenlets, ``acks_late``, Redis broker and result backend). Every
task sends one UDP datagram to the bench when it starts, so all stacks are
timed the same way. Figures:

1. drain: N tasks enqueued before any worker starts, tasks/s over the middle
   90 % of their start times (worker start-up is not counted);
2. enqueue->start latency p50/p99 at a fixed 500 tasks/s, from just before
   the enqueue call to the task's first line;
3. lateness p99 of tasks due evenly over a few seconds, enqueued up front;
4. a Flask view that spawns a task, under wrk (50 connections) at
   saturation: requests/s, and the memory (PSS) of every process the stack
   runs: web server, workers, and the PostgreSQL or Redis server.

Full bench only (the smoke run keeps a tiny (6)):

5. the claim at scale: a web node (``--queues ""``) enqueues N tasks while a
   worker node serving "default" claims them, on an empty database vs one
   holding 200,000 rows due in a day on "default" and 200,000 on a queue no
   node serves (ratio backlog/empty, as tasks/s over the middle 90 %);
6. flow control, drains as in (1), one worker process each: mixed priorities
   vs procrastinate's ``priority``; a rate limit above either stack's drain
   vs Celery's per-worker ``rate_limit``; one run at a time per key over 50
   keys (``concurrency_limit=1``) vs procrastinate's ``lock``.

Targets: (1) >= 2x procrastinate and >= 1x Celery; (2) p99 <= 1/2 of both;
(3) lateness p99 < 50 ms; (4) >= 3x Celery's requests/s at <= 1/3 of its memory;
(5) >= 0.7x.
"""

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import PY, ROOT, bench_main, children, free_port, percentile, pinned, row, wait_port, wrk  # noqa: E402

NAME = "cluster"
WORKER_CONCURRENCY = 100  # greenqueue's default max_concurrency; Celery's -c and procrastinate's -c match it
PQ_POOL = WORKER_CONCURRENCY + 2  # a connection per running job, plus its fetch and LISTEN: its fastest here


# -- engines ------------------------------------------------------------------------------


def find_pg_bindir():
    """The newest ``/usr/lib/postgresql/N/bin`` holding initdb and pg_ctl, or None."""
    found = []
    for bindir in glob.glob("/usr/lib/postgresql/*/bin"):
        version = os.path.basename(os.path.dirname(bindir))
        if version.isdigit() and all(os.access(os.path.join(bindir, b), os.X_OK) for b in ("initdb", "pg_ctl")):
            found.append((int(version), bindir))
    return max(found)[1] if found else None


class Postgres:
    """A private PostgreSQL server in a temporary directory, durable commits, stopped by ``stop()``."""

    def __init__(self, bindir):
        self.bindir = bindir
        self.base = Path(tempfile.mkdtemp(prefix="gq-bench-pg-"))
        self.port = free_port()
        # initdb and postgres refuse to run as root.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self._dbs = 0
        self.running = False

    def _run(self, binary, *args):
        done = subprocess.run(self._as + [os.path.join(self.bindir, binary), *args], capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError("%s failed: %s%s" % (binary, done.stdout, done.stderr))

    def start(self):
        """initdb and start; the settings that matter for durability are spelled out."""
        data, sock = self.base / "data", self.base / "sock"
        sock.mkdir()
        data.mkdir()
        if self._as:
            owner = pwd.getpwnam("postgres")
            for path in (self.base, sock, data):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C",
                  "--no-sync")
        options = ("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on "
                   "-c max_connections=300" % (self.port, sock))
        self._run("pg_ctl", "-D", str(data), "-l", str(data / "server.log"), "-w", "-t", "60", "-o", options,
                  "start")
        self.running = True
        return self

    def pid(self):
        """The postmaster's pid (its children are the backends and helpers)."""
        return int((self.base / "data" / "postmaster.pid").read_text().split()[0])

    def dsn(self, db="postgres"):
        """A URL for database ``db``."""
        return "postgresql://postgres@127.0.0.1:%d/%s" % (self.port, db)

    def new_database(self):
        """A fresh database, so no run sees another's rows; returns its URL."""
        import psycopg

        self._dbs += 1
        name = "bench_%d" % self._dbs
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE %s" % name)
        return self.dsn(name)

    def drop_database(self, dsn):
        """Drop a database new_database made, so a big one's autovacuum cannot slow the runs after it."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute("DROP DATABASE %s WITH (FORCE)" % dsn.rsplit("/", 1)[1])

    def stop(self):
        """Stop the server and delete its files."""
        if self.running:
            with contextlib.suppress(Exception):
                self._run("pg_ctl", "-D", str(self.base / "data"), "-m", "immediate", "-w", "stop")
            self.running = False
        shutil.rmtree(self.base, ignore_errors=True)


class Procs:
    """Processes started in their own process groups, all killed on ``close()``."""

    def __init__(self):
        self.procs = []
        self.home = tempfile.mkdtemp(prefix="gq-bench-home-")  # gunicorn writes under ~

    def start(self, cmd, env=None, core=None):
        """Start ``cmd`` (pinned to ``core`` when given); returns the Popen."""
        full_env = dict(os.environ, HOME=self.home, PYTHONPATH=str(ROOT), **(env or {}))
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen(pinned(cmd, core) if core is not None else cmd, cwd=str(ROOT), env=full_env,
                                stdout=log, stderr=log, start_new_session=True)
        proc.log = log
        self.procs.append(proc)
        return proc

    def log_tail(self, proc):
        """The last lines a process wrote (for an error message)."""
        proc.log.seek(0)
        return proc.log.read().decode(errors="replace").strip()[-600:]

    def close(self):
        """Kill every process started here."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            proc.log.close()
        self.procs = []
        shutil.rmtree(self.home, ignore_errors=True)


def pss_kib(pid):
    """Proportional set size of ``pid`` and its descendants in KiB: shared pages (PostgreSQL's buffers,
    a forked worker's copy-on-write pages) are split between the processes instead of counted in each."""
    total = 0
    for p in [pid] + children(pid):
        with contextlib.suppress(OSError):
            for line in Path("/proc/%d/smaps_rollup" % p).read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total


# -- what the tasks report -------------------------------------------------------------------


class Collector:
    """A UDP socket that keeps every number the tasks send (cluster_probe.report)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.values = []
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                data = self.sock.recv(64)
            except socket.timeout:
                continue
            self.values.append(float(data))

    def reset(self):
        """Forget what arrived so far."""
        self.values = []

    def wait(self, n, stall=15.0):
        """Wait until ``n`` values arrived or none arrived for ``stall`` s; returns them."""
        last, seen = time.monotonic(), 0
        while len(self.values) < n and time.monotonic() - last < stall:
            time.sleep(0.05)
            if len(self.values) != seen:
                seen, last = len(self.values), time.monotonic()
        return list(self.values)

    def close(self):
        """Stop the reader thread."""
        self._stop = True
        self._thread.join(2)
        self.sock.close()


# -- the three stacks ----------------------------------------------------------------------------


class Stack:
    """One task queue: how to prepare its store, start its workers, and enqueue through it."""

    label = ""
    key = ""
    #: The module that enqueues into the stack (``python -m`` it).
    producer = "bench.apps.cluster_producer"

    def __init__(self, procs, probe_port):
        self.procs = procs
        self.env = {"BENCH_PROBE_PORT": str(probe_port)}

    def fresh(self):
        """Point the stack at empty storage."""

    def start_workers(self, nodes):
        """Start ``nodes`` worker processes, one per core in turn; return when they take work."""
        raise NotImplementedError

    def produce(self, *args, timeout=120):
        """Run the stack's producer module to completion; returns (its seconds, enqueues failed)."""
        done = subprocess.run([PY, "-m", self.producer, self.key] + [str(a) for a in args],
                              cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT), **self.env),
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError("%s producer failed: %s" % (self.label, done.stderr.strip()[-600:]))
        words = done.stdout.split()
        return float(words[-4]), int(words[-2])

    def stop_workers(self):
        """Kill the workers started by start_workers."""
        for proc in getattr(self, "workers", []):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self.workers = []


class Greenqueue(Stack):
    """greenqueue server nodes sharing one PostgreSQL database."""

    label = "greenqueue"
    key = "gq"
    app = "bench.apps.cluster_gq:app"

    def __init__(self, procs, probe_port, pg):
        super().__init__(procs, probe_port)
        self.pg = pg

    def fresh(self):
        """A new database."""
        self.env["BENCH_DSN"] = self.dsn = self.pg.new_database()

    def node_cmd(self, port, workers=1):
        """The command line of a node serving the bench app on ``port``."""
        return [PY, "-m", "greenqueue.server", "--journal", self.dsn, "--bind", "127.0.0.1:%d" % port,
                "--log-level", "warning", "--max-concurrency", str(WORKER_CONCURRENCY)] + (
                    # --workers runs a supervisor (even for 1): one process per node unless asked.
                    ["--workers", str(workers)] if workers > 1 else []) + [self.app]

    def start_workers(self, nodes):
        """Start the nodes; each listens once its store is open."""
        self.workers = []
        for k in range(nodes):
            port = free_port()
            proc = self.procs.start(self.node_cmd(port), self.env, core=k % (os.cpu_count() or 1))
            self.workers.append(proc)
            try:
                wait_port(port, proc, 30)
            except RuntimeError as exc:
                raise RuntimeError("%s: %s" % (exc, self.procs.log_tail(proc))) from None


class Procrastinate(Stack):
    """``procrastinate worker`` processes on the same PostgreSQL server."""

    label = "procrastinate"
    key = "pq"
    app = "bench.apps.cluster_procrastinate.app"

    def __init__(self, procs, probe_port, pg):
        super().__init__(procs, probe_port)
        self.pg = pg
        self.env["BENCH_PQ_POOL"] = str(PQ_POOL)
        self.cli = [str(Path(PY).with_name("procrastinate")), "--app=" + self.app]

    def fresh(self):
        """A new database with procrastinate's schema."""
        self.env["BENCH_PQ_DSN"] = self.dsn = self.pg.new_database()
        done = subprocess.run(self.cli + ["schema", "--apply"], cwd=str(ROOT), capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT), **self.env), timeout=60)
        if done.returncode != 0:
            raise RuntimeError("procrastinate schema --apply failed: %s" % done.stderr.strip()[-600:])

    def start_workers(self, nodes):
        """Start the workers; ready once each registered itself in the database."""
        import psycopg

        self.workers = [self.procs.start(self.cli + ["worker", "--concurrency", str(WORKER_CONCURRENCY)],
                                         self.env, core=k % (os.cpu_count() or 1)) for k in range(nodes)]
        deadline = time.monotonic() + 30
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()[0] < nodes:
                for proc in self.workers:
                    if proc.poll() is not None:
                        raise RuntimeError("procrastinate worker exited: %s" % self.procs.log_tail(proc))
                if time.monotonic() > deadline:
                    raise RuntimeError("procrastinate workers did not register within 30 s")
                time.sleep(0.05)


class Celery(Stack):
    """Celery workers (gevent pool, acks_late) with Redis as broker and result backend."""

    label = "Celery"
    key = "celery"
    app = "bench.apps.cluster_celery:celery"

    def __init__(self, procs, probe_port, redis_port):
        super().__init__(procs, probe_port)
        self.redis_port = redis_port
        self.env["BENCH_REDIS_URL"] = "redis://127.0.0.1:%d/0" % redis_port

    def client(self):
        """A redis client on the bench's server."""
        import redis

        return redis.Redis(port=self.redis_port)

    def fresh(self):
        """Empty Redis (queue, unacked messages and results)."""
        self.client().flushall()

    def start_workers(self, nodes):
        """Start the workers; ready once each waits on the queue (a BRPOP per worker)."""
        celery_bin = str(Path(PY).with_name("celery"))
        self.workers = []
        for k in range(nodes):
            cmd = [celery_bin, "-A", self.app, "worker", "-P", "gevent", "-c",
                   str(WORKER_CONCURRENCY), "--without-heartbeat", "--without-gossip", "--without-mingle",
                   "-l", "warning", "-n", "w%d@bench" % k]
            self.workers.append(self.procs.start(cmd, self.env, core=k % (os.cpu_count() or 1)))
        deadline = time.monotonic() + 30
        r = self.client()
        while sum(1 for c in r.client_list() if c.get("cmd") == "brpop") < nodes:
            for proc in self.workers:
                if proc.poll() is not None:
                    raise RuntimeError("celery worker exited: %s" % self.procs.log_tail(proc))
            if time.monotonic() > deadline:
                raise RuntimeError("celery workers did not start consuming within 30 s")
            time.sleep(0.05)


# -- the measurements --------------------------------------------------------------------------------


def drain(stack, collector, n, nodes, mode=None):
    """Enqueue ``n`` tasks, then start the workers; tasks/s over the middle 90 % of start times.

    ``mode`` is the producer's arguments after the stack's key (default ``("drain", n)``).
    """
    stack.fresh()
    stack.produce(*(mode or ("drain", n)))
    collector.reset()
    stack.start_workers(nodes)
    try:
        times = sorted(collector.wait(n))
    finally:
        stack.stop_workers()
    if len(times) < n:
        raise RuntimeError("%s ran %d of %d tasks" % (stack.label, len(times), n))
    lo, hi = int(n * 0.05), int(n * 0.95)
    return (hi - lo) / (times[hi] - times[lo])


def latencies(stack, collector, nodes, rate, seconds, delayed, spread, lead, warm=True):
    """Enqueue->start latencies at ``rate``/s, then lateness of ``delayed`` tasks due over ``spread`` s (s)."""
    stack.fresh()
    stack.start_workers(nodes)
    try:
        if warm:
            collector.reset()
            stack.produce("rate", 50, 1)  # warm-up: connections, imports, the first claims
            collector.wait(50, stall=5)
        collector.reset()
        n = int(rate * seconds)
        _, failed = stack.produce("rate", rate, seconds)
        lat = collector.wait(n - failed)
        collector.reset()
        # Every task is enqueued before the first is due (the row says how long enqueueing took).
        took, _ = stack.produce("delayed", delayed, spread, lead)
        late = collector.wait(delayed, stall=spread + lead + 15)
    finally:
        stack.stop_workers()
    return lat, n, late, failed, took


def http_greenqueue(pg, procs, seconds):
    """wrk on one greenqueue node (core 0): requests/s, and PSS of the node plus PostgreSQL."""
    stack = Greenqueue(procs, 0, pg)
    stack.fresh()
    port = free_port()
    node = procs.start(stack.node_cmd(port), {}, core=0)
    wait_port(port, node, 30)
    url = "http://127.0.0.1:%d/spawn" % port
    if seconds > 1:
        wrk(url, 10, 1)  # warm-up: the pools' connections, the first imports
    result = wrk(url, 50, seconds)
    parts = {"node": pss_kib(node.pid) / 1024, "PostgreSQL": pss_kib(pg.pid()) / 1024}
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)
    return result, parts


def http_celery(redis_port, redis_pid, procs, seconds):
    """wrk on gunicorn -k gevent -w 1 plus one Celery worker (both core 0): requests/s and PSS of all three."""
    stack = Celery(procs, 0, redis_port)
    stack.fresh()
    stack.start_workers(1)
    port = free_port()
    gunicorn = str(Path(PY).with_name("gunicorn"))
    web = procs.start([gunicorn, "-k", "gevent", "-w", "1", "-b", "127.0.0.1:%d" % port, "--log-level",
                       "warning", "bench.apps.cluster_celery:app"], stack.env, core=0)
    wait_port(port, web, 30)
    url = "http://127.0.0.1:%d/spawn" % port
    if seconds > 1:
        wrk(url, 10, 1)  # warm-up: the pools' connections, the first imports
    result = wrk(url, 50, seconds)
    parts = {"gunicorn": pss_kib(web.pid) / 1024, "worker": pss_kib(stack.workers[0].pid) / 1024,
             "Redis": pss_kib(redis_pid) / 1024}
    backlog = stack.client().llen("celery")
    stack.stop_workers()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(web.pid, signal.SIGKILL)
    return result, parts, backlog


# -- the claim at scale --------------------------------------------------------------------------------

BACKLOG = 200_000  # rows due a day from now on the served queue, and as many again on a queue no node serves
CLAIM_TARGET = 0.7
WEB_DRAIN_TASKS = 50_000  # a few seconds of draining, so one run's ratio is not a coin toss
FLOW_APP = "bench.apps.flow_gq:app"


def fill_backlog(engine, n=BACKLOG, batch=10_000):
    """Commit ``n`` rows due in a day on queue "default" and ``n`` ready ones on "elsewhere"; returns seconds."""
    import datetime

    from greenqueue.journal import new_row
    from greenqueue.tasks._options import new_id  # the ids spawns get: the primary key grows at one end

    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
    started = time.monotonic()
    engine.open()
    try:
        for queue, when in (("default", eta), ("elsewhere", None)):
            for i in range(0, n, batch):
                engine.enqueue([new_row(new_id(), "bench.noop", [i + k], {}, "json", queue, when)
                                for k in range(min(batch, n - i))])
    finally:
        engine.close()
    return time.monotonic() - started


def _post(port, path, timeout=120):
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method="POST"),
                                timeout=timeout) as resp:
        return resp.read()


def web_drain(procs, collector, journal, n):
    """A web node (``--queues ""``) enqueues ``n`` probes while a worker node serving "default" claims them.

    Returns (tasks/s over the middle 90 % of their start times, seconds from the enqueue request to the
    last start). Both nodes run bench.apps.flow_gq, the worker pinned to core 0 and the web node to core 1.
    """
    env = {"BENCH_PROBE_PORT": str(collector.port)}
    base = [PY, "-m", "greenqueue.server", "--journal", journal, "--log-level", "warning", "--max-concurrency",
            str(WORKER_CONCURRENCY)]
    nodes = []
    try:
        for queues, core in (("default", 0), ("", 1)):
            port = free_port()
            proc = procs.start(base + ["--bind", "127.0.0.1:%d" % port, "--queues", queues, FLOW_APP], env,
                               core=core % (os.cpu_count() or 1))
            nodes.append(proc)
            try:
                wait_port(port, proc, 60)
            except RuntimeError as exc:
                raise RuntimeError("%s: %s" % (exc, procs.log_tail(proc))) from None
        collector.reset()
        _post(port, "/enqueue?n=50")  # warm-up: both nodes' connections, the worker's first claims
        collector.wait(50, stall=10)
        collector.reset()
        sent = time.time()
        _post(port, "/enqueue?n=%d" % n)
        times = sorted(collector.wait(n))
    finally:
        for proc in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    if len(times) < n:
        raise RuntimeError("the worker node ran %d of %d tasks" % (len(times), n))
    lo, hi = int(n * 0.05), int(n * 0.95)
    return (hi - lo) / (times[hi] - times[lo]), times[-1] - sent


def claim_row(bench, metric, empty, backlog, note=""):
    """The row comparing tasks/s with the backlog to the same on an empty store; says whether the target is met."""
    ratio = backlog / empty if backlog and empty else None
    met = ratio is not None and ratio >= CLAIM_TARGET
    print("%s: %s: with the backlog %.0f tasks/s, empty %.0f tasks/s, %.2fx (target >= %.1fx: %s)" % (
        bench, metric, backlog or 0, empty or 0, ratio or 0, CLAIM_TARGET, "met" if met else "NOT met"),
        file=sys.stderr)
    return row(bench, metric, backlog, "tasks/s", "same, empty store", empty, True,
               "backlog: %s rows due in a day on the served queue + %s on a queue no node serves; target >= "
               "%.1fx: %s%s" % ("{:,}".format(BACKLOG), "{:,}".format(BACKLOG), CLAIM_TARGET,
                                "met" if met else "not met", "; " + note if note else ""))


def claim_at_scale(pg, procs, collector, n):
    """PostgreSQL: web node enqueues, worker node claims, on an empty database vs one holding the backlog."""
    from greenqueue.journal._postgres import PostgresEngine

    empty, empty_s = web_drain(procs, collector, pg.new_database(), n)
    dsn = pg.new_database()
    try:
        filled = fill_backlog(PostgresEngine(dsn), batch=10_000)
        backlog, backlog_s = web_drain(procs, collector, dsn, n)
    finally:
        pg.drop_database(dsn)
    return claim_row(NAME, "claim at scale: web node enqueues %d tasks, worker node claims" % n, empty, backlog,
                     note="drained in %.1f s vs %.1f s; backlog committed in %.0f s, no ANALYZE after it"
                     % (backlog_s, empty_s, filled))


# -- flow control ----------------------------------------------------------------------------------------

FLOW_TASKS = 10_000  # procrastinate drains a few hundred a second here, under a lock fewer
FLOW_SPREAD = 10  # priorities drawn from -10..10
FLOW_KEYS = 50
# Above what a node drains under a limit here, so the row measures what judging a limit costs
# each stack rather than the limit itself (2000/s held greenqueue to about 1,600/s).
RATE_LIMIT = "10000/s"


class FlowGreenqueue(Greenqueue):
    """greenqueue nodes running the flow-control app (priorities, a rate limit, a per-key concurrency limit)."""

    app = FLOW_APP
    producer = "bench.apps.flow_producer"


class FlowProcrastinate(Procrastinate):
    """procrastinate workers with a per-lock task besides the probe."""

    app = "bench.apps.flow_procrastinate.app"
    producer = "bench.apps.flow_producer"


class FlowCelery(Celery):
    """Celery workers with a rate-limited probe."""

    app = "bench.apps.flow_celery:celery"
    producer = "bench.apps.flow_producer"


def flow(pg, procs, collector, redis_port, n):
    """Drain rates of the three flow-control cases per stack: {case: {stack key: tasks/s or "why"}}."""
    env = {"BENCH_RATE_LIMIT": RATE_LIMIT}
    ours = FlowGreenqueue(procs, collector.port, pg)
    cases = {"priority": (("priority", n, FLOW_SPREAD), [ours]),
             "rated": (("rated", n), [ours]),
             "keyed": (("keyed", n, FLOW_KEYS), [ours])}
    try:
        import procrastinate  # noqa: F401 -- only checking it is installed
        pq = FlowProcrastinate(procs, collector.port, pg)
        cases["priority"][1].append(pq)
        cases["keyed"][1].append(pq)
    except ImportError:
        pass
    if redis_port:
        cases["rated"][1].append(FlowCelery(procs, collector.port, redis_port))
    results = {}
    for case, (mode, stacks) in cases.items():
        results[case] = {}
        for stack in stacks:
            stack.env.update(env)  # the producer's tasks and the workers' must carry the same limit
            try:
                results[case][stack.key] = drain(stack, collector, n, 1, mode)
            except Exception as exc:  # one stack failing must not hide the others' figures
                results[case][stack.key] = "%s: %s" % (type(exc).__name__, str(exc)[-300:])
    return results


def _binds(rates):
    """What the rate row says of RATE_LIMIT: a drain near it may have been held back by it."""
    count, per = RATE_LIMIT.split("/")
    limit = float(count) / {"s": 1.0, "m": 60.0, "h": 3600.0}[per]
    if any(r >= 0.8 * limit for r in rates):
        return "a drain came near the limit, so the limit, not its cost, may have held it"
    return "every drain stayed well below the limit: the rates are what judging it costs"


def _flow_rows(results, n, plain, why_not_pq, why_not_celery):
    """Rows from flow()'s results; ``plain`` is greenqueue's unlimited 1-node drain this run (or None)."""
    def rate(value):
        return value if isinstance(value, float) else None

    def why(value):
        return value if isinstance(value, str) else ""

    binds = _binds([v for v in results.get("rated", {}).values() if isinstance(v, float)])
    also = "; greenqueue's plain drain, 1 node: %.0f/s this run" % plain if plain else ""
    out = []
    for case, peer, label, missing, metric, note in (
            ("priority", "pq", "procrastinate, 1 worker (priority=)", why_not_pq,
             "drain %d tasks, priorities -%d..%d, 1 node" % (n, FLOW_SPREAD, FLOW_SPREAD),
             "priority drawn per task, the same draws for both"),
            ("rated", "celery", "Celery (Redis), 1 worker (rate_limit=)", why_not_celery,
             "drain %d tasks, rate_limit %s, 1 node" % (n, RATE_LIMIT),
             "%s; greenqueue's limit holds across every node, Celery's rate_limit is per worker process"
             % binds),
            ("keyed", "pq", "procrastinate, 1 worker (lock= per key)", why_not_pq,
             "drain %d tasks, %d keys, one run at a time per key, 1 node" % (n, FLOW_KEYS),
             "greenqueue concurrency_limit=1 with concurrency_key; procrastinate lock=key")):
        got = results.get(case, {})
        if "gq" in got and why(got["gq"]):
            out.append(row(NAME, "(bench)", None, "", "-", None, note="greenqueue, %s, failed: %s"
                           % (metric, got["gq"])))
            continue
        peer_why = why(got.get(peer)) or (missing if peer not in got else "")
        out.append(row(NAME, metric, rate(got.get("gq")), "tasks/s", label, rate(got.get(peer)), True,
                       "; ".join(x for x in (peer_why, note + also) if x)))
    return out


# -- the bench -------------------------------------------------------------------------------------------


def _ms(values, p):
    return percentile(values, p, 1000)


def run(quick: bool = False, smoke: bool = False) -> list:
    """Measure and return rows (ratio > 1: greenqueue better)."""
    bindir = find_pg_bindir()
    if bindir is None:
        return [row(NAME, "(skipped)", None, "", "-", None,
                    note="PostgreSQL is not installed (apt-get install postgresql); nothing measured")]
    # The quick run must fit run.py's 120 s limit: one node, and procrastinate's drain alone takes ~15 s.
    if smoke:
        n, rate, seconds, delayed, spread, lead, wrk_s, node_counts = 200, 100, 1, 50, 1, 1, 1, (1,)
    elif quick:
        # Shorter than it was (3000 tasks, 3 s, 1,000 due over 5 s, wrk 3 s) for the quick run's
        # 180 s budget; the delayed tasks still fall due at 200/s, after the same lead.
        n, rate, seconds, delayed, spread, lead, wrk_s, node_counts = 1500, 500, 2, 600, 3, 3, 2, (1,)
    else:
        n, rate, seconds, delayed, spread, lead, wrk_s, node_counts = 20000, 500, 10, 2000, 10, 4, 10, (1, 2)
    rows = []
    procs = Procs()
    collector = Collector()
    pg = Postgres(bindir)
    redis_dir = tempfile.mkdtemp(prefix="gq-bench-redis-")
    try:
        pg.start()
        redis_server = shutil.which("redis-server")
        redis_port, redis_proc, why_not_celery = None, None, ""
        if not redis_server:
            why_not_celery = "redis-server is not installed (apt-get install redis-server)"
        else:
            redis_port = free_port()
            redis_proc = procs.start([redis_server, "--port", str(redis_port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "yes", "--dir", redis_dir,
                                      "--daemonize", "no"])
            wait_port(redis_port, redis_proc)
        # First, while PostgreSQL and Redis hold no other run's data (their memory counts here).
        try:
            ours, our_mib = http_greenqueue(pg, procs, wrk_s)
            if redis_port:
                theirs, their_mib, backlog = http_celery(redis_port, redis_proc.pid, procs, wrk_s)
            else:
                theirs, their_mib, backlog = {}, {}, None
            label = "gunicorn -k gevent + Celery worker + Redis"
            note = "1 node, wrk -c50 %ds, target >= 3x" % wrk_s
            if backlog:
                note += "; Celery left %d tasks queued" % backlog
            split = "; ".join(", ".join("%s %.0f" % kv for kv in parts.items()) for parts in (our_mib, their_mib)
                              if parts)
            rows += [
                row(NAME, "view spawning a task, req/s", ours["rps"], "req/s", label, theirs.get("rps"), True,
                    note if redis_port else why_not_celery),
                row(NAME, "view spawning a task, memory (PSS) of every process", sum(our_mib.values()), "MiB",
                    label, sum(their_mib.values()) or None, False, "target <= 1/3; MiB: " + split),
            ]
        except FileNotFoundError as exc:  # no wrk
            rows.append(row(NAME, "view spawning a task", None, "", "-", None, note=str(exc)))
        stacks = [Greenqueue(procs, collector.port, pg)]
        peers = []
        try:
            import procrastinate  # noqa: F401 -- only checking it is installed
            peers.append(Procrastinate(procs, collector.port, pg))
            why_not_pq = ""
        except ImportError as exc:
            why_not_pq = "procrastinate missing (pip install -e '.[bench]'): %s" % exc
        if redis_port:
            peers.append(Celery(procs, collector.port, redis_port))
        stacks += peers
        plain = None
        for nodes in node_counts:
            results = {}
            for stack in stacks:
                try:
                    tps = drain(stack, collector, n, nodes)
                    lat, sent, late, failed, took = latencies(stack, collector, nodes, rate, seconds, delayed,
                                                              spread, lead, warm=not smoke)
                    results[stack.key] = {"tps": tps, "p50": _ms(lat, 0.5), "p99": _ms(lat, 0.99),
                                          "done": len(lat), "sent": sent, "failed": failed,
                                          "late99": _ms(late, 0.99), "late_done": len(late), "took": took}
                except Exception as exc:  # one stack failing must not hide the others' figures
                    results[stack.key] = {"why": "%s: %s" % (type(exc).__name__, str(exc)[-300:])}
            rows += _rows(results, nodes, n, rate, delayed, spread, lead, why_not_pq, why_not_celery)
            if nodes == 1:
                plain = results["gq"].get("tps")
        # The quick run has no room left under run.py's limit for the backlog's fill or for
        # procrastinate's lock drains; the smoke run keeps a tiny flow drain, so its code still runs.
        if not (quick or smoke):
            try:
                rows.append(claim_at_scale(pg, procs, collector, WEB_DRAIN_TASKS))
            except Exception as exc:
                rows.append(row(NAME, "(bench)", None, "", "-", None, note="claim at scale failed: %s: %s"
                                % (type(exc).__name__, str(exc)[-300:])))
        if smoke or not quick:
            flow_n = 200 if smoke else FLOW_TASKS
            rows += _flow_rows(flow(pg, procs, collector, redis_port, flow_n), flow_n, plain, why_not_pq,
                               why_not_celery)
    finally:
        procs.close()
        collector.close()
        pg.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)
    return rows


def _rows(results, nodes, n, rate, delayed, spread, lead, why_not_pq, why_not_celery):
    ours = results["gq"]
    if "why" in ours:
        # "(bench)" is how a failed bench reads in run.py's table (and fails the smoke test).
        return [row(NAME, "(bench)", None, "", "-", None,
                    note="greenqueue, %d node%s, failed: %s" % (nodes, "s" if nodes > 1 else "", ours["why"]))]
    out = []
    names = {"pq": ("procrastinate", why_not_pq), "celery": ("Celery (Redis)", why_not_celery)}
    for key, (label, missing) in names.items():
        peer = results.get(key, {})
        why = peer.get("why") or missing
        tag = "%s, %d node%s" % (label, nodes, "s" if nodes > 1 else "")
        target = "target >= 2x" if key == "pq" else "target >= 1x"
        out += [
            row(NAME, "drain %d tasks, %d node%s" % (n, nodes, "s" if nodes > 1 else ""), ours["tps"], "tasks/s",
                tag, peer.get("tps"), True, why or target),
            row(NAME, "enqueue->start p50 at %d/s" % rate, ours["p50"], "ms", tag, peer.get("p50"), False),
            row(NAME, "enqueue->start p99 at %d/s" % rate, ours["p99"], "ms", tag, peer.get("p99"), False,
                "target <= 1/2; ran %d/%d vs %s/%d; enqueues failed %d vs %s" % (
                    ours["done"], ours["sent"], peer.get("done", "-"), ours["sent"], ours["failed"],
                    peer.get("failed", "-"))),
            row(NAME, "lateness p99, %d tasks due over %ds" % (delayed, spread), ours["late99"], "ms", tag,
                peer.get("late99"), False, "target < 50 ms; ran %d vs %s; first due after %.0fs, enqueued in "
                "%.1fs vs %s" % (ours["late_done"], peer.get("late_done", "-"), lead, ours["took"],
                                 "%.1fs" % peer["took"] if "took" in peer else "-")),
        ]
    return out


def main(argv=None):
    """Command-line entry point."""
    return bench_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
