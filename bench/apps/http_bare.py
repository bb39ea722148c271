"""A bare WSGI callable (13-byte body): what a server costs per request, with no framework."""

_BODY = b"Hello, World!"
_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(_BODY)))]


def app(environ, start_response):
    """Answer every request with the same 13 bytes."""
    start_response("200 OK", _HEADERS)
    return [_BODY]
