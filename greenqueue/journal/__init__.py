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

from typing import Optional, Sequence

from ..errors import ConfigError
from ._base import MemoryStore, Store, new_row
from ._cluster import ClusterStore, node_id
from ._codec import SERIALIZERS, dumps, loads
from ._engine import FINAL, UNFINISHED, Engine, Heartbeat, NodeInfo, TaskRow
from ._postgres_sql import mask_dsn

__all__ = ["Store", "MemoryStore", "ClusterStore", "Engine", "TaskRow", "NodeInfo", "Heartbeat", "node_id",
           "dumps", "loads", "SERIALIZERS", "UNFINISHED", "FINAL", "URL_SCHEMES", "engine_for", "mask_dsn",
           "new_row", "open_store"]

#: A journal given as one of these is a PostgreSQL database; anything else is an SQLite file.
URL_SCHEMES = ("postgresql://", "postgres://")


def engine_for(path: str, lease_timeout: float = 30.0, result_ttl: float = 3600.0,
               synchronous: str = "normal") -> Engine:
    """The (unopened) engine for a journal ``path``: PostgreSQL for a URL, else the SQLite file.

    ``synchronous`` applies to SQLite only. A URL without the ``postgres`` extra is a
    ConfigError saying what to install.
    """
    if path.startswith(URL_SCHEMES):
        try:
            from ._postgres import PostgresEngine
        except ImportError as exc:
            raise ConfigError("journal %s needs PostgreSQL support (psycopg 3 and psycopg_pool): "
                              "pip install 'greenqueue[postgres]' (%s)" % (mask_dsn(path), exc)) from None
        return PostgresEngine(path, lease_timeout=lease_timeout, result_ttl=result_ttl)
    from ._sqlite import SQLiteEngine
    return SQLiteEngine(path, lease_timeout=lease_timeout, result_ttl=result_ttl, synchronous=synchronous)


def open_store(path: str, lease_timeout: float = 30.0, result_ttl: float = 3600.0, synchronous: str = "normal",
               queues: Optional[Sequence[str]] = None) -> Store:
    """Open the journal at ``path`` (an SQLite file or a postgresql:// URL) as this process's node of it.

    A file is a cluster too (the processes of one host): same claims, leases and leader. Both
    engines pay per commit, not per statement, so spawns and results are group-committed.
    """
    engine = engine_for(path, lease_timeout=lease_timeout, result_ttl=result_ttl, synchronous=synchronous)
    return ClusterStore(engine, queues=queues, result_ttl=result_ttl, batch=True).open()
