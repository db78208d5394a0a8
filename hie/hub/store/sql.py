"""The SQL resource store: one set of SQLAlchemy Core queries for SQLite and PostgreSQL.

SQLite (embedded default) runs in WAL mode with ``synchronous=FULL`` so a commit that returned
survives a crash; writes are serialised by a thread lock plus an ``flock`` on a file next to
the database (so several ``hie serve`` worker processes hand the write lock over at once
instead of sleeping in SQLite's busy handler) and open with ``BEGIN IMMEDIATE`` so two writers
never deadlock on a lock upgrade. PostgreSQL uses its own MVCC and row locks.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    bindparam,
    create_engine,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    literal_column,
    not_,
    or_,
    select,
    text,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import RootTransaction
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.sql.expression import FromClause

from hie.hub import sqlite_setup
from hie.hub.errors import HieError, InvalidRequest, StorageError, VersionConflict
from hie.hub.memo import IdentityMemo
from hie.hub.store import schema as s
from hie.hub.store.port import (
    AllOf,
    AnyOf,
    ChainCond,
    CompartmentCond,
    Condition,
    DateCond,
    DateRow,
    IdCond,
    LastUpdatedCond,
    MissingCond,
    NewVersion,
    Not,
    NumberCond,
    OutboxEvent,
    OwnerCond,
    Page,
    QuantityRow,
    Query,
    ReferenceCond,
    ReferenceRow,
    RelatedCond,
    SortKey,
    StoredResource,
    StringCond,
    StringRow,
    TokenCond,
    TokenRow,
    TypeCond,
    UriCond,
    UriRow,
    Via,
    param_id,
)
from hie.hub.store.sql_identity import L, SqlIdentityIndex, group_members_select

R = s.resources
H = s.resource_history
MAX_STR = 255


def now_us() -> int:
    """Current time in epoch microseconds."""
    return time.time_ns() // 1000


def _normalise_url(url: str) -> str:
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


# SQLite group commit (SqlResourceStore._grouped): writers committed together at most, and
# how long a group stays open to writers that arrive while it runs
GROUP_MAX = 32
GROUP_SECONDS = 0.05
GROUP_WAIT_SECONDS = 300  # a writer waiting for its group's commit (a stuck one: an error)


def _write_error(exc: IntegrityError | OperationalError) -> HieError:
    """What a write transaction's caller hears when the database refused or failed it."""
    if isinstance(exc, IntegrityError):
        return VersionConflict("a concurrent write created or changed the same resource")
    return StorageError(f"database unavailable: {exc.orig}")


@dataclass(eq=False)
class _Group:
    """Writers sharing one SQLite transaction, and the commit they wait for."""

    conn: Connection
    trans: RootTransaction
    opened: float
    members: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class _LeanConnection(sqlite3.Connection):
    """A connection of :class:`_LeanReads`, with the change markers it answered, each under
    its own ``PRAGMA data_version`` (whose values compare only on one connection)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.markers: dict[str, tuple[int, tuple[int, int]]] = {}


class _LeanReads:
    """SQLite connections of the store's own for reads of one statement each, without
    SQLAlchemy around them. A point read through the engine (pool checkout, ``BEGIN`` through
    the begin event, execute, result, ``COMMIT``, pool return) cost 85 µs of CPU where
    SQLite's own work was 10 µs. Each statement runs in autocommit, so it reads one
    snapshot; the connections are read-only (``query_only``), and a forked child opens its own.
    """

    IDLE_MAX = 8

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        self.idle: list[_LeanConnection] = []
        self.closed = False

    def rows(self, sql: str, params: Sequence[object]) -> list[Any]:
        """The rows of one SELECT."""
        conn = self._take()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            raise StorageError(f"database unavailable: {exc}") from exc
        finally:
            self._give(conn)

    def marker(self, resource_type: str) -> tuple[int, int]:
        """The store's :meth:`~SqlResourceStore.change_marker`, remembered per connection
        until ``PRAGMA data_version`` says another connection committed (a few µs to ask).
        The version is read before the marker, so a commit between the two only makes the
        next call ask again. Each connection is its own watcher: one shared watcher behind a
        lock serialised a busy hub's threads on it.

        Not the WAL index's header read from a mapping of the ``-shm`` file, though that
        costs a fraction of a microsecond: opening and closing a descriptor of that file
        drops every POSIX lock this process holds on it, SQLite's included. Another process
        that connects then finds the WAL index unused and re-initialises it, and this
        process dies of SIGBUS reading the mapping (or its connections read a WAL index they
        no longer hold a lock on). See "How To Corrupt An SQLite Database File", 2.2."""
        conn = self._take()
        try:
            version = int(conn.execute("PRAGMA data_version").fetchone()[0])
            hit = conn.markers.get(resource_type)
            if hit is not None and hit[0] == version:
                return hit[1]
            row = conn.execute(_CHANGE_MARKER_SQL, (resource_type, resource_type)).fetchone()
            marker = int(row[0] or 0), int(row[1] or 0)
            conn.markers[resource_type] = (version, marker)
            return marker
        except sqlite3.OperationalError as exc:
            raise StorageError(f"database unavailable: {exc}") from exc
        finally:
            self._give(conn)

    def _take(self) -> _LeanConnection:
        if self.pid != os.getpid():  # never use a parent's connection after a fork
            self.idle, self.pid = [], os.getpid()
        try:
            return self.idle.pop()  # atomic: no lock needed
        except IndexError:
            return self._open()

    def _give(self, conn: _LeanConnection) -> None:
        if self.closed or len(self.idle) >= self.IDLE_MAX:
            conn.close()
        else:
            self.idle.append(conn)

    def _open(self) -> _LeanConnection:
        try:
            conn = sqlite3.connect(
                self.path,
                check_same_thread=False,
                timeout=30,
                isolation_level=None,
                cached_statements=256,
                factory=_LeanConnection,
            )
            for pragma in sqlite_setup.LEAN_READ_PRAGMAS:
                conn.execute(pragma)
        except sqlite3.Error as exc:
            raise StorageError(f"database unavailable: {exc}") from exc
        return conn

    def close(self) -> None:
        self.closed = True
        while self.idle:
            self.idle.pop().close()


class SqlResourceStore:
    """Resource store on SQLAlchemy Core (see module docstring)."""

    def __init__(self, url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 8) -> None:
        self.url = _normalise_url(url)
        self.dialect = "sqlite" if self.url.startswith("sqlite") else "postgresql"
        self._write_lock = threading.Lock()
        self._waiting_mutex = threading.Lock()
        self._waiting = 0  # threads waiting for the write lock (they may join a group)
        self._group: _Group | None = None
        self._lock_file: int | None = None
        self._gap_marks: dict[tuple[str, int], int] = {}
        # a grant's read statement, and the same as SQL for the driver (:meth:`read_where`)
        self._where_stmts: IdentityMemo[
            tuple[Select[Any], tuple[str, list[tuple[str, object]]] | None]
        ] = IdentityMemo()
        self._pid_lists: IdentityMemo[list[int]] = IdentityMemo()
        self._lean: _LeanReads | None = None
        if self.dialect == "sqlite":
            path = self.url.split("///", 1)[1] if "///" in self.url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._lock_file = os.open(f"{path}.writelock", os.O_RDWR | os.O_CREAT, 0o600)
                self._lean = _LeanReads(path)
            self.engine = create_engine(
                self.url,
                connect_args={"check_same_thread": False, "timeout": 30},
                pool_size=pool_size,
                max_overflow=pool_size,
                # the connection used last is warm: its page cache and prepared statements.
                # A lab message on FIFO turns took a colder one each time (SQL time per
                # message in process 2.49 -> 2.11 ms, mean of three paired runs)
                pool_use_lifo=True,
            )
            sqlite_setup.configure(self.engine, sqlite_synchronous, own_begin=True, tuned=True)
        else:
            # No server-side prepared statements: PostgreSQL's generic plan for a search (made
            # after five executions) ignores how selective the patient reference is and can be
            # 30x slower than the custom plan; planning each query costs about a millisecond.
            self.engine = create_engine(
                self.url,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_pre_ping=True,
                connect_args={"prepare_threshold": None},
            )

    # --- engine set-up ---------------------------------------------------------------------

    @functools.cache  # noqa: B019 - a handful of strings per store, kept for its lifetime
    def raw_insert_sql(self, kind: str) -> str:
        """``INSERT INTO idx_<kind> (…) VALUES (…)`` in the driver's parameter style."""
        table = s.INDEX_TABLES[kind]
        cols = [c.name for c in table.columns]
        mark = "?" if self.dialect == "sqlite" else "%s"
        return (
            f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES ({', '.join([mark] * len(cols))})"
        )

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        from hie.hub.store.migrate import upgrade

        upgrade(self.engine)

    def close(self) -> None:
        """Dispose of the connection pool."""
        self.engine.dispose()
        if self._lean is not None:
            self._lean.close()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    # --- transactions ----------------------------------------------------------------------

    def transaction(self) -> AbstractContextManager[SqlWriteTx]:
        """A write transaction; it commits, durably, before the block's caller goes on.
        On SQLite the transactions of several threads may commit together (:meth:`_grouped`)."""
        return self._grouped() if self.dialect == "sqlite" else self._single()

    @contextmanager
    def _single(self) -> Iterator[SqlWriteTx]:
        """PostgreSQL: a transaction of its own (the server commits concurrent ones in groups)."""
        with self.engine.connect() as conn:
            conn.info["hie_write"] = True
            try:
                with conn.begin():
                    yield SqlWriteTx(self, conn)
            except (IntegrityError, OperationalError) as exc:
                raise _write_error(exc) from exc
            finally:
                conn.info.pop("hie_write", None)

    @contextmanager
    def _grouped(self) -> Iterator[SqlWriteTx]:
        """SQLite, group commit. Writers take turns under the write lock as before, but a
        writer that finishes while another waits for the lock leaves the SQLite transaction
        open: the next one runs in it, inside a savepoint of its own, and the last of the
        group commits for all (one ``fsync`` instead of one each; :data:`GROUP_MAX`
        writers or :data:`GROUP_SECONDS` at most). Each returns only after that commit, so
        nothing is acknowledged before it is durable. A writer that fails is rolled back to
        its savepoint and the others are kept; if the commit fails, or SQLite abandoned the
        transaction (a full disk), every writer of the group gets the error.

        A writer sees what earlier writers of its group wrote (one connection), as it would
        have seen it committed had it come a moment later."""
        with self._waiting_mutex:
            self._waiting += 1
        self._write_lock.acquire()
        with self._waiting_mutex:
            self._waiting -= 1
        try:
            group = self._group or self._open_group()
        except BaseException:
            self._write_lock.release()
            raise
        failure: BaseException | None = None
        try:
            savepoint = group.conn.begin_nested()
            try:
                yield SqlWriteTx(self, group.conn)
                savepoint.commit()
            except BaseException:
                if savepoint.is_active and group.conn.in_transaction():
                    savepoint.rollback()
                raise
        except BaseException as exc:  # noqa: BLE001 - the group's fate first; re-raised below
            failure = exc
        try:
            if failure is None:
                group.members += 1
            driver: Any = group.conn.connection.driver_connection
            if not driver.in_transaction:  # SQLite rolled the whole transaction back
                group.error = failure or StorageError("the write transaction was abandoned")
                self._close_group(group, commit=False)
            else:
                with self._waiting_mutex:
                    waiting = self._waiting
                if not (
                    waiting
                    and group.members < GROUP_MAX
                    and time.monotonic() - group.opened < GROUP_SECONDS
                ):
                    self._close_group(group, commit=True)
        finally:
            self._write_lock.release()
        if isinstance(failure, IntegrityError | OperationalError):
            raise _write_error(failure) from failure
        if failure is not None:
            raise failure
        if not group.done.wait(timeout=GROUP_WAIT_SECONDS):
            raise StorageError("the write transaction's group did not commit in time")
        if group.error is not None:
            raise StorageError(f"database unavailable: {group.error}") from group.error

    def _open_group(self) -> _Group:
        """BEGIN IMMEDIATE on a connection of the pool, under the cross-process lock
        (caller holds the write lock)."""
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        conn: Connection | None = None
        try:
            conn = self.engine.connect()
            conn.info["hie_write"] = True
            trans = conn.begin()
        except BaseException as exc:
            if conn is not None:
                conn.info.pop("hie_write", None)
                conn.close()
            if self._lock_file is not None:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            if isinstance(exc, OperationalError):
                raise _write_error(exc) from exc
            raise
        self._group = _Group(conn, trans, time.monotonic())
        return self._group

    def _close_group(self, group: _Group, *, commit: bool) -> None:
        """Commit (or roll back) the group's transaction, release its connection and the
        cross-process lock, and wake its writers (caller holds the write lock)."""
        try:
            if commit:
                group.trans.commit()
            elif group.trans.is_active:
                group.trans.rollback()
        except Exception as exc:  # noqa: BLE001 - every writer of the group is told
            group.error = exc
            try:
                if group.trans.is_active:
                    group.trans.rollback()
            except Exception:  # noqa: BLE001, S110 - the connection is discarded below
                pass
        finally:
            group.conn.info.pop("hie_write", None)
            if group.error is not None:
                group.conn.invalidate()
            group.conn.close()
            if self._lock_file is not None:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._group = None
            group.done.set()

    @contextmanager
    def identity_reader(self) -> Iterator[SqlIdentityIndex]:
        """The identity index on a read-only snapshot."""
        with self._read() as conn:
            yield SqlIdentityIndex(conn)

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
        except OperationalError as exc:
            raise StorageError(f"database unavailable: {exc.orig}") from exc

    # --- reads -----------------------------------------------------------------------------

    _COLS = (R.c.rid, R.c.rtype, R.c.id, H.c.version, H.c.last_updated, R.c.deleted, H.c.content)

    def _current_select(self) -> Select[Any]:
        return select(*self._COLS, H.c.method).select_from(
            R.join(H, and_(H.c.rid == R.c.rid, H.c.version == R.c.version))
        )

    @staticmethod
    def _row(row: Any, deleted: bool | None = None) -> StoredResource:
        content = row.content
        return StoredResource(
            resource_type=row.rtype,
            id=row.id,
            version=row.version,
            last_updated=row.last_updated,
            deleted=bool(row.deleted) if deleted is None else deleted,
            content=bytes(content) if content is not None else None,
            method=getattr(row, "method", "PUT"),
            rid=row.rid,
        )

    @staticmethod
    def _row_of(t: Sequence[Any]) -> StoredResource:
        """A row of the current-version columns (``_COLS`` and the method) from the driver."""
        return StoredResource(t[1], t[2], t[3], t[4], bool(t[5]), t[6], t[7], t[0])

    def read(self, resource_type: str, id: str) -> StoredResource | None:
        """Current version (tombstones included) or None."""
        if self._lean is not None:
            found = self._lean.rows(_CURRENT_SQL, (resource_type, id))
            return self._row_of(found[0]) if found else None
        with self._read() as conn:  # the statement built once (_CURRENT), the key bound
            row = conn.execute(_CURRENT, {"rtype": resource_type, "id": id}).first()
        return self._row(row) if row else None

    def read_where(
        self, resource_type: str, id: str, conds: tuple[Condition, ...]
    ) -> StoredResource | None:
        """Current, live version matching ``conds`` (see the port). The statement is built
        once per (type, conditions) and reused with the id bound: building it, and SQLAlchemy
        walking it for its cache key, cost more than running it."""
        prepared = self._where_stmts.get(resource_type, conds)
        if prepared is None:  # by value only when these conditions are new to the memo
            stmt = self._read_where_stmt(resource_type, conds)
            prepared = self._where_stmts.put((stmt, self._lean_sql(stmt)), resource_type, conds)
        stmt, lean = prepared
        if lean is not None and self._lean is not None:
            sql, names = lean
            found = self._lean.rows(sql, [id if n == "read_id" else v for n, v in names])
            return self._row_of(found[0]) if found else None
        with self._read() as conn:
            row = conn.execute(stmt, {"read_id": id}).first()
        return self._row(row) if row else None

    def _lean_sql(self, stmt: Select[Any]) -> tuple[str, list[tuple[str, object]]] | None:
        """``stmt`` as SQL for the driver with its bound values in order (``read_id`` to be
        filled), or None if it needs SQLAlchemy at execution (expanding or processed values)."""
        if self._lean is None:
            return None
        compiled = stmt.compile(dialect=self.engine.dialect)
        sql = str(compiled)
        order = compiled.positiontup or []
        values = compiled.construct_params({"read_id": ""})
        if "POSTCOMPILE" in sql or compiled._bind_processors:  # noqa: SLF001
            return None
        if any(not isinstance(values[n], str | int | None) for n in order):
            return None
        return sql, [(n, values[n]) for n in order]

    @functools.lru_cache(maxsize=1024)  # noqa: B019 - one store per process, conditions bounded
    def _read_where_stmt(self, resource_type: str, conds: tuple[Condition, ...]) -> Select[Any]:
        compiler = _Compiler(self.dialect, resource_type)
        return self._current_select().where(
            R.c.rtype == resource_type,
            R.c.id == bindparam("read_id"),
            R.c.deleted == false(),
            *(compiler.cond(c, R, resource_type) for c in conds),
        )

    def ids_select(self, resource_type: str, conds: tuple[Condition, ...]) -> Select[Any]:
        """A subquery of the ids of live ``resource_type`` resources matching ``conds``, for
        tables kept beside the store (the DICOM index) to filter on in their own queries."""
        compiler = _Compiler(self.dialect, resource_type)
        return select(R.c.id).where(
            R.c.rtype == resource_type, R.c.deleted == false(), *compiler.where(conds)
        )

    def vread(self, resource_type: str, id: str, version: int) -> StoredResource | None:
        """One version or None."""
        stmt = (
            select(
                R.c.rid, R.c.rtype, R.c.id, H.c.version, H.c.last_updated, H.c.content, H.c.method
            )
            .select_from(R.join(H, H.c.rid == R.c.rid))
            .where(R.c.rtype == resource_type, R.c.id == id, H.c.version == version)
        )
        with self._read() as conn:
            row = conn.execute(stmt).first()
        return self._row(row, deleted=row.content is None) if row else None

    def ids_by_token(
        self,
        resource_type: str,
        param: str,
        tokens: Sequence[tuple[str, str]],
        conds: Sequence[Condition] = (),
    ) -> dict[tuple[str, str], list[str]]:
        """Many token lookups in one prepared query, outside a transaction (see the port)."""
        with self._read() as conn:
            return _ids_by_token(conn, self.dialect, resource_type, param, tokens, conds)

    def read_many(self, refs: Sequence[tuple[str, str]]) -> list[StoredResource]:
        """Current, non-deleted versions of the given (type, id) pairs."""
        if not refs:
            return []
        out: list[StoredResource] = []
        if self._lean is not None:
            for rtype, ids in _by_type(refs).items():
                for chunk in _chunks(ids, 400):
                    sql = _MANY_SQL.format(marks=",".join("?" * len(chunk)))
                    out.extend(map(self._row_of, self._lean.rows(sql, [rtype, *chunk])))
            return out
        with self._read() as conn:
            # one type at a time: ``rtype = ? AND id IN (…)`` uses the (rtype, id) key, where
            # SQLite answers ``(rtype, id) IN (VALUES …)`` by scanning every resource (60 ms
            # for 20 documents at 100,000)
            for rtype, ids in _by_type(refs).items():
                for chunk in _chunks(ids, 400):
                    stmt = self._current_select().where(
                        R.c.rtype == rtype, R.c.id.in_(chunk), R.c.deleted == false()
                    )
                    out.extend(self._row(r) for r in conn.execute(stmt))
        return out

    def history(
        self,
        resource_type: str | None,
        id: str | None,
        *,
        since: int | None,
        count: int,
        before_seq: int | None,
    ) -> tuple[list[StoredResource], int | None]:
        """Versions newest first, with the cursor (an hseq) for the next page."""
        stmt = select(
            H.c.hseq,
            R.c.rid,
            R.c.rtype,
            R.c.id,
            H.c.version,
            H.c.last_updated,
            H.c.content,
            H.c.method,
        ).select_from(H.join(R, R.c.rid == H.c.rid))
        if resource_type:
            stmt = stmt.where(R.c.rtype == resource_type)
        if id is not None:
            stmt = stmt.where(R.c.id == id)
        if since is not None:
            stmt = stmt.where(H.c.last_updated >= since)
        if before_seq is not None:
            stmt = stmt.where(H.c.hseq < before_seq)
        stmt = stmt.order_by(H.c.hseq.desc()).limit(count + 1)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        more = len(rows) > count
        rows = rows[:count]
        items = [self._row(r, deleted=r.content is None) for r in rows]
        return items, (rows[-1].hseq if more and rows else None)

    def iter_current(
        self, resource_type: str | None, batch: int = 1000
    ) -> Iterator[StoredResource]:
        """Every current, non-deleted resource, in rid order."""
        last = 0
        while True:
            stmt = self._current_select().where(R.c.rid > last, R.c.deleted == false())
            if resource_type:
                stmt = stmt.where(R.c.rtype == resource_type)
            stmt = stmt.order_by(R.c.rid).limit(batch)
            with self._read() as conn:
                rows = conn.execute(stmt).all()
            if not rows:
                return
            for row in rows:
                yield self._row(row)
            last = rows[-1].rid

    # --- search ----------------------------------------------------------------------------

    def search(self, query: Query) -> Page:
        """Filter, sort and page in SQL; keyset paging on (sort values…, rid)."""
        compiler = _Compiler(self.dialect, query.resource_type)
        where = compiler.where(query.conds)
        base_filter = [R.c.deleted == false()]
        if query.resource_type:
            base_filter.append(R.c.rtype == query.resource_type)
        sort_exprs = [compiler.sort_expr(k) for k in query.sort]
        keys = [*sort_exprs, (R.c.rid, False)]
        stmt = self._current_select().add_columns(*(e for e, _ in sort_exprs))
        stmt = stmt.where(*base_filter, *where)
        if query.after is not None:
            if len(query.after) != len(keys):
                raise InvalidRequest("the paging cursor does not fit this search")
            stmt = stmt.where(_keyset_after(keys, query.after))
        stmt = stmt.order_by(*(e.desc() if d else e.asc() for e, d in keys)).limit(query.count + 1)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
            total = None
            if query.total:
                cstmt = select(func.count()).select_from(R).where(*base_filter, *where)
                total = int(conn.execute(cstmt).scalar_one())
        more = len(rows) > query.count
        rows = rows[: query.count]
        items = [self._row(r) for r in rows]
        next_after: list[object] | None = None
        if more and rows:
            last = rows[-1]
            n_base = len(self._COLS) + 1
            next_after = [last[n_base + i] for i in range(len(sort_exprs))] + [last.rid]
        return Page(items=items, next_after=next_after, total=total)

    def references_from(
        self, rids: Sequence[int], params: Sequence[tuple[str, str]] | None
    ) -> list[tuple[str, str]]:
        """Distinct (type, id) targets referenced by ``rids`` through the given params."""
        if not rids:
            return []
        if self._lean is not None:
            pids = [] if params is None else self._param_ids(params)
            found: dict[tuple[str, str], None] = {}
            for chunk in _chunks(list(rids), 400):
                sql = _REFERENCES_SQL.format(
                    rids=",".join("?" * len(chunk)),
                    pids=f" AND pid IN ({','.join('?' * len(pids))})" if params is not None else "",
                )
                found.update(
                    dict.fromkeys((t, i) for t, i in self._lean.rows(sql, [*chunk, *pids]))
                )
            return list(found)
        x = s.idx_reference
        stmt = select(x.c.target_type, x.c.target_id).where(x.c.rid.in_(list(rids)))
        if params is not None:
            stmt = stmt.where(x.c.pid.in_([param_id(t, p) for t, p in params]))
        stmt = stmt.where(x.c.target_type != "").distinct()
        with self._read() as conn:
            return [(r.target_type, r.target_id) for r in conn.execute(stmt)]

    def _param_ids(self, params: Sequence[tuple[str, str]]) -> list[int]:
        """The parameter ids of (type, param) pairs; a recurring tuple of them (a compartment's
        links) is looked up by identity."""
        ids = self._pid_lists.get("", params)
        if ids is None:
            ids = self._pid_lists.put([param_id(t, p) for t, p in params], "", params)
        return ids

    def referencing(
        self, targets: Sequence[tuple[str, str]], source_type: str, param: str | None, limit: int
    ) -> list[StoredResource]:
        """Current resources of ``source_type`` pointing at any of ``targets`` via ``param``."""
        if not targets:
            return []
        x = s.idx_reference
        sub = select(x.c.rid).where(
            or_(
                *(
                    and_(x.c.target_type == rtype, x.c.target_id.in_(ids))
                    for rtype, ids in _by_type(targets).items()
                )
            )
        )
        if param is not None:
            sub = sub.where(x.c.pid == param_id(source_type, param))
        stmt = (
            self._current_select()
            .where(R.c.rtype == source_type, R.c.deleted == false(), R.c.rid.in_(sub))
            .order_by(R.c.rid)
            .limit(limit)
        )
        with self._read() as conn:
            return [self._row(r) for r in conn.execute(stmt)]

    # --- outbox ----------------------------------------------------------------------------

    def outbox_read(self, consumer: str, limit: int) -> list[OutboxEvent]:
        """Events after the consumer's offset, in order, never past an open gap.

        A gap in the sequence means a transaction took a number and has not committed (it may
        still) or rolled back (it never will). SQLite has one writer and reuses numbers after a
        rollback, so it has no gaps. On PostgreSQL the reader notes the newest transaction id
        when it first meets a gap; once every transaction up to that id has ended and the number
        is still missing, its owner rolled back and the gap is passed. No clock is involved, so
        a slow transaction is waited for however long it takes.
        """
        o = s.outbox
        with self._read() as conn:
            xmin_before = self._snapshot(conn, "xmin")
            last = conn.execute(
                select(s.outbox_offsets.c.last_seq).where(s.outbox_offsets.c.consumer == consumer)
            ).scalar()
            last = int(last or 0)
            rows = conn.execute(
                select(o).where(o.c.seq > last).order_by(o.c.seq).limit(limit)
            ).all()
            xmax_after = self._snapshot(conn, "xmax")
        out: list[OutboxEvent] = []
        expected = last + 1
        for r in rows:
            if r.seq != expected and self.dialect == "postgresql":
                mark = self._gap_marks.get((consumer, expected))
                if mark is None or xmin_before < mark:
                    self._gap_marks.setdefault((consumer, expected), xmax_after)
                    break  # the missing number's transaction may still be running
                self._gap_marks.pop((consumer, expected), None)
            out.append(OutboxEvent(r.seq, r.rtype, r.id, r.version, r.op, r.created))
            expected = r.seq + 1
        return out

    def _snapshot(self, conn: Connection, edge: str) -> int:
        """PostgreSQL's current snapshot xmin/xmax (0 on SQLite)."""
        if self.dialect != "postgresql":
            return 0
        sql = f"SELECT pg_snapshot_{edge}(pg_current_snapshot())::text::bigint"
        return int(conn.exec_driver_sql(sql).scalar_one())

    def outbox_ack(self, consumer: str, seq: int) -> None:
        """Move the consumer's offset to ``seq`` (never backwards)."""
        t = s.outbox_offsets
        with self.transaction() as tx:
            conn = tx.conn
            cur = conn.execute(select(t.c.last_seq).where(t.c.consumer == consumer)).scalar()
            if cur is None:
                conn.execute(insert(t).values(consumer=consumer, last_seq=seq, updated=now_us()))
            elif seq > cur:
                conn.execute(
                    update(t).where(t.c.consumer == consumer).values(last_seq=seq, updated=now_us())
                )

    def outbox_behind(self, consumer: str) -> tuple[int, int | None]:
        """(acknowledged seq, when the oldest event after it was committed, in µs; None
        when the consumer has caught up)."""
        o = s.outbox
        with self._read() as conn:
            acked = conn.execute(
                select(s.outbox_offsets.c.last_seq).where(s.outbox_offsets.c.consumer == consumer)
            ).scalar()
            acked = int(acked or 0)
            oldest = conn.execute(
                select(o.c.created).where(o.c.seq > acked).order_by(o.c.seq).limit(1)
            ).scalar()
        return acked, None if oldest is None else int(oldest)

    def change_marker(self, resource_type: str) -> tuple[int, int]:
        """(newest rid of the type, newest last_updated), from the ends of two indexes. On
        SQLite the answer is remembered until the database changes (:meth:`_LeanReads.marker`,
        a few microseconds to ask), so a read-mostly hub rarely runs the query."""
        if self._lean is not None:
            return self._lean.marker(resource_type)
        with self._read() as conn:
            row = conn.execute(_CHANGE_MARKER, {"rtype": resource_type}).one()
        return int(row[0] or 0), int(row[1] or 0)

    def outbox_position(self, consumer: str) -> tuple[int, int]:
        """(acknowledged seq, newest seq)."""
        with self._read() as conn:
            acked = conn.execute(
                select(s.outbox_offsets.c.last_seq).where(s.outbox_offsets.c.consumer == consumer)
            ).scalar()
            newest = conn.execute(select(func.max(s.outbox.c.seq))).scalar()
        return int(acked or 0), int(newest or 0)


def _by_type(refs: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """(type, id) pairs → ids per type, each once, in their first order."""
    out: dict[str, list[str]] = {}
    for rtype, rid in dict.fromkeys(refs):
        out.setdefault(rtype, []).append(rid)
    return out


class SqlWriteTx:
    """Writes inside one database transaction (see :class:`hie.hub.store.port.WriteTx`)."""

    def __init__(self, store: SqlResourceStore, conn: Connection) -> None:
        self.store = store
        self.conn = conn
        self._rids: dict[tuple[str, str], int] = {}
        self.identity = SqlIdentityIndex(conn)

    def current(
        self, resource_type: str, id: str, *, for_update: bool = True
    ) -> StoredResource | None:
        """Current version inside the transaction (row-locked on PostgreSQL)."""
        locked = for_update and self.store.dialect == "postgresql"
        stmt = _CURRENT_LOCKED if locked else _CURRENT
        row = self.conn.execute(stmt, {"rtype": resource_type, "id": id}).first()
        if row is None:
            return None
        self._rids[(resource_type, id)] = row.rid
        return self.store._row(row)

    def lock(self, name: str) -> None:
        """See :meth:`hie.hub.store.port.WriteTx.lock`. PostgreSQL: an advisory transaction
        lock on the name's 64-bit hash (READ COMMITTED: the look-up after it sees what the
        other writer committed). SQLite: its writers are serial already (BEGIN IMMEDIATE)."""
        if self.store.dialect == "postgresql":
            self.conn.execute(_ADVISORY_LOCK, {"name": name})

    def write(self, new: NewVersion, version: int, last_updated: int) -> StoredResource:
        """Store one version; version 1 inserts the logical resource."""
        key = (new.resource_type, new.id)
        deleted = new.content is None
        if version == 1 and key not in self._rids:
            rid = self.conn.execute(
                _INSERT_RESOURCE,
                {
                    "rtype": new.resource_type,
                    "id": new.id,
                    "version": 1,
                    "last_updated": last_updated,
                    "deleted": deleted,
                    "owner": new.owner,
                },
            ).scalar_one()
            self._rids[key] = rid
        else:
            rid = (
                self._rids.get(key)
                or self.conn.execute(
                    select(R.c.rid).where(R.c.rtype == new.resource_type, R.c.id == new.id)
                ).scalar_one()
            )
            res = self.conn.execute(
                update(R)
                .where(R.c.rid == rid, R.c.version == version - 1)
                .values(version=version, last_updated=last_updated, deleted=deleted)
            )
            if res.rowcount != 1:
                raise VersionConflict(
                    f"{new.resource_type}/{new.id} changed concurrently; re-read and retry"
                )
            for table in s.INDEX_TABLES.values():
                self.conn.execute(delete(table).where(table.c.rid == rid))
        self.conn.execute(
            _INSERT_HISTORY,
            {
                "rid": rid,
                "version": version,
                "last_updated": last_updated,
                "method": new.method,
                "content": new.content,
            },
        )
        if not deleted:
            self._insert_index([(rid, new)])
        op = "delete" if deleted else ("create" if version == 1 else "update")
        self.conn.execute(
            _INSERT_OUTBOX,
            {
                "rtype": new.resource_type,
                "id": new.id,
                "version": version,
                "op": op,
                "created": last_updated,
            },
        )
        return StoredResource(
            new.resource_type, new.id, version, last_updated, deleted, new.content, new.method, rid
        )

    def write_many(
        self, items: Sequence[tuple[NewVersion, int]], last_updated: int
    ) -> list[StoredResource]:
        """Bulk write; creates are batched, other versions go through :meth:`write`."""
        out: list[StoredResource] = []
        creates = [n for n, v in items if v == 1 and (n.resource_type, n.id) not in self._rids]
        created = {id(n) for n in creates}
        others = [(n, v) for n, v in items if id(n) not in created]
        if creates:
            rids = self._insert_resources(creates, last_updated)
            pairs = list(zip(rids, creates, strict=True))
            self.conn.execute(
                insert(H),
                [
                    {
                        "rid": rid,
                        "version": 1,
                        "last_updated": last_updated,
                        "method": n.method,
                        "content": n.content,
                    }
                    for rid, n in pairs
                ],
            )
            self._insert_index([(rid, n) for rid, n in pairs if n.content is not None])
            self.conn.execute(
                insert(s.outbox),
                [
                    {
                        "rtype": n.resource_type,
                        "id": n.id,
                        "version": 1,
                        "op": "create",
                        "created": last_updated,
                    }
                    for n in creates
                ],
            )
            for rid, n in pairs:
                self._rids[(n.resource_type, n.id)] = rid
                out.append(
                    StoredResource(
                        n.resource_type, n.id, 1, last_updated, False, n.content, n.method, rid
                    )
                )
        for n, v in others:
            out.append(self.write(n, v, last_updated))
        return out

    def _insert_resources(self, creates: Sequence[NewVersion], last_updated: int) -> list[int]:
        """Insert the ``resources`` rows of new resources; their rids, in order.

        SQLite: this transaction is the only writer (``BEGIN IMMEDIATE``), so the rids are
        the next ones after the largest, as SQLite itself would number them, and the rows go
        in with one ``executemany``. SQLAlchemy inserts one row per statement there when
        asked to return the rids in order (a lab message creates 14)."""
        rows = [
            (n.resource_type, n.id, 1, last_updated, n.content is None, n.owner) for n in creates
        ]
        if self.store.dialect == "sqlite":
            top = int(self.conn.exec_driver_sql("SELECT max(rid) FROM resources").scalar() or 0)
            rids = list(range(top + 1, top + 1 + len(rows)))
            self.conn.exec_driver_sql(
                "INSERT INTO resources (rid, rtype, id, version, last_updated, deleted, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(rid, *row) for rid, row in zip(rids, rows, strict=True)],
            )
            return rids
        cols = ("rtype", "id", "version", "last_updated", "deleted", "owner")
        return list(
            self.conn.execute(
                insert(R).returning(R.c.rid, sort_by_parameter_order=True),
                [dict(zip(cols, row, strict=True)) for row in rows],
            )
            .scalars()
            .all()
        )

    def _insert_index(self, items: Sequence[tuple[int, NewVersion]]) -> None:
        """Insert index rows with one driver-level executemany per table: this is the hot
        path of every write, and SQLAlchemy's per-row parameter processing would double it."""
        batches: dict[str, list[tuple[object, ...]]] = {k: [] for k in s.INDEX_TABLES}
        token, string, date = batches["token"], batches["string"], batches["date"]
        ref, qty, uri = batches["reference"], batches["quantity"], batches["uri"]
        for rid, new in items:
            rt = new.resource_type
            for row in new.index.rows:
                pid = param_id(rt, row.param)
                if isinstance(row, TokenRow):
                    token.append((rid, pid, _clip(row.system), _clip(row.code)))
                elif isinstance(row, ReferenceRow):
                    ref.append((rid, pid, row.target_type, _clip(row.target_id)))
                elif isinstance(row, DateRow):
                    date.append((rid, pid, row.lo, row.hi))
                elif isinstance(row, StringRow):
                    string.append((rid, pid, _clip(row.norm), _clip(row.exact)))
                elif isinstance(row, QuantityRow):
                    qty.append((rid, pid, row.value, _clip(row.system), _clip(row.code)))
                elif isinstance(row, UriRow):
                    uri.append((rid, pid, row.value[:512]))
        for kind, rows in batches.items():
            if not rows:
                continue
            if self.store.dialect == "postgresql":
                self._copy(s.INDEX_TABLES[kind].name, rows)
            else:
                self.conn.exec_driver_sql(self.store.raw_insert_sql(kind), rows)

    def _copy(self, table: str, rows: list[tuple[object, ...]]) -> None:
        """PostgreSQL ``COPY … FROM STDIN`` through the driver (several times faster than an
        INSERT per row), inside the same transaction."""
        cols = ", ".join(c.name for c in s.INDEX_TABLES_BY_NAME[table].columns)
        driver_conn: Any = self.conn.connection.driver_connection
        with driver_conn.cursor() as cur, cur.copy(f"COPY {table} ({cols}) FROM STDIN") as cp:
            for row in rows:
                cp.write_row(row)

    def search_ids(self, query: Query) -> list[tuple[str, str]]:
        """(type, id) of current resources matching ``query`` inside this transaction."""
        compiler = _Compiler(self.store.dialect, query.resource_type)
        stmt = select(R.c.rtype, R.c.id).where(R.c.deleted == false(), *compiler.where(query.conds))
        if query.resource_type:
            stmt = stmt.where(R.c.rtype == query.resource_type)
        stmt = stmt.limit(query.count)
        return [(r.rtype, r.id) for r in self.conn.execute(stmt)]

    def ids_by_token(
        self,
        resource_type: str,
        param: str,
        tokens: Sequence[tuple[str, str]],
        conds: Sequence[Condition] = (),
    ) -> dict[tuple[str, str], list[str]]:
        """Many token lookups in one query (see the port)."""
        return _ids_by_token(self.conn, self.store.dialect, resource_type, param, tokens, conds)


def _ids_by_token(
    conn: Connection,
    dialect: str,
    resource_type: str,
    param: str,
    tokens: Sequence[tuple[str, str]],
    conds: Sequence[Condition],
) -> dict[tuple[str, str], list[str]]:
    """``ids_by_token`` of the store and of a write transaction, on ``conn``."""
    out: dict[tuple[str, str], list[str]] = {t: [] for t in tokens}
    if not tokens:
        return out
    wanted = [(_clip(sys) or "", _clip(code) or "") for sys, code in tokens]
    back = dict(zip(wanted, tokens, strict=True))
    stmt = _ids_by_token_stmt(dialect, resource_type, param, tuple(conds))
    codes = sorted({c for _, c in wanted})
    for row in conn.execute(stmt, {"codes": codes}):
        key = back.get((row.system or "", row.code))
        if key is not None and row.id not in out[key]:
            out[key].append(row.id)
    return out


@functools.lru_cache(maxsize=1024)
def _ids_by_token_stmt(
    dialect: str, resource_type: str, param: str, conds: tuple[Condition, ...]
) -> Any:
    """The statement of :meth:`SqlWriteTx.ids_by_token`, built once per type, parameter and
    conditions (an MO's grant recurs in every message it sends); the codes are bound."""
    # aliased: a condition's own probe of idx_token (a negated tag) must not correlate to it
    t = s.idx_token.alias("tk")
    compiler = _Compiler(dialect, resource_type)
    return (
        select(t.c.system, t.c.code, R.c.id)
        .select_from(t.join(R, R.c.rid == t.c.rid))
        .where(
            t.c.pid == param_id(resource_type, param),
            t.c.code.in_(bindparam("codes", expanding=True)),
            R.c.rtype == resource_type,
            R.c.deleted == false(),
            *(compiler.cond(c, R, resource_type) for c in conds),
        )
    )


# Statements of the per-write hot path, built once: building and hashing a statement per
# call costs more than SQLite's execution of it.
_CURRENT = (
    select(*SqlResourceStore._COLS, H.c.method)
    .select_from(R.join(H, and_(H.c.rid == R.c.rid, H.c.version == R.c.version)))
    .where(R.c.rtype == bindparam("rtype"), R.c.id == bindparam("id"))
)
_CURRENT_LOCKED = _CURRENT.with_for_update(of=R)
# the same, for SQLite's driver directly (:class:`_LeanReads`): a point read, and live
# resources of one type by id (``read_many``; the (rtype, id) key answers both)
_CURRENT_COLUMNS = (
    "SELECT resources.rid, resources.rtype, resources.id, resource_history.version, "
    "resource_history.last_updated, resources.deleted, resource_history.content, "
    "resource_history.method FROM resources JOIN resource_history ON "
    "resource_history.rid = resources.rid AND resource_history.version = resources.version"
)
_REFERENCES_SQL = (  # references_from: distinct targets of some rows, through some params
    "SELECT DISTINCT target_type, target_id FROM idx_reference "
    "WHERE rid IN ({rids}){pids} AND target_type != ''"
)
_CURRENT_SQL = f"{_CURRENT_COLUMNS} WHERE resources.rtype = ? AND resources.id = ?"
_MANY_SQL = (
    f"{_CURRENT_COLUMNS} WHERE resources.rtype = ? AND resources.id IN ({{marks}}) "
    "AND resources.deleted = 0"
)
_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:name, 0))")
# Two single-aggregate subqueries, each answered from the end of an index (rtype, rid) and
# (rtype, last_updated): ``count(*)`` or both maxima in one SELECT read every row of the type,
# which grows with the city (a proxy's grant asks about Patient).
_CHANGE_MARKER = select(
    select(func.max(R.c.rid)).where(R.c.rtype == bindparam("rtype")).scalar_subquery(),
    select(func.max(R.c.last_updated)).where(R.c.rtype == bindparam("rtype")).scalar_subquery(),
)
_CHANGE_MARKER_SQL = (  # the same, for the driver directly (the lean reads, _LeanReads.marker)
    "SELECT (SELECT max(rid) FROM resources WHERE rtype = ?), "
    "(SELECT max(last_updated) FROM resources WHERE rtype = ?)"
)
_INSERT_RESOURCE = insert(R).returning(R.c.rid)
_INSERT_HISTORY = insert(H)
_INSERT_OUTBOX = insert(s.outbox)


def _clip(value: str | None) -> str | None:
    """Index values fit their column; NUL (which PostgreSQL text refuses) is dropped."""
    if value is None:
        return None
    return value.replace("\x00", "")[:MAX_STR] if "\x00" in value else value[:MAX_STR]


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _keyset_after(keys: list[tuple[Any, bool]], after: list[object]) -> ColumnElement[bool]:
    """Rows strictly after the cursor in the (mixed-direction) sort order."""
    ors = []
    for i, (expr, desc) in enumerate(keys):
        eqs = [k == v for (k, _), v in zip(keys[:i], after[:i], strict=True)]
        cmp = expr < after[i] if desc else expr > after[i]
        ors.append(and_(*eqs, cmp))
    return or_(*ors)


# Sentinels so NULL sort values order consistently (keyset comparisons cannot use NULL).
_LOW_INT = -(2**62)
_HIGH_INT = 2**62


class _Compiler:
    """Compiles search conditions into SQL against the ``resources`` table alias ``r``.

    The most selective condition "drives" (``rid IN (subquery)``, answered from an index in
    rid order); the others are correlated ``EXISTS`` probes on the rid index, so a search for
    one patient's results never materialises every row that matches a common code or date.
    """

    _RANK = {
        IdCond: 0,
        ReferenceCond: 1,
        CompartmentCond: 1,
        ChainCond: 2,
        TokenCond: 3,
        StringCond: 4,
        UriCond: 4,
        NumberCond: 6,
        DateCond: 7,
    }

    def __init__(self, dialect: str, resource_type: str | None) -> None:
        self.dialect = dialect
        self.rtype = resource_type

    def pid(self, param: str, rtype: str | None = None) -> int:
        t = rtype or self.rtype
        if t is None:
            raise InvalidRequest(f"search parameter {param!r} needs a resource type")
        return param_id(t, param)

    def where(
        self, conds: Sequence[Condition], r: FromClause = R, rtype: str | None = None
    ) -> list[ColumnElement[bool]]:
        driver = self._pick_driver(conds)
        return [self.cond(c, r, rtype, drive=(i == driver)) for i, c in enumerate(conds)]

    def _pick_driver(self, conds: Sequence[Condition]) -> int | None:
        best, best_rank = None, 99
        for i, c in enumerate(conds):
            if getattr(c, "negate", False):
                continue
            rank = self._RANK.get(type(c), 99)
            if isinstance(c, StringCond) and c.mode == "contains":
                rank = 99
            if isinstance(c, AnyOf) and c.conds and self._same_param_tokens(c.conds):
                rank = self._RANK[TokenCond]  # identifier=a|1,b|2: one probe of the index
            if rank < best_rank:
                best, best_rank = i, rank
        return best

    def _probe(
        self,
        table: Any,
        r: FromClause,
        drive: bool,
        *filters: ColumnElement[bool],
    ) -> ColumnElement[bool]:
        if drive:
            return r.c.rid.in_(select(table.c.rid).where(*filters))
        return exists().where(table.c.rid == r.c.rid, *filters)

    def cond(
        self, c: Condition, r: FromClause = R, rtype: str | None = None, drive: bool = False
    ) -> ColumnElement[bool]:
        rt = rtype or self.rtype
        if r is R and not drive and _of_policy(c):  # a grant: the same in every query
            clause = _POLICY_CLAUSES.get((self.dialect, rt), c)
            if clause is None:  # by value only when this condition is new to the memo
                clause = _POLICY_CLAUSES.put(
                    _policy_clause(self.dialect, c, rt), (self.dialect, rt), c
                )
            return clause
        return self._cond(c, r, rt, drive)

    def _cond(
        self, c: Condition, r: FromClause, rt: str | None, drive: bool
    ) -> ColumnElement[bool]:
        if isinstance(c, IdCond):
            if drive and rt is not None:
                # as a subquery on the (rtype, id) key: a bare ``id IN (…)`` beside an ORDER BY
                # rid let SQLite walk every resource of the type in rid order instead
                # (``_content`` + ``patient``: 35 ms at 100,000 documents)
                by_id = R.alias("by_id")
                return r.c.rid.in_(
                    select(by_id.c.rid).where(by_id.c.rtype == rt, by_id.c.id.in_(list(c.ids)))
                )
            clause = r.c.id.in_(list(c.ids))
            return not_(clause) if c.negate else clause
        if isinstance(c, TypeCond):
            return r.c.rtype.in_(list(c.types))
        if isinstance(c, LastUpdatedCond):
            return _range_compare(c.prefix, r.c.last_updated, r.c.last_updated, c.lo, c.hi)
        if isinstance(c, AnyOf):
            if not c.conds:
                return false()
            same = self._same_token(c.conds)
            if same is not None:  # code=a,b,c: one probe over the codes, not one per code
                codes = [str(getattr(x, "code", "")) for x in c.conds]
                return self._token(same, codes, r, rt, drive)
            if self._same_param_tokens(c.conds):  # identifier=sys1|a,sys2|b: one probe too
                return self._tokens_of_systems(c.conds, r, rt, drive)
            return or_(*(self.cond(x, r, rt) for x in c.conds))
        if isinstance(c, AllOf):
            return and_(*self.where(c.conds, r, rt)) if c.conds else true()
        if isinstance(c, Not):
            return not_(self.cond(c.cond, r, rt))
        if isinstance(c, OwnerCond):
            return r.c.owner == c.owner
        if isinstance(c, RelatedCond):
            return self._related(c, r, rt)
        if isinstance(c, CompartmentCond):
            x = s.idx_reference
            pids = [param_id(t, p) for t, p in c.links if rt is None or t == rt]
            owner_ids: Any = list(c.owner_ids)
            if c.expand:
                owner_ids = group_members_select(c.owner_type, c.owner_ids)
            refs = select(x.c.rid).where(
                x.c.target_id.in_(owner_ids),
                x.c.pid.in_(pids),
                x.c.target_type == c.owner_type,
            )
            if rt is not None and rt != c.owner_type:
                inside: ColumnElement[bool] = r.c.rid.in_(refs) if pids else false()
            else:
                o = R.alias("owner")
                owners = select(o.c.rid).where(o.c.rtype == c.owner_type, o.c.id.in_(owner_ids))
                # one IN over a UNION (not "owner OR member"), so both engines drive the query
                # from the two index lookups instead of scanning every resource
                inside = r.c.rid.in_(union_all(refs, owners) if pids else owners)
            return not_(inside) if c.negate else inside
        pid = self.pid(c.param, rt)
        if isinstance(c, TokenCond):
            return self._token(c, [c.code] if c.code is not None else [], r, rt, drive)
        if isinstance(c, StringCond):
            t = s.idx_string
            v = _clip(c.value) or ""
            if c.mode == "exact":
                return self._probe(t, r, drive, t.c.pid == pid, t.c.exact == v)
            if c.mode == "contains":
                return self._probe(
                    t, r, False, t.c.pid == pid, t.c.norm.like(f"%{_like_escape(v)}%", escape="\\")
                )
            if self.dialect == "sqlite":
                rng = and_(t.c.norm >= v, t.c.norm < v + "\U0010ffff")
            else:
                rng = t.c.norm.like(f"{_like_escape(v)}%", escape="\\")
            return self._probe(t, r, drive, t.c.pid == pid, rng)
        if isinstance(c, DateCond):
            t = s.idx_date
            if c.prefix == "ne":
                inner = _range_compare("eq", t.c.lo, t.c.hi, c.lo, c.hi)
                return not_(self._probe(t, r, False, t.c.pid == pid, inner))
            cmp = _range_compare(c.prefix, t.c.lo, t.c.hi, c.lo, c.hi)
            return self._probe(t, r, drive, t.c.pid == pid, cmp)
        if isinstance(c, NumberCond):
            t = s.idx_quantity
            f = [t.c.pid == pid]
            if c.code is not None:
                f.append(t.c.code == c.code)
            if c.system is not None:
                f.append(t.c.system == c.system)
            if c.prefix == "ne":
                inner = and_(t.c.value >= c.lo, t.c.value < c.hi)
                return not_(self._probe(t, r, False, *f, inner))
            return self._probe(t, r, drive, *f, _number_compare(c, t.c.value))
        if isinstance(c, ReferenceCond):
            t = s.idx_reference
            target = _clip(c.target_id) or ""
            if c.expand and c.target_type:
                f = [t.c.target_id.in_(group_members_select(c.target_type, [target]))]
            else:
                f = [t.c.target_id == target]
            f.append(t.c.pid == pid)
            if c.target_type is not None:
                f.append(t.c.target_type == c.target_type)
            return self._probe(t, r, drive, *f)
        if isinstance(c, UriCond):
            t = s.idx_uri
            m: ColumnElement[bool]
            if c.mode == "below":
                m = t.c.value.like(f"{_like_escape(c.value)}%", escape="\\")
            elif c.mode == "above":
                m = t.c.value.in_(_uri_prefixes(c.value))
            else:
                m = t.c.value == c.value
            return self._probe(t, r, drive, t.c.pid == pid, m)
        if isinstance(c, MissingCond):
            t = s.INDEX_TABLES[c.table]
            has = exists().where(t.c.rid == r.c.rid, t.c.pid == pid)
            return not_(has) if c.missing else has
        if isinstance(c, ChainCond):
            r2 = R.alias("r2")
            targets = select(r2.c.id).where(
                r2.c.rtype == c.target_type,
                r2.c.deleted == false(),
                *self.where(c.conds, r2, c.target_type),
            )
            t = s.idx_reference
            return self._probe(
                t,
                r,
                drive,
                t.c.pid == pid,
                t.c.target_type == c.target_type,
                t.c.target_id.in_(targets),
            )
        raise InvalidRequest(f"unsupported search condition {type(c).__name__}")

    @staticmethod
    def _same_token(conds: Sequence[Condition]) -> TokenCond | None:
        """The first of ``conds`` if all are plain token matches of one parameter and system."""
        first = conds[0]
        if not isinstance(first, TokenCond) or first.negate or first.code is None:
            return None
        for x in conds[1:]:
            if (
                not isinstance(x, TokenCond)
                or x.negate
                or x.code is None
                or (x.param, x.system) != (first.param, first.system)
            ):
                return None
        return first

    @staticmethod
    def _same_param_tokens(conds: Sequence[Condition]) -> bool:
        """Whether ``conds`` are plain token matches of one parameter (systems may differ)."""
        first = conds[0]
        return all(
            isinstance(x, TokenCond)
            and not x.negate
            and x.code is not None
            and isinstance(first, TokenCond)
            and x.param == first.param
            for x in conds
        )

    def _tokens_of_systems(
        self, conds: Sequence[Condition], r: FromClause, rt: str | None, drive: bool
    ) -> ColumnElement[bool]:
        """Any of several ``system|code`` of one token parameter, in one probe of the token
        index: a search for an order by its placer or filler number drives from the index
        instead of testing every row (an OR of correlated probes cannot drive)."""
        t = s.idx_token
        tokens = [x for x in conds if isinstance(x, TokenCond)]
        pid = self.pid(tokens[0].param, rt)
        pairs: list[ColumnElement[bool]] = []
        for x in tokens:
            # the parameter inside each term: SQLite then searches the index once per term
            # (with it outside the OR, it walks every row of the parameter)
            match = [t.c.pid == pid, t.c.code == _clip(x.code or "")]
            if x.system == "":
                match.append(t.c.system.is_(None))
            elif x.system is not None:
                match.append(t.c.system == _clip(x.system))
            pairs.append(and_(*match))
        return self._probe(t, r, drive, or_(*pairs))

    def _token(
        self, c: TokenCond, codes: list[str], r: FromClause, rt: str | None, drive: bool
    ) -> ColumnElement[bool]:
        """``c`` matching any of ``codes`` (none: any code)."""
        t = s.idx_token
        param: ColumnElement[Any] = t.c.pid
        if (c.negate or not drive) and c.system is None and self.dialect == "sqlite":
            # One row's tokens, any system: SQLite would search the lookup index by
            # (parameter, code) and walk every row with that code (every current document,
            # for ITI-67's status=current) once per candidate row: 105 ms instead of 0.1 ms
            # for a patient at 60,000 documents. "+ 0" keeps the probe on the rid index.
            param = t.c.pid + literal_column("0")
        f: list[ColumnElement[bool]] = [param == self.pid(c.param, rt)]
        if len(codes) == 1:
            f.append(t.c.code == _clip(codes[0]))
        elif codes:
            f.append(t.c.code.in_([_clip(x) for x in codes]))
        if c.system == "":
            f.append(t.c.system.is_(None))
        elif c.system is not None:
            f.append(t.c.system == _clip(c.system))
        if c.negate:
            return not_(self._probe(t, r, False, *f))
        return self._probe(t, r, drive, *f)

    def _related(self, c: RelatedCond, r: FromClause, rt: str | None) -> ColumnElement[bool]:
        """Row ``r`` belongs to an owner with one of ``c.via``'s relationships (correlated:
        the row's few owner references are probed, never the owners' whole record)."""
        x = s.idx_reference.alias("cx")
        # an owner's own links to other owners (Patient.link) are left out: its identity group
        # (below) already holds the records they name, and following them too made a big
        # group quadratic
        pids = [param_id(t, p) for t, p in c.links if (rt is None or t == rt) and t != c.owner_type]
        branches: list[ColumnElement[bool]] = []
        if pids:
            branches.append(
                exists().where(
                    x.c.rid == r.c.rid,
                    x.c.pid.in_(pids),
                    x.c.target_type == c.owner_type,
                    self._has_relation(c, x.c.target_id),
                )
            )
        if rt is None or rt == c.owner_type:
            own = self._has_relation(c, r.c.id)
            branches.append(own if rt is not None else and_(r.c.rtype == c.owner_type, own))
        return or_(*branches) if branches else false()

    def _has_relation(self, c: RelatedCond, owner_id: ColumnElement[Any]) -> ColumnElement[bool]:
        """Owner ``owner_id`` (or a member of its identity group) is the target of a ``via``."""
        g1, g2 = L.alias("rg1"), L.alias("rg2")
        group = (
            select(g1.c.group_id)
            .where(g1.c.rtype == c.owner_type, g1.c.id == owner_id)
            .correlate_except(g1)
        )
        members = (
            select(g2.c.id)
            .where(g2.c.rtype == c.owner_type, g2.c.group_id.in_(group))
            .correlate_except(g2, g1)
        )

        # the owner itself, then its group: two probes of the reference index, each on its
        # (target, parameter) prefix, instead of one over an OR the planners may not split
        def itself(col: ColumnElement[Any]) -> ColumnElement[bool]:
            return col == owner_id

        def its_group(col: ColumnElement[Any]) -> ColumnElement[bool]:
            return col.in_(members)

        branches = [self._via(c.owner_type, v, m) for v in c.via for m in (itself, its_group)]
        return or_(*branches) if branches else false()

    def _via(
        self,
        owner_type: str,
        v: Via,
        target: Callable[[ColumnElement[Any]], ColumnElement[bool]],
    ) -> ColumnElement[bool]:
        e = s.idx_reference.alias("ve")
        vr = R.alias("vr")
        return exists().where(
            target(e.c.target_id),
            e.c.pid == param_id(v.resource_type, v.param),
            e.c.target_type == owner_type,
            vr.c.rid == e.c.rid,
            vr.c.deleted == false(),
            # probes of this one resource (never "every open Encounter of the MO", which would
            # be materialised whole for each query)
            *(self.cond(x, vr, v.resource_type) for x in v.conds),
        )

    def sort_expr(self, key: SortKey) -> tuple[Any, bool]:
        if key.kind == "id":
            return R.c.id, key.descending
        if key.kind == "lastUpdated":
            return R.c.last_updated, key.descending
        pid = self.pid(key.param)
        agg = func.max if key.descending else func.min
        sentinel: object
        if key.kind == "date":
            t = s.idx_date
            col, sentinel = (
                (t.c.hi if key.descending else t.c.lo),
                _LOW_INT if key.descending else _HIGH_INT,
            )
        elif key.kind == "quantity":
            t = s.idx_quantity
            col, sentinel = t.c.value, _LOW_INT if key.descending else _HIGH_INT
        elif key.kind == "token":
            t = s.idx_token
            col, sentinel = t.c.code, "" if key.descending else "\U0010ffff"
        elif key.kind == "string":
            t = s.idx_string
            col, sentinel = t.c.norm, "" if key.descending else "\U0010ffff"
        else:
            t = s.idx_uri
            col, sentinel = t.c.value, "" if key.descending else "\U0010ffff"
        sub = select(agg(col)).where(t.c.rid == R.c.rid, t.c.pid == pid).scalar_subquery()
        return func.coalesce(sub, literal(sentinel)), key.descending


_DIALECTS = {"sqlite": sqlite_dialect.dialect(), "postgresql": pg_dialect.dialect()}  # type: ignore[no-untyped-call]


def _of_policy(c: Condition) -> bool:
    """Whether ``c`` is (or holds) a condition only the access policy makes: an MO's own
    records, or the records of the patients it treats."""
    if isinstance(c, OwnerCond | RelatedCond):
        return True
    if isinstance(c, AnyOf | AllOf):
        return any(_of_policy(x) for x in c.conds)
    return isinstance(c, Not) and _of_policy(c.cond)


_POLICY_CLAUSES: IdentityMemo[ColumnElement[bool]] = IdentityMemo(4096)


@functools.lru_cache(maxsize=4096)
def _policy_clause(dialect: str, c: Condition, rt: str | None) -> ColumnElement[bool]:
    """A grant's condition (:func:`_of_policy`) on the ``resources`` table. A care
    relationship is a few dozen nested subqueries whose construction costs milliseconds in
    SQLAlchemy (their execution a fraction of one), while the same MO's grant recurs in every
    query it makes. Clauses are immutable."""
    clause = _Compiler(dialect, rt)._cond(c, R, rt, False)
    # Rendered once to SQL (its values are constants: parameter ids, codes, the MO, patients
    # whose Consents close their records) and used as text: SQLAlchemy would otherwise walk
    # its subqueries for the statement's cache key on every query, which costs more than
    # running them. It is rendered inside a SELECT from ``resources`` so that its subqueries
    # stay correlated to the outer row.
    inner = select(literal(1)).select_from(R).where(clause)
    sql = str(inner.compile(dialect=_DIALECTS[dialect], compile_kwargs={"literal_binds": True}))
    where = sql.split("\nWHERE ", 1)[1]
    return text(f"({where})")  # type: ignore[return-value]


def _like_escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _uri_prefixes(v: str) -> list[str]:
    parts = v.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _range_compare(
    prefix: str, lo: ColumnElement[Any], hi: ColumnElement[Any], slo: int, shi: int
) -> ColumnElement[bool]:
    """FHIR date prefixes on a stored range [lo, hi] against a search range [slo, shi]."""
    if prefix == "eq":
        return and_(lo >= slo, hi <= shi)
    if prefix == "ne":
        return not_(and_(lo >= slo, hi <= shi))
    if prefix == "gt":
        return hi > shi
    if prefix == "lt":
        return lo < slo
    if prefix == "ge":
        return hi >= slo
    if prefix == "le":
        return lo <= shi
    if prefix == "sa":
        return lo > shi
    if prefix == "eb":
        return hi < slo
    if prefix == "ap":
        slack = max((shi - slo) // 10, 86_400_000_000)
        return and_(lo <= shi + slack, hi >= slo - slack)
    raise InvalidRequest(f"unknown prefix {prefix!r}")


def _number_compare(c: NumberCond, col: ColumnElement[Any]) -> ColumnElement[bool]:
    """FHIR number prefixes; ``eq`` honours the precision range of the search value."""
    p = c.prefix
    if p == "eq":
        return and_(col >= c.lo, col < c.hi)
    if p in ("gt", "sa"):
        return col > c.value
    if p in ("lt", "eb"):
        return col < c.value
    if p == "ge":
        return col >= c.value
    if p == "le":
        return col <= c.value
    if p == "ap":
        d = abs(c.value) * 0.1
        return and_(col >= c.value - d, col <= c.value + d)
    raise InvalidRequest(f"unknown prefix {p!r}")


__all__ = ["SqlResourceStore", "SqlWriteTx", "now_us"]
