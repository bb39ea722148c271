"""The Django backend on Django 6's own ``django.tasks``: the same tests in a Python 3.12+ environment.

This suite runs on Python 3.11, where Django 6 cannot (it needs 3.12), so the
backend's tests (tests/test_django.py, which here run against the
``django-tasks`` backport) run again in a second virtualenv with the newest
Django 6, built once and kept at ``.venv-django6``. Skipped, saying so, where
no Python 3.12 or newer is installed.
"""

import glob
import hashlib
import os
import shutil
import subprocess

import pytest

from .conftest import ROOT

pytestmark = [pytest.mark.realproc, pytest.mark.slow]

VENV = ROOT / ".venv-django6"


def newer_python():
    """A Python 3.12+ interpreter on this machine (PATH, pyenv's versions, /usr/bin), or None."""
    found = [shutil.which("python3.%d" % minor) for minor in (13, 12)]
    found += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[2-9]*/bin/python3")), reverse=True)
    found += ["/usr/bin/python3.13", "/usr/bin/python3.12", "/usr/local/bin/python3.12"]
    for path in found:
        if path and os.path.exists(path):
            ok = subprocess.run([path, "-c", "import sys, venv; sys.exit(sys.version_info < (3, 12))"],
                                capture_output=True, timeout=30)
            if ok.returncode == 0:
                return path
    return None


def environment(python):
    """The Django 6 virtualenv, (re)built when greenqueue's requirements changed."""
    stamp = VENV / ".installed"
    want = hashlib.sha256((ROOT / "setup.cfg").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return VENV / "bin" / "python"
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([python, "-m", "venv", str(VENV)], check=True, timeout=120)
    pip = subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "-e", ".[postgres,django]",
                          "pytest", "requests"], cwd=str(ROOT), capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    stamp.write_text(want)
    return VENV / "bin" / "python"


def test_the_backend_passes_its_tests_on_django_6():
    python = newer_python()
    if python is None:
        pytest.skip("no Python 3.12 or newer on this machine: Django 6 cannot be installed (the backend's "
                    "tests ran on the django-tasks backport only)")
    venv_python = environment(python)
    version = subprocess.run([str(venv_python), "-c", "import django, django.tasks; print(django.__version__)"],
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("6."), version.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DJANGO_"))}
    run = subprocess.run([str(venv_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_django.py"],
                         cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    print("Django %s on %s: %s" % (version.stdout.strip(), python, summary))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "passed" in summary and "skipped" not in summary, summary
