"""An app with a view that holds the hub (for --max-blocking-ms)."""

import time

from flask import Flask

app = Flask(__name__)


@app.get("/block")
def block():
    end = time.perf_counter() + 1.5  # many monitor periods, even on a loaded machine
    while time.perf_counter() < end:  # a CPU loop never yields to the hub
        pass
    return "blocked"
