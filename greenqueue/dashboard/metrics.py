"""Prometheus metrics, fed by greenqueue's events: a listener, not hooks in the runners.

Concurrency model: the event listener runs in the greenlet that published
the event and only bumps counters (prometheus_client's own locks are
uncontended in one hub thread). Gauges that describe current state (tasks
waiting, worker processes) are read when Prometheus scrapes, by a custom
collector, so nothing is kept twice.
"""

import collections
import os
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable, Collection, Dict, Iterator, List, Optional, Tuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .. import events
from ..errors import GreenqueueError

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["Metrics"]

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _Hist:
    """A histogram kept as plain numbers (about 0.3 us per observation); exported at scrape time."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_FAST) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(_FAST, value)] += 1
        self.sum += value

    def buckets(self) -> List[Tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip(_FAST + (float("inf"),), self.counts):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out


class Metrics:
    """greenqueue_* metrics in their own registry, plus the bucketed history the dashboard charts.

    The hot path (one event per task state change) only bumps plain dict
    entries; prometheus_client turns them into its text format when scraped.
    That keeps the cost per task to a few hundred nanoseconds.
    """

    def __init__(self, connections: Optional[Collection[Any]] = None, runtime: Optional["Runtime"] = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.connections = connections
        # metric -> label tuple -> count; a hot task cell is a one-element list instead (_task).
        self.counters: Dict[str, Dict[Any, Any]] = {name: collections.Counter() for name, _, _ in _COUNTERS}
        self.hists: Dict[str, Dict[Any, _Hist]] = {
            name: collections.defaultdict(_Hist) for name, _, _ in _HISTOGRAMS}
        self.registry.register(_Exporter(self))
        self.registry.register(_StateCollector(connections, runtime))
        self.history = History()
        self._listener: Optional[Callable[[], None]] = None
        self._tasks: Dict[str, Dict[str, Any]] = {}  # task name -> its counter cells and histogram, made once

    def _task(self, name: str) -> Dict[str, Any]:
        # One-element lists as counter cells, made once per task name: bumping a cell
        # costs a fifth of building a label tuple and updating a Counter per event.
        # Keys: "spawned", "duration" (the histogram) and the final states; no state has those names.
        t: Dict[str, Any] = {"spawned": [0], "duration": self.hists["greenqueue_task_duration_seconds"][(name,)]}
        self.counters["greenqueue_tasks_spawned"][(name,)] = t["spawned"]
        for state in ("SUCCESS", "FAILURE", "CANCELLED"):
            t[state] = self.counters["greenqueue_tasks_finished"][(name, state)] = [0]
        self._tasks[name] = t
        return t

    def install(self) -> "Metrics":
        """Start listening to task, job, worker, consumer, pool-call and HTTP events."""
        self._listener = events.subscribe(self._on_event, *_HANDLED)
        return self

    def uninstall(self) -> None:
        """Stop listening."""
        if self._listener is not None:
            self._listener()
        self._listener = None

    # ``e`` is one of _HANDLED; the branches dispatch on ``type(e)`` kept in a local (the hot
    # path's fastest test), which mypy cannot narrow through, so ``e`` stays Any.
    def _on_event(self, e: Any) -> None:
        kind = type(e)
        c = self.counters
        if kind is events.TaskSucceeded or kind is events.TaskFailed:
            # The per-task hot path (with TaskSpawned): a few hundred nanoseconds.
            r = e.result
            t = self._tasks.get(r.name) or self._task(r.name)
            t[r.state][0] += 1
            d = e.duration
            h = t["duration"]
            h.counts[bisect_left(_FAST, d)] += 1
            h.sum += d
            self.history.add(r.state, d, e.timestamp)
        elif kind is events.TaskSpawned:
            (self._tasks.get(e.result.name) or self._task(e.result.name))["spawned"][0] += 1
        elif kind is events.RequestFinished:
            self.counters["greenqueue_http_requests"][(str(e.status or 0),)] += 1
            self.hists["greenqueue_http_request_seconds"][()].observe(e.seconds)
        elif kind is events.PoolCallFinished:
            self.hists["greenqueue_procpool_seconds"][(e.pool.name, e.kind)].observe(e.seconds)
        elif kind is events.TaskCancelled:
            r = e.result
            (self._tasks.get(r.name) or self._task(r.name))["CANCELLED"][0] += 1
            self.history.add(r.state, None, e.timestamp)
        elif kind is events.TaskRetrying:
            c["greenqueue_task_retries"][(e.result.name,)] += 1
        elif kind is events.JobFired:
            c["greenqueue_job_runs"][(e.job.name, "fired")] += 1
            if e.scheduled_for is not None:
                late = max(0.0, e.timestamp - e.scheduled_for.timestamp())
                self.hists["greenqueue_schedule_lateness_seconds"][(e.job.name,)].observe(late)
        elif kind is events.JobSkipped:
            c["greenqueue_job_runs"][(e.job.name, "skipped")] += 1
        elif kind is events.JobMissed:
            c["greenqueue_job_runs"][(e.job.name, "missed")] += 1
        elif kind is events.WorkflowStarted:
            c["greenqueue_workflows"][(e.kind, "started")] += 1
        elif kind is events.WorkflowFinished:
            c["greenqueue_workflows"][(e.kind, e.state)] += 1
        elif kind is events.WorkerExited:
            c["greenqueue_worker_exits"][(getattr(e.pool, "name", "?"), e.reason or "?")] += 1
        elif kind is events.MessagesHandled or kind is events.MessagesFailed:
            name = getattr(e.consumer, "name", "?")
            ok = kind is events.MessagesHandled
            c["greenqueue_consumer_messages"][(name, "handled" if ok else "failed")] += e.count
            # Handlers may requeue or drop single messages even when the batch succeeds.
            if e.requeued:
                c["greenqueue_consumer_messages"][(name, "requeued")] += e.requeued
            if e.rejected:
                c["greenqueue_consumer_messages"][(name, "rejected")] += e.rejected
            self.hists["greenqueue_consumer_batch_seconds"][(name,)].observe(e.seconds)
            self.hists["greenqueue_consumer_batch_size"][(name,)].observe(e.count)

    def render(self) -> Tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# Every event type _on_event counts; TaskStarted is not one of them, so it costs metrics nothing.
_HANDLED = (events.TaskSucceeded, events.TaskFailed, events.TaskSpawned, events.TaskCancelled,
            events.TaskRetrying, events.JobFired, events.JobSkipped, events.JobMissed, events.WorkerExited,
            events.MessagesHandled, events.MessagesFailed, events.RequestFinished, events.PoolCallFinished,
            events.WorkflowStarted, events.WorkflowFinished)

_COUNTERS = [
    ("greenqueue_tasks_spawned", "Tasks accepted", ["task"]),
    ("greenqueue_tasks_finished", "Tasks finished, by final state", ["task", "state"]),
    ("greenqueue_task_retries", "Task attempts that will be retried", ["task"]),
    ("greenqueue_job_runs", "Periodic job runs by outcome", ["job", "outcome"]),
    ("greenqueue_http_requests", "HTTP requests by status", ["status"]),
    ("greenqueue_worker_exits", "Worker processes that ended, by reason", ["pool", "reason"]),
    ("greenqueue_consumer_messages", "Consumer messages by outcome", ["consumer", "outcome"]),
    ("greenqueue_workflows", "Workflows started here, and how they ended", ["kind", "outcome"]),
]
_HISTOGRAMS = [
    ("greenqueue_task_duration_seconds", "Duration of a task's last attempt", ["task"]),
    ("greenqueue_schedule_lateness_seconds", "How late a periodic run fired", ["job"]),
    ("greenqueue_procpool_seconds", "Process-pool call and stream time", ["pool", "kind"]),
    ("greenqueue_http_request_seconds", "HTTP request time", []),
    ("greenqueue_consumer_batch_seconds", "Consumer handler time per batch", ["consumer"]),
    ("greenqueue_consumer_batch_size", "Messages per consumer batch (bucket bounds are counts)", ["consumer"]),
]


class _Exporter:
    """Turns the plain counters and histograms into Prometheus metric families at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for name, doc, labels in _COUNTERS:
            family = CounterMetricFamily(name, doc, labels=labels)
            for key, value in list(self.metrics.counters[name].items()):
                if type(value) is list:  # a hot counter's cell (Metrics._task)
                    value = value[0]
                family.add_metric(list(key), value)
            yield family
        for name, doc, labels in _HISTOGRAMS:
            hist_family = HistogramMetricFamily(name, doc, labels=labels)
            for key, hist in list(self.metrics.hists[name].items()):
                hist_family.add_metric(list(key), hist.buckets(), hist.sum)
            yield hist_family


class History:
    """Finished tasks per 10-second bucket over the last hour, for the dashboard's charts."""

    SPAN, BUCKETS = 10, 360

    def __init__(self) -> None:
        self.buckets: Dict[int, List[float]] = {}
        self._key = -1
        self._current: Any = None  # the bucket of self._key, set by the first _roll

    def add(self, state: str, duration: Optional[float], when: float) -> None:
        """Count one task finished at ``when`` (epoch seconds)."""
        key = int(when // self.SPAN)
        if key == self._key:
            b = self._current
        else:
            b = self._roll(key)
        b[0] += 1
        if state == "FAILURE":
            b[1] += 1
        if duration is not None:
            b[2] += duration

    def _roll(self, key: int) -> List[float]:
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = [0, 0, 0.0]
            for old in [k for k in self.buckets if k <= key - self.BUCKETS]:
                del self.buckets[old]
        if key >= self._key:
            self._key, self._current = key, b  # the bucket most events land in
        return b

    def series(self) -> List[Tuple[int, float, float, Optional[float]]]:
        """[(bucket start, finished, failed, mean seconds)] for the last hour, oldest first."""
        now = int(time.time() // self.SPAN)
        out = []
        for key in range(now - self.BUCKETS + 1, now + 1):
            n, failed, total = self.buckets.get(key, (0, 0, 0.0))
            out.append((key * self.SPAN, n, failed, total / n if n else None))
        return out


def _rss_bytes(pid: int) -> Optional[int]:
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _limit_gauges(runtime: "Runtime") -> Iterator[Metric]:
    """A gauge per limit, per task (its keys summed: a per-key limit may have thousands of keys)."""
    used = GaugeMetricFamily("greenqueue_limit_in_use", "Runs now (concurrency) or starts in the window (rate)",
                             labels=["task", "kind"])
    waiting = GaugeMetricFamily("greenqueue_limit_waiting", "Tasks waiting for a limit to allow them",
                                labels=["task", "kind"])
    sums: Dict[Tuple[str, str], List[int]] = {}
    try:
        found = runtime.limits()
    except GreenqueueError:
        found = []  # the store is away: the other gauges still come
    for kind, bucket, _, in_use, held in found:
        got = sums.setdefault((bucket.split("|", 1)[0], kind), [0, 0])
        got[0] += in_use
        got[1] += held
    for (task, kind), (in_use, held) in sorted(sums.items()):
        used.add_metric([task, kind], in_use)
        waiting.add_metric([task, kind], held)
    yield used
    yield waiting


def open_websockets(connections: Collection[Any]) -> int:
    """How many of the server's connections are WebSockets."""
    return sum(1 for c in connections if getattr(c, "ws", None) is not None)


class _StateCollector:
    """Gauges read at scrape time: tasks waiting/running, worker processes, open connections."""

    def __init__(self, connections: Optional[Collection[Any]], runtime: Optional["Runtime"] = None) -> None:
        self.connections = connections
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        if runtime is None:
            from ..runtime import get_runtime
            runtime = get_runtime()
        g = GaugeMetricFamily("greenqueue_tasks", "Tasks now, by state", labels=["state"])
        stats = runtime.counts()
        for state in ("running", "pending", "scheduled"):
            g.add_metric([state], stats[state])
        yield g
        workers = GaugeMetricFamily("greenqueue_workers", "Worker processes", labels=["pool", "state"])
        calls = CounterMetricFamily("greenqueue_worker_calls", "Calls served by live workers", labels=["pool"])
        restarts = CounterMetricFamily("greenqueue_worker_restarts", "Workers replaced", labels=["pool"])
        rss = GaugeMetricFamily("greenqueue_worker_rss_bytes", "Resident memory of a pool's workers",
                                labels=["pool"])
        for pool in runtime.pools.stats():
            ws = pool["workers"]
            name = pool["name"]
            workers.add_metric([name, "alive"], len(ws))
            workers.add_metric([name, "busy"], sum(1 for w in ws if w["busy"]))
            calls.add_metric([name], sum(w["calls"] for w in ws))
            restarts.add_metric([name], pool["restarts"])
            rss.add_metric([name], sum(_rss_bytes(w["pid"]) or 0 for w in ws if w["pid"]))
        yield workers
        yield calls
        yield restarts
        yield rss
        yield from _limit_gauges(runtime)
        conns = GaugeMetricFamily("greenqueue_http_connections", "Open client connections")
        conns.add_metric([], len(self.connections) if self.connections is not None else 0)
        yield conns
        sockets = GaugeMetricFamily("greenqueue_websockets", "Open WebSockets (connections the app took over)")
        sockets.add_metric([], open_websockets(self.connections) if self.connections is not None else 0)
        yield sockets
        store = runtime.store
        if runtime.node is not None:
            # Which node this scrape came from, and whether it leads the scheduler: Prometheus
            # scrapes every node, and these labels tell the series apart.
            node = GaugeMetricFamily("greenqueue_node", "This cluster node (1), by node id and store",
                                     labels=["node", "store"])
            node.add_metric([store.node, store.display], 1)
            yield node
            leader = GaugeMetricFamily("greenqueue_scheduler_leader", "1 while this node leads the scheduler",
                                       labels=["node"])
            leader.add_metric([store.node], 1 if runtime.scheduler.leading else 0)
            yield leader
        proc = GaugeMetricFamily("greenqueue_process_rss_bytes", "Resident memory of the server process")
        proc.add_metric([], _rss_bytes(os.getpid()) or 0)
        yield proc
