"""``python -m greenqueue.journal``: summary, list, retry and purge on SQLite files and PostgreSQL."""

import dataclasses
import subprocess
import sys
import uuid

import pytest

import greenqueue
from greenqueue import runtime, task
from greenqueue.journal._sqlite import SQLiteEngine
from greenqueue.journal.__main__ import main

from .conftest import ROOT

WAIT = 10.0
PASSWORD = "s3cret-Pa55"


def stored(path, task_id):
    """One row of the journal file, as the store reads it."""
    engine = SQLiteEngine(str(path))
    engine.open()
    try:
        row = engine.get(task_id)
        return None if row is None else dataclasses.asdict(row)
    finally:
        engine.close()


def run_failing_task(path, fn):
    """Spawn ``fn`` with the journal at ``path`` open, let it fail, close the journal; returns its result."""
    greenqueue.configure(journal=path)
    try:
        r = fn.spawn()
        with pytest.raises(ValueError):
            r.get(WAIT)
        return r
    finally:
        runtime.get_runtime().close_store()


@pytest.fixture
def always_fails():
    calls = []

    @task(name="cli.always_fails", retries=2)
    def always_fails():
        calls.append(1)
        raise ValueError("nope")
    always_fails.calls = calls
    return always_fails


def test_retry_gives_the_task_a_fresh_attempt_budget(tmp_path, capsys, always_fails):
    path = str(tmp_path / "journal.db")
    r = run_failing_task(path, always_fails)
    assert len(always_fails.calls) == 3 and stored(path, r.id)["attempts"] == 3

    assert main([path, "retry", r.id]) == 0
    assert capsys.readouterr().out == "1 task(s) queued again; a node with a free slot runs them\n"
    row = stored(path, r.id)
    assert (row["state"], row["attempts"], row["finished_at"]) == ("PENDING", 0, None)

    # At the next start it runs with all three attempts again, not with a budget already spent.
    greenqueue.configure(journal=path)
    try:
        with pytest.raises(ValueError, match="nope"):
            greenqueue.result(r.id).get(WAIT)
    finally:
        runtime.get_runtime().close_store()
    assert len(always_fails.calls) == 6


def test_retry_of_an_unknown_id_names_it_and_fails(tmp_path, capsys, always_fails):
    path = str(tmp_path / "journal.db")
    run_failing_task(path, always_fails)
    assert main([path, "retry", "0123abcd"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "task 0123abcd not found in %s" % path in err
    assert "FAILURE   1" in summary(path, capsys), "nothing else was retried"


def test_retry_of_a_task_that_did_not_fail_says_why_not(tmp_path, capsys):
    @task(name="cli.works")
    def works():
        return 1

    path = str(tmp_path / "journal.db")
    greenqueue.configure(journal=path)
    try:
        r = works.spawn()
        assert r.get(WAIT) == 1
    finally:
        runtime.get_runtime().close_store()
    assert main([path, "retry", r.id]) == 1
    assert "task %s is SUCCESS; only FAILURE or CANCELLED tasks can be retried" % r.id in capsys.readouterr().err


def test_the_exit_status_reaches_the_shell(tmp_path, always_fails):
    path = str(tmp_path / "journal.db")
    run_failing_task(path, always_fails)
    proc = subprocess.run([sys.executable, "-m", "greenqueue.journal", path, "retry", "feedface"],
                          capture_output=True, text=True, timeout=30, cwd=str(ROOT))
    assert proc.returncode == 1 and "feedface not found" in proc.stderr


def test_purge_help_shows_the_default_and_the_allowed_states(capsys):
    with pytest.raises(SystemExit) as info:
        main(["journal.db", "purge", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "one of SUCCESS, FAILURE, CANCELLED, EXPIRED (default: FAILURE)" in out


def test_purge_refuses_an_unfinished_state_and_accepts_lower_case(tmp_path, capsys, always_fails):
    path = str(tmp_path / "journal.db")
    run_failing_task(path, always_fails)
    with pytest.raises(SystemExit) as info:
        main([path, "purge", "--state", "pending"])
    assert info.value.code == 2 and "invalid choice: 'PENDING'" in capsys.readouterr().err
    assert main([path, "purge", "--state", "failure"]) == 0
    assert capsys.readouterr().out == "1 FAILURE task(s) deleted\n"


def test_a_missing_file_is_not_created(tmp_path, capsys):
    path = tmp_path / "typo.db"
    assert main([str(path)]) == 2
    assert "typo.db does not exist" in capsys.readouterr().err and not path.exists()


def summary(target, capsys):
    assert main([target]) == 0
    return capsys.readouterr().out


# -- PostgreSQL -------------------------------------------------------------------------------


@pytest.fixture
def pg_journal(pg_dsn):
    """An opened engine on a fresh database, and the same URL with a password in it."""
    from greenqueue.journal._postgres import PostgresEngine

    engine = PostgresEngine(pg_dsn)
    engine.open()
    yield engine, pg_dsn.replace("postgres@", "postgres:%s@" % PASSWORD, 1)
    engine.close()


def failed_row(engine, name="cli.remote"):
    """A row that failed on node A after one attempt; returns its id."""
    from greenqueue.journal import TaskRow

    row_id = uuid.uuid4().hex
    engine.enqueue([TaskRow(id=row_id, name=name, payload=b'{"args":[],"kwargs":{}}', max_attempts=1)])
    [claimed] = engine.claim("A", None, 1)
    assert engine.finish(claimed.id, "A", claimed.attempts, "FAILURE", error_type="ValueError", error="nope")
    return row_id


@pytest.mark.realproc
@pytest.mark.postgres
def test_a_postgresql_summary_shows_states_and_nodes_but_never_the_password(pg_journal, capsys):
    from greenqueue.journal import TaskRow
    from greenqueue.journal._engine import NodeInfo

    engine, url = pg_journal
    failed_row(engine)
    engine.enqueue([TaskRow(id=uuid.uuid4().hex, name="cli.waiting", payload=b"{}")])
    engine.register(NodeInfo(id="web-1-4242-ab12", host="web-1", pid=4242, running=0))
    engine.heartbeat("web-1-4242-ab12", running=3)
    out = summary(url, capsys)
    assert PASSWORD not in out and ":***@" in out
    assert "FAILURE   1" in out and "PENDING   1" in out and "oldest unfinished: " in out
    assert "1 node(s) with a recent heartbeat:" in out
    header, node = [line.split() for line in out.splitlines()[-2:]]
    assert header == ["id", "host", "pid", "started", "heartbeat", "running"]
    assert node[:3] == ["web-1-4242-ab12", "web-1", "4242"] and node[-1] == "3"


@pytest.mark.realproc
@pytest.mark.postgres
def test_postgresql_list_retry_and_purge(pg_journal, capsys):
    engine, url = pg_journal
    row_id = failed_row(engine)
    assert main([url, "list", "--state", "failure"]) == 0
    listed = capsys.readouterr().out
    assert row_id in listed and "error=ValueError: nope" in listed and "attempts=1" in listed

    assert main([url, "retry", "0123abcd"]) == 1
    err = capsys.readouterr().err
    assert "task 0123abcd not found" in err and PASSWORD not in err
    assert main([url, "retry", row_id]) == 0
    assert capsys.readouterr().out == "1 task(s) queued again; a node with a free slot runs them\n"
    row = engine.get(row_id)
    assert (row.state, row.attempts, row.error) == ("PENDING", 0, None)

    failed_row(engine, "cli.again")
    assert main([url, "purge"]) == 0
    assert capsys.readouterr().out == "1 FAILURE task(s) deleted\n"
    assert engine.counts() == {"PENDING": 1}


def test_an_unreachable_postgresql_is_one_line_without_the_password(capsys):
    pytest.importorskip("psycopg")
    from .conftest import free_port

    url = "postgresql://postgres:%s@127.0.0.1:%d/postgres" % (PASSWORD, free_port())
    assert main([url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("greenqueue.journal: error: journal postgresql://postgres:***@127.0.0.1:")
    assert PASSWORD not in err and err.count("\n") == 1
