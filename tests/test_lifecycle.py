"""The one lifecycle (server and worker), the one loader of user code, the typed settings, the supervisor's count."""

import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import typing

import pytest

import greenqueue.runtime
from greenqueue import _lifecycle, config
from greenqueue._startup import import_spec, load_app
from greenqueue.errors import EXIT_STARTUP, GreenqueueError, JournalError, StartupError
from greenqueue.hooks import Hooks

from .conftest import ROOT, wait_for

# -- settings ---------------------------------------------------------------------------------


def test_settings_has_one_typed_attribute_per_setting_in_table_order():
    # After the table's settings, what a config file brings besides options (gunicorn's hooks).
    assert [f.name for f in dataclasses.fields(config.Settings)] == [s.name for s in config.SETTINGS] + [
        "server_hooks"]


def test_each_default_fits_its_attribute_type():
    hints = typing.get_type_hints(config.Settings)
    for s in config.SETTINGS:
        hint = hints[s.name]
        members = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
        allowed = tuple(typing.get_origin(m) or m for m in members)  # Sequence[str] -> collections.abc.Sequence
        assert isinstance(s.default, allowed), (s.name, s.default, hint)


def test_load_gives_frozen_settings_read_by_attribute_or_by_name():
    _, settings = config.load(["--max-connections", "7", "--dirty-app", "a:B", "app:app"],
                              environ={"GREENQUEUE_GRACEFUL_TIMEOUT": "3"})
    assert settings.max_connections == settings["max_connections"] == 7
    assert settings.graceful_timeout == 3.0 and settings.dirty_apps == ["a:B"]
    assert settings.bind == ["127.0.0.1:8000"] and settings.journal is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.max_connections = 8
    with pytest.raises(KeyError):
        settings["runner"]


def test_the_worker_gets_every_setting_even_those_it_has_no_flag_for():
    _, settings = config.load(["mod"], environ={}, worker=True)
    assert settings.access_log is None and settings.workers is None and settings.processes == 1
    assert not settings.supervised


# -- the loader -------------------------------------------------------------------------------


def test_import_spec_returns_the_module_or_the_attribute():
    import tests.apps.basic as basic
    assert import_spec("tests.apps.basic") is basic
    assert import_spec("tests.apps.basic:app") is basic.app
    assert load_app("tests.apps.basic:app") is basic.app


@pytest.mark.parametrize("spec, kind, form, message", [
    ("tests.apps.basic", "app", "MODULE:APP", "app 'tests.apps.basic': expected MODULE:APP"),
    ("tests.apps.basic:", "module", "", "module 'tests.apps.basic:': expected MODULE or MODULE:NAME"),
    ("tests.apps.nope", "module", "", "module 'tests.apps.nope': no module named 'tests.apps.nope'"),
    ("tests/apps/basic.py", "module", "", "use the module name 'tests.apps.basic'"),
    ("tests/apps/basic.py:app", "dirty app", "MODULE:CLASS", "use the module name 'tests.apps.basic:app'"),
    ("tests.apps.basic:nope", "dirty app", "MODULE:CLASS", "module tests.apps.basic has no attribute 'nope'"),
    ("tests.apps.broken", "module", "", "importing tests.apps.broken failed: ZeroDivisionError"),
])
def test_import_spec_says_what_is_wrong_in_one_line(spec, kind, form, message):
    with pytest.raises(StartupError) as info:
        import_spec(spec, kind, form)
    assert message in str(info.value)
    assert str(info.value).startswith(kind + " ") and "\n" not in str(info.value)


def test_an_import_error_points_at_the_users_line():
    with pytest.raises(StartupError, match=r"\(at tests/apps/broken.py:\d+: "):
        import_spec("tests.apps.broken")


def test_dirty_apps_load_through_the_same_loader():
    from greenqueue.procpool._app import _load_class
    from tests.apps.dirty_apps import EchoApp

    assert _load_class("tests.apps.dirty_apps:EchoApp") is EchoApp
    with pytest.raises(StartupError, match="dirty app 'tests.apps.nope:X': no module named"):
        _load_class("tests.apps.nope:X")
    with pytest.raises(GreenqueueError, match="not a DirtyApp subclass"):
        _load_class("tests.apps.basic:app")


# -- signals ----------------------------------------------------------------------------------


def test_the_first_signal_asks_to_stop_and_the_second_to_exit():
    woken = []
    signals = _lifecycle.StopSignals(lambda: woken.append("first"), lambda: woken.append("second"))
    signals.on_signal(signal.SIGTERM)
    assert (signals.first, signals.second, woken) == ("SIGTERM", None, ["first"])
    signals.on_signal(signal.SIGINT, None)
    assert (signals.first, signals.second, woken) == ("SIGTERM", "SIGINT", ["first", "second"])


# -- start and shutdown, with a runtime that records what it is asked ---------------------------------


class _Store:
    durable = False
    display = "memory"


class _Pools:
    def __init__(self, calls):
        self.calls = calls
        self.started = []

    def __len__(self):
        return len(self.started)

    def all(self):
        return self.started

    def stop(self, timeout):
        self.calls.append("stop pools")


class _Runtime:
    def __init__(self, start_error=None):
        self.calls = []
        self.hooks = Hooks()
        self.pools = _Pools(self.calls)
        self.store = _Store()
        self.start_error = start_error
        self.configured = None

    def configure(self, **limits):
        self.configured = limits

    def start(self, **options):
        self.calls.append("start")
        self.options = options
        if self.start_error is not None:
            raise self.start_error

    def stop_intake(self, timeout):
        self.calls.append("stop intake")

    def drain(self, timeout):
        self.calls.append("drain tasks")

    def close_store(self):
        self.calls.append("close store")

    # The real sequence, over the parts above: the lifecycle shuts down through it.
    stop = greenqueue.runtime.Runtime.stop


class _Front(_lifecycle.Front):
    def __init__(self, calls):
        self.calls = calls

    def stop_accepting(self, reason):
        self.calls.append("stop accepting (%s)" % reason)
        return "stopped accepting; draining 0 busy connection(s)"

    def drain(self, deadline):
        self.calls.append("drain connections")


def _settings(*argv):
    return config.load([*argv, "app:app"], environ={})[1]


def test_shutdown_runs_each_step_once_in_order_and_logs_each_once(caplog):
    rt = _Runtime()
    rt.pools.started = [type("P", (), {"spec": "m:App", "size": 2})()]
    rt.hooks.shutdown.append(lambda: rt.calls.append("shutdown hooks"))
    life = _lifecycle.Lifecycle(rt, _settings("--graceful-timeout", "5"), logging.getLogger("gq.test"),
                                front=_Front(rt.calls))
    caplog.set_level(logging.INFO, logger="greenqueue.runtime")
    with caplog.at_level(logging.INFO, logger="gq.test"):
        assert life.shutdown("SIGTERM") == 0
    assert rt.calls == ["stop accepting (SIGTERM)", "stop intake", "drain connections", "drain tasks",
                        "stop pools", "close store", "shutdown hooks"]
    assert caplog.messages == ["SIGTERM: stopped accepting; draining 0 busy connection(s), graceful timeout 5s",
                               "worker pools stopped", "shutdown complete"]


def test_without_a_front_the_shutdown_says_it_is_stopping(caplog):
    rt = _Runtime()
    life = _lifecycle.Lifecycle(rt, _settings(), logging.getLogger("gq.test"))
    with caplog.at_level(logging.INFO, logger="gq.test"):
        life.shutdown("SIGINT")
    assert rt.calls == ["stop intake", "drain tasks", "close store"]
    assert caplog.messages == ["SIGINT: stopping, graceful timeout 30s", "shutdown complete"]


def test_start_passes_the_settings_to_the_runtime():
    rt = _Runtime()
    settings = _settings("--max-concurrency", "4", "--journal", "j.db", "--queues", "a,b", "--dirty-workers", "3")
    _lifecycle.Lifecycle(rt, settings, logging.getLogger("gq.test")).start()
    assert rt.configured == {"max_concurrency": 4, "max_pending": None}
    assert rt.options == {"dirty_apps": [], "dirty_workers": 3, "dirty_timeout": None, "journal": "j.db",
                          "lease_timeout": 30.0, "queues": ["a", "b"], "journal_sync": "normal", "scheduler": True}


def test_start_leaves_the_runner_limits_alone_when_none_are_given():
    rt = _Runtime()
    _lifecycle.Lifecycle(rt, _settings(), logging.getLogger("gq.test")).start()
    assert rt.configured is None


def test_a_failing_startup_hook_stops_the_start_with_exit_1():
    rt = _Runtime()

    def connect():
        raise RuntimeError("database unreachable")

    rt.hooks.startup.append(connect)
    with pytest.raises(StartupError) as info:
        _lifecycle.Lifecycle(rt, _settings(), logging.getLogger("gq.test")).start()
    assert info.value.status == EXIT_STARTUP
    assert str(info.value).startswith("startup hook failed: RuntimeError: database unreachable (at ")
    assert "test_lifecycle.py" in str(info.value)
    assert rt.calls == []  # the runtime never started


@pytest.mark.parametrize("error, argv, message", [
    (JournalError("cannot open j.db"), ("--journal", "j.db"), "--journal: cannot open j.db"),
    (StartupError("dirty app 'a:B': no module named 'a'"), ("--dirty-app", "a:B"),
     "--dirty-app: dirty app 'a:B': no module named 'a'"),
    (OSError("no forks left"), ("--dirty-app", "a:B"), "--dirty-app: OSError: no forks left"),
    (OSError("broker away"), (), "OSError: broker away"),
])
def test_a_failed_runtime_start_is_one_line_and_stops_what_started(error, argv, message):
    rt = _Runtime(start_error=error)
    with pytest.raises(StartupError) as info:
        _lifecycle.Lifecycle(rt, _settings(*argv), logging.getLogger("gq.test")).start()
    assert str(info.value) == message and info.value.status == 2
    assert rt.calls == ["start", "stop pools", "close store"]


# -- real processes ---------------------------------------------------------------------------


@pytest.mark.realproc
def test_the_worker_stops_on_sigterm_and_says_so_once(tmp_path):
    out = tmp_path / "worker.log"
    with open(out, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "greenqueue.worker", "tests.apps.sched_app"], cwd=str(ROOT),
                                env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_for(lambda: "greenqueue worker for tests.apps.sched_app" in out.read_text(), 20,
                     message="the worker to start")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    text = out.read_text()
    assert text.count("SIGTERM: stopping, graceful timeout 30s") == 1
    assert text.count("shutdown complete") == 1


@pytest.mark.realproc
def test_a_bad_worker_module_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "greenqueue.worker", "tests.apps.broken"], capture_output=True,
                          text=True, timeout=30, cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2
    assert proc.stderr.startswith("greenqueue.worker: error: module 'tests.apps.broken': importing")
    assert "(at tests/apps/broken.py:" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


COUNTED = '''
import os
from greenqueue import DirtyApp

with open(os.environ["IMPORTED_BY"], "a") as f:
    f.write("%d\\n" % os.getpid())


class Counted(DirtyApp):
    workers = 1

    def echo(self, value):
        return value
'''


@pytest.mark.realproc
def test_the_supervisor_counts_pool_workers_from_what_its_children_report(server_factory, tmp_path):
    (tmp_path / "counted_pool.py").write_text(COUNTED)
    imported_by = tmp_path / "imported_by"
    srv = server_factory("tests.apps.basic:app", "--workers", "2", "--dirty-app", "counted_pool:Counted",
                         env={"PYTHONPATH": str(tmp_path), "IMPORTED_BY": str(imported_by)})
    line = wait_for(lambda: re.search(r"greenqueue supervisor \(pid (\d+)\): 2 server processes .*", srv.log()), 20,
                    message="the supervisor's start-up line")
    assert "1 pool worker process(es) each, 2 in all" in line.group(0)
    assert len(re.findall(r"worker \d \(pid \d+\) is serving with 1 pool worker process", srv.log())) == 2
    # The parent imports no user code: only the server processes (and their pool workers) did.
    assert line.group(1) not in imported_by.read_text().split()
    assert srv.stop(signal.SIGTERM) == 0
