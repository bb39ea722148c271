"""DESIGN's standing invariants, checked by an AST walk over greenqueue/ so no change breaks one unnoticed.

Each checker takes ``{path: source}`` (paths relative to the repository root,
``greenqueue/...``) and returns its offences as ``path:line: what`` strings,
so the real check and a test that feeds it a small snippet run the same code.
The import-cycle and ``sys.modules`` invariants live in test_imports.py.
"""

import ast
import functools
import inspect
import textwrap

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "greenqueue"
JOURNAL = "greenqueue/journal/"
RESULT_MODULE = "greenqueue/tasks/_result.py"
#: Every module here has all of its functions annotated, not only 98% of them.
FULLY_ANNOTATED = ("greenqueue/server.py", "greenqueue/worker.py")
MIN_ANNOTATED = 0.98

#: Store and engine classes, whatever module defines them; classes of greenqueue/journal/
#: whose names end in Store or Engine are added to these.
STORE_CLASSES = frozenset(("Store", "MemoryStore", "ClusterStore", "Engine", "SQLiteEngine", "PostgresEngine"))


@functools.lru_cache(maxsize=None)
def _package_sources():
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def _trees(sources):
    return {path: _parse(path, text) for path, text in sources.items()}


@functools.lru_cache(maxsize=None)
def _parse(path, text):
    return ast.parse(text, path)


def _snippet(**modules):
    """``{path: source}`` from keyword arguments: ``greenqueue__tasks__x`` is greenqueue/tasks/x.py."""
    return {name.replace("__", "/") + ".py": textwrap.dedent(text) for name, text in modules.items()}


def _last_part(node):
    """``store`` for ``store``, ``self.store`` and ``runtime().store``; None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _names_a_store(node):
    name = _last_part(node)
    return name is not None and (name.lstrip("_") == "store" or name.endswith("_store"))


def _names_an_engine(node):
    name = _last_part(node)
    return name is not None and (name.lstrip("_") == "engine" or name.endswith("_engine"))


def _names_store_or_engine(node):
    return _names_a_store(node) or _names_an_engine(node)


def _where(path, node, what):
    return "%s:%d: %s" % (path, node.lineno, what)


def _in_order(found):
    """Offences sorted by file, then line."""
    def key(entry):
        path, line, _ = entry.split(":", 2)
        return path, int(line)
    return sorted(found, key=key)


# -- a. nobody outside the journal asks which kind of store it has -----------------------------


def _store_classes(trees):
    names = set(STORE_CLASSES)
    for path, tree in trees.items():
        if path.startswith(JOURNAL):
            names.update(n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                         and n.name.endswith(("Store", "Engine")))
    return names


def _foreign_names(tree):
    """Names a module binds to other libraries' modules or objects (``import ast``: ``ast.Store`` is not ours)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names
                         if not a.name.startswith("greenqueue"))
        elif isinstance(node, ast.ImportFrom) and not node.level and not (node.module or "").startswith("greenqueue"):
            names.update(a.asname or a.name for a in node.names)
    return names


def _root(node):
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _class_names(node, foreign):
    """The class names an isinstance() second argument names (a class or a tuple of them), ours only."""
    if isinstance(node, ast.Tuple):
        return [name for elt in node.elts for name in _class_names(elt, foreign)]
    name = _last_part(node)
    return [name] if name and _root(node) not in foreign else []


def store_kind_probes(sources):
    """Branches on the kind of store outside greenqueue/journal/."""
    trees = _trees(sources)
    classes = _store_classes(trees)
    found = []
    for path, tree in trees.items():
        if path.startswith(JOURNAL):
            continue
        foreign = _foreign_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                if node.attr == "clustered":
                    found.append(_where(path, node, "reads .clustered"))
                elif _names_an_engine(ast.Name(id=node.attr)) and _names_a_store(node.value):
                    found.append(_where(path, node, "reaches through a store to its engine: %s"
                                        % ast.unparse(node)))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
                func = node.func.id
                if func in ("isinstance", "issubclass") and len(node.args) == 2:
                    hit = sorted(set(_class_names(node.args[1], foreign)) & classes)
                    if hit:
                        found.append(_where(path, node, "%s(..., %s)" % (func, ", ".join(hit))))
                elif func in ("getattr", "hasattr") and _names_store_or_engine(node.args[0]):
                    found.append(_where(path, node, "probes a store or engine: %s" % ast.unparse(node)))
                elif (func in ("getattr", "hasattr") and len(node.args) > 1
                      and isinstance(node.args[1], ast.Constant) and node.args[1].value == "clustered"):
                    found.append(_where(path, node, "probes for 'clustered': %s" % ast.unparse(node)))
    return _in_order(found)


def test_no_caller_outside_the_journal_branches_on_the_kind_of_store():
    found = store_kind_probes(_package_sources())
    assert not found, "\n".join(found)


def test_the_store_kind_check_catches_each_probe():
    sources = _snippet(
        greenqueue__journal___mine="""
            class FileStore:
                clustered = True
                def kind(self):
                    return self.clustered          # inside the journal: its own business
        """,
        greenqueue__runtime="""
            def f(store, rt):
                if store.clustered: pass
                if isinstance(store, ClusterStore): pass
                if isinstance(rt.store, (int, journal.FileStore)): pass
                if getattr(rt.store, "lead", None): pass
                if hasattr(self._engine, "timeout"): pass
                if getattr(x, "clustered", False): pass
                rt.store.engine.claim(1)
                return store.durable, getattr(rt, "name"), isinstance(store, dict)
            import ast
            from . import journal as j
            ok = isinstance(node.ctx, ast.Store), isinstance(s, j._base.MemoryStore)
        """)
    found = store_kind_probes(sources)
    assert sorted(int(f.split(":")[1]) for f in found) == [3, 4, 5, 6, 7, 8, 9, 13], found
    assert all(f.startswith("greenqueue/runtime.py:") for f in found)


# -- b. no store, engine or node annotated Any ---------------------------------------------------


def _is_any(annotation):
    if annotation is None:
        return False
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        try:
            annotation = ast.parse(annotation.value, mode="eval").body
        except SyntaxError:
            return False
    if _last_part(annotation) == "Any":
        return True
    if isinstance(annotation, ast.Subscript) and _last_part(annotation.value) in ("Optional", "Union"):
        inner = annotation.slice
        parts = inner.elts if isinstance(inner, ast.Tuple) else [inner]
        return any(_is_any(p) for p in parts)
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):  # Any | None
        return _is_any(annotation.left) or _is_any(annotation.right)
    return False


def _is_store_engine_or_node(name):
    return name.lstrip("_") in ("store", "engine", "node") or name.endswith(("_store", "_engine"))


def any_typed_stores(sources):
    """Stores, engines and nodes annotated Any (or Optional[Any])."""
    found = []
    for path, tree in _trees(sources).items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                for arg in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]:
                    if _is_store_engine_or_node(arg.arg) and _is_any(arg.annotation):
                        found.append(_where(path, arg, "%s(%s: %s)" % (node.name, arg.arg,
                                                                      ast.unparse(arg.annotation))))
                if _is_store_engine_or_node(node.name) and _is_any(node.returns):
                    found.append(_where(path, node, "def %s() -> %s" % (node.name, ast.unparse(node.returns))))
            elif isinstance(node, ast.AnnAssign):
                name = _last_part(node.target)
                if name and _is_store_engine_or_node(name) and _is_any(node.annotation):
                    found.append(_where(path, node, "%s: %s" % (ast.unparse(node.target),
                                                                ast.unparse(node.annotation))))
    return _in_order(found)


def test_no_store_engine_or_node_is_annotated_any():
    found = any_typed_stores(_package_sources())
    assert not found, "\n".join(found)


def test_the_any_check_catches_each_annotation():
    sources = _snippet(greenqueue__x="""
        from typing import Any, Optional
        import typing
        def f(store: Any, node: "Any", engine: Optional[Any] = None, *, cluster_store: typing.Any) -> None: ...
        def store(self) -> Any: ...
        class A:
            def __init__(self, node: Any | None, _engine: "Optional[Any]") -> None:
                self._store: Any = None
                self.engine: Optional[Store] = None
                name: Any = None
                self.sqlite_engine: Union[None, Any] = None
        def g(store: Store, node: str, thing: Any) -> Any: ...
    """)
    found = any_typed_stores(sources)
    assert sorted(int(f.split(":")[1]) for f in found) == [4, 4, 4, 4, 5, 7, 7, 8, 11], found


# -- c. nobody but TaskResult's module touches its private fields --------------------------------


def _self_targets(node):
    """Attribute names ``self.x`` assigned by an assignment node (chains and tuples included)."""
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    else:
        return []
    names = []
    for target in targets:
        for t in ast.walk(target):
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                names.append(t.attr)
    return names


def _is_private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def task_result_private_names(source, class_name="TaskResult"):
    """The underscored, non-dunder names a class defines: slots, attributes set on self, methods."""
    tree = ast.parse(source)
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name]
    assert classes, "%s is not defined in %s any more: point RESULT_MODULE at its module" % (class_name, RESULT_MODULE)
    cls = classes[0]
    names = set()
    for stmt in cls.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__"
                                                for t in stmt.targets):
            names.update(e.value for e in ast.walk(stmt.value)
                         if isinstance(e, ast.Constant) and isinstance(e.value, str))
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(stmt.name)
            for node in ast.walk(stmt):
                names.update(_self_targets(node))
    return {n for n in names if _is_private(n)}


def task_result_private_reads(sources, own=RESULT_MODULE):
    """Attributes named like TaskResult's private fields, in modules other than its own."""
    private = task_result_private_names(sources[own])
    found = []
    for path, tree in _trees(sources).items():
        if path == own:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in private:
                found.append(_where(path, node, ast.unparse(node)))
    return _in_order(found)


def test_no_module_but_task_results_own_touches_its_private_fields():
    found = task_result_private_reads(_package_sources())
    assert not found, "%d touches:\n%s" % (len(found), "\n".join(found))


def test_task_results_private_names_follow_the_class():
    names = task_result_private_names(_package_sources()[RESULT_MODULE])
    assert names and all(_is_private(n) for n in names)


def test_the_private_field_check_catches_a_touch():
    sources = _snippet(
        greenqueue__tasks___result="""
            class TaskResult:
                __slots__ = ("id", "_fn", "__weakref__")
                def __init__(self):
                    self._done = self._app = None
                    self.public = 1
                def _set(self): self._where, self.other = 1, 2
                def __repr__(self): return ""
            class Other:
                def __init__(self): self._elsewhere = 1
        """,
        greenqueue__tasks___runner="""
            def run(r):
                r._fn(); r._set(); r._where = "x"; r.public; r._elsewhere; r.__repr__()
                return r._done, r._app
        """)
    assert task_result_private_names(sources[RESULT_MODULE]) == {"_fn", "_done", "_app", "_set", "_where"}
    found = task_result_private_reads(sources)
    assert sorted(f.split(": ", 1)[1] for f in found) == ["r._app", "r._done", "r._fn", "r._set", "r._where"], found
    assert all(f.startswith("greenqueue/tasks/_runner.py:") for f in found)


# -- d. annotated functions ----------------------------------------------------------------------


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _is_annotated(fn):
    a = fn.args
    params = a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]
    return fn.returns is not None and all(p.annotation is not None for p in params
                                          if p.arg not in ("self", "cls"))


def annotation_report(sources):
    """(annotated count, total count, unannotated ``path:line: name`` list)."""
    total, missing = 0, []
    for path, tree in _trees(sources).items():
        for fn in _functions(tree):
            total += 1
            if not _is_annotated(fn):
                missing.append(_where(path, fn, fn.name))
    return total - len(missing), total, _in_order(missing)


def test_at_least_98_percent_of_functions_are_annotated():
    done, total, missing = annotation_report(_package_sources())
    assert done >= MIN_ANNOTATED * total, "%d of %d functions annotated (%.1f%%); not annotated:\n%s" % (
        done, total, 100.0 * done / total, "\n".join(missing))


def test_every_function_of_the_server_and_the_worker_is_annotated():
    sources = {p: s for p, s in _package_sources().items() if p in FULLY_ANNOTATED}
    assert sorted(sources) == sorted(FULLY_ANNOTATED)
    _, _, missing = annotation_report(sources)
    assert not missing, "not annotated:\n" + "\n".join(missing)


def test_the_annotation_count_catches_each_gap():
    sources = _snippet(greenqueue__x="""
        def ok(self, a: int, *args: int, b: str = "", **kw: int) -> None:
            def inner(cls) -> int: ...
            f = lambda x: x
        def no_return(a: int): ...
        def bare_arg(a) -> None: ...
        def bare_star(*args, **kw: int) -> None: ...
        async def bare_kw(*, k) -> None: ...
    """)
    done, total, missing = annotation_report(sources)
    assert (done, total) == (2, 6)
    assert sorted(m.split(": ")[1] for m in missing) == ["bare_arg", "bare_kw", "bare_star", "no_return"]


# -- e. both stores implement the whole Store protocol --------------------------------------------


def _positional(params):
    return [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def signature_gaps(proto, impl):
    """Why a method with signature ``impl`` cannot take every call ``proto`` allows ([] if it can).

    Both signatures are of unbound methods: their first parameter (self) is left out.
    """
    want = list(proto.parameters.values())[1:]
    have = list(impl.parameters.values())[1:]
    has_args = any(p.kind == p.VAR_POSITIONAL for p in have)
    has_kwargs = any(p.kind == p.VAR_KEYWORD for p in have)
    by_name = {p.name: p for p in have if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    have_pos = _positional(have)
    gaps, used = [], set()
    for i, p in enumerate(_positional(want)):
        q = have_pos[i] if i < len(have_pos) else None
        if q is None:
            if not has_args or (p.kind == p.POSITIONAL_OR_KEYWORD and not has_kwargs):
                gaps.append("no positional parameter %d (%s)" % (i + 1, p.name))
            continue
        used.add(q.name)
        if p.kind == p.POSITIONAL_OR_KEYWORD and (q.name != p.name or q.kind != q.POSITIONAL_OR_KEYWORD):
            gaps.append("parameter %d is %r, the protocol's is %r (callers may pass it by name)"
                        % (i + 1, q.name, p.name))
        if p.default is not p.empty and q.default is q.empty:
            gaps.append("%r needs a default, as the protocol's has" % q.name)
    for p in want:
        if p.kind == p.KEYWORD_ONLY:
            q = by_name.get(p.name)
            if q is None and not has_kwargs:
                gaps.append("no keyword parameter %r" % p.name)
            elif q is not None:
                used.add(q.name)
                if p.default is not p.empty and q.default is q.empty:
                    gaps.append("%r needs a default, as the protocol's has" % q.name)
        elif p.kind == p.VAR_POSITIONAL and not has_args:
            gaps.append("no *%s" % p.name)
        elif p.kind == p.VAR_KEYWORD and not has_kwargs:
            gaps.append("no **%s" % p.name)
    for q in have:
        if q.name not in used and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD) and q.default is q.empty:
            gaps.append("extra parameter %r has no default" % q.name)
    return gaps


def _protocol_members(proto):
    """(method names, data member names) a typing.Protocol class declares itself."""
    methods = sorted(n for n, v in vars(proto).items() if inspect.isfunction(v)
                     and (not n.startswith("__") or n in ("__len__", "__iter__", "__contains__", "__call__")))
    data = sorted(n for n in getattr(proto, "__annotations__", {}) if not n.startswith("_"))
    return methods, data


def _assigned_on_self(cls):
    names = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        for node in ast.walk(tree):
            names.update(_self_targets(node))
    return names


def protocol_gaps(proto, impl):
    """What ``impl`` lacks of the methods and data members ``proto`` declares."""
    methods, data = _protocol_members(proto)
    gaps = []
    for name in methods:
        have = getattr(impl, name, None)
        if not callable(have):
            gaps.append("%s.%s is missing" % (impl.__name__, name))
            continue
        for gap in signature_gaps(inspect.signature(getattr(proto, name)), inspect.signature(have)):
            gaps.append("%s.%s: %s" % (impl.__name__, name, gap))
    on_self = None
    for name in data:
        if not hasattr(impl, name):
            on_self = _assigned_on_self(impl) if on_self is None else on_self
            if name not in on_self:
                gaps.append("%s.%s (a protocol attribute) is never set" % (impl.__name__, name))
    return gaps


@pytest.mark.parametrize("impl", ["MemoryStore", "ClusterStore"])
def test_each_store_implements_the_whole_store_protocol(impl):
    from greenqueue import journal

    gaps = protocol_gaps(journal.Store, getattr(journal, impl))
    assert not gaps, "\n".join(gaps)


def test_the_protocol_check_catches_missing_and_incompatible_methods():
    from typing import Protocol

    class Proto(Protocol):
        durable: bool
        label: str

        def a(self, x: int, y: int = 0) -> None: ...
        def b(self, x: int, *, key: str) -> None: ...
        def c(self) -> None: ...
        def d(self, x: int) -> None: ...
        def __len__(self) -> int: ...

    class Good:
        durable = True

        def __init__(self):
            self.label = "x"

        def a(self, x, y=0, extra=None): ...
        def b(self, x, **kw): ...
        def c(self, *args): ...
        def d(self, *args, **kw): ...
        def __len__(self): return 0

    class Bad:
        def a(self, x, y): ...
        def b(self, renamed, *, key): ...
        def d(self, x, needed): ...
        def __len__(self): return 0

    assert protocol_gaps(Proto, Good) == []
    gaps = protocol_gaps(Proto, Bad)
    assert gaps == [
        "Bad.a: 'y' needs a default, as the protocol's has",
        "Bad.b: parameter 1 is 'renamed', the protocol's is 'x' (callers may pass it by name)",
        "Bad.c is missing",
        "Bad.d: extra parameter 'needed' has no default",
        "Bad.durable (a protocol attribute) is never set",
        "Bad.label (a protocol attribute) is never set",
    ], gaps


# -- f. every public function has a docstring ----------------------------------------------------


def _is_exempt(fn):
    for deco in fn.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if _last_part(target) == "overload":
            return True
        if isinstance(target, ast.Attribute) and target.attr in ("setter", "deleter"):
            return True  # the property's getter carries the docstring
    return False


def _public_functions(tree):
    """Module-level public functions and public methods of public module-level (or nested) classes."""
    out = []

    def visit(body, in_public_class):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not node.name.startswith("_") and not _is_exempt(node):
                    out.append(node)
            elif isinstance(node, ast.ClassDef):
                if not node.name.startswith("_"):
                    visit(node.body, True)
            elif isinstance(node, (ast.If, ast.Try)):  # `if TYPE_CHECKING:`, `try: import x`
                for part in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                    visit(part, in_public_class)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body, in_public_class)

    visit(tree.body, False)
    return out


def undocumented_public_functions(sources):
    """Public functions and methods without a docstring."""
    found = []
    for path, tree in _trees(sources).items():
        for fn in _public_functions(tree):
            if not ast.get_docstring(fn):
                found.append(_where(path, fn, fn.name))
    return _in_order(found)


def test_every_public_function_has_a_docstring():
    found = undocumented_public_functions(_package_sources())
    assert not found, "%d without a docstring:\n%s" % (len(found), "\n".join(found))


def test_the_docstring_check_catches_a_bare_public_function():
    sources = _snippet(greenqueue__x="""
        from typing import overload
        def documented():
            "One line."
        def bare(): pass
        def _helper(): pass
        @overload
        def over(x: int) -> int: ...
        class Public:
            def method(self): pass
            def _private(self): pass
            def __repr__(self): return ""
            @property
            def value(self):
                "The value."
            @value.setter
            def value(self, v): pass
            class Inner:
                def nested(self): pass
        class _Private:
            def method(self): pass
        def outer():
            "Documented."
            def inner(): pass
    """)
    found = undocumented_public_functions(sources)
    assert [f.split(": ")[1] for f in found] == ["bare", "method", "nested"], found
