"""A periodic job whose runs are recorded in the journal, for the catch-up-after-downtime test."""

import os
import time

from flask import Flask

from greenqueue import every, periodic

app = Flask(__name__)
OUT = os.environ.get("JOURNAL_TEST_OUT", ".")


@periodic(every(seconds=2), catch_up="once")
def heartbeat():
    """Append the time of this run to runs.log."""
    with open(os.path.join(OUT, "runs.log"), "a") as fh:
        fh.write("%.3f\n" % time.time())
