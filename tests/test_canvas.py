"""Workflows: Celery's own canvas integration tests (t/integration/test_canvas.py), ported, on every store.

The calls and the expected values are Celery's; ``manager`` becomes the
``store`` fixture (memory, an SQLite journal, PostgreSQL), and tests that
need Celery's task replacement or a Redis backend are left out.
"""

import pytest

import greenqueue
from greenqueue import ChordError, GroupResult, chain, chord, errors, group

from .apps.canvas_tasks import ExpectedException, add, add_to_all, fail, identity, noted, tsum
from .conftest import wait_for
from .pg_support import pg, pg_dsn  # noqa: F401  (fixtures)

TIMEOUT = 20


@pytest.fixture(autouse=True)
def canvas(tmp_path, monkeypatch):
    """This module's tasks declared again (each test's reset forgets the registry), and their ledger."""
    monkeypatch.setenv("CANVAS_LEDGER", str(tmp_path / "ledger.txt"))
    from .apps import canvas_tasks
    for t in vars(canvas_tasks).values():
        if isinstance(t, greenqueue.tasks.Task):
            greenqueue.task(name=t.name)(t.fn)


def ledger(tmp_path):
    """The ledger's lines split into words."""
    path = tmp_path / "ledger.txt"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


# -- test_chain ---------------------------------------------------------------------------------

def test_simple_chain(store):
    c = add.s(4, 4) | add.s(8) | add.s(16)
    assert c().get(timeout=TIMEOUT) == 32


def test_single_chain(store):
    c = chain(add.s(3, 4))()
    assert c.get(timeout=TIMEOUT) == 7


def test_complex_chain(store):
    g = group(add.s(i) for i in range(4))
    c = (add.s(2, 2) | (add.s(4) | add.s(8) | add.s(16) | add.s(32)) | g)
    res = c()
    assert res.get(timeout=TIMEOUT) == [64, 65, 66, 67]


def test_chain_of_chain_with_a_single_task(store):
    res = chain([chain(identity.s(42))]).apply_async()
    assert res.get(timeout=TIMEOUT) == 42


def test_chain_on_error(store):
    c1 = chain(add.s(1, 2), fail.s(), add.s(3, 4))
    res = c1()
    with pytest.raises(ExpectedException):
        res.get(timeout=TIMEOUT)
    with pytest.raises(ExpectedException):
        res.parent.get(timeout=TIMEOUT)


def test_chain_inside_group_receives_arguments(store):
    c = (add.s(5, 6) | group((add.s(1) | add.s(2), add.s(3))))
    res = c()
    assert res.get(timeout=TIMEOUT) == [14, 14]


def test_chain_of_task_a_group_and_a_chord(store):
    c = add.si(1, 0)
    c = c | group(add.s(1), add.s(1))
    c = c | group(tsum.s(), tsum.s())
    c = c | tsum.s()
    res = c()
    assert res.get(timeout=TIMEOUT) == 8


def test_chain_of_chords_as_groups_chained_to_a_task_with_two_tasks(store):
    c = add.si(1, 0)
    c = c | group(add.s(1), add.s(1))
    c = c | tsum.s()
    c = c | add.s(1)
    c = c | group(add.s(1), add.s(1))
    c = c | tsum.s()
    res = c()
    assert res.get(timeout=TIMEOUT) == 12


def test_chain_of_chords_with_two_tasks(store):
    c = add.si(1, 0)
    c = c | group(add.s(1), add.s(1))
    c = c | tsum.s()
    c = c | add.s(1)
    c = c | chord(group(add.s(1), add.s(1)), tsum.s())
    res = c()
    assert res.get(timeout=TIMEOUT) == 12


def test_chain_of_explicit_chords(store):
    c1 = chain(
        chord(group(add.si(1, 0), add.si(1, 0)), tsum.s()),
        chord(group(add.s(1), add.s(1)), tsum.s()),
        chord(group(add.s(0), add.s(0)), tsum.s()),
    )
    c2 = chain(
        chord(group(add.s(10), add.s(10)), tsum.s()),
        chord(group(add.s(0), add.s(0)), tsum.s()),
        chord(group(add.s(1), add.s(1)), tsum.s()),
    )
    c = c1 | c2
    res = c()
    assert res.get(timeout=TIMEOUT) == 178


def test_group_in_center_of_chain(store):
    t1 = chain(tsum.s(), group(add.s(8), add.s(16)), tsum.s() | add.s(32))
    t2 = chord([tsum.s(), tsum.s()], t1)
    t3 = chord([add.s(0, 1)], t2)
    res = t3.apply_async()  # should not raise
    assert res.get(timeout=TIMEOUT) == 60


# -- test_chord ---------------------------------------------------------------------------------

def test_chord_order(store):
    inputs = [i for i in range(10)]
    c = chord((identity.si(i) for i in inputs), identity.s())
    result = c()
    assert result.get() == inputs


def test_group_chain(store):
    c = (add.s(2, 2) | group(add.s(i) for i in range(4)) | add_to_all.s(8))
    res = c()
    assert res.get(timeout=TIMEOUT) == [12, 13, 14, 15]


def test_group_kwargs(store):
    c = (add.s(2, 2) | group(add.s(i) for i in range(4)) | add_to_all.s(8))
    res = c.apply_async(kwargs={"z": 1})
    assert res.get(timeout=TIMEOUT) == [13, 14, 15, 16]


def test_nested_group_chain(store):
    c = chain(
        add.si(1, 0),
        group(add.si(1, 100), chain(add.si(1, 200), group(add.si(1, 1000), add.si(1, 2000)))),
        add.si(1, 10),
    )
    res = c()
    assert res.get(timeout=TIMEOUT) == 11


def test_single_task_header(store):
    c1 = chord([add.s(2, 5)], body=add_to_all.s(9))
    res1 = c1()
    assert res1.get(timeout=TIMEOUT) == [16]
    c2 = group([add.s(2, 5)]) | add_to_all.s(9)
    res2 = c2()
    assert res2.get(timeout=TIMEOUT) == [16]


def test_parallel_chords(store):
    c1 = chord(group(add.s(1, 2), add.s(3, 4)), tsum.s())
    c2 = chord(group(add.s(1, 2), add.s(3, 4)), tsum.s())
    g = group(c1, c2)
    r = g.delay()
    assert r.get(timeout=TIMEOUT) == [10, 10]


def test_chord_in_chords_with_chains(store):
    c = chord(
        group([
            chain(add.si(1, 2), chord(group([add.si(1, 2), add.si(1, 2)]), add.si(1, 2))),
            chain(add.si(1, 2), chord(group([add.si(1, 2), add.si(1, 2)]), add.si(1, 2))),
        ]),
        add.si(2, 2),
    )
    r = c.delay()
    assert r.get(timeout=TIMEOUT) == 4


def test_chain_chord_chain_chord(store):
    c = chain(
        identity.si(1),
        chord([identity.si(2), chain(identity.si(3), chord([identity.si(4), identity.si(5)], identity.si(6)))],
              identity.si(7)),
    )
    res = c.delay()
    assert res.get(timeout=TIMEOUT) == 7


def test_large_header(store):
    c = group(identity.si(i) for i in range(1000)) | tsum.s()
    res = c.delay()
    assert res.get(timeout=TIMEOUT) == 499500


def test_chain_to_a_chord_with_large_header(store):
    c = identity.si(1) | group(identity.s() for _ in range(1000)) | tsum.s()
    res = c.delay()
    assert res.get(timeout=TIMEOUT) == 1000


def test_error_propagates_from_chord(store):
    sig = add.s(1, 1) | fail.s() | group(add.s(1), add.s(1))
    res = sig.delay()
    with pytest.raises(ExpectedException):
        res.get(timeout=TIMEOUT)


# -- greenqueue's rules (DESIGN "Workflows") ----------------------------------------------------

def test_a_chords_body_never_runs_when_a_member_failed_and_says_which(store, tmp_path):
    c = chord([add.s(1, 1), fail.s(), add.s(2, 2)], noted.s("body"))()
    with pytest.raises(ChordError, match=r"fail\[[0-9a-f]{32}\]"):
        c.get(timeout=TIMEOUT)
    assert [line for line in ledger(tmp_path) if line[0] == "body"] == []


def test_links_run_once_with_the_result_or_the_failed_id(store, tmp_path):
    ok = add.apply_async((2, 3), link=noted.s("linked"), link_error=noted.si("errback"))
    assert ok.get(timeout=TIMEOUT) == 5
    bad = fail.apply_async((7,), link=noted.si("never"), link_error=noted.s("failed"))
    with pytest.raises(ExpectedException):
        bad.get(timeout=TIMEOUT)
    wait_for(lambda: len(ledger(tmp_path)) >= 2 or None, TIMEOUT, message="the callbacks")
    # The parent's result (or the failed task's id) comes first, before the callback's own arguments.
    lines = sorted(ledger(tmp_path))
    assert lines == sorted([[bad.id, "failed"], ["5", "linked"]]), lines


def test_group_and_chain_ids_are_found_before_and_after_they_run(store):
    g = group(add.s(i, i) for i in range(5)).delay()
    found = greenqueue.result(g.id)
    assert isinstance(found, GroupResult) and [r.id for r in found.results] == [r.id for r in g.results]
    assert found.get(timeout=TIMEOUT) == [0, 2, 4, 6, 8]
    c = chain(add.s(1, 1), add.s(1), add.s(1)).delay()
    assert greenqueue.result(c.id) is not None
    assert c.get(timeout=TIMEOUT) == 4 and greenqueue.result(c.id).get(TIMEOUT) == 4
    assert c.parent.get(TIMEOUT) == 3 and c.parent.parent.get(TIMEOUT) == 2


def test_a_step_with_a_countdown_waits_after_its_parent(store):
    import time
    t0 = time.monotonic()
    r = chain(add.s(1, 1), add.s(1).set(countdown=0.5, priority=10)).delay()
    assert r.get(timeout=TIMEOUT) == 3 and time.monotonic() - t0 >= 0.5


def test_bad_workflows_fail_at_build_time(store):
    with pytest.raises(errors.ConfigError, match="@task"):
        greenqueue.Signature(lambda: 1)
    with pytest.raises(errors.ConfigError, match="header"):
        chord([], tsum.s())
    sig = add.s(1, 1)
    sig.link(sig)
    with pytest.raises(errors.ConfigError, match="cycle"):
        sig.delay()
    with pytest.raises(errors.SerializationError):
        add.s(object(), 1)
    with pytest.raises(errors.ConfigError, match="unknown option"):
        add.s(1, 1).set(routing_key="x")


def test_cancelling_a_waiting_step_ends_it_and_the_steps_after_it(store):
    import gevent
    c = chain(noted.si("first") , add.si(1, 1).set(countdown=30), add.s(1)).delay()
    middle = c.parent
    wait_for(lambda: middle.parent.ready() or None, TIMEOUT, message="the first step")
    assert middle.cancel() or middle.state in ("CANCELLED",)
    with pytest.raises(errors.CancelledError):
        c.get(timeout=TIMEOUT)
    gevent.sleep(0)


def test_workflows_are_counted_as_they_start_and_end(store):
    from greenqueue import events
    seen = []
    unsubscribe = events.subscribe(seen.append, events.WorkflowStarted, events.WorkflowFinished)
    try:
        chord([add.s(1, 1), add.s(2, 2)], tsum.s()).delay().get(timeout=TIMEOUT)
        g = group(add.s(1, 1), fail.s()).delay()
        wait_for(g.ready, TIMEOUT, message="the group")
        wait_for(lambda: len(seen) >= 4 or None, TIMEOUT, message="the events")
    finally:
        unsubscribe()
    got = sorted((type(e).__name__, e.kind, getattr(e, "state", None), getattr(e, "steps", None)) for e in seen)
    assert got == [("WorkflowFinished", "chord", "SUCCESS", None), ("WorkflowFinished", "group", "FAILURE", None),
                   ("WorkflowStarted", "chord", None, 3), ("WorkflowStarted", "group", None, 2)]
