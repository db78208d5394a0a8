"""SQLite group commit: writers that arrive while another writes share its transaction, each
in a savepoint, and all return after the one commit. What one writer does wrong is undone for
it alone; a commit that fails fails every writer of the group; nobody returns before the data
is on disk (another connection sees it)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from hie.hub.errors import StorageError, VersionConflict
from hie.hub.store import open_resource_store
from hie.hub.store.port import IndexRows, NewVersion
from hie.hub.store.sql import SqlResourceStore, SqlWriteTx, now_us


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlResourceStore]:
    opened = open_resource_store(f"sqlite:///{tmp_path / 'hie.db'}")
    opened.migrate()
    assert isinstance(opened, SqlResourceStore)
    yield opened
    opened.close()


def _create(tx: SqlWriteTx, rid: str) -> None:
    body = b'{"resourceType":"Basic","id":"%s"}' % rid.encode()
    tx.write(NewVersion("Basic", rid, body, IndexRows(), "POST"), 1, now_us())


def _committed(path: Path, rid: str) -> bool:
    """Whether another connection (as another process would) sees ``rid``."""
    with sqlite3.connect(path) as other:
        row = other.execute(
            "SELECT 1 FROM resources WHERE rtype = 'Basic' AND id = ?", (rid,)
        ).fetchone()
    return row is not None


def _commits(store: SqlResourceStore) -> list[int]:
    counted = [0]

    @event.listens_for(store.engine, "commit")
    def _count(_conn: object) -> None:
        counted[0] += 1

    return counted


def _when_waiting(store: SqlResourceStore, n: int = 1, timeout: float = 10) -> None:
    """Return once ``n`` threads wait for the write lock."""
    deadline = time.monotonic() + timeout
    while store._waiting < n:
        assert time.monotonic() < deadline, "no writer came to wait for the lock"
        time.sleep(0.001)


def test_concurrent_writers_share_commits_and_each_returns_committed(
    store: SqlResourceStore, tmp_path: Path
) -> None:
    commits = _commits(store)
    unseen: list[str] = []
    lock = threading.Lock()

    def writer(w: int) -> None:
        for i in range(15):
            rid = f"w{w}-{i}"
            with store.transaction() as tx:
                _create(tx, rid)
                time.sleep(0.002)  # a body long enough for the others to queue behind it
            if not _committed(tmp_path / "hie.db", rid):
                with lock:
                    unseen.append(rid)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert unseen == []  # nobody went on before its commit
    with store.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT count(*) FROM resources").scalar()
    assert stored == 90
    assert 0 < commits[0] < 90  # groups formed: fewer commits than transactions


def _joined_by(
    store: SqlResourceStore, rid: str, body: Callable[[SqlWriteTx], None]
) -> BaseException | None:
    """Write ``rid`` while another thread queues behind and runs ``body`` in the same
    group; returns, when both are done, what the other thread's transaction raised."""
    raised: list[BaseException] = []

    def other() -> None:
        try:
            with store.transaction() as tx:
                body(tx)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    t = threading.Thread(target=other)
    with store.transaction() as tx:
        _create(tx, rid)
        t.start()
        _when_waiting(store)
    t.join()
    return raised[0] if raised else None


def test_a_failing_writer_is_undone_alone_and_the_group_commits(
    store: SqlResourceStore, tmp_path: Path
) -> None:
    commits = _commits(store)
    db = tmp_path / "hie.db"
    assert _joined_by(store, "kept-1", lambda tx: _create(tx, "kept-2")) is None
    assert _committed(db, "kept-1") and _committed(db, "kept-2")
    assert commits[0] == 1  # one commit for both

    def refused(tx: SqlWriteTx) -> None:
        _create(tx, "undone")
        raise ValueError("refused")

    # an id written before (a unique key violated), then an error of the writer's own
    assert isinstance(
        _joined_by(store, "kept-3", lambda tx: _create(tx, "kept-2")), VersionConflict
    )
    assert isinstance(_joined_by(store, "kept-4", refused), ValueError)
    assert _committed(db, "kept-3") and _committed(db, "kept-4")
    assert not _committed(db, "undone")
    assert commits[0] == 3


def test_a_failed_commit_fails_every_writer_of_the_group(
    store: SqlResourceStore, tmp_path: Path
) -> None:
    armed = [True]

    @event.listens_for(store.engine, "commit")
    def _fail_once(_conn: object) -> None:  # the disk fails as the group commits
        if armed[0]:
            armed[0] = False
            raise OperationalError("COMMIT", {}, sqlite3.OperationalError("disk I/O error"))

    outcome: list[BaseException] = []

    def second() -> None:
        try:
            with store.transaction() as tx:
                _create(tx, "lost-2")
        except StorageError as exc:
            outcome.append(exc)

    t = threading.Thread(target=second)
    with pytest.raises(StorageError, match="disk I/O error"), store.transaction() as tx:
        _create(tx, "lost-1")
        t.start()
        _when_waiting(store)
    t.join()
    assert len(outcome) == 1 and "disk I/O error" in str(outcome[0])
    assert not _committed(tmp_path / "hie.db", "lost-1")
    assert not _committed(tmp_path / "hie.db", "lost-2")
    with store.transaction() as tx:  # the store goes on afterwards
        _create(tx, "after")
    assert _committed(tmp_path / "hie.db", "after")
