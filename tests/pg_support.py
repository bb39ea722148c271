"""A private PostgreSQL server for the test session, started from Debian's binaries.

The server listens on a free loopback port with its socket directory and data
in a temporary directory, runs as the ``postgres`` user when the tests run as
root (initdb refuses root), and is stopped and removed at the end of the
session. Tests may stop and restart it; every test gets a fresh database.
"""

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

__all__ = ["PostgresServer", "find_bindir", "pg", "pg_dsn"]


def find_bindir():
    """The newest ``/usr/lib/postgresql/N/bin`` holding initdb and pg_ctl, or None."""
    found = []
    for bindir in glob.glob("/usr/lib/postgresql/*/bin"):
        version = os.path.basename(os.path.dirname(bindir))
        if version.isdigit() and all(os.access(os.path.join(bindir, b), os.X_OK) for b in ("initdb", "pg_ctl")):
            found.append((int(version), bindir))
    return max(found)[1] if found else None


class PostgresServer:
    """One throw-away PostgreSQL cluster: ``start()``, ``stop()``, ``restart()``, ``dsn(db)``."""

    def __init__(self, bindir, base=None):
        from .conftest import free_port

        self.bindir = bindir
        self.base = Path(base or tempfile.mkdtemp(prefix="gq-pg-"))
        self.data = self.base / "data"
        self.sock = self.base / "sock"
        self.log_path = self.data / "server.log"
        self.port = free_port()
        self.user = "postgres"
        # initdb and the server refuse to run as root: run them as the postgres user.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self._names = itertools.count(1)
        self.running = False

    def _run(self, binary, *args, timeout=60):
        cmd = self._as + [os.path.join(self.bindir, binary), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError("%s failed (%s):\n%s%s\n%s" % (binary, done.returncode, done.stdout,
                                                            done.stderr, self.log()))
        return done

    def init(self):
        """Create the data directory (trust authentication, loopback only)."""
        self.sock.mkdir(parents=True)
        self.data.mkdir()
        if self._as:
            owner = pwd.getpwnam("postgres")
            for path in (self.base, self.sock, self.data):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "-E", "UTF8",
                  "--locale=C", "--no-sync")
        return self

    def start(self):
        """Start the server and wait until it accepts connections."""
        # fsync off: a test server's data need not survive a power cut, and it halves test time.
        options = ("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off "
                   "-c max_connections=200" % (self.port, self.sock))
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60",
                  "-o", options, "start")
        self.running = True
        return self

    def stop(self, mode="fast"):
        """Stop the server (``fast`` disconnects clients; ``immediate`` is a crash)."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
            self.running = False

    def restart(self):
        """Stop and start again on the same port."""
        self.stop()
        return self.start()

    def ensure_running(self):
        """Start the server if a test left it stopped."""
        if not self.running:
            self.start()

    def dsn(self, database="postgres", password=None):
        """A ``postgresql://`` URL for ``database`` (a password is accepted and ignored: trust auth)."""
        auth = self.user + (":" + password if password else "")
        return "postgresql://%s@127.0.0.1:%d/%s" % (auth, self.port, database)

    def admin(self, sql, database="postgres"):
        """Run one statement in autocommit mode; returns the rows, if any."""
        import psycopg

        with psycopg.connect(self.dsn(database), autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else None

    def create_database(self):
        """A new empty database; returns its name."""
        name = "gq_test_%d" % next(self._names)
        self.admin("CREATE DATABASE %s" % name)
        return name

    def drop_database(self, name):
        """Drop ``name``, disconnecting whoever still uses it."""
        self.admin("DROP DATABASE IF EXISTS %s WITH (FORCE)" % name)

    def log(self):
        """The server's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def destroy(self):
        """Stop the server (hard, if a fast stop fails) and delete its files."""
        try:
            self.stop()
        except (RuntimeError, subprocess.TimeoutExpired):
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass  # the files go below; a server left behind shows in the next pg_ctl status
        shutil.rmtree(self.base, ignore_errors=True)


def _require_postgres():
    from .conftest import IN_CI

    bindir = find_bindir()
    if bindir is None:
        msg = "PostgreSQL not installed (make test installs it with apt-get)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        msg = "psycopg and psycopg_pool not installed (pip install -e '.[test]')"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return bindir


@pytest.fixture(scope="session")
def pg():
    """The session's private PostgreSQL server (started on first use, removed at the end)."""
    server = PostgresServer(_require_postgres())
    try:
        server.init().start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_dsn(pg):
    """A DSN to a fresh, empty database, dropped after the test."""
    pg.ensure_running()
    name = pg.create_database()
    yield pg.dsn(name)
    pg.ensure_running()
    pg.drop_database(name)
