"""The WebSocket bench's load generator: echo round trips on N connections, or N idle connections held open.

Usage: ``python -m bench.apps.ws_clients echo PORT CONNS SECONDS`` prints one
JSON line (round trips, seconds, the client's CPU seconds, failed
connections); ``python -m bench.apps.ws_clients hold PORT N`` opens N
connections, checks each with one echo, prints ``ready HELD FAILED`` and
keeps them open and idle until its stdin closes.

Why not simple_websocket.Client: it starts an OS thread per connection and
hands every message from that thread to the caller through a
threading.Event, so at 50 connections the client's own GIL traffic and
thread switches set the pace, not the server's. Here one gevent process
drives every connection, a greenlet each, and each message costs the
client one send of a precomputed masked frame and one recv compared
against the known echo: no frame parsing on the hot path. The bench
reports the client's CPU share of a core so a saturated client shows.
"""

from gevent import monkey

monkey.patch_all()

import base64  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.pool import Pool  # noqa: E402

PATH = "/echo"
PAYLOAD = b"greenqueue websocket bench 0123"  # 31 bytes: a small chat-sized text message
_MASK = b"\x37\xfa\x21\x3d"  # a client must mask; a fixed key is enough for a server that only unmasks
FRAME = bytes([0x81, 0x80 | len(PAYLOAD)]) + _MASK + bytes(b ^ _MASK[i % 4] for i, b in enumerate(PAYLOAD))
ECHO = bytes([0x81, len(PAYLOAD)]) + PAYLOAD  # servers send unmasked, unfragmented, uncompressed (none asked)
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def raise_fd_limit(n: int) -> None:
    """Let this process hold ``n`` sockets (plus some slack) if the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 100 if hard == resource.RLIM_INFINITY else min(hard, n + 100)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def connect(port: int) -> socket.socket:
    """Open one WebSocket on ``PATH`` and check the server's 101 and Sec-WebSocket-Accept."""
    key = base64.b64encode(os.urandom(16))
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (PATH.encode(), port, key))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("server closed during the handshake")
        head += chunk
    head, _, rest = head.partition(b"\r\n\r\n")
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    if not head.startswith(b"HTTP/1.1 101") or accept not in head or rest:
        raise ValueError("bad handshake answer: %r" % head[:200])
    return sock


def round_trip(sock: socket.socket) -> None:
    """Send the message and wait for its echo (raise if anything else comes back)."""
    # send, not sendall: gevent's sendall costs a getsockopt system call per call; 37 bytes always fit.
    if sock.send(FRAME) != len(FRAME):
        raise OSError("short send")
    got = sock.recv(len(ECHO))
    while len(got) < len(ECHO):
        chunk = sock.recv(len(ECHO) - len(got))
        if not chunk:
            raise EOFError("server closed the WebSocket")
        got += chunk
    if got != ECHO:
        raise ValueError("unexpected frame %r" % got)


def open_many(port: int, n: int) -> tuple:
    """Open ``n`` WebSockets 200 at a time, each checked with one echo; return (sockets, failures)."""
    socks = []

    def open_one(_: int) -> None:
        sock = connect(port)
        round_trip(sock)
        socks.append(sock)

    pool = Pool(200)
    greenlets = [pool.spawn(open_one, i) for i in range(n)]
    gevent.joinall(greenlets)
    return socks, sum(1 for g in greenlets if not g.successful())


def echo(port: int, conns: int, seconds: float) -> dict:
    """Round trips on ``conns`` connections, back to back, for ``seconds``; the connections open first."""
    raise_fd_limit(conns)
    socks, failed = open_many(port, conns)
    go = Event()
    counts = [0] * len(socks)
    errors = []
    deadline = [0.0]

    def drive(i: int, sock: socket.socket) -> None:
        go.wait()
        n = 0
        try:
            while time.perf_counter() < deadline[0]:
                round_trip(sock)
                n += 1
        except Exception as exc:  # the bench reports it; one broken socket must not hide the others' counts
            errors.append(repr(exc))
        counts[i] = n

    workers = [gevent.spawn(drive, i, s) for i, s in enumerate(socks)]
    gevent.sleep(0)  # every driver waits on the event before the clock starts
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    deadline[0] = started + seconds
    go.set()
    gevent.joinall(workers)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    for sock in socks:
        sock.close()
    return {"round_trips": sum(counts), "seconds": elapsed, "cpu": cpu, "failed": failed,
            "errors": errors[:3], "error_count": len(errors)}


def hold(port: int, n: int) -> None:
    """Hold ``n`` idle checked WebSockets open until stdin closes."""
    raise_fd_limit(n)
    socks, failed = open_many(port, n)
    print("ready %d %d" % (len(socks), failed), flush=True)
    gevent.get_hub().threadpool.apply(sys.stdin.read)
    for sock in socks:
        sock.close()


def main(argv: list) -> int:
    """Command-line entry point."""
    if argv[0] == "echo":
        print(json.dumps(echo(int(argv[1]), int(argv[2]), float(argv[3]))), flush=True)
    elif argv[0] == "hold":
        hold(int(argv[1]), int(argv[2]))
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
