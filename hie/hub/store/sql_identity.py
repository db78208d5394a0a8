"""The identity index (:class:`hie.hub.store.port.IdentityIndex`) on the resource store's
database, so that matching, linking and merging commit in the same transaction as the records
they are about."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, String, delete, func, insert, literal, select, union_all, update
from sqlalchemy.sql import Select

from hie.hub.store import schema as s
from hie.hub.store.port import IdentityLogEntry, LinkedRecord

L = s.identity_links
K = s.identity_keys
J = s.identity_log


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
        stmt = select(L.c.group_id).where(L.c.rtype == rtype, L.c.id == id)
        value = self.conn.execute(stmt).scalar()
        return str(value) if value is not None else None

    def members(self, rtype: str, group_id: str) -> list[LinkedRecord]:
        """Every member of ``group_id``, ordered by id."""
        stmt = (
            select(L.c.id, L.c.group_id, L.c.features)
            .where(L.c.rtype == rtype, L.c.group_id == group_id)
            .order_by(L.c.id)
        )
        return [_record(r) for r in self.conn.execute(stmt)]

    def records(self, rtype: str, ids: Sequence[str]) -> list[LinkedRecord]:
        """The members with these ids."""
        if not ids:
            return []
        stmt = select(L.c.id, L.c.group_id, L.c.features).where(
            L.c.rtype == rtype, L.c.id.in_(list(ids))
        )
        return [_record(r) for r in self.conn.execute(stmt)]

    def put(
        self,
        rtype: str,
        id: str,
        group_id: str,
        features: bytes | None = None,
        keys: Sequence[str] | None = None,
    ) -> None:
        """Upsert the member row; replace its keys when ``keys`` is given."""
        done = self.conn.execute(
            update(L)
            .where(L.c.rtype == rtype, L.c.id == id)
            .values(group_id=group_id, features=features)
        )
        if done.rowcount == 0:
            self.conn.execute(
                insert(L).values(rtype=rtype, id=id, group_id=group_id, features=features)
            )
        if keys is not None:
            self.conn.execute(delete(K).where(K.c.rtype == rtype, K.c.id == id))
            unique = list(dict.fromkeys(k[:96] for k in keys))
            if unique:
                self.conn.execute(insert(K), [{"rtype": rtype, "key": k, "id": id} for k in unique])

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
        """Members sharing a key with ``keys``, most shared keys first."""
        keys = list(dict.fromkeys(k[:96] for k in keys))
        if not keys:
            return []
        shared = func.count().label("shared")
        ranked = (
            select(K.c.id, shared)
            .where(K.c.rtype == rtype, K.c.key.in_(keys))
            .group_by(K.c.id)
            .order_by(shared.desc(), K.c.id)
            .limit(limit)
            .subquery()
        )
        stmt = (
            select(L.c.id, L.c.group_id, L.c.features)
            .join(ranked, ranked.c.id == L.c.id)
            .where(L.c.rtype == rtype, L.c.features.is_not(None))
            .order_by(ranked.c.shared.desc(), L.c.id)
        )
        return [_record(r) for r in self.conn.execute(stmt)]

    def log(self, rtype: str, id: str, group_id: str, kind: str, body: bytes, when: int) -> int:
        """Append a journal entry."""
        result = self.conn.execute(
            insert(J)
            .values(rtype=rtype, id=id, group_id=group_id, kind=kind, body=body, created=when)
            .returning(J.c.seq)
        )
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
