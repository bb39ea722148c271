"""Start-up helpers of the server: import the app, parse and bind addresses.

Concurrency model: called from the server's main greenlet before it serves
(``_listen`` uses gevent sockets, so the process is already monkey-patched).
Every failure is a :class:`greenqueue.errors.StartupError` with one line
for the user.
"""

import errno
import importlib
import os
import socket
import stat
import sys
import traceback

from .errors import EXIT_STARTUP, EXIT_USAGE, StartupError

__all__ = ["load_app", "parse_bind", "listen", "display", "where", "StartupError",
           "EXIT_USAGE", "EXIT_STARTUP"]


def load_app(spec):
    """Import ``MODULE:APP`` (cwd on sys.path, like gunicorn) and return the WSGI callable."""

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise StartupError("app %r: expected MODULE:APP, e.g. myproject.web:app" % spec)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise StartupError("app %r: no module named %r (run from your project's directory "
                               "or set PYTHONPATH)" % (spec, exc.name)) from None
        raise StartupError("app %r: importing %s failed: %s: %s"
                           % (spec, module_name, type(exc).__name__, exc)) from None
    except Exception as exc:
        raise StartupError("app %r: importing %s failed: %s: %s (at %s)"
                           % (spec, module_name, type(exc).__name__, exc, where(exc))) from None
    app = module
    for part in attr.split("."):
        app = getattr(app, part, None)
        if app is None:
            raise StartupError("app %r: module %s has no attribute %r" % (spec, module_name, attr))
    if not callable(app):
        raise StartupError("app %r: %s is a %s, not a WSGI callable" % (spec, attr, type(app).__name__))
    return app


def where(exc):
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return "%s:%s" % (last.filename, last.lineno)


def parse_bind(text):
    """Parse ``HOST:PORT``, ``[IPV6]:PORT``, ``:PORT`` or ``unix:PATH`` into ``(family, address)``."""

    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise StartupError("--bind %r: unix: needs a socket path" % text)
        return socket.AF_UNIX, path
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        family = socket.AF_INET6
    else:
        host, sep, port = text.rpartition(":")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if not sep:
            host, port, sep = "127.0.0.1", text, ":"
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise StartupError("--bind %r: expected HOST:PORT, [IPV6]:PORT or unix:PATH" % text)
    return family, (host or "0.0.0.0", int(port))


def listen(bind, backlog):

    from gevent import socket as gsocket

    family, address = parse_bind(bind)
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            _remove_stale_unix_socket(address)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError("--bind %s: address already in use (is another server running?)" % bind) from None
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            raise StartupError("--bind %s: address not available on this machine" % bind) from None
        if exc.errno == errno.EACCES:
            raise StartupError("--bind %s: permission denied (ports below 1024 need root)" % bind) from None
        raise StartupError("--bind %s: %s" % (bind, os.strerror(exc.errno or 0) or exc)) from None
    except socket.gaierror as exc:
        sock.close()
        raise StartupError("--bind %s: cannot resolve host: %s" % (bind, exc)) from None
    return sock


def _remove_stale_unix_socket(path):

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError("--bind unix:%s: exists and is not a socket" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a leftover from a crashed run
        return
    finally:
        probe.close()
    raise StartupError("--bind unix:%s: address already in use (is another server running?)" % path)


def display(bind):
    if bind.startswith("unix:"):
        return bind
    return "http://" + bind
