"""The embedded blob store: content-addressed files under a local directory.

Layout: ``<root>/sha256/ab/cd/<key>`` for blobs, ``<root>/tmp/`` for uploads in flight. A put
streams into a fresh temporary file, fsyncs it, renames it into place atomically and fsyncs the
directory, so a crash leaves either the whole blob or none of it at the final path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from hie.hub.blobs.journal import find_pending
from hie.hub.blobs.port import (
    CHUNK_SIZE,
    BlobInfo,
    BlobSource,
    Digest,
    is_key,
    iter_chunks,
    os_errors,
    validate_key,
    validate_range,
)
from hie.hub.errors import BlobNotFound, StorageError

STALE_TEMP_SECONDS = 24 * 3600
"""Temporary files older than this are leftovers of a crashed process and are swept on open."""


_storage = functools.partial(os_errors, "blob store")


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemBlobStore:
    """:class:`~hie.hub.blobs.port.BlobStore` on a local directory (the embedded default)."""

    def __init__(self, root: Path | str) -> None:
        self._root = Path(root).absolute()
        self._objects = self._root / "sha256"
        self._tmp = self._root / "tmp"
        with _storage("creating the blob directories"):
            for d in (self._objects, self._tmp):
                d.mkdir(parents=True, exist_ok=True)
            self._sweep_stale_temp()

    @property
    def root(self) -> Path:
        """The directory holding ``sha256/`` (blobs) and ``tmp/`` (uploads in flight)."""
        return self._root

    @property
    def temp_dir(self) -> Path:
        """Where uploads in flight live until they are renamed into place."""
        return self._tmp

    def path(self, key: str) -> Path:
        """The file a blob lives in (whether or not it exists); the key is validated."""
        validate_key(key)
        return self._objects / key[0:2] / key[2:4] / key

    def put(
        self,
        source: BlobSource,
        *,
        max_bytes: int | None = None,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        durable: bool = True,
    ) -> BlobInfo:
        """Stream ``source`` into a temporary file, then rename it to its content address.

        See :meth:`hie.hub.blobs.port.BlobStore.put`. The temporary file is removed on every
        error, including a limit or integrity failure raised while reading. ``durable=False``
        skips the file's and the directories' fsyncs: for a caller that keeps the bytes
        durable elsewhere until it calls :meth:`sync` (:mod:`hie.hub.blobs.journal`).
        """
        digest = Digest(
            max_bytes=max_bytes, expected_sha256=expected_sha256, expected_size=expected_size
        )
        with _storage("creating a temporary file"):
            fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="put-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                # Errors of the source itself (a client that went away) propagate unchanged;
                # only the filesystem's own failures become StorageError.
                for chunk in digest.feed(source):
                    with _storage("writing"):
                        f.write(chunk)
                if durable:
                    with _storage("syncing"):
                        f.flush()
                        os.fsync(f.fileno())
            info = digest.finish()
            final = self.path(info.key)
            with _storage("storing"):
                if self._already_stored(final, info.size):
                    tmp.unlink()
                    return info
                if not final.parent.is_dir():
                    final.parent.mkdir(parents=True, exist_ok=True)
                    if durable:
                        _fsync_dir(final.parent.parent)
                        _fsync_dir(self._objects)
                os.replace(tmp, final)
                if durable:
                    _fsync_dir(final.parent)
            return info
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise

    def sync(self, keys: Iterable[str]) -> None:
        """Make blobs put with ``durable=False`` durable: each file, and the directories
        naming it (each directory once)."""
        dirs: set[Path] = set()
        with _storage("syncing"):
            for key in dict.fromkeys(keys):
                path = self.path(key)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:  # deleted since: nothing to keep
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                dirs.update((path.parent, path.parent.parent))
            for d in sorted(dirs, key=lambda p: -len(p.parts)):  # leaves before their parents
                _fsync_dir(d)
            if dirs:
                _fsync_dir(self._objects)

    @staticmethod
    def _already_stored(final: Path, size: int) -> bool:
        """Whether an intact copy is in place (a wrong size means damage: overwrite it)."""
        try:
            return final.stat().st_size == size
        except FileNotFoundError:
            return False

    def open(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Stream bytes ``[start, end)`` of a blob; see :meth:`~hie.hub.blobs.port.BlobStore.open`.

        The file is opened here, so a missing blob raises ``BlobNotFound`` immediately; the
        returned iterator closes it when exhausted, closed or garbage-collected.
        """
        path = self.path(key)
        validate_range(start, end)
        f: BinaryIO
        try:
            f = path.open("rb", buffering=0)
        except FileNotFoundError:
            pending = self._pending(key)
            if pending is None:
                raise BlobNotFound(f"no blob {key}") from None
            if isinstance(pending, bytes):
                return iter_chunks(pending[start:end])
            f = pending
        except OSError as exc:
            raise StorageError(f"blob store: opening {key} failed: {exc.strerror}") from exc
        return self._read_range(f, start, end)

    def _pending(self, key: str) -> bytes | BinaryIO | None:
        """A blob whose file is not in place: its bytes if the write-ahead journal holds
        them (:mod:`hie.hub.blobs.journal`), else the file after all if a checkpoint put
        it there meanwhile, else None."""
        data = find_pending(self._root, key)
        if data is not None:
            return data
        try:
            return self.path(key).open("rb", buffering=0)
        except FileNotFoundError:
            return None

    @staticmethod
    def _read_range(f: BinaryIO, start: int, end: int | None) -> Iterator[bytes]:
        with f:
            remaining = None if end is None else end - start
            if remaining is not None and remaining <= 0:
                return
            with _storage("reading"):
                f.seek(start)
            while remaining is None or remaining > 0:
                want = CHUNK_SIZE if remaining is None else min(CHUNK_SIZE, remaining)
                with _storage("reading"):
                    chunk = f.read(want)
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def stat(self, key: str) -> BlobInfo:
        """Key and size of a stored blob; ``BlobNotFound`` if missing."""
        path = self.path(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            pending = self._pending(key)
            if pending is None:
                raise BlobNotFound(f"no blob {key}") from None
            if isinstance(pending, bytes):
                return BlobInfo(key=key, size=len(pending), sha256=key)
            with pending:
                size = os.fstat(pending.fileno()).st_size
        except OSError as exc:
            raise StorageError(f"blob store: stat of {key} failed: {exc.strerror}") from exc
        return BlobInfo(key=key, size=size, sha256=key)

    def exists(self, key: str) -> bool:
        """Whether a blob with this key is stored."""
        with _storage("stat"):
            if self.path(key).is_file():
                return True
            pending = self._pending(key)
            if pending is not None and not isinstance(pending, bytes):
                pending.close()
            return pending is not None

    def delete(self, key: str) -> None:
        """Remove a blob (idempotent). Empty fan-out directories stay: puts may be using them."""
        path = self.path(key)
        with _storage("deleting"):
            try:
                path.unlink()
            except FileNotFoundError:
                return
            _fsync_dir(path.parent)

    def iter_keys(self) -> Iterator[str]:
        """Every stored key, walking ``sha256/ab/cd/`` in sorted order."""
        with _storage("listing"):
            for top in sorted(os.listdir(self._objects)):
                top_dir = self._objects / top
                if len(top) != 2 or not top_dir.is_dir():
                    continue
                for sub in sorted(os.listdir(top_dir)):
                    sub_dir = top_dir / sub
                    if len(sub) != 2 or not sub_dir.is_dir():
                        continue
                    try:
                        names = sorted(os.listdir(sub_dir))
                    except FileNotFoundError:
                        continue
                    for name in names:
                        if name.startswith(top + sub) and is_key(name):
                            yield name

    def close(self) -> None:
        """Nothing to release: every operation opens and closes its own files."""

    def _sweep_stale_temp(self) -> None:
        """Remove temporary files a crashed process left behind (only old ones: others may be
        writing into the same directory right now)."""
        cutoff = time.time() - STALE_TEMP_SECONDS
        for entry in os.scandir(self._tmp):
            with contextlib.suppress(OSError):
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)

    def __repr__(self) -> str:
        return f"FilesystemBlobStore({str(self._root)!r})"
