"""Tasks outside the greenqueue server: ``flask run``, plain scripts, ``python -c``, fork.

Each case runs a real interpreter (or a real ``flask run``) and checks what
the tasks did from files they wrote, never from greenqueue's own state.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import requests

from .conftest import ROOT, free_port, wait_for

pytestmark = pytest.mark.realproc


def run_script(code, tmp_path, timeout=60):
    """Run ``code`` in a fresh interpreter (not monkey-patched) and return the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OUTSIDE_TEST_OUT=str(tmp_path))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_flask_run_threads_spawn_tasks_that_run(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OUTSIDE_TEST_OUT=str(tmp_path),
               FLASK_APP="tests.apps.flask_run_app:app")
    log = open(tmp_path / "flask.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "flask", "run", "--port", str(port), "--no-reload"],
                            cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = "http://127.0.0.1:%d" % port

        def up():
            try:
                return requests.get(url + "/result/none", timeout=1).status_code == 200
            except requests.ConnectionError:
                assert proc.poll() is None, (tmp_path / "flask.log").read_text()
                return False
        wait_for(up, 30, message="flask run to serve")
        ids = [requests.post(url + "/spawn/out%d.txt" % i, timeout=5).json()["id"] for i in range(3)]
        for i in range(3):
            wait_for((tmp_path / ("out%d.txt" % i)).exists, 10, message="the task of request %d" % i)
        assert (tmp_path / "out0.txt").read_text() == "from a task"
        wait_for(lambda: requests.get(url + "/result/" + ids[0], timeout=5).json()["state"] == "SUCCESS", 10,
                 message="the result seen from another request thread")
        text = (tmp_path / "flask.log").read_text()
        assert text.count("background thread with its own gevent hub") == 1, text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        log.close()


def test_a_script_polling_ready_sees_its_task_finish(tmp_path):
    proc = run_script("""
        import time, greenqueue

        @greenqueue.task
        def add(a, b):
            return a + b

        r = add.delay(2, 3)
        deadline = time.monotonic() + 10
        while not r.ready():          # the Celery habit: poll from the main thread
            assert time.monotonic() < deadline, r.state
            time.sleep(0.05)
        print("state", r.state, r.status, r.get(timeout=1))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "state SUCCESS SUCCESS 5" in proc.stdout


def test_a_script_that_fires_and_exits_still_runs_the_task(tmp_path):
    proc = run_script("""
        import os, sys, gevent, greenqueue

        @greenqueue.task
        def write(name):
            gevent.sleep(0.3)          # still running when the script exits
            open(os.path.join(os.environ["OUTSIDE_TEST_OUT"], name), "w").write("done")

        write.delay("fired.txt")
        sys.exit(0)
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "fired.txt").read_text() == "done"


def test_python_c_notebook_style_get_with_timeouts(tmp_path):
    proc = run_script("""
        import time, gevent, greenqueue
        from greenqueue import WaitTimeout, TaskTimeout

        slow = greenqueue.spawn(time.sleep, 3)          # blocks its thread for 3 s
        t0 = time.monotonic()
        try:
            slow.get(timeout=1)
        except WaitTimeout:
            print("wait-timeout after %.1f" % (time.monotonic() - t0))

        @greenqueue.task(timeout=0.5)
        def sleepy():
            gevent.sleep(5)                             # cooperates, so its time limit applies

        r = sleepy.spawn()
        try:
            r.get(timeout=10)
        except TaskTimeout as exc:
            print("time-limit", type(exc).__name__, r.state)
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    waited = float(proc.stdout.split("wait-timeout after ")[1].split()[0])
    assert 0.9 <= waited < 2.5, proc.stdout
    assert "time-limit TaskTimeout FAILURE" in proc.stdout


def test_periodic_jobs_fire_outside_the_server_after_start(tmp_path):
    proc = run_script("""
        import os, time, greenqueue
        from greenqueue import every, periodic

        OUT = os.environ["OUTSIDE_TEST_OUT"]

        @periodic(every(seconds=0.2))
        def tick():
            with open(os.path.join(OUT, "ticks.txt"), "a") as fh:
                fh.write("t\\n")

        time.sleep(0.5)
        assert not os.path.exists(os.path.join(OUT, "ticks.txt")), "fired before start()"
        greenqueue.start()
        deadline = time.monotonic() + 10
        while not os.path.exists(os.path.join(OUT, "ticks.txt")) or \\
                len(open(os.path.join(OUT, "ticks.txt")).read().split()) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        print("ticked")
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ticked" in proc.stdout


def test_a_forked_child_gets_a_fresh_runtime(tmp_path):
    proc = run_script("""
        import os, greenqueue

        @greenqueue.task
        def ident(x):
            return (x, os.getpid())

        assert ident.delay(1).get(timeout=5)[1] == os.getpid()
        pid = os.fork()
        if pid == 0:
            # The parent's task thread does not exist here: a fresh runner must take the task.
            value = ident.delay(2).get(timeout=5)
            os._exit(0 if value == (2, os.getpid()) else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "child 0" in proc.stdout


def test_a_forked_child_draws_task_ids_of_its_own(tmp_path):
    # --workers N forks its servers: ids drawn after the fork must differ, or two processes
    # on one journal would hand each other's rows back as their own spawns.
    proc = run_script("""
        import os, greenqueue

        @greenqueue.task
        def noop():
            return None

        noop.delay().get(timeout=5)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, " ".join(noop.delay().id for _ in range(3)).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        theirs = set(os.read(read, 1000).decode().split())
        mine = [noop.delay().id for _ in range(3)]
        stamps = [i[:12] for i in mine]  # the creation time in ms leads
        print("shared", len(theirs & set(mine)), "sorted", stamps == sorted(stamps))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "shared 0 sorted True" in proc.stdout


def test_pools_outside_the_server_need_monkey_patching(tmp_path):
    proc = run_script("""
        import greenqueue
        try:
            greenqueue.start(dirty_apps=["tests.apps.dirty_apps:EchoApp"])
        except greenqueue.ConfigError as exc:
            print("refused:", exc)
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "monkey.patch_all()" in proc.stdout


def test_spawn_from_many_threads_at_once(tmp_path):
    proc = run_script("""
        import threading, greenqueue

        @greenqueue.task
        def square(x):
            return x * x

        results = []
        def worker(k):
            for i in range(k * 100, k * 100 + 100):
                results.append((i, square.spawn(i)))
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert all(r.get(timeout=10) == i * i for i, r in results)
        print("ok", len(results))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ok 800" in proc.stdout
