"""Launch the canvas bench's workflows through one stack, waiting for each.

Usage: ``python -m bench.apps.canvas_producer STACK CHORD_N CHAIN_N REPEATS``.

STACK is ``gq`` (a process that claims nothing, ``queues=[]``, on the
PostgreSQL journal in BENCH_DSN: the node runs every step), ``mem``
(greenqueue in this process, no journal) or ``celery`` (Redis broker and
result backend in BENCH_REDIS_URL). After one small untimed chord and chain
(connections, imports), runs REPEATS chords of CHORD_N members and then
REPEATS chains of CHAIN_N steps (0: none), one at a time. Prints one JSON
line: ``{"chord": [run, ...], "chain": [run, ...]}``, each run
``{"t0", "call", "e2e", "ok", "why"}``: t0 is the wall-clock time just
before the call, call and e2e the seconds from then until the call returned
and until ``.get()`` returned. The body (last
step) reports its own start to the bench's collector.
"""

import json
import os
import sys
import time

TIMEOUT = 120.0


def _workflows(stack):
    """(chord(n, t0) -> result handle, chain(n, t0) -> result handle) for ``stack``."""
    if stack == "celery":
        from celery import chain, chord

        from bench.apps.canvas_celery import add, inc, tsum
    else:
        from greenqueue import chain, chord

        from bench.apps.canvas_gq import add, inc, tsum

    def run_chord(n, t0):
        return chord([add.s(i, i) for i in range(n)], tsum.s(t0=t0)).delay()

    def run_chain(n, t0):
        return chain([inc.s(0)] + [inc.s() for _ in range(n - 2)] + [inc.s(t0=t0)]).delay()

    return run_chord, run_chain


def _timed(launch, n, expected):
    t0 = time.time()
    call = None
    try:
        handle = launch(n, t0)
        call = time.time() - t0
        got = handle.get(timeout=TIMEOUT)
    except Exception as exc:  # a stack that fails says how, in its row
        return {"t0": t0, "call": call, "e2e": None, "ok": False,
                "why": "%s: %s" % (type(exc).__name__, str(exc)[:300])}
    e2e = time.time() - t0
    ok = got == expected
    return {"t0": t0, "call": call, "e2e": e2e, "ok": ok,
            "why": "" if ok else "result %r, expected %r" % (got, expected)}


def main(argv):
    """Command-line entry point."""
    from gevent import monkey
    monkey.patch_all()
    stack, chord_n, chain_n, repeats = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    if stack != "celery":
        from greenqueue import runtime

        rt = runtime.get_runtime()
        rt.configure(max_pending=10_000_000, hub="current")
        if stack == "gq":
            rt.open_store(os.environ["BENCH_DSN"], queues=[])
    run_chord, run_chain = _workflows(stack)
    # Untimed (t0=None: nothing reported): the first connections, imports and statements.
    run_chord(10, None).get(timeout=TIMEOUT)
    run_chain(3, None).get(timeout=TIMEOUT)
    out = {"chord": [_timed(run_chord, chord_n, 2 * sum(range(chord_n))) for _ in range(repeats if chord_n else 0)],
           "chain": [_timed(run_chain, chain_n, chain_n) for _ in range(repeats if chain_n else 0)]}
    if stack == "gq":
        rt.close_store()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
