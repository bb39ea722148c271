"""Lifecycle hooks and shared state, observed through files and views (tests)."""

import os

from flask import Flask, jsonify

import greenqueue
from greenqueue import task
from greenqueue.hooks import state

app = Flask(__name__)
OUT = os.environ.get("GQ_TEST_OUT", ".")


def note(line):
    with open(os.path.join(OUT, "hooks.log"), "a") as fh:
        fh.write(line + "\n")


@greenqueue.on_startup
def open_pool():
    note("startup 1")
    state.db = {"connected": True, "queries": 0}


@greenqueue.on_startup
def warm_cache():
    note("startup 2 sees db=%s" % state.db["connected"])
    state.cache = {"warm": True}


@greenqueue.on_shutdown
def close_pool():
    note("shutdown close_pool after task=%s" % state.db.get("task_done"))


@task
def uses_state():
    import gevent
    gevent.sleep(0.5)
    state.db["task_done"] = True
    return state.cache["warm"]


@app.get("/state")
def view():
    state.db["queries"] += 1
    return jsonify(db=state.db, cache=state.cache, task=uses_state.spawn().id)
