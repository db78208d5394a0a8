"""The rejected-message store: every message a listener refused or failed on, kept for replay.

Nothing a sender sent is ever lost, even when it was wrong: an HL7 v2 message answered AE/AR,
an MLLP frame too large or truncated, bytes that were not framed at all, a DICOM instance or a
FHIR body that could not be stored — each is kept here with its raw bytes exactly as received,
who sent it, why it was refused (an error code such as an HL7 table 0357 code or ``HIE-xxxx``,
and a reason that never quotes patient data), until an operator replays or discards it
(``hie messages list|show``).

Storage (SQLAlchemy Core, one set of queries for both engines):

- SQLite: its own file, ``rejected.db`` beside the resource store's ``hie.db``, in WAL mode with
  ``synchronous=FULL`` — a rejection is on disk before the sender hears about it, and keeping
  one never waits behind the resource store's writer;
- PostgreSQL: the table ``rejected_messages`` in the hub's own database (created by
  :meth:`RejectedStore.migrate`), each keep committed with ``synchronous_commit`` on.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.pool import StaticPool

from hie.hub import sqlite_setup
from hie.hub.errors import Conflict, InvalidRequest, NotFound
from hie.hub.logging import get_logger

log = get_logger("hie.rejected")

STATUSES = ("open", "replayed", "discarded")
# column widths: values are clipped to them (PostgreSQL refuses longer strings)
_WIDTH = {"channel": 16, "sender": 255, "peer": 255, "kind": 32, "code": 32, "control_id": 200}
MAX_REASON = 2000  # characters of a reason or an outcome kept

meta = MetaData()
rejected_messages = Table(
    "rejected_messages",
    meta,
    Column(
        "id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("received", DateTime(timezone=True), nullable=False),  # UTC
    Column("channel", String(_WIDTH["channel"]), nullable=False),  # mllp, dicom, stow, fhir, …
    Column("sender", String(_WIDTH["sender"]), nullable=False),  # "LABAPP|LAB01", an AE title
    Column("peer", String(_WIDTH["peer"]), nullable=False),  # network address
    Column("kind", String(_WIDTH["kind"]), nullable=False),  # rejected, failed, too-large, …
    Column("code", String(_WIDTH["code"]), nullable=False),  # HL7 0357 code, HIE-xxxx
    Column("reason", Text, nullable=False),  # never patient data
    Column("control_id", String(_WIDTH["control_id"]), nullable=False),  # MSH-10
    Column("size", BigInteger, nullable=False),  # original size (too-large: all of it)
    Column("raw", LargeBinary, nullable=False),  # as received (too-large: its head)
    Column("status", String(16), nullable=False),  # open, replayed, discarded
    Column("replayed_at", DateTime(timezone=True)),
    Column("replay_outcome", Text),
    Column("discarded_at", DateTime(timezone=True)),
    Column("discard_reason", Text),
)
Index("ix_rejected_status", rejected_messages.c.status, rejected_messages.c.id)
Index("ix_rejected_channel", rejected_messages.c.channel, rejected_messages.c.id)
Index("ix_rejected_received", rejected_messages.c.received)

T = rejected_messages
_SUMMARY = [c for c in T.columns if c.name != "raw"]


@dataclass(frozen=True, slots=True)
class RejectedMessage:
    """One kept message. ``raw`` is ``None`` when it was not loaded (listings)."""

    id: int
    received: datetime
    channel: str
    sender: str
    peer: str
    kind: str
    code: str
    reason: str
    control_id: str
    size: int
    status: str
    replayed_at: datetime | None = None
    replay_outcome: str | None = None
    discarded_at: datetime | None = None
    discard_reason: str | None = None
    raw: bytes | None = None


def rejected_url(database_url: str) -> str:
    """The store's database: ``rejected.db`` beside a SQLite resource store, else the resource
    store's own database."""
    if database_url.startswith("sqlite:///"):
        path = database_url.removeprefix("sqlite:///")
        if path in ("", ":memory:"):
            return "sqlite://"
        return f"sqlite:///{Path(path).parent / 'rejected.db'}"
    if database_url.startswith("sqlite://"):
        return "sqlite://"
    return database_url


def _utc(value: datetime | None) -> datetime | None:
    """As an aware UTC datetime (SQLite hands back naive datetimes, which are UTC here)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _bind(value: datetime) -> datetime:
    """A datetime to store: UTC (naive input is taken as UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _clip(name: str, value: str) -> str:
    return value[: _WIDTH[name]]


def _message(row: Any, raw: bytes | None = None) -> RejectedMessage:
    received = _utc(row.received)
    assert received is not None
    return RejectedMessage(
        id=int(row.id),
        received=received,
        channel=row.channel,
        sender=row.sender,
        peer=row.peer,
        kind=row.kind,
        code=row.code,
        reason=row.reason,
        control_id=row.control_id,
        size=int(row.size),
        status=row.status,
        replayed_at=_utc(row.replayed_at),
        replay_outcome=row.replay_outcome,
        discarded_at=_utc(row.discarded_at),
        discard_reason=row.discard_reason,
        raw=raw,
    )


class RejectedStore:
    """Rejected messages on SQLite or PostgreSQL (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        self._write_lock = threading.Lock()  # SQLite: one writer per process at a time
        if self.dialect == "sqlite":
            path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self.engine: Engine = create_engine(
                    url,
                    connect_args={"check_same_thread": False, "timeout": 30},
                    pool_size=2,
                    max_overflow=4,
                )
            else:  # in memory: one connection, or every connection sees its own database
                self.engine = create_engine(
                    "sqlite://",
                    connect_args={"check_same_thread": False},
                    poolclass=StaticPool,
                )
            # FULL: a kept rejection survives a power cut, not only a crash of the process
            sqlite_setup.configure(self.engine, "FULL", own_begin=True)
        else:
            pg = url.replace("postgresql://", "postgresql+psycopg://", 1).replace(
                "postgres://", "postgresql+psycopg://", 1
            )
            self.engine = create_engine(pg, pool_size=2, max_overflow=4, pool_pre_ping=True)

    def migrate(self) -> None:
        """Create the table and its indexes (idempotent)."""
        with self._write() as conn:
            meta.create_all(conn, checkfirst=True)

    def close(self) -> None:
        """Release the connections."""
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction, committed (durably) when the block ends without an error."""
        if self.dialect == "sqlite":
            with self._write_lock, self.engine.connect() as conn:
                conn.info["hie_write"] = True
                try:
                    with conn.begin():
                        yield conn
                finally:
                    conn.info.pop("hie_write", None)
            return
        with self.engine.begin() as conn:
            # a rejection is acknowledged to its sender next: the commit must be on disk
            conn.exec_driver_sql("SET LOCAL synchronous_commit TO ON")
            yield conn

    def keep(
        self,
        *,
        channel: str,
        kind: str,
        raw: bytes,
        sender: str = "",
        peer: str = "",
        code: str = "",
        reason: str = "",
        control_id: str = "",
        size: int | None = None,
        received: datetime | None = None,
    ) -> int:
        """Keep one message (its bytes exactly as given) with status ``open``; returns its
        id. Durable when it returns. ``size`` is the original length when only part of the
        message is kept (a too-large frame's head); by default ``len(raw)``."""
        row = {
            "received": _bind(received or datetime.now(UTC)),
            "channel": _clip("channel", channel),
            "sender": _clip("sender", sender),
            "peer": _clip("peer", peer),
            "kind": _clip("kind", kind),
            "code": _clip("code", code),
            "reason": reason[:MAX_REASON],
            "control_id": _clip("control_id", control_id),
            "size": len(raw) if size is None else size,
            "raw": bytes(raw),
            "status": "open",
        }
        with self._write() as conn:
            key = conn.execute(insert(T), row).inserted_primary_key
        assert key is not None
        ident = int(key[0])
        # sizes and codes only: the message and its reason may concern a patient
        log.info("rejected.kept", id=ident, channel=channel, kind=kind, code=code, size=row["size"])
        return ident

    async def keep_async(self, **fields: Any) -> int:
        """:meth:`keep` (same keywords) for a coroutine: it runs in a thread, since it waits
        for a disk flush."""
        return await asyncio.to_thread(functools.partial(self.keep, **fields))

    def get(self, ident: int) -> RejectedMessage | None:
        """One kept message with its raw bytes, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(T).where(T.c.id == ident)).first()
        return None if row is None else _message(row, bytes(row.raw))

    def count(self, status: str | None = None, channel: str | None = None) -> int:
        """How many messages are kept (with that status, on that channel)."""
        stmt = select(func.count()).select_from(T)
        if status is not None:
            stmt = stmt.where(T.c.status == _status(status))
        if channel is not None:
            stmt = stmt.where(T.c.channel == channel)
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def mark_replayed(self, ident: int, outcome: str) -> None:
        """Record that message ``ident`` was sent through the intake again and what came of
        it (a message replayed again gets the newer outcome)."""
        with self._write() as conn:
            done = conn.execute(
                update(T)
                .where(T.c.id == ident)
                .values(
                    status="replayed",
                    replayed_at=datetime.now(UTC),
                    replay_outcome=outcome[:MAX_REASON],
                )
            ).rowcount
        if not done:
            raise NotFound(f"no rejected message {ident}")

    def discard(self, ident: int, reason: str) -> None:
        """Close an open message without replaying it (``reason`` says why, for the record);
        a message already replayed or discarded is a :class:`Conflict`."""
        with self._write() as conn:
            status = conn.execute(select(T.c.status).where(T.c.id == ident)).scalar()
            if status is None:
                raise NotFound(f"no rejected message {ident}")
            if status != "open":
                raise Conflict(f"rejected message {ident} is already {status}")
            conn.execute(
                update(T)
                .where(T.c.id == ident)
                .values(
                    status="discarded",
                    discarded_at=datetime.now(UTC),
                    discard_reason=reason[:MAX_REASON],
                )
            )

    def list(
        self,
        status: str | None = None,
        channel: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> builtins.list[RejectedMessage]:
        """Kept messages newest first, without their raw bytes; page on with ``before_id`` =
        the last id of the previous page."""
        stmt = select(*_SUMMARY)
        if status is not None:
            stmt = stmt.where(T.c.status == _status(status))
        if channel is not None:
            stmt = stmt.where(T.c.channel == channel)
        if since is not None:
            stmt = stmt.where(T.c.received >= _bind(since))
        if before_id is not None:
            stmt = stmt.where(T.c.id < before_id)
        stmt = stmt.order_by(T.c.id.desc()).limit(max(1, limit))
        with self.engine.connect() as conn:
            return [_message(r) for r in conn.execute(stmt)]


def _status(status: str) -> str:
    if status not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}")
    return status


def open_rejected_store(database_url: str) -> RejectedStore:
    """The rejected-message store of a hub whose resource store is at ``database_url``."""
    return RejectedStore(rejected_url(database_url))
