"""The identity index (:class:`hie.hub.store.port.IdentityIndex`) on the resource store's
database, so that matching, linking and merging commit in the same transaction as the records
they are about."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from sqlalchemy import (
    Connection,
    String,
    bindparam,
    delete,
    insert,
    literal,
    select,
    union_all,
    update,
)
from sqlalchemy.sql import Select

from hie.hub.store import schema as s
from hie.hub.store.port import MAX_KEY_MEMBERS, IdentityLogEntry, LinkedRecord

L = s.identity_links
K = s.identity_keys
J = s.identity_log


# Statements of the per-write path, built once (see hie.hub.store.sql).
_RT = bindparam("rtype", type_=String())
_GROUP_OF = select(L.c.group_id).where(L.c.rtype == _RT, L.c.id == bindparam("id"))
_LINK_COLS = (L.c.id, L.c.group_id, L.c.features)
_MEMBERS = select(*_LINK_COLS).where(L.c.rtype == _RT, L.c.group_id == bindparam("group_id"))
_RECORDS = select(*_LINK_COLS).where(L.c.rtype == _RT, L.c.id.in_(bindparam("ids", expanding=True)))
_KEY_MEMBERS = (
    select(K.c.id).where(K.c.rtype == _RT, K.c.key == bindparam("key")).limit(MAX_KEY_MEMBERS + 1)
)
_INSERT_LINK = insert(L)
_INSERT_KEY = insert(K)
_INSERT_LOG = insert(J).returning(J.c.seq)


def group_members_select(rtype: str, ids: Sequence[str]) -> Select[tuple[str]]:
    """``SELECT`` of ``ids`` plus every member of their identity groups (for reference
    expansion in searches: one subquery, answered from the group index)."""
    g1 = L.alias("g1")
    g2 = L.alias("g2")
    groups = select(g1.c.group_id).where(g1.c.rtype == rtype, g1.c.id.in_(list(ids)))
    members = select(g2.c.id).where(g2.c.rtype == rtype, g2.c.group_id.in_(groups))
    own = [select(literal(i, String(64))) for i in ids]
    return union_all(*own, members).subquery().select()


class SqlIdentityIndex:
    """Identity groups, blocking keys and journal over one connection (see the port)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def group_of(self, rtype: str, id: str) -> str | None:
        """The group of ``id`` or None."""
        value = self.conn.execute(_GROUP_OF, {"rtype": rtype, "id": id}).scalar()
        return str(value) if value is not None else None

    def members(self, rtype: str, group_id: str) -> list[LinkedRecord]:
        """Every member of ``group_id``, ordered by id."""
        # Sorted here: an ORDER BY id tempts SQLite's planner (without statistics) to walk
        # the primary key over the whole table instead of using the group index.
        rows = self.conn.execute(_MEMBERS, {"rtype": rtype, "group_id": group_id})
        return sorted((_record(r) for r in rows), key=lambda r: r.id)

    def records(self, rtype: str, ids: Sequence[str]) -> list[LinkedRecord]:
        """The members with these ids."""
        if not ids:
            return []
        rows = self.conn.execute(_RECORDS, {"rtype": rtype, "ids": list(ids)})
        return [_record(r) for r in rows]

    def put(
        self,
        rtype: str,
        id: str,
        group_id: str,
        features: bytes | None = None,
        keys: Sequence[str] | None = None,
        *,
        new: bool = False,
    ) -> None:
        """Upsert the member row; replace its keys when ``keys`` is given."""
        done = None
        if not new:
            done = self.conn.execute(
                update(L)
                .where(L.c.rtype == rtype, L.c.id == id)
                .values(group_id=group_id, features=features)
            )
        if done is None or done.rowcount == 0:
            row = {"rtype": rtype, "id": id, "group_id": group_id, "features": features}
            self.conn.execute(_INSERT_LINK, row)
        if keys is not None:
            if not new:
                self.conn.execute(delete(K).where(K.c.rtype == rtype, K.c.id == id))
            unique = list(dict.fromkeys(k[:96] for k in keys))
            if unique:
                self.conn.execute(
                    _INSERT_KEY, [{"rtype": rtype, "key": k, "id": id} for k in unique]
                )

    def move_group(self, rtype: str, from_group: str, to_group: str) -> list[str]:
        """Re-file every member of ``from_group`` under ``to_group``."""
        ids = [m.id for m in self.members(rtype, from_group)]
        if ids and from_group != to_group:
            self.conn.execute(
                update(L)
                .where(L.c.rtype == rtype, L.c.group_id == from_group)
                .values(group_id=to_group)
            )
        return ids

    def remove(self, rtype: str, id: str) -> None:
        """Drop the member row and its keys."""
        self.conn.execute(delete(K).where(K.c.rtype == rtype, K.c.id == id))
        self.conn.execute(delete(L).where(L.c.rtype == rtype, L.c.id == id))

    def candidates(self, rtype: str, keys: Sequence[str], limit: int) -> list[LinkedRecord]:
        """Members sharing a key with ``keys``, most shared keys first; a key of more than
        :data:`MAX_KEY_MEMBERS` members is too common to count."""
        shared: Counter[str] = Counter()
        # Rows are fetched key by key, at most one over the cap each, and counted here: a
        # GROUP BY in SQL lets SQLite's planner, lacking statistics, walk the per-id index
        # over every key of the type instead.
        for key in dict.fromkeys(k[:96] for k in keys):
            ids = self.conn.execute(_KEY_MEMBERS, {"rtype": rtype, "key": key}).scalars().all()
            if len(ids) <= MAX_KEY_MEMBERS:
                shared.update(str(i) for i in ids)
        ranked = sorted(shared, key=lambda i: (-shared[i], i))[:limit]
        if not ranked:
            return []
        rows = self.conn.execute(_RECORDS, {"rtype": rtype, "ids": ranked})
        found = {r.id: _record(r) for r in rows if r.features is not None}
        return [found[i] for i in ranked if i in found]

    def log(self, rtype: str, id: str, group_id: str, kind: str, body: bytes, when: int) -> int:
        """Append a journal entry."""
        entry = {"rtype": rtype, "id": id, "group_id": group_id, "kind": kind}
        result = self.conn.execute(_INSERT_LOG, {**entry, "body": body, "created": when})
        return int(result.scalar_one())

    def journal(
        self,
        rtype: str,
        *,
        id: str | None = None,
        group_id: str | None = None,
        kind: str | None = None,
        limit: int = 100,
    ) -> list[IdentityLogEntry]:
        """Journal entries, newest first."""
        stmt = select(J).where(J.c.rtype == rtype)
        if id is not None:
            stmt = stmt.where(J.c.id == id)
        if group_id is not None:
            stmt = stmt.where(J.c.group_id == group_id)
        if kind is not None:
            stmt = stmt.where(J.c.kind == kind)
        stmt = stmt.order_by(J.c.seq.desc()).limit(limit)
        return [
            IdentityLogEntry(r.seq, r.id, r.group_id, r.kind, bytes(r.body), r.created)
            for r in self.conn.execute(stmt)
        ]


def _record(row: object) -> LinkedRecord:
    features = getattr(row, "features", None)
    return LinkedRecord(
        id=str(getattr(row, "id")),  # noqa: B009 - Row attribute named like a builtin
        group_id=str(getattr(row, "group_id")),  # noqa: B009
        features=bytes(features) if features is not None else None,
    )
