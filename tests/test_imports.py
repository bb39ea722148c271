"""The package's shape: no import cycles, no module lookups, optional extras stay optional."""

import ast
import os
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

PACKAGE = ROOT / "greenqueue"


def _module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node):
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path):
    """greenqueue modules ``path`` imports anywhere (functions too), except under ``if TYPE_CHECKING:``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("greenqueue"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("greenqueue"):
                continue
            found.add(target)
            for alias in node.names:  # `from . import tasks` imports a submodule
                candidate = target + "." + alias.name
                if _exists(candidate):
                    found.add(candidate)
    return {m for m in found if m != name}


def _exists(module):
    rel = Path(*module.split("."))
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def _graph():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        graph[_module_name(path)] = _imports(path)
    # Importing a.b.c runs a/__init__ and a/b/__init__ first; the package __init__ of
    # greenqueue itself imports lazily, so it does not take part.
    return graph


def _cycles(graph):
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == "greenqueue":
                continue
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycles_inside_the_package():
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_module_finds_another_through_sys_modules():
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if "sys.modules" in p.read_text()]
    assert not offenders


_BLOCK_EXTRAS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("kombu", "amqp", "psycopg", "psycopg_pool", "PIL"):
            raise ImportError("%s is an optional extra (blocked by the test)" % name)
sys.meta_path.insert(0, Block())
import pkgutil, importlib, greenqueue
for info in pkgutil.walk_packages(greenqueue.__path__, "greenqueue."):
    if info.name.endswith("__main__") or info.name == "greenqueue.journal._postgres":
        continue  # the PostgreSQL engine is the extra's own module; a postgresql:// journal imports it
    importlib.import_module(info.name)
for name in greenqueue.__all__:
    getattr(greenqueue, name)
print("imported")
"""


def test_every_module_imports_without_the_optional_extras():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _BLOCK_EXTRAS], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr
