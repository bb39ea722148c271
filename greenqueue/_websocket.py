"""WebSocket takeover: how a WSGI app gets the socket of a request that asked for an upgrade.

Two doors, the ones the libraries people use knock on:

- ``environ["gunicorn.socket"]``: the connection's socket, as gunicorn's
  gevent worker hands it over. simple-websocket (flask-sock) and
  python-engineio without gevent-websocket read it, make the handshake
  themselves and then signal the end of the socket by raising StopIteration
  out of the app, as they do under gunicorn.
- ``environ["wsgi.websocket"]``: gevent-websocket's object (``receive``,
  ``send``, ``close``, ``closed``, ``path``, ``origin``, ``protocol``,
  ``version``), which python-engineio uses when gevent-websocket is
  installed. It is lazy: the handshake is made on first use, so an app whose
  flask-sock routes take the socket themselves is not answered twice, and
  greenqueue needs no gevent-websocket. Frames are read and written with
  wsproto (a dependency of simple-websocket and so of every library above),
  in the greenlet that calls ``receive``: no reader greenlet per socket.

Either door, once used, marks the connection as taken over
(:meth:`greenqueue._http.Connection.take_over`): from then on the server
writes nothing more on it, whatever the app returns, and closes it when the
app returns. Only requests that asked for a WebSocket upgrade get the doors,
so an ordinary request pays nothing.

Concurrency model: everything runs in the greenlets of the hub that serves
the connection. A gevent-websocket object may be written by several
greenlets (python-engineio sends from one while another waits in
``receive``): a lock keeps one frame whole on the wire.
"""

import base64
import hashlib
from typing import Any, Dict, List, Optional, Union

from .errors import GreenqueueError

__all__ = ["WebSocket", "WebSocketError", "offer"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# The close frame the server sends when its graceful timeout ends: 1001 "going away", unmasked.
GOING_AWAY_FRAME = b"\x88\x02\x03\xe9"


class WebSocketError(GreenqueueError):
    """A WebSocket broke its protocol, or was used after it closed."""


def wants_websocket(environ: Dict[str, Any]) -> bool:
    """True when the request asks for a WebSocket upgrade."""
    return "websocket" in environ.get("HTTP_UPGRADE", "").lower()


def offer(conn: Any, environ: Dict[str, Any]) -> None:
    """Put the doors into the environ of an upgrade request."""
    environ["gunicorn.socket"] = TakeoverSocket(conn)
    if _handshake_key(environ) is not None:
        environ["wsgi.websocket"] = WebSocket(conn, environ)
        environ["wsgi.websocket_version"] = "13"


def _handshake_key(environ: Dict[str, Any]) -> Optional[str]:
    """The client's Sec-WebSocket-Key, when the request is a well-formed version 13 handshake."""
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13" or environ.get("REQUEST_METHOD") != "GET":
        return None
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except ValueError:
        return None
    return key


class TakeoverSocket:
    """The connection's socket as ``gunicorn.socket``: its first use takes the connection over.

    Every attribute comes from the real (gevent) socket; the first one looked
    up tells the connection it is taken, and each is then kept on this object
    so later look-ups cost what they cost on the socket itself.
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> Any:
        conn = self.__dict__["_conn"]
        conn.take_over(self)
        value = getattr(conn.sock, name)
        setattr(self, name, value)
        return value


class WebSocket:
    """``wsgi.websocket``: gevent-websocket's WebSocket, its handshake made on first use."""

    def __init__(self, conn: Any, environ: Dict[str, Any]) -> None:
        self._conn = conn
        self.environ = environ
        self._ws: Any = None          # wsproto's connection, once the handshake is made
        self._closed = False
        self._lock: Any = None
        self._parts: List[Any] = []

    # gevent-websocket's attributes ----------------------------------------
    @property
    def version(self) -> str:
        """The protocol version the client asked for ("13")."""
        self._open()
        return str(self.environ.get("HTTP_SEC_WEBSOCKET_VERSION", "13"))

    @property
    def path(self) -> str:
        """The request path."""
        self._open()
        return str(self.environ.get("PATH_INFO", "/"))

    @property
    def origin(self) -> Optional[str]:
        """The Origin header, if any."""
        self._open()
        return self.environ.get("HTTP_ORIGIN")

    @property
    def protocol(self) -> Optional[str]:
        """The subprotocol agreed on (none: this server picks none)."""
        self._open()
        return None

    @property
    def closed(self) -> bool:
        """True once either side has closed the WebSocket."""
        return self._closed

    def _open(self) -> None:
        if self._ws is not None:
            return
        from gevent.lock import RLock
        from wsproto.connection import Connection, ConnectionType

        key = _handshake_key(self.environ)
        assert key is not None, "offered only for a valid handshake"
        accept = base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")
        self._conn.take_over(self)
        self._lock = RLock()
        self._ws = Connection(ConnectionType.SERVER)
        self._write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Accept: %s\r\n\r\n" % accept).encode("ascii"))

    def _write(self, data: bytes) -> None:
        with self._lock:
            self._conn.sock.sendall(data)

    def receive(self) -> Optional[Union[str, bytes]]:
        """The next whole message (str for text, bytes for binary), or None once the WebSocket closed."""
        from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

        self._open()
        ws = self._ws
        while not self._closed:
            try:
                for event in ws.events():
                    if isinstance(event, (TextMessage, BytesMessage)):
                        self._parts.append(event.data)
                        if event.message_finished:
                            parts, self._parts = self._parts, []
                            if isinstance(event, TextMessage):
                                return "".join(parts)
                            return b"".join(parts)
                    elif isinstance(event, Ping):
                        self._write(ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        self._closed = True
                        if ws.state.name == "REMOTE_CLOSING":
                            self._write(ws.send(event.response()))
                        return None
            except OSError:
                self._closed = True  # the client went away while we answered its ping or close
                return None
            except Exception as exc:  # wsproto refused the frames: the client broke the protocol
                self._closed = True
                raise WebSocketError("WebSocket protocol error: %s" % exc) from exc
            try:
                data = self._conn.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._closed = True
                return None
            ws.receive_data(data)
        return None

    read_message = receive

    def send(self, message: Union[str, bytes, bytearray], binary: Optional[bool] = None) -> None:
        """Send one message: text for str, binary for bytes (or as ``binary`` says)."""
        from wsproto.events import BytesMessage, TextMessage

        self._open()
        if self._closed:
            raise WebSocketError("the WebSocket is closed")
        if binary is None:
            binary = not isinstance(message, str)
        if binary:
            data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
            frame = self._ws.send(BytesMessage(data=data))
        else:
            text = message if isinstance(message, str) else bytes(message).decode("utf-8")
            frame = self._ws.send(TextMessage(data=text))
        self._write(frame)

    def close(self, code: int = 1000, message: Union[str, bytes] = b"") -> None:
        """Send a close frame (once); the server closes the socket when the app returns."""
        from wsproto.events import CloseConnection

        if self._ws is None or self._closed:
            self._closed = True
            return
        self._closed = True
        reason = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        try:
            self._write(self._ws.send(CloseConnection(code=code, reason=reason or None)))
        except Exception:
            pass  # the client is gone already, or closed first: nothing left to say
