"""The ledger test apps write what really ran to: one short line per append, shared by every node."""

import os


def append(path, line):
    """Append ``line`` to the file at ``path`` (O_APPEND writes of one short line are atomic across processes)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
