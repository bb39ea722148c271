"""The journal engines (PostgreSQL and SQLite) against the same contract.

Every test runs on both engines unless it is about one of them: PostgreSQL on
a real, private server with a fresh database per test, SQLite on a fresh file
per test. "Nodes" are engine instances (each with its own connections), so
concurrency here is real connections racing in the database; the SQLite
tests at the end also race real processes on one file.
"""

import collections
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from contextlib import closing

import gevent
import pytest

from greenqueue.errors import ConfigError, JournalError
from greenqueue.journal._engine import NodeInfo, TaskRow

from .conftest import ROOT, wait_for
from .pg_support import pg, pg_dsn  # noqa: F401  (fixtures)

PASSWORD = "s3cret-Pa55"


def pg_only(test):
    """Mark a test that is about the PostgreSQL engine alone."""
    return pytest.mark.realproc(pytest.mark.postgres(test))


def engine_class():
    from greenqueue.journal._postgres import PostgresEngine
    return PostgresEngine


def row(name="t.work", **kw):
    """A fresh task row with a unique id."""
    kw.setdefault("id", uuid.uuid4().hex)
    return TaskRow(name=name, payload=b'{"args":[]}', **kw)


def with_password(dsn):
    """The same DSN with a password in it (trust auth ignores it, the masking must not)."""
    return dsn.replace("postgres@", "postgres:%s@" % PASSWORD, 1)


def _maker(build):
    made = []

    def make(**kw):
        engine = build(**kw)
        engine.open()
        made.append(engine)
        return engine

    return make, made


@pytest.fixture
def pg_engines(pg, pg_dsn):
    """Make opened PostgreSQL engines on this test's database: ``pg_engines(lease_timeout=1)``."""
    make, made = _maker(lambda dsn=None, **kw: engine_class()(dsn or pg_dsn, **kw))
    database = pg_dsn.rsplit("/", 1)[1]
    make.kind, make.target, make.secret_target = "postgres", pg_dsn, with_password(pg_dsn)
    make.cls = engine_class()
    make.raw = lambda sql: pg.admin(sql, database)
    yield make
    for engine in made:
        engine.close()


def sqlite_raw(path, sql):
    """Run one statement on an SQLite file outside any engine; returns its rows."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture
def sqlite_engines(tmp_path):
    """Make opened SQLite engines on this test's file: ``sqlite_engines(lease_timeout=1)``."""
    from greenqueue.journal._sqlite import SQLiteEngine

    path = str(tmp_path / "journal.db")
    make, made = _maker(lambda path=path, **kw: SQLiteEngine(path, **kw))
    make.kind, make.target, make.secret_target, make.cls = "sqlite", path, path, SQLiteEngine
    make.raw = lambda sql: sqlite_raw(path, sql)
    yield make
    for engine in made:
        engine.close()


@pytest.fixture(params=[pytest.param("pg", marks=[pytest.mark.postgres, pytest.mark.realproc]), "sqlite"])
def engines(request):
    """Make opened engines of each kind in turn on this test's store: ``engines(lease_timeout=1)``."""
    return request.getfixturevalue(request.param + "_engines")


def db_now(engine):
    return engine.heartbeat("-clock-", 0).now


def reaped(engine, row_id, max_lease_losses=5, timeout=10.0):
    """Poll reap() until it returns ``row_id``; returns that row."""
    def look():
        return next((r for r in engine.reap(max_lease_losses) if r.id == row_id), None)
    return wait_for(look, timeout, interval=0.05, message="lease of %s to expire and be reaped" % row_id)


# -- tasks ----------------------------------------------------------------------------

def test_enqueue_claim_finish_round_trip(engines):
    e = engines()
    stored, = e.enqueue([row(id="r1", queue="q")])
    assert (stored.id, stored.state, stored.attempts, stored.owner) == ("r1", "PENDING", 0, None)
    assert stored.created_at == pytest.approx(db_now(e), abs=5)

    claimed, = e.claim("A", None, 10)
    assert (claimed.id, claimed.state, claimed.owner, claimed.attempts) == ("r1", "STARTED", "A", 1)
    assert claimed.lease_expires == pytest.approx(claimed.started_at + e.lease_timeout)
    assert e.claim("B", None, 10) == []

    assert e.finish("r1", "A", 1, "SUCCESS", result=b"42", ttl=60) is True
    done = e.get("r1")
    assert (done.state, done.result, done.owner, done.lease_expires) == ("SUCCESS", b"42", None, None)
    assert done.expires_at == pytest.approx(done.finished_at + 60)
    assert e.finish("r1", "A", 1, "FAILURE") is False, "a second finish must be fenced off"
    assert e.counts() == {"SUCCESS": 1}
    assert e.get("nope") is None


def test_enqueue_with_owner_is_claimed_in_the_same_commit(engines):
    e = engines()
    stored, = e.enqueue([row(id="fast")], owner="A")
    assert (stored.state, stored.owner, stored.attempts) == ("STARTED", "A", 1)
    assert e.claim("B", None, 5) == []
    assert e.heartbeat("A", 1).renewed == 1


def test_many_rows_in_one_call_keep_their_order(engines):
    e = engines()
    ids = ["m%03d" % i for i in range(50)]
    assert [r.id for r in e.enqueue([row(id=i) for i in ids])] == ids
    assert e.counts() == {"PENDING": 50}


def test_two_nodes_claiming_concurrently_never_share_a_row_or_exceed_their_limit(engines):
    a, b = engines(), engines()
    ids = {r.id for r in a.enqueue([row() for _ in range(300)])}
    limit = 7
    got = {"A": [], "B": []}
    batches = []
    start = threading.Barrier(2)
    errors = []

    def node(engine, name):
        try:
            start.wait(10)
            while True:
                batch = engine.claim(name, None, limit)
                if not batch:
                    return
                batches.append(len(batch))
                got[name].extend(r.id for r in batch)
                for r in batch:
                    assert r.owner == name
                    assert engine.finish(r.id, name, r.attempts, "SUCCESS")
                # Stands for the work itself: without it one thread can take SQLite's lock
                # back to back while the other sleeps in its busy handler, and claim it all.
                time.sleep(0.002)
        except BaseException as exc:  # reported by the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(e, n)) for e, n in ((a, "A"), (b, "B"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert max(batches) <= limit
    assert not set(got["A"]) & set(got["B"])
    assert len(got["A"]) + len(got["B"]) == 300
    assert set(got["A"]) | set(got["B"]) == ids
    assert got["A"] and got["B"], "both nodes should have claimed some rows"
    assert a.counts() == {"SUCCESS": 300}


def test_claim_takes_the_oldest_due_first_and_only_from_its_queues(engines):
    e = engines()
    now = db_now(e)
    e.enqueue([row(id="newer", eta=now - 10), row(id="oldest", eta=now - 30), row(id="other", queue="b",
                                                                                   eta=now - 60)])
    assert [r.id for r in e.claim("A", ["default"], 1)] == ["oldest"]
    assert e.claim("A", [], 5) == [], "no queues means no claims"
    assert [r.id for r in e.claim("A", ["b"], 5)] == ["other"]
    assert [r.id for r in e.claim("A", None, 5)] == ["newer"]
    assert e.claim("A", None, 0) == []


def test_delayed_rows_wait_for_their_eta(engines):
    e = engines()
    eta = db_now(e) + 1.0
    e.enqueue([row(id="later", state="SCHEDULED", eta=eta)])
    assert e.claim("A", None, 5) == []
    assert 0 < e.next_due(None) <= 1.0
    # A held row's time wakes every claimer, whatever its queues: the first to look makes it
    # ready (one index probe, however many rows wait) and whoever serves its queue claims it.
    assert 0 < e.next_due(["other"]) <= 1.0
    assert e.next_due([]) is None
    claimed = wait_for(lambda: e.claim("A", None, 5), 10, interval=0.02, message="the delayed row")
    assert [r.id for r in claimed] == ["later"]
    assert claimed[0].started_at >= eta, "claimed before its eta by the database's clock"
    assert e.next_due(None) is None


# -- leases, fencing, poison pill ---------------------------------------------------------

def test_expired_lease_is_reaped_and_the_old_owners_result_is_fenced_off(engines):
    a = engines(lease_timeout=1)
    b = engines(lease_timeout=1)
    a.enqueue([row(id="r")])
    first, = a.claim("A", None, 1)
    back = reaped(b, "r")
    assert (back.state, back.owner, back.lease_losses) == ("PENDING", None, 1)
    second, = b.claim("B", None, 1)
    assert second.attempts == first.attempts + 1

    assert a.finish("r", "A", first.attempts, "SUCCESS", result=b"late") is False
    assert a.retry("r", "A", first.attempts, 0) is False
    assert a.heartbeat("A", 1).lost == ["r"], "A must learn the row is no longer its"
    assert a.heartbeat("A", 0).lost == [], "reported once"
    assert b.finish("r", "B", second.attempts, "SUCCESS", result=b"B's") is True
    assert b.get("r").result == b"B's"


def test_the_attempt_fences_a_node_that_claimed_the_same_row_again(engines):
    e = engines(lease_timeout=1)
    e.enqueue([row(id="r")])
    first, = e.claim("A", None, 1)
    reaped(e, "r")
    second, = e.claim("A", None, 1)
    assert e.heartbeat("A", 1).lost == [], "A holds the row again; nothing is lost"
    assert e.finish("r", "A", first.attempts, "SUCCESS", result=b"stale") is False
    assert e.finish("r", "A", second.attempts, "SUCCESS", result=b"fresh") is True
    assert e.get("r").result == b"fresh"


def test_finish_many_writes_every_final_state_each_fenced_by_its_own_attempt(engines):
    e = engines(lease_timeout=1)
    e.enqueue([row(id="stale"), row(id="ok"), row(id="bad"), row(id="theirs")])
    first = {r.id: r for r in e.claim("A", None, 4)}
    reaped(e, "stale")  # A lost every lease: it claims them again, with a new attempt each
    again = {r.id: r for r in e.claim("A", None, 4)}
    assert set(again) == set(first)
    e.release(["theirs"], "A")
    theirs, = e.claim("B", None, 1)
    items = [
        ("stale", "A", first["stale"].attempts, "SUCCESS", b"late", None, None, None, 60),
        ("ok", "A", again["ok"].attempts, "SUCCESS", b"1", None, None, None, 60),
        ("bad", "A", again["bad"].attempts, "FAILURE", None, "ValueError", "no", "Traceback...", 60),
        ("theirs", "A", again["theirs"].attempts, "SUCCESS", b"mine?", None, None, None, 60),
        ("stale", "A", again["stale"].attempts, "SUCCESS", b"fresh", None, None, None, 60),
        ("ok", "A", again["ok"].attempts, "FAILURE", None, None, None, None, 60),
    ]
    # The same answers as one finish() per item, in order: the stale attempt, the row
    # another node holds and the second finish of a finished row are fenced off.
    assert e.finish_many(items) == [False, True, True, False, True, False]
    got = {i: e.get(i) for i in ("stale", "ok", "bad", "theirs")}
    assert (got["stale"].state, got["stale"].result) == ("SUCCESS", b"fresh")
    assert (got["ok"].state, got["ok"].result, got["ok"].owner) == ("SUCCESS", b"1", None)
    assert got["ok"].expires_at == pytest.approx(got["ok"].finished_at + 60)
    assert (got["bad"].state, got["bad"].error_type, got["bad"].error, got["bad"].traceback) == (
        "FAILURE", "ValueError", "no", "Traceback...")
    assert (got["theirs"].state, got["theirs"].owner) == ("STARTED", "B")
    assert e.finish("theirs", "B", theirs.attempts, "SUCCESS") is True
    assert e.finish_many([]) == []
    with pytest.raises(JournalError):
        e.finish_many([("ok", "A", 1, "RUNNING", None, None, None, None, 60)])


def test_a_row_that_keeps_losing_its_lease_fails_as_a_poison_pill(engines):
    e = engines(lease_timeout=1)
    e.enqueue([row(id="pill")])
    for n in (1, 2):
        assert [r.id for r in e.claim("N%d" % n, None, 1)] == ["pill"]
        back = reaped(e, "pill", max_lease_losses=2)
    assert (back.state, back.lease_losses, back.error_type) == ("FAILURE", 2, "LeaseLost")
    assert "lease lost 2 times" in back.error
    assert back.expires_at is not None
    assert e.claim("N3", None, 1) == []


def test_heartbeat_keeps_a_lease_and_reports_cancel_requests(engines):
    # 2 s, not 1: a loaded test machine must not miss a 0.1 s heartbeat cadence by a whole lease.
    e = engines(lease_timeout=2)
    e.register(NodeInfo(id="A", host="h", pid=1))
    e.enqueue([row(id="kept"), row(id="dropped")])
    e.claim("A", None, 1)
    e.claim("C", None, 1)   # C never heartbeats

    def only_dropped_reaped():
        beat = e.heartbeat("A", 1)
        assert beat.renewed == 1
        got = [r.id for r in e.reap(5)]
        assert "kept" not in got, "a row whose owner heartbeats must not be reaped"
        return "dropped" in got
    wait_for(only_dropped_reaped, 10, interval=0.1, message="C's lease to expire")
    # Outlive A's original lease several times over while heartbeating.
    deadline = db_now(e) + 2 * e.lease_timeout
    while db_now(e) < deadline:
        e.heartbeat("A", 1)
        assert "kept" not in [r.id for r in e.reap(5)]
        time.sleep(0.1)  # heartbeat cadence, not synchronisation
    assert e.get("kept").owner == "A"

    assert e.cancel("kept") == "STARTED"
    beat = e.heartbeat("A", 1)
    assert beat.cancel == ["kept"] and beat.renewed == 1
    assert e.get("kept").state == "STARTED", "a running row is only asked to stop"
    assert e.finish("kept", "A", 1, "CANCELLED") is True


def test_a_cancel_requested_row_whose_node_died_ends_cancelled(engines):
    e = engines(lease_timeout=1)
    e.enqueue([row(id="r")])
    e.claim("dead", None, 1)
    assert e.cancel("r") == "STARTED"
    assert reaped(e, "r").state == "CANCELLED"
    assert e.claim("B", None, 1) == []


def test_cancel_of_an_unowned_row_ends_it_now(engines):
    e = engines()
    e.enqueue([row(id="r"), row(id="done")])
    assert e.cancel("r") == "PENDING"
    got = e.get("r")
    assert (got.state, got.owner) == ("CANCELLED", None)
    assert got.finished_at is not None and got.expires_at is not None
    e.claim("A", ["none"], 1)
    assert [r.id for r in e.claim("A", None, 5)] == ["done"]
    e.finish("done", "A", 1, "SUCCESS")
    assert e.cancel("done") == "SUCCESS"
    assert e.get("done").state == "SUCCESS"
    assert e.cancel("missing") is None


def test_retry_gives_the_row_back_due_later_and_is_fenced(engines):
    e = engines()
    e.enqueue([row(id="r")])
    got, = e.claim("A", None, 1)
    assert e.retry("r", "A", got.attempts + 1, 0) is False
    assert e.retry("r", "A", got.attempts, 30, error_type="ValueError", error="boom") is True
    back = e.get("r")
    assert (back.state, back.owner, back.error) == ("RETRY", None, "boom")
    assert back.eta == pytest.approx(db_now(e) + 30, abs=2)
    assert e.claim("A", None, 1) == []
    assert 25 < e.next_due(None) <= 30


def test_release_hands_rows_back_keeping_their_attempts(engines):
    e = engines()
    e.enqueue([row(id="r1"), row(id="r2")])
    e.claim("A", None, 2)
    assert e.release(["r1", "r2", "other"], "B") == 0
    assert e.release(["r1", "r2"], "A") == 2
    again = e.claim("B", None, 2)
    assert sorted(r.id for r in again) == ["r1", "r2"]
    assert {r.attempts for r in again} == {2}


# -- idempotency and the caller's transaction ---------------------------------------------

def test_idempotency_key_returns_the_first_row_from_any_node(engines):
    a, b = engines(), engines()
    first, = a.enqueue([row(id="one", idempotency_key="order-42")])
    again, = b.enqueue([row(id="two", idempotency_key="order-42")])
    assert again.id == "one"
    both = a.enqueue([row(id="three", idempotency_key="k2"), row(id="four", idempotency_key="k2")])
    assert [r.id for r in both] == ["three", "three"]
    assert b.get("two") is None and b.get("four") is None
    assert a.counts() == {"PENDING": 2}


@pg_only
def test_enqueue_joins_the_callers_transaction(pg_engines, pg_dsn):
    import psycopg
    from psycopg.rows import dict_row

    e = pg_engines()
    with pytest.raises(JournalError, match="open psycopg 3 connection"):
        e.enqueue([row()], connection=object())
    with psycopg.connect(pg_dsn, row_factory=dict_row) as conn:
        e.enqueue([row(id="rolled-back")], connection=conn)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS, "must not commit"
        assert e.get("rolled-back") is None, "invisible before the caller commits"
        conn.rollback()
        assert e.get("rolled-back") is None

        with conn.transaction():
            stored, = e.enqueue([row(id="committed")], connection=conn)
            assert stored.state == "PENDING"
            assert e.get("committed") is None
        assert e.get("committed").state == "PENDING"
        assert [r.id for r in e.claim("A", None, 5)] == ["committed"]


# -- nodes ------------------------------------------------------------------------------------

def test_nodes_register_heartbeat_and_unregister(engines):
    e = engines()
    e.register(NodeInfo(id="n1", host="h1", pid=11, queues=["a", "b"]))
    e.register(NodeInfo(id="n2", host="h2", pid=22))
    nodes = e.nodes()
    assert [(n.id, n.host, n.pid, n.queues) for n in nodes] == [("n1", "h1", 11, ["a", "b"]),
                                                                ("n2", "h2", 22, None)]
    e.heartbeat("n2", 3)
    assert {n.id: n.running for n in e.nodes()}["n2"] == 3
    e.unregister("n1")
    assert [n.id for n in e.nodes()] == ["n2"]


# -- scheduler -------------------------------------------------------------------------------

def test_one_leader_whose_epoch_grows_when_leadership_changes_hands(engines):
    a = engines(lease_timeout=1)
    b = engines(lease_timeout=1)
    first = a.lead("A")
    assert first is not None
    assert b.lead("B") is None
    assert a.lead("A") == first, "renewing keeps the epoch"

    second = wait_for(lambda: b.lead("B"), 10, interval=0.05, message="A's leader lease to lapse")
    assert second > first
    assert a.lead("A") is None
    due = 1_700_000_000.0
    assert a.fire("job", due, first, row(id="stale")) is False, "the old epoch must not fire"
    assert b.fire("job", due, second, row(id="run")) is True
    assert b.fire("job", due, second, row(id="dup")) is False, "one row per (job, due)"
    assert b.get("stale") is None and b.get("dup") is None
    assert b.get("run").state == "PENDING"
    assert b.last_fired("job") == due
    assert b.last_fired("other") is None


def test_a_leader_that_unregisters_hands_over_at_once(engines):
    a, b = engines(), engines()
    epoch = a.lead("A")
    a.unregister("A")
    assert b.lead("B") == epoch + 1


def test_concurrent_fires_of_one_instant_enqueue_once(engines):
    nodes = [engines() for _ in range(4)]
    epoch = nodes[0].lead("A")
    results = []
    start = threading.Barrier(len(nodes))

    def fire(engine, i):
        start.wait(10)
        results.append(engine.fire("job", 60.0, epoch, row(id="run-%d" % i)))

    threads = [threading.Thread(target=fire, args=(e, i)) for i, e in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [False, False, False, True]
    assert nodes[0].counts() == {"PENDING": 1}


def test_anchor_is_stored_once(engines):
    a, b = engines(), engines()
    assert a.anchor("every-5m", 100.0) == 100.0
    assert b.anchor("every-5m", 250.0) == 100.0
    assert b.anchor("other", 7.5) == 7.5


# -- reading and housekeeping ---------------------------------------------------------------

def test_rows_requeue_and_purge(engines):
    e = engines()
    e.enqueue([row(id="a", name="x"), row(id="b", name="y"), row(id="c", name="x")])
    for r in e.claim("A", None, 3):
        e.finish(r.id, "A", r.attempts, "FAILURE" if r.id != "c" else "SUCCESS", error="bad")
    assert [r.id for r in e.rows()] == ["c", "b", "a"]
    assert [r.id for r in e.rows(state="failure", name="x")] == ["a"]
    assert len(e.rows(limit=1)) == 1
    assert e.requeue("a") == 1
    back = e.get("a")
    assert (back.state, back.attempts, back.error, back.finished_at) == ("PENDING", 0, None, None)
    assert e.requeue() == 1   # only b is still FAILURE
    with pytest.raises(JournalError, match="refusing to purge PENDING"):
        e.purge("pending")
    assert e.purge("success") == 1
    assert e.counts() == {"PENDING": 2}


def test_prune_deletes_expired_rows_and_old_periodic_keys_but_each_jobs_latest(engines):
    e = engines()
    e.enqueue([row(id="gone"), row(id="kept"), row(id="running")])
    for r in e.claim("A", None, 3):
        if r.id != "running":
            e.finish(r.id, "A", r.attempts, "SUCCESS", ttl=0 if r.id == "gone" else 3600)
    epoch = e.lead("A")
    for due in (10.0, 20.0, 30.0):
        assert e.fire("job", due, epoch, row())
    assert e.fire("solo", 5.0, epoch, row())
    assert wait_for(lambda: e.prune(periodic_ttl=0) or None, 5, message="prune") == 1 + 2
    assert e.get("gone") is None
    assert e.get("kept") is not None and e.get("running") is not None
    assert e.last_fired("job") == 30.0 and e.last_fired("solo") == 5.0
    assert e.prune(periodic_ttl=0) == 0


# -- wake-ups ----------------------------------------------------------------------------------

def test_wait_for_work_wakes_on_due_work_from_another_node(engines):
    a, b = engines(), engines()
    assert a.wait_for_work(0.1) == "work", "a new LISTEN connection makes the caller look"
    started = time.monotonic()
    assert a.wait_for_work(0.3) == ""
    assert time.monotonic() - started >= 0.25
    b.enqueue([row(state="SCHEDULED", eta=db_now(b) + 3600)])
    b.enqueue([row(id="mine")], owner="B")
    assert a.wait_for_work(0.3) != "work", "future or self-claimed rows are no work to claim"
    b.enqueue([row(), row()])
    started = time.monotonic()
    assert a.wait_for_work(10) == "work"
    assert time.monotonic() - started < 5
    assert a.wait_for_work(0.2) == "", "hints already answered are drained"
    # A task finished elsewhere is news for whoever follows it: results changed, nothing to claim.
    assert len(a.claim("A", None, 5)) == 2
    a.wait_for_work(0.2)  # SQLite: its own claim changed the file
    assert b.finish_many([("mine", "B", 1, "SUCCESS", b"1", None, None, None, 60)]) == [True]
    started = time.monotonic()
    assert a.wait_for_work(10) == "news"
    assert time.monotonic() - started < 5


# -- schema and versions -----------------------------------------------------------------------

def test_nodes_starting_together_create_the_schema_once(engines):
    made, errors = [], []
    start = threading.Barrier(4)

    def open_one():
        engine = engines.cls(engines.target)
        try:
            start.wait(10)
            engine.open()
            engine.enqueue([row()])
            made.append(engine)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            # Closed by the thread that opened it: an SQLite engine's thread pool belongs to it.
            engine.close()

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(made) == 4
    meta = dict(engines.raw("SELECT key, value FROM greenqueue_meta"))
    assert meta["magic"] == "greenqueue-journal"
    assert meta["schema_version"] == str(_schema_version(engines.kind))
    assert engines().counts() == {"PENDING": 4}


def _schema_version(kind):
    if kind == "sqlite":
        from greenqueue.journal._sqlite import SCHEMA_VERSION
    else:
        from greenqueue.journal._postgres import SCHEMA_VERSION
    return SCHEMA_VERSION


def test_a_newer_schema_is_refused(engines):
    engines().close()
    engines.raw("UPDATE greenqueue_meta SET value = '99' WHERE key = 'schema_version'")
    engine = engines.cls(engines.secret_target)
    with pytest.raises(JournalError) as info:
        engine.open()
    engine.close()
    msg = str(info.value)
    assert "newer greenqueue (schema 99" in msg and "upgrade greenqueue" in msg
    assert msg.startswith("journal %s: " % engine.display) and PASSWORD not in msg
    if engines.kind == "postgres":
        assert "postgres:***@127.0.0.1" in msg


@pg_only
def test_a_foreign_database_is_refused_and_an_apps_own_tables_are_fine(pg_engines, pg):
    engines = pg_engines
    foreign = pg.create_database()
    pg.admin("CREATE TABLE greenqueue_meta (key text PRIMARY KEY, value text)", foreign)
    pg.admin("INSERT INTO greenqueue_meta VALUES ('magic', 'someone-else')", foreign)
    with pytest.raises(JournalError, match="belongs to something else.*another database"):
        engines(dsn=pg.dsn(foreign))

    lookalike = pg.create_database()
    pg.admin("CREATE TABLE greenqueue_tasks (id int)", lookalike)
    with pytest.raises(JournalError, match="greenqueue_tasks.*no greenqueue_meta"):
        engines(dsn=pg.dsn(lookalike))

    app = pg.create_database()
    pg.admin("CREATE TABLE orders (id int)", app)
    engines(dsn=pg.dsn(app)).enqueue([row()])
    for name in (foreign, lookalike, app):
        pg.drop_database(name)


# -- outages and secrets --------------------------------------------------------------------------

@pg_only
def test_a_stopped_server_fails_calls_fast_and_the_same_engine_recovers(pg_engines, pg, pg_dsn):
    engines = pg_engines
    e = engines(dsn=with_password(pg_dsn), lease_timeout=5)
    listener = engines()
    e.enqueue([row(id="before")])
    assert listener.wait_for_work(0.1) == "work"
    pg.stop()
    try:
        for call in (lambda: e.enqueue([row()]), lambda: e.claim("A", None, 1), lambda: e.heartbeat("A", 0)):
            started = time.monotonic()
            with pytest.raises(JournalError) as info:
                call()
            assert time.monotonic() - started < 5, "a call must fail within 5 s while PostgreSQL is down"
            assert PASSWORD not in str(info.value) and "postgres:***@" in str(info.value)
        # The first wait finds the LISTEN connection broken and may say "look now"; the ones
        # after it must not raise either, only wait out their timeout.
        listener.wait_for_work(0.5)
        started = time.monotonic()
        assert listener.wait_for_work(0.5) == "", "no server: degrade to polling, don't raise"
        assert time.monotonic() - started >= 0.4
    finally:
        pg.start()
    wait_for(lambda: _works(e), 20, interval=0.1, message="the engine to reconnect")
    assert e.get("before").state == "PENDING"
    assert [r.id for r in e.claim("A", None, 5)] == ["before"]
    assert listener.wait_for_work(5) == "work", "the re-opened LISTEN connection makes the caller look"
    e.enqueue([row(id="after")])
    assert listener.wait_for_work(10) == "work"


def _works(engine):
    try:
        engine.counts()
    except JournalError:
        return False
    return True


@pg_only
def test_open_fails_fast_naming_the_masked_dsn_when_nothing_listens():
    from .conftest import free_port

    cls = engine_class()
    dsn = "postgresql://user:%s@127.0.0.1:%d/db" % (PASSWORD, free_port())
    engine = cls(dsn)
    started = time.monotonic()
    with pytest.raises(JournalError) as info:
        engine.open()
    assert time.monotonic() - started < 5
    assert "postgresql://user:***@127.0.0.1:" in str(info.value) and PASSWORD not in str(info.value)
    engine.close()


@pg_only
def test_open_says_why_it_cannot_connect(pg):
    engine = engine_class()(with_password(pg.dsn("no_such_db")))
    with pytest.raises(JournalError) as info:
        engine.open()
    msg = str(info.value)
    assert 'database "no_such_db" does not exist' in msg
    assert "postgres:***@" in msg and PASSWORD not in msg
    engine.close()


@pytest.mark.postgres
@pytest.mark.parametrize("dsn, shown", [
    ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgres://u@h/db", "postgres://u@h/db"),
    ("postgresql://u:p%40ss@h/db?sslmode=require&password=pw2", "postgresql://u:***@h/db?sslmode=require&password=***"),
    ("host=h user=u password='a b' dbname=d", "host=h user=u password=*** dbname=d"),
    ("host=h password=pw dbname=d", "host=h password=*** dbname=d"),
])
def test_mask_dsn(dsn, shown):
    from greenqueue.journal._postgres import mask_dsn

    assert mask_dsn(dsn) == shown


@pg_only
def test_display_and_errors_never_show_the_password(pg_engines, pg_dsn):
    e = pg_engines(dsn=with_password(pg_dsn))
    assert PASSWORD not in e.display and PASSWORD not in repr(e)
    assert e.display.startswith("postgresql://postgres:***@127.0.0.1:")
    with pytest.raises(JournalError) as info:
        e.finish("x", "A", 1, "RUNNING")
    assert PASSWORD not in str(info.value)


# -- SQLite: one file shared by the processes of one host -----------------------------------------

# Opens the engine, says "ready", waits for "go" on stdin so every process starts claiming
# together, then claims until nothing is left, appending each claim to the ledger before
# finishing it: the ledger, not the engine, is the witness of who got what.
CLAIMER = r"""
import os, sys, time
from greenqueue.journal._sqlite import SQLiteEngine

path, ledger, node = sys.argv[1:4]
engine = SQLiteEngine(path)
engine.open()
print("ready", flush=True)
sys.stdin.readline()
fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
while True:
    batch = engine.claim(node, None, 5)
    if not batch:
        break
    for r in batch:
        os.write(fd, ("%s %s %d\n" % (node, r.id, r.attempts)).encode())
    for r in batch:
        engine.finish(r.id, node, r.attempts, "SUCCESS")
    time.sleep(0.002)  # the work itself: SQLite's lock is not fair to a claimer in its busy handler
engine.close()
"""

# Holds SQLite's write lock until its stdin closes.
LOCKER = r"""
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


def _python(script, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))


def _reap_processes(procs):
    for proc in procs:
        if proc.returncode is not None:
            continue
        try:
            proc.communicate(timeout=10)  # closes stdin, which ends every script here
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def _together(procs, timeout):
    """Wait until every script says "ready", send them all "go", and return their outputs (exit 0 each)."""
    outs = []
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.communicate(timeout=10)
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err
            outs.append(out)
    finally:
        _reap_processes(procs)
    return outs


@pytest.mark.realproc
def test_processes_claiming_from_one_file_never_get_the_same_row(sqlite_engines, tmp_path):
    e = sqlite_engines()
    ids = {r.id for r in e.enqueue([row() for _ in range(600)])}
    ledger = tmp_path / "ledger"
    _together([_python(CLAIMER, sqlite_engines.target, ledger, "P%d" % i) for i in range(3)], timeout=60)
    claims = [line.split() for line in ledger.read_text().splitlines()]
    claimed = [c[1] for c in claims]
    twice = [i for i, n in collections.Counter(claimed).items() if n > 1]
    assert not twice, "%d rows were claimed by two processes, e.g. %s" % (len(twice), twice[:3])
    assert set(claimed) == ids
    assert {c[2] for c in claims} == {"1"}
    assert len({c[0] for c in claims}) >= 2, "the processes should have shared the work"
    assert e.counts() == {"SUCCESS": 600}


# Waits for "go", then opens a fresh file: every process races to create the schema.
OPENER = r"""
import sys
from greenqueue.journal._sqlite import SQLiteEngine
print("ready", flush=True)
sys.stdin.readline()
engine = SQLiteEngine(sys.argv[1])
engine.open()
engine.close()
print("opened", flush=True)
"""


@pytest.mark.realproc
def test_processes_starting_together_on_a_new_file_all_open_it(tmp_path):
    path = tmp_path / "new.db"
    outs = _together([_python(OPENER, path) for _ in range(6)], timeout=30)
    assert all("opened" in out for out in outs)
    with closing(sqlite3.connect(str(path))) as conn:
        assert dict(conn.execute("SELECT key, value FROM greenqueue_meta"))["schema_version"] == str(_schema_version("sqlite"))


@pytest.mark.realproc
def test_a_write_lock_held_elsewhere_fails_within_the_timeout_and_leaves_the_hub_free(sqlite_engines):
    e = sqlite_engines(timeout=1)
    e.enqueue([row(id="before")])
    locker = _python(LOCKER, sqlite_engines.target)
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in iter(int, 1)])
    try:
        assert locker.stdout.readline().strip() == "locked", locker.communicate(timeout=10)
        assert e.get("before").state == "PENDING", "readers must not wait for the writer (WAL)"
        for call in (lambda: e.enqueue([row()]), lambda: sqlite_engines(timeout=1)):
            started = time.monotonic()
            del ticks[:]
            with pytest.raises(JournalError) as info:
                call()
            waited = time.monotonic() - started
            assert 0.9 <= waited < 1 + 1, "waits for the lock up to the timeout, then fails"
            assert str(info.value).startswith("journal %s: " % sqlite_engines.target)
            assert "write lock for more than 1 s" in str(info.value)
            assert len(ticks) > 20, "other greenlets must run while a call waits for the lock"
    finally:
        ticker.kill()
        _reap_processes([locker])
    assert e.enqueue([row(id="after")])[0].state == "PENDING", "the same engine works once the lock is free"


def test_a_file_of_something_else_is_refused_untouched(sqlite_engines, tmp_path):
    cls = sqlite_engines.cls
    text = tmp_path / "notes.txt"
    text.write_text("not a database, " * 100)
    other = tmp_path / "app.db"
    sqlite_raw(str(other), "CREATE TABLE orders (id INTEGER)")
    before = other.read_bytes()
    lookalike = tmp_path / "lookalike.db"
    sqlite_raw(str(lookalike), "CREATE TABLE greenqueue_meta (key TEXT PRIMARY KEY, value TEXT)")
    sqlite_raw(str(lookalike), "INSERT INTO greenqueue_meta VALUES ('magic', 'someone-else')")
    cases = [(text, "not a greenqueue journal or corrupt"),
             (other, r"SQLite database of something else \(tables: orders\); refusing to touch it"),
             (lookalike, "not a greenqueue journal \\(magic 'someone-else'\\)"),
             (tmp_path / "missing" / "journal.db", "directory .*missing does not exist")]
    for path, message in cases:
        engine = cls(str(path))
        with pytest.raises(JournalError, match="journal %s: .*%s" % (path, message)):
            engine.open()
        engine.close()
    assert other.read_bytes() == before, "a foreign file must not even be switched to WAL"
    assert sqlite_raw(str(other), "PRAGMA journal_mode") == [("delete",)]


# The single-process journal's file format (schema 1), as greenqueue wrote it before clusters.
SCHEMA_1 = [
    "CREATE TABLE greenqueue_meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE greenqueue_tasks (id VARCHAR(32) PRIMARY KEY, name VARCHAR(255) NOT NULL,
        serializer VARCHAR(16) NOT NULL, payload BLOB NOT NULL, state VARCHAR(16) NOT NULL,
        eta DOUBLE PRECISION, attempts INTEGER NOT NULL DEFAULT 0, created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL, started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION,
        expires_at DOUBLE PRECISION, result BLOB, error_type VARCHAR(255), error TEXT, traceback TEXT,
        note TEXT)""",
    "CREATE INDEX greenqueue_tasks_state ON greenqueue_tasks (state, eta)",
    """CREATE TABLE greenqueue_periodic (job VARCHAR(255) NOT NULL, scheduled_for DOUBLE PRECISION NOT NULL,
        fired_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (job, scheduled_for))""",
    "INSERT INTO greenqueue_meta VALUES ('magic', 'greenqueue-journal'), ('schema_version', '1')",
    "PRAGMA user_version=1",
]


def test_a_single_process_journal_is_migrated_keeping_its_tasks(tmp_path):
    from greenqueue.journal._sqlite import SQLiteEngine

    path = str(tmp_path / "old.db")
    insert = ("INSERT INTO greenqueue_tasks (id, name, serializer, payload, state, eta, attempts, created_at, "
              "updated_at, result) VALUES (?, 't.work', 'json', X'7B7D', ?, ?, ?, 100, 100, ?)")
    with closing(sqlite3.connect(path)) as old, old:
        for stmt in SCHEMA_1:
            old.execute(stmt)
        for args in (("running", "STARTED", None, 1, None), ("done", "SUCCESS", None, 1, b"42"),
                     ("later", "SCHEDULED", time.time() + 3600, 0, None)):
            old.execute(insert, args)
        old.execute("INSERT INTO greenqueue_periodic VALUES ('job', 60.0, 61.0)")

    e = SQLiteEngine(path)
    e.open()
    try:
        assert e.get("running").state == "PENDING", "a row its dead process was running runs again"
        assert (e.get("done").state, e.get("done").result) == ("SUCCESS", b"42")
        claimed, = e.claim("A", None, 5)
        assert (claimed.id, claimed.attempts, claimed.payload) == ("running", 2, b"{}")
        assert e.last_fired("job") == 60.0
        assert e.counts() == {"STARTED": 1, "SUCCESS": 1, "SCHEDULED": 1}
    finally:
        e.close()
    version = _schema_version("sqlite")
    assert dict(sqlite_raw(path, "SELECT key, value FROM greenqueue_meta"))["schema_version"] == str(version)
    assert sqlite_raw(path, "PRAGMA user_version") == [(version,)]
    assert {r[0] for r in sqlite_raw(path, "SELECT name FROM sqlite_master WHERE name LIKE '%v1%'")} == set()


def test_synchronous_is_normal_or_full(sqlite_engines):
    assert sqlite_engines().pragma("synchronous") == 1
    assert sqlite_engines(synchronous="full").pragma("synchronous") == 2
    assert sqlite_engines().pragma("journal_mode") == "wal"
    with pytest.raises(ConfigError, match="NORMAL, FULL"):
        sqlite_engines(synchronous="OFF")


def test_sqlite_refuses_the_callers_connection(sqlite_engines):
    e = sqlite_engines()
    with pytest.raises(ConfigError, match="connection= needs a PostgreSQL journal"):
        e.enqueue([row(id="r")], connection=object())
    assert e.get("r") is None


def test_a_closed_engine_says_so(sqlite_engines):
    e = sqlite_engines()
    e.close()
    with pytest.raises(JournalError, match="the engine is not open"):
        e.get("x")
    assert e.wait_for_work(0.1) == ""


MOUNTINFO = """\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /srv/share rw,relatime shared:20 - nfs4 server:/export rw,vers=4.2
41 40 0:36 / /srv/share/local\\040disk rw - tmpfs tmpfs rw
"""


@pytest.mark.parametrize("path, kind", [("/var/lib/gq/journal.db", "ext4"), ("/srv/share/j.db", "nfs4"),
                                        ("/srv/shared/j.db", "ext4"), ("/srv/share/local disk/j.db", "tmpfs"),
                                        ("/srv/share", "nfs4")])
def test_the_filesystem_of_a_path_comes_from_its_longest_mount(path, kind):
    from greenqueue.journal._sqlite import filesystem_of

    assert filesystem_of(path, MOUNTINFO) == kind


def test_a_row_given_back_uncounted_keeps_its_attempts(engines):
    # A node that claimed a task it does not know gives it back without using up a retry.
    e = engines()
    e.enqueue([row(id="u", max_attempts=1)])
    claimed, = e.claim("A", None, 1)
    assert claimed.attempts == 1
    assert e.retry("u", "A", 1, 0.0, "GreenqueueError", "not registered here", counted=False)
    back = e.get("u")
    assert (back.attempts, back.owner, back.state) == (0, None, "RETRY")
    again, = e.claim("B", None, 1)
    assert again.attempts == 1, "the node that knows it gets its first attempt"


@pg_only
def test_a_burst_into_a_fresh_table_gets_its_statistics_from_the_heartbeat(pg_engines, monkeypatch):
    """The claim's generic plan follows the table: the heartbeat analyzes a table that outgrew its statistics."""
    from greenqueue.journal import _postgres
    monkeypatch.setattr(_postgres, "STATS_EVERY", 0.0)
    e = pg_engines()
    e.enqueue([row(id="few%d" % i) for i in range(5)])
    e.heartbeat("A", 0)  # a small table: nothing to do

    def planned():
        return pg_engines.raw("SELECT reltuples FROM pg_class WHERE relname = 'greenqueue_tasks'")[0][0]
    assert planned() < 1000
    for k in range(0, 20000, 5000):
        e.enqueue([row(id="burst%d" % i, queue="elsewhere") for i in range(k, k + 5000)])

    def analyzed():
        e.heartbeat("A", 0)
        return planned() >= 15000
    wait_for(analyzed, 10, interval=0.2, message="the heartbeat to analyze the grown table")
