"""Start-up and shutdown hooks and shared state, in a real server."""

import signal

import pytest
import requests

from .conftest import wait_for

pytestmark = pytest.mark.realproc


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


def test_failing_startup_hook_stops_the_server_before_serving(server_factory, tmp_path):
    srv = server_factory("tests.apps.bad_hook:app", start=False)
    srv.start(wait=False)
    assert srv.proc.wait(20) == 1
    wait_for(lambda: "startup hook failed: RuntimeError: database unreachable" in srv.log(), 5)
