"""Start-up errors point at the user's own code, and addresses print as users open them."""

import socket
import subprocess
import sys

import pytest
import requests

from greenqueue import _startup

from .conftest import ROOT, free_port, wait_for

pytestmark = pytest.mark.realproc


def run_cli(*args, cwd=ROOT, timeout=30):
    """Run the server CLI to completion (every case here fails before serving)."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "greenqueue.server", "--bind", "127.0.0.1:%d" % free_port(),
                           *args], capture_output=True, text=True, timeout=timeout, cwd=str(cwd), env=env)


def write_app(tmp_path, name, body):
    (tmp_path / (name + ".py")).write_text(body)
    return name + ":app"


# A plain Flask app: the address tests should not depend on the rest of greenqueue.
PLAIN = 'from flask import Flask\napp = Flask(__name__)\napp.get("/")(lambda: "hi")\n'
BAD_JSON = 'import json\nfrom flask import Flask\n\napp = Flask(__name__)\nSETTINGS = json.loads("{bad")\n'
BAD_CRON = ('from flask import Flask\nfrom greenqueue import crontab, periodic\n\napp = Flask(__name__)\n\n\n'
            '@periodic(crontab("99 * * * *"))\ndef report():\n    pass\n')
BAD_SYNTAX = 'from flask import Flask\napp = Flask(__name__)\nif app = None:\n    pass\n'


@pytest.mark.parametrize("body, line, library", [
    (BAD_JSON, 'bad_app.py:5: SETTINGS = json.loads("{bad")', "json/decoder.py"),
    (BAD_CRON, 'bad_app.py:7: @periodic(crontab("99 * * * *"))', "greenqueue/scheduler.py"),
    (BAD_SYNTAX, "bad_app.py:3: if app = None:", "<frozen importlib"),
])
def test_an_import_error_points_at_the_users_own_line(tmp_path, body, line, library):
    proc = run_cli(write_app(tmp_path, "bad_app", body), cwd=tmp_path)
    if "greenqueue/scheduler.py" == library:
        assert "crontab '99 * * * *'" in proc.stderr  # failed where the test meant it to
    assert proc.returncode == 2, proc.stderr
    assert "(at %s)" % line in proc.stderr
    assert library not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--log-level debug" in proc.stderr  # says how to see more


def test_log_level_debug_adds_the_whole_traceback(tmp_path):
    proc = run_cli("--log-level", "debug", write_app(tmp_path, "bad_app", BAD_JSON), cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    assert "json/decoder.py" in proc.stderr and 'bad_app.py", line 5' in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("greenqueue: error:")]
    assert len(errors) == 1 and "(at bad_app.py:5:" in errors[0]


@pytest.mark.parametrize("spec, use", [("good.py:app", "good:app"), ("pkg/web.py:app", "pkg.web:app")])
def test_a_file_name_as_app_spec_says_to_use_the_module_name(tmp_path, spec, use):
    write_app(tmp_path, "good", "from flask import Flask\napp = Flask(__name__)\n")
    proc = run_cli(spec, cwd=tmp_path)
    assert proc.returncode == 2
    assert "looks like a file name; use the module name '%s'" % use in proc.stderr


@pytest.mark.parametrize("host", ["nosuchhost.invalid", "999.1.1.1"])
def test_an_unresolvable_bind_host_says_so(tmp_path, host):
    proc = run_cli("--bind", "%s:1" % host, write_app(tmp_path, "plain", PLAIN), cwd=tmp_path)
    assert proc.returncode == 2
    assert "--bind %s:1: cannot resolve host %r" % (host, host) in proc.stderr
    assert "Unknown error" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_bare_port_listens_on_loopback_and_the_start_up_line_says_so(server_factory, tmp_path):
    port = free_port()
    srv = server_factory(write_app(tmp_path, "plain", PLAIN), bind=str(port), cwd=tmp_path, start=False)
    srv.port = port
    srv.start(wait=False)
    wait_for(lambda: " serving " in srv.log() or srv.proc.poll() is not None, 20, message="the start-up line")
    assert "on http://127.0.0.1:%d " % port in srv.log(), srv.log()
    assert requests.get(srv.url + "/", timeout=5).status_code == 200
    assert srv.stop() == 0


@pytest.mark.parametrize("bind, shown", [
    ("18124", "http://127.0.0.1:18124"),
    ("127.0.0.1:8000", "http://127.0.0.1:8000"),
    (":8000", "http://0.0.0.0:8000"),
    ("[::1]:8000", "http://[::1]:8000"),
    ("unix:/run/gq.sock", "unix:/run/gq.sock"),
])
def test_display(bind, shown):
    assert _startup.display(bind) == shown


def test_where_skips_library_frames_and_falls_back_to_the_last_one(tmp_path):
    import json

    try:
        json.loads("{")
    except ValueError as exc:
        assert _startup.where(exc).endswith('test_startup.py:%d: json.loads("{")'
                                            % (exc.__traceback__.tb_lineno))
    try:
        socket.getaddrinfo("nosuchhost.invalid", 1)
    except OSError as exc:
        exc.__traceback__ = exc.__traceback__.tb_next  # only the library's frames are left
        assert "socket.py" in _startup.where(exc)
