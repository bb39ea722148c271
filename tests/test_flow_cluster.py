"""Flow control across real nodes: two server processes on one PostgreSQL, and on one SQLite file.

Every count comes from the ledger the tasks write (start and end times of
what really ran, on one machine's clock), never from greenqueue's own
bookkeeping.
"""

import bisect

import pytest
import requests

from .conftest import wait_for

pytestmark = [pytest.mark.realproc, pytest.mark.slow]

APP = "tests.apps.flow_app:app"


def runs(path, kind):
    """(label, start, end, pid) of each run of ``kind`` in the ledger."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [(f[1], float(f[2]), float(f[3]), f[4]) for f in (line.split() for line in lines) if f and f[0] == kind]


def most_in_any_window(starts, seconds):
    """The largest number of ``starts`` inside any window ``seconds`` long (sliding)."""
    starts = sorted(starts)
    return max((bisect.bisect_left(starts, s + seconds) - i for i, s in enumerate(starts)), default=0)


def most_at_once(intervals):
    """The largest number of (start, end) intervals open at one instant."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
def nodes(request, server_factory, tmp_path):
    """``nodes(n, *flags)``: n server processes on one store; ``nodes.ledger`` is their ledger."""
    journal = request.getfixturevalue("pg_dsn") if request.param == "postgres" else str(tmp_path / "j.db")
    path = tmp_path / "ledger.txt"

    def start(n, *flags):
        return [server_factory(APP, "--journal", journal, "--lease-timeout", "3", *flags,
                               env={"FLOW_LEDGER": str(path)}) for _ in range(n)]
    start.ledger = path
    return start


def _spawn(node, name, **params):
    return requests.post(node.url + "/spawn/" + name, params=params, timeout=30).json()["ids"]


def test_a_rate_limit_holds_across_nodes_in_every_sliding_window(nodes):
    a, b = nodes(2)
    # 60 due together, spawned on both nodes at once; "10/s" for the whole cluster.
    _spawn(a, "rated", n=30, label="a")
    _spawn(b, "rated", n=30, label="b")
    done = wait_for(lambda: len(runs(nodes.ledger, "rated")) >= 60 or None, 20, interval=0.1,
                    message="60 rate-limited tasks")
    got = runs(nodes.ledger, "rated")
    starts = sorted(r[1] for r in got)
    assert done and len(got) == 60
    assert most_in_any_window(starts, 1.0) <= 10, "more than 10 starts in a one-second window"
    assert starts[-1] - starts[0] < 8.0, "all 60 start within 8 s of the first"
    # Each window's ten start within about half a second of the window opening: no coarse polling.
    for k in range(10, 60, 10):
        assert starts[k] - starts[k - 10] < 1.5, (k, starts[k] - starts[k - 10])
    assert len({r[3] for r in got}) == 2, "both nodes started some"


def test_two_keys_run_side_by_side_at_their_own_rates(nodes):
    a, b = nodes(2)
    _spawn(a, "rated_per_key", n=15, key="x", label="x")
    _spawn(b, "rated_per_key", n=15, key="y", label="y")
    wait_for(lambda: len(runs(nodes.ledger, "keyed-x")) + len(runs(nodes.ledger, "keyed-y")) >= 30 or None, 20,
             interval=0.1, message="30 keyed tasks")
    for key in "xy":
        starts = [r[1] for r in runs(nodes.ledger, "keyed-" + key)]
        assert len(starts) == 15 and most_in_any_window(starts, 1.0) <= 5, key
    xs = sorted(r[1] for r in runs(nodes.ledger, "keyed-x"))
    ys = sorted(r[1] for r in runs(nodes.ledger, "keyed-y"))
    assert abs(xs[0] - ys[0]) < 1.0 and abs(xs[-1] - ys[-1]) < 1.5, "one key never waits for the other"


def test_a_concurrency_limit_across_nodes_is_never_exceeded_and_is_reached(nodes):
    a, b = nodes(2)
    _spawn(a, "limited", n=6, seconds=0.4)
    _spawn(b, "limited", n=6, seconds=0.4)
    wait_for(lambda: len(runs(nodes.ledger, "limited")) >= 12 or None, 20, interval=0.1, message="12 limited tasks")
    got = runs(nodes.ledger, "limited")
    assert most_at_once([(r[1], r[2]) for r in got]) == 2, "a limit of 2: never 3, and 2 while work waits"
    span = max(r[2] for r in got) - min(r[1] for r in got)
    assert span < 0.4 * 6 + 2.0, "a freed place is taken at once (%.1fs for 6 rounds of 0.4s)" % span


def test_a_per_key_lock_across_nodes(nodes):
    a, b = nodes(2)
    for node in (a, b):
        for key in ("ann", "bob"):
            _spawn(node, "locked", n=3, key=key, seconds=0.2, label=key)
    wait_for(lambda: sum(len(runs(nodes.ledger, "locked-" + k)) for k in ("ann", "bob")) >= 12 or None, 20,
             interval=0.1, message="12 locked tasks")
    for key in ("ann", "bob"):
        got = runs(nodes.ledger, "locked-" + key)
        assert len(got) == 6 and most_at_once([(r[1], r[2]) for r in got]) == 1, key
    both = runs(nodes.ledger, "locked-ann") + runs(nodes.ledger, "locked-bob")
    assert most_at_once([(r[1], r[2]) for r in both]) == 2, "the two keys' locks are held side by side"


def test_a_higher_priority_starts_first_on_whichever_node_frees_a_slot(nodes):
    a, b = nodes(2, "--max-concurrency", "1")
    # The blockers must outlast the three spawns after them even on a loaded machine (with 1 s,
    # a full suite once saw a slot free before "high" was spawned), and end a second apart: ended
    # together, both nodes claim at once and "low-0" may start in the same millisecond as "high-0".
    _spawn(a, "plain", n=1, seconds=2.0, label="block-a")
    _spawn(b, "plain", n=1, seconds=3.0, label="block-b")
    _spawn(a, "plain", n=3, seconds=0.2, priority=-5, label="low")
    _spawn(b, "plain", n=1, seconds=0.2, priority=50, label="high")
    wait_for(lambda: len(runs(nodes.ledger, "plain")) >= 6 or None, 20, interval=0.1, message="6 plain tasks")
    got = sorted(runs(nodes.ledger, "plain"), key=lambda r: r[1])
    blockers = [r for r in got if r[0].startswith("block")]
    after = [r for r in got if not r[0].startswith("block")]
    assert after[0][0] == "high-0", [(r[0], round(r[1] - got[0][1], 3), round(r[2] - got[0][1], 3), r[3]) for r in got]
    first_free = min(r[2] for r in blockers)
    assert after[0][1] - first_free < 0.2, "the freed slot's node claimed at once (%.3fs)" % (after[0][1] - first_free)


@pytest.mark.parametrize("journal", [False, True], ids=["memory", "sqlite"])
def test_the_dashboard_says_why_each_task_waits_and_the_metrics_gauge_each_limit(server_factory, tmp_path, journal):
    from prometheus_client.parser import text_string_to_metric_families

    flags = ["--dashboard-path", "/_gq", "--metrics-path", "/metrics"]
    if journal:
        flags += ["--journal", str(tmp_path / "j.db")]
    srv = server_factory(APP, *flags, env={"FLOW_LEDGER": str(tmp_path / "ledger.txt")})
    _spawn(srv, "locked", n=3, key="k", seconds=3, label="k")
    _spawn(srv, "hourly", n=6, label="h")

    def waits():
        state = requests.get(srv.url + "/_gq/state.json", timeout=5).json()
        return sorted(t["waits"] for t in state["tasks"]["pending"] + state["tasks"]["scheduled"])
    found = wait_for(lambda: waits() if waits() == ["concurrency limit"] * 2 + ["rate limit"] * 4 else None, 10,
                     interval=0.1, message="two parked and four rate-held tasks")
    assert found
    text = requests.get(srv.url + "/metrics", timeout=5).text
    gauges = {(s.name, s.labels.get("task"), s.labels.get("kind")): s.value
              for family in text_string_to_metric_families(text) for s in family.samples
              if s.name.startswith("greenqueue_limit_")}
    locked, rated = "tests.apps.flow_app.locked", "tests.apps.flow_app.hourly"
    assert gauges[("greenqueue_limit_in_use", locked, "concurrency")] == 1
    assert gauges[("greenqueue_limit_waiting", locked, "concurrency")] == 2
    assert gauges[("greenqueue_limit_in_use", rated, "rate")] == 2
    assert gauges[("greenqueue_limit_waiting", rated, "rate")] == 4
    limits = requests.get(srv.url + "/_gq/state.json", timeout=5).json()["limits"]
    assert {(l["kind"], l["bucket"], l["used"], l["waiting"]) for l in limits} >= {
        ("concurrency", locked + "|k", 1, 2)}
