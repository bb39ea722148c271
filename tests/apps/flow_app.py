"""A cluster node's app for flow control: limited and prioritized tasks write start and end times to a ledger.

Environment: FLOW_LEDGER (the file the tasks append to). Every line is
``KIND LABEL START END PID`` (times from ``time.time()``, the same clock on
every node of one machine), so a test counts starts per window and overlaps
from what really ran.
"""

import os
import time

import gevent
from flask import Flask, jsonify, request

from greenqueue import task

from .ledger import append

app = Flask(__name__)
LEDGER = os.environ.get("FLOW_LEDGER", "ledger.txt")


def _write(line):
    append(LEDGER, line)


def _run(kind, label, seconds):
    start = time.time()
    gevent.sleep(seconds)
    _write("%s %s %.4f %.4f %d" % (kind, label, start, time.time(), os.getpid()))


@task(rate_limit="10/s")
def rated(label):
    """At most 10 starts in any second, the whole cluster together."""
    _run("rated", label, 0)


@task(rate_limit="2/h")
def hourly(label):
    """At most 2 starts an hour: what is over it waits the whole test."""
    _run("hourly", label, 0)


@task(rate_limit="5/s", rate_key=lambda key, label: key)
def rated_per_key(key, label):
    """At most 5 starts a second per key."""
    _run("keyed-" + key, label, 0)


@task(concurrency_limit=2)
def limited(label, seconds):
    """At most 2 running at once, the whole cluster together."""
    _run("limited", label, seconds)


@task(concurrency_limit=1, concurrency_key=lambda key, label, seconds: key)
def locked(key, label, seconds):
    """One at a time per key (a per-key lock)."""
    _run("locked-" + key, label, seconds)


@task
def plain(label, seconds):
    """No limit: holds a slot for ``seconds``."""
    _run("plain", label, seconds)


@app.post("/spawn/<name>")
def spawn(name):
    n = int(request.args.get("n", "1"))
    seconds = float(request.args.get("seconds", "0"))
    priority = int(request.args.get("priority", "0"))
    key = request.args.get("key", "k")
    label = request.args.get("label", name)
    ids = []
    for i in range(n):
        tag = "%s-%d" % (label, i)
        if name == "rated":
            r = rated.apply_async((tag,), priority=priority)
        elif name == "hourly":
            r = hourly.apply_async((tag,))
        elif name == "rated_per_key":
            r = rated_per_key.apply_async((key, tag))
        elif name == "limited":
            r = limited.apply_async((tag, seconds))
        elif name == "locked":
            r = locked.apply_async((key, tag, seconds))
        else:
            r = plain.apply_async((tag, seconds), priority=priority)
        ids.append(r.id)
    return jsonify(ids=ids)
