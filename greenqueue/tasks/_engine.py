"""The task engine: slots, waiting lines, the delay heap and the idle worker, over records of its own.

Concurrency model: everything here runs on the task hub's thread (the
``Runner`` hands calls from other threads over before they reach this
code), so the state needs no lock. The engine knows nothing of stores,
events or results: the runner gives it an :class:`Entry` per task it
holds and a function that runs one attempt of an entry; the engine decides
when. Every started attempt gets its own greenlet; at most
``max_concurrency`` of them hold a slot. Waiting entries sit in a deque per
priority (the default priority's is the only one most processes ever use;
idle ones in a deque of their own served only from ``gevent.idle()`` by one
idle-worker greenlet); delayed entries sit in one heap keyed by
``time.monotonic()`` and are released by one timer greenlet. A task
blocked on another lends its slot out (``lend_slot``) and takes it back
when it wakes, so a task waiting on another never deadlocks the pool.
Nothing here blocks the hub.
"""

import collections
import heapq
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Tuple

import gevent
from gevent import Greenlet
from gevent.event import Event

from ._limits import PARKED, Gate
from ._options import TaskOptions
from ._result import PENDING, READY_STATES, SCHEDULED, TaskResult

if TYPE_CHECKING:
    from gevent.event import Event as EventT

__all__ = ["TaskEngine", "Entry", "PENDING_LINE", "IDLE_LINE", "DELAYED", "RUNNING", "ABANDONED"]

_monotonic = time.monotonic

#: Where an entry is: waiting for a slot, waiting for an idle hub, delayed, waiting for a run of its
#: concurrency key to end, running, given up to another node whose lease it is now (its greenlet ends
#: without a result), or None: nowhere yet/any more.
PENDING_LINE = "pending"
LIMITED = "limited"
IDLE_LINE = "idle"
DELAYED = "scheduled"
RUNNING = "running"
ABANDONED = "abandoned"


class _TaskGreenlet(Greenlet):
    """The greenlet a task runs in."""

    # No snapshot of the spawning stack: it is a third of the cost of creating the
    # greenlet, and would show the runner's dispatch loop rather than the caller.
    spawning_stack_limit = 0


@dataclass(slots=True, eq=False)
class Entry:
    """The runner's record of a task it holds: what to call, where it waits, whether it holds a slot."""

    # Slots keep a waiting task small: 100,000 scheduled tasks are a normal load.
    handle: TaskResult[Any]
    fn: Optional[Callable[..., Any]]
    args: tuple
    kwargs: dict
    opts: TaskOptions
    #: The Flask app whose context the task runs in (None: none).
    app: Any = None
    idle: bool = False
    where: Optional[str] = None
    slot: bool = False
    #: Set when the store records this task (a durable store, an ``@task``).
    serializer: Optional[str] = None
    #: True while this process's gate counts the attempt against its concurrency key.
    gated: bool = False
    #: Why a delayed entry waits when it is not its eta: "rate limit" (this process's gate).
    waits: Optional[str] = None

    def __repr__(self) -> str:
        return "<Entry %s %s>" % (self.handle.id, self.where)


class TaskEngine:
    """Slot accounting: entries in, attempts started in task greenlets when a slot is free."""

    def __init__(self, run_attempt: Callable[[Entry], None]) -> None:
        self.max_concurrency = 100
        self._run_attempt = run_attempt
        self.active = 0                       # slots in use
        self._pending: Deque[Entry] = collections.deque()  # waiting entries of priority 0 (may hold removed ones)
        self._ranked: Dict[int, Deque[Entry]] = {}         # waiting entries of other priorities, by priority
        self._idle_q: Deque[Entry] = collections.deque()   # waiting idle entries (may hold removed ones)
        self.pending_count = 0                # live entries of both deques
        self._heap: List[Tuple[float, int, Entry]] = []    # (due monotonic, seq, entry)
        self.scheduled_count = 0
        self._seq = 0
        self._running: Dict[Any, Entry] = {}  # task greenlet -> entry
        self._timer: Optional[Greenlet[..., Any]] = None
        self._timer_wake: Optional["EventT"] = None
        self._idle_worker: Optional[Greenlet[..., Any]] = None
        self._idle_wake: Optional["EventT"] = None
        #: Called when a slot frees and nothing waits here (a node's claimer listens).
        self.on_free_slot: Optional[Callable[[], None]] = None
        #: Limits of entries no store judges (without a journal).
        self.gate = Gate()
        self.limited_count = 0                # entries waiting for a run of their concurrency key to end

    # -- counts -----------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Task greenlets started and not finished."""
        return len(self._running)

    def free_slots(self) -> int:
        """Slots free for claimed work: nothing waits here and fewer than max_concurrency run."""
        return max(0, self.max_concurrency - self.active - self.pending_count)

    def has_free_slot(self) -> bool:
        """True when a task due now would start at once (a slot is free and nothing waits)."""
        return self.active < self.max_concurrency and not self._pending and not self._ranked

    def busy(self) -> bool:
        """True when a new waiting task would have to wait behind others."""
        return bool(self._pending) or bool(self._ranked) or self.active >= self.max_concurrency

    # -- slots ------------------------------------------------------------------------

    def current(self) -> Optional[Entry]:
        """The entry running in the calling greenlet (None outside a task)."""
        return self._running.get(gevent.getcurrent())

    def lend_slot(self, waiting_on: TaskResult[Any]) -> Optional[Entry]:
        """Free the calling task's slot while it waits on ``waiting_on``; the entry to give it back to."""
        e = self._running.get(gevent.getcurrent())
        if e is None or not e.slot or e.handle is waiting_on:
            return None
        e.slot = False
        self.active -= 1
        self.dispatch()
        return e

    def take_slot_back(self, e: Entry) -> None:
        """Give ``e`` its slot back when its wait ends."""
        # May exceed max_concurrency for a moment: the woken task must not wait
        # behind tasks that started while it was blocked (that could deadlock).
        e.slot = True
        self.active += 1

    # -- waiting lines -------------------------------------------------------------

    def enqueue(self, e: Entry) -> None:
        """Put a due entry in line (or straight into a free slot); never raises Overloaded."""
        if e.idle:
            e.where = IDLE_LINE
            self._idle_q.append(e)
            self.pending_count += 1
            self._kick_idle()
        elif self.active < self.max_concurrency and not self._pending and not self._ranked:
            self.start(e)
        else:
            self.queue_behind(e)

    def queue_behind(self, e: Entry) -> None:
        """Put ``e`` at the end of its priority's waiting line even when a slot is free (a retry, for fairness)."""
        e.where = PENDING_LINE
        priority = e.opts.priority
        if priority:
            line = self._ranked.get(priority)
            if line is None:
                line = self._ranked[priority] = collections.deque()
            line.append(e)
        else:
            self._pending.append(e)
        self.pending_count += 1

    def _next_line(self) -> Optional[Deque[Entry]]:
        """The waiting line to start from: the highest priority's (None: nothing waits)."""
        ranked = self._ranked
        while ranked:
            top = max(ranked)
            line = ranked[top]
            if not line:
                del ranked[top]
            elif top > 0 or not self._pending:
                return line
            else:
                break
        return self._pending or None

    def remove(self, e: Entry) -> None:
        """Take ``e`` out of whatever line or heap it waits in (cancel)."""
        if e.where in (PENDING_LINE, IDLE_LINE):
            self.pending_count -= 1
        elif e.where == DELAYED:
            self.scheduled_count -= 1
        elif e.where == LIMITED:
            self.limited_count -= 1
        if e.waits is not None:
            self.gate.unhold(e)
        e.where = None  # the deques and the heap skip it when they reach it

    def start(self, e: Entry) -> None:
        """Start ``e``'s attempt in a new task greenlet, in a slot (or hold it back while a limit says so)."""
        if e.opts.limited and e.serializer is None:
            wait = self.gate.admit(e)
            if wait is not None:
                if wait == PARKED:
                    e.where = LIMITED
                    self.limited_count += 1
                else:
                    self.schedule(e, wait)
                return
            e.gated = e.opts.limit_bucket is not None
        self.active += 1
        e.slot = True
        e.where = RUNNING
        g = _TaskGreenlet(self._run, e)
        self._running[g] = e
        g.start()

    def dispatch(self) -> None:
        """Start waiting entries while slots are free; wake the idle worker when only idle ones wait."""
        pending = self._pending
        while self.active < self.max_concurrency:
            line = self._next_line() if self._ranked else (pending or None)
            if line is None:
                break
            e = line.popleft()
            if not line and line is not pending:
                del self._ranked[e.opts.priority]
            if e.where != PENDING_LINE:
                continue  # removed while waiting
            self.pending_count -= 1
            self.start(e)
        waiting = bool(pending) or bool(self._ranked)
        if self._idle_q and not waiting and self.active < self.max_concurrency and self._idle_wake is not None:
            self._idle_wake.set()
        if self.on_free_slot is not None and not waiting and self.active < self.max_concurrency:
            self.on_free_slot()

    # -- delayed entries ----------------------------------------------------------

    def schedule(self, e: Entry, delay: Optional[float]) -> None:
        """Hold ``e`` until ``delay`` seconds from now, then put it in line."""
        due = _monotonic() + (delay or 0.0)
        self._seq += 1
        e.where = DELAYED
        self.scheduled_count += 1
        heap = self._heap
        earliest = heap[0][0] if heap else None
        heapq.heappush(heap, (due, self._seq, e))
        if self._timer is None or self._timer_wake is None:
            self._timer_wake = Event()
            self._timer = gevent.spawn(self._timer_loop, self._timer_wake)
        elif earliest is None or due < earliest:
            self._timer_wake.set()

    def _timer_loop(self, wake: "EventT") -> None:
        heap = self._heap
        while True:
            now = _monotonic()
            while heap and heap[0][0] <= now:
                e = heapq.heappop(heap)[2]
                if e.where != DELAYED:
                    continue  # removed while delayed
                self.scheduled_count -= 1
                if e.handle.state == SCHEDULED:
                    e.handle.state = PENDING
                self.enqueue(e)
            if len(heap) > 64 and len(heap) > 2 * self.scheduled_count:
                # Removed entries would otherwise stay until their due time.
                heap[:] = [item for item in heap if item[2].where == DELAYED]
                heapq.heapify(heap)
            wake.clear()
            wake.wait(heap[0][0] - now if heap else None)

    # -- idle entries ---------------------------------------------------------------

    def _kick_idle(self) -> None:
        if self._idle_worker is None or self._idle_wake is None:
            self._idle_wake = Event()
            self._idle_worker = gevent.spawn(self._idle_loop, self._idle_wake)
        else:
            self._idle_wake.set()

    def _idle_loop(self, wake: "EventT") -> None:
        idle_q = self._idle_q
        try:
            while idle_q:
                gevent.idle()
                if self._pending or self._ranked or self.active >= self.max_concurrency:
                    wake.clear()
                    wake.wait()
                    continue
                e = idle_q.popleft()
                if e.where != IDLE_LINE:
                    continue
                self.pending_count -= 1
                self.start(e)
        finally:
            self._idle_worker = None

    # -- running --------------------------------------------------------------------

    def _run(self, e: Entry) -> None:
        g = gevent.getcurrent()
        try:
            if e.handle.state not in READY_STATES:  # cancelled between start() and now
                self._run_attempt(e)
        finally:
            del self._running[g]
            if e.slot:
                e.slot = False
                self.active -= 1
            if e.gated:
                e.gated = False
                self.gate.ended(e)
                self._unpark(e.opts.limit_bucket or "")
            self.dispatch()

    def _unpark(self, bucket: str) -> None:
        """Put the next live entry parked on ``bucket`` back in line."""
        while True:
            e = self.gate.unpark(bucket)
            if e is None:
                return
            if e.where == LIMITED:
                self.limited_count -= 1
                self.queue_behind(e)
                return

    def greenlet_of(self, e: Entry) -> "Optional[Greenlet[..., Any]]":
        """The greenlet ``e``'s attempt runs in, or None (found among the running: a slot per entry is dearer)."""
        if e.where not in (RUNNING, ABANDONED):
            return None
        return next((g for g, running in self._running.items() if running is e), None)

    # -- listing and stopping ---------------------------------------------------------

    def running_entries(self) -> List[Entry]:
        """Entries whose attempt runs now."""
        return list(self._running.values())

    def waiting_entries(self) -> List[Entry]:
        """Entries waiting for a slot, normal ones first, in the order they will start; then parked ones."""
        ranked = sorted(self._ranked.items(), reverse=True)
        lines = [line for p, line in ranked if p > 0] + [self._pending] + [line for p, line in ranked if p < 0] \
            + [self._idle_q]
        return [e for line in lines for e in line if e.where in (PENDING_LINE, IDLE_LINE)] \
            + [e for e in self.gate.parked_entries() if e.where == LIMITED]

    def waiting_reasons(self, limit: int) -> List[Tuple[Entry, str]]:
        """Up to ``limit`` waiting and delayed entries each, with why each waits."""
        top = max((p for p, line in self._ranked.items() if line), default=0)
        if self._pending:
            top = max(top, 0)
        out: List[Tuple[Entry, str]] = []
        for e in self.waiting_entries()[:limit]:
            out.append((e, "concurrency limit" if e.where == LIMITED else "idle hub" if e.where == IDLE_LINE
                        else "priority" if e.opts.priority < top else "slot"))
        out.extend((e, e.waits or "eta") for e in self.delayed_entries(limit))
        return out

    def delayed_entries(self, limit: int) -> List[Entry]:
        """Up to ``limit`` delayed entries, soonest first."""
        return [item[2] for item in heapq.nsmallest(limit, self._heap) if item[2].where == DELAYED][:limit]

    def stop(self, timeout: float) -> None:
        """Kill the task greenlets and the helper greenlets, and forget every line."""
        greenlets: List[Any] = [g for g in (self._timer, self._idle_worker) if g is not None]
        greenlets.extend(self._running)
        self._timer = self._idle_worker = None
        if greenlets:
            gevent.killall(greenlets, block=True, timeout=timeout)
        self._pending.clear()
        self._ranked.clear()
        self._idle_q.clear()
        self._heap.clear()
        self.gate.clear()
        self.limited_count = 0
        self.pending_count = self.scheduled_count = 0
