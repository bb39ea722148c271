"""DirtyApps for the process-pool tests: echo, sleep, crash, raise, stream."""

import ctypes
import os
import signal
import time

from greenqueue import DirtyApp


class EchoApp(DirtyApp):
    """Answers at once; streams on request; can be made to crash or raise."""

    workers = 2
    timeout = 5

    def init(self):
        self.pid = os.getpid()
        self.closed_marker = os.environ.get("DIRTY_TEST_MARKERS")

    def echo(self, value):
        return value

    def whoami(self):
        return os.getpid()

    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds

    def spin(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        return "spun"

    def fail(self, message):
        raise ValueError(message)

    def exit_now(self):
        os._exit(3)

    def kill_self(self):
        os.kill(os.getpid(), signal.SIGKILL)

    def segfault(self):
        ctypes.string_at(0)

    def count(self, n, delay=0.0, marker=None):
        try:
            for i in range(n):
                if delay:
                    time.sleep(delay)
                yield i
        finally:
            if marker:
                with open(marker, "w") as fh:
                    fh.write("closed")

    def stuck_on_close(self):
        """A stream whose clean-up never ends: closing it early makes the pool kill this worker."""
        try:
            while True:
                yield "tick"
                time.sleep(0.01)
        finally:
            time.sleep(60)

    def count_progress(self, n, path):
        """Yield 0..n-1, appending ``index monotonic-time`` to ``path`` as each is produced (flow control)."""
        for i in range(n):
            with open(path, "a") as fh:
                fh.write("%d %.9f\n" % (i, time.monotonic()))
            yield i

    def fail_after(self, n, message):
        """Yield n items, then raise ValueError(message) mid-stream."""
        yield from range(n)
        raise ValueError(message)

    def chunks(self, n, size):
        block = b"x" * size
        for _ in range(n):
            yield block

    def close(self):
        if self.closed_marker:
            with open(os.path.join(self.closed_marker, "close-%d" % os.getpid()), "w") as fh:
                fh.write("closed")


class BadInitApp(DirtyApp):
    """init() always fails."""

    def init(self):
        raise RuntimeError("model file missing")


class TickerApp(DirtyApp):
    """Runs a background greenlet that ticks every millisecond; answers calls at once."""

    workers = 1

    def init(self):
        import gevent

        self.count = 0
        gevent.spawn(self._tick)

    def _tick(self):
        import gevent

        while True:
            gevent.sleep(0.001)
            self.count += 1

    def echo(self, value):
        return value

    def ticks(self):
        return self.count


def _unpicklable_here(text):
    """Fails when unpickled: stands for a reply type the server cannot import."""
    raise LookupError("cannot rebuild %s here" % text)


class _BadReply:
    def __reduce__(self):
        return (_unpicklable_here, ("a worker-only object",))


class BadReplyApp(DirtyApp):
    """Answers with objects the parent cannot unpickle, on request."""

    workers = 1

    def bad(self):
        return _BadReply()

    def whoami(self):
        import os

        return os.getpid()

    def bad_stream(self):
        yield 1
        yield _BadReply()
        yield 3

    def echo(self, value):
        return value
