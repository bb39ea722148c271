"""The compiled request path: loaded only while it matches its source, and the Python source passes the same tests."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

import greenqueue
from greenqueue import _accel, _http, _request, _response

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(greenqueue.__file__).resolve().parent
# The HTTP tests that run in-process, against whichever build of the request path is loaded.
HTTP_TESTS = ("tests/test_http.py", "tests/test_http_strict.py", "tests/test_response.py", "tests/test_runners.py")

pytestmark = pytest.mark.skipif(os.environ.get(_accel.PURE_ENV, "") not in ("", "0"),
                                reason="this process runs the Python source on purpose")


def _probe(package_parent, env=None):
    """(status, file of greenqueue._http) in a fresh interpreter importing the package under ``package_parent``."""
    code = "import greenqueue._accel as a, greenqueue._http as h; print(a.status()); print(h.__file__)"
    child = {k: v for k, v in os.environ.items() if k != _accel.PURE_ENV}
    child.update(env or {}, PYTHONPATH=str(package_parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child,
                         cwd=str(package_parent), check=True).stdout.splitlines()
    return out[0], out[1]


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: this machine runs the Python source")
def test_the_suite_runs_the_compiled_build_of_the_current_source():
    assert _accel.status() == "compiled", "make test rebuilds it; got: " + _accel.status()
    for module in (_http, _request, _response):
        assert Path(module.__file__).parent.name == "_compiled", module.__file__
    # Compiled methods are not Python functions; a Python subclass still overrides them (tests do).
    assert type(_http.Connection.serve).__name__ != "function"
    assert _accel.source_digest() == (_accel.COMPILED_DIR / _accel.DIGEST_FILE).read_text().strip()


@pytest.mark.skipif(not (_accel.COMPILED_DIR / _accel.DIGEST_FILE).exists(), reason="nothing compiled here")
def test_a_source_edited_after_the_build_runs_as_python_and_says_why(tmp_path):
    copy = tmp_path / "greenqueue"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert _probe(tmp_path)[0] == "compiled"
    with open(copy / "_response.py", "a") as fh:
        fh.write("\n# edited after the build\n")
    status, where = _probe(tmp_path)
    assert status.startswith("pure Python (the sources changed since the compiled build")
    assert where == str(copy / "_http.py")


def test_nothing_compiled_means_the_python_source_with_the_reason(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "greenqueue", ignore=shutil.ignore_patterns("__pycache__", "_compiled"))
    status, where = _probe(tmp_path)
    assert status.startswith("pure Python (no compiled build") and where.endswith("greenqueue/_http.py")
    status, _ = _probe(ROOT, env={_accel.PURE_ENV: "1"})
    assert status == "pure Python (%s is set)" % _accel.PURE_ENV


@pytest.mark.realproc
def test_the_http_tests_pass_on_the_python_source_too():
    env = dict(os.environ, **{_accel.PURE_ENV: "1"})
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"] + list(HTTP_TESTS),
                         cwd=str(ROOT), capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


@pytest.mark.realproc
def test_the_start_up_line_says_which_request_path_runs(server_factory):
    srv = server_factory("tests.apps.basic:app")
    assert requests.get(srv.url + "/", timeout=5).status_code < 500
    assert "request path: %s" % _accel.status() in srv.log()
