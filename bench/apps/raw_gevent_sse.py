"""Baseline: the SSE app on a plain monkey-patched gevent.pywsgi.WSGIServer."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from gevent.pywsgi import WSGIServer  # noqa: E402

from bench.apps.sse_app import app  # noqa: E402

if __name__ == "__main__":
    WSGIServer(("127.0.0.1", int(sys.argv[1])), app, log=None, backlog=4096).serve_forever()
