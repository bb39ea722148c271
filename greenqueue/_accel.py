"""The compiled request path: loads the C builds of the HTTP modules when they match their source.

``_request``, ``_response`` and ``_http`` are plain Python. When Cython and
a C compiler were at hand at install time, ``setup.py`` also compiles them,
typed by the ``.pxd`` file next to each, into ``greenqueue/_compiled/``,
and records there a digest of the sources it compiled (``BUILT_FROM``).
:func:`install`, called when the package is imported, loads those builds
in place of the three modules only when the digest still matches the
sources beside them, all three or none (the compiled modules share C
types). A source edited since the build (an editable install, a
developer's tree) is therefore always what runs, never a stale build; so
is the Python source when nothing was compiled or ``GREENQUEUE_PURE_PYTHON=1``
is set. The behaviour is the same either way; the compiled build serves a
request in less CPU (docs/benchmarks.md).

Module state: the loader's decision, made once per process at import.
"""

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Sequence

#: The modules compiled, in the order they import one another.
MODULES = ("_request", "_response", "_http")
#: Where the builds and their digest live, inside the package.
COMPILED_DIR = Path(__file__).resolve().parent / "_compiled"
DIGEST_FILE = "BUILT_FROM"
#: Set to 1 to run the Python source even when a matching build exists.
PURE_ENV = "GREENQUEUE_PURE_PYTHON"

_status = "pure Python (not decided yet)"


def source_digest(package_dir: Optional[Path] = None) -> str:
    """The sha256 of the compiled modules' ``.py`` and ``.pxd`` sources, in MODULES order."""
    base = package_dir or Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in MODULES:
        for suffix in (".py", ".pxd"):
            digest.update(name.encode() + suffix.encode() + b"\0")
            digest.update((base / (name + suffix)).read_bytes())
    return digest.hexdigest()


def _builds() -> Optional[Dict[str, str]]:
    """Module name -> path of its build for this interpreter, or None when one is missing."""
    found = {}
    for name in MODULES:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = COMPILED_DIR / (name + suffix)
            if path.exists():
                found["greenqueue." + name] = str(path)
                break
        else:
            return None
    return found


class _CompiledFinder(importlib.abc.MetaPathFinder):
    """Finds the compiled build of each module of MODULES (and nothing else)."""

    def __init__(self, paths: Dict[str, str]) -> None:
        self.paths = paths

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        """The spec of the build of ``fullname``, or None to let the Python source load."""
        so = self.paths.get(fullname)
        if so is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, so)
        return importlib.util.spec_from_file_location(fullname, so, loader=loader)


def install() -> None:
    """Decide once whether the compiled builds load; put their finder first on the import path if so."""
    global _status
    if any(isinstance(f, _CompiledFinder) for f in sys.meta_path):
        return
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        _status = "pure Python (%s is set)" % PURE_ENV
        return
    builds = _builds()
    if builds is None:
        _status = "pure Python (no compiled build for this interpreter; see README, 'Compiled request path')"
        return
    try:
        recorded = (COMPILED_DIR / DIGEST_FILE).read_text().strip()
        current = source_digest()
    except OSError as exc:
        _status = "pure Python (cannot check the compiled build: %s)" % exc
        return
    if recorded != current:
        _status = ("pure Python (the sources changed since the compiled build; "
                   "`python setup.py build_ext --inplace` rebuilds it)")
        return
    sys.meta_path.insert(0, _CompiledFinder(builds))
    _status = "compiled"


def status() -> str:
    """How the request path runs in this process: "compiled", or "pure Python (why)"."""
    return _status

