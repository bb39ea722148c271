"""Workflow steps in a store: what a parent's end does to the steps waiting for it, in the same transaction.

Concurrency model: runs inside the transaction of the statement that made
the parent final (a node's finish, a reap, a cancel), on a connection the
calling engine owns and locks, so a kill -9 at any moment either leaves the
parent unfinished and its children waiting, or both done: no step is lost
and no chord body released twice (the countdown of parents left is a column
of the body's row, decremented in that transaction). Both engines run these
rules through :class:`Tx`, with ``?`` placeholders.
"""

import json
from typing import Any, Iterable, List, Optional, Protocol, Sequence, Set, Tuple

from ._codec import dumps, loads

__all__ = ["Tx", "follow", "LINKED"]

#: The WHERE term of rows whose end releases or ends other rows.
LINKED = "(then_ids IS NOT NULL OR error_ids IS NOT NULL)"
# What the steps below read of a parent, and of a child whose turn came.
_PARENT = "id, name, state, result, serializer, error_type, error, traceback, then_ids, error_ids"


class Tx(Protocol):
    """A statement runner inside an engine's open transaction."""

    #: The database's clock at the transaction's start, and how long final rows are kept.
    now: float
    result_ttl: float
    #: Extra SQL an engine adds to make a released row claimable (``hold = ...``).
    ready_or_gated: str

    def rows(self, sql: str, params: Sequence[Any]) -> List[tuple]:
        """The rows of a statement (``?`` placeholders)."""

    def run(self, sql: str, params: Sequence[Any]) -> int:
        """Run a statement; the rows it changed."""


def follow(tx: Tx, ended: Iterable[str]) -> Set[str]:
    """Rows ``ended`` just became final: release, end or cancel the steps waiting on them; the queues released."""
    queues: Set[str] = set()
    ids = list(ended)
    for part in (ids[i:i + 500] for i in range(0, len(ids), 500)):
        found = tx.rows("SELECT %s FROM greenqueue_tasks WHERE id IN (%s) AND %s"
                        % (_PARENT, ", ".join("?" * len(part)), LINKED), part)
        for parent in found:
            _parent_ended(tx, parent, queues)
    return queues


def _parent_ended(tx: Tx, parent: tuple, queues: Set[str]) -> None:
    row_id, name, state, _, _, error_type, error, traceback, then_ids, error_ids = parent
    then, errbacks = _ids(then_ids), _ids(error_ids)
    if state != "SUCCESS" and not error_type:  # cancelled or expired before it ran
        error_type = "TaskExpired" if state == "EXPIRED" else "CancelledError"
        error = "an earlier step, %s[%s], ended %s" % (name, row_id, state)
    if state == "SUCCESS":
        for child in then:
            _one_parent_done(tx, child, queues)
        for child in errbacks:
            _end(tx, child, "CANCELLED", "CancelledError", "task %s[%s] succeeded: its link_error does not run"
                 % (name, row_id), None)
        return
    for child in then:
        _end(tx, child, "FAILURE" if state == "FAILURE" else state, error_type, error, traceback,
             failed=(name, row_id, state))
    for child in errbacks:
        _one_parent_done(tx, child, queues, failed=row_id)


def _one_parent_done(tx: Tx, child: str, queues: Set[str], failed: Optional[str] = None) -> None:
    """One parent of ``child`` ended its way: with none left, give the child its arguments and its turn."""
    got = tx.rows("UPDATE greenqueue_tasks SET waits = waits - 1 WHERE id = ? AND hold = 'after' AND owner IS NULL "
                  "RETURNING waits, parents, takes, payload, serializer, wait, queue", (child,))
    if not got or got[0][0] > 0:
        return  # gone, ended already (a sibling parent failed), or still waiting for others
    _, parents, takes, payload, serializer, wait, queue = got[0]
    try:
        data = loads(serializer, payload)
        data["args"] = list(_first(tx, _ids(parents), takes, failed)) + list(data.get("args", []))
        blob = dumps(serializer, data)
    except (TypeError, ValueError) as exc:
        # A parent's result this step's serializer cannot carry: it ends here, saying so.
        _end(tx, child, "FAILURE", "SerializationError", "its parent's result cannot be passed on as %s (%s); "
             "use @task(serializer='pickle') on both" % (serializer.upper(), exc), None)
        return
    delay = float(wait or 0.0)
    tx.run("UPDATE greenqueue_tasks SET payload = ?, waits = 0, state = ?, eta = ?, due = ?, updated_at = ?, "
           "hold = CASE WHEN ? > 0 THEN 'eta' ELSE %s END WHERE id = ?" % tx.ready_or_gated,
           (blob, "SCHEDULED" if delay > 0 else "PENDING", tx.now + delay if delay > 0 else None, tx.now + delay,
            tx.now, delay, child))
    if delay <= 0:
        queues.add(queue)


def _first(tx: Tx, parents: List[str], takes: Optional[str], failed: Optional[str]) -> Tuple[Any, ...]:
    """What a released step's arguments begin with."""
    if takes == "id":
        return (failed,)
    if takes not in ("result", "results") or not parents:
        return ()
    found = {r[0]: loads(r[2], r[1]) if r[1] is not None else None
             for r in tx.rows("SELECT id, result, serializer FROM greenqueue_tasks WHERE id IN (%s)"
                              % ", ".join("?" * len(parents)), parents)}
    results = [found.get(p) for p in parents]
    return (results[0],) if takes == "result" else (results,)


def _end(tx: Tx, child: str, state: str, error_type: Optional[str], error: Optional[str],
         traceback: Optional[str], failed: Optional[Tuple[str, str, str]] = None) -> None:
    """End a waiting step without running it, and the steps after it the same way (its errbacks cancelled)."""
    todo: List[Tuple[str, str, Optional[str], Optional[str], Optional[str]]] = [
        (child, state, error_type, error, traceback)]
    while todo:
        row_id, state, error_type, error, traceback = todo.pop()
        got = tx.rows("SELECT chord FROM greenqueue_tasks WHERE id = ? AND hold = 'after' AND owner IS NULL",
                      (row_id,))
        if not got:
            continue
        kind, message = error_type, error
        if got[0][0] and failed is not None:
            kind, message = "ChordError", "chord member %s[%s] ended %s: %s: %s" % (
                failed[0], failed[1], failed[2], error_type, error)
        ended = tx.rows("UPDATE greenqueue_tasks SET state = ?, error_type = ?, error = ?, traceback = ?, "
                        "finished_at = ?, expires_at = ?, updated_at = ?, hold = NULL, waits = 0 "
                        "WHERE id = ? AND hold = 'after' AND owner IS NULL RETURNING then_ids, error_ids",
                        (state, kind, message, traceback, tx.now, tx.now + tx.result_ttl, tx.now, row_id))
        for then_ids, error_ids in ended:
            todo += [(c, state, kind, message, traceback) for c in _ids(then_ids)]
            todo += [(c, "CANCELLED", "CancelledError", "an earlier step ended %s" % state, None)
                     for c in _ids(error_ids)]


def _ids(text: Optional[str]) -> List[str]:
    return list(json.loads(text)) if text else []
