"""Scheduler rules with a fake clock, plus one real-time run inside the server."""

import datetime
import random
import subprocess
import sys
from zoneinfo import ZoneInfo

import gevent
import pytest
import requests
from gevent.event import Event

from greenqueue import crontab, events, every, periodic, tasks
from greenqueue.errors import ConfigError
from greenqueue.scheduler import Job, Scheduler, get_scheduler

from .conftest import ROOT, wait_for

UTC = datetime.timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args):
    return datetime.datetime(*args, tzinfo=UTC)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now):
        self.t = now

    def now(self):
        return self.t


@pytest.fixture
def recorded():
    seen = []
    unsubscribe = events.subscribe(seen.append, events.JobFired, events.JobSkipped, events.JobMissed)
    yield seen
    unsubscribe()


def make(fn=None, schedule=None, **kw):
    fn = fn or (lambda: None)
    fn.__qualname__ = kw.pop("qualname", "job%d" % random.randrange(10 ** 9))
    return Job(fn, schedule, **kw)


def fire_times(job, start, end, step=datetime.timedelta(minutes=1)):
    """Due times the scheduler fires between ``start`` and ``end`` ticking every ``step``."""
    s = Scheduler(clock=FakeClock(start))
    s.add(job)
    fired = []
    unsubscribe = events.subscribe(lambda e: fired.append(e.scheduled_for), events.JobFired)
    now = start
    s.tick(now)
    while now < end:
        now += step
        s.tick(now)
        for r in job.running:
            r.wait(1)
    unsubscribe()
    return fired


@pytest.mark.parametrize("expr, now, expected", [
    ("3 17 * * sun", datetime.datetime(2026, 11, 24, 12, tzinfo=BERLIN), datetime.datetime(2026, 11, 29, 17, 3, tzinfo=BERLIN)),
    ("*/15 * * * *", utc(2026, 1, 1, 10, 7), utc(2026, 1, 1, 10, 15)),
    ("30 * * * * *", utc(2026, 1, 1, 10, 7, 10), utc(2026, 1, 1, 10, 7, 30)),
    ("0 0 L * *", utc(2026, 2, 3), utc(2026, 2, 28)),
    ("0 9 * * mon#2", utc(2026, 12, 1), utc(2026, 12, 14, 9)),
    ("0 12 1 jan *", utc(2026, 6, 1), utc(2027, 1, 1, 12)),
    ("0 8-10/2 * * mon-fri", utc(2026, 11, 28, 9), utc(2026, 11, 30, 8)),
])
def test_crontab_next_times(expr, now, expected):
    tz = now.tzinfo if now.tzinfo is not UTC else UTC
    assert crontab(expr).next_after(now, tz) == expected.astimezone(UTC)


def test_huey_keyword_form_matches_the_string_form():
    assert str(crontab(minute="3", hour="17", day_of_week="0")) == "3 17 * * 0"
    assert str(crontab(second="*/10")) == "*/10 * * * * *"


@pytest.mark.parametrize("expr, field, value", [
    ("61 * * * *", "minute", "61"),
    ("* 25 * * *", "hour", "25"),
    ("* * 32 * *", "day", "32"),
    ("* * * 13 *", "month", "13"),
    ("* * * * funday", "day_of_week", "funday"),
    ("70 * * * * *", "second", "70"),
])
def test_bad_crontab_names_the_field_and_value(expr, field, value):
    with pytest.raises(ValueError) as info:
        crontab(expr)
    assert "%s field: %r" % (field, value) in str(info.value)


def test_wrong_field_count_is_explained():
    with pytest.raises(ValueError, match="expected 5 fields"):
        crontab("* * *")


def test_dst_spring_forward_runs_right_after_the_jump():
    job = make(schedule=crontab("30 2 * * *"), timezone="Europe/Berlin")
    start = datetime.datetime(2026, 3, 28, 12, tzinfo=BERLIN).astimezone(UTC)
    fired = fire_times(job, start, start + datetime.timedelta(days=2))
    local = [f.astimezone(BERLIN) for f in fired]
    assert [(d.day, d.hour, d.minute) for d in local] == [(29, 3, 0), (30, 2, 30)]


def test_dst_fall_back_runs_once():
    job = make(schedule=crontab("30 2 * * *"), timezone="Europe/Berlin")
    start = datetime.datetime(2026, 10, 24, 12, tzinfo=BERLIN).astimezone(UTC)
    fired = fire_times(job, start, start + datetime.timedelta(days=2))
    local = [f.astimezone(BERLIN) for f in fired]
    assert [(d.day, d.hour, d.minute) for d in local] == [(25, 2, 30), (26, 2, 30)]


def test_every_interval_and_alignment():
    assert every(minutes=5, align=True).next_after(utc(2026, 1, 1, 10, 7, 12), UTC) == utc(2026, 1, 1, 10, 10)
    assert every(seconds=90).first_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 0, 1, 30)
    with pytest.raises(ValueError):
        every()


def test_six_field_seconds_fire_every_ten_seconds():
    job = make(schedule=crontab("*/10 * * * * *"))
    start = utc(2026, 1, 1, 0, 0, 1)
    fired = fire_times(job, start, start + datetime.timedelta(seconds=60), step=datetime.timedelta(seconds=1))
    assert [f.second for f in fired] == [10, 20, 30, 40, 50, 0]


def test_validate_callable_is_checked_each_minute():
    job = make(schedule=lambda dt: dt.minute % 15 == 0)
    start = utc(2026, 1, 1, 10, 0, 30)
    fired = fire_times(job, start, start + datetime.timedelta(hours=1))
    assert [f.minute for f in fired] == [15, 30, 45, 0]


@pytest.mark.parametrize("policy, expected_runs", [("once", 1), ("skip", 0), ("all", 5)])
def test_catch_up_policies_after_a_stall(policy, expected_runs, recorded):
    clock = FakeClock(utc(2026, 1, 1, 10, 0, 0))
    s = Scheduler(clock=clock)
    job = s.add(make(schedule=every(minutes=1), catch_up=policy, max_instances=10))
    s.tick()
    clock.t = utc(2026, 1, 1, 10, 5, 30)  # the hub was blocked (or the machine slept) for 5 minutes
    runs = s.tick()
    assert len(runs) == expected_runs
    missed = [e for e in recorded if isinstance(e, events.JobMissed)]
    assert len(missed) == 1 and missed[0].missed_runs == 5 and missed[0].late_by == pytest.approx(270)
    assert job.next_run == utc(2026, 1, 1, 10, 6)
    for r in runs:
        assert r.wait(5), "a caught-up run did not finish"


def test_on_time_runs_are_not_reported_missed(recorded):
    clock = FakeClock(utc(2026, 1, 1, 10, 0, 0))
    s = Scheduler(clock=clock)
    s.add(make(schedule=every(minutes=1)))
    s.tick()
    clock.t = utc(2026, 1, 1, 10, 1, 0, 5000)
    assert len(s.tick()) == 1
    assert not [e for e in recorded if isinstance(e, events.JobMissed)]


def test_max_instances_skips_while_a_run_is_going(recorded):
    release, running = Event(), Event()

    def run():
        running.set()
        release.wait(5)

    clock = FakeClock(utc(2026, 1, 1))
    s = Scheduler(clock=clock)
    s.add(make(run, every(seconds=10)))
    s.tick()
    clock.t += datetime.timedelta(seconds=10)
    [first] = s.tick()
    assert running.wait(5), "the first run did not start"
    clock.t += datetime.timedelta(seconds=10)
    assert s.tick() == []
    skipped = [e for e in recorded if isinstance(e, events.JobSkipped)]
    assert len(skipped) == 1 and "max_instances" in skipped[0].reason
    release.set()
    first.get(5)
    clock.t += datetime.timedelta(seconds=10)
    assert len(s.tick()) == 1


def test_jitter_delays_within_bounds():
    clock = FakeClock(utc(2026, 1, 1))
    s = Scheduler(clock=clock, rng=random.Random(7))
    s.add(make(schedule=every(seconds=1), jitter=30, max_instances=100))
    s.tick()
    etas = []
    for _ in range(20):
        clock.t += datetime.timedelta(seconds=1)
        [r] = s.tick()
        etas.append((r.eta - datetime.datetime.now(UTC)).total_seconds())
        assert r.state == "SCHEDULED"
    assert all(-1 < e <= 30 for e in etas) and max(etas) - min(etas) > 5


def test_jobs_run_as_tasks_with_retries_and_report_state():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("try again")
        return "ok"

    clock = FakeClock(utc(2026, 1, 1))
    s = Scheduler(clock=clock)
    job = s.add(make(flaky, every(seconds=5), task_options={"retries": 2}))
    s.tick()
    clock.t += datetime.timedelta(seconds=5)
    [r] = s.tick()
    assert r.get(5) == "ok" and r.retries == 2
    info = s.jobs()[0]
    assert info["last_state"] == "SUCCESS" and info["last_run"] == utc(2026, 1, 1, 0, 0, 5)
    assert info["next_run"] == utc(2026, 1, 1, 0, 0, 10) and info["schedule"] == "every 5s"
    assert job.task.name == info["name"]


def test_periodic_decorator_keeps_the_function_callable():
    @periodic(crontab("0 * * * *"), timezone="Europe/Berlin")
    def hourly():
        return 42
    assert hourly() == 42
    assert [j["name"] for j in get_scheduler().jobs()] == [hourly.job.name]
    assert get_scheduler().jobs()[0]["timezone"] == "Europe/Berlin"
    with pytest.raises(ValueError, match="unknown timezone"):
        periodic(every(seconds=1), timezone="Mars/Olympus")(lambda: None)
    with pytest.raises(ValueError, match="catch_up"):
        periodic(every(seconds=1), catch_up="sometimes")(lambda: None)


def test_loop_sleeps_until_due_and_fires_promptly():
    s = Scheduler()
    fired, third = [], Event()

    def run():
        fired.append(datetime.datetime.now(UTC))
        if len(fired) >= 3:
            third.set()

    s.add(make(run, every(seconds=0.1)))
    s.start()
    try:
        assert third.wait(5), "the loop fired %d times in 5 s" % len(fired)
    finally:
        s.stop()
    assert s.seconds_until_next() <= 0.1
    assert len(fired) >= 3


@pytest.mark.realproc
def test_every_fifth_of_a_second_inside_a_running_server(server_factory):
    srv = server_factory("tests.apps.sched_app:app")
    first = requests.get(srv.url + "/fired", timeout=5).json()
    wait_for(lambda: requests.get(srv.url + "/fired", timeout=5).json()["count"] >= first["count"] + 10, 10,
             interval=0.05, message="ten more runs of the job")
    body = requests.get(srv.url + "/fired", timeout=5).json()
    rate = (body["count"] - 1) / (body["last"] - body["first"])
    assert 3.5 < rate < 5.5, "fired %.2f times a second, expected ~5" % rate
    assert srv.stop() == 0


def test_cli_lists_jobs_and_next_runs():
    out = subprocess.run([sys.executable, "-m", "greenqueue.scheduler", "tests.apps.sched_jobs"],
                         capture_output=True, text=True, timeout=30, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert "tests.apps.sched_jobs.weekly_report  [3 17 * * sun, Europe/Berlin" in out.stdout
    weekly = out.stdout.split("tests.apps.sched_jobs.poll")[0].splitlines()[1:]
    # Only the weekly job's own lines: on a Sunday the 5 s job's runs are Sundays too.
    assert len(weekly) == 5 and all(line.strip().startswith("Sun ") for line in weekly)
    assert all(line.endswith("17:03:00 CET") or line.endswith("17:03:00 CEST") for line in weekly)
    assert "every 5s" in out.stdout


def test_tasks_reset_does_not_leak_between_tests():
    assert tasks.get_runner().running == 0


def test_a_quiet_periodic_job_logs_its_routine_lines_at_debug(caplog):
    import logging

    from greenqueue import eventlog
    from greenqueue.scheduler import periodic as declare

    @declare(every(seconds=2), log_level="debug", name="tests.quiet_job")
    def quiet():
        return None

    try:
        assert eventlog.task_log_level("tests.quiet_job") == logging.DEBUG
        with pytest.raises(ConfigError, match="log_level"):
            declare(every(seconds=2), log_level="chatty", name="tests.bad_level")(lambda: None)
    finally:
        eventlog.set_task_log_level("tests.quiet_job", None)


def test_a_periodic_run_obeys_its_tasks_concurrency_limit():
    release, started = Event(), []

    def limited():
        started.append(1)
        release.wait(5)

    clock = FakeClock(utc(2026, 1, 1))
    s = Scheduler(clock=clock)
    # @periodic(every(seconds=10), max_instances=5, concurrency_limit=1) says the same.
    s.add(Job(limited, every(seconds=10), max_instances=5, name="sched.limited_%d" % random.randrange(10 ** 9),
              task_options={"concurrency_limit": 1}))
    s.tick()
    clock.t += datetime.timedelta(seconds=10)
    [first] = s.tick()
    clock.t += datetime.timedelta(seconds=10)
    [second] = s.tick()
    wait_for(lambda: started, 5, message="the first run")
    gevent.sleep(0.1)
    assert len(started) == 1 and second.state == "PENDING", "the second run waits for the first to end"
    release.set()
    first.get(5)
    second.get(5)
    assert len(started) == 2
