"""The SQLite journal with real server processes: restarts, crashes and bad files."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import requests

from greenqueue.journal import TaskRow
from greenqueue.journal._sqlite import SCHEMA_VERSION, SQLiteEngine

from .pg_support import pg, pg_dsn  # noqa: F401  (fixtures)

from .conftest import ROOT, free_port, wait_for

pytestmark = pytest.mark.realproc

APP = "tests.apps.journal_app:app"


@pytest.fixture
def journal_server(server_factory, tmp_path):
    """Start the journal app on ``tmp_path/journal.db``; slow=False makes replayed tasks instant."""
    def start(slow=True, *args):
        env = {"JOURNAL_TEST_OUT": str(tmp_path), "JOURNAL_TEST_SLOW": "1" if slow else "0"}
        return server_factory(APP, "--journal", str(tmp_path / "journal.db"), *args, env=env)
    return start


def done(tmp_path):
    """{name: time} of every task that finished (from done.log)."""
    try:
        lines = (tmp_path / "done.log").read_text().split("\n")
    except FileNotFoundError:
        return {}
    return {name: float(ts) for name, ts in (line.split() for line in lines if line)}


def spawn(srv, name, **form):
    return requests.post(srv.url + "/spawn", data=dict(name=name, **form), timeout=10).json()["id"]


def test_kill_9_loses_no_spawned_task(journal_server, tmp_path):
    srv = journal_server()
    ids = {spawn(srv, "t%d" % i, seconds="60"): "t%d" % i for i in range(20)}
    srv.kill_group()  # kill -9: nothing gets to run a shutdown path
    assert done(tmp_path) == {}
    again = journal_server(False)
    wait_for(lambda: len(done(tmp_path)) == 20, 20, message="20 replayed tasks")
    assert set(done(tmp_path)) == set(ids.values())
    some_id = next(iter(ids))
    state = requests.get(again.url + "/task/" + some_id, timeout=5).json()
    assert state["state"] == "SUCCESS"
    assert state["retries"] >= 1, "a task that was running at the crash must show its earlier attempt"


def test_sigterm_keeps_unfinished_and_delayed_tasks_for_the_next_start(journal_server, tmp_path):
    srv = journal_server(True, "--max-concurrency", "1", "--graceful-timeout", "2")
    spawn(srv, "quick", seconds="0.2")
    slow_id = spawn(srv, "slow", seconds="60")
    spawned_at = time.time()
    spawn(srv, "later", delay="4")
    # Stop only once "slow" runs: a task that waits for a slot is not started during the drain
    # (another process could take it), so only one that started shows an earlier attempt.
    wait_for(lambda: requests.get(srv.url + "/task/" + slow_id, timeout=5).json()["state"] == "STARTED", 10,
             message="the slow task to start")
    srv.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    assert set(done(tmp_path)) == {"quick"}
    assert "kept for the next start" in srv.log()
    again = journal_server(False)
    wait_for(lambda: "slow" in done(tmp_path), 10, message="the interrupted task to run again")
    assert requests.get(again.url + "/task/" + slow_id, timeout=5).json()["retries"] == 1
    wait_for(lambda: "later" in done(tmp_path), 15, message="the delayed task")
    assert done(tmp_path)["later"] >= spawned_at + 4 - 0.05, "the delayed task ran before its eta"


def test_results_are_found_after_a_restart(journal_server, tmp_path):
    srv = journal_server()
    ok_id = spawn(srv, "answer")
    bad_id = requests.post(srv.url + "/explode", timeout=5).json()["id"]
    for task_id in (ok_id, bad_id):
        wait_for(lambda: requests.get(srv.url + "/task/" + task_id, timeout=5).json()["state"]
                 in ("SUCCESS", "FAILURE"), 10, message="task %s" % task_id)
    assert srv.stop() == 0
    again = journal_server()
    ok = requests.get(again.url + "/task/" + ok_id, timeout=5).json()
    assert ok["state"] == "SUCCESS" and ok["result"] == "answer"
    bad = requests.get(again.url + "/task/" + bad_id, timeout=5).json()
    # The exception comes back as its own type (a builtin here), with its message.
    assert bad["state"] == "FAILURE" and bad["error"] == "ValueError: nope"


def run_server(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "greenqueue.server", "--bind", "127.0.0.1:%d" % free_port(),
                           *args, APP], capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))


def _foreign(path):
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE invoices (id INTEGER)")


def _newer(path):
    engine = SQLiteEngine(str(path))
    engine.open()
    engine.close()
    with sqlite3.connect(path) as c:
        c.execute("UPDATE greenqueue_meta SET value = '%d' WHERE key = 'schema_version'" % (SCHEMA_VERSION + 1))
    c.close()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"this is not a database at all" * 100), "not a greenqueue journal or corrupt"),
    (_foreign, "SQLite database of something else"),
    (_newer, "written by a newer greenqueue"),
])
def test_bad_journal_files_stop_the_server_with_one_clear_line(tmp_path, make, message):
    path = tmp_path / "journal.db"
    make(path)
    before = path.read_bytes()
    proc = run_server("--journal", str(path))
    assert proc.returncode == 2
    assert message in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert path.read_bytes() == before, "the server changed a file it refused"


def test_missing_directory_is_a_clear_error(tmp_path):
    proc = run_server("--journal", str(tmp_path / "nope" / "journal.db"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_unknown_task_names_are_kept_and_reported(journal_server, tmp_path):
    path = tmp_path / "journal.db"
    engine = SQLiteEngine(str(path))
    engine.open()
    engine.enqueue([TaskRow(id="deadbeef", name="removed.module.task", payload=b'{"args": [], "kwargs": {}}')])
    engine.close()
    srv = journal_server()
    wait_for(lambda: "removed.module.task[deadbeef]: no task of that name is registered" in srv.log(), 10,
             message="the unknown task reported")
    assert srv.stop() == 0
    out = cli(path)
    assert "FAILURE   0" in out and "need attention" in out and "removed.module.task" in out


def cli(path, *args):
    proc = subprocess.run([sys.executable, "-m", "greenqueue.journal", str(path), *args], capture_output=True,
                          text=True, timeout=30, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cli_lists_retries_and_purges_failed_tasks(journal_server, tmp_path):
    srv = journal_server()
    bad_id = requests.post(srv.url + "/explode", timeout=5).json()["id"]
    wait_for(lambda: requests.get(srv.url + "/task/" + bad_id, timeout=5).json()["state"] == "FAILURE", 10)
    assert srv.stop() == 0
    path = tmp_path / "journal.db"
    assert "FAILURE   1" in cli(path)
    listed = cli(path, "list", "--state", "failure")
    assert bad_id in listed and "ValueError: nope" in listed
    assert "1 task(s) queued again" in cli(path, "retry", bad_id)
    assert "PENDING   1" in cli(path)
    again = journal_server()
    wait_for(lambda: requests.get(again.url + "/task/" + bad_id, timeout=5).json()["state"] == "FAILURE", 10,
             message="the retried task to fail again")
    assert again.stop() == 0
    assert "1 FAILURE task(s) deleted" in cli(path, "purge", "--state", "FAILURE")
    assert "FAILURE   0" in cli(path)


def test_non_json_arguments_fail_at_spawn_with_advice():
    import greenqueue
    from greenqueue import runtime, task

    @task
    def takes_object(obj):
        return obj

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        greenqueue.configure(journal=d + "/j.db")
        try:
            with pytest.raises(TypeError, match="serializer='pickle'") as info:
                takes_object.spawn(object())
            # A TypeError as before, and a greenqueue error that says what to do.
            assert isinstance(info.value, greenqueue.SerializationError)
            assert isinstance(info.value, greenqueue.ConfigError)
            assert takes_object.spawn([1, 2]).get(5) == [1, 2]
        finally:
            runtime.get_runtime().close_store()


def test_periodic_job_catches_up_once_after_downtime(server_factory, tmp_path):
    env = {"JOURNAL_TEST_OUT": str(tmp_path)}
    path = tmp_path / "journal.db"
    runs = tmp_path / "runs.log"
    srv = server_factory("tests.apps.journal_sched_app:app", "--journal", str(path), env=env)
    wait_for(runs.exists, 10, message="a first run")
    assert srv.stop() == 0
    # Pretend the server stayed down for a minute: move the recorded runs back.
    with sqlite3.connect(path) as c:
        c.execute("UPDATE greenqueue_periodic SET due = due - 60")
    c.close()
    before = len(runs.read_text().split())
    started = time.monotonic()
    again = server_factory("tests.apps.journal_sched_app:app", "--journal", str(path), env=env)
    wait_for(lambda: len(runs.read_text().split()) > before, 10, message="the catch-up run")
    # The ~30 runs missed while "down" coalesce into one late run at start.
    import re
    missed = re.search(r"late \((\d+) run\(s\) due\); catch_up=once", again.log())
    assert missed and int(missed.group(1)) >= 25, again.log()
    assert time.monotonic() - started < 10


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs, so the journal can really run out of space (needs root, as in CI)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % mounted.stderr.decode().strip())
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(directory):
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"x" * 4096):
            pass
    except OSError:
        pass  # ENOSPC: the disk is full, as wanted
    finally:
        os.close(fd)


def test_full_disk_at_startup_is_a_clear_error(tiny_disk):
    _fill(tiny_disk)
    path = tiny_disk / "journal.db"
    proc = run_server("--journal", str(path))
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr and "Traceback" not in proc.stderr
    assert "full" in proc.stderr or "cannot use it" in proc.stderr


def test_full_disk_while_running_refuses_spawns_and_loses_nothing_accepted(server_factory, tiny_disk, tmp_path):
    env = {"JOURNAL_TEST_OUT": str(tmp_path), "JOURNAL_TEST_SLOW": "0"}
    srv = server_factory(APP, "--journal", str(tiny_disk / "journal.db"), env=env)
    accepted, refused = [], None
    for i in range(200):
        r = requests.post(srv.url + "/spawn", data={"name": "t%d-" % i + "x" * 8000}, timeout=10)
        if r.status_code == 200:
            accepted.append(r.json()["id"])
        else:
            refused = r
            break
    assert refused is not None, "the tiny disk never filled up"
    assert refused.status_code == 503 and "disk full" in refused.json()["error"]
    assert str(tiny_disk / "journal.db") in refused.json()["error"]
    assert accepted, "nothing was accepted before the disk filled"
    # The server keeps serving, and what it accepted ran.
    wait_for(lambda: len(done(tmp_path)) >= len(accepted), 10, message="the accepted tasks")
    assert requests.get(srv.url + "/task/" + accepted[0], timeout=5).json()["state"] == "SUCCESS"


@pytest.mark.parametrize("setting, mode", [(None, "NORMAL"), ("full", "FULL")])
def test_journal_sync_reaches_the_sqlite_engine(tmp_path, setting, mode):
    from greenqueue import config, runtime
    argv = ["--journal-sync", setting] if setting else []
    _, settings = config.load([*argv, "app:app"], environ={})
    rt = runtime.get_runtime()
    store = rt.open_store(str(tmp_path / "j.db"), sync=settings["journal_sync"])
    try:
        # test_engines checks that the engine's mode is the connection's PRAGMA synchronous.
        assert store.engine.synchronous == mode
    finally:
        rt.close_store()


def test_journal_sync_refuses_other_modes():
    from greenqueue import config
    from greenqueue.errors import ConfigError
    with pytest.raises(ConfigError, match="--journal-sync: must be one of normal, full"):
        config.load(["--journal-sync", "off", "app:app"], environ={})


def test_opening_the_open_journal_again_is_a_no_op_and_another_is_refused(tmp_path):
    from greenqueue import runtime
    from greenqueue.errors import ConfigError
    rt = runtime.get_runtime()
    store = rt.open_store(str(tmp_path / "j.db"))
    try:
        assert rt.open_store(str(tmp_path / "j.db")) is store
        with pytest.raises(ConfigError, match="is already open"):
            rt.open_store(str(tmp_path / "other.db"))
    finally:
        rt.close_store()


@pytest.mark.postgres
def test_a_url_with_its_password_in_the_query_is_recognised_when_opened_again(pg_dsn):
    from greenqueue import runtime
    dsn = pg_dsn + ("&" if "?" in pg_dsn else "?") + "password=s3cret"
    rt = runtime.get_runtime()
    store = rt.open_store(dsn)
    try:
        assert "s3cret" not in store.display
        assert rt.open_store(dsn) is store
    finally:
        rt.close_store()
