"""Messages on a worker's pipe: length-prefixed pickles, one write each, buffered reads.

gipc forks the worker and makes the pipe; this carries the messages on its
file descriptors. gipc's own ``get()`` reads the 4-byte header and the body
in two system calls and makes a new I/O watcher whenever it has to wait;
here one ``read()`` takes whatever is there (a stream's many small chunks
arrive together) and each end keeps one watcher per direction. Same frame
format as gipc: a big-endian int32 size, then the pickle.

Concurrency model: one greenlet reads at a time (whoever holds the worker);
writers may overlap (a stream's chunks and a cancel), so writes take a lock
and a frame is never interleaved with another.
"""

import os
import pickle
import struct
import time
from typing import TYPE_CHECKING, Any, Optional, Union

import gevent
from gevent.lock import Semaphore

if TYPE_CHECKING:
    from gevent._types import _IoWatcher
    from gipc.gipc import _GIPCDuplexHandle

_READ_SIZE = 65536   # the Linux pipe capacity: a bigger read() is no faster (gipc measured it slower)
_COPY_BELOW = 4096   # frames up to this size are copied out of the buffer: cheaper than a memoryview for them
_HEADER = struct.Struct(">I")
_DUMPS = pickle.dumps
_LOADS = pickle.loads
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_clock = time.perf_counter


class Channel:
    """One end of a duplex gipc pipe, carrying Python objects."""

    def __init__(self, handle: "_GIPCDuplexHandle") -> None:
        self.handle = handle  # the gipc duplex handle: it owns the descriptors and closes them
        self.rfd: int = handle._reader._fd
        self.wfd: int = handle._writer._fd
        self._buf = bytearray()
        self._rio: Optional["_IoWatcher"] = None
        self._wio: Optional["_IoWatcher"] = None
        self._wlock = Semaphore()
        self.closed = False

    def pending(self) -> bool:
        """True if bytes already read wait in the buffer (the pipe itself may look empty)."""
        return bool(self._buf)

    def get(self, spin: float = 0.0) -> Any:
        """Next object from the pipe; wait cooperatively. EOFError once the other end is gone.

        ``spin``: seconds to keep polling the pipe before sleeping in the hub
        (other greenlets do not run meanwhile: only a worker process uses it).
        """
        buf = self._buf
        while True:
            have = len(buf)
            if have >= 4:
                end = 4 + _HEADER.unpack_from(buf)[0]
                if have >= end:
                    if end > _COPY_BELOW:
                        return self._take_view(end)
                    frame = buf[4:end]  # a small frame: a copy is cheaper than a view and its release
                    del buf[:end]  # consumed even if it does not unpickle: the next get() reads the next frame
                    return _LOADS(frame)
                want = max(_READ_SIZE, end - have)
            else:
                want = _READ_SIZE
            self._fill(want, spin)
            spin = 0.0

    def _take_view(self, end: int) -> Any:
        # A big frame unpickles from a view of the buffer, not from a copy of it.
        buf = self._buf
        view = memoryview(buf)
        frame = view[4:end]
        try:
            return _LOADS(frame)
        finally:
            # Consumed even if it does not unpickle: the next get() reads the next frame.
            frame.release()
            view.release()
            del buf[:end]  # bytearray drops a prefix without copying the rest

    def _fill(self, want: int, spin: float = 0.0) -> None:
        deadline: Optional[float] = None
        while True:
            if self.closed:
                raise EOFError("the channel is closed")
            try:
                chunk = os.read(self.rfd, want)
            except BlockingIOError:
                if spin:
                    now = _clock()
                    if deadline is None:
                        deadline = now + spin
                    if now < deadline:
                        continue
                    spin = 0.0
                self._wait_readable()
                continue
            except InterruptedError:
                continue
            if not chunk:
                raise EOFError("the other end of the pipe is closed")
            self._buf += chunk
            return

    def _wait_readable(self) -> None:
        if self._rio is None:
            self._rio = gevent.get_hub().loop.io(self.rfd, 1)
        gevent.get_hub().wait(self._rio)

    def _wait_writable(self) -> None:
        if self._wio is None:
            self._wio = gevent.get_hub().loop.io(self.wfd, 2)
        gevent.get_hub().wait(self._wio)

    def put(self, obj: object) -> None:
        """Send ``obj``; wait cooperatively while the pipe is full. OSError if the reader is gone."""
        data = _DUMPS(obj, _PROTOCOL)
        frame: Union[bytes, memoryview] = _HEADER.pack(len(data)) + data
        lock = self._wlock
        if not lock.locked() and not self.closed:
            # Nobody is part-way through a frame, and no other greenlet runs before this write
            # returns: a frame the pipe takes whole needs no lock (most do; the lock cost as much).
            try:
                n = os.write(self.wfd, frame)
            except (BlockingIOError, InterruptedError):
                n = 0
            if n == len(frame):
                return
            frame = memoryview(frame)[n:]
        with lock:
            while True:
                if self.closed:
                    raise EOFError("the channel is closed")
                try:
                    n = os.write(self.wfd, frame)
                except BlockingIOError:
                    self._wait_writable()
                    continue
                except InterruptedError:
                    continue
                if n == len(frame):
                    return
                frame = memoryview(frame)[n:]

    def close(self) -> None:
        """Close both descriptors (idempotent); a greenlet waiting on the pipe gets EOFError."""
        if self.closed:
            return
        self.closed = True
        # gevent skips None watchers itself; its stubs accept only real ones.
        watchers = [w for w in (self._rio, self._wio) if w is not None]
        self._rio = self._wio = None
        # As gevent's sockets do: wake any waiter with an error first, close the fds after,
        # so libev never watches a closed (or reused) descriptor.
        gevent.get_hub().cancel_waits_close_and_then(watchers, EOFError, self._close_handle)

    def _close_handle(self) -> None:
        try:
            self.handle.close()
        except Exception:  # gipc raises GIPCClosed if both ends were closed already
            pass
