"""The write-ahead journal of the filesystem blob store: one synced append per blob.

Putting a file in :class:`~hie.hub.blobs.filesystem.FilesystemBlobStore` durably creates a
temporary file, renames it into a fan-out directory (creating that too, most of the time) and
fsyncs the file and the directories. On this class of disk those metadata operations queue
behind the filesystem's own journal commits, and they were the largest single wait of a
C-STORE. :meth:`BlobJournal.keep` instead appends the bytes to a segment file whose blocks
exist already and syncs that one write (``fdatasync``: no metadata to write). The blob is
then durable, and readable at once: the store's ``open``, ``stat`` and ``exists`` look in the
journal for a blob whose file is not there yet (:func:`find_pending`, in any process).

A **checkpoint** (a background thread, every ``checkpoint_seconds`` and whenever a segment
fills) writes the files of the closed segments into the store, syncs them and their
directories, and only then voids those segments for reuse (a new generation in the segment
header, synced). When a journal opens, it does the same with whatever a crash left, checking
any file already in place against its key first, before the caller takes any new work. A
record torn by the crash itself was never acknowledged; the replay of a segment stops there.

Layout (``<blob root>/journal/``): ``segment-NNNN.wal`` files of ``segment_bytes`` each,
written out with zeros when created; a 64-byte header (magic, generation), then records:
magic ``HIER``, the segment's generation, the blob's length and SHA-256 (its key), then the
bytes. Appends take one lock, so records are in order and only the last can be torn;
``journal.lock`` (``flock``) keeps a second writer off the same journal. A blob larger than
a quarter of a segment is put durably, the usual way. Only the filesystem store has a
journal: an S3 put is durable when it returns. A blob deleted while the journal still holds
it comes back at the next checkpoint (nothing deletes received DICOM files today).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hie.hub.blobs.port import BlobInfo, os_errors
from hie.hub.errors import BlobIntegrityError, StorageError
from hie.hub.logging import get_logger

if TYPE_CHECKING:
    from hie.hub.blobs.filesystem import FilesystemBlobStore

log = get_logger("hie.hub.blobs.journal")

JOURNAL_DIR = "journal"
SEGMENT_MAGIC = b"HIEJSEG1"
RECORD_MAGIC = b"HIER"
HEADER_BYTES = 64  # a segment's header: magic, generation, zero padding
_RECORD = struct.Struct("<4s16sQ32s")  # magic, generation, length, SHA-256
_ZEROS = bytes(1 << 20)
READY_SEGMENTS = 1  # segments made at open; more as writes outrun checkpoints (then reused)


_journal = functools.partial(os_errors, "blob journal")


class JournalBusy(StorageError):
    """Another process writes this journal."""


@dataclass(eq=False)
class _Segment:
    path: Path
    fd: int
    size: int
    generation: bytes = b""
    pos: int = HEADER_BYTES
    records: int = 0


def _records(fd: int, size: int) -> Iterator[tuple[str, int, int]]:
    """(key, offset of the bytes, length) of each record of a segment's generation, in
    order, up to the first that is not one (the bytes are not read or checked here)."""
    head = os.pread(fd, HEADER_BYTES, 0)
    if head[:8] != SEGMENT_MAGIC:
        return
    generation, pos = head[8:24], HEADER_BYTES
    while pos + _RECORD.size <= size:
        magic, gen, length, digest = _RECORD.unpack(os.pread(fd, _RECORD.size, pos))
        start = pos + _RECORD.size
        if magic != RECORD_MAGIC or gen != generation or start + length > size:
            return
        yield digest.hex(), start, length
        pos = start + length


def _read(fd: int, key: str, start: int, length: int) -> bytes | None:
    """A record's bytes, or None when they do not hash to its key (torn, or overwritten)."""
    data = os.pread(fd, length, start)
    return data if hashlib.sha256(data).hexdigest() == key else None


def find_pending(root: Path, key: str) -> bytes | None:
    """The bytes of blob ``key`` if a journal under ``root`` holds them (any process may
    ask; a record being overwritten does not hash right and is not returned)."""
    directory = root / JOURNAL_DIR
    try:
        paths = sorted(directory.glob("segment-*.wal"))
    except OSError:
        return None
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            for found, start, length in _records(fd, size):
                if found == key:
                    data = _read(fd, key, start, length)
                    if data is not None:
                        return data
        except OSError:
            continue
        finally:
            os.close(fd)
    return None


def open_journal(blobs: object, segment_mb: int) -> BlobJournal | None:
    """A started journal on ``blobs`` (what a crash left written first), or None:
    ``segment_mb`` 0, a store that is not the filesystem's, or another writer on it (blobs
    are then put durably one by one, as without a journal). A failed replay raises: nothing
    should be acknowledged on a store that could not take back what it acknowledged."""
    from hie.hub.blobs.filesystem import FilesystemBlobStore

    if not segment_mb or not isinstance(blobs, FilesystemBlobStore):
        return None
    try:
        journal = BlobJournal(blobs, segment_mb << 20)
    except JournalBusy as exc:
        log.warning("blobs.journal_busy", reason=exc.message)
        return None
    journal.start()
    return journal


class BlobJournal:
    """Blobs made durable by one synced append each (module docstring). One writer per
    blob root; :meth:`close` it (a checkpoint) when done."""

    def __init__(
        self,
        blobs: FilesystemBlobStore,
        segment_bytes: int = 64 << 20,
        *,
        checkpoint_seconds: float = 1.0,
    ) -> None:
        self.blobs = blobs
        self.dir = blobs.root / JOURNAL_DIR
        self.segment_bytes = max(int(segment_bytes), 1 << 20)
        self.max_blob = self.segment_bytes // 4
        self.checkpoint_seconds = checkpoint_seconds
        self._lock = threading.Lock()  # appends, rotation
        self._checkpointing = threading.Lock()  # one checkpoint at a time
        self._naming = threading.Lock()  # one segment file created at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        with _journal("opening"):
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.dir / "journal.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                raise JournalBusy(f"{self.dir} is written by another process") from None
        self._free: list[_Segment] = []
        self._closed: list[_Segment] = []  # full, awaiting their checkpoint
        self.recovered = self._recover()
        self._active = self._take_free()

    # --- writing ------------------------------------------------------------------------

    def keep(self, data: bytes) -> BlobInfo:
        """Store ``data``: durable, and readable through the store, when this returns."""
        if len(data) > self.max_blob:
            return self.blobs.put(data)
        digest = hashlib.sha256(data).digest()
        with self._lock:
            seg = self._active
            if seg.pos + _RECORD.size + len(data) > seg.size:
                seg = self._rotate()
            head = _RECORD.pack(RECORD_MAGIC, seg.generation, len(data), digest)
            with _journal("writing"):
                os.pwritev(seg.fd, [head, data], seg.pos)
                os.fdatasync(seg.fd)
            seg.pos += _RECORD.size + len(data)
            seg.records += 1
        key = digest.hex()
        return BlobInfo(key=key, size=len(data), sha256=key)

    def _rotate(self) -> _Segment:
        """The active segment is full: it awaits its checkpoint, a spare takes its place
        (called with the lock held)."""
        self._closed.append(self._active)
        self._active = self._take_free()
        self._wake.set()
        return self._active

    def _take_free(self) -> _Segment:
        if self._free:
            return self._free.pop()
        return self._new_segment()  # the checkpoints are behind: one more segment

    # --- checkpoints ----------------------------------------------------------------------

    def start(self) -> None:
        """Run checkpoints in a background thread until :meth:`close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hie-blob-journal", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.checkpoint_seconds)
            self._wake.clear()
            try:
                self.checkpoint()
            except StorageError as exc:  # the records stay; the next pass tries again
                log.error("blobs.journal_checkpoint_failed", error=exc.message)

    def checkpoint(self) -> int:
        """Write the blobs of every segment written so far into the store, durably, and
        void those segments; returns how many blobs were written."""
        with self._checkpointing:
            with self._lock:
                spare_needed = self._active.records > 0 and not self._free
            if spare_needed:  # made here, not under the lock the writers wait on
                spare = self._new_segment()
                with self._lock:
                    self._free.append(spare)
            with self._lock:
                if self._active.records:
                    self._closed.append(self._active)
                    self._active = self._take_free()
                done = list(self._closed)
            written = 0
            for seg in done:
                written += self._materialize(seg, check=False)
                self._void(seg)
                with self._lock:
                    self._closed.remove(seg)
                    self._free.append(seg)
            return written

    def _materialize(self, seg: _Segment, *, check: bool) -> int:
        """Put a segment's blobs into the store and sync them; ``check``: a file already
        in place is compared with its key first (after a crash)."""
        keys: list[str] = []
        with _journal("reading a segment"):
            for key, start, length in list(_records(seg.fd, seg.size)):
                data = os.pread(seg.fd, length, start)
                if check:
                    self._drop_damaged(key)
                try:
                    self.blobs.put(data, expected_sha256=key, durable=False)
                except BlobIntegrityError:  # torn by a crash: never acknowledged
                    break
                keys.append(key)
        self.blobs.sync(keys)
        return len(keys)

    def _drop_damaged(self, key: str) -> None:
        path = self.blobs.path(key)
        try:
            intact = hashlib.sha256(path.read_bytes()).hexdigest() == key
        except FileNotFoundError:
            return
        if not intact:
            path.unlink()

    def close(self) -> None:
        """Stop the checkpoint thread, checkpoint what is written, release the files."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self.checkpoint()
        with self._lock:
            for seg in [self._active, *self._free, *self._closed]:
                with contextlib.suppress(OSError):
                    os.close(seg.fd)
            os.close(self._lock_fd)

    # --- segments -------------------------------------------------------------------------

    def _new_segment(self) -> _Segment:
        """A segment file written out in full with zeros: its blocks exist, so later writes
        change no metadata and their ``fdatasync`` writes the data alone (allocated but
        unwritten blocks, ``posix_fallocate``, cost about half as much again on this disk)."""
        with self._naming, _journal("creating a segment"):
            taken = {p.name for p in self.dir.glob("segment-*.wal")}
            n = next(i for i in range(len(taken) + 1) if f"segment-{i:04d}.wal" not in taken)
            path = self.dir / f"segment-{n:04d}.wal"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            for pos in range(0, self.segment_bytes, len(_ZEROS)):
                os.pwrite(fd, _ZEROS[: self.segment_bytes - pos], pos)
            os.fsync(fd)
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        seg = _Segment(path, fd, self.segment_bytes)
        self._void(seg)
        return seg

    @staticmethod
    def _void(seg: _Segment) -> None:
        """A new generation in the header (synced): the segment's records no longer count."""
        generation = os.urandom(16)
        with _journal("voiding a segment"):
            os.pwrite(seg.fd, SEGMENT_MAGIC + generation, 0)
            os.fdatasync(seg.fd)
        seg.generation, seg.pos, seg.records = generation, HEADER_BYTES, 0

    def _recover(self) -> int:
        """Write what a crash left in the segments into the store (durably, checking files
        in place), then void them; returns how many blobs were written."""
        replayed = 0
        with _journal("recovering"):
            paths = sorted(self.dir.glob("segment-*.wal"))
        for path in paths:
            with _journal("recovering"):
                fd = os.open(path, os.O_RDWR)
                seg = _Segment(path, fd, os.fstat(fd).st_size)
            replayed += self._materialize(seg, check=True)
            self._void(seg)
            if seg.size == self.segment_bytes:
                self._free.append(seg)
            else:  # written with another segment size: not reused
                os.close(seg.fd)
                path.unlink()
        while len(self._free) < READY_SEGMENTS:
            self._free.append(self._new_segment())
        if replayed:
            log.warning("blobs.journal_replayed", blobs=replayed)
        return replayed
