"""The filesystem blob store's write-ahead journal (hie.hub.blobs.journal): blobs durable by
one synced append, readable at once from any process, written into the store by checkpoints,
and taken back after a crash."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from hie.hub.blobs.filesystem import FilesystemBlobStore
from hie.hub.blobs.journal import (
    JOURNAL_DIR,
    BlobJournal,
    JournalBusy,
    find_pending,
    open_journal,
)
from hie.hub.errors import BlobNotFound

MB = 1 << 20


def blob(i: int, size: int = 100_000) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (size // 32) + str(i).encode()


def key_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def crash(journal: BlobJournal) -> None:
    """What a killed process leaves: its files closed, no checkpoint, the lock released."""
    for seg in [journal._active, *journal._free, *journal._closed]:
        os.close(seg.fd)
    os.close(journal._lock_fd)


@pytest.fixture
def store(tmp_path: Path) -> FilesystemBlobStore:
    return FilesystemBlobStore(tmp_path / "blobs")


def test_a_kept_blob_is_readable_at_once_from_another_store_before_its_file_exists(
    store: FilesystemBlobStore,
) -> None:
    journal = BlobJournal(store, MB)
    data = blob(1)
    info = journal.keep(data)
    assert info.key == key_of(data) and info.size == len(data)
    assert not store.path(info.key).exists()  # no file yet: the journal holds it
    other = FilesystemBlobStore(store.root)  # as an HTTP worker process sees the store
    for s in (store, other):
        assert s.exists(info.key)
        assert s.stat(info.key).size == len(data)
        assert b"".join(s.open(info.key)) == data
        assert b"".join(s.open(info.key, 10, 20)) == data[10:20]
    missing = key_of(b"never stored")
    assert not store.exists(missing)
    with pytest.raises(BlobNotFound):
        store.open(missing)
    with pytest.raises(BlobNotFound):
        store.stat(missing)
    journal.close()


def test_a_checkpoint_writes_the_files_and_voids_the_records(
    store: FilesystemBlobStore,
) -> None:
    journal = BlobJournal(store, MB)
    datas = [blob(i) for i in range(5)]
    keys = [journal.keep(d).key for d in datas]
    assert journal.checkpoint() == 5
    for k, d in zip(keys, datas, strict=True):
        assert store.path(k).read_bytes() == d
        assert find_pending(store.root, k) is None  # the segment is voided
    assert journal.checkpoint() == 0  # nothing new
    journal.close()
    # a journal opened afterwards finds nothing to take back
    assert BlobJournal(store, MB).recovered == 0


def test_close_checkpoints_what_is_written(store: FilesystemBlobStore) -> None:
    journal = BlobJournal(store, MB)
    key = journal.keep(blob(7)).key
    journal.close()
    assert store.path(key).read_bytes() == blob(7)


def test_after_a_crash_every_acknowledged_blob_is_written_back(
    store: FilesystemBlobStore,
) -> None:
    journal = BlobJournal(store, MB)
    datas = [blob(i) for i in range(25)]  # 2.5 MB: the 1 MB segments rotate
    keys = [journal.keep(d).key for d in datas]
    journal.checkpoint()
    late = [blob(i) for i in range(100, 103)]
    keys += [journal.keep(d).key for d in late]
    # the page cache lost one file, another was left with other bytes of the same size
    store.path(keys[0]).unlink()
    store.path(keys[1]).write_bytes(b"x" * len(datas[1]))
    crash(journal)
    again = BlobJournal(store, MB)
    assert again.recovered == 3  # the three after the checkpoint
    for k, d in zip(keys[25:], late, strict=True):
        assert store.path(k).read_bytes() == d
    # written before the checkpoint and lost afterwards: nothing the journal still holds
    assert not store.path(keys[0]).exists()
    again.close()


def test_a_record_torn_by_the_crash_is_not_taken_back_and_those_before_it_are(
    store: FilesystemBlobStore,
) -> None:
    journal = BlobJournal(store, MB)
    datas = [blob(i) for i in range(3)]
    keys = [journal.keep(d).key for d in datas]
    seg = journal._active
    # the last write was cut short: its bytes are not all there
    os.pwrite(seg.fd, b"\0" * 1000, seg.pos - 1000)
    crash(journal)
    again = BlobJournal(store, MB)
    assert again.recovered == 2
    assert [store.path(k).exists() for k in keys] == [True, True, False]
    again.close()


def test_a_blob_larger_than_a_quarter_segment_is_put_durably_at_once(
    store: FilesystemBlobStore,
) -> None:
    journal = BlobJournal(store, MB)
    data = blob(9, size=MB // 2)
    key = journal.keep(data).key
    assert store.path(key).read_bytes() == data
    journal.close()


def test_one_writer_per_store(store: FilesystemBlobStore) -> None:
    journal = BlobJournal(store, MB)
    with pytest.raises(JournalBusy):
        BlobJournal(FilesystemBlobStore(store.root), MB)
    assert open_journal(FilesystemBlobStore(store.root), 1) is None  # puts one by one then
    journal.close()
    assert open_journal(store, 0) is None
    started = open_journal(store, 1)
    assert started is not None
    started.close()


def test_concurrent_writers_lose_nothing(store: FilesystemBlobStore) -> None:
    journal = BlobJournal(store, 2 * MB, checkpoint_seconds=0.05)
    journal.start()
    keys: dict[str, bytes] = {}
    lock = threading.Lock()

    def write(first: int) -> None:
        for i in range(first, first + 40):
            data = blob(i, size=20_000 + i)
            k = journal.keep(data).key
            assert b"".join(store.open(k)) == data
            with lock:
                keys[k] = data

    threads = [threading.Thread(target=write, args=(n * 1000,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    journal.close()
    assert len(keys) == 160
    for k, d in keys.items():
        assert store.path(k).read_bytes() == d
    assert sorted(p.name for p in (store.root / JOURNAL_DIR).glob("*.wal"))  # reused
