"""The process pool with real gipc worker processes."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest

from greenqueue import (DirtyApp, GreenqueueError, Overloaded, ProcessPool, RemoteError, WorkerCrashed, WorkerError,
                        WorkerTimeout, events, procpool)
from .conftest import ROOT, wait_for


pytestmark = pytest.mark.realproc

ECHO = "tests.apps.dirty_apps:EchoApp"


def _children():
    path = Path("/proc/%d/task/%d/children" % (os.getpid(), os.getpid()))
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


@pytest.fixture(autouse=True)
def no_leftover_processes():
    before = set(_children())
    yield
    procpool.reset()
    wait_for(lambda: not (set(_children()) - before), 10, message="worker processes to exit")


@pytest.fixture(params=["sleeping", "polling"])
def pool(request, monkeypatch):
    # Workers poll their pipe only while there are cores to spare; run each test both ways.
    monkeypatch.setattr(procpool, "CPU_CORES", 1 if request.param == "sleeping" else 64)
    p = ProcessPool(ECHO, timeout=3).start()
    assert (p.idle_poll > 0) == (request.param == "polling")
    yield p
    p.stop(5)


def test_call_returns_the_value_and_stats_show_workers(pool):
    assert pool.call("echo", {"a": [1, 2]}) == {"a": [1, 2]}
    stats = pool.stats()
    assert stats["size"] == 2 and len(stats["workers"]) == 2
    assert all(w["pid"] for w in stats["workers"])


def test_dispatch_goes_to_the_least_busy_worker(pool):
    pids = {pool.call("whoami") for _ in range(6)}
    assert len(pids) == 2
    # While one worker is busy, calls go to the other.
    busy = gevent.spawn(pool.call, "sleep", 0.5)
    wait_for(lambda: any(w["busy"] for w in pool.stats()["workers"]), 5, message="a busy worker")
    busy_pid = next(w["pid"] for w in pool.stats()["workers"] if w["busy"])
    assert all(pool.call("whoami") != busy_pid for _ in range(3))
    busy.join()


def test_app_exception_is_a_remote_error_and_the_worker_lives(pool):
    pids = {w["pid"] for w in pool.stats()["workers"]}
    with pytest.raises(RemoteError) as info:
        pool.call("fail", "bad input")
    err = info.value
    assert err.remote_type == "ValueError" and "bad input" in str(err)
    assert "dirty_apps.py" in err.remote_traceback and "raise ValueError" in err.remote_traceback
    assert {w["pid"] for w in pool.stats()["workers"]} == pids


def test_an_app_exception_is_logged_once_in_the_server_with_the_workers_traceback(pool, caplog):
    caplog.set_level(logging.DEBUG, logger="greenqueue.procpool")
    with pytest.raises(RemoteError):
        pool.call("fail", "bad input")
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    text = record.getMessage()
    assert record.levelno == logging.ERROR and record.name == "greenqueue.procpool"
    assert text.startswith("EchoApp.fail() raised ValueError: bad input (worker ") and ECHO in text
    assert "Traceback (most recent call last)" in text and "raise ValueError(message)" in text
    caplog.clear()
    stream = pool.stream("fail_after", 2, "half way")
    assert [next(stream), next(stream)] == [0, 1]
    with pytest.raises(RemoteError, match="half way"):
        next(stream)
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.getMessage().startswith("EchoApp.fail_after() raised ValueError: half way")
    assert "raise ValueError(message)" in record.getMessage()


def test_the_cpu_core_setting_bounds_polling_workers(monkeypatch):
    monkeypatch.setattr(procpool, "CPU_CORES", 2)
    p = ProcessPool(ECHO, workers=2).start()  # 2 polling workers and the server need 3 cores
    try:
        assert p.idle_poll == 0 and p.call("echo", 1) == 1
    finally:
        p.stop(5)


def test_unknown_and_private_actions_are_refused(pool):
    for action in ("nope", "_private", "init"):
        with pytest.raises(RemoteError, match="AttributeError"):
            pool.call(action)


@pytest.mark.parametrize("action", ["exit_now", "kill_self", "segfault"])
def test_crash_gives_worker_crashed_fast_and_the_pool_heals(pool, action):
    other = gevent.spawn(pool.call, "sleep", 0.3)
    wait_for(lambda: any(w["busy"] for w in pool.stats()["workers"]), 5, message="the other call to start")
    started = time.monotonic()
    with pytest.raises(WorkerCrashed):
        pool.call(action)
    assert time.monotonic() - started < 1.0
    assert other.get(timeout=5) == 0.3, "the other caller was disturbed"
    wait_for(lambda: len(pool.stats()["workers"]) == 2, 10, message="a replacement worker")
    assert pool.call("echo", "alive") == "alive"
    assert pool.stats()["restarts"] == 1


def test_timeout_kills_and_replaces_the_worker():
    pool = ProcessPool(ECHO, workers=1, timeout=0.5).start()
    old = pool.call("whoami")
    with pytest.raises(WorkerTimeout):
        pool.call("spin", 30)
    wait_for(lambda: pool.stats()["workers"], 10, message="a replacement")
    assert pool.call("whoami") != old
    pool.stop()


def test_init_failure_is_a_clear_error_at_start_and_leaves_nothing():
    with pytest.raises(WorkerError, match="init\\(\\) failed: .*model file missing"):
        ProcessPool("tests.apps.dirty_apps:BadInitApp").start()


def test_closing_a_stream_early_closes_the_worker_generator_at_once(tmp_path):
    pool = ProcessPool(ECHO, workers=1).start()
    marker = tmp_path / "closed"
    stream = pool.stream("count", 1000, 0.05, str(marker))
    assert next(stream) == 0
    closed_at = time.monotonic()
    stream.close()
    wait_for(marker.exists, 2, interval=0.002, message="the generator's finally")
    assert time.monotonic() - closed_at < 0.1
    assert pool.call("echo", "next") == "next"
    pool.stop()


def test_a_stream_that_never_finishes_closing_costs_its_worker_and_the_pool_heals(monkeypatch):
    monkeypatch.setattr(procpool, "_RELEASE_WAIT", 0.5)
    pool = ProcessPool(ECHO, workers=1).start()
    try:
        old = pool.call("whoami")
        stream = pool.stream("stuck_on_close")
        assert next(stream) == "tick"
        stream.close()  # the worker's clean-up sleeps a minute: the pool kills it after the release wait
        wait_for(lambda: pool.stats()["restarts"] == 1, 10, message="the stuck worker replaced")
        assert pool.call("whoami") != old
        assert pool.call("echo", "healed") == "healed"
    finally:
        pool.stop()


def test_stream_yields_every_chunk_in_order(pool):
    assert list(pool.stream("count", 500)) == list(range(500))
    assert list(pool.stream("echo", "not a generator")) == ["not a generator"]
    with pytest.raises(GreenqueueError, match="use pool.stream"):
        pool.call("count", 3)


def test_slow_consumer_holds_the_worker_back(tmp_path):
    credit = procpool.STREAM_CREDIT
    progress = tmp_path / "progress"

    def produced_at():
        """When the worker produced each chunk, by index (whole lines only)."""
        try:
            lines = progress.read_text().split("\n")[:-1]
        except FileNotFoundError:
            return []
        return [float(line.split()[1]) for line in lines]

    pool = ProcessPool(ECHO, workers=1).start()
    try:
        stream = pool.stream("count_progress", 3000, str(progress))
        assert next(stream) == 0
        consumed_at = [time.monotonic()]
        # The window holds `credit` chunks sent plus the one the generator has ready.
        wait_for(lambda: len(produced_at()) >= credit + 1, 5, message="the credit window to fill")
        assert len(produced_at()) == credit + 1, "the producer ran past its credit"
        for _ in stream:
            consumed_at.append(time.monotonic())
        produced = produced_at()
        assert len(produced) == len(consumed_at) == 3000
        # Credit comes back in halves of the window as chunks are consumed, so chunk j can only
        # have been produced after the consumer took chunk j - 2 * credit (both clocks are the
        # system's monotonic clock).
        early = [j for j in range(2 * credit, 3000) if produced[j] < consumed_at[j - 2 * credit]]
        assert not early, "chunks produced before the consumer made room: %s" % early[:5]
    finally:
        pool.stop()


def test_calls_queue_when_busy_and_overload_past_the_bound():
    pool = ProcessPool(ECHO, workers=1, max_queue=1).start()
    running = gevent.spawn(pool.call, "sleep", 0.5)
    wait_for(lambda: pool.stats()["workers"][0]["busy"], 5, message="the worker to be busy")
    queued = gevent.spawn(pool.call, "echo", "queued")
    wait_for(lambda: pool.stats()["queued"] == 1, 5, message="the second call to queue")
    with pytest.raises(Overloaded):
        pool.call("echo", "one too many")
    assert running.get(timeout=5) == 0.5 and queued.get(timeout=5) == "queued"
    pool.stop()


def test_max_requests_recycles_workers_without_failing_calls():
    exits = []
    unsubscribe = events.subscribe(exits.append, events.WorkerExited)
    pool = ProcessPool(ECHO, workers=1, max_requests=3).start()
    pids = [pool.call("whoami") for _ in range(10)]
    assert len(set(pids)) >= 3
    assert any(e.reason == "recycled" for e in exits)
    pool.stop()
    unsubscribe()


def test_stop_calls_close_in_every_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("DIRTY_TEST_MARKERS", str(tmp_path))
    pool = ProcessPool(ECHO, workers=2).start()
    pids = {w["pid"] for w in pool.stats()["workers"]}
    pool.stop(5)
    assert {p.name for p in tmp_path.iterdir()} == {"close-%d" % pid for pid in pids}


def test_children_ignore_sigint(pool):
    pid = pool.call("whoami")
    os.kill(pid, signal.SIGINT)
    assert {pool.call("whoami") for _ in range(4)} >= {pid}


def test_parent_killed_with_sigkill_leaves_no_orphans(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, gevent\n"
        "sys.path.insert(0, %r)\n"
        "from greenqueue.procpool import ProcessPool\n"
        "p = ProcessPool(%r, workers=2).start()\n"
        "print(' '.join(str(w['pid']) for w in p.stats()['workers']), flush=True)\n"
        "gevent.sleep(60)\n" % (str(ROOT), ECHO))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2
    parent.kill()
    parent.wait(5)
    parent.stdout.close()

    def gone(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return Path("/proc/%d/stat" % pid).read_text().split()[2] == "Z"
    wait_for(lambda: all(gone(p) for p in pids), 5, message="orphaned workers to die")


def test_registry_start_get_and_stop_all():
    [pool] = procpool.start_pools([ECHO], workers=1)
    assert procpool.get(ECHO) is pool and procpool.get("EchoApp") is pool
    with pytest.raises(KeyError, match="--dirty-app"):
        procpool.get("NoSuchApp")
    procpool.stop_all()
    with pytest.raises(KeyError):
        procpool.get(ECHO)


def test_a_class_works_as_well_as_a_path():
    from tests.apps.dirty_apps import EchoApp
    pool = ProcessPool(EchoApp, workers=1).start()
    assert pool.call("echo", 1) == 1
    pool.stop()


def test_dirty_app_dispatch_in_process():
    class Local(DirtyApp):
        def hello(self, name):
            return "hi " + name
    assert Local()("hello", "you") == "hi you"
    with pytest.raises(AttributeError):
        Local()("close")


def test_payloads_larger_than_the_pipe_cross_whole_both_ways(pool):
    # 3 MiB each way: many partial reads and writes; a frame must never be cut or interleaved.
    blob = os.urandom(3 << 20)
    assert pool.call("echo", blob) == blob
    got = list(pool.stream("count", 5000))  # thousands of small frames arrive per read()
    assert got == list(range(5000))
    assert pool.call("echo", "after") == "after"


def test_closing_a_channel_wakes_its_waiting_reader_with_eof():
    import gipc

    from greenqueue.procpool._wire import Channel

    a, b = gipc.pipe(duplex=True)
    left, right = Channel(a), Channel(b)
    reader = gevent.spawn(left.get)
    gevent.idle()  # returns once the reader has run and blocked on the empty pipe
    assert reader and not reader.ready(), "the reader is not waiting on the pipe"
    left.close()
    with pytest.raises(EOFError):
        reader.get(timeout=2)
    right.close()


def test_workers_poll_only_while_cores_are_to_spare(monkeypatch):
    monkeypatch.setattr(procpool, "CPU_CORES", 4)
    first = ProcessPool(ECHO, workers=2).start()   # 2 polling workers + the server: 3 of 4 cores
    second = ProcessPool(ECHO, workers=2).start()  # 2 more would need 5
    try:
        assert first.idle_poll > 0 and second.idle_poll == 0
        assert second.call("echo", 1) == 1 and first.call("echo", 2) == 2
    finally:
        first.stop(5)
    third = ProcessPool(ECHO, workers=2).start()   # the first pool's cores are free again
    try:
        assert third.idle_poll > 0
        assert third.call("echo", 3) == 3
    finally:
        third.stop(5)
        second.stop(5)


def test_a_polling_worker_sleeps_once_calls_stop(monkeypatch):
    monkeypatch.setattr(procpool, "CPU_CORES", 64)
    p = ProcessPool(ECHO, workers=1).start()
    try:
        for _ in range(200):
            p.call("echo", None)
        pid = p.stats()["workers"][0]["pid"]

        def cpu_ticks():
            with open("/proc/%d/stat" % pid) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])  # utime + stime

        before = cpu_ticks()
        gevent.sleep(0.5)  # the measured interval itself: an idle worker must not use CPU in it
        assert cpu_ticks() - before <= 2, "an idle worker kept polling"
    finally:
        p.stop(5)


def test_a_polling_worker_still_lets_its_own_greenlets_run(monkeypatch):
    # Back-to-back calls keep a polling worker busy; its app's background greenlets must still run.
    monkeypatch.setattr(procpool, "CPU_CORES", 64)
    p = ProcessPool("tests.apps.dirty_apps:TickerApp").start()
    try:
        assert p.idle_poll > 0
        before = p.call("ticks")
        deadline = time.monotonic() + 0.5
        calls = 0
        while time.monotonic() < deadline:
            p.call("echo", None)
            calls += 1
        ticked = p.call("ticks") - before
        assert calls > 1000, "calls were too slow to keep the worker polling (%d)" % calls
        assert ticked >= 50, "the worker's ticker ran %d times in 0.5 s of back-to-back calls" % ticked
    finally:
        p.stop(5)


def test_a_reply_that_cannot_be_unpickled_fails_that_call_only():
    p = ProcessPool("tests.apps.dirty_apps:BadReplyApp", timeout=5).start()
    try:
        pid = p.call("whoami")
        with pytest.raises(WorkerError, match="cannot unpickle.*LookupError") as info:
            p.call("bad")
        assert isinstance(info.value.__cause__, LookupError)
        assert p.call("echo", "next") == "next"
        assert p.call("whoami") == pid  # the same worker: only its answer was unusable
        stream = p.stream("bad_stream")
        assert next(stream) == 1
        with pytest.raises(WorkerError, match="streamed a chunk"):
            next(stream)
        assert p.call("echo", "after") == "after"
        assert p.call("whoami") == pid
    finally:
        p.stop(5)


def test_a_caller_that_gives_up_mid_call_gets_its_worker_replaced():
    p = ProcessPool(ECHO, workers=1, timeout=30).start()
    try:
        first = p.call("whoami")
        with pytest.raises(gevent.Timeout):
            with gevent.Timeout(0.2):
                p.call("sleep", 10)  # the caller leaves; the worker is killed mid-call
        assert p.call("echo", "still served", ) == "still served"  # by a replacement, without waiting 30 s
        assert p.call("whoami") != first
    finally:
        p.stop(5)


def test_an_outer_timeout_while_queued_is_the_callers_own():
    p = ProcessPool(ECHO, workers=1, timeout=30).start()
    try:
        busy = gevent.spawn(p.call, "sleep", 0.5)
        wait_for(lambda: p.stats()["workers"][0]["busy"], 5, message="the worker to be busy")
        with pytest.raises(gevent.Timeout):
            with gevent.Timeout(0.1):
                p.call("echo", 1)  # queued behind the sleep; the caller's own timer fires
        assert busy.get(timeout=5) == 0.5
        assert p.call("echo", 2) == 2
    finally:
        p.stop(5)


def test_a_queued_caller_killed_as_it_is_handed_a_worker_passes_it_on():
    p = ProcessPool(ECHO, workers=1, timeout=30).start()
    try:
        stream = p.stream("count", 2)
        assert next(stream) == 0 and next(stream) == 1   # the stream holds the only worker
        queued = gevent.spawn(p.call, "echo", "never")
        wait_for(lambda: p.stats()["queued"] == 1, 5, message="the caller to queue")
        queued.kill(block=False)          # the kill is scheduled first ...
        assert list(stream) == []         # ... then the stream ends and hands the worker to it
        queued.join(5)
        assert queued.dead and isinstance(queued.exception, (gevent.GreenletExit, type(None)))
        with gevent.Timeout(5):
            assert p.call("echo", "served") == "served"
    finally:
        p.stop(5)
