"""Tasks of Celery's canvas integration tests (celery/t/integration/tasks.py), as greenqueue tasks.

Environment: CANVAS_LEDGER (a file each run of ``noted`` appends a line to, so
tests count runs from what really ran).
"""

import os

from greenqueue import task

from .ledger import append


class ExpectedException(Exception):
    """What ``fail`` raises."""


@task
def add(x, y, z=None):
    """x + y (+ z)."""
    return x + y + (z or 0)


@task
def tsum(nums):
    """The sum of a list of numbers."""
    return sum(nums)


@task
def identity(x):
    """x."""
    return x


@task
def add_to_all(nums, val, z=None):
    """Each number plus val (+ z)."""
    return [n + val + (z or 0) for n in nums]


@task
def fail(*args):
    """Always fails."""
    raise ExpectedException("Task expected to fail", args)


@task
def noted(label, *args):
    """Append a line naming ``label`` (and what it got) to the ledger; returns the label."""
    append(os.environ.get("CANVAS_LEDGER", "canvas-ledger.txt"), "%s %s" % (label, " ".join(map(str, args))))
    return label


@task
def member(n, seconds):
    """A chord member: sleep, record that member ``n`` ran, return n."""
    import gevent
    gevent.sleep(seconds)
    noted("member", n)
    return n


@task
def body(results):
    """A chord body: record that it ran and over how many results; returns their sum."""
    noted("body", len(results), sum(results))
    return sum(results)


@task
def step(results, label, seconds):
    """A chain step: record its start, sleep, record its end; pass its input on with the label added."""
    import gevent
    noted("start", label)
    gevent.sleep(seconds)
    noted("end", label)
    return list(results) + [label]
