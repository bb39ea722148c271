"""The worker process's side: load the app, serve calls and streams from the pipe.

Concurrency model: runs in a gipc child forked from the server. It
monkey-patches itself (so an app's sleeps and I/O let it hear a cancel),
dies with its parent (PR_SET_PDEATHSIG) and ignores SIGINT. The main
greenlet reads the pipe; plain calls run inline, a stream runs in its own
greenlet so credits and cancels are heard while it produces.
"""

import ctypes
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Dict, Tuple

import gevent

from ..errors import GreenqueueError
from ._app import STREAM_CREDIT, DirtyApp, _error_dict, _load_class
from ._wire import Channel

if TYPE_CHECKING:
    from gipc.gipc import _GIPCDuplexHandle


_YIELD_EVERY = 0.001  # seconds a polling worker may go without letting other greenlets run


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the pipe EOF below still ends the worker
    if os.getppid() != parent_pid:
        os._exit(0)  # the parent died before prctl took effect


def _worker_main(handle: "_GIPCDuplexHandle", spec: str, parent_pid: int, idle_poll: float = 0.0) -> None:
    """Entry point of a worker process."""
    _die_with_parent(parent_pid)
    conn = Channel(handle)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import warnings

    from gevent import monkey
    if not monkey.is_module_patched("time"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "patched late" warnings: this process has no threads to worry about
            monkey.patch_all(thread=False)  # blocking sleeps in the app must yield so cancel works
    try:
        app = _load_class(spec)()
        app.init()
    except BaseException as exc:
        conn.put(("init_failed", _error_dict(exc)))
        return
    conn.put(("ready", os.getpid()))
    state: Dict[str, Any] = {"greenlet": None, "credit": 0, "credit_event": gevent.event.Event(), "id": None}
    # Adaptive polling: while calls arrive within ``idle_poll`` of the previous answer, poll
    # the pipe instead of sleeping (a wake-up costs more than such a call); when they
    # come further apart, sleep at once. The gap is smoothed, and capped so a pause
    # does not turn polling off for long once calls come quickly again.
    gap = 0.0
    answered = None
    yielded = time.perf_counter()
    while True:
        streaming = state["greenlet"] is not None and not state["greenlet"].dead
        # idle_poll is granted by the parent only while polling workers do not outnumber the cores.
        spin = idle_poll if idle_poll and not streaming and gap < idle_poll else 0.0
        if spin:
            now = time.perf_counter()
            if now - yielded > _YIELD_EVERY:
                # A poll that keeps catching calls never enters the hub: let the app's own
                # greenlets and timers run at least this often (sleep(0) runs callbacks only).
                gevent.idle()
                yielded = now
        try:
            msg = conn.get(spin)
        except EOFError:
            os._exit(0)  # the parent is gone
        if answered is not None:
            gap = 0.75 * gap + 0.25 * min(time.perf_counter() - answered, 10 * idle_poll)
            answered = None
        kind = msg[0]
        if kind == "call":
            _, call_id, action, args, kwargs, streaming = msg
            state["id"] = call_id
            state["credit"] = STREAM_CREDIT
            if streaming:
                # A stream runs in its own greenlet so this loop can take credits and cancels meanwhile.
                state["greenlet"] = gevent.spawn(_serve_call, conn, app, state, call_id, action, args, kwargs,
                                                 streaming)
            else:
                # A plain call runs inline: nothing can interrupt it but a kill from the parent anyway.
                _serve_call(conn, app, state, call_id, action, args, kwargs, streaming)
                answered = time.perf_counter()
        elif kind == "credit" and msg[1] == state["id"]:
            state["credit"] += msg[2]
            state["credit_event"].set()
        elif kind == "cancel" and msg[1] == state["id"]:
            g = state["greenlet"]
            if g is not None and not g.dead:
                g.kill(block=True)
        elif kind == "stop":
            g = state["greenlet"]
            if g is not None:
                g.kill(block=True)
            try:
                app.close()
            finally:
                conn.put(("stopped",))
            return


def _serve_call(conn: Channel, app: DirtyApp, state: Dict[str, Any], call_id: int, action: str,
                args: Tuple[Any, ...], kwargs: Dict[str, Any], streaming: bool) -> None:
    it = None
    cancelled = False
    try:
        value = app(action, *args, **kwargs)
        if not hasattr(value, "__next__"):
            conn.put(("ok", call_id, value))
            return
        it = value
        if not streaming:
            raise GreenqueueError("%s is a generator; use pool.stream() to read it" % action)
        put = conn.put
        for item in it:
            while state["credit"] <= 0:
                state["credit_event"].clear()
                state["credit_event"].wait()
            state["credit"] -= 1
            put(("chunk", call_id, item))
        conn.put(("end", call_id))
    except gevent.GreenletExit:
        cancelled = True
    except BaseException as exc:
        conn.put(("err", call_id, _error_dict(exc)))
    finally:
        if it is not None and hasattr(it, "close"):
            it.close()  # runs the generator's finally now, not when it is garbage-collected
    if cancelled:
        conn.put(("end", call_id))  # only after close(): the worker is really free


# -- the parent side ----------------------------------------------------------------------
