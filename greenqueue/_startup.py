"""Start-up helpers of the server and the worker: import user code, parse and bind addresses, logging.

Concurrency model: called from the main greenlet before the process serves
(``listen`` uses gevent sockets, so the process is already monkey-patched);
:func:`import_spec` also runs in a process-pool child, and in the scheduler
CLI, before either has a hub of its own.
Every failure is a :class:`greenqueue.errors.StartupError` with one line
for the user; the full traceback of a failed import goes to the
``greenqueue.startup`` logger at DEBUG (``--log-level debug`` shows it).
"""

import errno
import importlib
import linecache
import logging
import os
import site
import socket
import stat
import sys
import sysconfig
import traceback
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple, Union, cast

from .errors import EXIT_STARTUP, EXIT_USAGE, StartupError

if TYPE_CHECKING:
    from gevent import socket as gsocket

    from .config import Settings

__all__ = ["setup_logging", "watch_blocking", "import_spec", "load_app", "parse_bind", "listen", "display", "where",
           "StartupError",
           "EXIT_USAGE", "EXIT_STARTUP"]

log = logging.getLogger("greenqueue.startup")

Address = Union[str, Tuple[str, int]]


def import_spec(spec: str, kind: str = "module", form: str = "") -> Any:
    """Import ``MODULE`` or ``MODULE:ATTR`` (cwd on sys.path, like gunicorn); return the module or the attribute.

    The one way greenqueue loads user code (the app, a worker's module, a dirty app, the
    scheduler CLI's module). ``kind`` names the thing in messages; a ``form`` such as
    ``"MODULE:APP"`` makes ``:ATTR`` required. Every failure is one StartupError line that
    points at the user's own code; the whole traceback goes to the log at DEBUG.
    """
    module_name, sep, attr = spec.partition(":")
    if not module_name or (sep and not attr) or (form and not sep):
        raise StartupError("%s %r: expected %s" % (kind, spec, form or "MODULE or MODULE:NAME"))
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        log.debug("%s %r: importing %s failed", kind, spec, module_name, exc_info=True)
        hint = _file_name_hint(kind, spec, module_name, attr)
        if hint:
            raise StartupError(hint) from None
        if exc.name and module_name.startswith(exc.name):
            raise StartupError("%s %r: no module named %r (run from your project's directory "
                               "or set PYTHONPATH)" % (kind, spec, exc.name)) from None
        raise StartupError("%s %r: importing %s failed: %s: %s (at %s)"
                           % (kind, spec, module_name, type(exc).__name__, exc, where(exc))) from None
    except Exception as exc:
        log.debug("%s %r: importing %s failed", kind, spec, module_name, exc_info=True)
        hint = "" if log.isEnabledFor(logging.DEBUG) else "; --log-level debug shows the whole traceback"
        raise StartupError("%s %r: importing %s failed: %s: %s (at %s)%s"
                           % (kind, spec, module_name, type(exc).__name__, exc, where(exc), hint)) from None
    found: Any = module
    for part in attr.split(".") if attr else ():
        found = getattr(found, part, None)
        if found is None:
            raise StartupError("%s %r: module %s has no attribute %r" % (kind, spec, module_name, attr))
    return found


def load_app(spec: str) -> Callable[..., Any]:
    """Import ``MODULE:APP`` (cwd on sys.path, like gunicorn) and return the WSGI callable."""
    app = import_spec(spec, "app", "MODULE:APP, e.g. myproject.web:app")
    if not callable(app):
        attr = spec.partition(":")[2]
        raise StartupError("app %r: %s is a %s, not a WSGI callable" % (spec, attr, type(app).__name__))
    from ._djangoapp import prepare
    prepare(app)
    return cast(Callable[..., Any], app)


def _file_name_hint(kind: str, spec: str, module_name: str, attr: str) -> Optional[str]:
    # People type the file they see ("web/app.py:app"); the spec wants the module's dotted name.
    if not (module_name.endswith(".py") or "/" in module_name or os.sep in module_name):
        return None
    dotted = module_name[:-3] if module_name.endswith(".py") else module_name
    dotted = dotted.strip("./" + os.sep).replace(os.sep, ".").replace("/", ".")
    return ("%s %r: looks like a file name; use the module name '%s' (run from the directory "
            "that holds it, or set PYTHONPATH)" % (kind, spec, dotted + (":" + attr if attr else "")))


def where(exc: BaseException) -> str:
    """Where ``exc`` happened in the user's own code: ``file:line: source`` of the deepest such frame."""
    if isinstance(exc, SyntaxError) and exc.filename and _is_users(exc.filename):
        # The parser's location: the traceback itself only shows importlib's frames.
        return _frame_text(exc.filename, exc.lineno, exc.text)
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    own = [f for f in frames if _is_users(f.filename)]
    frame = own[-1] if own else frames[-1]
    return _frame_text(frame.filename, frame.lineno, frame.line)


def _frame_text(filename: str, lineno: Optional[int], line: Optional[str]) -> str:
    text = "%s:%s" % (_short(filename), lineno)
    line = (line or linecache.getline(filename, lineno or 0)).strip()
    return "%s: %s" % (text, line) if line else text


def _library_dirs() -> Tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs.update(getattr(site, "getsitepackages", lambda: [])())
    dirs.add(getattr(site, "USER_SITE", None))
    dirs.add(os.path.dirname(os.path.abspath(__file__)))  # greenqueue itself
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs if d)


def _is_users(filename: str) -> bool:
    if not filename or filename.startswith("<"):
        return False  # <frozen importlib._bootstrap>, <string>: nothing the user can open
    real = os.path.realpath(filename)
    return not real.startswith(_library_dirs())


def _short(filename: str) -> str:
    cwd = os.path.join(os.getcwd(), "")
    return filename[len(cwd):] if filename.startswith(cwd) else filename


def parse_bind(text: str) -> Tuple[int, Address]:
    """Parse ``HOST:PORT``, ``[IPV6]:PORT``, ``:PORT``, ``PORT`` or ``unix:PATH`` into ``(family, address)``."""
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


def listen(bind: str, backlog: int) -> "gsocket.socket":
    """Bind and listen on ``bind``; a failure is one StartupError line that says what to change."""
    from gevent import socket as gsocket

    family, address = parse_bind(bind)
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            _remove_stale_unix_socket(cast(str, address))  # parse_bind gives unix: a path
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except socket.gaierror as exc:
        # Before OSError: gaierror is a subclass, and its errno (-2) means nothing to os.strerror.
        sock.close()
        raise StartupError("--bind %s: cannot resolve host %r (%s); use an IP address such as 127.0.0.1, "
                           "or a host name this machine resolves" % (bind, address[0], exc.strerror or exc)) from None
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError("--bind %s: address already in use (is another server running?)" % bind) from None
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            raise StartupError("--bind %s: address not available on this machine" % bind) from None
        if exc.errno == errno.EACCES:
            raise StartupError("--bind %s: permission denied (ports below 1024 need root)" % bind) from None
        raise StartupError("--bind %s: %s" % (bind, os.strerror(exc.errno) if exc.errno else exc)) from None
    return sock


def _remove_stale_unix_socket(path: str) -> None:
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


def display(bind: str) -> str:
    """The address as a user opens it: ``http://127.0.0.1:8000`` (a bare port is loopback) or ``unix:PATH``."""
    if bind.startswith("unix:"):
        return bind
    family, address = parse_bind(bind)
    host, port = cast(Tuple[str, int], address)  # unix: returned above
    if family == socket.AF_INET6:
        host = "[%s]" % host
    return "http://%s:%d" % (host, port)


def setup_logging(settings: "Settings") -> None:
    """Log to stderr at --log-level, one line per record; the access log to its own target."""
    level = getattr(logging, settings.log_level.upper())
    handler = logging.StreamHandler(sys.stderr)
    # Several processes write to one stderr under --workers: each line says which one.
    pid = " [%(process)d]" if settings.supervised else ""
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s" + pid + " %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    access = logging.getLogger("greenqueue.access")
    access.propagate = False
    access.handlers[:] = []
    if settings.access_log:
        target = settings.access_log
        ah = logging.StreamHandler(sys.stderr) if target == "-" else logging.FileHandler(target)
        ah.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(ah)
        access.setLevel(logging.INFO)


def watch_blocking(max_blocking_ms: float) -> None:
    """Turn on gevent's monitor thread and log, one line each, greenlets that block the hub too long."""

    import gevent
    from gevent import events as gevent_events

    log = logging.getLogger("greenqueue.server")
    gevent.config.monitor_thread = True
    gevent.config.max_blocking_time = max_blocking_ms / 1000.0
    # One log line per event instead of gevent's multi-line report on stderr.
    gevent.config.print_blocking_reports = False

    def on_blocked(event: Any) -> None:
        stack = next((item for item in event.info if 'File "' in item), "")
        frames = [line.strip() for line in stack.splitlines() if line.strip().startswith('File "')]
        where = frames[-1] if frames else "unknown location"
        name = getattr(event.greenlet, "name", None) or type(event.greenlet).__name__
        log.warning("hub blocked for more than %.0f ms by greenlet %s at %s",
                    event.blocking_time * 1000, name, where)

    from . import events
    events.subscribe(on_blocked, gevent_events.EventLoopBlocked)
    import warnings
    # The hub is a greenlet and is falsy until it first runs; gevent's monitor
    # thread takes a falsy hub for a dead one and quits. Let the hub run first.
    gevent.sleep(0)
    with warnings.catch_warnings():
        # gevent would also watch memory if psutil were installed; blocking is what we asked for.
        warnings.filterwarnings("ignore", message="Unable to monitor memory usage")
        gevent.get_hub().start_periodic_monitoring_thread()
