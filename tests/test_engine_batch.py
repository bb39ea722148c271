"""A node's group commit and the batched reads, on both engines.

``write()`` puts a batch's spawns (claimed here or not) and final states in
one transaction; ``get_many()`` reads many rows in one query for a node that
follows tasks running elsewhere; ``count_unfinished()`` is what
``max_instances`` asks on every fire. Each test runs on PostgreSQL and on
SQLite through the fixtures of ``test_engines``.
"""

import time

import pytest

from greenqueue.errors import JournalError

from .pg_support import pg, pg_dsn  # noqa: F401  (fixtures)
from .test_engines import _schema_version, db_now, engines, pg_engines, row, sqlite_engines  # noqa: F401


def _fin(r, state="SUCCESS", result=b"1", node="A"):
    """finish()'s arguments for row ``r`` as node ``node`` holds it."""
    return (r.id, node, r.attempts, state, result, None, None, None, 60)


def test_write_commits_claimed_and_unclaimed_spawns_and_final_states_together(engines):
    e = engines()
    running = e.enqueue([row(id="run1"), row(id="run2")], owner="A")
    claimed, unclaimed, done = e.write(
        "A", [row(id="c1", queue="q"), row(id="c2", note="n", max_attempts=3)],
        [row(id="u1"), row(id="u2", eta=time.time() + 3600, state="SCHEDULED")],
        [_fin(running[0]), _fin(running[1], "FAILURE", None)])
    assert [(r.id, r.state, r.owner, r.attempts) for r in claimed] == [
        ("c1", "STARTED", "A", 1), ("c2", "STARTED", "A", 1)]
    assert claimed[0].lease_expires == pytest.approx(claimed[0].started_at + e.lease_timeout)
    assert claimed[0].started_at == pytest.approx(db_now(e), abs=5)
    assert [(r.id, r.state, r.owner, r.attempts) for r in unclaimed] == [
        ("u1", "PENDING", None, 0), ("u2", "SCHEDULED", None, 0)]
    assert done == [True, True]
    # What write() hands back is what is stored, field by field.
    for stored in claimed + unclaimed:
        assert e.get(stored.id) == stored
    assert e.get("run1").state == "SUCCESS" and e.get("run2").state == "FAILURE"
    assert e.counts() == {"STARTED": 2, "PENDING": 1, "SCHEDULED": 1, "SUCCESS": 1, "FAILURE": 1}
    assert [r.id for r in e.claim("B", None, 5)] == ["u1"]


def test_write_with_one_part_or_none(engines):
    e = engines()
    assert e.write("A", [], [], []) == ([], [], [])
    claimed, unclaimed, done = e.write("A", [row(id="c")], [], [])
    assert ([r.id for r in claimed], unclaimed, done) == (["c"], [], [])
    assert e.write("A", [], [row(id="u")], [])[1][0].state == "PENDING"
    assert e.write("A", [], [], [_fin(claimed[0])]) == ([], [], [True])
    e.close()
    assert e.write("A", [], [], []) == ([], [], []), "an empty batch touches nothing, not even a closed engine"


def test_write_keeps_the_idempotency_rule_for_both_kinds_of_spawn(engines):
    e = engines()
    first, = e.enqueue([row(id="first", idempotency_key="k1")])
    claimed, unclaimed, _ = e.write("A", [row(id="again", idempotency_key="k1"), row(id="new", idempotency_key="k2")],
                                    [row(id="third", idempotency_key="k1"), row(id="dup", idempotency_key="k2")], [])
    assert [r.id for r in claimed] == ["first", "new"]
    assert claimed[0] == first, "the existing row answers, unclaimed as it was"
    assert (claimed[1].owner, claimed[1].state) == ("A", "STARTED")
    assert [r.id for r in unclaimed] == ["first", "new"]
    assert e.get("again") is None and e.get("third") is None and e.get("dup") is None
    # A row id spawned twice is one row, the first.
    again, = e.write("A", [], [row(id="new")], [])[1]
    assert again == e.get("new") and again.owner == "A"


def test_write_fences_each_finish_as_finish_many_does(engines):
    e = engines()
    mine, = e.enqueue([row(id="mine")], owner="A")
    theirs, = e.enqueue([row(id="theirs")], owner="B")
    _, _, done = e.write("A", [row(id="n1")], [], [
        _fin(mine), _fin(theirs), (mine.id, "A", mine.attempts + 1, "SUCCESS", None, None, None, None, 60),
        _fin(mine, "FAILURE", None)])
    # Another node's row and a finish of a finished row are fenced off, in order.
    assert done == [True, False, False, False]
    assert (e.get("mine").state, e.get("mine").result) == ("SUCCESS", b"1")
    assert (e.get("theirs").state, e.get("theirs").owner) == ("STARTED", "B")
    assert e.get("n1").owner == "A"


def test_a_write_with_a_bad_final_state_writes_nothing(engines):
    e = engines()
    mine, = e.enqueue([row(id="mine")], owner="A")
    with pytest.raises(JournalError, match="final state"):
        e.write("A", [row(id="c")], [row(id="u")], [_fin(mine, "RUNNING")])
    assert e.get("c") is None and e.get("u") is None and e.get("mine").state == "STARTED"


def test_a_failing_write_rolls_back_every_part(engines):
    e = engines()
    mine, = e.enqueue([row(id="mine")], owner="A")
    unstorable = row(id="u")
    unstorable.payload = {"not": "bytes"}  # type: ignore[assignment]
    with pytest.raises(JournalError):
        e.write("A", [row(id="c")], [unstorable], [_fin(mine)])
    assert e.get("c") is None and e.get("u") is None
    assert e.get("mine").state == "STARTED", "the finish went with the failed spawns"
    assert e.write("A", [row(id="c")], [], [_fin(mine)])[2] == [True], "the engine works on"


def test_the_sqlite_write_is_one_call_on_the_engines_thread(sqlite_engines):
    e = sqlite_engines()
    mine, = e.enqueue([row(id="mine")], owner="A")
    hops = []
    call = e._call
    e._call = lambda doing, *args: hops.append(doing) or call(doing, *args)
    e.write("A", [row(), row()], [row()], [_fin(mine)])
    assert hops == ["write"]


def test_get_many_reads_the_rows_that_exist(engines):
    e = engines()
    ids = ["g%04d" % i for i in range(1200)]
    e.enqueue([row(id=i) for i in ids])
    got = e.get_many(ids[::-1] + ["missing", ids[0]])
    assert sorted(r.id for r in got) == ids
    assert {r.id: r for r in got}["g0007"] == e.get("g0007")
    assert e.get_many([]) == [] and e.get_many(["missing"]) == []


def test_count_unfinished_counts_every_unfinished_state_of_one_task(engines):
    e = engines(lease_timeout=5)
    e.enqueue([row("a", id="p%d" % i) for i in range(5)])
    e.enqueue([row("a", id="later", eta=time.time() + 3600, state="SCHEDULED")])
    e.enqueue([row("b", id="other")])
    running = e.claim("A", None, 2)
    done = e.enqueue([row("a", id="done"), row("a", id="retry")], owner="A")
    assert e.retry("retry", "A", done[1].attempts, 3600) is True
    assert e.finish("done", "A", done[0].attempts, "SUCCESS") is True
    assert e.cancel("p4") == "PENDING"
    states = {r.id: r.state for r in e.rows(name="a", limit=100)}
    assert sorted(states.values()).count("STARTED") == len([r for r in running if r.name == "a"])
    unfinished = [i for i, s in states.items() if s in ("PENDING", "SCHEDULED", "STARTED", "RETRY")]
    assert len(unfinished) == 6 and e.count_unfinished("a") == 6
    assert e.count_unfinished("b") == 1 and e.count_unfinished("none") == 0


def test_count_unfinished_is_not_capped(engines):
    e = engines()
    e.write("A", [row("many") for _ in range(1500)], [row("many") for _ in range(2600)], [])
    assert e.count_unfinished("many") == 4100


def test_count_unfinished_reads_indexes_only(sqlite_engines):
    # Waiting rows are counted from their own index, running ones through the owner index:
    # neither count reads the table, whatever the number of finished rows.
    e = sqlite_engines()
    waiting = sqlite_engines.raw("EXPLAIN QUERY PLAN SELECT count(*) FROM greenqueue_tasks INDEXED BY "
                                 "greenqueue_tasks_waiting WHERE name = 'x' AND (state = 'PENDING' OR "
                                 "state = 'SCHEDULED' OR state = 'RETRY')")
    assert "COVERING INDEX greenqueue_tasks_waiting" in waiting[0][-1]
    e.write("A", [row("x")], [row("x"), row("y")], [])
    assert e.count_unfinished("x") == 2 and e.count_unfinished("y") == 1


def test_a_task_claimed_as_it_is_spawned_enters_no_index_of_waiting_rows(sqlite_engines):
    e = sqlite_engines()
    e.write("A", [row("x") for _ in range(3)], [row("x")], [])
    assert sqlite_engines.raw("SELECT count(*) FROM greenqueue_tasks INDEXED BY greenqueue_tasks_waiting "
                              "WHERE name = 'x' AND (state = 'PENDING' OR state = 'SCHEDULED' OR "
                              "state = 'RETRY')") == [(1,)]
    assert e.count_waiting() == {"PENDING": 1}
    assert [r.state for r in e.waiting("PENDING", 10)] == ["PENDING"]


def _without_priorities(engines):
    """Take away priorities, holds, limits and workflow steps with their indexes and tables; the due index back."""
    for index in ("greenqueue_tasks_ready", "greenqueue_tasks_held", "greenqueue_tasks_gated",
                  "greenqueue_tasks_parked", "greenqueue_tasks_limited", "greenqueue_tasks_rated"):
        engines.raw("DROP INDEX %s" % index)
    for column in ("priority", "hold", "rate_bucket", "rate_n", "rate_per", "limit_bucket", "limit_n", "parents",
                   "waits", "takes", "then_ids", "error_ids", "chord", "wait"):
        engines.raw("ALTER TABLE greenqueue_tasks DROP COLUMN %s" % column)
    engines.raw("DROP TABLE greenqueue_starts")
    engines.raw("DROP TABLE greenqueue_groups")
    engines.raw("CREATE INDEX greenqueue_tasks_due ON greenqueue_tasks (due) WHERE owner IS NULL AND "
                "(state = 'PENDING' OR state = 'SCHEDULED' OR state = 'RETRY')")


def _downgrade(engines):
    """Make this test's store look as the previous version left it (no priorities, no held rows)."""
    previous = _schema_version(engines.kind) - 1
    _without_priorities(engines)
    if engines.kind == "sqlite":
        engines.raw("PRAGMA user_version=%d" % previous)
    engines.raw("UPDATE greenqueue_meta SET value = '%d' WHERE key = 'schema_version'" % previous)


def test_schema_3_sqlite_files_lose_the_indexes_of_every_row_and_keep_their_rows(sqlite_engines):
    e = sqlite_engines()
    e.enqueue([row("a", id="p1")])
    e.enqueue([row("a", id="s1")], owner="A")
    e.close()
    # Version 3: an index of every unfinished row, and of every row by state and by creation time.
    _without_priorities(sqlite_engines)
    sqlite_engines.raw("DROP INDEX greenqueue_tasks_waiting")
    sqlite_engines.raw("ALTER TABLE greenqueue_tasks DROP COLUMN start_by")
    sqlite_engines.raw("CREATE INDEX greenqueue_tasks_unfinished ON greenqueue_tasks (name, state) WHERE "
                       "(state = 'PENDING' OR state = 'SCHEDULED' OR state = 'STARTED' OR state = 'RETRY')")
    sqlite_engines.raw("CREATE INDEX greenqueue_tasks_created ON greenqueue_tasks (created_at)")
    sqlite_engines.raw("CREATE INDEX greenqueue_tasks_state ON greenqueue_tasks (state, created_at)")
    sqlite_engines.raw("PRAGMA user_version=3")
    sqlite_engines.raw("UPDATE greenqueue_meta SET value = '3' WHERE key = 'schema_version'")
    e = sqlite_engines()
    names = {r[0] for r in sqlite_engines.raw("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "greenqueue_tasks_waiting" in names and not names & {
        "greenqueue_tasks_unfinished", "greenqueue_tasks_created", "greenqueue_tasks_state"}
    assert e.count_unfinished("a") == 2 and [r.id for r in e.claim("B", None, 5)] == ["p1"]


def test_a_store_of_the_previous_version_is_migrated_keeping_its_rows(engines):
    e = engines()
    e.enqueue([row("a", id="p1"), row("a", id="p2")])
    e.enqueue([row("a", id="s1")], owner="A")
    e.enqueue([row("a", id="later", state="SCHEDULED", eta=db_now(e) + 3600)])
    e.close()
    _downgrade(engines)
    e = engines()
    meta = dict(engines.raw("SELECT key, value FROM greenqueue_meta"))
    assert meta["schema_version"] == str(_schema_version(engines.kind))
    assert e.count_unfinished("a") == 4
    assert [r.id for r in e.claim("B", None, 5)] == ["p1", "p2"], "a row due later stays held after the upgrade"
    assert e.get("later").hold == "eta"
    assert e.get("s1").owner == "A"


def test_waiting_lists_unowned_rows_soonest_first_and_counts_them_by_state(engines):
    # The dashboard's lists and counts: rows waiting for any node, never the running or finished ones.
    e = engines()
    now = db_now(e)
    later, sooner = row("a", eta=now + 60, state="SCHEDULED"), row("a", eta=now + 30, state="SCHEDULED")
    e.write("A", [row("a", id="running")], [later, sooner, row("b", id="due")], [])
    assert [r.id for r in e.waiting("SCHEDULED", 10)] == [sooner.id, later.id]
    assert [r.id for r in e.waiting("SCHEDULED", 1)] == [sooner.id]
    assert [r.id for r in e.waiting("PENDING", 10)] == ["due"]
    assert e.waiting("RETRY", 10) == []
    assert e.count_waiting() == {"SCHEDULED": 2, "PENDING": 1}
    e.finish("running", "A", 1, "SUCCESS", b"1")
    assert e.count_waiting() == {"SCHEDULED": 2, "PENDING": 1}
