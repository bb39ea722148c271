"""The same echo/stream app for gunicorn's dirty workers, plus a WSGI view that times calls from inside gunicorn."""

import json
import time

from gunicorn.dirty.app import DirtyApp

APP_PATH = "bench.apps.dirty_peer:EchoDirty"


class EchoDirty(DirtyApp):
    """Echo and stream, like bench/bench_procpool.py's greenqueue app."""

    def echo(self, value=None):
        return value

    def chunks(self, n, size):
        block = b"x" * size if size else None
        for _ in range(n):
            yield block if block is not None else 0


def app(environ, start_response):
    """GET|POST /?kind=call|stream&n=N&size=S (POST body: the JSON payload to echo): time the calls here."""
    from urllib.parse import parse_qs

    from gunicorn.dirty import get_dirty_client

    q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    client = get_dirty_client(timeout=60)
    n = int(q.get("n", "1000"))
    kind = q.get("kind", "call")
    lat = []
    t0 = time.perf_counter()
    if kind == "call":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        payload = json.loads(environ["wsgi.input"].read(length)) if length else None
        for _ in range(n):
            s = time.perf_counter()
            client.execute(APP_PATH, "echo", payload)
            lat.append(time.perf_counter() - s)
    else:
        count = sum(1 for _ in client.stream(APP_PATH, "chunks", n, int(q.get("size", "16"))))
        assert count == n
    body = json.dumps({"elapsed": time.perf_counter() - t0, "latencies": lat}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
