"""The supervisor under load, counted from the client side: recycling, SIGHUP reload, the watchdog, orphans.

Every test drives a real ``python -m greenqueue.server`` with real keep-alive
clients and counts failed requests itself.
"""

import os
import shutil
import signal
import threading
import time
from collections import Counter

import pytest
import requests

from .conftest import ROOT, ServerProcess, wait_for

pytestmark = [pytest.mark.realproc, pytest.mark.slow]

CLIENTS = 8
TOTAL = 2000


class Load:
    """``CLIENTS`` keep-alive clients sending requests back to back; every answer and failure recorded."""

    def __init__(self, url, total=TOTAL, path="/"):
        self.url = url + path
        self.per_client = total // CLIENTS
        self.stop = threading.Event()
        self.answers = []  # (monotonic time, body)
        self.failures = Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def _client(self):
        with requests.Session() as session:
            for _ in range(self.per_client):
                if self.stop.is_set():
                    return
                try:
                    r = session.get(self.url, timeout=15)
                    outcome = r.text if r.status_code == 200 else "HTTP %d" % r.status_code
                except requests.RequestException as exc:
                    outcome = "%s: %s" % (type(exc).__name__, exc)
                with self.lock:
                    if outcome.startswith(("v", "Hello")):
                        self.answers.append((time.monotonic(), outcome))
                    else:
                        self.failures[outcome] += 1

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def join(self, timeout=120):
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "clients still running"
        return self

    def count(self):
        with self.lock:
            return len(self.answers)

    def pids(self):
        with self.lock:
            return {int(body.split()[1]) for _, body in self.answers}


def copy_app(tmp_path):
    """The recycle app as a package of its own, so a test can change its code."""
    pkg = tmp_path / "reloadable"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy(ROOT / "tests" / "apps" / "recycle_app.py", pkg / "app.py")
    return pkg


def set_version(pkg, version):
    path = pkg / "app.py"
    text = path.read_text()
    old = text.split('VERSION = "', 1)[1].split('"', 1)[0]
    path.write_text(text.replace('VERSION = "%s"' % old, 'VERSION = "%s"' % version))


def start(tmp_path, *args):
    pkg = copy_app(tmp_path)
    srv = ServerProcess("reloadable.app:app", *args, cwd=tmp_path, tmp_path=tmp_path,
                        env={"PYTHONPATH": str(tmp_path)})
    srv.start(timeout=30)
    wait_for(lambda: "greenqueue supervisor" in srv.log(), 20, message="every worker serving")
    return srv, pkg


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie (exited, not yet reaped by its parent) is gone too.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("workers", [1, 2])
def test_recycling_under_load_fails_no_request(tmp_path, workers):
    srv, _ = start(tmp_path, "--workers", str(workers), "--max-requests", "150", "--max-requests-jitter", "30")
    try:
        load = Load(srv.url).start().join()
        assert not load.failures, load.failures
        assert load.count() == TOTAL
        # A process serves on while its replacement imports the app, so it answers more than its
        # --max-requests; still, processes were replaced several times.
        assert len(load.pids()) >= workers + 2, load.pids()
        log = srv.log()
        assert log.count("(--max-requests); starting its replacement") >= 2
        assert "retired (exit 0)" in log
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
    assert "Traceback" not in srv.log()


def test_sighup_reload_serves_new_code_and_fails_no_request(tmp_path):
    srv, pkg = start(tmp_path, "--workers", "2")
    try:
        load = Load(srv.url, total=TOTAL).start()
        wait_for(lambda: load.count() >= 300, 30, message="load under way")
        old = load.pids()
        set_version(pkg, "v2")
        srv.send_signal(signal.SIGHUP)
        hup = time.monotonic()
        wait_for(lambda: any(b.startswith("v2") for _, b in list(load.answers)), 10,
                 message="new code served within 10 s of the SIGHUP")
        load.join()
        assert not load.failures, load.failures
        assert load.count() == TOTAL
        new_at = min(t for t, b in load.answers if b.startswith("v2"))
        assert new_at - hup < 10
        wait_for(lambda: all(gone(pid) for pid in old), 10, message="the old processes gone")
        # Once the new ones serve, every answer is new code from a new process.
        tail = [b for t, b in load.answers if t > time.monotonic() - 0.5]
        assert all(b.startswith("v2") for b in requests_after(srv, 20)), tail
        assert not old & {int(b.split()[1]) for b in requests_after(srv, 20)}
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
    log = srv.log()
    assert "SIGHUP: reloading 2 worker(s)" in log
    assert log.count("retired (exit 0)") == 2


def requests_after(srv, n):
    with requests.Session() as s:
        return [s.get(srv.url + "/", timeout=5).text for _ in range(n)]


def test_a_reload_with_broken_code_keeps_the_old_processes_serving(tmp_path):
    srv, pkg = start(tmp_path, "--workers", "1")
    try:
        (pkg / "app.py").write_text((pkg / "app.py").read_text() + "\nraise RuntimeError('broken edit')\n")
        srv.send_signal(signal.SIGHUP)
        wait_for(lambda: "failed to start" in srv.log(), 20, message="the replacement's failure")
        assert requests.get(srv.url + "/", timeout=5).text.startswith("v1")
        assert "keeps serving" in srv.log()
        set_version(pkg, "v3")
        (pkg / "app.py").write_text((pkg / "app.py").read_text().replace("raise RuntimeError('broken edit')", ""))
        srv.send_signal(signal.SIGHUP)
        wait_for(lambda: requests.get(srv.url + "/", timeout=5).text.startswith("v3"), 20,
                 message="the fixed code served after the next SIGHUP")
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


def test_a_blocked_hub_is_replaced_and_named(tmp_path):
    timeout = 2
    srv, _ = start(tmp_path, "--workers", "2", "--timeout", str(timeout))
    try:
        marker = tmp_path / "hanging"

        def hang():
            try:
                requests.get(srv.url + "/hang", params={"marker": str(marker)}, timeout=30)
            except requests.RequestException:
                pass  # its process is killed under it
        started = time.monotonic()
        threading.Thread(target=hang, daemon=True).start()
        # Connections the stuck process accepted before its hub stopped go down with it (as under
        # any server); from the marker on it accepts none, and every new one goes to the other.
        wait_for(marker.exists, 10, message="the hub stuck in the CPU loop")
        # The other process keeps answering while one is stuck.
        answered = 0
        deadline = time.monotonic() + timeout + 2
        replaced = None
        while time.monotonic() < deadline + 3:
            r = requests.get(srv.url + "/", timeout=5)
            assert r.status_code == 200
            answered += 1
            if replaced is None and srv.log().count("is serving") >= 3:
                replaced = time.monotonic() - started
                break
        assert replaced is not None, srv.log()[-3000:]
        assert replaced < timeout + 2, replaced
        assert answered > 5
        log = srv.log()
        assert "hub has not turned" in log
        assert "spin_forever_in_a_cpu_loop" in log  # the stack that held the hub names the user's function
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


def test_a_killed_supervisor_leaves_no_orphan_and_the_port_free(tmp_path):
    srv, _ = start(tmp_path, "--workers", "2")
    pids = Load(srv.url, total=200).start().join().pids()
    assert len(pids) >= 1
    with open("/proc/%d/task/%d/children" % (srv.proc.pid, srv.proc.pid)) as f:
        children = [int(p) for p in f.read().split()]
    assert len(children) == 2
    os.kill(srv.proc.pid, signal.SIGKILL)
    assert srv.stop() == -signal.SIGKILL  # reaps it and closes its log
    wait_for(lambda: all(gone(pid) for pid in children), 15, message="the children to exit with their supervisor")
    again = ServerProcess("reloadable.app:app", "--workers", "1", bind=srv.bind, cwd=tmp_path, tmp_path=tmp_path,
                          env={"PYTHONPATH": str(tmp_path)})
    again.port = srv.port
    again.log_path = tmp_path / "again.log"
    again.start(timeout=30)
    try:
        assert requests.get(again.url + "/", timeout=5).text.startswith("v1")
    finally:
        assert again.stop() == 0


def test_reload_flag_serves_edited_code_without_restart_loops(tmp_path):
    srv, pkg = start(tmp_path, "--reload")
    try:
        assert requests.get(srv.url + "/", timeout=5).text.startswith("v1")
        # Bytecode caches are written as the app imports: they never count as changes.
        (pkg / "__pycache__").mkdir(exist_ok=True)
        (pkg / "__pycache__" / "junk.py").write_text("x = 1\n")
        set_version(pkg, "v2")
        edited = time.monotonic()
        wait_for(lambda: requests.get(srv.url + "/", timeout=5).text.startswith("v2"), 5,
                 message="edited code served within 5 s")
        assert time.monotonic() - edited < 5
        serving = srv.log().count("is serving")
        time.sleep(3)  # a restart loop would show more processes starting in this window
        assert srv.log().count("is serving") == serving, srv.log()[-3000:]
        assert srv.log().count("(--reload): reloading") == 1
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


def test_a_restart_after_kill_9_takes_over_at_once_and_says_so(server_factory, tmp_path):
    """Same host, default 30 s lease: the dead process's running task and its leadership move at once."""
    ledger = tmp_path / "ledger.txt"
    journal = str(tmp_path / "journal.db")
    env = {"CLUSTER_LEDGER": str(ledger), "CLUSTER_JOB": "1"}
    first = server_factory("tests.apps.cluster_app:app", "--journal", journal, "--graceful-timeout", "1", env=env)

    def lines(kind):
        try:
            return [line.split() for line in ledger.read_text().splitlines() if line.startswith(kind)]
        except FileNotFoundError:
            return []
    wait_for(lambda: lines("tick"), 20, message="the first process leading the scheduler")
    requests.post(first.url + "/beating?n=7&seconds=60", timeout=5)  # still running when it dies
    wait_for(lambda: lines("beat 7"), 10, message="the task running in the first process")
    first.kill_group()
    killed = time.time()
    second = server_factory("tests.apps.cluster_app:app", "--journal", journal, "--graceful-timeout", "1", env=env)
    wait_for(lambda: "is gone" in second.log(), 20, message="the take-over line")
    line = next(x for x in second.log().splitlines() if "is gone" in x)
    assert "pid %d" % first.proc.pid in line and "1 running task(s) run again" in line, line
    # Leadership moved at once: a tick from the new process well before the 30 s lease would end.
    wait_for(lambda: any(float(f[1]) > killed and f[2] == str(second.proc.pid) for f in lines("tick")), 10,
             message="a tick fired by the restarted process")
    assert time.time() - killed < 15
    wait_for(lambda: any(f[-1] == str(second.proc.pid) for f in lines("beat 7")), 10,
             message="the dead process's task running again in the new one")
    assert second.stop() == 0


def test_a_reloaded_process_finishes_its_running_journaled_tasks_and_leaves_the_rest(server_factory, tmp_path):
    """What a retiring process does with journaled tasks, counted from the ledger the tasks write."""
    ledger = tmp_path / "ledger.txt"
    env = {"CLUSTER_LEDGER": str(ledger)}
    srv = server_factory("tests.apps.cluster_app:app", "--workers", "1", "--journal", str(tmp_path / "j.db"),
                         "--max-concurrency", "2", env=env)
    wait_for(lambda: "greenqueue supervisor" in srv.log(), 20, message="the supervisor serving")
    requests.post(srv.url + "/spawn?n=20&seconds=0.3", timeout=5)

    def ran():
        try:
            return [line.split() for line in ledger.read_text().splitlines() if line.startswith("task ")]
        except FileNotFoundError:
            return []
    wait_for(lambda: len(ran()) >= 2, 10, message="the first tasks done")
    started = time.monotonic()
    srv.send_signal(signal.SIGHUP)
    wait_for(lambda: len(ran()) >= 20, 30, message="all 20 tasks")
    wait_for(lambda: "retired (exit 0)" in srv.log(), 10, message="the old process gone")
    tasks = ran()
    assert sorted(int(f[1]) for f in tasks) == list(range(20))  # each ran exactly once
    pids = [f[3] for f in tasks]
    old, new = pids[0], pids[-1]
    assert old != new and set(pids) == {old, new}
    retired_after = time.monotonic() - started
    # The old process finished what it was running (at most two 0.3 s tasks) and left the waiting
    # ones to its replacement: it did not sit on them until the graceful timeout.
    assert retired_after < 10
    assert srv.stop() == 0


def test_without_a_journal_the_replacement_fires_schedules_only_after_the_old_process_exits(tmp_path):
    ledger = tmp_path / "ticks.txt"
    copy_app(tmp_path)
    srv = ServerProcess("reloadable.app:app", "--workers", "1", "--graceful-timeout", "3", cwd=tmp_path,
                        tmp_path=tmp_path, env={"PYTHONPATH": str(tmp_path), "TICK_LEDGER": str(ledger)})
    srv.start(timeout=30)
    try:
        def ticks():
            try:
                return [(int(p), float(t)) for p, t in (ln.split() for ln in ledger.read_text().splitlines())]
            except FileNotFoundError:
                return []
        wait_for(lambda: len(ticks()) >= 5, 20, message="ticks from the first process")
        first = ticks()[0][0]
        # A request in flight keeps the old process alive a little after the new one serves.
        slow = threading.Thread(target=requests.get, args=(srv.url + "/slow",), kwargs={"timeout": 10})
        slow.start()
        srv.send_signal(signal.SIGHUP)
        wait_for(lambda: any(p != first for p, _ in ticks()), 20, message="ticks from the replacement")
        slow.join(10)
        all_ticks = ticks()
        last_old = max(t for p, t in all_ticks if p == first)
        first_new = min(t for p, t in all_ticks if p != first)
        assert first_new > last_old, (last_old, first_new)  # never both firing
        assert "the scheduler starts once the process this one replaces has exited" in srv.log()
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


def test_a_stop_signal_that_lands_while_a_child_is_forked_stops_that_child(tmp_path, monkeypatch):
    """SIGTERM sent to a replacement before it drops the parent's handlers must still stop it."""
    from types import SimpleNamespace

    from greenqueue import _supervisor

    forked = tmp_path / "forked"
    served = tmp_path / "served"

    def slow_start(parent):
        forked.touch()
        _supervisor._sleep(0.5)  # widens the window between fork() and the child's own handlers

    def serve(app_spec, settings, listeners, link):
        served.touch()
        return 0

    monkeypatch.setattr(_supervisor, "_die_with_parent", slow_start)
    sup = _supervisor.Supervisor("unused:app", SimpleNamespace(timeout=0), serve)
    child = _supervisor._Child(0)
    before = signal.signal(signal.SIGTERM, sup.signals.on_signal)  # as Supervisor.run() installs it
    try:
        sup._spawn(child)
        wait_for(forked.exists, message="the child to start")
        os.kill(child.pid, signal.SIGTERM)
        _, status = _supervisor._waitpid(child.pid, 0)
    finally:
        signal.signal(signal.SIGTERM, before)
        if child.fd is not None:
            os.close(child.fd)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGTERM
    assert not served.exists(), "the child served on after SIGTERM"
