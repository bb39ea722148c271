"""Workflows across real nodes killed with -9: counted from the ledger the steps write.

A chord's body runs exactly once however its members' nodes die, and a chain
goes on after its server is killed between steps and started again.
"""

import collections
import time

import pytest
import requests

from .conftest import wait_for
from .pg_support import pg, pg_dsn  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.realproc, pytest.mark.slow]

APP = "tests.apps.canvas_app:app"


def ledger(path):
    """The ledger's lines split into words."""
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.postgres
def test_a_chords_body_runs_once_when_a_node_dies_in_the_middle(server_factory, pg_dsn, tmp_path):
    path = tmp_path / "ledger.txt"

    def node():
        return server_factory(APP, "--journal", pg_dsn, "--lease-timeout", "2", "--max-concurrency", "20",
                              env={"CANVAS_LEDGER": str(path)})
    a, b, c = node(), node(), node()
    chord_id = requests.post(a.url + "/chord", params={"n": 300, "seconds": 0.05}, timeout=30).json()["id"]
    wait_for(lambda: sum(1 for f in ledger(path) if f[0] == "member") >= 60 or None, 30, interval=0.05,
             message="a fifth of the members")
    a.kill_group()  # kill -9 with members running on it
    wait_for(lambda: [f for f in ledger(path) if f[0] == "body"] or None, 60, interval=0.2,
             message="the chord's body")
    wait_for(lambda: requests.get(b.url + "/result/" + chord_id, timeout=5).json()["state"] == "SUCCESS"
             or None, 20, message="the chord's result")
    # A second body could only come from members the dead node held, run again once its lease
    # (2 s) ended: give that longer than a lease before counting (an absence has no event).
    time.sleep(3)
    lines = ledger(path)
    bodies = [f for f in lines if f[0] == "body"]
    members = collections.Counter(int(f[1]) for f in lines if f[0] == "member")
    assert len(bodies) == 1, bodies
    assert bodies[0][1:] == ["300", str(sum(range(300)))]
    assert set(members) == set(range(300)), "every member ran"
    assert requests.get(c.url + "/result/" + chord_id, timeout=5).json() == {
        "state": "SUCCESS", "result": sum(range(300))}


def test_a_chain_goes_on_after_its_server_is_killed_between_steps(server_factory, tmp_path):
    path = tmp_path / "ledger.txt"
    journal = str(tmp_path / "j.db")

    def server():
        return server_factory(APP, "--journal", journal, "--lease-timeout", "1", env={"CANVAS_LEDGER": str(path)})
    srv = server()
    chain_id = requests.post(srv.url + "/chain", params={"seconds": 3}, timeout=30).json()["id"]
    wait_for(lambda: ["start", "s2"] in ledger(path) or None, 20, interval=0.05, message="the second step")
    srv.kill_group()  # kill -9 in the middle of step 2
    again = server()
    wait_for(lambda: requests.get(again.url + "/result/" + chain_id, timeout=5).json()["state"] not in
             ("PENDING", "STARTED") or None, 60, interval=0.2, message="the chain to end")
    assert requests.get(again.url + "/result/" + chain_id, timeout=5).json() == {
        "state": "SUCCESS", "result": ["s1", "s2", "s3"]}
    lines = ledger(path)
    assert lines.count(["end", "s1"]) == 1 and lines.count(["start", "s3"]) == 1
    assert lines.count(["start", "s2"]) == 2, "step 2 ran again after the crash (at least once, as any task)"
