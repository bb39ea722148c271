"""A gunicorn.conf.py given to --config, and greenqueue embedded in a real gunicorn -k gevent.

The gunicorn names that mean something here are honoured, the rest named once;
the README's recipe (greenqueue.start() in post_worker_init) runs under a real
gunicorn with its gevent worker, and its @periodic job fires.
"""

import shutil
import subprocess
import sys
import textwrap

import pytest
import requests

from greenqueue import config

from .conftest import ROOT, free_port, wait_for

GUNICORN_CONF = '''
import multiprocessing

bind = ["127.0.0.1:9001", "unix:/tmp/x.sock"]
workers = 2
worker_class = "gevent"
worker_connections = 500
max_requests = 1000
max_requests_jitter = 50
timeout = 20
graceful_timeout = 10
keepalive = 5
backlog = 100
accesslog = "-"
errorlog = "-"
loglevel = "debug"
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190
forwarded_allow_ips = "*"
preload_app = True
reload = False


def post_fork(server, worker):
    pass


def post_worker_init(worker):
    pass
'''


def test_a_gunicorn_conf_py_means_the_same_here(tmp_path):
    path = tmp_path / "gunicorn.conf.py"
    path.write_text(GUNICORN_CONF)
    warnings = []
    _, s = config.load(["--config", str(path), "app:app"], environ={}, warn=warnings.append)
    assert s.bind == ["127.0.0.1:9001", "unix:/tmp/x.sock"] and s.workers == 2 and s.supervised
    assert (s.max_requests, s.max_requests_jitter, s.timeout, s.graceful_timeout) == (1000, 50, 20.0, 10.0)
    assert (s.keepalive_timeout, s.max_connections, s.backlog) == (5.0, 500, 100)
    assert (s.access_log, s.log_level) == ("-", "debug")
    assert (s.max_request_line, s.max_headers, s.max_header_size) == (4094, 50, 8190)
    assert s.forwarded_allow_ips == "*" and s.reload is False
    assert set(s.server_hooks) == {"post_worker_init"}
    # One warning names everything gunicorn-only; no "did you mean" guesses for gunicorn's own names.
    assert warnings == ["config file %s: gunicorn settings with no meaning under greenqueue, ignored: errorlog, "
                        "post_fork, preload_app, worker_class" % path], warnings


def test_gunicorn_hooks_run_in_order_in_greenqueues_own_server(tmp_path, server_factory):
    ledger = tmp_path / "hooks.txt"
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(textwrap.dedent('''
        workers = 1
        graceful_timeout = 5

        def _write(line):
            with open(%r, "a") as f:
                f.write(line + "\\n")

        def on_starting(server):
            _write("on_starting %%s" %% server.app_spec)

        def when_ready(server):
            _write("when_ready")

        def post_worker_init(worker):
            import greenqueue
            greenqueue.start()  # the README's recipe for gunicorn: harmless under greenqueue's own server
            _write("post_worker_init %%d" %% worker.pid)

        def worker_exit(server, worker):
            _write("worker_exit %%d" %% worker.pid)
        ''' % str(ledger)))
    srv = server_factory("tests.apps.basic:app", "--config", str(conf))
    wait_for(lambda: ledger.exists() and "when_ready" in ledger.read_text(), 20, message="when_ready")
    assert requests.get(srv.url + "/", timeout=5).status_code == 200
    assert srv.stop() == 0, srv.log()
    lines = ledger.read_text().split("\n")[:-1]
    assert [line.split()[0] for line in lines] == ["on_starting", "post_worker_init", "when_ready", "worker_exit"]
    assert lines[0] == "on_starting tests.apps.basic:app"
    assert lines[1].split()[1] == lines[3].split()[1]  # the same server process


@pytest.mark.realproc
def test_the_readme_recipe_under_a_real_gunicorn_gevent_worker(tmp_path):
    gunicorn = shutil.which("gunicorn", path=str(ROOT / ".venv" / "bin")) or shutil.which("gunicorn")
    if gunicorn is None:
        pytest.skip("gunicorn is a bench dependency; make test installs it")
    conf = tmp_path / "gunicorn.conf.py"
    # The README's recipe, as it is written there.
    conf.write_text(textwrap.dedent('''
        worker_class = "gevent"
        workers = 1

        def post_worker_init(worker):
            import greenqueue
            greenqueue.start()
        '''))
    port = free_port()
    log = open(tmp_path / "gunicorn.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(conf), "-b", "127.0.0.1:%d" % port,
                             "tests.apps.sched_app:app"], cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT)
    try:
        def fired():
            try:
                return requests.get("http://127.0.0.1:%d/fired" % port, timeout=2).json()["count"] >= 3
            except requests.ConnectionError:
                assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()
                return False
        wait_for(fired, 30, message="the @periodic job firing under gunicorn -k gevent")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
