"""The cluster's task API on real nodes: cancel across nodes, map, queues, max_instances, options.

Nodes are real server processes sharing one store (PostgreSQL, and where it is
cheap one SQLite file). Every count and time comes from the ledger file the
tasks append to, never from greenqueue's bookkeeping.
"""

import collections
import time

import pytest
import requests

import greenqueue
from greenqueue.errors import ConfigError

from .conftest import wait_for

APP = "tests.apps.cluster_app:app"
LEASE = "2"


def realproc(fn):
    """Mark a test that starts real nodes."""
    return pytest.mark.realproc(pytest.mark.slow(fn))


def ledger(path):
    """The ledger's lines split into fields (empty when nothing ran yet)."""
    try:
        return [line.split() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def journal(request, tmp_path):
    """The shared store: one SQLite file (processes of one host) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "journal.db")
    return request.getfixturevalue("pg_dsn")


@pytest.fixture
def postgres(pg_dsn):
    """The shared store is a fresh PostgreSQL database (for tests that run on PostgreSQL only)."""
    return pg_dsn


def _cluster(server_factory, store, tmp_path):
    """``start([flags, ...], **env)`` starts one node per list of flags, together, on ``store``."""
    path = tmp_path / "ledger.txt"

    def start(*flag_lists, lease=LEASE, **env):
        env = dict({"CLUSTER_LEDGER": str(path)}, **env)
        lease_flags = ["--lease-timeout", lease] if lease else []
        nodes = [server_factory(APP, "--journal", store, *lease_flags, "--graceful-timeout", "5", *flags,
                                start=False, env=env) for flags in flag_lists]
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_ready()
        return nodes
    start.ledger = path
    return start


@pytest.fixture
def cluster(server_factory, journal, tmp_path):
    """Nodes on the parametrized store (SQLite file, then PostgreSQL)."""
    return _cluster(server_factory, journal, tmp_path)


@pytest.fixture
def pg_cluster(server_factory, postgres, tmp_path):
    """Nodes on PostgreSQL only."""
    return _cluster(server_factory, postgres, tmp_path)


def _database(node):
    """The database name in a node's ``--journal`` DSN."""
    return node.args[node.args.index("--journal") + 1].rsplit("/", 1)[1]


def _state(node, task_id):
    return requests.get(node.url + "/result/" + task_id, timeout=10).json()["state"]


# -- cancel from another node --------------------------------------------------------------


@realproc
def test_a_cancel_from_another_node_stops_the_task_within_a_second(cluster):
    # The default lease timeout: the heartbeat that carries the cancel runs at its usual pace.
    a, b = cluster([], ["--queues", ""], lease=None)   # b only enqueues, so the task runs on a
    task_id = requests.post(a.url + "/beating", params={"n": "long", "seconds": 8}, timeout=10).json()["id"]

    def beats():
        return [float(f[3]) for f in ledger(cluster.ledger) if f[0] == "beat" and f[2] == task_id]
    wait_for(beats, 10, message="the task to run on node a")
    assert {f[4] for f in ledger(cluster.ledger) if f[0] == "beat"} == {str(a.proc.pid)}
    asked = time.time()
    assert requests.post(b.url + "/cancel/" + task_id, timeout=10).json() == {"cancelled": True}

    wait_for(lambda: _state(a, task_id) == "CANCELLED", 10, interval=0.05, message="CANCELLED on node a")
    wait_for(lambda: _state(b, task_id) == "CANCELLED", 10, interval=0.05, message="CANCELLED on node b")
    # A task spawned after the cancel ran to its end on a: a's hub kept going long enough for a
    # beat the cancel failed to stop to show in the ledger.
    probe = requests.post(a.url + "/spawn", params={"n": 1, "start": 7, "seconds": 0.5}, timeout=10).json()
    assert requests.get(a.url + "/wait/" + probe["ids"][0], timeout=30).json() == {"value": 7}

    stopped = max(beats()) - asked
    print("a cancel from node b stopped the task on node a %.2fs after it was asked" % stopped)
    assert stopped < 1.5, "the task still ran %.2fs after the cancel" % stopped
    assert not [f for f in ledger(cluster.ledger) if f[0] == "end"], "the cancelled task ran to its end"


# -- task.map ------------------------------------------------------------------------------


@realproc
def test_map_commits_every_item_at_once_and_each_runs_once(pg_cluster, pg):
    web, = pg_cluster(["--queues", ""])   # nothing claims yet: the rows stay as the map wrote them
    ids = requests.post(web.url + "/map", params={"n": 100}, timeout=30).json()["ids"]
    assert len(set(ids)) == 100
    rows = pg.admin("SELECT count(*), count(DISTINCT xmin::text) FROM greenqueue_tasks "
                    "WHERE name = 'tests.apps.cluster_app.mapped'", _database(web))
    assert rows == [(100, 1)], "map wrote its rows in %d transactions, not one" % rows[0][1]

    pg_cluster([], [])   # two nodes that claim

    def ran():
        return [f for f in ledger(pg_cluster.ledger) if f[0] == "mapped"]
    wait_for(lambda: len(ran()) >= 100, 20, interval=0.05, message="100 mapped items to run")
    counts = collections.Counter(f[2] for f in ran())
    assert set(counts) == set(ids) and max(counts.values()) == 1
    assert sorted(int(f[1]) for f in ran()) == list(range(100))
    assert requests.get(web.url + "/wait/" + ids[42], timeout=30).json() == {"value": 42}


@realproc
def test_map_runs_every_item_once_across_nodes(cluster):
    a, _ = cluster([], [])
    ids = requests.post(a.url + "/map", params={"n": 100}, timeout=30).json()["ids"]

    def ran():
        return [f for f in ledger(cluster.ledger) if f[0] == "mapped"]
    wait_for(lambda: len(ran()) >= 100, 20, interval=0.05, message="100 mapped items to run")
    counts = collections.Counter(f[2] for f in ran())
    assert set(counts) == set(ids) and max(counts.values()) == 1


# -- queues --------------------------------------------------------------------------------


@realproc
def test_each_task_runs_only_on_a_node_serving_its_queue(cluster):
    reports, default = cluster(["--queues", "reports"], ["--queues", "default"])
    for node, start in ((reports, 0), (default, 10)):
        # Each node spawns both kinds: the one it does not serve must go to the other node.
        requests.post(node.url + "/report", params={"n": 10, "start": start}, timeout=10).raise_for_status()
        requests.post(node.url + "/spawn", params={"n": 10, "start": start}, timeout=10).raise_for_status()
    # apply_async(queue=) sends a default-queue task to another queue.
    requests.post(default.url + "/spawn-to/reports", params={"n": 5, "start": 100},
                  timeout=10).raise_for_status()

    def lines(kind):
        return [f for f in ledger(cluster.ledger) if f[0] == kind]
    wait_for(lambda: len(lines("report")) >= 20 and len(lines("task")) >= 25, 20, interval=0.05,
             message="20 reports and 25 default tasks to run")
    where = collections.defaultdict(set)
    for f in lines("report"):
        where["report"].add(f[3])
    for f in lines("task"):
        where["routed" if int(f[1]) >= 100 else "default"].add(f[3])
    assert where == {"report": {str(reports.proc.pid)}, "routed": {str(reports.proc.pid)},
                     "default": {str(default.proc.pid)}}
    assert max(collections.Counter(f[2] for f in lines("report") + lines("task")).values()) == 1


# -- periodic jobs -------------------------------------------------------------------------


@realproc
def test_max_instances_holds_across_the_cluster(cluster):
    # Runs take 1.5 s on a 1 s schedule: without max_instances=1 they would overlap.
    cluster([], [], CLUSTER_SLOW_JOB="1")

    def runs():
        return [f for f in ledger(cluster.ledger) if f[0] in ("slow-start", "slow-end")]
    wait_for(lambda: sum(1 for f in runs() if f[0] == "slow-end") >= 3, 30, interval=0.1,
             message="three runs of the slow job")
    going, spans = 0, []
    for f in runs():   # one O_APPEND file: lines are in the order they were written
        going += 1 if f[0] == "slow-start" else -1
        assert going in (0, 1), "two runs of a max_instances=1 job at once:\n%s" % runs()
        if f[0] == "slow-start":
            spans.append([float(f[1]), None])
        else:
            spans[-1][1] = float(f[1])
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, "a run started at %.3f before the one before it ended at %.3f" % (start, end)


# -- options and keyword arguments -----------------------------------------------------------


def test_apply_async_rejects_an_unknown_option():
    @greenqueue.task
    def add(a, b):
        return a + b

    with pytest.raises(ConfigError, match=r"unknown option\(s\) routing_key .*known: .*idempotency_key"):
        add.apply_async((1, 2), routing_key="x")
    with pytest.raises(ConfigError, match="routing_key"):
        add.apply_async((1, 2), queue="default", routing_key="x")


def test_spawn_keywords_named_like_options_belong_to_the_task():
    @greenqueue.task
    def echo(**kwargs):
        return kwargs

    r = echo.spawn(queue="nowhere", countdown=60, priority=5)
    assert r.get(10) == {"queue": "nowhere", "countdown": 60, "priority": 5}
    r = echo.apply_async(kwargs={"idempotency_key": "k", "eta": "soon"})
    assert r.get(10) == {"idempotency_key": "k", "eta": "soon"}


@realproc
def test_spawn_keywords_named_like_options_belong_to_the_task_on_a_node(cluster):
    a, b = cluster(["--queues", ""], [])
    task_id = requests.post(a.url + "/echo", timeout=10).json()["id"]
    # Neither delayed (countdown) nor sent to a queue nobody serves: it runs now, with those keywords.
    assert requests.get(a.url + "/wait/" + task_id, timeout=30).json() == {
        "value": {"queue": "nowhere", "countdown": 60, "idempotency_key": "k", "connection": "c"}}
    assert [f[2] for f in ledger(cluster.ledger) if f[0] == "echo"] == [str(b.proc.pid)]


def test_a_row_read_before_this_node_took_the_task_does_not_rewind_its_handle():
    """A watcher's read that raced this node's claim must not overwrite the handle the claim now runs."""
    from greenqueue.journal import TaskRow
    from greenqueue.tasks._followed import Followed

    followed = Followed(None)
    waiting = TaskRow("t1", "tests.flaky", state="RETRY", attempts=1)
    r = followed.handle(waiting)          # it waits in the store for its retry
    assert followed.unfinished() == [r]   # the watcher's round picks it, then reads its row...
    followed.pop(r.id)                    # ...meanwhile this node claims attempt 2 and runs it
    r.retries, r.state = 1, "STARTED"
    assert followed.settle(r, waiting) is False
    assert (r.retries, r.state) == (1, "STARTED")

    other = followed.handle(TaskRow("t2", "tests.flaky", state="RETRY", attempts=1))
    assert followed.settle(other, TaskRow("t2", "tests.flaky", state="STARTED", attempts=2)) is False
    assert (other.retries, other.state) == (1, "STARTED")  # a handle still followed is brought up to date
