"""A peer: any WSGI app (``MODULE:APP``) on a plain monkey-patched gevent.pywsgi.WSGIServer."""

from gevent import monkey

monkey.patch_all()

import importlib  # noqa: E402
import sys  # noqa: E402

from gevent.pywsgi import WSGIServer  # noqa: E402

if __name__ == "__main__":
    module, _, name = sys.argv[2].partition(":")
    app = getattr(importlib.import_module(module), name)
    WSGIServer(("127.0.0.1", int(sys.argv[1])), app, log=None, backlog=4096).serve_forever()
