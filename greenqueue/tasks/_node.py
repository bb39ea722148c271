"""A node of a cluster: claims due rows for free slots, heartbeats its leases, reaps dead nodes' rows.

Concurrency model: four greenlets on the task hub, started by the runtime
when the store is shared (``ClusterStore``):

* the claimer takes due rows for the runner's free slots (never more:
  no prefetch), then sleeps until a wake-up: a slot frees here, another
  node enqueued work (the engine's LISTEN hint), the next delayed row is
  due, or the poll interval passed (a lost hint delays nothing longer);
* the listener waits on the engine's notifications (only in a
  monkey-patched process, where that wait is cooperative);
* the heartbeat renews every lease this node holds in one statement each
  second, stops tasks cancelled from another node and drops tasks whose
  lease went elsewhere; every few beats it reaps rows whose lease expired
  (any node's) and now and then prunes old rows;
* the watcher asks the store, in one read, about the tasks spawned here
  that run elsewhere, so ``get()`` on them returns: at once when the
  engine's hint says another node wrote something, else every 0.2 s for
  handles someone waits on and every second for the rest.

A store outage shows as JournalError in these loops: each logs one line
when it starts failing and one when it recovers, and retries with backoff.
"""

import logging
import random
import time
from typing import Any, Callable, List, Optional

import gevent
from gevent.event import Event

from ..errors import GreenqueueError
from ..journal import Store, TaskRow
from ._runner import Runner

log = logging.getLogger(__name__)

__all__ = ["Node"]

POLL = 1.0          # seconds between claims when no hint arrives
HEARTBEAT = 1.0     # seconds between heartbeats (a cancel reaches its node within about this)
REAP_EVERY = 3      # heartbeats between reaps
PRUNE_EVERY = 600   # heartbeats between prunes
WATCH = 0.2         # seconds between looks at tasks that run elsewhere
UNKNOWN_RETRY = 10.0  # seconds before a task no node here knows is offered again


class _Trouble:
    """One log line when a loop starts failing and one when it recovers; a growing pause between."""

    def __init__(self, what: str, display: str) -> None:
        self.what = what
        self.display = display
        self.failing_since: Optional[float] = None
        self.pause = 0.2

    def failed(self, exc: BaseException) -> float:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning("cluster %s: %s failed: %s (retrying)", self.display, self.what, exc)
        self.pause = min(5.0, self.pause * 2)
        return self.pause * random.uniform(0.5, 1.0)

    def ok(self) -> None:
        if self.failing_since is not None:
            log.info("cluster %s: %s works again after %.1fs", self.display, self.what,
                     time.monotonic() - self.failing_since)
            self.failing_since = None
        self.pause = 0.2


class Node:
    """The loops that make this process one node of the cluster its store is shared with."""

    def __init__(self, runner: Runner, store: Store, find_task: Callable[[str], Any], listen: bool = True,
                 heartbeat: float = HEARTBEAT, poll: float = POLL) -> None:
        self.runner = runner
        self.store = store
        self.find_task = find_task
        self.listen = listen
        self.heartbeat_interval = min(heartbeat, max(0.2, store.lease_timeout / 3))
        self.poll = poll
        self._wake = Event()
        self._news = Event()   # another node wrote something: look at the tasks that run elsewhere
        self._greenlets: List[Any] = []
        self.healthy = True
        self._unknown: set = set()   # ids of unregistered tasks already reported

    def start(self) -> "Node":
        """Start the loops (on the task hub) and hook the runner's free-slot signal."""
        self.runner.engine.on_free_slot = self.wake
        self.store.on_work = self.wake
        loops = [self._claim_loop, self._beat_loop, self._watch_loop]
        if self.listen:
            loops.append(self._listen_loop)
        self._greenlets = [gevent.spawn(loop) for loop in loops]
        return self

    def wake(self) -> None:
        """Claim now (a slot freed, or work arrived)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop claiming; running tasks are the runner's to drain."""
        self.runner.engine.on_free_slot = None
        self.store.on_work = None
        gevent.killall(self._greenlets, block=True, timeout=5)
        self._greenlets = []

    # -- the loops ------------------------------------------------------------------

    def _claim_loop(self) -> None:
        trouble = _Trouble("claiming tasks", self.store.display)
        runner = self.runner
        while True:
            try:
                free = runner.free_slots()
                rows = self.store.claim(free) if free > 0 else []
                for row in rows:
                    self._run(row)
                trouble.ok()
                self.healthy = True
                if rows and len(rows) == free:
                    continue  # there may be more; the slots decide
                due = self.store.next_due() if free > 0 else None
            except GreenqueueError as exc:
                self.healthy = False
                gevent.sleep(trouble.failed(exc))
                continue
            timeout = self.poll if due is None else max(0.0, min(self.poll, due))
            self._wake.clear()
            self._wake.wait(timeout)

    def _run(self, row: TaskRow) -> None:
        t = self.find_task(row.name)
        if t is None:
            # Another node (a newer deploy) may know it: keep it and offer it again later, never fail it.
            if row.id not in self._unknown:
                self._unknown.add(row.id)
                log.warning("task %s[%s]: no task of that name is registered on this node; kept in the journal "
                            "and offered again every %gs (see python -m greenqueue.journal %s list)",
                            row.name, row.id, UNKNOWN_RETRY, self.store.display)
            # Not an attempt: a node that cannot run it must not use up its retries (another can).
            self.store.offer_again(row.id, row.name, UNKNOWN_RETRY,
                                   "task %r is not registered on node %s" % (row.name, self.store.node))
            return
        self.runner.adopt(row, t)

    def _listen_loop(self) -> None:
        trouble = _Trouble("listening for new work", self.store.display)
        while True:
            try:
                seen = self.store.wait_for_work(5.0)
                if seen:
                    self._news.set()  # results changed: handles followed here look now
                if seen == "work":
                    self._wake.set()
                trouble.ok()
            except GreenqueueError as exc:
                gevent.sleep(trouble.failed(exc))

    def _beat_loop(self) -> None:
        trouble = _Trouble("heartbeat", self.store.display)
        beats = 0
        while True:
            gevent.sleep(self.heartbeat_interval)
            beats += 1
            try:
                beat = self.store.heartbeat(self.runner.running)
                for task_id in beat.cancel:
                    r = self.runner.result(task_id)
                    if r is not None and not r.ready():
                        self.runner.cancel(r)
                for task_id in beat.lost:
                    r = self.runner.abandon(task_id)
                    if r is not None:
                        log.warning("task %s[%s]: lease lost (this node was too slow to renew it); "
                                    "another node runs it", r.name, r.id)
                if beats % REAP_EVERY == 0:
                    for row in self.store.reap():
                        log.warning("task %s[%s]: its node stopped renewing the lease; %s", row.name, row.id,
                                    "failed: " + (row.error or "") if row.state == "FAILURE" else "runs again")
                    if self.runner.free_slots():
                        self._wake.set()
                if beats % PRUNE_EVERY == 1:
                    self.store.prune()
                trouble.ok()
            except GreenqueueError as exc:
                gevent.sleep(trouble.failed(exc))

    def _watch_loop(self) -> None:
        trouble = _Trouble("following tasks that run elsewhere", self.store.display)
        rounds = 0
        while True:
            self._news.wait(WATCH)
            news = self._news.is_set()
            self._news.clear()
            rounds += 1
            try:
                # Handles someone waits on are asked about often; the rest (a loop that polls
                # ready()) about once a second, or whenever another node wrote something.
                handles = self.runner.elsewhere(waited_only=not news and rounds % 5 != 0)
                if handles:
                    by_id = {r.id: r for r in handles}
                    for row in self.store.get_many(list(by_id)):
                        self.runner.settle(by_id[row.id], row)
                trouble.ok()
            except GreenqueueError as exc:
                gevent.sleep(trouble.failed(exc))
