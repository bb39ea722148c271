"""Where tasks are recorded: the store protocol and its engines.

Concurrency model: see each module. The runner calls a :class:`Store` from
the task hub's greenlets: :class:`MemoryStore` (the default; results live in
this process) or :class:`ClusterStore` over an engine that several
processes share, an SQLite file on one host (``_sqlite.py``) or a
PostgreSQL database (``_postgres.py``, imported only for a
``postgresql://`` journal, so the extra stays optional). The rules every
engine keeps are in ``_engine.py``. Nothing here survives a fork: a child
process opens its own store.
"""

from ._base import MemoryStore, Store
from ._cluster import ClusterStore, node_id
from ._codec import SERIALIZERS, dumps, loads
from ._engine import FINAL, UNFINISHED, Engine, Heartbeat, NodeInfo, TaskRow

__all__ = ["Store", "MemoryStore", "ClusterStore", "Engine", "TaskRow", "NodeInfo", "Heartbeat", "node_id",
           "dumps", "loads", "SERIALIZERS", "UNFINISHED", "FINAL"]
