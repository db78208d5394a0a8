"""Contract suite for the blob store port, run against the filesystem and a real S3 server.

Every test runs on both backends through the ``blob_store`` fixture (``[filesystem]`` and
``[s3]``); the S3 one talks to a SeaweedFS process started for the test worker.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hie.hub.blobs import (
    CHUNK_SIZE,
    BlobInfo,
    BlobSource,
    BlobStore,
    FilesystemBlobStore,
    open_blob_store,
)
from hie.hub.errors import (
    BlobIntegrityError,
    BlobNotFound,
    BlobTooLarge,
    InvalidRequest,
)
from hie.hub.settings import load_settings
from tests.fixtures.seaweedfs import SeaweedS3

MiB = 1 << 20
Leftovers = Callable[[], list[str]]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_all(store: BlobStore, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join(store.open(key, start, end))


def pattern(n: int, seed: bytes = b"") -> bytes:
    """``n`` deterministic, non-repeating-looking bytes."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(seed + i.to_bytes(8, "big")).digest()
        i += 1
    return bytes(out[:n])


def chunk_stream(total: int, chunk: int = MiB, seed: bytes = b"big") -> Iterator[bytes]:
    """``total`` bytes generated chunk by chunk: never more than one chunk alive (plus a block)."""
    block = bytearray(pattern(chunk, seed))
    sent = 0
    i = 0
    while sent < total:
        n = min(chunk, total - sent)
        block[:8] = i.to_bytes(8, "big")  # vary each chunk so the blob is not one block repeated
        yield bytes(block[:n]) if n < chunk else bytes(block)
        sent += n
        i += 1


def endless(chunk: int = MiB, pulled: list[int] | None = None) -> Iterator[bytes]:
    """An infinite chunk source that records how many chunks were pulled."""
    data = b"\xab" * chunk
    while True:
        if pulled is not None:
            pulled.append(1)
        yield data


# --- put / open / stat roundtrips -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "file", "chunks", "generator"])
@pytest.mark.parametrize("size", [0, 1, 1000, CHUNK_SIZE + 17, 3 * CHUNK_SIZE])
def test_roundtrip_every_source_kind(blob_store: BlobStore, kind: str, size: int) -> None:
    data = pattern(size, kind.encode())
    source: BlobSource
    if kind == "bytes":
        source = data
    elif kind == "bytearray":
        source = bytearray(data)
    elif kind == "file":
        source = io.BytesIO(data)
    elif kind == "chunks":
        source = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    else:
        source = (data[i : i + 300_000] for i in range(0, len(data), 300_000))

    info = blob_store.put(source)

    assert info == BlobInfo(key=sha(data), size=size, sha256=sha(data))
    assert blob_store.stat(info.key) == info
    assert blob_store.exists(info.key)
    assert read_all(blob_store, info.key) == data
    assert list(blob_store.iter_keys()) == [info.key]


def test_file_source_read_in_bounded_chunks(blob_store: BlobStore) -> None:
    sizes: list[int] = []

    class Recording(io.BytesIO):
        def read(self, size: int | None = -1, /) -> bytes:
            sizes.append(-1 if size is None else size)
            return super().read(size)

    data = pattern(3 * MiB + 5)
    info = blob_store.put(Recording(data))
    assert info.key == sha(data)
    assert sizes and all(0 < s <= CHUNK_SIZE for s in sizes)


def test_open_yields_bounded_chunks(blob_store: BlobStore) -> None:
    data = pattern(3 * CHUNK_SIZE + 10)
    key = blob_store.put(data).key
    chunks = list(blob_store.open(key))
    assert b"".join(chunks) == data
    assert all(len(c) <= CHUNK_SIZE for c in chunks)


def test_str_source_is_refused(blob_store: BlobStore, blob_leftovers: Leftovers) -> None:
    with pytest.raises(TypeError):
        blob_store.put("not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        blob_store.put(io.StringIO("text mode"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        blob_store.put([b"ok", "not bytes"])  # type: ignore[list-item]
    assert list(blob_store.iter_keys()) == []
    assert blob_leftovers() == []


# --- content addressing -------------------------------------------------------------------------


def test_same_bytes_same_key_idempotent(blob_store: BlobStore, blob_leftovers: Leftovers) -> None:
    data = pattern(200_000, b"same")
    first = blob_store.put(data)
    second = blob_store.put(io.BytesIO(data))
    third = blob_store.put(iter([data[:7], data[7:]]))
    assert first == second == third
    assert first.key == sha(data)
    assert list(blob_store.iter_keys()) == [first.key]
    assert read_all(blob_store, first.key) == data
    assert blob_leftovers() == []


def test_different_bytes_different_keys(blob_store: BlobStore) -> None:
    keys = {blob_store.put(pattern(1000, bytes([i]))).key for i in range(5)}
    assert len(keys) == 5
    assert sorted(blob_store.iter_keys()) == sorted(keys)


# --- ranges ---------------------------------------------------------------------------------------


def test_range_reads(blob_store: BlobStore) -> None:
    data = pattern(3 * CHUNK_SIZE + 123, b"range")
    key = blob_store.put(data).key
    n = len(data)

    assert read_all(blob_store, key, 0) == data
    assert read_all(blob_store, key, 10) == data[10:]
    assert read_all(blob_store, key, 10, 20) == data[10:20]
    assert read_all(blob_store, key, 0, 1) == data[:1]
    # across chunk boundaries
    lo, hi = CHUNK_SIZE - 10, 2 * CHUNK_SIZE + 10
    assert read_all(blob_store, key, lo, hi) == data[lo:hi]
    # the last byte, and an end past the size (clamped)
    assert read_all(blob_store, key, n - 1) == data[-1:]
    assert read_all(blob_store, key, n - 5, n + 1000) == data[-5:]
    assert read_all(blob_store, key, 0, n + 1) == data
    # empty ranges: start at/after the end, start == end, reversed
    assert read_all(blob_store, key, n) == b""
    assert read_all(blob_store, key, n + 10) == b""
    assert read_all(blob_store, key, 5, 5) == b""
    assert read_all(blob_store, key, 9, 3) == b""


def test_range_on_empty_blob(blob_store: BlobStore) -> None:
    key = blob_store.put(b"").key
    assert key == sha(b"")
    assert read_all(blob_store, key) == b""
    assert read_all(blob_store, key, 0, 10) == b""
    assert read_all(blob_store, key, 3) == b""


def test_negative_range_refused(blob_store: BlobStore) -> None:
    key = blob_store.put(b"abc").key
    with pytest.raises(InvalidRequest):
        blob_store.open(key, -1)
    with pytest.raises(InvalidRequest):
        blob_store.open(key, 0, -1)


def test_abandoned_reads_release_resources(blob_store: BlobStore) -> None:
    data = pattern(3 * CHUNK_SIZE, b"abandon")
    key = blob_store.put(data).key
    # start and drop many reads part-way (S3: connections must go back to the pool)
    for _ in range(40):
        it = blob_store.open(key)
        next(it)
        close = getattr(it, "close", None)
        if close is not None:
            close()
    for _ in range(20):
        blob_store.open(key)  # never iterated
    assert read_all(blob_store, key) == data


# --- missing keys, deletes -----------------------------------------------------------------------


def test_unknown_key_not_found(blob_store: BlobStore) -> None:
    key = sha(b"never stored")
    with pytest.raises(BlobNotFound):
        blob_store.open(key)  # raised at call time, before any iteration
    with pytest.raises(BlobNotFound):
        blob_store.open(key, 5, 10)
    with pytest.raises(BlobNotFound):
        blob_store.open(key, 5, 5)
    with pytest.raises(BlobNotFound):
        blob_store.stat(key)
    assert not blob_store.exists(key)


def test_delete_is_idempotent(blob_store: BlobStore) -> None:
    keep = blob_store.put(b"keep").key
    gone = blob_store.put(b"gone").key
    blob_store.delete(gone)
    blob_store.delete(gone)
    blob_store.delete(sha(b"never stored"))
    assert not blob_store.exists(gone)
    with pytest.raises(BlobNotFound):
        blob_store.open(gone)
    assert list(blob_store.iter_keys()) == [keep]
    # and it can be stored again
    assert blob_store.put(b"gone").key == gone
    assert read_all(blob_store, gone) == b"gone"


@pytest.mark.parametrize(
    "bad",
    [
        "../etc/passwd",
        "../../" + "a" * 58,
        "/etc/passwd",
        "",
        "A" * 64,
        "a" * 63,
        "a" * 65,
        "g" * 64,
        "ab/cd/" + "a" * 58,
        "a" * 63 + "\n",
    ],
)
def test_invalid_key_rejected(blob_store: BlobStore, bad: str) -> None:
    with pytest.raises(InvalidRequest):
        blob_store.open(bad)
    with pytest.raises(InvalidRequest):
        blob_store.stat(bad)
    with pytest.raises(InvalidRequest):
        blob_store.exists(bad)
    with pytest.raises(InvalidRequest):
        blob_store.delete(bad)


# --- limits and integrity: refused puts leave nothing behind -------------------------------


def test_max_bytes_exceeded_stops_reading(blob_store: BlobStore, blob_leftovers: Leftovers) -> None:
    before = blob_store.put(b"already here").key
    pulled: list[int] = []
    with pytest.raises(BlobTooLarge):
        blob_store.put(endless(MiB, pulled), max_bytes=3 * MiB)
    # the 4th chunk crosses the limit: nothing after it is read (the source is endless)
    assert len(pulled) == 4
    assert list(blob_store.iter_keys()) == [before]
    assert blob_leftovers() == []


@pytest.mark.parametrize("kind", ["bytes", "file", "chunks"])
def test_max_bytes_boundary(blob_store: BlobStore, blob_leftovers: Leftovers, kind: str) -> None:
    data = pattern(CHUNK_SIZE + 100, b"limit")

    def source(d: bytes) -> object:
        return {"bytes": d, "file": io.BytesIO(d), "chunks": iter([d[:10], d[10:]])}[kind]

    info = blob_store.put(source(data), max_bytes=len(data))  # type: ignore[arg-type]
    assert info.size == len(data)
    with pytest.raises(BlobTooLarge):
        blob_store.put(source(data + b"!"), max_bytes=len(data))  # type: ignore[arg-type]
    assert list(blob_store.iter_keys()) == [info.key]
    assert blob_leftovers() == []


def test_max_bytes_exceeded_mid_stream(blob_store: BlobStore, blob_leftovers: Leftovers) -> None:
    # past several 5 MiB parts, so an S3 multipart upload is under way when the limit hits
    with pytest.raises(BlobTooLarge):
        blob_store.put(chunk_stream(30 * MiB), max_bytes=12 * MiB + 1)
    assert list(blob_store.iter_keys()) == []
    assert blob_leftovers() == []


def test_expected_size_larger_than_limit_refused_up_front(
    blob_store: BlobStore, blob_leftovers: Leftovers
) -> None:
    pulled: list[int] = []
    with pytest.raises(BlobTooLarge):
        blob_store.put(endless(MiB, pulled), max_bytes=MiB, expected_size=2 * MiB)
    assert pulled == []
    assert blob_leftovers() == []


def test_expected_hash_and_size_match(blob_store: BlobStore) -> None:
    data = pattern(5000, b"expect")
    info = blob_store.put(data, expected_sha256=sha(data).upper(), expected_size=len(data))
    assert info.key == sha(data)


@pytest.mark.parametrize(
    "expected",
    [
        {"expected_sha256": sha(b"something else")},
        {"expected_size": 4999},
        {"expected_size": 5001},
        {"expected_size": 5000, "expected_sha256": sha(b"x")},
    ],
    ids=["hash", "size-shorter", "size-longer", "size-ok-hash-wrong"],
)
def test_integrity_mismatch_leaves_nothing(
    blob_store: BlobStore, blob_leftovers: Leftovers, expected: dict[str, object]
) -> None:
    data = pattern(5000, b"expect")
    with pytest.raises(BlobIntegrityError):
        blob_store.put(io.BytesIO(data), **expected)  # type: ignore[arg-type]
    assert list(blob_store.iter_keys()) == []
    assert not blob_store.exists(sha(data))
    assert blob_leftovers() == []


def test_integrity_mismatch_does_not_touch_existing_blob(
    blob_store: BlobStore, blob_leftovers: Leftovers
) -> None:
    data = pattern(5000, b"existing")
    info = blob_store.put(data)
    with pytest.raises(BlobIntegrityError):
        blob_store.put(data, expected_size=1)
    assert blob_store.stat(info.key) == info
    assert read_all(blob_store, info.key) == data
    assert blob_leftovers() == []


def test_resend_with_expected_hash(blob_store: BlobStore, blob_leftovers: Leftovers) -> None:
    data = pattern(CHUNK_SIZE * 2 + 1, b"resend")
    info = blob_store.put(data)
    # the same bytes again, announced by hash: accepted
    again = blob_store.put(io.BytesIO(data), expected_sha256=info.key, expected_size=info.size)
    assert again == info
    # different bytes claiming that hash: refused, the stored blob untouched
    with pytest.raises(BlobIntegrityError):
        blob_store.put(data[:-1] + b"?", expected_sha256=info.key)
    with pytest.raises(BlobIntegrityError):
        blob_store.put(data + b"!", expected_sha256=info.key)
    assert list(blob_store.iter_keys()) == [info.key]
    assert read_all(blob_store, info.key) == data
    assert blob_leftovers() == []


def test_invalid_expected_hash_refused(blob_store: BlobStore) -> None:
    with pytest.raises(InvalidRequest):
        blob_store.put(b"x", expected_sha256="../not-a-hash")


def test_failing_source_leaves_nothing(blob_store: BlobStore, blob_leftovers: Leftovers) -> None:
    class Broken(OSError):
        """The source's own I/O error: it must not turn into a StorageError."""

    def source() -> Iterator[bytes]:
        yield pattern(2 * MiB)
        yield pattern(4 * MiB, b"more")
        raise Broken("client went away")

    with pytest.raises(Broken):
        blob_store.put(source())
    assert list(blob_store.iter_keys()) == []
    assert blob_leftovers() == []


# --- streaming: a large blob in and out without buffering it --------------------------------


def test_large_blob_streams_in_bounded_memory(blob_store: BlobStore) -> None:
    total = 64 * MiB
    expected = hashlib.sha256()
    for chunk in chunk_stream(total):
        expected.update(chunk)
    if isinstance(blob_store, FilesystemBlobStore):
        limit = 16 * MiB
    else:
        from hie.hub.blobs.s3 import PART_SIZE

        # minio's put_object (length=-1) holds the part it is sending while it assembles the
        # next one by concatenation: about three parts at its peak, whatever the blob's size.
        limit = 4 * PART_SIZE

    tracemalloc.start()
    try:
        info = blob_store.put(chunk_stream(total))
        _, put_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        got = hashlib.sha256()
        size = 0
        for chunk in blob_store.open(info.key):
            got.update(chunk)
            size += len(chunk)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert info.key == expected.hexdigest() == got.hexdigest()
    assert info.size == size == total
    assert put_peak < limit, f"put peaked at {put_peak / MiB:.1f} MiB"
    assert read_peak < 8 * MiB, f"read peaked at {read_peak / MiB:.1f} MiB"


# --- concurrency ------------------------------------------------------------------------------


def test_concurrent_puts_from_threads(blob_store: BlobStore, blob_leftovers: Leftovers) -> None:
    # 12 threads, 6 distinct blobs: each stored by two threads at once
    blobs = [pattern(300_000 + i * 1000, bytes([i])) for i in range(6)]
    results: dict[int, BlobInfo] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(12)

    def work(n: int) -> None:
        data = blobs[n % 6]
        try:
            barrier.wait()
            results[n] = blob_store.put(iter([data[:1000], data[1000:]]))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert {n: r.key for n, r in results.items()} == {n: sha(blobs[n % 6]) for n in range(12)}
    assert sorted(blob_store.iter_keys()) == sorted(sha(b) for b in blobs)
    for data in blobs:
        assert read_all(blob_store, sha(data)) == data
    assert blob_leftovers() == []


def test_concurrent_reads_from_threads(blob_store: BlobStore) -> None:
    data = pattern(2 * MiB + 3, b"reads")
    key = blob_store.put(data).key
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for _ in range(3):
                assert (
                    read_all(blob_store, key, n * 1000, n * 1000 + MiB)
                    == data[n * 1000 : n * 1000 + MiB]
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


# --- backend specifics ------------------------------------------------------------------------


def test_filesystem_layout_and_atomic_writes(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    data = b"layout"
    key = store.put(data).key
    path = tmp_path / "blobs" / "sha256" / key[:2] / key[2:4] / key
    assert store.path(key) == path
    assert path.read_bytes() == data
    assert os.listdir(tmp_path / "blobs" / "tmp") == []
    # a damaged copy (wrong size) is replaced by the next put of the same bytes
    path.write_bytes(b"lay")
    store.put(data)
    assert path.read_bytes() == data
    # stray files in the fan-out directories are not reported as keys
    (path.parent / "junk.txt").write_bytes(b"")
    assert list(store.iter_keys()) == [key]


def test_filesystem_sweeps_only_stale_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    FilesystemBlobStore(root)
    stale, fresh = root / "tmp" / "put-stale.part", root / "tmp" / "put-fresh.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(stale, (1, 1))
    FilesystemBlobStore(root)
    assert sorted(os.listdir(root / "tmp")) == ["put-fresh.part"]


def test_s3_creates_missing_bucket(seaweedfs: SeaweedS3, tmp_path: Path) -> None:
    from minio import Minio

    client = seaweedfs.client()
    assert isinstance(client, Minio)
    bucket = "hie-test-created"
    settings = load_settings(
        data_dir=tmp_path,
        blob_url=f"s3://{bucket}",
        s3_endpoint=f"http://{seaweedfs.endpoint}",  # URL form: the scheme decides TLS
        s3_access_key=seaweedfs.access_key,
        s3_secret_key=seaweedfs.secret_key,
        s3_secure=True,
    )
    store = open_blob_store(settings)
    try:
        assert client.bucket_exists(bucket)
        info = store.put(b"in a new bucket")
        names = [o.object_name for o in client.list_objects(bucket, recursive=True)]
        assert names == [f"sha256/{info.key}"]
        assert read_all(store, info.key) == b"in a new bucket"
        open_blob_store(settings).close()  # an existing bucket is fine too
        store.delete(info.key)
    finally:
        store.close()


def test_factory_refuses_unknown_urls(tmp_path: Path) -> None:
    for url in ("ftp://x", "s3://", "file://"):
        with pytest.raises(ValueError):
            open_blob_store(load_settings(data_dir=tmp_path, blob_url=url))
    with pytest.raises(ValueError):
        open_blob_store(load_settings(data_dir=tmp_path, blob_url="s3://bucket", s3_endpoint=""))


def test_factory_default_is_filesystem_under_data_dir(tmp_path: Path) -> None:
    store = open_blob_store(load_settings(data_dir=tmp_path))
    assert isinstance(store, FilesystemBlobStore)
    assert store.root == (tmp_path / "blobs").resolve()
