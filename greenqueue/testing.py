"""Helpers for testing code that spawns greenqueue tasks.

Concurrency model: these helpers run in the test's greenlet and change the
default runner in place (``eager``) or block that greenlet until tasks are
done (``wait_for_tasks``); the hub keeps running task greenlets meanwhile.
"""

import contextlib
import logging
from typing import Iterator

from .errors import TaskTimeout
from .tasks import DrainReport, Runner, get_runner

log = logging.getLogger(__name__)

__all__ = ["eager", "wait_for_tasks"]


@contextlib.contextmanager
def eager(enabled: bool = True) -> Iterator[Runner]:
    """Run spawned tasks inline in the caller while inside the block; their exceptions propagate."""
    runner = get_runner()
    before = runner.eager
    runner.eager = bool(enabled)
    try:
        yield runner
    finally:
        runner.eager = before


def wait_for_tasks(timeout: float = 5.0) -> DrainReport:
    """Wait until the tasks running or waiting now have finished; TaskTimeout if some have not."""
    report = get_runner().drain(timeout)
    if not report.complete:
        raise TaskTimeout("tasks still unfinished after %ss: %s" % (timeout, report))
    return report
