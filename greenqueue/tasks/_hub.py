"""The task hub: which gevent hub a runner's tasks run on, and handing work to it from other threads.

Concurrency model: a runner binds to one hub at its first spawn. In the
greenqueue server (and any monkey-patched process) that is the main
thread's hub; in a process that already runs a gevent hub in the spawning
thread, that hub; otherwise (``flask run``, a script, a notebook) a daemon
thread started here with a hub of its own, kept alive by an async watcher
until ``stop()``. Another thread hands a call over with
``loop.run_callback_threadsafe`` and waits on a plain lock (``Handoff``),
never on the task hub, so the hub is not blocked by the caller and the
caller does not need a hub. The thread primitives are the originals even in
a monkey-patched process: a greenlet there is not a thread. Across a fork
the child has no task thread; the runner calls ``forget()``.
"""

import atexit
import logging
from typing import Any, Callable, Optional

import gevent
from gevent import monkey
from gevent.event import Event

from ..errors import TaskTimeout

# The runner's logger: the hub was part of the runner until it got its own module,
# and logging config written for the runner should keep seeing its lines by name.
log = logging.getLogger("greenqueue.tasks._runner")

__all__ = ["MODES", "Handoff", "TaskHub", "real_ident"]

#: Where tasks run: "auto" picks one of the others at the first spawn.
MODES = ("auto", "current", "thread")

# The OS thread, even in a monkey-patched process (where get_ident names the greenlet).
real_ident = monkey.get_original("_thread", "get_ident")
_allocate_lock = monkey.get_original("_thread", "allocate_lock")
_start_thread = monkey.get_original("_thread", "start_new_thread")


class Handoff:
    """A value computed on the task hub for a caller on another thread, which waits on a plain lock."""

    __slots__ = ("lock", "ok", "value")

    def __init__(self) -> None:
        self.lock = _allocate_lock()
        self.lock.acquire()
        self.ok = True
        self.value: Any = None

    def run(self, fn: Callable[..., Any], args: tuple) -> None:
        """Call ``fn(*args)`` on the task hub and release the waiting caller with its outcome."""
        try:
            self.value = fn(*args)
        except BaseException as exc:  # handed to the caller's thread, which re-raises it
            self.ok, self.value = False, exc
        finally:
            self.lock.release()

    def result(self, timeout: Optional[float]) -> Any:
        """Wait (on the caller's thread) for ``run()``'s value; re-raise what it raised."""
        if not self.lock.acquire(True, -1 if timeout is None else timeout):
            raise TaskTimeout("the task hub did not answer within %ss" % timeout)
        if not self.ok:
            raise self.value
        return self.value


class TaskHub:
    """The gevent hub (and OS thread) one runner's tasks run on, bound at the first spawn."""

    def __init__(self, mode: str, at_exit: Callable[[], None]) -> None:
        self.mode = mode
        self.thread: Optional[int] = None   # OS thread of the task hub, once bound
        self.hub: Any = None
        self.keep_alive: Any = None          # set to stop our own task thread
        self._at_exit = at_exit              # registered with atexit once we start a thread

    @property
    def threaded(self) -> bool:
        """True when tasks run on our own daemon thread (outside the server)."""
        return self.keep_alive is not None

    def bind(self) -> None:
        """Choose the task hub at the first spawn (DESIGN: "Outside the server")."""
        mode = self.mode
        if mode == "auto":
            from gevent._hub_local import get_hub_if_exists  # gevent exports it there (no public alias)
            patched = monkey.is_module_patched("threading") or monkey.is_module_patched("socket")
            mode = "current" if patched or get_hub_if_exists() is not None else "thread"
        if mode == "current":
            self.hub = gevent.get_hub()
            self.thread = real_ident()
            return
        started = Handoff()
        _start_thread(self._thread_main, (started,))
        started.result(30)
        # WARNING, not INFO: outside the server nobody configured logging, and this line must show.
        log.warning("greenqueue: tasks run on a background thread with its own gevent hub (this process is "
                    "not the greenqueue server and is not monkey-patched); blocking I/O in a task holds up "
                    "the other tasks unless the process calls gevent.monkey.patch_all() first")
        atexit.register(self._at_exit)

    def _thread_main(self, started: Handoff) -> None:
        def bind() -> None:
            self.hub = gevent.get_hub()
            self.thread = real_ident()
            self.keep_alive = Event()
        started.run(bind, ())
        # An idle loop with nothing referenced would exit: a started async watcher keeps it
        # running while this thread waits for spawns handed over from other threads.
        keeper = self.hub.loop.async_()
        keeper.start(lambda: None)
        try:
            self.keep_alive.wait()
        finally:
            keeper.stop()
            keeper.close()
            self.thread = None

    def on_hub(self) -> bool:
        """True when the caller runs on the task hub's thread; binds the hub first if none is yet."""
        ident = real_ident()
        if ident == self.thread:
            return True
        if self.thread is None:
            self.bind()
            return ident == self.thread
        return False

    def on_hub_thread(self) -> bool:
        """True when the caller runs on the task hub's thread (or no hub is bound yet)."""
        return self.thread is None or real_ident() == self.thread

    def call(self, fn: Callable[..., Any], *args: Any, timeout: Optional[float] = None) -> Any:
        """Run ``fn(*args)`` in a greenlet on the task hub and return its value (from any thread)."""
        if self.on_hub():
            return fn(*args)
        handoff = Handoff()
        self.hub.loop.run_callback_threadsafe(gevent.spawn, handoff.run, fn, args)
        return handoff.result(timeout)

    def hand_over(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the task hub soon, without waiting for it (from another thread)."""
        self.hub.loop.run_callback_threadsafe(fn, *args)

    def stop(self) -> None:
        """Let our own task thread end once the running greenlet returns (no-op on a borrowed hub)."""
        if self.keep_alive is not None:
            self.keep_alive.set()

    def forget(self) -> None:
        """Drop the hub and thread without touching them (the child of a fork has neither)."""
        self.thread = self.hub = self.keep_alive = None
