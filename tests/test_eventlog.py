"""The logging listener: failure tracebacks, and per-task levels for routine lines."""

import logging

import pytest

from greenqueue import events, eventlog, task

WAIT = 10.0
LOGGER = "greenqueue.eventlog"


@pytest.fixture
def logged(caplog):
    """The eventlog's records while it is installed, at every level."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    eventlog.install()
    yield lambda: [rec for rec in caplog.records if rec.name == LOGGER]
    eventlog.uninstall()


@pytest.fixture
def levels():
    """Set per-task levels for one test, forgetting them afterwards."""
    names = []

    def set_level(name, level):
        names.append(name)
        eventlog.set_task_log_level(name, level)
    yield set_level
    for name in names:
        eventlog.set_task_log_level(name, None)


def lines_of(records, name):
    return [(rec.levelno, rec.getMessage()) for rec in records if name in rec.getMessage()]


def test_a_failed_task_logs_its_traceback_once_at_the_final_failure(logged):
    @task(name="eventlog.flaky", retries=2)
    def flaky():
        raise ValueError("nope")

    with pytest.raises(ValueError):
        flaky.spawn().get(WAIT)
    records = logged()
    failed = [rec for rec in records if " failed in " in rec.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR
    text = failed[0].getMessage()
    assert "ValueError: nope\nTraceback (most recent call last):" in text
    assert 'raise ValueError("nope")' in text and "test_eventlog.py" in text
    retries = [rec.getMessage() for rec in records if " retry " in rec.getMessage()]
    assert len(retries) == 2 and not any("Traceback" in line for line in retries)
    assert sum(rec.getMessage().count("Traceback") for rec in records) == 1


def test_a_failure_without_a_traceback_is_still_one_line(logged):
    result = type("Result", (), {"name": "remote.job", "id": "ab12", "traceback": None})()
    events.notify(events.TaskFailed(result, exception=KeyError("gone"), duration=0.5))
    assert [m for _, m in lines_of(logged(), "remote.job")] == ["task remote.job[ab12] failed in 0.500s: KeyError: 'gone'"]


def test_a_quiet_task_logs_its_routine_lines_at_its_level(logged, levels):
    @task(name="eventlog.every_two_seconds")
    def poll():
        return "ok"

    @task(name="eventlog.other")
    def other():
        return "ok"

    levels("eventlog.every_two_seconds", logging.DEBUG)
    poll.spawn().get(WAIT)
    other.spawn().get(WAIT)
    job = type("Job", (), {"name": "eventlog.every_two_seconds"})()
    events.notify(events.JobFired(job))
    records = logged()
    quiet = lines_of(records, "eventlog.every_two_seconds")
    assert [m.split("]")[-1].split(" in ")[0] for _, m in quiet if m.startswith("task")] == [
        " spawned", " started (attempt 1)", " succeeded"]
    assert {lvl for lvl, _ in quiet} == {logging.DEBUG}, "a quiet task logged above DEBUG"
    assert any(m.startswith("job eventlog.every_two_seconds fired") for _, m in quiet)
    assert [lvl for lvl, m in lines_of(records, "eventlog.other") if "succeeded" in m] == [logging.INFO]


def test_a_quiet_task_still_logs_its_failure_as_an_error(logged, levels):
    @task(name="eventlog.quiet_failure")
    def broken():
        raise RuntimeError("disk full")

    levels("eventlog.quiet_failure", logging.DEBUG)
    with pytest.raises(RuntimeError):
        broken.spawn().get(WAIT)
    [failure] = [(lvl, m) for lvl, m in lines_of(logged(), "eventlog.quiet_failure") if " failed in " in m]
    assert failure[0] == logging.ERROR and "RuntimeError: disk full" in failure[1]


def test_a_louder_level_raises_the_success_line_only(logged, levels):
    @task(name="eventlog.important")
    def important():
        return 1

    levels("eventlog.important", logging.WARNING)
    assert eventlog.task_log_level("eventlog.important") == logging.WARNING
    important.spawn().get(WAIT)
    by_line = {m.split("]")[-1].split(" in ")[0].strip(): lvl
               for lvl, m in lines_of(logged(), "eventlog.important")}
    assert by_line == {"spawned": logging.DEBUG, "started (attempt 1)": logging.DEBUG,
                       "succeeded": logging.WARNING}


def test_none_restores_the_default_levels(logged):
    eventlog.set_task_log_level("eventlog.restored", logging.DEBUG)
    eventlog.set_task_log_level("eventlog.restored", None)
    assert eventlog.task_log_level("eventlog.restored") is None

    @task(name="eventlog.restored")
    def restored():
        return 1

    restored.spawn().get(WAIT)
    assert [lvl for lvl, m in lines_of(logged(), "eventlog.restored") if "succeeded" in m] == [logging.INFO]
