"""Every benchmark still runs: a tiny iteration of each, in its own process, checked for sane rows."""

import importlib

import pytest

from .conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.realproc]

BENCHES = sorted(p.stem for p in (ROOT / "bench").glob("bench_*.py"))


def test_every_expected_bench_exists():
    assert {"bench_http", "bench_tasks", "bench_procpool", "bench_scheduler", "bench_journal"} <= set(BENCHES)


@pytest.mark.parametrize("name", BENCHES)
def test_bench_runs_a_tiny_iteration(name):
    run = importlib.import_module("bench.run")
    rows = run.run_one(name, quick=True, limit=240, smoke=True)
    assert rows, "no rows"
    failed = [r["note"] for r in rows if r["metric"] == "(bench)"]
    assert not failed, failed
    for r in rows:
        assert {"metric", "value", "unit", "baseline", "baseline_value", "ratio"} <= set(r)
    assert any(r["value"] for r in rows), "every value is empty: %s" % rows


def test_aggregator_writes_a_table(tmp_path, monkeypatch, capsys):
    run = importlib.import_module("bench.run")
    monkeypatch.setattr(run, "discover", lambda: ["bench_none"])
    monkeypatch.setattr(run, "BENCH_DIR", tmp_path)
    assert run.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| bench | metric |" in out and "failed" in out
    assert (tmp_path / "results" / "latest.json").exists()
