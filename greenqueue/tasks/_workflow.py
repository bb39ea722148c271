"""Workflow steps held in this process (no journal): who waits for whom, and groups' members.

Concurrency model: the task hub's thread only, like the runner that owns it.
A durable store keeps the same links in its rows and releases steps in the
transaction of a parent's finish; this part does it for the memory store,
when a parent's result becomes final here.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from ._result import CANCELLED, FAILURE, SUCCESS, TaskResult, resolve

__all__ = ["Workflows", "Step", "first_args", "TAKES_RESULT", "TAKES_RESULTS", "TAKES_ID"]

#: How a step's arguments begin once its parents ended: with the parent's result (a chain step, a
#: ``link``), with the list of its parents' results in order (a chord's body), with the failed
#: parent's id (a ``link_error``), or with nothing (an immutable signature, ``.si()``).
TAKES_RESULT = "result"
TAKES_RESULTS = "results"
TAKES_ID = "id"


@dataclass
class Step:
    """One run of a workflow: its task and arguments, what it waits for, and who waits for it."""

    id: str
    #: The Signature it runs (task, arguments, options).
    sig: Any
    #: Parents whose end this step waits for (their results, in order, become its first argument).
    parents: List[str] = field(default_factory=list)
    #: What its arguments begin with once its parents ended (TAKES_*), or None.
    takes: Optional[str] = None
    #: Steps released when it succeeds, and when it fails (link_error).
    then: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    #: The chord it is the body of (its failure names the member), for the error message.
    chord: bool = False

    @property
    def root(self) -> bool:
        """True when it starts at once (no parent)."""
        return not self.parents


@dataclass
class _Waiting:
    """A step whose parents have not all ended yet."""

    step: Step
    handle: TaskResult[Any]
    left: int


class Workflows:
    """Steps waiting for parents, the links of steps that have children, and groups' member ids."""

    def __init__(self, start: Callable[[Step, TaskResult[Any], tuple], None],
                 settle: Callable[[TaskResult[Any]], None]) -> None:
        #: ``start(step, handle, first_args)``: run a step whose turn came.
        self._start = start
        #: ``settle(handle)``: keep the result of a step that ended without running.
        self._settle = settle
        self._waiting: Dict[str, _Waiting] = {}
        self._links: Dict[str, Step] = {}      # step id -> the step, while it has children to tell
        self._handles: Dict[str, TaskResult[Any]] = {}
        self.groups: Dict[str, List[str]] = {}

    def add(self, steps: Sequence[Step], handles: Dict[str, TaskResult[Any]]) -> None:
        """Hold ``steps`` (their handles made): the ones with parents wait, the ones with children are watched."""
        for step in steps:
            if step.parents:
                self._waiting[step.id] = _Waiting(step, handles[step.id], len(step.parents))
                self._handles[step.id] = handles[step.id]
            if step.then or step.errors:
                self._links[step.id] = step

    def waiting(self, task_id: str) -> Optional[TaskResult[Any]]:
        """The handle of a step still waiting for its parents (greenqueue.result finds it)."""
        held = self._waiting.get(task_id)
        return None if held is None else held.handle

    def watches(self, task_id: str) -> bool:
        """True when a step waits for this task's end."""
        return task_id in self._links

    def ended(self, r: TaskResult[Any], handle_of: Callable[[str], Optional[TaskResult[Any]]]) -> None:
        """``r`` is final: give its children their turn, or end them with its failure."""
        step = self._links.pop(r.id, None)
        if step is None:
            return
        if r.state == SUCCESS:
            for child in step.then:
                self._one_parent_done(child, handle_of)
            for child in step.errors:
                self._drop(child, CANCELLED, None)
        else:
            for child in step.then:
                self._fail(child, r)
            for child in step.errors:
                self._one_parent_done(child, handle_of, failed=r.id)

    def _one_parent_done(self, child_id: str, handle_of: Callable[[str], Optional[TaskResult[Any]]],
                         failed: Optional[str] = None) -> None:
        held = self._waiting.get(child_id)
        if held is None:
            return  # ended already (a sibling parent failed)
        held.left -= 1
        if held.left > 0:
            return
        del self._waiting[child_id]
        self._handles.pop(child_id, None)
        self._start(held.step, held.handle, first_args(held.step, handle_of, failed))

    def _fail(self, child_id: str, parent: TaskResult[Any]) -> None:
        from ..errors import ChordError
        held = self._waiting.get(child_id)
        if held is None:
            return
        if held.step.chord:
            exc: Optional[BaseException] = ChordError("chord member %s[%s] ended %s: %s" % (
                parent.name, parent.id, parent.state, parent.exception))
        else:
            exc = parent.exception
        self._drop(child_id, FAILURE, exc, parent.traceback)

    def _drop(self, child_id: str, state: str, exc: Optional[BaseException], tb: Optional[str] = None) -> None:
        """End a waiting step without running it, and the steps after it the same way."""
        held = self._waiting.pop(child_id, None)
        if held is None:
            return
        self._handles.pop(child_id, None)
        resolve(held.handle, state, exc=exc, tb=tb)
        self._settle(held.handle)
        step = self._links.pop(child_id, None)
        if step is not None:
            for later in step.then:
                self._drop(later, state, exc, tb)
            for later in step.errors:
                self._drop(later, CANCELLED, None)

    def cancel(self, task_id: str) -> bool:
        """Cancel a step still waiting for its parents (and the steps after it); False if none waits."""
        from ..errors import CancelledError
        held = self._waiting.get(task_id)
        if held is None:
            return False
        self._drop(task_id, CANCELLED, CancelledError("task %s[%s] was cancelled" % (held.handle.name, task_id)))
        return True

    def clear(self) -> None:
        """Forget everything (the runner stops)."""
        self._waiting.clear()
        self._links.clear()
        self._handles.clear()
        self.groups.clear()


def first_args(step: Step, handle_of: Callable[[str], Optional[TaskResult[Any]]],
               failed: Optional[str] = None) -> tuple:
    """What a released step's arguments begin with: its parent's result, its parents' results, a failed id."""
    if step.takes == TAKES_ID:
        return (failed,)
    results = []
    for parent in step.parents:
        h = handle_of(parent)
        results.append(None if h is None else h.result)
    if step.takes == TAKES_RESULT:
        return (results[0],)
    if step.takes == TAKES_RESULTS:
        return (results,)
    return ()
