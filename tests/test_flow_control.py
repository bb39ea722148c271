"""Flow control: priorities and the claim at scale, as DESIGN "Flow control" says, on every store."""

import sqlite3
import time
from contextlib import closing

import gevent
import gevent.event
import gevent.lock
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
        # Only the claims are timed: an insert into a larger table costs more, and that is not the
        # claim's business (timing both made this test fail about one run in eight).
        stamp = time.perf_counter()
        e.enqueue([row(id="t%d-%f" % (i, stamp)) for i in range(n)])
        t0 = time.perf_counter()
        for i in range(n):
            assert len(e.claim("A", ["default"], 1)) == 1
        return n / (time.perf_counter() - t0)

    empty = engines()
    base = max(claims_per_second(empty) for _ in range(3))
    later = db_now(empty) + 86400
    for k in range(0, 10000, 2500):
        empty.enqueue([row(id="d%d" % i, state="SCHEDULED", eta=later + i) for i in range(k, k + 2500)])
        empty.enqueue([row(id="o%d" % i, queue="elsewhere") for i in range(k, k + 2500)])
    if engines.kind == "sqlite":
        # The fill's own pages leave the WAL now, not in the middle of the claims being timed.
        engines.raw("PRAGMA wal_checkpoint(TRUNCATE)")
    else:
        # As autoanalyze would within its naptime: the prepared claim's generic plan was made
        # while the table held a few rows (an UPDATE by id through a sequential scan), and
        # PostgreSQL re-plans it once the table's statistics change (docs/journal.md).
        engines.raw("ANALYZE greenqueue_tasks")
    loaded = max(claims_per_second(empty) for _ in range(5))
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


# -- rate and concurrency limits in the stores' claim ---------------------------------------

def _limited(id, limit=None, rate=None, **kw):
    """A row with a concurrency limit ``(bucket, n)`` and/or a rate limit ``(bucket, n, per)``."""
    r = row(id=id, **kw)
    if limit is not None:
        r.limit_bucket, r.limit_n = limit
    if rate is not None:
        r.rate_bucket, r.rate_n, r.rate_per = rate
    return r


def _finish(e, r, node="A"):
    """finish() of ``r`` as ``node`` holds it, saying which concurrency key the run held."""
    return e.finish_many([(r.id, node, r.attempts, "SUCCESS", b"1", None, None, None, 60, r.limit_bucket)])


def test_a_concurrency_limit_parks_what_is_over_it_and_each_end_gives_the_next_its_turn(engines):
    e = engines()
    e.enqueue([_limited("k%d" % i, limit=("t|k", 2)) for i in range(5)] + [row(id="free")])
    first = e.claim("A", None, 10)
    assert sorted(r.id for r in first) == ["free", "k0", "k1"]
    assert [e.get("k%d" % i).hold for i in (2, 3, 4)] == ["limit"] * 3, "parked, out of every claim's way"
    assert e.claim("B", None, 10) == [] and e.next_due(None) is None
    assert _finish(e, next(r for r in first if r.id == "k0")) == [True]
    assert e.get("k2").hold == "gate" and e.next_due(None) == 0
    assert [r.id for r in e.claim("B", None, 10)] == ["k2"]
    assert e.claim("B", None, 10) == []


def test_keys_are_counted_apart(engines):
    e = engines()
    e.enqueue([_limited("%s%d" % (key, i), limit=("t|%s" % key, 1)) for key in "ab" for i in range(3)])
    assert sorted(r.id for r in e.claim("A", None, 10)) == ["a0", "b0"]


def test_a_rate_limit_holds_what_is_over_it_until_the_window_has_room(engines):
    e = engines()
    e.enqueue([_limited("r%d" % i, rate=("t", 2, 1.0)) for i in range(5)])
    t0 = db_now(e)
    assert sorted(r.id for r in e.claim("A", None, 10)) == ["r0", "r1"]
    held = [e.get("r%d" % i) for i in (2, 3, 4)]
    assert all(r.hold == "rate" for r in held)
    assert 0.5 < e.next_due(None) <= 1.1, "the node knows when the window opens: no polling"
    starts = {}
    deadline = time.monotonic() + 10
    while len(starts) < 3 and time.monotonic() < deadline:
        for r in e.claim("A", None, 10):
            starts[r.id] = r.started_at
        gevent.sleep(min(0.05, e.next_due(None) or 0.05))
    assert len(starts) == 3
    times = sorted(starts.values())
    # Windows are kept a tenth longer (the lag from a claim to the task's first line).
    assert times[0] >= t0 + 1.0 and times[1] < t0 + 1.6, "the next two start when the window opens"
    assert times[2] >= t0 + 2.0, "never more than 2 starts in any 1 s window"


def test_the_gate_keeps_the_start_order_across_limited_and_plain_rows(engines):
    e = engines()
    e.enqueue([row(id="plain"), _limited("urgent", limit=("u", 5), priority=9)])
    assert [r.id for r in e.claim("A", None, 1)] == ["urgent"]
    assert [r.id for r in e.claim("A", None, 1)] == ["plain"]


def test_a_dead_nodes_share_of_a_concurrency_limit_ends_with_its_lease(engines):
    a = engines(lease_timeout=1)
    a.enqueue([_limited("k%d" % i, limit=("t|k", 1)) for i in range(3)])
    assert [r.id for r in a.claim("A", None, 5)] == ["k0"]
    # Node A dies: no heartbeat, no finish. Its lease ends, the reaper gives its run back and
    # the next parked run (in start order) its turn.
    reaped = wait_for(lambda: a.reap(5) or None, 10, interval=0.1, message="the dead node's run")
    assert [r.id for r in reaped] == ["k0"]
    assert [r.id for r in a.claim("B", None, 5)] == ["k0"]
    assert a.claim("B", None, 5) == []


# -- limits as a task declares them, on every store -----------------------------------------

def test_a_concurrency_limit_is_never_exceeded_and_is_reached(store):
    running, peak, lock = set(), [], gevent.lock.Semaphore()

    @task(name="flow.limited_%s" % store, concurrency_limit=2)
    def limited(n):
        with lock:
            running.add(n)
            peak.append(len(running))
        gevent.sleep(0.05)
        running.discard(n)

    for r in [limited.spawn(i) for i in range(8)]:
        r.get(WAIT)
    assert max(peak) == 2, peak


def test_a_per_key_concurrency_limit_is_a_lock_per_key(store):
    active, overlaps = {}, []

    @task(name="flow.per_key_%s" % store, concurrency_limit=1, concurrency_key=lambda user, n: user)
    def per_user(user, n):
        if active.get(user):
            overlaps.append(user)
        active[user] = True
        gevent.sleep(0.03)
        active[user] = False
        return user

    results = [per_user.spawn(user, n) for n in range(4) for user in ("ann", "bob")]
    assert sorted(r.get(WAIT) for r in results) == ["ann"] * 4 + ["bob"] * 4
    assert overlaps == []


def test_a_rate_limit_spaces_the_starts(store):
    starts = []

    @task(name="flow.rated_%s" % store, rate_limit="4/s")
    def rated(n):
        starts.append(time.monotonic())

    t0 = time.monotonic()
    for r in [rated.spawn(i) for i in range(9)]:
        r.get(WAIT)
    starts.sort()
    assert all(b - a >= 1.0 - 0.06 for a, b in zip(starts, starts[4:])), "at most 4 starts in any 1 s window"
    assert starts[-1] - t0 < 3.5, "and starts as soon as the window allows"


@pytest.mark.parametrize("kwargs, named", [
    ({"rate_limit": "ten a minute"}, "rate_limit"), ({"rate_limit": "0/s"}, "rate_limit"),
    ({"concurrency_limit": 0}, "concurrency_limit"), ({"concurrency_limit": 1.5}, "concurrency_limit"),
    ({"rate_key": lambda: 1}, "rate_key needs rate_limit"), ({"concurrency_limit": 1, "concurrency_key": "user"},
                                                              "concurrency_key")])
def test_bad_limits_fail_at_declaration_naming_the_argument(kwargs, named):
    with pytest.raises(errors.ConfigError, match=named):
        task(**kwargs)


def test_a_key_function_that_raises_fails_the_spawn_naming_it():
    def customer_of(order):
        return order["customer"]

    @task(rate_limit="5/m", rate_key=customer_of)
    def ship(order):
        return order

    with pytest.raises(errors.ConfigError, match="rate_key.*customer_of.*KeyError"):
        ship.spawn({})


def test_a_rate_backlog_gets_its_turns_reserved_not_one_wake_per_window(engines):
    """50 rows under "10/s": 10 start, the other 40 are each held until a start reserved for them."""
    e = engines()
    e.enqueue([_limited("r%02d" % i, rate=("t", 10, 1.0)) for i in range(50)])
    started = []
    for _ in range(10):  # a node's claim rounds: each looks at up to its free slots' worth of rows
        started += e.claim("A", None, 20)
    assert len(started) == 10
    turns = sorted(r[0] for r in engines.raw("SELECT due FROM greenqueue_tasks WHERE owner IS NULL AND hold = 'rate'"))
    assert len(turns) == 40
    # Ten turns per window, each window a period (and the margin) after the one before: every
    # row wakes once, at its turn, instead of all forty at every window.
    assert all(b - a >= 1.0 for a, b in zip(turns, turns[10:])), turns
    assert turns[-1] - turns[0] < 4.0
