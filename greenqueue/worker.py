"""``python -m greenqueue.worker [options] MODULE``: a node with tasks, scheduler, pools and consumers, no HTTP.

Concurrency model: as the server's, without listeners. ``main()``
monkey-patches the standard library, imports MODULE (which declares the
tasks, periodic jobs, pools and consumers), starts the runtime and waits in
the main greenlet for SIGTERM/SIGINT; then it stops claiming and firing,
drains running tasks up to ``--graceful-timeout`` (what is left goes back to
the shared store), stops pools, closes the store and runs shutdown hooks. A
second signal exits at once with status 1. With a shared journal
(``--journal postgresql://...`` or a file several processes share) this
process claims tasks spawned by web nodes; without one it runs only what it
spawns itself (periodic jobs, consumers).
"""

import importlib
import logging
import os
import signal
import sys
import time
from typing import Optional, Sequence

__all__ = ["main"]

log = logging.getLogger("greenqueue.worker")


def _import(module_name: str) -> None:
    from ._startup import StartupError, where

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    name = module_name.partition(":")[0]
    if name.endswith(".py"):
        raise StartupError("module %r: looks like a file name; use the module name %r"
                           % (module_name, name[:-3].replace(os.sep, ".")))
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise StartupError("module %r: no module named %r (run from your project's directory or set "
                               "PYTHONPATH)" % (module_name, exc.name)) from None
        raise StartupError("module %r: importing failed: %s: %s (at %s)"
                           % (module_name, type(exc).__name__, exc, where(exc))) from None
    except Exception as exc:
        raise StartupError("module %r: importing failed: %s: %s (at %s)"
                           % (module_name, type(exc).__name__, exc, where(exc))) from None


def run(module_name: str, settings: dict) -> int:
    """Start a node for ``module_name`` and serve until a signal; returns the exit status."""
    import gevent
    from gevent.event import Event

    from . import eventlog
    from ._startup import EXIT_STARTUP, StartupError
    from .errors import JournalError
    from .runtime import get_runtime

    eventlog.install()
    _import(module_name)
    rt = get_runtime()
    opts = {k: settings[k] for k in ("max_concurrency", "max_pending") if settings.get(k) is not None}
    if opts:
        rt.configure(**opts)
    try:
        rt.hooks.run_startup()
    except Exception as exc:
        from ._startup import where
        raise StartupError("startup hook failed: %s: %s (at %s)" % (type(exc).__name__, exc, where(exc)),
                           EXIT_STARTUP) from None
    try:
        rt.start(dirty_apps=settings["dirty_apps"], dirty_workers=settings["dirty_workers"],
                 dirty_timeout=settings["dirty_timeout"], journal=settings["journal"] or None,
                 lease_timeout=settings["lease_timeout"], queues=settings["queues"],
                 journal_sync=settings["journal_sync"])
    except JournalError as exc:
        rt.pools.stop(5)
        raise StartupError("--journal: %s" % exc) from None
    except Exception as exc:
        rt.pools.stop(5)
        raise StartupError("%s: %s" % (type(exc).__name__, exc)) from None
    if not rt.store.durable and not len(rt.scheduler) and not rt.consumers():
        log.warning("no --journal, no @periodic jobs and no consumers: nothing will reach this worker's tasks "
                    "(give it the web nodes' --journal)")
    stop = Event()
    reason = []

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now without draining", signal.Signals(signum).name)
            sys.stderr.flush()
            os._exit(1)
        reason.append(signal.Signals(signum).name)
        stop.set()

    gevent.signal_handler(signal.SIGTERM, on_signal, signal.SIGTERM)
    gevent.signal_handler(signal.SIGINT, on_signal, signal.SIGINT)
    extras = ["journal: " + rt.store.display] if rt.store.durable else []
    if settings["dirty_apps"]:
        extras.append("dirty apps: " + ", ".join(settings["dirty_apps"]))
    log.info("greenqueue worker for %s (pid %d%s)", module_name, os.getpid(), "".join(", " + e for e in extras))
    stop.wait()
    deadline = time.monotonic() + settings["graceful_timeout"]
    log.info("%s: stopping; graceful timeout %.0fs", reason[0] if reason else "stop", settings["graceful_timeout"])
    rt.stop_intake(deadline - time.monotonic())
    rt.drain(deadline - time.monotonic())
    if len(rt.pools):
        rt.pools.stop(max(1.0, deadline - time.monotonic()))
    rt.close_store()
    rt.hooks.run_shutdown()
    log.info("shutdown complete")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m greenqueue.worker``."""
    from gevent import monkey
    monkey.patch_all()

    from ._startup import StartupError, setup_logging
    from .config import load
    from .errors import ConfigError

    try:
        module_name, settings = load(argv, worker=True)
    except ConfigError as exc:
        print("greenqueue.worker: error: %s" % exc, file=sys.stderr)
        return 2
    settings.setdefault("access_log", None)
    setup_logging(settings)
    if settings["max_blocking_ms"]:
        from ._startup import watch_blocking
        watch_blocking(settings["max_blocking_ms"])
    try:
        return run(module_name, settings)
    except StartupError as exc:
        print("greenqueue.worker: error: %s" % exc, file=sys.stderr)
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
