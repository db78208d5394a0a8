"""How every SQLite database of the hub is opened: WAL, a durability level, a busy timeout,
and (for stores that write) transactions whose BEGIN the hub issues itself.

The resource store, the audit trail and the rejected-message store each call
:func:`configure` on their engine; they differ only in the arguments.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection

# The resource store's large cache and memory map (``tuned``).
TUNED_PRAGMAS = (
    "PRAGMA cache_size=-262144",
    "PRAGMA mmap_size=1073741824",
    "PRAGMA temp_store=MEMORY",
)
# Its connections that only read (the store's lean reads): the same, and never a write.
LEAN_READ_PRAGMAS = (*TUNED_PRAGMAS, "PRAGMA query_only=1")


def configure(engine: Engine, synchronous: str, *, own_begin: bool, tuned: bool = False) -> None:
    """Set the connection pragmas on every new connection of ``engine``.

    ``synchronous``: ``FULL`` survives a power cut, ``NORMAL`` a crash of the process.
    ``own_begin``: the hub issues ``BEGIN`` itself, ``IMMEDIATE`` for a connection marked
    ``info["hie_write"]`` (writers take the write lock up front, so two never deadlock
    upgrading a read lock). ``tuned``: the large cache, memory map and checkpoint interval of
    the resource store, which takes sustained ingest.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        if own_begin:
            dbapi_conn.isolation_level = None  # BEGIN is ours (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA busy_timeout=30000")
        if tuned:
            for pragma in TUNED_PRAGMAS:
                cur.execute(pragma)
            # checkpoint every ~40 MB of WAL instead of 4 MB: far fewer random writes and
            # fsyncs into the main file under sustained ingest (durability is unchanged)
            cur.execute("PRAGMA wal_autocheckpoint=10000")
        cur.close()

    if own_begin:

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            mode = "IMMEDIATE" if conn.info.get("hie_write") else "DEFERRED"
            conn.exec_driver_sql(f"BEGIN {mode}")
