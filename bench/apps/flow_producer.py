"""Enqueue the flow-control bench's tasks, then exit: ``python -m bench.apps.flow_producer STACK MODE ...``.

STACK is gq, pq (procrastinate) or celery; MODE is one of

* ``priority N SPREAD``: N probes, each with a priority drawn (seeded, the
  same for every stack) from -SPREAD..SPREAD (gq, pq);
* ``rated N``: N probes of the rate-limited task (gq, celery);
* ``keyed N KEYS``: N probes one run at a time per key, keys taken in turn
  from KEYS of them (gq: ``concurrency_limit=1``; pq: ``lock=``).

All of them before any worker runs, like cluster_producer's ``drain``. The
greenqueue producer is a node that claims nothing (``queues=[]``). Prints
one line when done, as cluster_producer does: ``enqueued N in S s, 0 failed``.
"""

import os
import random
import sys

DSN = os.environ.get("BENCH_DSN", "")
BATCH = 1000
SENDERS = 50  # concurrent enqueue calls where a stack has no per-row batch call
SEED = 20260


def _priorities(n, spread):
    rng = random.Random(SEED)
    return [rng.randint(-spread, spread) for _ in range(n)]


def _keys(n, keys):
    return ["k%d" % (i % keys) for i in range(n)]


def greenqueue(mode, args):
    """Enqueue through a greenqueue node that claims nothing."""
    import gevent

    from greenqueue import runtime

    from bench.apps.flow_gq import keyed, probe, rated

    rt = runtime.get_runtime()
    rt.configure(max_pending=10_000_000, hub="current")
    rt.open_store(DSN, queues=[])
    n = int(args[0])
    try:
        if mode == "priority":
            priorities = _priorities(n, int(args[1]))

            # apply_async is the only call that takes a priority per task; concurrent calls group-commit.
            def sender(k):
                for p in priorities[k::SENDERS]:
                    probe.apply_async((0.0,), priority=p)

            gevent.joinall([gevent.spawn(sender, k) for k in range(SENDERS)], raise_error=True)
        elif mode == "rated":
            for i in range(0, n, BATCH):
                rated.map([0.0] * min(BATCH, n - i))
        else:
            keys = _keys(n, int(args[1]))
            for i in range(0, n, BATCH):
                keyed.map(keys[i:i + BATCH])
    finally:
        rt.close_store()
    return n


def celery(mode, args):
    """Enqueue through Celery's client (Redis broker)."""
    from bench.apps.flow_celery import rated

    if mode != "rated":
        raise SystemExit("celery has no %s mode here" % mode)
    n = int(args[0])
    for _ in range(n):
        rated.apply_async((0.0,))
    return n


def procrastinate(mode, args):
    """Enqueue through procrastinate's job manager: one batch statement per BATCH jobs, each job its own options."""
    import asyncio

    from bench.apps.flow_procrastinate import app, keyed, probe

    n = int(args[0])
    if mode == "priority":
        jobs = [probe.configure(priority=p).make_new_job(t=0.0) for p in _priorities(n, int(args[1]))]
    elif mode == "keyed":
        jobs = [keyed.configure(lock=key).make_new_job(key=key) for key in _keys(n, int(args[1]))]
    else:
        raise SystemExit("procrastinate has no %s mode here" % mode)

    async def main():
        async with app.open_async():
            for i in range(0, n, BATCH):
                await app.job_manager.batch_defer_jobs_async(jobs[i:i + BATCH])

    asyncio.run(main())
    return n


def main(argv):
    """Command-line entry point (the cluster producer's, with this module's stacks)."""
    from bench.apps import cluster_producer
    return cluster_producer.main(argv, {"gq": greenqueue, "celery": celery, "pq": procrastinate}, [0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
