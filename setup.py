"""Builds the compiled request path when it can; all other metadata lives in setup.cfg.

The HTTP modules (``greenqueue/_request.py``, ``_response.py``, ``_http.py``)
are compiled by Cython, typed by their ``.pxd`` files, into
``greenqueue/_compiled/``, with a digest of the sources they came from
(see ``greenqueue/_accel.py``, which loads them only while that digest
matches). Each extension is optional: without a C compiler or Python's
headers the build says so and greenqueue runs the same modules as Python.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "greenqueue"


def _load_accel():
    """greenqueue/_accel.py alone (stdlib only): the package itself may not import in a build env."""
    spec = importlib.util.spec_from_file_location("_greenqueue_accel", PACKAGE / "_accel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ACCEL = _load_accel()


def extensions() -> list:
    """The compiled modules' extensions, or none when Cython is missing or the build is turned off."""
    if os.environ.get(ACCEL.PURE_ENV, "") not in ("", "0"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("greenqueue: Cython is not installed; the request path stays pure Python", file=sys.stderr)
        return []
    # Each module keeps its own name (its relative imports, its .pxd and its C types need it);
    # only the built file goes to _compiled/ (OptionalBuildExt), where nothing imports it by accident.
    # -g0: no debug sections (they would make up most of each file).
    exts = [Extension("greenqueue." + name, ["greenqueue/%s.py" % name], optional=True, extra_compile_args=["-g0"])
            for name in ACCEL.MODULES]
    compiled = cythonize(exts, build_dir="build/cython", quiet=True,
                         compiler_directives={"language_level": 3, "binding": True,
                                              # The sources' annotations are for readers and mypy, not C types.
                                              "annotation_typing": False})
    for ext in compiled:
        ext.optional = True
    return compiled


class OptionalBuildExt(build_ext):
    """build_ext that puts the builds in greenqueue/_compiled/ and records the sources they came from.

    Never beside the Python source: a build there would be imported in its
    place even after the source changed.
    """

    def get_ext_filename(self, fullname: str) -> str:
        """The build's path inside the package tree: under _compiled/."""
        path = Path(super().get_ext_filename(fullname))
        return str(path.parent / "_compiled" / path.name)

    def _get_inplace_equivalent(self, build_py, ext):  # type: ignore[no-untyped-def]
        """(in the source tree, in build_lib) for ``ext``; setuptools' own drops the _compiled/ part."""
        inplace_file, regular_file = super()._get_inplace_equivalent(build_py, ext)
        folder, name = os.path.split(inplace_file)
        return os.path.join(folder, "_compiled", name), regular_file

    def _built(self) -> list:
        return [os.path.join(self.build_lib, self.get_ext_filename(self.get_ext_fullname(ext.name)))
                for ext in self.extensions]

    def run(self) -> None:
        """Build every extension afresh; record the sources' digest where all of them landed."""
        for path in self._built():
            if os.path.exists(path):
                os.remove(path)  # a build left from other sources must not pass for this one's
        if self.inplace:
            (PACKAGE / "_compiled").mkdir(exist_ok=True)  # a fresh clone has none; the copy needs it
        super().run()
        if not self.extensions:
            return
        if not all(os.path.exists(p) for p in self._built()):
            print("greenqueue: the compiled request path did not build (see above); the Python source runs",
                  file=sys.stderr)
            return
        folders = {os.path.dirname(self._built()[0])}
        if self.inplace:
            folders.add(str(PACKAGE / "_compiled"))
        for folder in folders:
            Path(folder, ACCEL.DIGEST_FILE).write_text(ACCEL.source_digest(PACKAGE) + "\n")


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
