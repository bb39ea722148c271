"""greenqueue side of the canvas bench: a chord's members and body, a chain's step, on a node's (empty) app.

The body and the chain's last step report to the bench's collector when they
start (``t0`` is when the workflow was launched), so every stack is timed alike.
"""

from flask import Flask

from bench.apps.cluster_probe import report
from greenqueue import task

app = Flask(__name__)


@task(name="bench.canvas.add")
def add(x, y):
    """A chord member: x + y."""
    return x + y


@task(name="bench.canvas.tsum")
def tsum(nums, t0=None):
    """A chord's body: report its start (when timed), return the sum of the members' results."""
    if t0 is not None:
        report(t0)
    return sum(nums)


@task(name="bench.canvas.inc")
def inc(n, t0=None):
    """A chain's step: n + 1 (the last one reports its start when timed)."""
    if t0 is not None:
        report(t0)
    return n + 1
