"""One table of server settings: it makes the CLI, config-file names, env vars and help.

Concurrency model: pure functions run once in the main greenlet at start-up.
Precedence, lowest first: default, ``GREENQUEUE_*`` environment variable,
``--config`` file, command line. A config-file name that is no setting is
reported (with the closest setting's name) rather than silently ignored;
names starting with ``_``, imports, functions and classes are the file's own.
What :func:`load` returns is a frozen :class:`Settings`, read (never
changed) by the supervisor, the server and the worker; a forked server
process inherits it as it is.
"""

import argparse
import ast
import difflib
import ipaddress
import os
import runpy
import sys
import traceback
import types
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from .errors import ConfigError

__all__ = ["Setting", "SETTINGS", "Settings", "build_parser", "load", "parse_ips"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be 1 or more, got %r" % text)
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value <= 0:
        raise ValueError("must be more than 0")
    return value


def _queues(text: Any) -> List[str]:
    if isinstance(text, (list, tuple)):
        return [str(q) for q in text]
    return [q.strip() for q in str(text).split(",") if q.strip()]


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more, got %r" % text)
    return value


def _boolean(text: str) -> bool:
    word = str(text).strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false, got %r" % text)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError("must be 0 or more, got %r" % text)
    return value


JOURNAL_SYNC = ("normal", "full")


def _journal_sync(text: str) -> str:
    mode = str(text).lower()
    if mode not in JOURNAL_SYNC:
        raise ValueError("must be one of %s, got %r" % (", ".join(JOURNAL_SYNC), text))
    return mode


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(text: str) -> str:
    level = str(text).lower()
    if level not in LOG_LEVELS:
        raise ValueError("must be one of %s, got %r" % (", ".join(LOG_LEVELS), text))
    return level


def parse_ips(text: Any) -> Optional[Tuple[Any, ...]]:
    """Parse ``"127.0.0.1, 10.0.0.0/8"`` or ``"*"`` (or a list of those) into networks; None means any."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    nets = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        if item == "*":
            return None
        nets.append(ipaddress.ip_network(item, strict=False))
    return tuple(nets)


def _ips(text: str) -> str:
    parse_ips(text)  # validate now so a typo fails at start-up
    return text


@dataclass
class Setting:
    """One server option: its name is the config-file name and ``--flag`` spelling."""

    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str
    multiple: bool = False
    metavar: Optional[str] = None
    flag: bool = False  # a boolean switch with no value
    # How help shows the default when the real one lives elsewhere (the app, the runner):
    # the setting's own default is then None, meaning "do not override".
    shown: Optional[str] = None

    @property
    def option(self) -> str:
        """The long CLI flag, e.g. ``--graceful-timeout``."""
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        """The environment variable that can set this option."""
        return "GREENQUEUE_" + self.name.upper()

    @property
    def shown_default(self) -> str:
        """The default as ``--help`` and the README show it, e.g. ``30.0``, ``none`` or ``the app's `workers```."""
        if self.shown is not None:
            return self.shown
        if isinstance(self.default, list):
            return " ".join(map(str, self.default)) or "none"
        return "none" if self.default is None else str(self.default)


SETTINGS = [
    Setting("bind", ["127.0.0.1:8000"], "address to listen on: HOST:PORT, [IPV6]:PORT or unix:PATH (repeatable)",
            multiple=True, metavar="ADDR"),
    Setting("config", None, "python file whose top-level names match these options", metavar="FILE.py"),
    Setting("graceful_timeout", 30.0,
            "seconds to drain requests, streams, WebSockets and tasks on SIGTERM/SIGINT (then WebSockets hear 1001)",
            _non_negative_float, metavar="S"),
    Setting("max_connections", 1000,
            "concurrent client connections, open WebSockets included; more wait in the accept backlog",
            _positive_int, metavar="N"),
    Setting("backlog", 2048, "listen backlog (connections waiting to be accepted)", _positive_int, metavar="N"),
    Setting("header_timeout", 10.0, "seconds a client may take to send a request's line and headers",
            _non_negative_float, metavar="S"),
    Setting("keepalive_timeout", 75.0, "seconds an idle keep-alive connection is kept open",
            _non_negative_float, metavar="S"),
    Setting("max_request_line", 8190, "longest request line in bytes (longer: 414)", _positive_int, metavar="BYTES"),
    Setting("max_header_size", 65536, "total size of request headers in bytes (larger: 431)",
            _positive_int, metavar="BYTES"),
    Setting("max_headers", 100, "most request header fields (more: 431)", _positive_int, metavar="N"),
    Setting("forwarded_allow_ips", "127.0.0.1,::1",
            "trust X-Forwarded-For/-Proto only from these addresses or networks ('*' = any)", _ips, metavar="IPS"),
    Setting("access_log", None, "write one line per request to FILE, or '-' for stderr", metavar="FILE|-",
            shown="off"),
    Setting("log_level", "info", "log level: " + ", ".join(LOG_LEVELS), _log_level, metavar="LEVEL"),
    Setting("max_blocking_ms", 0.0, "log the greenlet that blocks the hub longer than this (0 = off)",
            _non_negative_float, metavar="MS"),
    Setting("dirty_apps", [], "start a process pool for MODULE:CLASS (a DirtyApp; repeatable)",
            multiple=True, metavar="MODULE:CLASS"),
    Setting("dirty_workers", None, "worker processes per dirty app", _positive_int, metavar="N",
            shown="the app's `workers`"),
    Setting("dirty_timeout", None, "seconds per dirty call", _non_negative_float, metavar="S",
            shown="the app's `timeout`"),
    Setting("journal", None, "SQLite file, or postgresql://… shared by every node: tasks and schedules "
            "survive restarts and crashes", metavar="PATH|URL", shown="off"),
    Setting("journal_sync", "normal", "SQLite journal durability: normal (a power cut may lose the last "
            "commits, never corrupts) or full (fsync every commit, about twice the cost); PostgreSQL follows "
            "the server's synchronous_commit", _journal_sync, metavar="normal|full"),
    Setting("workers", None, "server processes on this host sharing the listening sockets; given (1 included), "
            "a supervisor runs them, replaces them and reloads them on SIGHUP", _positive_int, metavar="N",
            shown="1, no supervisor"),
    Setting("max_requests", 0, "replace a server process after it served this many requests (0 = never; "
            "starts the supervisor)", _non_negative_int, metavar="N"),
    Setting("max_requests_jitter", 0, "add up to this many requests (random, per process) to --max-requests, "
            "so processes are not replaced together", _non_negative_int, metavar="N"),
    Setting("timeout", 0.0, "replace a server process whose hub has not turned for this many seconds, logging "
            "the stack that held it (0 = off; starts the supervisor)", _non_negative_float, metavar="S"),
    Setting("reload", False, "development: restart the server processes when a Python file under the app's "
            "directory changes (starts the supervisor)", _boolean, flag=True, shown="off"),
    Setting("lease_timeout", 30.0, "seconds before a dead node's tasks run elsewhere (and the scheduler "
            "leader's lease)", _positive_float, metavar="S"),
    Setting("queues", None, "queues this node claims tasks from, comma-separated ('' = none: only enqueue)",
            _queues, metavar="A,B", shown="all"),
    Setting("metrics_path", None, "serve Prometheus metrics at this path, e.g. /metrics", metavar="PATH",
            shown="off"),
    Setting("dashboard_path", None, "serve the live dashboard at this path, e.g. /_greenqueue", metavar="PATH",
            shown="off"),
    Setting("dashboard_allow_ips", "127.0.0.1,::1",
            "addresses or networks that may see the dashboard and metrics ('*' = any)", _ips, metavar="IPS"),
    Setting("dashboard_token", None, "bearer token that also opens the dashboard and metrics from anywhere",
            metavar="TOKEN"),
    # None leaves the runner's own default (100, 10000) alone, so an app's greenqueue.configure() stands.
    Setting("max_concurrency", None, "task greenlets running at once", _positive_int, metavar="N", shown="100"),
    Setting("max_pending", None, "waiting tasks before spawn raises Overloaded", _positive_int, metavar="N",
            shown="10000"),
]

# --dirty-app is the spelling DESIGN.md gives the repeatable flag.
_FLAG_OVERRIDES = {"dirty_apps": "--dirty-app"}
_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Settings:
    """The values of every :data:`SETTINGS` entry, one typed attribute each (``settings.max_connections``).

    The table stays the one source of names, defaults and parsing; this class only gives
    the parsed values types, and importing this module checks the two name the same settings.
    """

    bind: Sequence[str]
    config: Optional[str]
    graceful_timeout: float
    max_connections: int
    backlog: int
    header_timeout: float
    keepalive_timeout: float
    max_request_line: int
    max_header_size: int
    max_headers: int
    forwarded_allow_ips: str
    access_log: Optional[str]
    log_level: str
    max_blocking_ms: float
    dirty_apps: Sequence[str]
    dirty_workers: Optional[int]
    dirty_timeout: Optional[float]
    journal: Optional[str]
    journal_sync: str
    workers: Optional[int]
    max_requests: int
    max_requests_jitter: int
    timeout: float
    reload: bool
    lease_timeout: float
    queues: Optional[Sequence[str]]
    metrics_path: Optional[str]
    dashboard_path: Optional[str]
    dashboard_allow_ips: str
    dashboard_token: Optional[str]
    max_concurrency: Optional[int]
    max_pending: Optional[int]
    #: gunicorn's server hooks found in a ``--config`` file, by name (not an option of its own).
    server_hooks: Mapping[str, Callable[..., Any]] = field(default_factory=dict)

    @property
    def processes(self) -> int:
        """How many server processes run on this host (``--workers``, 1 when not given)."""
        return self.workers or 1

    @property
    def supervised(self) -> bool:
        """True when a supervisor runs the server processes: ``--workers`` given, or an option that needs one."""
        return self.workers is not None or bool(self.max_requests or self.timeout or self.reload)

    def __getitem__(self, name: str) -> Any:
        """``settings["backlog"]``: the same value as ``settings.backlog``, for code that reads settings by name."""
        if name not in _BY_NAME:
            raise KeyError(name)
        return getattr(self, name)


#: Settings fields that are no option (no flag, no environment variable): what a config file brings besides.
_NOT_OPTIONS = ("server_hooks",)


def _check_settings_class() -> None:
    # A setting added to the table but not to the class (or the reverse) fails at import, not at run time.
    declared = [f.name for f in fields(Settings) if f.name not in _NOT_OPTIONS]
    if declared != [s.name for s in SETTINGS]:
        raise TypeError("config.Settings and config.SETTINGS disagree: %s"
                        % ", ".join(sorted(set(declared) ^ set(_BY_NAME)) or "the order differs"))


_check_settings_class()


#: Settings that mean nothing to a node without HTTP (python -m greenqueue.worker).
HTTP_ONLY = ("bind", "max_connections", "backlog", "header_timeout", "keepalive_timeout", "max_request_line",
             "max_header_size", "max_headers", "forwarded_allow_ips", "access_log", "metrics_path",
             "dashboard_path", "dashboard_allow_ips", "dashboard_token", "workers", "max_requests",
             "max_requests_jitter", "timeout", "reload")


def build_parser(prog: str = "greenqueue", worker: bool = False) -> argparse.ArgumentParser:
    """Build the argparse parser from :data:`SETTINGS` (``worker``: the node without HTTP)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=prog, description="Run greenlet tasks, schedules and process pools without an HTTP listener."
        if worker else "Serve a WSGI app with greenlet tasks, schedules and process pools.",
        epilog="Every option can also be set in the --config file (same name, underscores) "
               "or as a GREENQUEUE_<NAME> environment variable.",
        argument_default=argparse.SUPPRESS)
    if worker:
        parser.add_argument("app", metavar="MODULE", help="the module that declares your tasks, e.g. myproject.tasks")
    else:
        parser.add_argument("app", metavar="MODULE:APP", help="the WSGI app, e.g. myproject.web:app")
    parser.add_argument("--version", action="version", version="greenqueue %s" % __version__)
    for s in SETTINGS:
        if worker and s.name in HTTP_ONLY:
            continue
        flag = _FLAG_OVERRIDES.get(s.name, s.option)
        kwargs: Dict[str, Any] = {"dest": s.name, "metavar": s.metavar,
                                  "help": "%s (default: %s)" % (s.help, s.shown_default)}
        if s.multiple:
            kwargs["action"] = "append"
        if s.flag:
            kwargs["action"] = "store_const"
            kwargs["const"] = True
            del kwargs["metavar"]
        parser.add_argument(flag, **kwargs)
    return parser


def _coerce(setting: Setting, value: Any, source: str) -> Any:
    try:
        if setting.multiple:
            values = value if isinstance(value, (list, tuple)) else [value]
            return [setting.parse(v) if isinstance(v, str) else v for v in values]
        if value is None:
            return None
        return setting.parse(value) if isinstance(value, str) else setting.parse(str(value))
    except (TypeError, ValueError) as exc:
        raise ConfigError("%s %s: %s" % (source, setting.option, exc)) from None


def _from_env(environ: Mapping[str, str]) -> Dict[str, Any]:
    values = {}
    for s in SETTINGS:
        raw = environ.get(s.env)
        if raw is not None and s.name != "config":
            values[s.name] = _coerce(s, raw.split() if s.multiple else raw, "environment " + s.env + " for")
    return values


# Names a config file may also use for a setting: the CLI flag's spelling, and gunicorn's
# names for what greenqueue also does, so a gunicorn.conf.py works as it is.
_ALIASES = {"dirty_app": "dirty_apps", "keepalive": "keepalive_timeout", "worker_connections": "max_connections",
            "accesslog": "access_log", "loglevel": "log_level", "limit_request_line": "max_request_line",
            "limit_request_fields": "max_headers", "limit_request_field_size": "max_header_size"}
#: gunicorn's server hooks greenqueue calls (with stand-ins for gunicorn's arbiter and worker objects).
GUNICORN_HOOKS = ("on_starting", "when_ready", "post_worker_init", "worker_exit")
#: gunicorn settings with no meaning here: named once, in one warning, rather than one "did you mean" each.
_GUNICORN_ONLY = frozenset((
    "access_log_format", "asgi_disconnect_grace_period", "asgi_lifespan", "asgi_loop", "ca_certs",
    "capture_output", "casefold_http_method", "cert_reqs", "certfile", "chdir", "check_config", "child_exit",
    "ciphers", "control_socket", "control_socket_disable", "control_socket_mode", "daemon", "default_proc_name",
    "dirty_graceful_timeout", "dirty_post_fork", "dirty_threads", "dirty_worker_exit", "dirty_worker_init",
    "disable_redirect_access_to_syslog", "do_handshake_on_connect", "dogstatsd_tags", "enable_backlog_metric",
    "enable_stdio_inheritance", "errorlog", "forwarder_headers", "group", "header_map", "http2_cleartext",
    "http2_initial_window_size", "http2_max_concurrent_streams", "http2_max_frame_size",
    "http2_max_header_list_size", "http_parser", "http_protocols", "initgroups", "keyfile", "logconfig",
    "logconfig_dict", "logconfig_json", "logger_class", "nworkers_changed", "on_dirty_starting", "on_exit",
    "on_reload", "paste", "permit_obsolete_folding", "permit_unconventional_http_method",
    "permit_unconventional_http_version", "pidfile", "post_fork", "post_request", "pre_exec", "pre_fork",
    "pre_request", "preload_app", "print_config", "proc_name", "protocol", "proxy_allow_ips", "proxy_protocol",
    "pythonpath", "raw_env", "raw_paste_global_conf", "reload_engine", "reload_extra_files", "reuse_port",
    "root_path", "secure_scheme_headers", "sendfile", "spew", "ssl_context", "ssl_version", "statsd_host",
    "statsd_prefix", "strip_header_spaces", "suppress_ragged_eofs", "syslog", "syslog_addr", "syslog_facility",
    "syslog_prefix", "threads", "tmp_upload_dir", "umask", "user", "uwsgi_allow_ips",
    "websocket_max_message_size", "worker_abort", "worker_class", "worker_int", "worker_tmp_dir", "wsgi_app"))
# Values that are the file's machinery, not settings: a typo cannot produce these.
_NOT_SETTINGS = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)


def _from_file(path: str, warn: Callable[[str], None]) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError("config file %s: no such file" % path)
    try:
        with open(path, "rb") as f:
            source = f.read()
        assigned, imported = _file_names(source, path)
        names = runpy.run_path(path)
    except SyntaxError as exc:
        raise ConfigError("config file %s:%s: SyntaxError: %s%s"
                          % (path, exc.lineno, exc.msg, _source_hint(exc.text))) from None
    except Exception as exc:
        raise ConfigError("config file %s: %s: %s" % (_where_in(path, exc), type(exc).__name__, exc)) from None
    values: Dict[str, Any] = {}
    hooks = {}
    ignored = []
    for key, value in names.items():
        if key in GUNICORN_HOOKS and callable(value):
            hooks[key] = value
            continue
        if key.startswith("_") or key in imported or isinstance(value, _NOT_SETTINGS):
            if key in _GUNICORN_ONLY and isinstance(value, types.FunctionType):
                ignored.append(key)  # a gunicorn hook greenqueue does not call
            continue
        name = _ALIASES.get(key, key)
        if name in _BY_NAME and name != "config":
            if key in ("limit_request_line", "limit_request_fields") and value in (0, "0"):
                warn("config file %s:%d: %s = 0 (gunicorn's 'no limit') is kept at greenqueue's default %s"
                     % (path, assigned.get(key, 0), key, _BY_NAME[name].shown_default))
                continue
            values[name] = _coerce(_BY_NAME[name], value, "config file %s:" % path)
        elif key in _GUNICORN_ONLY:
            ignored.append(key)
        elif key in assigned:
            warn(_unknown_name(path, key, assigned[key]))
    if ignored:
        warn("config file %s: gunicorn settings with no meaning under greenqueue, ignored: %s"
             % (path, ", ".join(sorted(ignored))))
    if hooks:
        values["server_hooks"] = hooks
    return values


def _file_names(source: bytes, path: str) -> Tuple[Dict[str, int], Set[str]]:
    """Names the file assigns at top level (with their first line) and names it imports."""
    assigned: Dict[str, int] = {}
    imported: Set[str] = set()
    stack: List[ast.AST] = [ast.parse(source, path)]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imported.update((a.asname or a.name).partition(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            assigned[node.id] = min(node.lineno, assigned.get(node.id, node.lineno))
        # A function's or class's own locals are not the file's names.
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)) \
                or isinstance(node, ast.Module):
            stack.extend(ast.iter_child_nodes(node))
    return assigned, imported


def _unknown_name(path: str, key: str, lineno: int) -> str:
    choices = list(_BY_NAME) + list(_ALIASES)
    close = difflib.get_close_matches(key.lower(), choices, n=1)
    if close:
        hint = "did you mean %r?" % _ALIASES.get(close[0], close[0])
    else:
        hint = "the settings are listed by --help (start helper names with _ to silence this)"
    return "config file %s:%d: %r is not a setting and is ignored; %s" % (path, lineno, key, hint)


def _where_in(path: str, exc: BaseException) -> str:
    real = os.path.realpath(path)
    lines = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.realpath(f.filename) == real]
    if not lines:
        return path
    return "%s:%s%s" % (path, lines[-1].lineno, _source_hint(lines[-1].line))


def _source_hint(line: Optional[str]) -> str:
    line = (line or "").strip()
    return " (in: %s)" % line if line else ""


def _print_warning(message: str) -> None:
    # Logging is not configured yet (the log level is one of the settings being read).
    print("greenqueue: warning: %s" % message, file=sys.stderr)


def load(argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None,
         warn: Callable[[str], None] = _print_warning, worker: bool = False) -> Tuple[str, Settings]:
    """Parse argv/env/config into ``(app_spec, Settings)``; raise ConfigError when invalid."""
    environ = os.environ if environ is None else environ
    parser = build_parser("python -m greenqueue.worker" if worker else "greenqueue", worker)
    args = vars(parser.parse_args(argv))
    app_spec = args.pop("app")
    cli = {}
    for name, value in args.items():
        cli[name] = _coerce(_BY_NAME[name], value, "option")
    values = {s.name: s.default for s in SETTINGS}
    values.update(_from_env(environ))
    config_path = cli.get("config") or environ.get("GREENQUEUE_CONFIG")
    if config_path:
        values.update(_from_file(config_path, warn))
        values["config"] = config_path
    values.update(cli)
    return app_spec, Settings(**values)
