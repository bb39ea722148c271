"""The gate of a claim: which waiting rows start now under their rate and concurrency limits.

Concurrency model: pure functions over values an engine read inside its claim
transaction (with the buckets locked against other nodes' claims); the
engine writes what :func:`decide` answers in the same transaction. Nothing
here touches a database, so both engines share one set of rules.

Rules (DESIGN "Flow control"): rows start by priority, then due time, then
spawn order, whether limited or not. A row over its concurrency limit is
parked until a run of its key ends; a row over its rate limit is held until
the window has room again (sliding: at most N starts in any window of the
period), so neither holds a slot nor is looked at again before then.
"""

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["Candidate", "Verdict", "decide", "hold_of", "GATED", "START_ORDER"]

#: ``hold`` for a row that came due but is limited: the claim's gate looks at it.
GATED = "gate"
#: The order rows start in, as SQL (both engines' indexes are built for it).
START_ORDER = "priority DESC, due, created_at"
#: A start is recorded when a row is claimed, a little before the task's first line runs on its
#: node (the commit, the hop back, the greenlet's start: milliseconds, more when a node is busy).
#: Windows are kept this much longer, so the starts the task itself sees obey the limit too.
LAG = 0.1


def margin(per: float) -> float:
    """How much longer than ``per`` a rate window is kept: LAG, or a tenth of a short period."""
    return min(LAG, per / 10.0)


def hold_of(row: Any, now: float) -> Optional[str]:
    """The ``hold`` a new unowned row starts with: waiting for parents, due later, limited (the gate's), or ready."""
    if row.waits:
        return "after"
    if row.eta is not None and row.eta > now:
        return "eta"
    return GATED if row.rate_bucket is not None or row.limit_bucket is not None else None


@dataclass
class Candidate:
    """A waiting row the claim may start: ready (no limits) or gated."""

    id: str
    priority: int
    due: float
    created_at: float
    gated: bool = False
    rate_bucket: Optional[str] = None
    rate_n: Optional[int] = None
    rate_per: Optional[float] = None
    limit_bucket: Optional[str] = None
    limit_n: Optional[int] = None

    def order(self) -> Tuple[int, float, float]:
        """The sort key of the start order."""
        return (-self.priority, self.due, self.created_at)


@dataclass
class Verdict:
    """What the claim writes: rows to claim, rows to park, rows to hold until a time, starts to record."""

    take: List[str] = field(default_factory=list)
    park: List[str] = field(default_factory=list)
    hold: List[Tuple[str, float]] = field(default_factory=list)
    # (bucket, at, until it leaves the window, task id): a start now, or a start reserved for later.
    starts: List[Tuple[str, float, float, str]] = field(default_factory=list)


def decide(candidates: Sequence[Candidate], limit: int, now: float,
           running_of: Callable[[List[str]], Dict[str, int]],
           starts_of: Callable[[str, float, int], List[Tuple[float, str]]],
           reserved: Callable[[str, float, str], bool]) -> Verdict:
    """Walk ``candidates`` in start order and take up to ``limit``; gated rows pass only within their limits.

    ``running_of(buckets)`` counts each bucket's runs whose lease is alive (one query for all);
    ``starts_of(bucket, since, n)`` lists the bucket's latest ``n`` starts after ``since`` as (time,
    task id), oldest first: those made, and those reserved for rows held until their turn (the
    window's only other fact needed is whether it holds ``n``); ``reserved(bucket, at, id)`` says
    whether a start at ``at`` is reserved for that row. Candidates past the ``limit``-th taken row
    are left as they are.

    A row over its rate gets the next start the window allows, reserved in its name and behind every
    reservation already made, and is held until then; when it comes back it starts on that
    reservation. So a backlog of N rows is looked at about twice each, not once per window.
    """
    verdict = Verdict()
    gated = [c for c in candidates if c.gated]
    buckets = sorted({c.limit_bucket for c in gated if c.limit_bucket is not None and c.limit_n is not None})
    running: Dict[str, int] = running_of(buckets) if buckets else {}
    recent: Dict[str, List[Tuple[float, str]]] = {}
    for c in sorted(candidates, key=Candidate.order):
        if len(verdict.take) >= limit:
            break
        if not c.gated:
            verdict.take.append(c.id)
            continue
        if c.limit_bucket is not None and c.limit_n is not None and running.get(c.limit_bucket, 0) >= c.limit_n:
            verdict.park.append(c.id)
            continue
        if c.rate_bucket is not None and c.rate_n is not None and c.rate_per is not None:
            per = c.rate_per + margin(c.rate_per)
            n = c.rate_n
            window = recent.get(c.rate_bucket)
            if window is None:
                window = recent[c.rate_bucket] = list(starts_of(c.rate_bucket, now - per, n))
            mine = c.due > now - per and (any(task_id == c.id for _, task_id in window)
                                          or reserved(c.rate_bucket, c.due, c.id))
            if not mine:  # else it starts on the start reserved for it
                if len(window) >= n:
                    # The n-th latest start (made or reserved) leaves the window then: reserve that.
                    at = window[len(window) - n][0] + per
                    window.append((at, c.id))
                    del window[:-n]
                    verdict.starts.append((c.rate_bucket, at, at + per, c.id))
                    verdict.hold.append((c.id, at))
                    continue
                bisect.insort(window, (now, c.id))  # reservations may lie ahead of it
                del window[:-n]
                verdict.starts.append((c.rate_bucket, now, now + per, c.id))
        if c.limit_bucket is not None:
            running[c.limit_bucket] = running.get(c.limit_bucket, 0) + 1
        verdict.take.append(c.id)
    return verdict
