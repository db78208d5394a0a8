"""Resource store port (:mod:`.port`) and its SQL backend for SQLite and PostgreSQL."""

from hie.hub.store.port import ResourceStore
from hie.hub.store.sql import SqlResourceStore


def open_resource_store(url: str, *, sqlite_synchronous: str = "FULL") -> ResourceStore:
    """The resource store for a database URL (``sqlite:///…`` or ``postgresql://…``)."""
    return SqlResourceStore(url, sqlite_synchronous=sqlite_synchronous)


__all__ = ["ResourceStore", "SqlResourceStore", "open_resource_store"]
