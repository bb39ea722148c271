"""An app whose answers say which process and which version of the code served them.

VERSION is rewritten by the reload tests; /hang holds the hub in a CPU loop (for --timeout).
"""

import os
import time

from flask import Flask

VERSION = "v1"

app = Flask(__name__)


@app.get("/")
def who():
    return "%s %d" % (VERSION, os.getpid())


@app.get("/slow")
def slow():
    import gevent
    gevent.sleep(0.2)  # in flight while a process retires
    return "%s %d" % (VERSION, os.getpid())


def spin_forever_in_a_cpu_loop():
    """Never yields to the hub: what the watchdog must notice and name."""
    while True:
        time.perf_counter()


@app.get("/hang")
def hang():
    from flask import request
    marker = request.args.get("marker")
    if marker:
        with open(marker, "w") as f:  # from here on this process's hub never turns again
            f.write(str(os.getpid()))
    spin_forever_in_a_cpu_loop()
    return "unreachable"


if os.environ.get("TICK_LEDGER"):
    from greenqueue import every, periodic

    @periodic(every(seconds=0.1))
    def tick():
        """Record which process fired this run, and when."""
        with open(os.environ["TICK_LEDGER"], "a") as f:
            f.write("%d %.3f\n" % (os.getpid(), time.time()))
