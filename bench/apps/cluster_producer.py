"""Enqueue the cluster bench's tasks into one stack, then exit: ``python -m bench.apps.cluster_producer STACK MODE ...``.

STACK is gq, pq (procrastinate) or celery; MODE is one of

* ``drain N``: N probe tasks as fast as the stack takes them (batches where
  the stack has a batch call), before any worker runs;
* ``rate R S``: R tasks a second for S seconds, each carrying the time just
  before its enqueue call, while the workers run;
* ``delayed N S LEAD``: N tasks due evenly over S seconds starting LEAD
  seconds from now, each carrying its due time.

The greenqueue producer is a node that claims nothing (``queues=[]``), like a
web node, so every task goes through the shared store to the worker nodes.
Prints one line when done: ``enqueued N in S s, F failed`` (a paced enqueue
call that raised is counted, not retried: it is what a caller would have seen).
"""

import datetime
import os
import sys
import time

DSN = os.environ.get("BENCH_DSN", "")
BATCH = 1000
SENDERS = 50  # concurrent enqueue calls: the stacks' commits and round trips overlap


def _due_times(n, seconds, lead):
    base = time.time() + lead
    return [base + seconds * i / n for i in range(n)]


def _utc(ts):
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)


FAILED = [0]


def _paced(rate, seconds, send):
    """Call ``send()`` in a new greenlet every 1/rate s for ``seconds``; wait for them all."""
    import gevent

    def one():
        try:
            send()
        except Exception as exc:
            FAILED[0] += 1
            if FAILED[0] == 1:
                print("first failure: %s: %s" % (type(exc).__name__, exc), file=sys.stderr, flush=True)

    jobs = []
    start = time.monotonic()
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            gevent.sleep(delay)
        jobs.append(gevent.spawn(one))
    gevent.joinall(jobs, raise_error=True)
    return n


def _fan_out(items, call):
    """Run ``call(item)`` for every item on SENDERS greenlets."""
    import gevent

    def sender(k):
        for item in items[k::SENDERS]:
            call(item)

    gevent.joinall([gevent.spawn(sender, k) for k in range(SENDERS)], raise_error=True)


def greenqueue(mode, args):
    """Enqueue through a greenqueue node that claims nothing."""
    from greenqueue import runtime

    from bench.apps.cluster_gq import probe

    rt = runtime.get_runtime()
    rt.configure(max_pending=10_000_000, hub="current")
    rt.open_store(DSN, queues=[])
    try:
        if mode == "drain":
            n = int(args[0])
            for i in range(0, n, BATCH):
                probe.map([0.0] * min(BATCH, n - i))  # the handles are dropped: nothing follows them
        elif mode == "rate":
            n = _paced(float(args[0]), float(args[1]), lambda: probe.spawn(time.time()))
        else:
            n, seconds, lead = int(args[0]), float(args[1]), float(args[2])
            _fan_out(_due_times(n, seconds, lead), lambda due: probe.apply_async((due,), eta=_utc(due)))
    finally:
        rt.close_store()
    return n


def celery(mode, args):
    """Enqueue through Celery's client (Redis broker)."""
    from bench.apps.cluster_celery import probe

    if mode == "drain":
        n = int(args[0])
        for _ in range(n):
            probe.apply_async((0.0,))
    elif mode == "rate":
        n = _paced(float(args[0]), float(args[1]), lambda: probe.apply_async((time.time(),)))
    else:
        n, seconds, lead = int(args[0]), float(args[1]), float(args[2])
        _fan_out(_due_times(n, seconds, lead), lambda due: probe.apply_async((due,), eta=_utc(due)))
    return n


def procrastinate(mode, args):
    """Enqueue through procrastinate's async client (its native API)."""
    import asyncio

    from bench.apps.cluster_procrastinate import app, probe

    async def main():
        async with app.open_async():
            if mode == "drain":
                n = int(args[0])
                for i in range(0, n, BATCH):
                    await probe.batch_defer_async(*[{"t": 0.0}] * min(BATCH, n - i))
                return n
            if mode == "rate":
                rate, seconds = float(args[0]), float(args[1])
                n = int(rate * seconds)
                start = time.monotonic()
                jobs = []
                for i in range(n):
                    delay = start + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    jobs.append(asyncio.ensure_future(probe.defer_async(t=time.time())))
                FAILED[0] = sum(isinstance(r, Exception)
                                for r in await asyncio.gather(*jobs, return_exceptions=True))
                return n
            n, seconds, lead = int(args[0]), float(args[1]), float(args[2])
            dues = _due_times(n, seconds, lead)
            sem = asyncio.Semaphore(SENDERS)

            async def one(due):
                async with sem:
                    await probe.configure(schedule_at=_utc(due)).defer_async(t=due)
            await asyncio.gather(*(one(d) for d in dues))
            return n

    return asyncio.run(main())


def main(argv, stacks=None, failed=FAILED):
    """Command-line entry point: ``STACK MODE ARGS...``; prints the line Stack.produce() reads.

    ``stacks`` maps gq/celery/pq to ``produce(mode, args) -> enqueued`` (this module's by default);
    ``failed[0]`` counts the enqueues that failed.
    """
    stack, mode, args = argv[0], argv[1], argv[2:]
    if stack in ("gq", "celery"):
        from gevent import monkey
        monkey.patch_all()
    started = time.monotonic()
    table = stacks or {"gq": greenqueue, "celery": celery, "pq": procrastinate}
    n = table[stack](mode, args)
    print("enqueued %d in %.3f s, %d failed" % (n, time.monotonic() - started, failed[0]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
