"""Retry control, the soft time limit and Celery's spellings, as DESIGN "Flow control" says."""

import gevent
import pytest

import greenqueue
from greenqueue import errors, events, runtime, task, testing

from .conftest import wait_for

WAIT = 10.0


@pytest.fixture
def retrying():
    """Every TaskRetrying and TaskFailed event published during the test, in order."""
    seen = []
    unsubscribe = events.subscribe(seen.append, events.TaskRetrying, events.TaskFailed)
    yield seen
    unsubscribe()


def test_autoretry_for_picks_what_is_retried_and_dont_autoretry_for_wins():
    calls = []

    @task(retries=5, autoretry_for=(ConnectionError, ValueError), dont_autoretry_for=(UnicodeError,))
    def fetch(kind):
        calls.append(kind)
        raise {"conn": ConnectionError("down"), "key": KeyError("k"), "uni": UnicodeError("bad")}[kind]

    for kind, attempts in (("conn", 6), ("key", 1), ("uni", 1)):
        calls.clear()
        r = fetch.spawn(kind)
        with pytest.raises((ConnectionError, KeyError, UnicodeError)):
            r.get(WAIT)
        assert len(calls) == attempts, kind  # UnicodeError is a ValueError: both match, it is not retried
        assert r.retries == attempts - 1


def test_retry_backoff_max_caps_the_delay():
    opts = task(retries=10, retry_delay=1, retry_backoff=10, retry_backoff_max=30)(lambda: None).opts
    assert [opts.delay_for(n) for n in (1, 2, 3, 4)] == [1, 10, 30, 30]


def test_raise_retry_runs_again_after_its_countdown_and_is_no_failure(retrying):
    runs = []

    @task(retries=3)
    def poll():
        runs.append(gevent.get_hub().loop.now())
        if len(runs) < 3:
            raise greenqueue.Retry(countdown=0.05)
        return "ready"

    r = poll.spawn()
    assert r.get(WAIT) == "ready" and r.retries == 2
    assert all(b - a >= 0.04 for a, b in zip(runs, runs[1:]))
    assert [type(e).__name__ for e in retrying] == ["TaskRetrying", "TaskRetrying"]


def test_retry_without_an_attempt_left_fails_with_its_exc_or_max_retries_exceeded():
    @task(retries=1)
    def gives_up(with_exc):
        raise greenqueue.Retry(exc=LookupError("still missing") if with_exc else None)

    with pytest.raises(LookupError, match="still missing"):
        gives_up.spawn(True).get(WAIT)
    r = gives_up.spawn(False)
    with pytest.raises(greenqueue.MaxRetriesExceeded, match="no retry is left"):
        r.get(WAIT)
    assert r.retries == 1


def test_soft_time_limit_is_raised_inside_the_task_before_the_hard_one():
    cleaned = []

    @task(soft_timeout=0.05, timeout=5)
    def long_job():
        try:
            gevent.sleep(5)
        except greenqueue.SoftTimeLimitExceeded:
            cleaned.append(True)
            return "partial"

    assert long_job.spawn().get(WAIT) == "partial" and cleaned == [True]

    @task(soft_time_limit=0.05)
    def ignores_it():
        gevent.sleep(5)

    with pytest.raises(greenqueue.SoftTimeLimitExceeded):
        ignores_it.spawn().get(WAIT)


def test_bind_passes_the_task_with_its_request_and_retry():
    seen = []

    @task(bind=True, max_retries=2, default_retry_delay=0)
    def flaky(self, x):
        seen.append((self.request.id, self.request.retries, self.request.called_directly))
        if self.request.retries < 2:
            raise self.retry(exc=RuntimeError("again"))
        return x * 2

    r = flaky.delay(21)
    assert r.get(WAIT) == 42
    assert seen == [(r.id, 0, False), (r.id, 1, False), (r.id, 2, False)]
    assert flaky.opts.retries == 2
    seen.clear()
    with pytest.raises(greenqueue.Retry):
        flaky(1)  # called inline, as Celery's: the request is empty and retry() raises
    assert seen == [(None, 0, True)]


def test_bind_and_retry_work_in_eager_mode_too():
    @greenqueue.shared_task(bind=True, max_retries=1)
    def once_more(self):
        if self.request.retries == 0:
            self.retry()
        return self.request.retries

    with testing.eager():
        assert once_more.delay().get(WAIT) == 1


def test_celery_names_map_onto_ours_and_giving_both_is_an_error():
    t = task(max_retries=4, default_retry_delay=2, time_limit=30, soft_time_limit=25)(lambda: None)
    assert (t.opts.retries, t.opts.retry_delay, t.opts.timeout, t.opts.soft_timeout) == (4, 2.0, 30.0, 25.0)
    with pytest.raises(errors.ConfigError, match="retries or Celery's max_retries"):
        task(retries=1, max_retries=2)
    with pytest.raises(errors.ConfigError, match="soft_timeout .* must be shorter than timeout"):
        task(soft_timeout=30, timeout=30)
    with pytest.raises(errors.ConfigError, match="autoretry_for takes an exception class"):
        task(autoretry_for=("ValueError",))
    with pytest.raises(errors.ConfigError, match="bind=True does not apply to batch tasks"):
        task(bind=True, batch_size=10)


def test_raise_retry_with_a_journal_hands_the_row_to_the_store_with_its_countdown(tmp_path):
    @task(name="retry_control.journaled", retries=2)
    def journaled():
        if greenqueue.tasks.current().retries == 0:
            raise greenqueue.Retry(countdown=0.2)
        return "second"

    greenqueue.configure(journal=str(tmp_path / "j.db"))
    try:
        r = journaled.spawn()
        wait_for(lambda: r.state == "RETRY" or r.ready(), WAIT, message="the first attempt to ask for a retry")
        assert r.get(WAIT) == "second" and r.retries == 1
    finally:
        runtime.get_runtime().close_store()


# -- expiry --------------------------------------------------------------------------------


def test_a_task_not_started_by_its_expiry_never_runs_and_ends_expired():
    ran = []
    gate = gevent.event.Event()

    @task(expires=0.05)
    def stale(n):
        ran.append(n)

    greenqueue.configure(max_concurrency=1)
    blocker = greenqueue.spawn(gate.wait)
    late = stale.spawn(1)                          # waits behind the blocker past its expiry
    fresh = stale.apply_async((2,), expires=60)    # per call: this one has a minute
    gevent.sleep(0.1)
    gate.set()
    with pytest.raises(greenqueue.TaskExpired, match="never ran"):
        late.get(WAIT)
    assert late.state == "EXPIRED" and late.ready() and late.failed() and not late.successful()
    assert fresh.get(WAIT) is None and ran == [2]
    blocker.get(WAIT)


def test_expires_takes_a_datetime_per_call_and_eager_mode_honours_it():
    import datetime

    @task
    def noted():
        return "ran"

    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    with pytest.raises(greenqueue.TaskExpired):
        noted.apply_async(expires=past).get(WAIT)
    with testing.eager():
        assert noted.apply_async(expires=60).get(WAIT) == "ran"
        assert noted.apply_async(expires=past).state == "EXPIRED"
    with pytest.raises(errors.ConfigError, match="expires"):
        task(expires=-1)


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_an_expired_row_of_a_journal_never_runs_on_whichever_node_claims_it(store, tmp_path, request):
    ran = []

    @task(name="retry_control.expiring")
    def expiring(n):
        ran.append(n)

    journal = str(tmp_path / "j.db") if store == "sqlite" else request.getfixturevalue("pg_dsn")
    greenqueue.configure(journal=journal)
    try:
        # Delayed past its expiry: the row waits in the store, the node claims it when due, and ends it.
        r = expiring.apply_async((1,), countdown=0.3, expires=0.1)
        with pytest.raises(greenqueue.TaskExpired):
            r.get(WAIT)
        again = greenqueue.result(r.id)
        assert ran == [] and again.state == "EXPIRED"
        assert expiring.apply_async((2,), expires=60).get(WAIT) is None and ran == [2]
    finally:
        runtime.get_runtime().close_store()


def test_a_requested_retry_is_logged_as_information_and_an_expiry_says_so():
    from greenqueue import eventlog

    retry = events.TaskRetrying(greenqueue.AsyncResult("0" * 32), exception=greenqueue.Retry(countdown=5), delay=5.0)
    level, fmt, args = eventlog.describe(retry)
    assert level == eventlog.logging.INFO
    failed_once = events.TaskRetrying(greenqueue.AsyncResult("1" * 32), exception=ValueError("x"), delay=1.0)
    assert eventlog.describe(failed_once)[0] == eventlog.logging.WARNING

    import datetime

    @task
    def never():
        return None

    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    with testing.eager():
        r = never.apply_async(expires=past)
    level, fmt, args = eventlog.describe(events.TaskCancelled(r))
    assert (fmt % args).endswith("expired unrun")
