"""Docs that run: every ```python snippet of the README and docs/ is executed, so examples cannot drift.

Each snippet runs as a script of its own in a fresh interpreter (in a temporary
directory, with greenqueue importable). A snippet that cannot run on its own
(it needs a running server, RabbitMQ, PostgreSQL, a Django project, or is a
fragment of a larger app) carries a visible marker on the line before its
fence, which these tests honour and report as a skip:

    <!-- not run: needs a server started with --dirty-app -->
    ```python
    ...

Marked or not, a snippet that compiles may only name greenqueue modules and
names that exist, and the prose may only say something raises an exception
that exists.
"""

import ast
import builtins
import importlib
import os
import re
import subprocess
import sys
import textwrap
import types

import pytest

from .conftest import ROOT

DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SNIPPET_TIMEOUT = 30.0

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_MARKER = re.compile(r"^\s*<!--\s*not run:\s*(?P<reason>.*?)\s*-->\s*$")


class Snippet:
    """One fenced ```python block: where it is, its code, and why it is not run (None: it runs)."""

    def __init__(self, doc, line, code, not_run):
        self.doc = doc
        self.line = line
        self.code = code
        self.not_run = not_run

    @property
    def id(self):
        return "%s:%d" % (self.doc, self.line)


def extract(text, doc="doc.md"):
    """The ```python snippets of a Markdown text, each with the marker (if any) on its line before."""
    lines = text.splitlines()
    snippets, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start = i
        i += 1
        body = []
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if lang.lower() not in ("python", "py", "python3"):
            continue
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.match(before)
        code = textwrap.dedent("\n".join(l[len(indent):] if l.startswith(indent) else l for l in body))
        snippets.append(Snippet(doc, start + 1, code + "\n", marker.group("reason") if marker else None))
    return snippets


def _all_snippets():
    out = []
    for path in DOCS:
        out.extend(extract(path.read_text(), path.relative_to(ROOT).as_posix()))
    return out


SNIPPETS = _all_snippets()


def _params(snippets):
    return [pytest.param(s, id=s.id) for s in snippets]


# -- which greenqueue names a snippet uses --------------------------------------------------------


def greenqueue_references(code):
    """Dotted greenqueue names a snippet imports or reads (``greenqueue.tasks.PerItem``...)."""
    tree = ast.parse(code)
    bound = {}   # local name -> the dotted greenqueue name it stands for
    refs = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "greenqueue":
                    refs.add(alias.name)
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound["greenqueue"] = "greenqueue"
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "greenqueue":
            for alias in node.names:
                if alias.name != "*":
                    dotted = "%s.%s" % (node.module, alias.name)
                    refs.add(dotted)
                    bound[alias.asname or alias.name] = dotted
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts = []
            inner = node
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in bound:
                refs.add(".".join([bound[inner.id]] + parts[::-1]))
    return sorted(refs)


def missing_name(dotted):
    """Why ``dotted`` does not exist (None when it does): modules are imported, then attributes read.

    The walk stops at the first object that is not a module (``greenqueue.hooks.state.db``
    only needs ``state``): what the app puts on its own objects is the app's business.
    """
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if not isinstance(obj, types.ModuleType):
            return None
        try:
            obj = getattr(obj, part)
        except AttributeError:
            try:
                obj = importlib.import_module(".".join(parts[:i + 1]))
            except ModuleNotFoundError as exc:
                if exc.name != ".".join(parts[:i + 1]):
                    raise
                return "%s has no %s" % (".".join(parts[:i]), part)
    return None


# -- the tests -------------------------------------------------------------------------------------


def test_the_readme_and_docs_have_snippets_to_run():
    docs = {s.doc for s in SNIPPETS}
    assert "README.md" in docs and any(d.startswith("docs/") for d in docs)
    assert [s for s in SNIPPETS if s.not_run is None], "every snippet is marked not to run"


def test_every_not_run_marker_sits_right_before_a_python_snippet():
    stray = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            m = _MARKER.match(line)
            if not m:
                continue
            after = next((l for l in lines[i + 1:] if l.strip()), "")
            fence = _FENCE.match(after)
            if not m.group("reason") or not fence or fence.group(3).lower() not in ("python", "py", "python3"):
                stray.append("%s:%d: %s" % (path.relative_to(ROOT).as_posix(), i + 1, line.strip()))
    assert not stray, "markers without a reason or not on the line before a ```python fence:\n" + "\n".join(stray)


@pytest.mark.parametrize("snippet", _params(SNIPPETS))
def test_snippet_compiles_and_names_only_what_greenqueue_has(snippet):
    try:
        compile(snippet.code, snippet.id, "exec")
    except SyntaxError as exc:
        if snippet.not_run is not None:
            pytest.skip("a fragment (not run: %s)" % snippet.not_run)
        raise AssertionError("%s does not compile: %s" % (snippet.id, exc)) from None
    missing = sorted({m for m in map(missing_name, greenqueue_references(snippet.code)) if m})
    assert not missing, "%s names what greenqueue does not have: %s" % (snippet.id, "; ".join(missing))


@pytest.mark.realproc
@pytest.mark.slow
@pytest.mark.parametrize("snippet", _params(SNIPPETS))
def test_snippet_runs_on_its_own(snippet, tmp_path):
    if snippet.not_run is not None:
        pytest.skip("not run: %s" % snippet.not_run)
    script = tmp_path / (re.sub(r"\W", "_", snippet.id) + ".py")
    script.write_text(snippet.code)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([sys.executable, script.name], cwd=str(tmp_path), env=env, capture_output=True,
                              text=True, timeout=SNIPPET_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AssertionError("%s did not finish within %ss" % (snippet.id, SNIPPET_TIMEOUT)) from None
    assert proc.returncode == 0, "%s failed (exit %s):\n%s\n---\n%s" % (
        snippet.id, proc.returncode, snippet.code, proc.stderr[-3000:])


# -- what the prose says is raised exists, and is an exception -----------------------------------

#: A name in backticks after "raise", "raises" or "raised" (in the same sentence part).
_RAISES = re.compile(r"\braise[sd]?\b[^.;:`]{0,40}`(?P<name>[A-Za-z_][\w.]*)`")
#: A backticked bare name that looks like an exception class.
_EXCEPTION_LIKE = re.compile(r"`(?P<name>[A-Z]\w*(?:Error|Timeout|Exception))`")


def _resolve(name):
    """The object a name in the docs means: a builtin, a greenqueue name or a dotted import path."""
    if "." not in name:
        for owner in (builtins, importlib.import_module("greenqueue"), importlib.import_module("greenqueue.errors")):
            try:
                return getattr(owner, name)
            except AttributeError:
                continue
        return None
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None


def _is_exception(obj):
    return isinstance(obj, type) and issubclass(obj, BaseException)


def named_exceptions_that_do_not_exist(text, doc="doc.md"):
    """Exceptions the prose names (``raises `X` ``, or a backticked ``XError``/``XTimeout``) that are not real."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for m in _RAISES.finditer(line):
            name = m.group("name")
            if name[:1].isupper() or "." in name and name.rsplit(".", 1)[1][:1].isupper():
                if not _is_exception(_resolve(name)):
                    found.append("%s:%d: raises `%s`, which is not an exception" % (doc, number, name))
        for m in _EXCEPTION_LIKE.finditer(line):
            if not _is_exception(_resolve(m.group("name"))):
                found.append("%s:%d: `%s` is no exception greenqueue or Python has" % (doc, number, m.group("name")))
    return found


@pytest.mark.parametrize("path", [pytest.param(p, id=p.relative_to(ROOT).as_posix()) for p in DOCS])
def test_the_prose_names_only_real_exceptions(path):
    found = named_exceptions_that_do_not_exist(path.read_text(), path.relative_to(ROOT).as_posix())
    assert not found, "\n".join(found)


# -- the checkers catch what they are for ----------------------------------------------------------


def test_extract_honours_the_marker_and_skips_other_languages():
    text = textwrap.dedent("""\
        Intro.

        ```python
        print(1)
        ```

        <!-- not run: needs a RabbitMQ server -->
        ```python
        connect()
        ```

        ```sh
        echo "```python"
        ```

        * a list item:

          ```python
          x = 1
          ```
        """)
    found = extract(text)
    assert [(s.line, s.code, s.not_run) for s in found] == [
        (3, "print(1)\n", None), (8, "connect()\n", "needs a RabbitMQ server"), (18, "x = 1\n", None)]


def test_the_name_check_catches_a_name_greenqueue_lacks():
    code = textwrap.dedent("""\
        import greenqueue
        from greenqueue import task, testing, NoSuchThing
        from greenqueue.tasks import PerItem
        greenqueue.hooks.state.db = None
        greenqueue.no_such_module.x()
        testing.eager()
        testing.no_such_helper()
        """)
    refs = greenqueue_references(code)
    assert "greenqueue.hooks.state.db" in refs and "greenqueue.tasks.PerItem" in refs
    assert sorted({m for m in map(missing_name, refs) if m}) == [
        "greenqueue has no NoSuchThing", "greenqueue has no no_such_module", "greenqueue.testing has no no_such_helper"]


def test_the_prose_check_catches_made_up_and_non_exception_names():
    text = ("`get()` then raises `TaskCancelled`; a wait raises `WaitTimeout`.\n"
            "It fails with `TaskLost` or `NoSuchError`, never `gevent.Timeout` or `ValueError`.\n"
            "`r.get()` raises `greenqueue.Overloaded`; it raises `greenqueue.NotThere`.\n")
    assert named_exceptions_that_do_not_exist(text) == [
        "doc.md:1: raises `TaskCancelled`, which is not an exception",
        "doc.md:2: `NoSuchError` is no exception greenqueue or Python has",
        "doc.md:3: raises `greenqueue.NotThere`, which is not an exception",
    ]
