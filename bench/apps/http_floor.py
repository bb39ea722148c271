"""The floor of any gevent HTTP server: a StreamServer that finds each request's end and writes a canned answer.

No parsing, no WSGI, no app: one recv, a count of ``\\r\\n\\r\\n``, one send
per read. Whatever a real gevent server does per request comes on top of
this. Concurrency model: one greenlet per connection, as in greenqueue.
"""

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
import sys  # noqa: E402

from gevent.server import StreamServer  # noqa: E402

_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
           b"Date: Thu, 01 Jan 2026 00:00:00 GMT\r\n\r\nHello, World!")


def handle(sock, address):
    """Answer each complete request head in what one recv brought (pipelining included)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tail = b""
    while True:
        data = sock.recv(65536)
        if not data:
            break
        data = tail + data
        n = data.count(b"\r\n\r\n")
        tail = data[data.rfind(b"\r\n\r\n") + 4:] if n else data
        if n:
            sock.sendall(_ANSWER * n)
    sock.close()


if __name__ == "__main__":
    StreamServer(("127.0.0.1", int(sys.argv[1])), handle, backlog=4096).serve_forever()
