"""A cluster node's app: tasks append to a ledger file, so tests count what really ran.

Environment: CLUSTER_LEDGER (file the tasks append to), CLUSTER_JOB=1 to declare
an every-second periodic job, CLUSTER_SLOW_JOB=1 to declare an every-second job
whose run takes longer than a second (max_instances=1), CLUSTER_PG (a DSN for the
transactional spawn view).
"""

import os
import time

import gevent
from flask import Flask, jsonify, request

import greenqueue
from greenqueue import every, periodic, task

from .ledger import append

app = Flask(__name__)
LEDGER = os.environ.get("CLUSTER_LEDGER", "ledger.txt")
NODE = "%s" % os.getpid()


def _write(line):
    append(LEDGER, line)


@task
def work(n, seconds):
    """Sleep, then record that task ``n`` ran here."""
    gevent.sleep(seconds)
    me = greenqueue.tasks.current()
    _write("task %s %s %s" % (n, me.id if me else "?", NODE))
    return n


@task(retries=2, retry_delay=0.2)
def flaky(n):
    """Fail on the first attempt, succeed on the next: retries work across nodes."""
    me = greenqueue.tasks.current()
    _write("flaky %s attempt %d %s" % (n, me.retries, NODE))
    if me.retries == 0:
        raise ValueError("first attempt fails")
    return n * 2


@task
def beating(n, seconds):
    """Write a timestamped beat every 50 ms for ``seconds``, then an end line: shows when it stopped."""
    me = greenqueue.tasks.current()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _write("beat %s %s %.3f %s" % (n, me.id if me else "?", time.time(), NODE))
        gevent.sleep(0.05)
    _write("end %s %s %.3f %s" % (n, me.id if me else "?", time.time(), NODE))
    return n


@task
def mapped(n):
    """One item of ``mapped.map(...)``: record that it ran here."""
    me = greenqueue.tasks.current()
    _write("mapped %s %s %s" % (n, me.id if me else "?", NODE))
    return n


@task(queue="reports")
def report(n):
    """A task of the ``reports`` queue: record where it ran."""
    me = greenqueue.tasks.current()
    _write("report %s %s %s" % (n, me.id if me else "?", NODE))
    return n


@task
def echo(**kwargs):
    """Record and return its keyword arguments (spawn() keywords belong to the task)."""
    _write("echo %s %s" % (",".join(sorted(kwargs)), NODE))
    return kwargs


if os.environ.get("CLUSTER_SLOW_JOB"):
    @periodic(every(seconds=1), max_instances=1)
    def slow_tick():
        """A run that outlasts its one-second interval: start and end times show any overlap."""
        _write("slow-start %.3f %s" % (time.time(), NODE))
        gevent.sleep(1.5)
        _write("slow-end %.3f %s" % (time.time(), NODE))


if os.environ.get("CLUSTER_JOB"):
    @periodic(every(seconds=1))
    def tick():
        """Record the instant this run was due for (the run's eta), where it ran and its task id."""
        me = greenqueue.tasks.current()
        _write("tick %.3f %s %s" % (me.eta.timestamp() if me and me.eta else -1, NODE, me.id if me else "?"))


@app.post("/spawn")
def spawn():
    n = int(request.args.get("n", "1"))
    seconds = float(request.args.get("seconds", "0"))
    delay = float(request.args.get("delay", "0"))
    start = int(request.args.get("start", "0"))
    ids = []
    for i in range(start, start + n):
        r = work.spawn_later(delay, i, seconds) if delay else work.spawn(i, seconds)
        ids.append(r.id)
    return jsonify(ids=ids)


@app.post("/beating")
def spawn_beating():
    r = beating.spawn(request.args.get("n", "0"), float(request.args.get("seconds", "10")))
    return jsonify(id=r.id)


@app.post("/cancel/<task_id>")
def cancel(task_id):
    r = greenqueue.result(task_id)
    return jsonify(cancelled=r.cancel() if r is not None else None)


@app.post("/map")
def spawn_map():
    n = int(request.args.get("n", "1"))
    return jsonify(ids=[r.id for r in mapped.map(range(n))])


@app.post("/report")
def spawn_report():
    n = int(request.args.get("n", "1"))
    start = int(request.args.get("start", "0"))
    return jsonify(ids=[report.spawn(i).id for i in range(start, start + n)])


@app.post("/spawn-to/<queue>")
def spawn_to(queue):
    n = int(request.args.get("n", "1"))
    start = int(request.args.get("start", "0"))
    return jsonify(ids=[work.apply_async((i, 0), queue=queue).id for i in range(start, start + n)])


@app.post("/echo")
def spawn_echo():
    # Option names as keywords of spawn(): they are the task's arguments, not options.
    r = echo.spawn(queue="nowhere", countdown=60, idempotency_key="k", connection="c")
    return jsonify(id=r.id)


@app.post("/idempotent/<key>")
def idempotent(key):
    r = work.apply_async((key, 0), idempotency_key=key)
    return jsonify(id=r.id)


@app.post("/flaky/<int:n>")
def spawn_flaky(n):
    return jsonify(id=flaky.spawn(n).id)


@app.post("/transactional/<what>")
def transactional(what):
    import psycopg
    with psycopg.connect(os.environ["CLUSTER_PG"]) as conn:
        r = work.apply_async(("tx-" + what, 0), connection=conn)
        if what == "rollback":
            conn.rollback()
        else:
            conn.commit()
    return jsonify(id=r.id)


@app.get("/result/<task_id>")
def result(task_id):
    r = greenqueue.result(task_id)
    if r is None:
        return jsonify(state=None), 404
    out = {"state": r.state}
    if r.successful():
        out["result"] = r.result
    return jsonify(out)


@app.get("/wait/<task_id>")
def wait(task_id):
    r = greenqueue.result(task_id)
    return jsonify(value=r.get(timeout=20) if r else None)


@app.get("/health")
def health():
    state = greenqueue.health()
    return jsonify(state), 200 if state["status"] == "ok" else 503


@app.get("/ping")
def ping():
    return "pong"
