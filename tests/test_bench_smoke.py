"""Every benchmark still runs: a tiny iteration of each, checked for sane rows."""

import importlib

import pytest

from .conftest import require_binary

pytestmark = [pytest.mark.slow, pytest.mark.realproc]


def check_rows(rows, bench):
    assert rows, "no rows"
    for r in rows:
        assert {"metric", "value", "unit", "baseline", "baseline_value", "ratio"} <= set(r)
    assert any(r["value"] for r in rows), "every value is empty: %s" % rows
    assert all(r.get("bench", bench) == bench for r in rows)


def test_http_bench_smoke():
    require_binary("wrk", "wrk")
    mod = importlib.import_module("bench.bench_http")
    rows = mod.run(smoke=True)
    check_rows(rows, "http")
    assert {r["baseline"] for r in rows} >= {"gevent.pywsgi"}


def test_aggregator_writes_a_table(tmp_path, monkeypatch, capsys):
    run = importlib.import_module("bench.run")
    monkeypatch.setattr(run, "discover", lambda: ["bench_none"])
    monkeypatch.setattr(run, "BENCH_DIR", tmp_path)
    assert run.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| bench | metric |" in out and "failed" in out
    assert (tmp_path / "results" / "latest.json").exists()


@pytest.mark.parametrize("name", ["bench_tasks", "bench_procpool", "bench_scheduler", "bench_journal"])
def test_other_benches_run_quick(name):
    try:
        mod = importlib.import_module("bench." + name)
    except ModuleNotFoundError:
        pytest.skip("bench/%s.py is not written yet" % name)
    params = mod.run.__code__.co_varnames[:mod.run.__code__.co_argcount]
    rows = mod.run(smoke=True) if "smoke" in params else mod.run(quick=True)
    check_rows(rows, name[6:])
