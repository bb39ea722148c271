"""Every benchmark still runs: a tiny iteration of each, in its own process, checked for sane rows."""

import importlib

import pytest

from .conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.realproc]

BENCHES = sorted(p.stem for p in (ROOT / "bench").glob("bench_*.py"))


def test_every_expected_bench_exists():
    assert {"bench_http", "bench_tasks", "bench_procpool", "bench_scheduler", "bench_journal"} <= set(BENCHES)


def _check_rows(rows):
    """Fail on a crashed or empty bench; skip one that measured nothing because its peers are not installed."""
    assert rows, "no rows"
    # A bench whose only rows are "(skipped)" (bench_cluster without PostgreSQL) did not break,
    # but it did not run either: a skip with its reason, not a pass and not a failure.
    if all(r["metric"] == "(skipped)" for r in rows):
        pytest.skip("; ".join(r["note"] for r in rows))
    failed = [r["note"] for r in rows if r["metric"] == "(bench)"]
    assert not failed, failed
    for r in rows:
        assert {"metric", "value", "unit", "baseline", "baseline_value", "ratio"} <= set(r)
    assert any(r["value"] for r in rows), "every value is empty: %s" % rows


@pytest.mark.parametrize("name", BENCHES)
def test_bench_runs_a_tiny_iteration(name):
    run = importlib.import_module("bench.run")
    _check_rows(run.run_one(name, quick=True, limit=240, smoke=True))


def test_a_bench_that_measured_nothing_is_a_skip_with_its_reason(monkeypatch):
    cluster = importlib.import_module("bench.bench_cluster")
    monkeypatch.setattr(cluster, "find_pg_bindir", lambda: None)  # as on a machine without PostgreSQL
    rows = cluster.run(quick=True, smoke=True)
    assert [r["metric"] for r in rows] == ["(skipped)"]
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL is not installed"):
        _check_rows(rows)
    skipped = rows[0]
    with pytest.raises(AssertionError, match="every value is empty"):
        _check_rows([skipped, dict(skipped, metric="drain")])  # a partial run that measured nothing still fails


def test_aggregator_writes_a_table(tmp_path, monkeypatch, capsys):
    run = importlib.import_module("bench.run")
    monkeypatch.setattr(run, "discover", lambda: ["bench_none"])
    monkeypatch.setattr(run, "BENCH_DIR", tmp_path)
    assert run.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| bench | metric |" in out and "failed" in out
    assert (tmp_path / "results" / "latest.json").exists()
