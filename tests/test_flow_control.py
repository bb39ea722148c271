"""Flow control: priorities and the claim at scale, as DESIGN "Flow control" says, on every store."""

import sqlite3
import time
from contextlib import closing

import gevent
import gevent.event
import pytest

import greenqueue
from greenqueue import errors, runtime, task

from .conftest import wait_for
from .pg_support import pg, pg_dsn  # noqa: F401  (fixtures)
from .test_engines import db_now, engines, pg_engines, row, sqlite_engines  # noqa: F401

WAIT = 10.0


# -- priority in one process --------------------------------------------------------------

def _one_slot_then(spawn_all):
    """Hold the only slot, spawn with ``spawn_all()``, free the slot; the order the tasks started in."""
    order = []
    gate = gevent.event.Event()

    @task
    def block():
        gate.wait(WAIT)

    @task
    def note(label):
        order.append(label)

    greenqueue.configure(max_concurrency=1)
    blocker = block.spawn()
    results = spawn_all(note)
    gate.set()
    blocker.get(WAIT)
    for r in results:
        r.get(WAIT)
    return order


def test_waiting_tasks_start_by_priority_then_in_spawn_order():
    order = _one_slot_then(lambda note: [
        note.apply_async(("zero",)), note.apply_async(("low",), priority=-5),
        note.apply_async(("high",), priority=10), note.apply_async(("one",), priority=1),
        note.apply_async(("zero again",)), note.apply_async(("high again",), priority=10)])
    assert order == ["high", "high again", "one", "zero", "zero again", "low"]


def test_a_task_declares_its_priority_and_a_call_overrides_it():
    @task(priority=50)
    def urgent(label):
        return label

    order = _one_slot_then(lambda note: [
        note.apply_async(("plain",)), urgent.spawn("urgent"),
        note.apply_async(("demoted",), priority=-1)])
    assert order == ["plain", "demoted"]  # urgent is another task: it ran first, outside note's list
    order = _one_slot_then(lambda note: [note.apply_async(("plain",)), note.apply_async(("first",), priority=1)])
    assert order == ["first", "plain"]


def test_idle_tasks_stay_last_whatever_the_priorities():
    order = _one_slot_then(lambda note: [note.spawn_idle("idle"), note.apply_async(("low",), priority=-100)])
    assert order == ["low", "idle"]


@pytest.mark.parametrize("bad", [500, -101, 1.5, "high", True])
def test_a_bad_priority_is_a_config_error_naming_it(bad):
    with pytest.raises(errors.ConfigError, match="priority"):
        task(priority=bad)

    @task
    def plain():
        return 1

    with pytest.raises(errors.ConfigError, match="priority"):
        plain.apply_async(priority=bad)


# -- priority in the stores' claim --------------------------------------------------------

def test_the_claim_takes_rows_by_priority_then_due_time_then_spawn_order(engines):
    e = engines()
    now = db_now(e)
    e.enqueue([row(id="old-low", priority=-1), row(id="plain-1"), row(id="urgent", priority=90)])
    e.enqueue([row(id="earlier-due", eta=now - 60), row(id="plain-2"), row(id="also-urgent", priority=90)])
    assert [r.id for r in e.claim("A", None, 3)] == ["urgent", "also-urgent", "earlier-due"]
    assert [r.id for r in e.claim("A", None, 10)] == ["plain-1", "plain-2", "old-low"]


def test_the_claim_merges_the_served_queues_by_priority(engines):
    e = engines()
    e.enqueue([row(id="a-plain", queue="a"), row(id="b-high", queue="b", priority=6),
               row(id="c-top", queue="c", priority=9), row(id="a-high", queue="a", priority=5)])
    assert [r.id for r in e.claim("A", ["a", "b"], 2)] == ["b-high", "a-high"]
    assert [r.id for r in e.claim("A", None, 5)] == ["c-top", "a-plain"]


def test_a_row_held_for_its_time_is_not_ready_until_then_and_then_keeps_its_priority(engines):
    e = engines()
    now = db_now(e)
    e.enqueue([row(id="later", state="SCHEDULED", eta=now + 0.5, priority=7), row(id="plain")])
    assert e.get("later").hold == "eta" and e.get("plain").hold is None
    assert [r.id for r in e.claim("A", None, 1)] == ["plain"]
    assert e.claim("A", None, 5) == []
    e.enqueue([row(id="plain-2")])
    gevent.sleep(max(0.0, now + 0.6 - db_now(e)))
    # Due now: the claim makes it ready, and its priority puts it before the plain row.
    assert [r.id for r in e.claim("A", None, 5)] == ["later", "plain-2"]


def test_a_retry_with_a_countdown_is_held_and_one_without_is_ready(engines):
    e = engines()
    e.enqueue([row(id="r1"), row(id="r2")])
    got = {r.id: r for r in e.claim("A", None, 2)}
    assert e.retry("r1", "A", got["r1"].attempts, 30.0)
    assert e.retry("r2", "A", got["r2"].attempts, 0.0)
    assert e.get("r1").hold == "eta" and e.get("r2").hold is None
    assert [r.id for r in e.claim("A", None, 5)] == ["r2"]


# -- the claim at scale -------------------------------------------------------------------

def test_sqlite_claim_and_next_due_read_one_index_range_whatever_waits(sqlite_engines):
    """The plan, not a timing: every claim statement searches the ready or held index, never scans."""
    from greenqueue.journal._sqlite_sql import HELD, READY

    e = sqlite_engines()
    e.enqueue([row(id="x%d" % i, state="SCHEDULED", eta=time.time() + 86400) for i in range(50)]
              + [row(id="o%d" % i, queue="elsewhere") for i in range(50)] + [row(id="mine")])
    statements = [
        ("SELECT id FROM %s AND queue = ? ORDER BY priority DESC, due, created_at LIMIT ?" % READY, ("default", 5)),
        ("SELECT queue FROM %s AND queue > ? ORDER BY queue LIMIT 1" % READY, ("a",)),
        ("UPDATE greenqueue_tasks SET hold = NULL WHERE id IN (SELECT id FROM %s AND due <= ?)" % HELD, (0.0,)),
        ("SELECT min(due) FROM %s" % HELD, ()),
    ]
    with closing(sqlite3.connect(sqlite_engines.target)) as conn:
        conn.execute("ANALYZE")  # statistics that would tempt the planner elsewhere must not matter
        for sql, params in statements:
            plan = " | ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
            assert "SEARCH" in plan and "SCAN greenqueue_tasks" not in plan, (sql, plan)
            assert "greenqueue_tasks_ready" in plan or "greenqueue_tasks_held" in plan, plan
    assert [r.id for r in e.claim("A", ["default"], 5)] == ["mine"]


def test_a_backlog_of_held_and_unserved_rows_does_not_slow_the_claim(engines):
    """Relative timing: claims with 20,000 rows waiting elsewhere cost about what they cost on an empty store."""
    def claims_per_second(e, n=60):
        t0 = time.perf_counter()
        for i in range(n):
            e.enqueue([row(id="t%d-%f" % (i, t0))])
            assert len(e.claim("A", ["default"], 1)) == 1
        return n / (time.perf_counter() - t0)

    empty = engines()
    base = max(claims_per_second(empty) for _ in range(3))
    later = db_now(empty) + 86400
    for k in range(0, 10000, 2500):
        empty.enqueue([row(id="d%d" % i, state="SCHEDULED", eta=later + i) for i in range(k, k + 2500)])
        empty.enqueue([row(id="o%d" % i, queue="elsewhere") for i in range(k, k + 2500)])
    loaded = max(claims_per_second(empty) for _ in range(3))
    assert loaded >= 0.5 * base, "claims slowed from %.0f/s to %.0f/s with 20,000 rows waiting" % (base, loaded)


# -- priority across a cluster ------------------------------------------------------------

@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_a_journaled_higher_priority_starts_before_a_lower_one_that_waited(store, tmp_path, request):
    order = []
    gate = gevent.event.Event()

    @task(name="flow.block")
    def block():
        gate.wait(WAIT)

    @task(name="flow.note")
    def note(label):
        order.append(label)

    journal = str(tmp_path / "j.db") if store == "sqlite" else request.getfixturevalue("pg_dsn")
    greenqueue.configure(journal=journal, max_concurrency=1)
    try:
        blocker = block.spawn()
        wait_for(lambda: blocker.state == "STARTED", WAIT, message="the blocker to start")
        waiting = [note.apply_async(("low",), priority=-3), note.apply_async(("plain",)),
                   note.apply_async(("high",), priority=3)]
        gate.set()
        for r in [blocker] + waiting:
            r.get(WAIT)
        assert order == ["high", "plain", "low"]
    finally:
        runtime.get_runtime().close_store()
