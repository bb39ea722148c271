"""Installing greenqueue as a user would: a built sdist and wheel, a fresh venv, one's own project.

Then deploying as the README says: the systemd unit's ExecStart and ExecReload
lines, run as they are written (paths moved to the test's directory), behind
the suite's nginx with the project's config, under load: a reload fails no request.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import textwrap
import zipfile
from collections import Counter

import pytest
import requests

from .conftest import ROOT, free_port, wait_for

pytestmark = [pytest.mark.realproc, pytest.mark.slow]


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """An sdist and a wheel built from this checkout, as ``make dist`` builds them."""
    out = tmp_path_factory.mktemp("dist")
    # From a copy of the tracked files: a build writes egg-info and build/ next to its sources.
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=str(ROOT), capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(src)], capture_output=True,
                           text=True)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


def test_the_sdist_and_wheel_pass_twine_check_and_hold_the_package(dist):
    files = sorted(p.name for p in dist.iterdir())
    assert any(f.endswith(".whl") for f in files) and any(f.endswith(".tar.gz") for f in files), files
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict"] + [str(p) for p in dist.iterdir()],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    wheel = next(dist.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("greenqueue/__init__.py", "greenqueue/py.typed", "greenqueue/dashboard/dashboard.html",
                   "greenqueue/journal/_postgres.py"):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "examples/", "bench/")) for n in names)
    if shutil.which("cc"):
        # The compiled request path, its sources' digest, and the .pxd files an sdist build needs.
        for module in ("_request", "_response", "_http"):
            assert any(n.startswith("greenqueue/_compiled/%s." % module) and n.endswith(".so") for n in names), module
            assert "greenqueue/%s.pxd" % module in names
        assert "greenqueue/_compiled/BUILT_FROM" in names
    sdist = next(dist.glob("*.tar.gz"))
    with tarfile.open(sdist) as tar:
        assert any(n.endswith("/README.md") for n in tar.getnames())


def test_a_new_project_installs_the_wheel_into_its_own_venv_and_serves(dist, tmp_path):
    # A new user's shell: nothing of this checkout on the path.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    installed = subprocess.run(pip + [str(next(dist.glob("*.whl")))], capture_output=True, text=True, env=clean)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert (venv / "bin" / "greenqueue").exists(), "the wheel installed no console script"
    project = tmp_path / "myproject"
    project.mkdir()
    (project / "web.py").write_text(textwrap.dedent('''
        from flask import Flask
        from greenqueue import task

        app = Flask(__name__)
        done = []

        @task
        def remember(x):
            done.append(x)
            return x * 2

        @app.get("/")
        def index():
            return str(remember.spawn(21).get(timeout=5))
        '''))
    port = free_port()
    with open(tmp_path / "server.log", "wb") as log:
        # The console script the wheel installs, from the project's own directory.
        proc = subprocess.Popen([str(venv / "bin" / "greenqueue"), "--bind", "127.0.0.1:%d" % port, "web:app"],
                                cwd=str(project), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=clean)
    try:
        def up():
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                return requests.get("http://127.0.0.1:%d/" % port, timeout=2)
            except requests.ConnectionError:
                return None
        r = wait_for(up, 30, message="the installed server")
        assert r.status_code == 200 and r.text == "42"
        if shutil.which("cc"):
            assert "request path: compiled" in (tmp_path / "server.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def unit_command(key):
    """The unit's ``key=`` line (continuations joined), with the paths moved for a machine without systemd."""
    text = (ROOT / "deploy" / "greenqueue.service").read_text()
    logical = text.replace("\\\n", " ")
    line = next(ln for ln in logical.splitlines() if ln.startswith(key + "="))
    return line[len(key) + 1:]


@pytest.mark.nginx
def test_the_units_commands_reload_without_a_failed_request_behind_nginx(tmp_path):
    from .nginx_support import MAIN_CONF, render_site
    from .conftest import require_binary
    nginx = require_binary("nginx", "nginx")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sock = run_dir / "greenqueue.sock"
    start = unit_command("ExecStart").replace("/srv/greenqueue/.venv/bin/python", sys.executable)
    start = start.replace("/run/greenqueue/", str(run_dir) + "/")
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(shlex.split(start), cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    (prefix / "site.conf").write_text(render_site(sock, port))
    (prefix / "nginx.conf").write_text(MAIN_CONF.format(prefix=prefix))
    front = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e",
                              str(prefix / "error.log")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    url = "http://127.0.0.1:%d" % port
    try:
        def serving():
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                return requests.get(url + "/health", timeout=2).status_code == 200 and \
                    "greenqueue supervisor" in (tmp_path / "server.log").read_text()
            except requests.ConnectionError:
                return False
        wait_for(serving, 30, message="the unit's server behind nginx")
        failures = Counter()
        answered = [0]
        stop = threading.Event()

        def client():
            with requests.Session() as s:
                while not stop.is_set():
                    try:
                        r = s.get(url + "/health", timeout=10)
                        if r.status_code != 200:
                            failures[r.status_code] += 1
                        else:
                            answered[0] += 1
                    except requests.RequestException as exc:
                        failures[type(exc).__name__] += 1
        clients = [threading.Thread(target=client) for _ in range(8)]
        for c in clients:
            c.start()
        wait_for(lambda: answered[0] > 200, 20, message="load through nginx")
        reload = unit_command("ExecReload").replace("$MAINPID", str(server.pid))
        subprocess.run(shlex.split(reload), check=True)
        text = lambda: (tmp_path / "server.log").read_text()  # noqa: E731
        wait_for(lambda: text().count("retired (exit 0)") == 2, 30, message="both old processes retired")
        before = answered[0]
        wait_for(lambda: answered[0] > before + 200, 20, message="more load after the reload")
        stop.set()
        for c in clients:
            c.join(20)
        assert not failures, failures
        assert "SIGHUP: reloading 2 worker(s)" in text()
    finally:
        front.send_signal(signal.SIGQUIT)
        front.wait(10)
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, (tmp_path / "server.log").read_text()[-3000:]
        log.close()
