"""Start-up and shutdown hooks and shared state, in a real server."""

import signal

import pytest
import requests

from .conftest import wait_for



@pytest.mark.realproc
def test_hooks_run_in_order_and_state_reaches_views_and_tasks(server_factory, tmp_path):
    srv = server_factory("tests.apps.hooks_app:app", env={"GQ_TEST_OUT": str(tmp_path)})
    log = tmp_path / "hooks.log"
    # Start-up hooks ran, in order, before the first request could be served.
    assert log.read_text().splitlines() == ["startup 1", "startup 2 sees db=True"]
    body = requests.get(srv.url + "/state", timeout=5).json()
    assert body["db"]["connected"] is True and body["cache"] == {"warm": True} and body["db"]["queries"] == 1
    srv.send_signal(signal.SIGTERM)
    assert srv.proc.wait(20) == 0
    # The shutdown hook ran after the task drained (it saw the task's write to the shared state).
    assert log.read_text().splitlines()[-1] == "shutdown close_pool after task=True"
    out = srv.log()
    assert out.index("task drain") < out.index("shutdown complete")


@pytest.mark.realproc
def test_failing_startup_hook_stops_the_server_before_serving(server_factory, tmp_path):
    srv = server_factory("tests.apps.bad_hook:app", start=False)
    srv.start(wait=False)
    assert srv.proc.wait(20) == 1
    wait_for(lambda: "startup hook failed: RuntimeError: database unreachable" in srv.log(), 5)
    out = srv.log()
    assert "bad_hook.py:12" in out  # where it failed, in one line rather than a traceback
    assert "Traceback" not in out and " serving " not in out


def test_startup_hooks_run_in_order_and_the_first_failure_stops_the_rest():
    from greenqueue import hooks

    ran = []
    hooks.on_startup(lambda: ran.append(1))
    hooks.on_startup(lambda: (_ for _ in ()).throw(OSError("no db")))
    hooks.on_startup(lambda: ran.append(3))
    with pytest.raises(OSError, match="no db"):
        hooks.run_startup()
    assert ran == [1]


def test_shutdown_hooks_run_newest_first_and_a_failing_one_does_not_stop_the_others(caplog):
    import greenqueue
    from greenqueue import hooks

    ran = []

    @greenqueue.on_shutdown
    def close_db():
        ran.append("db")

    @greenqueue.on_shutdown
    def flush_cache():
        raise RuntimeError("cache gone")

    @greenqueue.on_shutdown
    def stop_metrics():
        ran.append("metrics")

    assert close_db() is None and ran == ["db"]  # decorated functions stay plain functions
    ran.clear()
    hooks.run_shutdown()
    assert ran == ["metrics", "db"]
    assert "shutdown hook tests.test_hooks" in caplog.text and "flush_cache failed" in caplog.text


def test_state_is_one_shared_namespace_cleared_by_reset():
    from greenqueue import hooks
    from greenqueue.hooks import state

    state.db = "conn"
    assert hooks.state.db == "conn"
    hooks.reset()
    assert not hasattr(state, "db")
