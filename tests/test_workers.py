"""``--workers N`` (a supervisor and N servers on shared sockets) and ``python -m greenqueue.worker``."""

import collections
import os
import re
import signal
import subprocess
import sys

import pytest
import requests

from .conftest import ROOT, wait_for

pytestmark = [pytest.mark.realproc, pytest.mark.slow]

APP = "tests.apps.cluster_app:app"


def ledger(path):
    """The ledger's lines split into fields."""
    try:
        return [line.split() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def serving_pids(srv):
    """Pids of the server processes that said they serve."""
    return re.findall(r"worker \d+ \(pid (\d+)\) is serving", srv.log())


def test_workers_share_the_port_and_a_crashed_one_is_replaced(server_factory, tmp_path):
    srv = server_factory("tests.apps.basic:app", "--workers", "2")
    wait_for(lambda: len(serving_pids(srv)) == 2, 20, message="two workers serving")
    first = serving_pids(srv)
    assert all(requests.get(srv.url + "/", timeout=5).status_code == 200 for _ in range(20))
    os.kill(int(first[0]), signal.SIGKILL)
    wait_for(lambda: len(serving_pids(srv)) == 3, 20, message="a replacement worker")
    assert "died (signal 9)" in srv.log()
    assert all(requests.get(srv.url + "/", timeout=5).status_code == 200 for _ in range(20))
    assert srv.stop(signal.SIGTERM) == 0
    assert "all workers stopped" in srv.log()


def test_workers_without_a_journal_refuse_periodic_jobs(server_factory, tmp_path):
    srv = server_factory(APP, "--workers", "2", start=False, env={"CLUSTER_JOB": "1",
                                                                  "CLUSTER_LEDGER": str(tmp_path / "l")})
    srv.start(wait=False)
    assert srv.proc.wait(30) == 2
    assert "--workers 2 without --journal" in srv.log()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def journal(request, tmp_path):
    """The shared store: one SQLite file (processes of one host) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "journal.db")
    return request.getfixturevalue("pg_dsn")


def test_workers_on_a_shared_journal_run_each_task_once(server_factory, journal, tmp_path):
    path = tmp_path / "ledger.txt"
    srv = server_factory(APP, "--workers", "2", "--journal", journal, "--lease-timeout", "2",
                         env={"CLUSTER_LEDGER": str(path), "CLUSTER_JOB": "1"})
    wait_for(lambda: len(serving_pids(srv)) == 2, 20, message="two workers serving")
    for k in range(10):
        requests.post(srv.url + "/spawn", params={"n": 20, "start": k * 20, "seconds": 0.05}, timeout=10)
    wait_for(lambda: {f[1] for f in ledger(path) if f[0] == "task"} >= {str(i) for i in range(200)}, 30,
             message="200 tasks")
    counts = collections.Counter(f[1] for f in ledger(path) if f[0] == "task")
    assert max(counts.values()) == 1
    wait_for(lambda: len([f for f in ledger(path) if f[0] == "tick"]) >= 3, 20, message="ticks")
    ticks = collections.defaultdict(set)
    for f in ledger(path):
        if f[0] == "tick":
            ticks[f[1]].add(f[3])  # the task id: one enqueue per instant
    assert max(map(len, ticks.values())) == 1, "an instant fired twice across the two workers"
    assert srv.stop(signal.SIGTERM) == 0


def test_a_worker_node_runs_what_a_web_node_spawns(server_factory, journal, tmp_path):
    path = tmp_path / "ledger.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), CLUSTER_LEDGER=str(path))
    web = server_factory(APP, "--journal", journal, "--queues", "", env={"CLUSTER_LEDGER": str(path)})
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "greenqueue.worker", "--journal", journal,
                               "--lease-timeout", "2", "tests.apps.cluster_app"], cwd=str(ROOT), env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "greenqueue worker for tests.apps.cluster_app" in (tmp_path / "worker.log").read_text(),
                 20, message="the worker to start")
        requests.post(web.url + "/spawn", params={"n": 50}, timeout=10).raise_for_status()
        wait_for(lambda: len([f for f in ledger(path) if f[0] == "task"]) >= 50, 20, message="50 tasks")
        ran_on = {f[3] for f in ledger(path) if f[0] == "task"}
        assert max(collections.Counter(f[1] for f in ledger(path) if f[0] == "task").values()) == 1
        assert ran_on == {str(worker.pid)}, "the web node (--queues '') ran tasks"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        assert "shutdown complete" in (tmp_path / "worker.log").read_text()
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(5)
        log.close()
