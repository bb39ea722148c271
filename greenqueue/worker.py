"""``python -m greenqueue.worker [options] MODULE``: a node with tasks, scheduler, pools and consumers, no HTTP.

Concurrency model: the server's, without listeners: ``main()``
monkey-patches the standard library, imports MODULE (which declares the
tasks, periodic jobs, pools and consumers) and runs
:class:`greenqueue._lifecycle.Lifecycle` in the main greenlet, as the
server does: start the runtime, wait for SIGTERM/SIGINT, stop claiming and
firing, drain running tasks up to ``--graceful-timeout`` (what is left goes
back to the shared store), stop pools, close the store, run shutdown hooks;
a second signal exits at once with status 1. With a shared journal
(``--journal postgresql://...`` or a file several processes share) this
process claims tasks spawned by web nodes; without one it runs only what it
spawns itself (periodic jobs, consumers).
"""

import logging
import os
import sys
from typing import TYPE_CHECKING, Optional, Sequence

from ._lifecycle import Lifecycle, prepare_process, run_main
from ._startup import import_spec

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["main", "run"]

log = logging.getLogger("greenqueue.worker")


def run(module_name: str, settings: "Settings") -> int:
    """Start a node for ``module_name`` and serve until a signal; returns the exit status."""
    from .runtime import get_runtime

    from ._djangoapp import prepare
    prepare_process(settings)
    # mysite.wsgi runs a Django node without HTTP: its apps' tasks known, its connections closed.
    prepare(import_spec(module_name, "module"))
    rt = get_runtime()
    lifecycle = Lifecycle(rt, settings, log)
    lifecycle.start()
    if not rt.store.durable and not len(rt.scheduler) and not rt.consumers():
        log.warning("no --journal, no @periodic jobs and no consumers: nothing will reach this worker's tasks "
                    "(give it the web nodes' --journal)")

    def announce() -> None:
        extras = "".join(", " + e for e in lifecycle.describe())
        log.info("greenqueue worker for %s (pid %d%s)", module_name, os.getpid(), extras)

    return lifecycle.serve(announce)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m greenqueue.worker``."""
    return run_main("greenqueue.worker", argv, run, worker=True)


if __name__ == "__main__":
    sys.exit(main())
