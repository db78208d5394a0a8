"""Tables of the resource store (SQLAlchemy Core), shared by SQLite and PostgreSQL.

``resources`` holds one row per logical resource (its current version number); the JSON of
every version lives in ``resource_history``. Search-index rows point at ``resources.rid`` and
are replaced on every write. ``outbox`` rows commit in the same transaction as the data.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

metadata = MetaData()

# SQLite needs INTEGER PRIMARY KEY for a rowid alias (fast, autoincrementing).
BigId = BigInteger().with_variant(Integer(), "sqlite")

resources = Table(
    "resources",
    metadata,
    Column("rid", BigId, primary_key=True, autoincrement=True),
    Column("rtype", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("owner", String(64), nullable=True),  # the MO the record was written for
    UniqueConstraint("rtype", "id", name="uq_resources_type_id"),
)
Index("ix_resources_type_updated", resources.c.rtype, resources.c.last_updated)
Index("ix_resources_type_rid", resources.c.rtype, resources.c.rid)

resource_history = Table(
    "resource_history",
    metadata,
    Column("hseq", BigId, primary_key=True, autoincrement=True),
    Column("rid", BigInteger, nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("method", String(8), nullable=False),
    Column("content", LargeBinary, nullable=True),
    UniqueConstraint("rid", "version", name="uq_history_rid_version"),
)
Index("ix_history_updated", resource_history.c.last_updated)


def _index_table(name: str, *cols: Column[object]) -> Table:
    table = Table(
        name,
        metadata,
        Column("rid", BigInteger, nullable=False),
        Column("pid", Integer, nullable=False),
        *cols,
    )
    Index(f"ix_{name}_rid", table.c.rid)
    return table


idx_token = _index_table(
    "idx_token", Column("system", String(255), nullable=True), Column("code", String(255))
)
Index("ix_idx_token_lookup", idx_token.c.pid, idx_token.c.code, idx_token.c.system, idx_token.c.rid)

idx_string = _index_table("idx_string", Column("norm", String(255)), Column("exact", String(255)))
Index("ix_idx_string_lookup", idx_string.c.pid, idx_string.c.norm, idx_string.c.rid)

idx_date = _index_table("idx_date", Column("lo", BigInteger), Column("hi", BigInteger))
Index("ix_idx_date_lookup", idx_date.c.pid, idx_date.c.lo, idx_date.c.hi, idx_date.c.rid)

idx_reference = _index_table(
    "idx_reference", Column("target_type", String(64)), Column("target_id", String(255))
)
Index(
    "ix_idx_reference_lookup",
    idx_reference.c.target_id,
    idx_reference.c.pid,
    idx_reference.c.target_type,
    idx_reference.c.rid,
)

idx_quantity = _index_table(
    "idx_quantity",
    Column("value", Float),
    Column("system", String(255), nullable=True),
    Column("code", String(64), nullable=True),
)
Index("ix_idx_quantity_lookup", idx_quantity.c.pid, idx_quantity.c.value, idx_quantity.c.rid)

idx_uri = _index_table("idx_uri", Column("value", String(512)))
Index("ix_idx_uri_lookup", idx_uri.c.pid, idx_uri.c.value, idx_uri.c.rid)

INDEX_TABLES = {
    "token": idx_token,
    "string": idx_string,
    "date": idx_date,
    "reference": idx_reference,
    "quantity": idx_quantity,
    "uri": idx_uri,
}

INDEX_TABLES_BY_NAME = {t.name: t for t in INDEX_TABLES.values()}

outbox = Table(
    "outbox",
    metadata,
    Column("seq", BigId, primary_key=True, autoincrement=True),
    Column("rtype", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("op", String(8), nullable=False),
    Column("created", BigInteger, nullable=False),
)

outbox_offsets = Table(
    "outbox_offsets",
    metadata,
    Column("consumer", String(64), primary_key=True),
    Column("last_seq", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
)

# --- identity groups (the master patient index's tables; see port.IdentityIndex) -----------

identity_links = Table(
    "identity_links",
    metadata,
    Column("rtype", String(64), primary_key=True),
    Column("id", String(64), primary_key=True),
    Column("group_id", String(64), nullable=False),
    Column("features", LargeBinary, nullable=True),
)
Index("ix_identity_links_group", identity_links.c.rtype, identity_links.c.group_id)

identity_keys = Table(
    "identity_keys",
    metadata,
    Column("rtype", String(64), nullable=False),
    Column("key", String(96), nullable=False),
    Column("id", String(64), nullable=False),
)
Index("ix_identity_keys_key", identity_keys.c.rtype, identity_keys.c.key, identity_keys.c.id)
Index("ix_identity_keys_id", identity_keys.c.rtype, identity_keys.c.id)

identity_log = Table(
    "identity_log",
    metadata,
    Column("seq", BigId, primary_key=True, autoincrement=True),
    Column("rtype", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("group_id", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("created", BigInteger, nullable=False),
)
Index("ix_identity_log_id", identity_log.c.rtype, identity_log.c.id, identity_log.c.seq)
Index("ix_identity_log_group", identity_log.c.rtype, identity_log.c.group_id, identity_log.c.seq)
