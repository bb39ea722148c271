"""``--reload``: notice when a Python file under the app's directory changes (development only).

The supervisor asks :meth:`Watcher.changed` once per turn of its loop; a
change makes it reload the server processes as SIGHUP does, so a broken
edit leaves the old processes serving and the next good edit is picked up.

Concurrency model: with watchfiles (installed with greenqueue: inotify on
Linux, no polling) a native thread of the supervisor waits for changes and
records the newest; the supervisor reads it. Without watchfiles the
supervisor compares the files' modification times itself, once a second.
The parent never imports the app, so the directory is found on sys.path by
name. ``__pycache__`` (and the usual tool directories) never count.
"""

import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional

from gevent import monkey

__all__ = ["Watcher", "app_directory"]

_IGNORED = ("__pycache__", ".git", ".hg", ".svn", ".tox", ".venv", ".idea", "node_modules", ".mypy_cache",
            ".pytest_cache", ".hypothesis")
#: Seconds between two scans of the stdlib fallback.
SCAN_EVERY = 1.0


def app_directory(app_spec: str) -> str:
    """The directory of the app's module, found without importing it (or the current directory)."""
    parts = app_spec.partition(":")[0].split(".")
    for base in [os.getcwd()] + [p for p in sys.path if p]:
        path = os.path.join(base, *parts)
        if os.path.isfile(path + ".py"):
            return os.path.dirname(os.path.abspath(path + ".py"))
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "__init__.py")):
            return os.path.abspath(path)
    return os.getcwd()


class Watcher:
    """Changes to ``*.py`` files under the app's directory, newest first."""

    def __init__(self, app_spec: str) -> None:
        self.root = app_directory(app_spec)
        self._changed: Optional[str] = None
        self._stopping = False
        self._mtimes: Dict[str, float] = {}
        self._next_scan = 0.0
        try:
            import watchfiles
        except ImportError:
            self.native = False
            self._mtimes = self._scan()
            return
        self.native = True
        start = monkey.get_original("_thread", "start_new_thread")
        start(self._watch, (watchfiles,))

    def _watch(self, watchfiles: Any) -> None:
        # A native thread: watchfiles blocks in Rust with the GIL released.
        for changes in watchfiles.watch(self.root, watch_filter=watchfiles.PythonFilter(), stop_event=self,
                                        rust_timeout=500, yield_on_timeout=False, raise_interrupt=False):
            for _, path in changes:
                self._changed = os.path.relpath(path, self.root)

    def is_set(self) -> bool:
        """watchfiles' stop event: True once the supervisor stops."""
        return self._stopping

    def changed(self) -> Optional[str]:
        """The file that changed since the last call (relative to the root), or None."""
        if not self.native:
            now = time.monotonic()
            if now >= self._next_scan:
                self._next_scan = now + SCAN_EVERY
                mtimes = self._scan()
                for path, mtime in mtimes.items():
                    if self._mtimes.get(path) != mtime:
                        self._changed = os.path.relpath(path, self.root)
                if set(self._mtimes) - set(mtimes):
                    self._changed = os.path.relpath(sorted(set(self._mtimes) - set(mtimes))[0], self.root)
                self._mtimes = mtimes
        changed, self._changed = self._changed, None
        return changed

    def _scan(self) -> Dict[str, float]:
        mtimes = {}
        for path in _python_files(self.root):
            try:
                mtimes[path] = os.stat(path).st_mtime
            except OSError:
                pass  # removed while we looked
        return mtimes

    def close_in_child(self) -> None:
        """A forked server process has no watcher thread; nothing of the parent's watch is its own."""
        self._stopping = True

    def stop(self) -> None:
        """Stop watching (the thread ends within half a second)."""
        self._stopping = True


def _python_files(root: str) -> Iterator[str]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _IGNORED]
        names: List[str] = [f for f in files if f.endswith(".py")]
        for name in names:
            yield os.path.join(folder, name)
