"""On SQLite an HTTP request's audit record is written ahead of the chain: one line appended to
``audit.db.pending`` before the answer, numbered and chained in batches afterwards. Nothing
written there is lost or chained twice — whoever chains it, whatever is torn, however the
file is started over — and every reader sees it."""

from __future__ import annotations

import asyncio
import fcntl
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from hie.hub import audit
from hie.hub.audit import AuditRecord, SqlAuditLog, open_audit_log
from hie.hub.auth import DevTokenIssuer
from hie.hub.errors import StorageError
from hie.hub.settings import Settings, load_settings
from tests.fixtures.auth import bearer
from tests.fixtures.ports import free_port


@pytest.fixture
def trails(tmp_path: Path) -> Iterator[list[SqlAuditLog]]:
    """Trails on one fresh SQLite audit database, as separate processes open them."""
    opened: list[SqlAuditLog] = []
    yield opened
    for t in opened:
        t.close()


def _open(tmp_path: Path, opened: list[SqlAuditLog], *, indexes: bool = False) -> SqlAuditLog:
    trail = open_audit_log(f"sqlite:///{tmp_path / 'hie.db'}")
    trail.migrate()
    if not indexes:  # no background chaining: the test decides who chains, and when
        trail._index_later = lambda: None  # type: ignore[method-assign]
    opened.append(trail)
    return trail


def _rec(patient: str, action: str = "R", outcome: int = 0) -> AuditRecord:
    """The record of a read of Patient/``patient`` (``action`` C, U, D: of a change)."""
    return AuditRecord(
        action=action,
        subtype="read" if action == "R" else "update",
        outcome=outcome,
        status=200 if outcome == 0 else 400,
        method="GET" if action == "R" else "PUT",
        path=f"/fhir/Patient/{patient}",
        agent="tester",
        patients=[patient],
        entities=[f"Patient/{patient}"],
    )


def _write(trail: SqlAuditLog, patient: str) -> AuditRecord:
    return asyncio.run(trail.append_async(_rec(patient)))


def _seqs(trail: SqlAuditLog, patient: str) -> list[int]:
    return [r.seq for r in trail.records(refs=[f"Patient/{patient}"])[0]]


def _pending(tmp_path: Path) -> Path:
    return tmp_path / "audit.db.pending"


@contextmanager
def _write_lock_held(tmp_path: Path, seconds: float) -> Iterator[None]:
    """Another process holds the trail's write lock for ``seconds`` from now."""
    other = os.open(tmp_path / "audit.db.lock", os.O_RDWR)
    fcntl.flock(other, fcntl.LOCK_EX)
    threading.Timer(seconds, fcntl.flock, (other, fcntl.LOCK_UN)).start()
    try:
        yield
    finally:
        os.close(other)


def test_an_answer_does_not_wait_for_the_write_lock_and_a_reader_finds_its_record(
    tmp_path: Path, trails: list[SqlAuditLog]
) -> None:
    trail = _open(tmp_path, trails)
    with _write_lock_held(tmp_path, 1.0):
        started = time.monotonic()
        rec = _write(trail, "p-busy")
        assert time.monotonic() - started < 0.8  # written ahead, past the held lock
        assert rec.seq == 0 and rec.recorded > 0
        assert b'"p-busy"' in _pending(tmp_path).read_bytes()
        found = trail.records(refs=["Patient/p-busy"])[0]  # waits for the lock, chains
        assert time.monotonic() - started >= 0.95
        assert [(r.seq, r.recorded) for r in found] == [(1, rec.recorded)]
        assert trail.verify().ok


def test_records_written_by_one_process_are_chained_by_another_in_order(
    tmp_path: Path, trails: list[SqlAuditLog]
) -> None:
    writer, reader = _open(tmp_path, trails), _open(tmp_path, trails)
    for i in range(7):
        _write(writer, f"p-{i}")
    assert reader.count() == 7
    assert [_seqs(reader, f"p-{i}") for i in range(7)] == [[i + 1] for i in range(7)]
    assert reader.count() == 7  # chained once, however many look
    assert reader.verify().ok and writer.verify().checked == 7


def test_the_background_thread_chains_what_was_written(
    tmp_path: Path, trails: list[SqlAuditLog]
) -> None:
    trail = _open(tmp_path, trails, indexes=True)
    _write(trail, "p-bg")
    deadline = time.monotonic() + 10
    with trail.engine.connect() as conn:
        while time.monotonic() < deadline:
            if conn.exec_driver_sql("SELECT count(*) FROM audit_log").scalar():
                break
            time.sleep(0.05)
        rows = conn.exec_driver_sql("SELECT seq FROM audit_log").all()
    assert [tuple(r) for r in rows] == [(1,)]


def _chained(tmp_path: Path) -> list[tuple[int, int]]:
    """(seq, audit_ref rows) of each chained record, read without chaining anything."""
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        return conn.execute(
            "SELECT l.seq, (SELECT count(*) FROM audit_ref r WHERE r.seq = l.seq) "
            "FROM audit_log l ORDER BY l.seq"
        ).fetchall()


def _wait_for(check: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_process_that_leaves_chaining_to_another_only_writes_ahead(
    tmp_path: Path, trails: list[SqlAuditLog]
) -> None:
    worker = open_audit_log(f"sqlite:///{tmp_path / 'hie.db'}", chain=False)
    worker.migrate()
    trails.append(worker)
    for i in range(3):
        _write(worker, f"p-w{i}")
    time.sleep(audit.INDEX_SECONDS * 3)
    assert worker._indexer is None and _chained(tmp_path) == []  # pending, not chained
    assert worker.unchained_bytes() == _pending(tmp_path).stat().st_size > 0
    parent = open_audit_log(f"sqlite:///{tmp_path / 'hie.db'}")
    trails.append(parent)
    parent.keep_chained()  # chains what any process writes, with no append of its own
    _wait_for(lambda: len(_chained(tmp_path)) == 3)
    assert _chained(tmp_path) == [(1, 1), (2, 1), (3, 1)]  # chained and indexed
    assert worker.unchained_bytes() == 0 == parent.unchained_bytes()
    _write(worker, "p-later")
    _wait_for(lambda: len(_chained(tmp_path)) == 4)
    assert _chained(tmp_path)[3] == (4, 1)
    assert _seqs(worker, "p-later") == [4] and worker.verify().ok


def test_served_by_several_workers_the_records_are_chained_by_the_parent_process(
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "HIE_DATA_DIR": str(tmp_path),
        "HIE_HTTP_PORT": str(port),
        "HIE_HTTP_WORKERS": "2",
        "HIE_MLLP_PORT": "0",
        "HIE_DICOM_PORT": "0",
        "HIE_LOG_LEVEL": "WARNING",
    }
    token = DevTokenIssuer(load_settings(data_dir=tmp_path)).issue("service", ttl=600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hie.cli", "serve"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _healthy(base), 60)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as c:
            patient = {"resourceType": "Patient", "id": "p-1", "name": [{"family": "Иванова"}]}
            assert c.put("/fhir/Patient/p-1", json=patient).status_code == 201
            for _ in range(6):  # over the keep-alive connection and new ones: both workers
                assert c.get("/fhir/Patient/p-1").status_code == 200
                assert httpx.get(f"{base}/fhir/Patient?_count=1").status_code == 401
        # nobody reads the trail: the workers do not chain (HIE_AUDIT_CHAIN=false), the
        # parent does, within a few INDEX_SECONDS
        _wait_for(lambda: len(_chained(tmp_path)) == 13)
        chained = _chained(tmp_path)
        assert [seq for seq, _ in chained] == list(range(1, 14))
        assert sum(refs for _, refs in chained) == 7  # the write and the reads: Patient/p-1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    trail = open_audit_log(f"sqlite:///{tmp_path / 'hie.db'}")
    try:
        assert trail.verify().ok and trail.count() == 13
    finally:
        trail.close()


def test_metrics_show_the_records_waiting_to_be_chained(
    settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from hie.fhir.app import create_app
    from hie.hub.runtime import open_hub

    settings = settings_for(None, audit_chain=False)  # nothing chains in the background
    hub = open_hub(settings)
    hub.store.migrate()
    app = create_app(settings, hub, start_worker=False)
    with TestClient(app, base_url="http://hub.test", headers=bearer(settings)) as c:

        def shown() -> float:
            lines = c.get("/metrics").text.splitlines()  # a scrape is not audited
            return float(
                next(x for x in lines if x.startswith("hie_audit_unchained_bytes ")).split()[1]
            )

        assert c.get("/fhir/Patient?_count=1").status_code == 200
        waiting = _pending(tmp_path / "var").stat().st_size
        assert waiting > 0 and shown() == waiting
        hub.audit.index_refs()  # a reader, or hie serve's own process, chains them
        assert shown() == 0

        def unreadable() -> int:
            raise StorageError("audit database is down")

        monkeypatch.setattr(hub.audit, "unchained_bytes", unreadable)
        assert math.isnan(shown())  # the rest of the scrape still answers


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_the_record_of_a_write_is_synced_to_disk_before_it_returns_and_a_reads_is_not(
    tmp_path: Path, trails: list[SqlAuditLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    trail = _open(tmp_path, trails)
    synced: list[int] = []
    monkeypatch.setattr(audit.os, "fdatasync", synced.append)
    asyncio.run(trail.append_async(_rec("p-read")))
    trail.append_ahead(_rec("p-read-too"))
    asyncio.run(trail.append_async(_rec("p-refused", "U", outcome=4)))  # nothing changed
    trail.append_ahead(_rec("p-query", "E"))  # a DICOM query, an operation
    assert synced == []
    asyncio.run(trail.append_async(_rec("p-wrote", "U")))
    assert synced == [trail._pending_fd]
    trail.append_ahead(_rec("p-wrote-too", "C"))  # MLLP, DICOM
    assert synced == [trail._pending_fd] * 2
    assert trail.count() == 6 and trail.verify().ok
    # a hub whose data is not synced (HIE_SQLITE_SYNCHRONOUS=NORMAL) syncs no record either
    loose = open_audit_log(f"sqlite:///{tmp_path / 'other' / 'hie.db'}", sync_writes=False)
    loose.migrate()
    trails.append(loose)
    asyncio.run(loose.append_async(_rec("p-loose", "D")))
    assert synced == [trail._pending_fd] * 2 and loose.count() == 1


def test_a_record_that_cannot_be_synced_refuses(
    tmp_path: Path, trails: list[SqlAuditLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    trail = _open(tmp_path, trails)

    def failing(_fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(audit.os, "fdatasync", failing)
    with pytest.raises(StorageError, match="failed a sync"):
        asyncio.run(trail.append_async(_rec("p-io", "C")))
    with pytest.raises(StorageError, match="failed a sync"):
        trail.append_ahead(_rec("p-io-too", "C"))
    asyncio.run(trail.append_async(_rec("p-fine")))  # a read's record needs no sync


def test_references_are_indexed_in_order_whichever_way_records_arrived(
    tmp_path: Path, trails: list[SqlAuditLog]
) -> None:
    """Chained records committed directly (MLLP, DICOM) wait for their references; pending
    records chained after them are indexed from the records in hand only once those are."""
    trail = _open(tmp_path, trails)
    trail.append(_rec("p-direct"))  # committed to the chain, references not yet indexed
    _write(trail, "p-ahead")
    trail.index_refs()  # backlog first, read back; then the pending records, from memory
    _write(trail, "p-later")
    _write(trail, "p-ahead")
    assert trail.index_refs() == 2  # the two just chained, in the same commit
    with trail.engine.connect() as conn:
        refs = conn.exec_driver_sql("SELECT ref, seq FROM audit_ref ORDER BY seq, ref").all()
        position = conn.exec_driver_sql("SELECT seq FROM audit_ref_position").scalar()
    assert [tuple(r) for r in refs] == [
        ("Patient/p-direct", 1),
        ("Patient/p-ahead", 2),
        ("Patient/p-later", 3),
        ("Patient/p-ahead", 4),
    ]
    assert position == 4
    assert _seqs(trail, "p-ahead") == [4, 2]  # newest first
    assert trail.verify().ok


def test_a_numbered_append_waits_in_line_and_comes_after_what_is_pending(
    tmp_path: Path, trails: list[SqlAuditLog]
) -> None:
    trail = _open(tmp_path, trails)
    _write(trail, "p-first")
    with _write_lock_held(tmp_path, 0.3):
        started = time.monotonic()
        glass = asyncio.run(trail.append_async(_rec("p-glass"), numbered=True))
        assert time.monotonic() - started >= 0.25  # it did not write past the lock
    assert glass.seq == 2  # numbered at once, after the record written before it
    assert _seqs(trail, "p-first") == [1]
    assert trail.verify().ok


def test_a_torn_line_is_skipped_and_the_record_after_it_kept(
    tmp_path: Path, trails: list[SqlAuditLog]
) -> None:
    trail = _open(tmp_path, trails)
    _write(trail, "p-before")
    with _pending(tmp_path).open("ab") as f:  # a write cut short by a full disk
        f.write(b'\n{"action":"R","subtype":"re')
    _write(trail, "p-after")
    assert trail.count() == 2
    assert _seqs(trail, "p-before") == [1] and _seqs(trail, "p-after") == [2]
    assert trail.verify().ok


def test_a_large_pending_file_starts_over_once_chained_without_loss_or_repeats(
    tmp_path: Path, trails: list[SqlAuditLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "PENDING_COMPACT", 2000)
    trail = _open(tmp_path, trails)
    for i in range(10):
        _write(trail, f"p-old-{i}")
    assert _pending(tmp_path).stat().st_size > 2000
    trail.index_refs()
    head = _pending(tmp_path).read_bytes()
    assert head.startswith(b'{"pending":') and head.count(b"\n") == 1  # only a header left
    assert trail.unchained_bytes() == 0
    for i in range(3):
        _write(trail, f"p-new-{i}")
    assert trail.count() == 13
    assert [_seqs(trail, f"p-new-{i}") for i in range(3)] == [[11], [12], [13]]
    assert _seqs(trail, "p-old-9") == [10]
    assert trail.verify().ok


def test_a_start_over_cut_short_before_its_commit_loses_nothing(
    tmp_path: Path, trails: list[SqlAuditLog]
) -> None:
    trail = _open(tmp_path, trails)
    for i in range(3):
        _write(trail, f"p-old-{i}")
    assert trail.count() == 3  # chained; the position is the end of the old file
    # the process starting the file over died after truncating it and writing the new
    # header, before committing the new position; appends went on meanwhile
    _pending(tmp_path).write_bytes(b'{"pending":"g2"}\n')
    _write(trail, "p-new")
    # the new generation's bytes all wait: its header and the record
    assert trail.unchained_bytes() == _pending(tmp_path).stat().st_size
    assert trail.count() == 4
    assert _seqs(trail, "p-new") == [4]
    assert [_seqs(trail, f"p-old-{i}") for i in range(3)] == [[1], [2], [3]]  # not again
    assert trail.verify().ok


def test_a_pending_file_that_cannot_be_written_refuses(
    tmp_path: Path, trails: list[SqlAuditLog]
) -> None:
    _pending(tmp_path).mkdir()  # not a file: every write fails
    trail = _open(tmp_path, trails)
    with pytest.raises(StorageError, match="audit trail is unavailable"):
        _write(trail, "p-lost")
    with pytest.raises(StorageError, match="pending file is unreadable"):
        trail.count()  # a reader cannot promise it sees everything: no answer
    _pending(tmp_path).rmdir()
    assert trail.count() == 0
