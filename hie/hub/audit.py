"""The audit trail: one record per access, append-only, hash-chained.

Every HTTP request that reaches the hub — read, search, write, operation, and every refused
attempt — leaves one :class:`AuditRecord` (who, on behalf of whom, which patients, which
resources, outcome, source address, purpose), written **before** the response goes out. The
FHIR layer shows each as an AuditEvent following IHE Basic Audit Log Patterns
(:func:`hie.fhir.audit_api.audit_event`); a patient reads the ones about them.

Storage (:class:`SqlAuditLog`):

- SQLite: its own database file (``audit.db`` beside the resource store), WAL. An HTTP
  request's record is written before its response as one line appended to
  ``audit.db.pending`` (one ``write`` to the operating system's cache: it survives the hub's
  process being killed), then numbered, chained and committed to ``audit_log`` in batches by
  the indexer below. A request never takes the database's write lock nor the page cache
  another worker process just invalidated: a commit of its own cost ~150 µs of CPU in a busy
  hub (py-spy), about 5 % of a search. MLLP messages and DICOM associations write ahead the
  same way; a break-the-glass access, which needs its number at once, is committed directly,
  after whatever is pending; processes hand the write lock over through an ``flock``;
- PostgreSQL: tables in the hub's database, each batch committed by a writer thread that
  commits whatever requests queued meanwhile together (:meth:`SqlAuditLog.append_async`).

**As durable as the data.** The record of an access that changed data (its action a create,
update or delete that succeeded, :meth:`SqlAuditLog.durable`: a write answered 2xx, an HL7
message acknowledged ``AA``, a DICOM study stored) reaches the disk before the
caller hears the answer, as the data did: the pending file is synced (``fdatasync``, in a
thread: 0.1–0.2 ms here), a PostgreSQL batch holding one waits for its WAL flush. The
records of reads and refusals are written the same way but not waited for (on PostgreSQL
``synchronous_commit=off``: on the server, not yet necessarily on its disk); a power cut may
take the last of them, never a record of a change the hub acknowledged. Commits to
``audit.db`` are ``synchronous=FULL`` (the chaining commits about twice a second), so a
synced record stays durable when its pending file is started over. ``sync_writes=False``
(the hub's own SQLite data with ``HIE_SQLITE_SYNCHRONOUS=NORMAL``) syncs none of it.

What each record is about (``audit_ref``: one row per patient concerned and, except for a
search's page of results, per resource named; what ``AuditEvent?patient=`` and ``?entity=``
look up) is derived from the records and written **after** them, in batches
(:meth:`SqlAuditLog.index_refs`, which first moves pending records into the chain): by a
thread of each process that appends (``hie serve``'s HTTP workers leave it to their parent
process, :meth:`SqlAuditLog.keep_chained`), at least every :data:`INDEX_SECONDS`, and by every
reader before it looks, so a reader always sees every record written before its query.
Writing a record's ten-odd index rows at random places in the index, one commit per record,
cost five times as much as the record itself.

Tamper evidence: each record's ``hash`` is SHA-256 over the previous record's hash and the
record's canonical JSON, so changing, removing or reordering any record breaks every later
link; :meth:`SqlAuditLog.verify` (``hie audit verify``) walks the chain. Database triggers
refuse UPDATE and DELETE on the trail for every user of the database, admins included.
"""

from __future__ import annotations

import asyncio
import contextvars
import fcntl
import hashlib
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    func,
    insert,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from hie.hub import sqlite_setup
from hie.hub.auth import Principal
from hie.hub.errors import StorageError
from hie.hub.logging import get_logger

log = get_logger("hie.audit")

GENESIS = "0" * 64
BATCH = 500  # records per group commit at most
INDEX_BATCH = 50  # records per audit_ref commit (the write lock is held meanwhile)
INDEX_SECONDS = 0.5  # how long a record may wait for its audit_ref rows (readers never wait)
PENDING_BATCH = 500  # pending records chained per commit
PENDING_COMPACT = 8 << 20  # bytes: a fully chained pending file this large starts over
# Records of a page of results: found by the patients behind it (IHE BALP's Query pattern
# names the query and the patient, not each result); the page stays in the record.
PAGE_SUBTYPES = frozenset({"search", "history", "everything"})
MAX_ENTITIES = 200  # resources named in one record (a search page; more are counted)
_CHANGES = frozenset("CUD")  # AuditEvent actions that change data: create, update, delete

meta = MetaData()
audit_log = Table(
    "audit_log",
    meta,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("recorded", BigInteger, nullable=False),
    Column("body", LargeBinary, nullable=False),  # the record's canonical JSON
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)
# what each record is about, for searching: "Patient/<id>" for every patient concerned and
# "Type/<id>" for every resource named
audit_ref = Table(
    "audit_ref",
    meta,
    Column("ref", String(160), nullable=False),
    Column("seq", BigInteger, nullable=False),
)
Index("ix_audit_ref", audit_ref.c.ref, audit_ref.c.seq)
# how far the pending file (SQLite) has been chained: its generation (the header line a
# compaction writes; "" before any) and the byte after the last record taken (id 1)
audit_pending_position = Table(
    "audit_pending_position",
    meta,
    Column("id", Integer, primary_key=True),
    Column("generation", String(40), nullable=False),
    Column("next_byte", BigInteger, nullable=False),
)
# the last seq whose audit_ref rows are written (one row, id 1); derived data, not the trail
audit_ref_position = Table(
    "audit_ref_position",
    meta,
    Column("id", Integer, primary_key=True),
    Column("seq", BigInteger, nullable=False),
)
# how far each export target (a syslog/ATNA collector, :mod:`hie.hub.audit_export`) has been
# sent: the last seq it took. Not part of the trail, so not append-only (a send moves it on)
audit_export = Table(
    "audit_export",
    meta,
    Column("target", String(300), primary_key=True),
    Column("seq", BigInteger, nullable=False),
)

# built once: the writer runs them for every batch
_LAST = select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
_INSERT_LOG = insert(audit_log)

_TRIGGERS = {
    "sqlite": [
        f"CREATE TRIGGER IF NOT EXISTS {t}_no_{op.lower()} BEFORE {op} ON {t} "
        f"BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END"
        for t in ("audit_log", "audit_ref")
        for op in ("UPDATE", "DELETE")
    ],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION hie_audit_append_only() RETURNS trigger AS $$ "
        "BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END $$ LANGUAGE plpgsql",
        *(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = "
            f"'{t}_append_only') THEN CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE "
            f"OR TRUNCATE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION hie_audit_append_only(); "
            f"END IF; END $$"
            for t in ("audit_log", "audit_ref")
        ),
    ],
}


@dataclass(slots=True)
class AuditRecord:
    """One access, as the audit trail keeps it (see module docstring)."""

    action: str  # FHIR AuditEvent.action: C R U D E
    subtype: str  # read, vread, search, history, create, update, patch, delete, transaction, …
    outcome: int  # 0 success, 4 minor failure (refused, bad request), 8 serious, 12 major
    status: int  # the HTTP status answered
    method: str
    path: str  # path and query string (no bodies)
    agent: str | None  # the principal's subject; None when it never authenticated
    roles: list[str] = field(default_factory=list)
    org: str | None = None
    practitioner: str | None = None
    client_id: str | None = None
    on_behalf_of: str | None = None  # the patient a patient-context token acts for
    source: str | None = None  # caller's network address
    purpose: str | None = None  # purpose of use (e.g. ETREAT for break-the-glass)
    reason: str | None = None  # why refused, or a declared reason
    patients: list[str] = field(default_factory=list)
    entities: list[str] = field(default_factory=list)  # Type/id
    entities_more: int = 0  # entities beyond MAX_ENTITIES
    request_id: str | None = None
    recorded: int = 0  # epoch microseconds (set on append)
    seq: int = 0  # position in the trail (set on append)

    def canonical(self) -> bytes:
        """The bytes the hash covers."""
        return orjson.dumps(self)  # fields in declaration order


class _Waiter:
    """A caller of :meth:`SqlAuditLog.append` waiting for its batch's commit: a thread on an
    event, or a coroutine on a future of its event loop."""

    __slots__ = ("done", "error", "future", "loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        future: asyncio.Future[None] | None = None,
    ) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.loop = loop
        self.future = future

    def finish(self, error: BaseException | None) -> None:
        self.error = error
        self.done.set()
        if self.loop is not None and self.future is not None:
            self.loop.call_soon_threadsafe(_settle, self.future, error)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """What :meth:`SqlAuditLog.verify` found."""

    ok: bool
    checked: int
    first_bad: int | None = None
    problem: str = ""


# --- what a request touched: collected while it runs --------------------------------------------


@dataclass(slots=True)
class AccessNote:
    """Filled in by the services while a request runs, read by the trail when it answers."""

    subtype: str | None = None
    action: str | None = None
    patients: dict[str, None] = field(default_factory=dict)
    entities: dict[str, None] = field(default_factory=dict)
    more: int = 0
    purpose: str | None = None
    reason: str | None = None
    overridden: dict[str, None] = field(default_factory=dict)  # denials lifted (emergency)


current_access: contextvars.ContextVar[AccessNote | None] = contextvars.ContextVar(
    "hie_access", default=None
)


def note_access(
    subtype: str | None = None,
    *,
    action: str | None = None,
    entities: Sequence[str] = (),
    patients: Sequence[str] = (),
) -> None:
    """Record, for the current request's audit record, what it did and touched (a no-op
    outside a request)."""
    note = current_access.get()
    if note is None:
        return
    if subtype is not None and note.subtype is None:
        note.subtype = subtype
        note.action = action
    for e in entities:
        if len(note.entities) < MAX_ENTITIES:
            note.entities[e] = None
        elif e not in note.entities:
            note.more += 1
    for p in patients:
        note.patients[p] = None


@contextmanager
def collecting_access() -> Iterator[AccessNote]:
    """Collect what the enclosed code touches (:func:`note_access`) into a fresh note — for
    the channels with no HTTP request around them (MLLP messages, DICOM associations)."""
    note = AccessNote()
    token = current_access.set(note)
    try:
        yield note
    finally:
        current_access.reset(token)


def record_of(
    note: AccessNote,
    principal: Principal | None,
    *,
    action: str,
    subtype: str,
    outcome: int,
    status: int,
    method: str,
    path: str,
    source: str | None,
    reason: str | None = None,
    request_id: str | None = None,
) -> AuditRecord:
    """The audit record of one access: who (``principal``; None if it never authenticated),
    what the note collected (patients, resources, purpose), and how it ended. What the
    services noted (the note's subtype and action) wins over the channel's defaults."""
    p = principal
    return AuditRecord(
        action=note.action or action,
        subtype=note.subtype or subtype,
        outcome=outcome,
        status=status,
        method=method,
        path=path[:2000],
        agent=p.subject if p else None,
        roles=sorted(p.roles) if p else [],
        org=p.org if p else None,
        practitioner=p.practitioner if p else None,
        client_id=p.client_id if p else None,
        on_behalf_of=p.patient if p else None,
        source=source,
        purpose=note.purpose,
        reason=note.reason or reason,
        patients=list(note.patients),
        entities=list(note.entities),
        entities_more=note.more,
        request_id=request_id,
    )


# --- the store -----------------------------------------------------------------------------------


def audit_url(database_url: str, configured: str = "") -> str:
    """The audit trail's database: ``configured``, else beside a SQLite store, else the
    store's own PostgreSQL database."""
    if configured:
        return configured
    if database_url.startswith("sqlite:///"):
        path = Path(database_url.removeprefix("sqlite:///"))
        return f"sqlite:///{path.parent / 'audit.db'}"
    return database_url


class SqlAuditLog:
    """The trail on SQLite or PostgreSQL (see module docstring)."""

    def __init__(self, url: str, *, chain: bool = True, sync_writes: bool = True) -> None:
        self.url = url
        # the record of an access that changed data is made as durable as the data before
        # the caller hears the answer (off where the data itself is not synced either)
        self.sync_writes = sync_writes
        # whether this process chains what it writes ahead, in a thread of its own (off in
        # ``hie serve``'s HTTP workers: their parent does it, :meth:`keep_chained`)
        self._chains = chain
        self._polls = False
        self.dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        if self.dialect == "sqlite":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            # schema and reads; appends go through the driver (_append_sqlite)
            self.engine: Engine = create_engine(url, pool_size=4, max_overflow=8)
            sqlite_setup.configure(self.engine, "NORMAL", own_begin=False)
        else:
            pg = url.replace("postgresql://", "postgresql+psycopg://", 1)
            self.engine = create_engine(pg, pool_size=8, max_overflow=8, pool_pre_ping=True)
        self._lock = threading.Lock()  # one appender per process at a time (the chain)
        self._lock_file: int | None = None
        if self.dialect == "sqlite":  # processes hand the write lock over, not sleep for it
            lock_path = Path(url.removeprefix("sqlite:///") + ".lock")
            self._lock_file = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._queue: list[tuple[AuditRecord, _Waiter]] = []
        self._cond = threading.Condition()
        self._writer: threading.Thread | None = None
        self._indexer: threading.Thread | None = None
        self._appended = threading.Event()  # a record waits for its audit_ref rows
        self._stopping = threading.Event()
        self._closed = False
        self._raw: sqlite3.Connection | None = None
        # SQLite: records written ahead of the chain (see module docstring)
        self._pending_path = Path(url.removeprefix("sqlite:///") + ".pending")
        self._pending_fd: int | None = None
        if self._lock_file is not None:
            try:
                self._pending_fd = os.open(
                    self._pending_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
                )
            except OSError as exc:  # every request will be refused until it can be written
                log.error("audit.pending.unavailable", error=str(exc)[:300])

    def migrate(self) -> None:
        """Create the tables and the append-only triggers (idempotent). A trail from before
        deferred references has them for every record up to its last one with any."""
        with self.engine.begin() as conn:
            meta.create_all(conn, checkfirst=True)
            for ddl in _TRIGGERS[self.dialect]:
                conn.exec_driver_sql(ddl)
            if conn.execute(select(audit_ref_position.c.seq)).first() is None:
                ins: Any = (sqlite_insert if self.dialect == "sqlite" else pg_insert)(
                    audit_ref_position
                )
                done = select(func.coalesce(func.max(audit_ref.c.seq), 0)).scalar_subquery()
                conn.execute(ins.values(id=1, seq=done).on_conflict_do_nothing())

    def close(self) -> None:
        """Finish queued appends and their references, and release connections."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._writer is not None:
            self._writer.join(timeout=30)
        self._stopping.set()
        self._appended.set()
        if self._indexer is not None:
            self._indexer.join(timeout=30)
        with self._lock:
            if self._raw is not None:
                self._raw.close()
                self._raw = None
        self.engine.dispose()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None
        if self._pending_fd is not None:
            os.close(self._pending_fd)
            self._pending_fd = None

    def durable(self, rec: AuditRecord) -> bool:
        """Whether ``rec`` must be on disk before its caller is answered: it records an
        access that changed data (a create, update or delete that succeeded: an HTTP write,
        an HL7 message acknowledged ``AA``, a DICOM study stored), and the hub syncs its data
        (``sync_writes``). Reads, queries and refusals are written, not waited for."""
        return self.sync_writes and rec.action in _CHANGES and rec.outcome == 0

    def append(self, rec: AuditRecord) -> AuditRecord:
        """Add ``rec`` at the end of the chain; committed when this returns (on disk when
        :meth:`durable`, not only in the database server's or operating system's memory).

        Concurrent callers are committed together (group commit): a writer thread takes
        everything queued, appends it in one transaction and wakes each caller, so the
        trail keeps up with many requests at the cost of about one commit each batch."""
        waiter = _Waiter()
        self._enqueue(rec, waiter)
        if not waiter.done.wait(timeout=60):
            raise StorageError("the audit trail did not answer in 60 s")
        if waiter.error is not None:
            raise StorageError(
                "the audit trail is unavailable; the request was not served"
            ) from waiter.error
        return rec

    def append_ahead(self, rec: AuditRecord) -> AuditRecord:
        """:meth:`append` for a thread that needs no ``seq`` (an MLLP message's record, a
        DICOM association's): on SQLite written to the pending file like
        :meth:`append_async`'s records (synced before this returns when :meth:`durable`),
        chained within :data:`INDEX_SECONDS`."""
        if self._lock_file is not None:
            self._write_pending(rec)
            if self.durable(rec):
                self._sync_pending()
            return rec
        return self.append(rec)

    async def append_async(self, rec: AuditRecord, *, numbered: bool = False) -> AuditRecord:
        """:meth:`append` for a coroutine: waits on its own event loop, not a thread.

        On SQLite the record is written to the pending file on the loop (6 µs in a loop,
        against 34 µs for a commit) and chained within :data:`INDEX_SECONDS` (readers chain
        it first if they come sooner); its ``seq`` is then still 0. A write survives the
        hub's process being killed; when :meth:`durable` the file is synced too, in a
        thread, before this returns (0.1-0.2 ms here). ``numbered``: commit it to the chain
        before returning, so ``rec.seq`` is its position (at once on the loop when no one
        holds the write lock)."""
        if self._lock_file is not None and not numbered:
            self._write_pending(rec)
            if self.durable(rec):
                await asyncio.get_running_loop().run_in_executor(None, self._sync_pending)
            return rec
        if self._append_now(rec):
            return rec
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._enqueue(rec, _Waiter(loop, future))
        try:
            await asyncio.wait_for(future, timeout=60)
        except TimeoutError:
            raise StorageError("the audit trail did not answer in 60 s") from None
        except Exception as exc:
            raise StorageError(
                "the audit trail is unavailable; the request was not served"
            ) from exc
        return rec

    def _enqueue(self, rec: AuditRecord, waiter: _Waiter) -> None:
        with self._cond:
            if self._closed:
                raise StorageError("the audit trail is closed")
            self._queue.append((rec, waiter))
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name="hie-audit-writer", daemon=True
                )
                self._writer.start()
            self._cond.notify()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue and self._closed:
                    return
                batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
            try:
                self.append_many([r for r, _ in batch])
                error = None
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                log.error("audit.append.failed", error=str(exc)[:300], records=len(batch))
                error = exc
            for _, w in batch:
                w.finish(error)

    def append_many(self, recs: Sequence[AuditRecord]) -> None:
        """Append ``recs`` in order in one transaction (chained, committed on return; on
        disk if any of them is :meth:`durable`)."""
        now = int(time.time() * 1_000_000)
        with self._lock:
            if self._lock_file is not None:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                if self.dialect == "sqlite":
                    self._append_sqlite(recs, now)
                else:
                    self._append_pg(recs, now, durable=any(map(self.durable, recs)))
            finally:
                if self._lock_file is not None:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._index_later()

    def _append_now(self, rec: AuditRecord) -> bool:
        """Append ``rec`` on SQLite if the write lock is free this instant; False if it is
        not (another request's append or the reference indexer holds it: wait in line)."""
        if self._lock_file is None or not self._lock.acquire(blocking=False):
            return False
        try:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            try:
                self._append_sqlite([rec], int(time.time() * 1_000_000))
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        finally:
            self._lock.release()
        self._index_later()
        return True

    def _append_pg(self, recs: Sequence[AuditRecord], now: int, *, durable: bool) -> None:
        with self.engine.begin() as conn:
            # PostgreSQL: no wait for the WAL flush unless a record must be as durable as the
            # data it is about; one appender at a time (the chain)
            if not durable:
                conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7218300114)")
            last = conn.execute(_LAST).first()
            rows = _chain(recs, tuple(last) if last else None, now)
            conn.execute(_INSERT_LOG, [dict(zip(_LOG_COLS, r, strict=True)) for r in rows])

    def _append_sqlite(self, recs: Sequence[AuditRecord], now: int) -> None:
        """The same on SQLite through the driver directly (caller holds the locks), after
        every record still pending, so the chain keeps the order records were written in."""
        try:
            with self._sqlite() as cur:
                while len(self._chain_pending(cur)) == PENDING_BATCH:
                    pass
                _insert_chained(cur, recs, now)
        except sqlite3.Error as exc:
            log.error("audit.append.failed", error=str(exc)[:300])
            raise StorageError("the audit trail is unavailable") from exc

    # --- SQLite: records written ahead of the chain ---------------------------------------------

    def _write_pending(self, rec: AuditRecord) -> None:
        """Append ``rec`` to the pending file: one ``write`` of one line, under a shared
        ``flock`` (only a compaction takes it exclusively). The line starts with a newline as
        well, so a line torn by a full disk never swallows the record after it."""
        rec.recorded = rec.recorded or int(time.time() * 1_000_000)
        line = b"\n" + orjson.dumps(rec) + b"\n"
        fd = self._pending_fd
        if fd is None:
            raise StorageError("the audit trail is unavailable: its pending file cannot be opened")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                written = os.write(fd, line)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            log.error("audit.append.failed", error=str(exc)[:300])
            raise StorageError("the audit trail is unavailable") from exc
        if written != len(line):
            log.error("audit.append.failed", error=f"short write {written}/{len(line)}")
            raise StorageError("the audit trail is unavailable (disk full?)")
        self._index_later()

    def _sync_pending(self) -> None:
        """Sync the pending file's data to disk (what was written to it so far, by any
        process)."""
        fd = self._pending_fd
        if fd is None:
            raise StorageError("the audit trail is unavailable: its pending file cannot be opened")
        try:
            os.fdatasync(fd)
        except OSError as exc:
            log.error("audit.sync.failed", error=str(exc)[:300])
            raise StorageError("the audit trail is unavailable (its disk failed a sync)") from exc

    def _chain_pending(self, cur: sqlite3.Cursor) -> list[AuditRecord]:
        """Move up to :data:`PENDING_BATCH` pending records into the chain, inside the
        caller's write transaction (locks held); the records chained, numbered. A line that
        does not parse (torn by a failed write, whose request was refused) is skipped with a
        warning."""
        try:
            f = open(self._pending_path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return []
        except OSError as exc:  # records may wait in it: no answer rather than an incomplete one
            raise StorageError(f"the audit trail's pending file is unreadable: {exc}") from exc
        with f:
            generation = _generation(f.readline(200))
            row = cur.execute(_POSITION_SQL).fetchone()
            offset = _resume_at(row, generation)
            f.seek(offset)
            recs: list[AuditRecord] = []
            while len(recs) < PENDING_BATCH:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break  # the end, or a line still being written
                offset += len(line)
                if not line.strip() or _generation(line):
                    continue
                try:
                    recs.append(AuditRecord(**orjson.loads(line)))
                except (orjson.JSONDecodeError, TypeError) as exc:
                    log.warning("audit.pending.skipped", error=str(exc)[:200], at=offset)
        if row is None or (row[0], int(row[1])) != (generation, offset):
            cur.execute(
                "INSERT INTO audit_pending_position (id, generation, next_byte) VALUES (1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET generation = excluded.generation, "
                "next_byte = excluded.next_byte",
                (generation, offset),
            )
        if recs:
            _insert_chained(cur, recs, int(time.time() * 1_000_000))
        return recs

    def unchained_bytes(self) -> int:
        """How many bytes of records written ahead still wait to be chained (SQLite; always
        0 on PostgreSQL, whose appends are chained as they commit). It only reads: no lock
        taken, nothing chained. What ``/metrics`` shows as ``hie_audit_unchained_bytes``: it
        should fall to 0 within :data:`INDEX_SECONDS` of a pause in requests, or the process
        that chains (``hie serve``'s own) is not doing its work."""
        if self._lock_file is None:
            return 0
        try:
            with open(self._pending_path, "rb") as f:
                generation = _generation(f.readline(200))
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            return 0
        with self.engine.connect() as conn:
            row = conn.exec_driver_sql(_POSITION_SQL).first()
        return max(0, size - _resume_at(row, generation))

    def _compact_pending(self) -> None:
        """Start the pending file over once it is large and fully chained (caller holds the
        locks, outside a transaction). Appenders are kept out by the exclusive ``flock``;
        the new header's generation tells a later reader that offsets restart, even if this
        process dies between the truncation and the commit of the new position."""
        try:
            fd = os.open(self._pending_path, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # an append is under way: next time
            os.close(fd)
            return
        try:
            with self._sqlite() as cur:
                size = os.fstat(fd).st_size
                row = cur.execute(
                    "SELECT next_byte FROM audit_pending_position WHERE id = 1"
                ).fetchone()
                if row is None or int(row[0]) != size or size < PENDING_COMPACT:
                    return
                header = orjson.dumps({"pending": uuid.uuid4().hex}) + b"\n"
                os.ftruncate(fd, 0)
                os.pwrite(fd, header, 0)
                cur.execute(
                    "UPDATE audit_pending_position SET generation = ?, next_byte = ? WHERE id = 1",
                    (_generation(header), len(header)),
                )
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @contextmanager
    def _sqlite(self) -> Iterator[sqlite3.Cursor]:
        """A write transaction on the driver's connection (caller holds the locks)."""
        if self._raw is None:
            raw = sqlite3.connect(
                self.url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False
            )
            raw.execute("PRAGMA journal_mode=WAL")
            # what is chained or appended here is on disk when committed (a sync every
            # INDEX_SECONDS or so), so a record synced in the pending file stays durable when
            # a compaction starts that file over
            raw.execute(f"PRAGMA synchronous={'FULL' if self.sync_writes else 'NORMAL'}")
            raw.execute("PRAGMA busy_timeout=30000")
            # checkpoint (and fsync) every ~40 MB of WAL, not every 4 MB: the checkpoint runs
            # inside an append, before some request's answer
            raw.execute("PRAGMA wal_autocheckpoint=10000")
            self._raw = raw
        cur = self._raw.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        finally:
            cur.close()

    # --- what records are about (audit_ref), written after them ------------------------------

    def keep_chained(self) -> None:
        """Chain and index, every :data:`INDEX_SECONDS`, whatever any process wrote: for a
        process that leaves it to another (``chain=False``). ``hie serve`` with several HTTP
        workers runs this in its own process, so that the workers' interpreters, which
        serve the requests, spend no time on it (a batch in the same process also made
        requests wait for the interpreter lock while it ran)."""
        self._chains = self._polls = True
        self._index_later()

    def _index_later(self) -> None:
        """Wake (or start) this process's indexer: a record now waits for its references."""
        if not self._chains:
            return
        if not self._appended.is_set():  # set() takes a lock and notifies, every request
            self._appended.set()
        if self._indexer is None:
            with self._cond:
                if self._indexer is None and not self._closed:
                    self._indexer = threading.Thread(
                        target=self._index_loop, name="hie-audit-refs", daemon=True
                    )
                    self._indexer.start()

    def _index_loop(self) -> None:
        while True:
            self._appended.wait()
            self._appended.clear()
            stopping = self._stopping.is_set()
            try:
                self.index_refs()
            except Exception as exc:  # noqa: BLE001 - readers index for themselves meanwhile
                log.warning("audit.refs.failed", error=str(exc)[:300])
            if stopping:
                return
            self._stopping.wait(INDEX_SECONDS)  # close() wakes it for one last pass
            if self._polls:
                self._appended.set()

    def index_refs(self) -> int:
        """Chain every pending record (SQLite) and write the audit_ref rows of every record
        that has none yet, :data:`INDEX_BATCH` records per commit; how many records it
        indexed. Any process may run it at any time: the position rows say where the last
        run stopped, under the write lock."""
        total = 0
        while True:
            chained, done = self._index_batch()
            total += done
            if done < INDEX_BATCH and chained < PENDING_BATCH:
                break
        if self._lock_file is not None and _size(self._pending_path) >= PENDING_COMPACT:
            with self._lock:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX)
                try:
                    self._compact_pending()
                finally:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        return total

    def _index_batch(self) -> tuple[int, int]:
        """(pending records chained, records indexed) in one commit."""
        with self._lock:
            if self._lock_file is not None:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                if self.dialect == "sqlite":
                    with self._sqlite() as cur:
                        chained = self._chain_pending(cur)
                        indexed = _index_chained(cur, chained)
                        return len(chained), indexed or _index_refs_on(cur, "?")
                with self.engine.begin() as conn:
                    conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7218300115)")
                    cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                    return 0, _index_refs_on(cur, "%s")
            finally:
                if self._lock_file is not None:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def records(
        self,
        *,
        refs: Sequence[str] | None = None,
        subtypes: Sequence[str] | None = None,
        since: int | None = None,
        until: int | None = None,
        count: int = 50,
        before_seq: int | None = None,
    ) -> tuple[list[AuditRecord], int | None]:
        """Records newest first — about any of ``refs`` (``Patient/<id>``, ``Type/<id>``)
        when given — and the seq to continue before, if there are more. ``subtypes`` filters
        on the record's subtype (read here, not in SQL: the body is the record)."""
        stmt = select(audit_log.c.seq, audit_log.c.body)
        if refs is not None:
            self.index_refs()  # every record written so far is chained and found
            about = select(audit_ref.c.seq).where(audit_ref.c.ref.in_(list(refs)))
            stmt = stmt.where(audit_log.c.seq.in_(about))
        else:
            self._catch_up()
        if since is not None:
            stmt = stmt.where(audit_log.c.recorded >= since)
        if until is not None:
            stmt = stmt.where(audit_log.c.recorded < until)
        if before_seq is not None:
            stmt = stmt.where(audit_log.c.seq < before_seq)
        stmt = stmt.order_by(audit_log.c.seq.desc())
        out: list[AuditRecord] = []
        more: int | None = None
        with self.engine.connect() as conn:
            for r in conn.execute(stmt.limit(None if subtypes else count + 1)):
                rec = _record(bytes(r.body))
                if subtypes and rec.subtype not in subtypes:
                    continue
                if len(out) == count:
                    more = out[-1].seq
                    break
                out.append(rec)
        return out, more

    def _catch_up(self) -> None:
        """Before a read on SQLite: chain what is pending (and index it), so a reader sees
        every record written before it asked."""
        if self._lock_file is not None:
            self.index_refs()

    def records_after(self, seq: int, limit: int) -> list[AuditRecord]:
        """Up to ``limit`` records with a position above ``seq``, oldest first (what an
        exporter sends next)."""
        self._catch_up()
        stmt = (
            select(audit_log.c.body)
            .where(audit_log.c.seq > seq)
            .order_by(audit_log.c.seq)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [_record(bytes(body)) for (body,) in conn.execute(stmt)]

    def export_cursor(self, target: str) -> int:
        """The last seq sent to export ``target`` (0: nothing yet)."""
        with self.engine.connect() as conn:
            seq = conn.execute(
                select(audit_export.c.seq).where(audit_export.c.target == target)
            ).scalar()
        return int(seq) if seq is not None else 0

    def has_export_cursor(self, target: str) -> bool:
        """Whether export ``target`` has a cursor yet (it has sent, or was placed)."""
        with self.engine.connect() as conn:
            found = conn.execute(
                select(audit_export.c.seq).where(audit_export.c.target == target)
            ).first()
        return found is not None

    def set_export_cursor(self, target: str, seq: int) -> None:
        """Record that export ``target`` has sent everything up to ``seq`` (committed on
        return). It may also move back, to send records again."""
        # one upsert on either engine (SQLite ≥ 3.24 and PostgreSQL share ON CONFLICT)
        ins: Any = (sqlite_insert if self.dialect == "sqlite" else pg_insert)(audit_export)
        stmt = ins.values(target=target, seq=seq).on_conflict_do_update(
            index_elements=["target"], set_={"seq": ins.excluded.seq}
        )
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def read(self, seq: int) -> AuditRecord | None:
        """One record by its position."""
        self._catch_up()
        with self.engine.connect() as conn:
            body = conn.execute(select(audit_log.c.body).where(audit_log.c.seq == seq)).scalar()
        return _record(bytes(body)) if body is not None else None

    def count(self) -> int:
        """How many records the trail holds."""
        self._catch_up()
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(audit_log)).scalar_one())

    def verify(self, batch: int = 5000) -> VerifyResult:
        """Walk the chain from the first record: each ``prev_hash`` is the previous ``hash``,
        each ``hash`` covers its body, ``seq`` has no gaps."""
        self._catch_up()
        prev, expected, checked = GENESIS, 1, 0
        with self.engine.connect() as conn:
            while True:
                rows = conn.execute(
                    select(audit_log)
                    .where(audit_log.c.seq >= expected)
                    .order_by(audit_log.c.seq)
                    .limit(batch)
                ).all()
                if not rows:
                    return VerifyResult(True, checked)
                for r in rows:
                    body = bytes(r.body)
                    if r.seq != expected:
                        return VerifyResult(
                            False, checked, expected, f"record {expected} is missing"
                        )
                    if r.prev_hash != prev:
                        return VerifyResult(
                            False, checked, r.seq, "the link to the previous record is broken"
                        )
                    if chain_hash(prev, body) != r.hash:
                        return VerifyResult(False, checked, r.seq, "the record was changed")
                    rec = orjson.loads(body)
                    if rec.get("seq") != r.seq or rec.get("recorded") != r.recorded:
                        return VerifyResult(False, checked, r.seq, "the record was moved")
                    prev, expected, checked = r.hash, expected + 1, checked + 1

    def stats(self, since: int | None = None) -> dict[str, Any]:
        """Counts by outcome and role (for officials: no one is named)."""
        self._catch_up()
        stmt = select(audit_log.c.body)
        if since is not None:
            stmt = stmt.where(audit_log.c.recorded >= since)
        outcome: dict[str, int] = {}
        roles: dict[str, int] = {}
        with self.engine.connect() as conn:
            for (body,) in conn.execute(stmt):
                rec = orjson.loads(body)
                outcome[str(rec["outcome"])] = outcome.get(str(rec["outcome"]), 0) + 1
                for role in rec.get("roles") or ["(none)"]:
                    roles[role] = roles.get(role, 0) + 1
        return {"by_outcome": outcome, "by_role": roles}


_LOG_COLS = ("seq", "recorded", "body", "prev_hash", "hash")


def _chain(
    recs: Sequence[AuditRecord], last: tuple[int, str] | None, now: int
) -> list[tuple[int, int, bytes, str, str]]:
    """Number and link ``recs`` after ``last`` (seq, hash): the audit_log rows (in
    ``_LOG_COLS`` order)."""
    seq, prev = last if last else (0, GENESIS)
    rows: list[tuple[int, int, bytes, str, str]] = []
    for rec in recs:
        seq += 1
        rec.seq, rec.recorded = seq, rec.recorded or now
        body = rec.canonical()
        digest = chain_hash(prev, body)
        rows.append((seq, rec.recorded, body, prev, digest))
        prev = digest
    return rows


def _insert_chained(cur: sqlite3.Cursor, recs: Sequence[AuditRecord], now: int) -> None:
    """Number and link ``recs`` after the last record and insert them (SQLite, inside the
    caller's write transaction)."""
    last = cur.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    cur.executemany(
        "INSERT INTO audit_log (seq, recorded, body, prev_hash, hash) VALUES (?,?,?,?,?)",
        _chain(recs, last, now),
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


_POSITION_SQL = "SELECT generation, next_byte FROM audit_pending_position WHERE id = 1"


def _resume_at(row: Sequence[Any] | None, generation: str) -> int:
    """Where chaining resumes in a pending file whose header names ``generation``, from the
    position row (``_POSITION_SQL``): the byte after the last record taken if the row is
    about that generation, else the file's start (it was started over since)."""
    return int(row[1]) if row is not None and row[0] == generation else 0


def _generation(line: bytes) -> str:
    """The generation a pending file's header line names ("" for any other line)."""
    if not line.startswith(b'{"pending":'):
        return ""
    try:
        return str(orjson.loads(line)["pending"])[:40]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return ""


def _index_refs_on(cur: Any, mark: str) -> int:
    """One batch of :meth:`SqlAuditLog.index_refs` on a DB-API cursor inside a write
    transaction (``mark``: the driver's parameter marker); how many records it indexed."""
    cur.execute("SELECT seq FROM audit_ref_position WHERE id = 1")
    row = cur.fetchone()
    done = int(row[0]) if row else 0
    cur.execute(
        f"SELECT seq, body FROM audit_log WHERE seq > {mark} ORDER BY seq LIMIT {INDEX_BATCH}",
        (done,),
    )
    found = cur.fetchall()
    if not found:
        return 0
    refs: list[tuple[str, int]] = []
    for seq, body in found:
        rec = orjson.loads(bytes(body))
        refs += _refs(int(seq), rec.get("subtype"), rec.get("patients"), rec.get("entities"))
    _insert_refs(cur, mark, refs, int(found[-1][0]), known=row is not None)
    return len(found)


def _index_chained(cur: sqlite3.Cursor, recs: Sequence[AuditRecord]) -> int:
    """The audit_ref rows of ``recs``, just chained in this transaction, from the records
    in hand rather than read back, when every record before them is indexed already; how
    many records (0 when there is a backlog: :func:`_index_refs_on` takes it in order)."""
    if not recs:
        return 0
    row = cur.execute("SELECT seq FROM audit_ref_position WHERE id = 1").fetchone()
    if row is None or int(row[0]) != recs[0].seq - 1:
        return 0
    refs: list[tuple[str, int]] = []
    for rec in recs:
        refs += _refs(rec.seq, rec.subtype, rec.patients, rec.entities)
    _insert_refs(cur, "?", refs, recs[-1].seq, known=True)
    return len(recs)


def _refs(
    seq: int, subtype: str | None, patients: Sequence[str] | None, entities: Sequence[str] | None
) -> list[tuple[str, int]]:
    """The audit_ref rows of one record: its patients, and unless it is a page of results
    (:data:`PAGE_SUBTYPES`) the resources it names."""
    about = dict.fromkeys(f"Patient/{p}" for p in patients or ())
    if subtype not in PAGE_SUBTYPES:
        about.update(dict.fromkeys(entities or ()))
    return [(str(r)[:160], seq) for r in about]


def _insert_refs(
    cur: Any, mark: str, refs: list[tuple[str, int]], last: int, *, known: bool
) -> None:
    """Insert ``refs`` and move the indexed position to ``last``."""
    if refs:
        cur.executemany(f"INSERT INTO audit_ref (ref, seq) VALUES ({mark}, {mark})", refs)
    if known:
        cur.execute(f"UPDATE audit_ref_position SET seq = {mark} WHERE id = 1", (last,))
    else:  # not migrated since references were deferred: indexed from the start
        cur.execute(f"INSERT INTO audit_ref_position (id, seq) VALUES (1, {mark})", (last,))


def chain_hash(prev: str, body: bytes) -> str:
    """SHA-256 of the previous hash and this record's canonical bytes."""
    return hashlib.sha256(prev.encode() + b"\n" + body).hexdigest()


def _record(body: bytes) -> AuditRecord:
    return AuditRecord(**orjson.loads(body))


def open_audit_log(
    database_url: str, configured: str = "", *, chain: bool = True, sync_writes: bool = True
) -> SqlAuditLog:
    """The audit trail for a hub whose resource store is at ``database_url`` (``chain``,
    ``sync_writes``: see :class:`SqlAuditLog`)."""
    return SqlAuditLog(audit_url(database_url, configured), chain=chain, sync_writes=sync_writes)
