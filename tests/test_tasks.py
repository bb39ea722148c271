"""Tasks: @task, the spawn family, TaskResult, the runner's guarantees, events and eventlog.

Everything runs on a real gevent hub (the test's main greenlet blocks in
``get()``/``wait()``/``Event.wait()`` and the hub runs the task greenlets).
No sleeps are used to synchronise: tests wait on gevent Events, results and
joins; timing assertions are relative and generous.
"""

import datetime
import gc
import inspect
import logging
import subprocess
import sys
import time
import weakref

import gevent
import pytest
from gevent.event import Event

import greenqueue
from greenqueue import errors, events, eventlog, testing
from greenqueue import tasks
from greenqueue.tasks import (CANCELLED, FAILURE, PENDING, RETRY, SCHEDULED, STARTED, SUCCESS,
                              TaskResult, get_runner, spawn, spawn_at, spawn_idle, spawn_later, task)

from .conftest import ROOT, wait_for

WAIT = 10.0  # generous: the machine is shared with other test runs


@pytest.fixture
def recorded():
    """Every greenqueue event published during the test, in order."""
    seen = []
    unsubscribe = events.subscribe(seen.append)
    yield seen
    unsubscribe()


def kinds(seen, result=None):
    return [type(e).__name__ for e in seen if result is None or getattr(e, "result", None) is result]


# -- decorator, registry, plain call ------------------------------------------------


def test_plain_call_runs_inline_and_keeps_the_signature():
    @task
    def add(a: int, b: int = 2) -> int:
        """Add two numbers."""
        return a + b

    assert add(1) == 3
    assert add.__doc__ == "Add two numbers."
    assert add.__name__ == "add"
    assert inspect.signature(add) == inspect.signature(add.fn)
    assert add.name.endswith("test_plain_call_runs_inline_and_keeps_the_signature.<locals>.add")
    assert get_runner().running == 0  # nothing was spawned


def test_task_with_arguments_and_explicit_name():
    @task(retries=2, retry_delay=0.5, timeout=3, name="emails.send")
    def send(to):
        return "sent to %s" % to

    assert send.name == "emails.send"
    assert send.opts.retries == 2 and send.opts.timeout == 3
    assert tasks.get_task("emails.send") is send
    assert send.spawn("a@b").get(WAIT) == "sent to a@b"


def test_duplicate_names_raise_but_the_same_definition_is_tolerated():
    def one():
        return 1

    def two():
        return 2

    first = task(name="dup")(one)
    with pytest.raises(errors.ConfigError, match="dup"):
        task(name="dup")(two)
    again = task(name="dup")(one)  # same function object decorated again (module reload)
    assert tasks.get_task("dup") is again and first.fn is again.fn
    tasks.reset()
    assert "dup" not in tasks.registered()
    task(name="dup")(two)  # a reset registry accepts the name again


def test_configure_keeps_values_it_is_not_given_and_exposes_counters():
    runner = greenqueue.configure(max_concurrency=7, max_pending=11)
    greenqueue.configure(result_ttl=5)
    assert (runner.max_concurrency, runner.max_pending, runner.result_ttl) == (7, 11, 5.0)
    assert runner is get_runner()
    assert runner.stats() == {"running": 0, "pending": 0, "scheduled": 0, "results": 0,
                              "max_concurrency": 7, "max_pending": 11}


def test_invalid_task_options_are_config_errors():
    with pytest.raises(errors.ConfigError, match="retries"):
        task(retries=-1)
    with pytest.raises(errors.ConfigError, match="timeout"):
        task(timeout=0)
    with pytest.raises(errors.ConfigError, match="max_concurrency"):
        greenqueue.configure(max_concurrency=0)


# -- TaskResult ------------------------------------------------------------------------


def test_spawn_returns_a_pending_result_then_success():
    @task
    def double(x):
        return x * 2

    r = double.spawn(21)
    assert isinstance(r, TaskResult)
    assert r.state == PENDING and not r.ready()
    assert len(r.id) == 32 and int(r.id, 16) >= 0
    assert r.name == double.name
    assert r.get(WAIT) == 42
    assert r.state == SUCCESS and r.ready() and r.successful() and not r.failed()
    assert r.result == 42 and r.exception is None and r.traceback is None
    assert r.retries == 0 and r.eta is None
    assert r.started_at.tzinfo is not None and r.started_at <= r.finished_at
    assert greenqueue.result(r.id) is r
    assert greenqueue.result("0" * 32) is None


def test_delay_and_apply_async_are_spawn_aliases():
    @task
    def join(*args, **kwargs):
        return args, kwargs

    assert join.delay(1, a=2).get(WAIT) == ((1,), {"a": 2})
    assert join.apply_async(args=(3,), kwargs={"b": 4}).get(WAIT) == ((3,), {"b": 4})
    later = join.apply_async(args=(5,), countdown=0.01)
    assert later.state == SCHEDULED and later.eta is not None
    assert later.get(WAIT) == ((5,), {})
    at = join.apply_async(eta=datetime.datetime.now(datetime.timezone.utc))
    assert at.get(WAIT) == ((), {})


def test_get_raises_the_task_exception_with_its_traceback():
    @task
    def boom():
        raise KeyError("missing")

    r = boom.spawn()
    with pytest.raises(KeyError, match="missing"):
        r.get(WAIT)
    assert r.state == FAILURE and r.failed() and not r.successful()
    assert isinstance(r.exception, KeyError)
    assert "boom" in r.traceback and "KeyError" in r.traceback
    with pytest.raises(KeyError):
        r.get()  # a second get raises the same error again


def test_get_timeout_raises_task_timeout_without_touching_the_task():
    gate = Event()
    r = spawn(gate.wait)
    t0 = time.monotonic()
    with pytest.raises(errors.TaskTimeout):
        r.get(timeout=0.05)
    assert time.monotonic() - t0 < WAIT
    assert r.state == STARTED
    gate.set()
    assert r.get(WAIT) is True


# -- runner guarantees ---------------------------------------------------------------


def test_spawning_never_blocks_when_every_slot_is_busy():
    greenqueue.configure(max_concurrency=2)
    gate = Event()
    order = []

    def work(i):
        gate.wait()
        order.append(i)

    results = [spawn(work, i) for i in range(5)]
    wait_for(lambda: results[1].state == STARTED, message="two running")
    runner = get_runner()
    assert (runner.running, runner.pending) == (2, 3)
    assert [r.state for r in results] == [STARTED, STARTED, PENDING, PENDING, PENDING]
    extra = spawn(order.append, "extra")  # returns at once although no slot is free
    assert extra.state == PENDING and runner.pending == 4
    gate.set()
    for r in results + [extra]:
        r.get(WAIT)
    assert order == [0, 1, 2, 3, 4, "extra"]  # FIFO
    assert (runner.running, runner.pending, runner.slots_in_use) == (0, 0, 0)


def test_overloaded_past_max_pending():
    greenqueue.configure(max_concurrency=1, max_pending=2)
    gate = Event()
    running = spawn(gate.wait)
    waiting = [spawn(gate.wait), spawn(gate.wait)]
    with pytest.raises(errors.Overloaded):
        spawn(gate.wait)
    with pytest.raises(errors.GreenqueueError):  # users can catch the base class
        spawn_idle(gate.wait)
    waiting[0].cancel()
    spawn(gate.wait)  # cancelling freed a place
    gate.set()
    running.get(WAIT)
    assert tasks.drain(WAIT).complete


def test_task_waiting_on_task_never_deadlocks_with_one_slot():
    greenqueue.configure(max_concurrency=1)

    @task
    def leaf(x):
        return x + 1

    @task
    def chain(depth):
        if depth == 0:
            return leaf.spawn(0).get(WAIT)
        return chain.spawn(depth - 1).get(WAIT) + 1

    assert chain.spawn(5).get(WAIT) == 6
    runner = get_runner()
    assert runner.slots_in_use == 0 and runner.running == 0


def test_waiting_task_gets_its_slot_back_without_starving():
    greenqueue.configure(max_concurrency=1)
    gate = Event()
    blocker_started = Event()

    def blocker():
        blocker_started.set()
        gate.wait()
        return "b"

    def waiter():
        inner = spawn(blocker)
        return inner.get(WAIT)

    w = spawn(waiter)
    blocker_started.wait(WAIT)
    assert get_runner().running == 2  # the waiter lent its slot to the blocker
    gate.set()
    assert w.get(WAIT) == "b"
    assert get_runner().slots_in_use == 0


def test_retries_with_delay_and_exponential_backoff(recorded):
    attempts = []
    states_while_retrying = []

    @task(retries=3, retry_delay=0.02, retry_backoff=3.0)
    def flaky():
        attempts.append(time.monotonic())
        if len(attempts) < 4:
            raise ValueError("attempt %d" % len(attempts))
        return "ok"

    events.subscribe(lambda e: states_while_retrying.append(e.result.state), events.TaskRetrying)
    r = flaky.spawn()
    assert r.get(WAIT) == "ok"
    assert r.retries == 3 and r.state == SUCCESS
    assert states_while_retrying == [RETRY] * 3
    delays = [e.delay for e in recorded if isinstance(e, events.TaskRetrying)]
    assert delays == pytest.approx([0.02, 0.06, 0.18])
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    for gap, delay in zip(gaps, delays):
        assert gap >= delay * 0.8  # timers may fire a hair early on the cached loop time
    assert kinds(recorded, r) == ["TaskSpawned"] + ["TaskStarted", "TaskRetrying"] * 3 + [
        "TaskStarted", "TaskSucceeded"]


def test_retry_jitter_stays_within_bounds(recorded):
    @task(retries=3, retry_delay=0.01, retry_jitter=0.02)
    def always_fails():
        raise RuntimeError("no")

    r = always_fails.spawn()
    with pytest.raises(RuntimeError):
        r.get(WAIT)
    delays = [e.delay for e in recorded if isinstance(e, events.TaskRetrying)]
    assert len(delays) == 3 and all(0.01 <= d <= 0.03 for d in delays)
    assert r.state == FAILURE and r.retries == 3
    assert kinds(recorded, r)[-1] == "TaskFailed"


def test_retry_state_is_visible_between_attempts():
    @task(retries=1, retry_delay=60)
    def fails_once():
        raise ValueError("first")

    r = fails_once.spawn()
    wait_for(lambda: r.state == RETRY, message="RETRY state")
    assert get_runner().scheduled == 1 and r.retries == 1 and not r.ready()
    assert r.cancel()
    assert r.state == CANCELLED and get_runner().scheduled == 0


def test_timeout_kills_the_greenlet_and_wakes_waiters(recorded):
    cleaned_up = Event()

    @task(timeout=0.05)
    def slow():
        try:
            gevent.sleep(WAIT * 10)
        finally:
            cleaned_up.set()

    r = slow.spawn()
    with pytest.raises(errors.TaskTimeout, match="timed out"):
        r.get(WAIT)
    assert cleaned_up.is_set()
    assert r.state == FAILURE and isinstance(r.exception, errors.TaskTimeout)
    assert kinds(recorded, r)[-1] == "TaskFailed"
    assert get_runner().running == 0


def test_timeout_that_the_task_swallows_still_fails():
    @task(timeout=0.02)
    def stubborn():
        try:
            gevent.sleep(WAIT * 10)
        except BaseException:
            pass  # the task swallows everything
        return "ignored"

    r = stubborn.spawn()
    with pytest.raises(errors.TaskTimeout):
        r.get(WAIT)


def test_timeout_counts_as_a_failed_attempt_for_retries():
    calls = []

    @task(timeout=0.02, retries=1)
    def sometimes_slow():
        calls.append(1)
        if len(calls) == 1:
            gevent.sleep(WAIT * 10)
        return len(calls)

    assert sometimes_slow.spawn().get(WAIT) == 2


@pytest.mark.parametrize("raised, expected_state, expected_error", [
    (gevent.Timeout, FAILURE, errors.TaskTimeout),
    (gevent.GreenletExit, CANCELLED, errors.CancelledError),
])
def test_base_exceptions_raised_by_a_task_still_give_a_result(raised, expected_state, expected_error):

    def bad():
        raise raised()

    r = spawn(bad)
    with pytest.raises(expected_error) as info:
        r.get(WAIT)
    assert isinstance(info.value, errors.GreenqueueError)
    assert not isinstance(r.exception, (gevent.Timeout, gevent.GreenletExit))
    assert r.state == expected_state


def test_killing_a_task_greenlet_from_outside_gives_cancelled():
    started = Event()
    greenlets = []
    r = spawn(lambda: (greenlets.append(gevent.getcurrent()), started.set(), gevent.sleep(WAIT * 10)))
    started.wait(WAIT)
    greenlets[0].kill()
    with pytest.raises(errors.CancelledError):
        r.get(WAIT)
    assert r.state == CANCELLED


def test_cancel_pending_task_prevents_it_from_running(recorded):
    greenqueue.configure(max_concurrency=1)
    gate = Event()
    ran = []
    first = spawn(gate.wait)
    victim = spawn(ran.append, "victim")
    after = spawn(ran.append, "after")
    assert victim.cancel() is True
    assert victim.state == CANCELLED and victim.ready() and victim.failed()
    with pytest.raises(errors.CancelledError):
        victim.get(WAIT)
    assert get_runner().pending == 1
    gate.set()
    after.get(WAIT)
    first.get(WAIT)
    assert ran == ["after"]
    assert victim.cancel() is False  # already final
    assert kinds(recorded, victim) == ["TaskSpawned", "TaskCancelled"]


def test_cancel_scheduled_task_prevents_it_from_running():
    ran = []
    victim = spawn_later(0.01, ran.append, "victim")
    sentinel = spawn_later(0.03, ran.append, "sentinel")
    assert get_runner().scheduled == 2
    assert victim.cancel()
    assert get_runner().scheduled == 1
    sentinel.get(WAIT)
    assert ran == ["sentinel"] and victim.state == CANCELLED


def test_cancel_running_task_kills_its_greenlet(recorded):
    started, cleaned_up = Event(), Event()

    def long():
        started.set()
        try:
            gevent.sleep(WAIT * 10)
        finally:
            cleaned_up.set()

    r = spawn(long)
    started.wait(WAIT)
    assert r.state == STARTED
    assert r.cancel() is True
    assert r.state == CANCELLED
    assert cleaned_up.wait(WAIT)
    with pytest.raises(errors.CancelledError):
        r.get(WAIT)
    wait_for(lambda: get_runner().running == 0, message="greenlet gone")
    assert get_runner().slots_in_use == 0
    assert kinds(recorded, r) == ["TaskSpawned", "TaskStarted", "TaskCancelled"]


def test_cancel_task_blocked_in_get_releases_everything():
    greenqueue.configure(max_concurrency=1)
    gate = Event()
    inner_holder = []

    def outer():
        inner = spawn(gate.wait)
        inner_holder.append(inner)
        return inner.get()

    r = spawn(outer)
    wait_for(lambda: inner_holder and inner_holder[0].state == STARTED, message="inner started")
    r.cancel()
    gate.set()
    inner_holder[0].get(WAIT)
    wait_for(lambda: get_runner().running == 0, message="all finished")
    assert get_runner().slots_in_use == 0


def test_idle_tasks_run_after_normal_tasks_and_only_when_the_hub_is_idle():
    order = []
    busy_steps = {"n": 0}

    def busy():
        for _ in range(100):
            busy_steps["n"] += 1
            gevent.sleep(0)  # keeps the hub busy with callbacks

    idle = spawn_idle(lambda: (order.append("idle"), busy_steps["n"])[1])
    busy_greenlet = gevent.spawn(busy)
    normal = [spawn(order.append, i) for i in range(3)]
    assert idle.get(WAIT) == 100  # it waited until the busy greenlet was done
    busy_greenlet.join(WAIT)
    assert order == [0, 1, 2, "idle"]
    assert all(r.successful() for r in normal)


def test_idle_task_waits_for_a_free_slot_and_for_pending_tasks():
    greenqueue.configure(max_concurrency=1)
    gate = Event()
    order = []
    blocker = spawn(gate.wait)
    idle = spawn_idle(order.append, "idle")
    normal = spawn(order.append, "normal")
    assert get_runner().pending == 2
    gevent.sleep(0)  # give the hub a turn: the idle task still may not start
    assert idle.state == PENDING
    gate.set()
    idle.get(WAIT)
    blocker.get(WAIT)
    assert normal.successful() and order == ["normal", "idle"]


# -- delayed tasks -----------------------------------------------------------------------


def test_spawn_later_runs_in_due_order():
    order = []
    results = [spawn_later(delay, order.append, delay) for delay in (0.04, 0.01, 0.03, 0.02)]
    assert all(r.state == SCHEDULED for r in results)
    assert all(r.eta.tzinfo is not None for r in results)
    for r in results:
        r.get(WAIT)
    assert order == [0.01, 0.02, 0.03, 0.04]


def test_spawn_later_waits_at_least_its_delay():
    t0 = time.monotonic()
    r = spawn_later(0.05, time.monotonic)
    assert r.get(WAIT) - t0 >= 0.05 * 0.8


def test_spawn_at_accepts_aware_naive_and_past_datetimes():
    now = datetime.datetime.now(datetime.timezone.utc)
    aware = spawn_at(now + datetime.timedelta(seconds=0.02), lambda: "aware")
    naive = spawn_at((now + datetime.timedelta(seconds=0.02)).replace(tzinfo=None), lambda: "naive")
    past = spawn_at(now - datetime.timedelta(days=1), lambda: "past")
    assert aware.state == SCHEDULED and naive.state == SCHEDULED
    assert naive.eta.tzinfo is datetime.timezone.utc
    assert past.state in (PENDING, STARTED, SUCCESS)
    assert [r.get(WAIT) for r in (aware, naive, past)] == ["aware", "naive", "past"]


def test_spawn_later_decorator_form_schedules_each_call():
    seen = []

    @spawn_later(0.01)
    def reminder(user_id):
        """Remind a user."""
        seen.append(user_id)
        return user_id

    assert reminder.__name__ == "reminder" and reminder.__doc__ == "Remind a user."
    r = reminder(7)
    assert isinstance(r, TaskResult) and r.state == SCHEDULED and seen == []
    assert r.get(WAIT) == 7 and seen == [7]


def test_many_delayed_tasks_share_one_timer_greenlet():
    import gc
    # type(), not isinstance(): a lazy proxy in the heap (Django's, when its tests ran in this
    # process) would evaluate itself to answer isinstance's __class__ lookup.
    before = sum(1 for o in gc.get_objects() if issubclass(type(o), gevent.Greenlet))
    t0 = time.monotonic()
    far = [spawn_later(3600, lambda: None) for _ in range(20000)]
    spawn_time = time.monotonic() - t0
    soon = spawn_later(0.01, lambda: "soon")
    after = sum(1 for o in gc.get_objects() if issubclass(type(o), gevent.Greenlet))
    assert after - before <= 2  # the timer greenlet (and maybe one task), not 20,000
    assert get_runner().scheduled == 20001
    assert soon.get(WAIT) == "soon"
    assert spawn_time < WAIT
    for r in far[:10000]:
        r.cancel()
    assert get_runner().scheduled == 10000
    report = tasks.drain(WAIT)
    assert report.scheduled == 10000 and report.complete


# -- Flask context --------------------------------------------------------------------------


def test_task_spawned_in_a_request_runs_in_the_app_context_without_the_request():
    from tests.apps.task_app import app, read_context
    with app.test_request_context("/anything"):
        r = read_context.spawn()
    assert r.get(WAIT) == {"app": "tests.apps.task_app", "greeting": "hello from config",
                           "has_request": False}


def test_task_spawned_from_a_view_through_the_test_client():
    from tests.apps.task_app import app
    client = app.test_client()
    task_id = client.get("/spawn").get_json()["id"]
    greenqueue.result(task_id).get(WAIT)
    body = client.get("/result/%s" % task_id).get_json()
    assert body == {"state": SUCCESS, "value": {"app": "tests.apps.task_app",
                                                "greeting": "hello from config",
                                                "has_request": False}}


def test_task_spawned_in_a_plain_app_context_and_outside_any():
    import flask
    from tests.apps.task_app import app, read_context
    with app.app_context():
        inside = read_context.spawn()
    outside = read_context.spawn()
    assert inside.get(WAIT)["greeting"] == "hello from config"
    with pytest.raises(RuntimeError, match="application context"):
        outside.get(WAIT)
    assert not flask.has_app_context()


def test_tasks_do_not_import_flask():
    code = ("import sys, greenqueue\n"
            "r = greenqueue.spawn(lambda: 1); assert r.get(5) == 1\n"
            "assert 'flask' not in sys.modules, 'flask imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# -- results store, drain, counters --------------------------------------------------------


def test_results_are_bounded_by_max_results():
    greenqueue.configure(max_results=3)
    results = [spawn(lambda i=i: i) for i in range(6)]
    for r in results:
        r.get(WAIT)
    assert [greenqueue.result(r.id) for r in results[:3]] == [None] * 3
    assert [greenqueue.result(r.id) for r in results[3:]] == results[3:]
    assert results[0].get() == 0  # a handle the caller kept still works


def test_results_expire_after_result_ttl():
    greenqueue.configure(result_ttl=0.02)
    r = spawn(lambda: "x")
    r.get(WAIT)
    wait_for(lambda: greenqueue.result(r.id) is None, message="result expired")
    fresh = spawn(lambda: "y")
    fresh.get(WAIT)
    # Inserting a new result also prunes expired ones, so memory stays bounded.
    assert r.id not in [kept.id for kept in get_runner().snapshot(100)["recent"]]


def test_finished_results_drop_their_arguments():
    class Payload(bytearray):
        pass

    payload = Payload(1000)
    gone = weakref.ref(payload)

    def size(data):
        return len(data)

    r = spawn(size, payload)
    del payload
    assert r.get(WAIT) == 1000
    gc.collect()
    assert gone() is None, "a finished result still holds its arguments"


def test_drain_reports_finished_running_and_delayed():
    greenqueue.configure(max_concurrency=1)
    gate = Event()
    spawn(gate.wait)
    spawn(gate.wait)
    spawn_later(3600, lambda: None)
    report = tasks.drain(0.05)
    assert (report.finished, report.running, report.pending, report.scheduled) == (0, 1, 1, 1)
    assert not report.complete and "1 still running" in str(report)
    gate.set()
    report = tasks.drain(WAIT)
    assert (report.finished, report.running, report.pending, report.scheduled) == (2, 0, 0, 1)
    assert report.complete
    assert get_runner().stats()["scheduled"] == 1


def test_reset_kills_the_old_runners_tasks():
    started, cleaned_up = Event(), Event()

    def long():
        started.set()
        try:
            gevent.sleep(WAIT * 10)
        finally:
            cleaned_up.set()

    old_runner = get_runner()
    r = spawn(long)
    delayed = spawn_later(3600, lambda: None)
    started.wait(WAIT)
    tasks.reset()
    assert cleaned_up.is_set()
    assert r.state == CANCELLED and delayed.state == CANCELLED
    assert get_runner() is not old_runner
    with pytest.raises(errors.GreenqueueError):
        old_runner.spawn(lambda: None)


# -- events and eventlog ----------------------------------------------------------------------


def test_events_for_success_failure_and_retry(recorded):
    ok = spawn(lambda: 1)
    ok.get(WAIT)
    bad = spawn(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bad.get(WAIT)
    assert kinds(recorded, ok) == ["TaskSpawned", "TaskStarted", "TaskSucceeded"]
    assert kinds(recorded, bad) == ["TaskSpawned", "TaskStarted", "TaskFailed"]
    failed = [e for e in recorded if isinstance(e, events.TaskFailed)][0]
    assert isinstance(failed.exception, ZeroDivisionError) and failed.duration >= 0
    assert all(e.timestamp > 0 for e in recorded)


def test_eventlog_logs_one_line_per_event(caplog):
    caplog.set_level(logging.DEBUG, logger="greenqueue.eventlog")
    eventlog.install()
    eventlog.install()  # idempotent
    try:
        spawn(lambda: 1).get(WAIT)
        with pytest.raises(ValueError):
            spawn(_raise_value_error).get(WAIT)
        job = type("Job", (), {"name": "digest"})()
        pool = type("Pool", (), {"name": "chat"})()
        for event in (events.JobFired(job), events.JobSkipped(job, reason="max_instances"),
                      events.JobMissed(job, late_by=2.5), events.WorkerStarted(pool, pid=42),
                      events.WorkerExited(pool, pid=42, exitcode=-9, reason="crashed"),
                      events.ServerStarting(("127.0.0.1:8000",), "app:app"),
                      events.ServerStopping("SIGTERM")):
            events.notify(event)
    finally:
        eventlog.uninstall()
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "greenqueue.eventlog"]
    assert len(lines) == 6 + 7
    text = "\n".join(lines)
    for needle in ("spawned", "started (attempt 1)", "succeeded in", "failed in",
                   "ValueError: bad value", "job digest fired", "max_instances",
                   "missed 1 run(s), late by 2.500s", "pid 42", "crashed (exit code -9)",
                   "127.0.0.1:8000", "stopping: SIGTERM"):
        assert needle in text
    crashed = [rec for rec in caplog.records if "crashed" in rec.getMessage()][0]
    assert crashed.levelno == logging.WARNING
    caplog.clear()
    spawn(lambda: 1).get(WAIT)
    assert not eventlog.installed() and not caplog.records


def _raise_value_error():
    raise ValueError("bad value")


def test_a_broken_listener_does_not_break_tasks(caplog):
    unsubscribe = events.subscribe(lambda e: 1 / 0, events.TaskStarted)
    try:
        assert spawn(lambda: "fine").get(WAIT) == "fine"
    finally:
        unsubscribe()
    assert "listener" in caplog.text


# -- eager mode, helpers, batches ----------------------------------------------------------------


def test_eager_runs_inline_and_propagates_exceptions():
    calls = []

    @task(retries=1)
    def flaky(x):
        calls.append(x)
        if len(calls) == 1:
            raise ValueError("first")
        return x

    @task
    def broken():
        raise KeyError("eager")

    with testing.eager():
        r = flaky.spawn_later(3600, 5)
        assert r.state == SUCCESS and r.result == 5 and r.retries == 1
        with pytest.raises(KeyError):
            broken.spawn()
    assert not get_runner().eager
    assert flaky.spawn(6).state == PENDING


def test_configure_eager_and_wait_for_tasks():
    greenqueue.configure(eager=True)
    assert spawn(lambda: 3).result == 3
    greenqueue.configure(eager=False)
    gate = Event()
    spawn(gate.wait)
    with pytest.raises(errors.TaskTimeout):
        testing.wait_for_tasks(0.02)
    gate.set()
    assert testing.wait_for_tasks(WAIT).finished == 1


def test_cooperate_yields_to_other_greenlets():
    seen = []
    g = gevent.spawn(seen.append, "other")
    greenqueue.cooperate()
    assert seen == ["other"]
    g.join()


def test_run_in_thread_returns_the_value_and_raises_errors():
    import threading
    main = threading.get_ident()
    assert greenqueue.run_in_thread(threading.get_ident) != main
    assert greenqueue.run_in_thread(lambda a, b=0: a + b, 1, b=2) == 3
    with pytest.raises(ZeroDivisionError):
        greenqueue.run_in_thread(lambda: 1 / 0)


def test_batch_by_size_calls_the_function_once_with_a_list():
    calls = []

    @task(batch_size=3)
    def index(docs):
        calls.append(list(docs))
        return len(docs)

    results = [index.spawn(d) for d in "abc"]
    assert [r.get(WAIT) for r in results] == [3, 3, 3]
    assert calls == [["a", "b", "c"]]
    assert all(r.state == SUCCESS and r.started_at is not None for r in results)
    with pytest.raises(TypeError):
        index.spawn("a", "b")


def test_batch_by_interval_and_failures_reach_every_item():
    calls = []

    @task(batch_size=100, batch_interval=0.02)
    def index(docs):
        calls.append(list(docs))
        raise RuntimeError("index down")

    results = [index.spawn(d) for d in (1, 2)]
    for r in results:
        with pytest.raises(RuntimeError, match="index down"):
            r.get(WAIT)
    assert calls == [[1, 2]]
    assert all(r.state == FAILURE and "index down" in r.traceback for r in results)


def test_batch_drain_flushes_and_cancelled_items_are_left_out():
    calls = []

    @task(batch_size=10)
    def index(docs):
        calls.append(list(docs))

    a, b = index.spawn("a"), index.spawn("b")
    b.cancel()
    assert tasks.drain(WAIT).complete
    assert calls == [["a"]] and a.successful() and b.state == CANCELLED


def test_a_failed_tasks_traceback_starts_at_the_tasks_own_code():
    def parse_header(row):
        raise ValueError("no header in %r" % (row,))

    r = spawn(parse_header, "x,y")
    with pytest.raises(ValueError):
        r.get(WAIT)
    frames = [line for line in r.traceback.splitlines() if line.startswith('  File "')]
    assert "in parse_header" in frames[0], r.traceback
    assert not any(f.split('"')[1].startswith(str(ROOT / "greenqueue")) for f in frames), r.traceback


def test_an_unknown_task_option_is_a_config_error_naming_it():
    with pytest.raises(errors.ConfigError, match=r"unknown option\(s\) acks_late .*known: retries") as info:
        greenqueue.task(acks_late=True)
    assert isinstance(info.value, TypeError)  # what Python's own call errors are, as before


def test_async_result_is_a_class_every_task_result_belongs_to():
    r = spawn(lambda: 7)
    assert isinstance(r, greenqueue.AsyncResult) and greenqueue.AsyncResult(r.id) is r
    assert r.get(WAIT) == 7
    unknown = greenqueue.AsyncResult("0" * 32)
    assert isinstance(unknown, greenqueue.TaskResult) and unknown.state == PENDING and not unknown.ready()
    assert greenqueue.result("0" * 32) is None  # still the way to ask whether such a task exists
