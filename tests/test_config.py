"""The settings table drives the CLI, config file, environment and help; mistakes in a config file are named."""

import subprocess
import sys

import pytest

from greenqueue import config
from greenqueue.errors import ConfigError

from .conftest import ROOT


def load_file(tmp_path, text, *argv):
    """Load settings from a config file with ``text``; return (settings, warnings)."""
    path = tmp_path / "conf.py"
    path.write_text(text)
    warnings = []
    _, settings = config.load(["--config", str(path), *argv, "app:app"], environ={}, warn=warnings.append)
    return settings, warnings


@pytest.mark.realproc
def test_help_shows_each_default_once():
    out = subprocess.run([sys.executable, "-m", "greenqueue.server", "--help"], capture_output=True, text=True,
                         timeout=30, cwd=str(ROOT)).stdout
    flat = " ".join(out.split())  # argparse wraps lines
    for s in config.SETTINGS:
        assert "%s (default: %s)" % (s.help, s.shown_default) in flat
    assert flat.count("default") == len(config.SETTINGS)


def test_help_texts_leave_the_default_to_the_table():
    for s in config.SETTINGS:
        assert "default" not in s.help, s.name


def test_shown_defaults():
    shown = {s.name: s.shown_default for s in config.SETTINGS}
    assert shown["bind"] == "127.0.0.1:8000"
    assert shown["graceful_timeout"] == "30.0"
    assert shown["max_concurrency"] == "100" and shown["max_pending"] == "10000"
    assert shown["dirty_workers"] == "the app's `workers`"
    assert shown["config"] == "none" and shown["metrics_path"] == "off"


def test_a_misspelt_name_warns_with_the_closest_setting(tmp_path):
    settings, warnings = load_file(tmp_path, "max_headers = 3\ngraceful_timout = 5\n")
    assert settings["max_headers"] == 3 and settings["graceful_timeout"] == 30.0
    assert warnings == ["config file %s:2: 'graceful_timout' is not a setting and is ignored; "
                        "did you mean 'graceful_timeout'?" % (tmp_path / "conf.py")]


def test_an_unknown_name_with_no_close_setting_still_warns(tmp_path):
    _, warnings = load_file(tmp_path, "frobnicate_widgets = 2\n")
    assert len(warnings) == 1 and "'frobnicate_widgets' is not a setting" in warnings[0]
    assert "--help" in warnings[0] and "_" in warnings[0]


def test_helpers_imports_functions_and_classes_are_not_settings(tmp_path):
    text = ("import os\nimport os.path\nfrom multiprocessing import cpu_count\nfrom os import sep as separator\n"
            "_cores = cpu_count()\n\n\ndef on_starting(server):\n    local_name = 1\n\n\nclass Options:\n"
            "    inner = 2\n\n\nmax_concurrency = 4 * _cores\ndirty_app = ['tests.apps.dirty_apps:Echo']\n")
    settings, warnings = load_file(tmp_path, text)
    assert warnings == []
    assert settings["max_concurrency"] >= 4 and settings["dirty_apps"] == ["tests.apps.dirty_apps:Echo"]


def test_cli_still_beats_the_file_and_the_file_the_environment(tmp_path):
    path = tmp_path / "conf.py"
    path.write_text("max_headers = 3\nbacklog = 7\n")
    _, settings = config.load(["--config", str(path), "--max-headers", "8", "app:app"],
                              environ={"GREENQUEUE_BACKLOG": "5", "GREENQUEUE_MAX_CONNECTIONS": "9"})
    assert (settings["max_headers"], settings["backlog"], settings["max_connections"]) == (8, 7, 9)


@pytest.mark.parametrize("text, where, what", [
    ("max_headers = 3\ngraceful_timeout = (\n", ":2: SyntaxError: '(' was never closed", "(in: graceful_timeout = ("),
    ("max_headers = 3\n\ngraceful_timeout = fivee\n", ":3 (in: graceful_timeout = fivee): NameError",
     "name 'fivee' is not defined"),
    ("import nosuchmodule_for_config\n", ":1 (in: import nosuchmodule_for_config): ModuleNotFoundError",
     "nosuchmodule_for_config"),
])
def test_an_error_in_the_file_names_the_file_and_line(tmp_path, text, where, what):
    with pytest.raises(ConfigError) as info:
        load_file(tmp_path, text)
    message = str(info.value)
    assert message.startswith("config file %s%s" % (tmp_path / "conf.py", where)), message
    assert what in message


def test_a_bad_value_names_the_option(tmp_path):
    with pytest.raises(ConfigError, match="--graceful-timeout: must be 0 or more"):
        load_file(tmp_path, "graceful_timeout = -1\n")


@pytest.mark.realproc
def test_the_server_prints_the_warning_and_the_error_on_one_line_each(tmp_path):
    (tmp_path / "conf.py").write_text("graceful_timout = 5\nbind = [\n")
    proc = subprocess.run([sys.executable, "-m", "greenqueue.server", "--config", str(tmp_path / "conf.py"),
                           "tests.apps.basic:app"], capture_output=True, text=True, timeout=30, cwd=str(ROOT))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("greenqueue: error: config file %s:2: SyntaxError: '[' was never closed "
                                   "(in: bind = [)" % (tmp_path / "conf.py"))
    (tmp_path / "conf.py").write_text("graceful_timout = 5\nmax_headers = 0\n")
    proc = subprocess.run([sys.executable, "-m", "greenqueue.server", "--config", str(tmp_path / "conf.py"),
                           "tests.apps.basic:app"], capture_output=True, text=True, timeout=30, cwd=str(ROOT))
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == ("greenqueue: warning: config file %s:1: 'graceful_timout' is not a setting and is "
                        "ignored; did you mean 'graceful_timeout'?" % (tmp_path / "conf.py"))
    assert "--max-headers: must be 1 or more" in lines[1] and len(lines) == 2
