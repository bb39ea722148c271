"""Shared fixtures: free ports, polling with a deadline, and a real server subprocess."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest

import greenqueue.runtime

from .pg_support import pg, pg_dsn  # noqa: F401  (the private PostgreSQL server, session-wide)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port(host="127.0.0.1"):
    """Return a TCP port that is free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0, interval=0.01, message="condition"):
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, message))
        # gevent.sleep, not time.sleep: in-process tests need the hub to run their tasks meanwhile.
        gevent.sleep(interval)


def require_binary(path_or_name, what):
    """Skip (locally) or fail (in CI) when a system binary the test drives is missing."""
    import shutil
    found = path_or_name if os.path.isabs(path_or_name) and os.access(path_or_name, os.X_OK) \
        else shutil.which(path_or_name) or (os.access("/usr/sbin/" + path_or_name, os.X_OK)
                                             and "/usr/sbin/" + path_or_name)
    if not found:
        msg = "%s not installed (make test installs it with apt-get)" % what
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return found


class ServerProcess:
    """A real ``python -m greenqueue.server`` subprocess bound to a free loopback port."""

    def __init__(self, app, *args, bind=None, env=None, cwd=None, tmp_path=None):
        self.port = None
        if bind is None:
            self.port = free_port()
            bind = "127.0.0.1:%d" % self.port
        self.bind = bind
        self.app = app
        self.args = list(args)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), self.env.get("PYTHONPATH")]))
        self.cwd = str(cwd or ROOT)
        self.log_path = Path(tmp_path or ARTIFACTS) / ("server-%s.log" % (self.port or os.getpid()))
        self.proc = None

    @property
    def url(self):
        """Base URL, e.g. ``http://127.0.0.1:12345``."""
        return "http://127.0.0.1:%d" % self.port

    def start(self, wait=True, timeout=20.0):
        """Start the process and (by default) wait until it accepts connections."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "greenqueue.server", "--bind", self.bind, *self.args, self.app]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd, start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=20.0):
        """Wait until the bound address accepts a connection (fail fast if the process exits)."""
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError("server exited %s before serving:\n%s" % (self.proc.returncode, self.log()))
            return _connectable(self.bind)
        wait_for(ready, timeout, message="server on %s\n%s" % (self.bind, self.log_path))

    def log(self):
        """Everything the server printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def send_signal(self, sig):
        """Send ``sig`` to the server process."""
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=30.0):
        """Send ``sig`` and return the exit status (kill -9 after ``timeout``)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def kill_group(self):
        """SIGKILL the whole process group (server and any children it left)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)


def _connectable(bind):
    if bind.startswith("unix:"):
        family, addr = socket.AF_UNIX, bind[5:]
    elif bind.startswith("["):
        host, _, port = bind[1:].partition("]:")
        family, addr = socket.AF_INET6, (host, int(port))
    else:
        host, _, port = bind.rpartition(":")
        family, addr = socket.AF_INET, (host, int(port))
    # A bound socket accepts connections into its backlog before the server is
    # serving (start-up may still fail), so wait for an HTTP answer, any answer.
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(addr)
            s.sendall(b"GET /__ready_probe__ HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/1.")
        except OSError:
            return False


@pytest.fixture
def server_factory(tmp_path):
    """Build and start real servers: ``server_factory("tests.apps.basic:app", "--flag", ...)``."""
    started = []

    def make(app, *args, start=True, **kwargs):
        kwargs.setdefault("tmp_path", tmp_path)
        srv = ServerProcess(app, *args, **kwargs)
        started.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in started:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.kill_group()
        if srv.proc is not None and not srv._log.closed:
            srv._log.close()


# In-process tests drive tasks on this thread's hub (they call gevent.sleep, wait on
# gevent Events): with a hub here, the runner picks it instead of a thread of its own.
gevent.get_hub()


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=[pytest.mark.postgres,
                                                                           pytest.mark.realproc])])
def store(request, tmp_path):
    """The store a test's tasks run on, each in turn: none (memory), an SQLite journal, or PostgreSQL."""
    if request.param == "sqlite":
        greenqueue.configure(journal=str(tmp_path / "j.db"))
    elif request.param == "postgres":
        greenqueue.configure(journal=request.getfixturevalue("pg_dsn"))
    yield request.param
    if request.param != "memory":
        greenqueue.runtime.get_runtime().close_store()


@pytest.fixture(autouse=True)
def _reset_greenqueue_state():
    """Give every test a fresh default runtime: runner, scheduler, pools, consumers, hooks, store."""
    yield
    greenqueue.runtime.reset()
