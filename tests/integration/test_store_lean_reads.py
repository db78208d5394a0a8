"""The SQLite store's lean reads (raw read-only connections of its own, beside the engine):
they see every commit at once, never write, are not shared with a forked child, and each
remembers change markers under its own ``data_version`` while several threads read."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from hie.hub.errors import StorageError
from hie.hub.store import open_resource_store
from hie.hub.store.port import IndexRows, NewVersion
from hie.hub.store.sql import SqlResourceStore, now_us


def _store(tmp_path: Path) -> SqlResourceStore:
    store = open_resource_store(f"sqlite:///{tmp_path / 'hie.db'}")
    store.migrate()
    assert isinstance(store, SqlResourceStore)
    return store


def _put(store: SqlResourceStore, rtype: str, id: str, body: bytes) -> None:
    with store.transaction() as tx:
        cur = tx.current(rtype, id)
        version = cur.version + 1 if cur else 1
        tx.write(NewVersion(rtype, id, body, IndexRows(), "PUT"), version, now_us())


def test_a_read_sees_each_commit_of_another_store_at_once(tmp_path: Path) -> None:
    reader, writer = _store(tmp_path), _store(tmp_path)
    try:
        assert reader.read("Patient", "p1") is None
        _put(writer, "Patient", "p1", b'{"resourceType":"Patient","id":"p1"}')
        first = reader.read("Patient", "p1")
        assert first is not None and first.version == 1 and not first.deleted
        _put(writer, "Patient", "p1", b'{"resourceType":"Patient","id":"p1","active":true}')
        second = reader.read("Patient", "p1")
        assert second is not None and second.version == 2 and b"active" in (second.content or b"")
        assert [r.id for r in reader.read_many([("Patient", "p1"), ("Patient", "nope")])] == ["p1"]
    finally:
        reader.close()
        writer.close()


def test_the_lean_connections_never_write(tmp_path: Path) -> None:
    store = _store(tmp_path)
    try:
        assert store._lean is not None
        with pytest.raises(StorageError):
            store._lean.rows("DELETE FROM resources", ())
    finally:
        store.close()


def test_a_forked_child_reads_on_connections_of_its_own(tmp_path: Path) -> None:
    store = _store(tmp_path)
    try:
        _put(store, "Patient", "p1", b'{"resourceType":"Patient","id":"p1"}')
        assert store.read("Patient", "p1") is not None  # the parent now holds an idle connection
        assert store._lean is not None
        parents = list(store._lean.idle)
        assert parents
        pid = os.fork()
        if pid == 0:  # the child: reads, and must not have taken the parent's connection
            ok = store.read("Patient", "p1") is not None and not any(
                c in parents for c in store._lean.idle
            )
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert store.read("Patient", "p1") is not None  # the parent's own still work
    finally:
        store.close()


def test_markers_move_with_every_commit_whichever_connection_answers(tmp_path: Path) -> None:
    store, writer = _store(tmp_path), _store(tmp_path)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:  # keeps several lean connections busy at once
        try:
            while not stop.is_set():
                store.change_marker("Consent")
                store.read("Consent", "c0")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        seen = store.change_marker("Consent")
        for n in range(20):
            _put(writer, "Consent", f"c{n}", b'{"resourceType":"Consent"}')
            now = store.change_marker("Consent")  # asked right after the commit returned
            assert now != seen and now[0] >= seen[0], (n, seen, now)
            seen = now
    finally:
        stop.set()
        for t in threads:
            t.join()
        store.close()
        writer.close()
    assert not errors
