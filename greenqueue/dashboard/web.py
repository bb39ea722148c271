"""The WSGI side of observability: /metrics, the live dashboard, its actions, and who may see them.

Concurrency model: a middleware in front of the app; each request runs in
its connection's greenlet. The dashboard's SSE stream sends a snapshot every
second from that greenlet and ends when the client leaves (the server
closes streams whose client hung up).
"""

import hmac
import ipaddress
import json
import os
from http.cookies import SimpleCookie
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qs

from ..errors import GreenqueueError
from .state import snapshot

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from .metrics import Metrics

__all__ = ["Observability"]

_PAGE = Path(__file__).with_name("dashboard.html")
_COOKIE = "greenqueue_dashboard"

#: An address or network allowed to see the dashboard and metrics.
_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_Headers = List[Tuple[str, str]]


#: Who may see the metrics and the dashboard when nothing else is said: this host.
LOOPBACK: Tuple[_Network, ...] = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))


class Observability:
    """Serves metrics and the dashboard under their paths; everything else goes to the app."""

    def __init__(self, app: "WSGIApplication", metrics: "Metrics", metrics_path: Optional[str] = None,
                 dashboard_path: Optional[str] = None, allow_ips: Optional[Sequence[_Network]] = LOOPBACK,
                 token: Optional[str] = None, interval: float = 1.0) -> None:
        self.app = app
        self.metrics = metrics
        self.metrics_path = metrics_path
        self.dashboard_path = (dashboard_path or "").rstrip("/") or None
        #: The networks allowed in without the token; None: every address (``--dashboard-allow-ips '*'``).
        self.allow: Optional[Sequence[_Network]] = allow_ips
        self.token = token
        self.interval = interval
        # A per-process secret: the CSRF token is only ever known to pages this process served.
        self.csrf = hmac.new(os.urandom(32), b"greenqueue-dashboard", "sha256").hexdigest()

    def __call__(self, environ: "WSGIEnvironment", start_response: "StartResponse") -> Iterable[bytes]:
        """Answer the metrics and dashboard paths; pass every other request to the app."""
        path = environ.get("PATH_INFO", "")
        if self.metrics_path and path == self.metrics_path:
            return self._guarded(environ, start_response, self._metrics)
        dp = self.dashboard_path
        if dp and (path == dp or path.startswith(dp + "/")):
            return self._guarded(environ, start_response, self._dashboard)
        return self.app(environ, start_response)

    # -- access --------------------------------------------------------------------------

    def _token_ok(self, environ: "WSGIEnvironment") -> bool:
        if not self.token:
            return False
        auth = environ.get("HTTP_AUTHORIZATION", "")
        candidates = [auth[7:].strip()] if auth.lower().startswith("bearer ") else []
        cookie = SimpleCookie(environ.get("HTTP_COOKIE", ""))
        if _COOKIE in cookie:
            candidates.append(cookie[_COOKIE].value)
        query = parse_qs(environ.get("QUERY_STRING", "")).get("token")
        if query:
            candidates.append(query[0])
        return any(hmac.compare_digest(c.encode(), self.token.encode()) for c in candidates)

    def _ip_ok(self, environ: "WSGIEnvironment") -> bool:
        addr = environ.get("REMOTE_ADDR") or ""
        if not addr:
            return True  # a unix-socket client with no X-Forwarded-For: a local process
        if self.allow is None:
            return True
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.allow)

    def _guarded(self, environ: "WSGIEnvironment", start_response: "StartResponse",
                 handler: "WSGIApplication") -> Iterable[bytes]:
        if self._ip_ok(environ) or self._token_ok(environ):
            extra: _Headers = []
            if self.token and "token=" in environ.get("QUERY_STRING", "") and self._token_ok(environ):
                # Remember a token given once in the URL, so the page's own requests carry it.
                extra.append(("Set-Cookie", "%s=%s; HttpOnly; SameSite=Strict; Path=/" % (_COOKIE, self.token)))
            return handler(environ, _with_headers(start_response, extra))
        if self.token:
            return _plain(start_response, "401 Unauthorized", "send the dashboard token as "
                          "'Authorization: Bearer TOKEN'\n", [("WWW-Authenticate", 'Bearer realm="greenqueue"')])
        return _plain(start_response, "403 Forbidden", "this address may not see the dashboard or metrics; allow "
                      "it with --dashboard-allow-ips or set --dashboard-token\n")

    # -- handlers ----------------------------------------------------------------------------

    def _metrics(self, environ: "WSGIEnvironment", start_response: "StartResponse") -> List[bytes]:
        body, ctype = self.metrics.render()
        start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-store")])
        return [body]

    def _dashboard(self, environ: "WSGIEnvironment", start_response: "StartResponse") -> Iterable[bytes]:
        base = self.dashboard_path or ""  # only routed here when there is one
        sub = environ["PATH_INFO"][len(base):] or "/"
        method = environ["REQUEST_METHOD"]
        if sub == "/" and method in ("GET", "HEAD"):
            page = _PAGE.read_text().replace("{{CSRF}}", self.csrf).replace("{{BASE}}", base)
            return _plain(start_response, "200 OK", page, [("Content-Type", "text/html; charset=utf-8"),
                                                           ("Cache-Control", "no-store")])
        if sub == "/state.json":
            return _json(start_response, "200 OK", snapshot(self.metrics))
        if sub == "/events":
            return self._events(start_response)
        if sub == "/health":
            from ..runtime import health
            state = health()
            return _json(start_response, "200 OK" if state["status"] == "ok" else "503 Service Unavailable", state)
        parts = sub.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "tasks" and parts[2] in ("cancel", "retry"):
            if method != "POST":
                return _json(start_response, "405 Method Not Allowed", {"error": "use POST"})
            sent = environ.get("HTTP_X_CSRF_TOKEN", "")
            if not hmac.compare_digest(sent.encode(), self.csrf.encode()):
                return _json(start_response, "403 Forbidden", {"error": "missing or wrong X-CSRF-Token"})
            return self._action(start_response, parts[1], parts[2])
        return _json(start_response, "404 Not Found", {"error": "no such dashboard page"})

    def _action(self, start_response: "StartResponse", task_id: str, action: str) -> List[bytes]:
        from ..runtime import get_runtime
        runtime = get_runtime()
        if action == "cancel":
            r = runtime.runner.result(task_id)
            if r is None:
                return _json(start_response, "404 Not Found", {"error": "no such task"})
            return _json(start_response, "200 OK", {"cancelled": r.cancel(), "state": r.state})
        try:
            r = runtime.retry(task_id)
        except GreenqueueError as exc:  # no journal, no such task, or not failed: the store says which
            return _json(start_response, "409 Conflict", {"error": str(exc)})
        return _json(start_response, "200 OK", {"retried": True, "state": r.state})

    def _events(self, start_response: "StartResponse") -> Iterator[bytes]:
        import gevent
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                                  ("X-Accel-Buffering", "no")])

        def stream() -> Iterator[bytes]:
            while True:
                yield ("data: %s\n\n" % json.dumps(snapshot(self.metrics), default=str)).encode()
                gevent.sleep(self.interval)
        return stream()


def _with_headers(start_response: "StartResponse", extra: _Headers) -> "StartResponse":
    if not extra:
        return start_response

    def wrapped(status: str, headers: _Headers, exc_info: "Optional[OptExcInfo]" = None) -> Callable[[bytes], object]:
        return start_response(status, list(headers) + extra, exc_info)
    return wrapped


def _plain(start_response: "StartResponse", status: str, text: str, headers: Optional[_Headers] = None) -> List[bytes]:
    body = text.encode()
    start_response(status, (headers or [("Content-Type", "text/plain; charset=utf-8")]) +
                   [("Content-Length", str(len(body)))])
    return [body]


def _json(start_response: "StartResponse", status: str, data: Mapping[str, object]) -> List[bytes]:
    body = json.dumps(data, default=str).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store")])
    return [body]
