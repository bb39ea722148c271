"""A Django project served by greenqueue on PostgreSQL: connections bounded, results after kill -9, tasks in Django's transaction.

Django's database and the journal are one PostgreSQL database of the
suite's private server; connections are counted in ``pg_stat_activity``.
"""

import os
import subprocess
import sys

import pytest
import requests

from .conftest import ROOT, wait_for

pytest.importorskip("django")

pytestmark = [pytest.mark.realproc, pytest.mark.slow, pytest.mark.postgres]

APP = "tests.django_site.wsgi:application"


@pytest.fixture
def site(server_factory, pg, pg_dsn, tmp_path):
    """``site(*flags)``: the test Django project served by greenqueue, its database and journal ``pg_dsn``."""
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.django_site.settings", DJANGO_PG=pg_dsn,
               PYTHONPATH=str(ROOT))
    migrate = subprocess.run([sys.executable, "-m", "django", "migrate", "--noinput", "-v", "0"], cwd=str(ROOT),
                             env=env, capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stderr

    def start(*flags):
        return server_factory(APP, "--journal", pg_dsn, *flags,
                              env={"DJANGO_SETTINGS_MODULE": "tests.django_site.settings", "DJANGO_PG": pg_dsn})
    database = pg_dsn.rsplit("/", 1)[1]
    start.connections = lambda: pg.admin("SELECT count(*) FROM pg_stat_activity WHERE datname = '%s' "
                                         "AND application_name = 'django-site'" % database)[0][0]
    return start


def status(srv, task_id, backend="default"):
    got = requests.get(srv.url + "/result/%s" % task_id, params={"backend": backend}, timeout=10)
    return got.json()


def test_orm_tasks_hold_no_more_connections_than_they_run_and_none_after(site):
    srv = site("--max-concurrency", "20")
    baseline = site.connections()
    ids = requests.post(srv.url + "/enqueue", params={"n": 500}, timeout=60).json()["ids"]
    most = baseline
    def all_done():
        nonlocal most
        most = max(most, site.connections())
        return all(status(srv, i)["status"] == "SUCCESSFUL" for i in ids[-20:]) or None
    wait_for(all_done, 60, interval=0.05, message="500 ORM tasks")
    wait_for(lambda: all(status(srv, i)["status"] == "SUCCESSFUL" for i in ids) or None, 60, message="all 500")
    # Django's connections (the journal's pool is counted apart): at most one per running task
    # and a request or two, and none once the tasks are done.
    assert most <= baseline + 20 + 3, (baseline, most)
    wait_for(lambda: site.connections() <= baseline or None, 10, interval=0.1,
             message="the tasks' connections to close (baseline %d)" % baseline)


def test_results_survive_kill_9_of_the_server(site):
    srv = site()
    ids = requests.post(srv.url + "/enqueue", params={"n": 5}, timeout=30).json()["ids"]
    wait_for(lambda: all(status(srv, i)["status"] == "SUCCESSFUL" for i in ids) or None, 30, message="5 tasks")
    srv.kill_group()
    again = site()
    assert [status(again, i) for i in ids] == [{"status": "SUCCESSFUL", "return_value": 0}] * 5


def test_a_rolled_back_view_never_runs_its_task(site):
    srv = site()
    kept = requests.post(srv.url + "/tx", timeout=30).json()["id"]
    dropped = requests.post(srv.url + "/tx", params={"rollback": 1}, timeout=30).json()["id"]
    wait_for(lambda: status(srv, kept, "tx")["status"] == "SUCCESSFUL" or None, 30, message="the committed task")
    assert status(srv, kept, "tx")["return_value"] == 42
    assert status(srv, dropped, "tx") == {"status": None}, "the rolled-back task was never written"


def test_a_django_worker_node_runs_what_the_web_node_enqueues(site, pg_dsn, tmp_path):
    import signal
    web = site("--queues", "")
    env = dict(os.environ, PYTHONPATH=str(ROOT), DJANGO_SETTINGS_MODULE="tests.django_site.settings",
               DJANGO_PG=pg_dsn)
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "greenqueue.worker", "--journal", pg_dsn, "tests.django_site.wsgi"],
                              cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ids = requests.post(web.url + "/enqueue", params={"n": 10}, timeout=30).json()["ids"]
        wait_for(lambda: all(status(web, i)["status"] == "SUCCESSFUL" for i in ids) or None, 30,
                 message="the worker to run the web node's tasks")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, 9)
            worker.wait(5)
        log.close()
