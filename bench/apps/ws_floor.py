"""The floor of any gevent WebSocket server: a StreamServer echoing frames with wsproto, no HTTP server, no app.

One greenlet per connection reads, parses with wsproto (the frame code
simple-websocket uses too) and writes the echo: no reader greenlet per
socket, no event between two greenlets, no WSGI, and send rather than
gevent's sendall (see send_all). Whatever a server plus
flask-sock does per message comes on top of this.
"""

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
import sys  # noqa: E402

from gevent.server import StreamServer  # noqa: E402
from wsproto import ConnectionType, WSConnection  # noqa: E402
from wsproto.events import AcceptConnection, CloseConnection, Message, Ping, Request  # noqa: E402


def send_all(sock: socket.socket, data: bytes) -> None:
    """Write ``data`` with send (gevent's sendall costs a getsockopt system call per call; simple-websocket sends)."""
    while data:
        data = data[sock.send(data):]


def handle(sock: socket.socket, address: tuple) -> None:
    """Accept the handshake, then echo each whole message until the client closes."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ws = WSConnection(ConnectionType.SERVER)
    parts = []
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            ws.receive_data(data)
            out = b""
            for event in ws.events():
                if isinstance(event, Request):
                    out += ws.send(AcceptConnection())
                elif isinstance(event, Message):
                    parts.append(event.data)
                    if event.message_finished:
                        out += ws.send(event.__class__(data=type(event.data)().join(parts)))
                        parts = []
                elif isinstance(event, Ping):
                    out += ws.send(event.response())
                elif isinstance(event, CloseConnection):
                    send_all(sock, out + ws.send(event.response()))
                    return
            if out:
                send_all(sock, out)
    except OSError:
        pass
    finally:
        sock.close()


if __name__ == "__main__":
    StreamServer(("127.0.0.1", int(sys.argv[1])), handle, backlog=4096).serve_forever()
