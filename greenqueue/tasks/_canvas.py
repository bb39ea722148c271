"""Workflows as Celery's canvas (public as ``greenqueue.canvas``): ``Signature``, ``chain``, ``group``, ``chord`` and ``link``/``link_error``.

Concurrency model: a canvas is a plain value built in the caller's greenlet;
``.delay()`` turns it into steps (one per task run, ids allotted at once)
and hands them to the runner, which starts the steps with no parent and
keeps the rest waiting. A step's turn comes when its parents end: with a
journal the store releases it in the transaction that records the last
parent's finish (nothing polls, a kill -9 loses no step and runs no body
twice); without one the runner does the same in memory.

Rules (DESIGN "Workflows"): a step runs only after its parents succeeded;
a chain stops at the first failure and its later steps end with that
failure; a chord's body gets the header's results in header order and
ends in ``ChordError`` when a member failed; ``link_error`` callbacks get
the failed task's id first and run once.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import ChordError, ConfigError
from ._options import new_id
from ._result import TaskResult
from ._runner import get_runner
from ._workflow import TAKES_ID, TAKES_RESULT, TAKES_RESULTS, Step

__all__ = ["Signature", "signature", "chain", "group", "chord", "GroupResult", "ChordError", "launch"]


# Options a signature may carry: apply_async's own, plus the timing and callbacks of a run.
_OPTIONS = ("countdown", "eta", "queue", "priority", "expires", "idempotency_key", "link", "link_error")


class Signature:
    """A task with arguments and options, to run later or as a step of a workflow (Celery's ``task.s()``)."""

    def __init__(self, task: Any, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                 options: Optional[Dict[str, Any]] = None, immutable: bool = False) -> None:
        # An @task is what has a registered name, options and a target (no import of the Task class:
        # it imports this module).
        if not (isinstance(getattr(task, "name", None), str) and hasattr(task, "opts") and hasattr(task, "target")):
            raise ConfigError("a signature needs an @task function, got %r; decorate it with @greenqueue.task"
                              % (task,))
        if task.batch_size is not None:
            raise ConfigError("%s is a batch task: it cannot be a step of a workflow" % task.name)
        self.task = task
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.options: Dict[str, Any] = {}
        self.immutable = immutable
        self.set(**(options or {}))
        _check_carried(task, self.args, self.kwargs)

    def set(self, **options: Any) -> "Signature":
        """Set run options (countdown, eta, queue, priority, expires, link, link_error); returns the signature."""
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise ConfigError("%s.s().set(): unknown option(s) %s (known: %s)"
                              % (self.task.name, ", ".join(unknown), ", ".join(_OPTIONS)))
        for key in ("link", "link_error"):
            if key in options:
                options[key] = _signatures(key, options[key])
        self.options.update(options)
        return self

    def clone(self, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None, **options: Any) -> "Signature":
        """A copy with ``args`` in front of its own, ``kwargs`` over its own and ``options`` set."""
        copy = Signature(self.task, tuple(args) + self.args, dict(self.kwargs, **(kwargs or {})),
                         dict(self.options), self.immutable)
        return copy.set(**options)

    def link(self, callback: "Signature") -> "Signature":
        """Run ``callback`` after this one succeeds (with its result first, unless immutable); returns it."""
        self.options["link"] = self.options.get("link", []) + _signatures("link", callback)
        return callback

    def link_error(self, errback: "Signature") -> "Signature":
        """Run ``errback`` once if this one fails (with the failed task's id first, unless immutable); returns it."""
        self.options["link_error"] = self.options.get("link_error", []) + _signatures("link_error", errback)
        return errback

    on_error = link_error

    def __or__(self, other: "Canvas") -> "chain":
        return chain(self, other)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the task inline with ``args`` in front of the signature's own (Celery's ``sig()``)."""
        return self.task(*(args + self.args), **dict(self.kwargs, **kwargs))

    def delay(self, *args: Any, **kwargs: Any) -> "TaskResult[Any]":
        """Run it, ``args`` in front of the signature's own."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                    **options: Any) -> "TaskResult[Any]":
        """Run it with ``args`` in front of its own and ``options`` over its own; returns its TaskResult."""
        sig = self.clone(args, kwargs, **options) if (args or kwargs or options) else self
        return launch(sig)

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + ["%s=%r" % kv for kv in self.kwargs.items()]
        return "%s%s(%s)" % (self.task.name, ".si" if self.immutable else ".s", ", ".join(parts))


def signature(task: Any, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
              **options: Any) -> Signature:
    """Celery's ``signature(task, args, kwargs, **options)``."""
    return Signature(task, args, kwargs, options, options.pop("immutable", False))


class chain:
    """Steps one after the other, each given the previous one's result first (Celery's ``chain``)."""

    def __init__(self, *tasks: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], (Signature, chain, group, chord)):
            tasks = tuple(tasks[0])  # chain(generator) or chain([...]), as Celery takes
        if not tasks:
            raise ConfigError("chain() needs at least one signature")
        steps: List[Canvas] = []
        for t in tasks:
            steps.extend(t.tasks if isinstance(t, chain) else [_canvas("chain", t)])
        self.tasks: Tuple[Canvas, ...] = tuple(steps)

    def __or__(self, other: "Canvas") -> "chain":
        return chain(self, other)

    def __call__(self, *args: Any, **kwargs: Any) -> "TaskResult[Any]":
        return self.apply_async(args, kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> "TaskResult[Any]":
        """Run the chain, ``args`` in front of the first step's own; returns the last step's TaskResult."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                    **options: Any) -> "TaskResult[Any]":
        """Run the chain; ``r.get()`` is the last step's value and ``r.parent`` walks back."""
        first = self.tasks[0]
        if args or kwargs or options:
            if not isinstance(first, Signature):
                raise ConfigError("arguments for a chain go to its first step, which must be a signature here")
            first = first.clone(args, kwargs, **options)
        return launch(chain(first, *self.tasks[1:]))

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.tasks))


class group:
    """Steps side by side (Celery's ``group``); ``.delay()`` returns a GroupResult."""

    def __init__(self, *tasks: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], (Signature, chain, group, chord)):
            tasks = tuple(tasks[0])
        self.tasks: Tuple[Canvas, ...] = tuple(_canvas("group", t) for t in tasks)

    def __or__(self, other: "Canvas") -> "chain":
        return chain(self, other)

    def __call__(self, *args: Any, **kwargs: Any) -> "GroupResult":
        return self.apply_async(args, kwargs)

    def __len__(self) -> int:
        return len(self.tasks)

    def delay(self, *args: Any, **kwargs: Any) -> "GroupResult":
        """Run every member (``args`` in front of each one's own); returns their GroupResult."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                    **options: Any) -> "GroupResult":
        """Run every member; ``g.get()`` is the list of their values in order."""
        if not self.tasks:
            raise ConfigError("group() is empty: nothing to run")
        members = [_with_args(t, args, kwargs, options) for t in self.tasks]
        found: GroupResult = launch(group(members))
        return found

    def __repr__(self) -> str:
        return "group(%s)" % ", ".join(map(repr, self.tasks))


class chord:
    """A header group, then a body given the list of their results (Celery's ``chord``)."""

    def __init__(self, header: Any, body: Optional["Canvas"] = None) -> None:
        self.header = header if isinstance(header, group) else group(header)
        if not self.header.tasks:
            raise ConfigError("chord() needs a header with at least one signature (its body would never run)")
        self.body = None if body is None else _canvas("chord", body)

    def __call__(self, body: Optional["Canvas"] = None, **options: Any) -> "TaskResult[Any]":
        """``chord(header)(body)``: run it; returns the body's TaskResult."""
        if body is not None:
            return chord(self.header, body).apply_async(**options)
        return self.apply_async(**options)

    def __or__(self, other: "Canvas") -> "chain":
        return chain(self, other)

    def delay(self, *args: Any, **kwargs: Any) -> "TaskResult[Any]":
        """Run it; returns the body's TaskResult."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                    **options: Any) -> "TaskResult[Any]":
        """Run the header, then the body with their results; ``c.get()`` is the body's value."""
        if self.body is None:
            raise ConfigError("chord(header) needs a body: chord(header)(body) or chord(header, body)")
        body = self.body.clone(args, kwargs, **options) if (args or kwargs or options) and isinstance(
            self.body, Signature) else self.body
        return launch(chord(self.header, body))

    def __repr__(self) -> str:
        return "chord(%r, %r)" % (self.header, self.body)


#: What a workflow is built from.
Canvas = Union[Signature, chain, group, chord]


class GroupResult:
    """The results of a group's members, in order (Celery's ``GroupResult``)."""

    def __init__(self, group_id: str, results: Sequence["TaskResult[Any]"]) -> None:
        self.id = group_id
        self.results = list(results)

    def get(self, timeout: Optional[float] = None) -> List[Any]:
        """Every member's value in order; raises the first failure in order, or WaitTimeout."""
        import time
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for r in self.results:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            values.append(r.get(left))
        return values

    join = get

    def ready(self) -> bool:
        """True when every member is final."""
        return all(r.ready() for r in self.results)

    def successful(self) -> bool:
        """True when every member succeeded."""
        return all(r.successful() for r in self.results)

    def failed(self) -> bool:
        """True when a member failed (or was cancelled or expired)."""
        return any(r.failed() for r in self.results)

    def completed_count(self) -> int:
        """How many members succeeded."""
        return sum(1 for r in self.results if r.successful())

    def waiting(self) -> bool:
        """True while a member is not final."""
        return not self.ready()

    def revoke(self) -> None:
        """Cancel every member not finished yet."""
        for r in self.results:
            r.cancel()

    def __iter__(self) -> Any:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __repr__(self) -> str:
        return "<GroupResult %s [%s]>" % (self.id, ", ".join(r.id for r in self.results))


# -- from a canvas to steps ---------------------------------------------------------------------------


class _Plan:
    """The steps of one workflow, built by walking its canvas once."""

    def __init__(self) -> None:
        self.steps: Dict[str, Step] = {}
        self.groups: Dict[str, List[str]] = {}
        self._adding: List[int] = []  # the signatures being added, innermost last (a link cycle shows here)

    def add(self, sig: Signature, parents: Sequence[str], takes: Optional[str], chord_body: bool = False,
            errback: bool = False) -> Step:
        if id(sig) in self._adding:
            raise ConfigError("%r is linked to itself (a cycle): a workflow must end" % (sig,))
        self._adding.append(id(sig))
        step = Step(new_id(), sig, list(parents), None if sig.immutable else takes if parents else None,
                    chord=chord_body)
        self.steps[step.id] = step
        for parent in parents:
            (self.steps[parent].errors if errback else self.steps[parent].then).append(step.id)
        for callback in sig.options.get("link", ()):
            self.add(callback, [step.id], TAKES_RESULT)
        for handler in sig.options.get("link_error", ()):
            self.add(handler, [step.id], TAKES_ID, errback=True)
        self._adding.pop()
        return step

    def walk(self, node: Canvas, parents: Sequence[str], many: bool = False) -> Tuple[List[str], Any, bool]:
        """Add ``node`` after ``parents`` (a group's members when ``many``: their results come as a list).

        Returns its tail steps (what a next step waits for), what stands for its result, and
        whether the tails are a group's members.
        """
        takes = TAKES_RESULTS if many or len(parents) > 1 else TAKES_RESULT
        if isinstance(node, Signature):
            step = self.add(node, parents, takes, chord_body=many)
            return [step.id], step.id, False
        if isinstance(node, chain):
            tails: List[str] = list(parents)
            made: Any = None
            for part in node.tasks:
                tails, made, many = self.walk(part, tails, many)
            return tails, made, many
        if isinstance(node, group):
            tails, members = [], []
            for member in node.tasks:
                member_tails, out, _ = self.walk(member, parents, many)
                tails += member_tails
                members.append(_last(out))
            group_id = new_id()
            self.groups[group_id] = members
            return tails, ("group", group_id), True
        header_tails, _, _ = self.walk(node.header, parents, many)
        assert node.body is not None
        return self.walk(node.body, header_tails, True)


def _last(made: Any) -> str:
    """The step id whose result stands for a walked canvas: a step's, or a group's (its id)."""
    return made if isinstance(made, str) else made[1]


def launch(node: Canvas) -> Any:
    """Plan ``node``'s steps, hand them to the runner, and return what stands for it.

    A TaskResult (a chain's last step, a chord's body), or a GroupResult when it ends in a group.
    """
    plan, handles, made = _launch(node)
    if isinstance(made, str):
        found: Any = handles[made]
    else:
        found = GroupResult(made[1], [_result_of(plan, handles, m) for m in plan.groups[made[1]]])
    if len(plan.steps) > 1 or isinstance(node, (group, chord, chain)):
        _announce(node, found, len(plan.steps))
    return found


def _announce(node: Canvas, found: Any, steps: int) -> None:
    """Publish WorkflowStarted now and WorkflowFinished when what stands for it is final."""
    from .. import events
    kind = "chord" if isinstance(node, chord) else "group" if isinstance(node, group) else "chain"
    events.notify(events.WorkflowStarted(found, kind, steps))
    if isinstance(found, GroupResult):
        leaves = _leaves(found)
        left = [len(leaves)]

        def member_done(_: Any) -> None:
            left[0] -= 1
            if left[0] == 0:
                ok = all(r.successful() for r in leaves)
                events.notify(events.WorkflowFinished(found, kind, "SUCCESS" if ok else "FAILURE"))
        for r in leaves:
            r.add_done_callback(member_done)
        return
    found.add_done_callback(lambda r: events.notify(events.WorkflowFinished(r, kind, r.state)))


def _leaves(found: "GroupResult") -> List["TaskResult[Any]"]:
    """The TaskResults of a group, its nested groups' included."""
    out: List[Any] = []
    for r in found.results:
        out += _leaves(r) if isinstance(r, GroupResult) else [r]
    return out


def _result_of(plan: "_Plan", handles: Dict[str, "TaskResult[Any]"], member: str) -> Any:
    return handles[member] if member in handles else GroupResult(member, [
        _result_of(plan, handles, m) for m in plan.groups[member]])


def _launch(node: Canvas) -> Tuple[_Plan, Dict[str, "TaskResult[Any]"], Any]:
    plan = _Plan()
    _, made, _ = plan.walk(node, [])
    return plan, get_runner().run_steps(list(plan.steps.values()), plan.groups), made


def _canvas(where: str, value: Any) -> "Canvas":
    if isinstance(value, (Signature, chain, group, chord)):
        return value
    raise ConfigError("%s() takes signatures (task.s(...)), chains, groups or chords, got %r" % (where, value))


def _signatures(label: str, value: Any) -> List[Signature]:
    found = list(value) if isinstance(value, (list, tuple)) else [value]
    for sig in found:
        if not isinstance(sig, Signature):
            raise ConfigError("%s takes a signature (task.s(...)) or a list of them, got %r" % (label, sig))
    return found


def _with_args(node: "Canvas", args: Sequence[Any], kwargs: Optional[Dict[str, Any]],
               options: Dict[str, Any]) -> "Canvas":
    if not (args or kwargs or options):
        return node
    if isinstance(node, Signature):
        return node.clone(args, kwargs, **options)
    raise ConfigError("arguments for a group go to each member, which must be a signature here")


def _check_carried(task: Any, args: tuple, kwargs: Dict[str, Any]) -> None:
    """SerializationError (a ConfigError) now, not a failure later on another node."""
    from ..journal import new_row
    new_row("0" * 32, task.name, args, kwargs, task.serializer)

