"""Hold N idle SSE connections open; print 'ready N' once each got its first event, then wait for stdin to close."""

from gevent import monkey

monkey.patch_all()

import resource  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent.pool import Pool  # noqa: E402


def main():
    n, port = int(sys.argv[1]), int(sys.argv[2])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 100)), hard))
    socks = []

    def open_one(_):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(b"GET /idle HTTP/1.1\r\nHost: bench\r\n\r\n")
        data = b""
        while b"connected" not in data:
            chunk = s.recv(4096)
            if not chunk:
                raise EOFError("server closed")
            data += chunk
        socks.append(s)

    pool = Pool(500)  # open them 500 at a time, like a crowd arriving
    failed = 0
    for g in [pool.spawn(open_one, i) for i in range(n)]:
        g.join()
        if not g.successful():
            failed += 1
    print("ready %d failed %d" % (len(socks), failed), flush=True)
    gevent.get_hub().threadpool.apply(sys.stdin.read)
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
