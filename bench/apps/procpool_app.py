"""The greenqueue DirtyApp the procpool bench drives."""

from greenqueue import DirtyApp


class EchoApp(DirtyApp):
    """Echo and stream."""

    workers = 1
    timeout = 60

    def echo(self, value=None):
        return value

    def chunks(self, n, size):
        block = b"x" * size if size else None
        for _ in range(n):
            yield block if block is not None else 0


class EchoAppNoPoll(EchoApp):
    """The same app with polling off (idle_poll = 0): the pool's figure when its workers sleep between calls."""

    idle_poll = 0
