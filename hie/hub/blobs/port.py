"""The blob store port: content-addressed, streamed storage for document bodies and DICOM files.

A blob's key is the lowercase hex SHA-256 of its bytes, so storing the same bytes twice is a
no-op and a key proves what it names. Backends (:mod:`.filesystem`, :mod:`.s3`) share the
logic written here: turning any source into bounded chunks, hashing while counting against a
size limit, checking what the sender claimed, validating keys and byte ranges.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from urllib.parse import urlsplit

from hie.hub.errors import BlobIntegrityError, BlobTooLarge, InvalidRequest, StorageError

if TYPE_CHECKING:
    from hie.hub.settings import Settings

CHUNK_SIZE = 1 << 20
"""Bytes read, hashed and written at a time: no backend ever holds a whole blob in memory."""

_KEY_RE = re.compile(r"[0-9a-f]{64}")


@runtime_checkable
class Readable(Protocol):
    """A binary file-like source: ``read(n)`` returns at most ``n`` bytes, ``b""`` at the end."""

    def read(self, size: int, /) -> bytes:
        """Read up to ``size`` bytes."""
        ...


BlobSource = bytes | bytearray | memoryview | Readable | Iterable[bytes]
"""What ``put`` accepts: bytes, a binary file-like object, or an iterable of ``bytes`` chunks."""


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """A stored blob: its key (= ``sha256``, lowercase hex) and its size in bytes."""

    key: str
    size: int
    sha256: str


class BlobStore(Protocol):
    """Content-addressed blob storage. Implementations are thread-safe."""

    def put(
        self,
        source: BlobSource,
        *,
        max_bytes: int | None = None,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> BlobInfo:
        """Stream ``source`` into the store and return where it went.

        ``source`` is ``bytes``, a binary file-like object (anything with ``read``) or an
        iterable of ``bytes`` chunks; it is consumed in chunks of :data:`CHUNK_SIZE`, never
        buffered whole. Storing bytes that are already stored is idempotent (same key).

        Raises :class:`~hie.hub.errors.BlobTooLarge` as soon as more than ``max_bytes`` have
        been read (reading stops there), :class:`~hie.hub.errors.BlobIntegrityError` when the
        bytes do not match ``expected_sha256`` / ``expected_size``, and
        :class:`~hie.hub.errors.StorageError` when the backend fails. In every failure case
        nothing is left behind: no partial blob, no temporary data.
        """
        ...

    def open(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Stream the bytes ``[start, end)`` of a blob (``end=None``: to the end) in chunks.

        ``end`` past the blob's size is clamped to it; a range that starts at or after the end
        yields nothing. Raises :class:`~hie.hub.errors.BlobNotFound` at call time (not on the
        first iteration) when there is no such blob, ``InvalidRequest`` for a malformed key or
        a negative offset. Consume the iterator fully or ``close()`` it to release resources.
        """
        ...

    def stat(self, key: str) -> BlobInfo:
        """Key and size of a stored blob; :class:`~hie.hub.errors.BlobNotFound` if missing."""
        ...

    def exists(self, key: str) -> bool:
        """Whether a blob with this key is stored."""
        ...

    def delete(self, key: str) -> None:
        """Remove a blob; deleting a missing blob is not an error."""
        ...

    def iter_keys(self) -> Iterator[str]:
        """Every stored key, for backup and verification (order unspecified)."""
        ...

    def close(self) -> None:
        """Release the backend's resources; the store is unusable afterwards."""
        ...


@contextlib.contextmanager
def os_errors(part: str, action: str) -> Iterator[None]:
    """Turn an ``OSError`` from the filesystem into a :class:`StorageError` naming the
    ``part`` of the store and the ``action`` that failed."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{part}: {action} failed: {exc.strerror or exc}") from exc


def is_key(value: object) -> bool:
    """Whether ``value`` is a well-formed blob key (64 lowercase hex digits)."""
    return isinstance(value, str) and _KEY_RE.fullmatch(value) is not None


def validate_key(key: str) -> str:
    """Return ``key`` if it is 64 lowercase hex digits, else raise ``InvalidRequest``.

    Every backend builds paths and object names from keys, so this is also what keeps
    ``../etc/passwd`` out of them.
    """
    if not is_key(key):
        raise InvalidRequest(f"invalid blob key {key!r}: expected 64 lowercase hex digits")
    return key


def validate_range(start: int, end: int | None) -> None:
    """Refuse negative offsets (``InvalidRequest``); an empty or reversed range is allowed."""
    if start < 0 or (end is not None and end < 0):
        raise InvalidRequest(f"invalid byte range [{start}, {end})")


def iter_chunks(source: BlobSource, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield ``source`` as ``bytes`` chunks of at most ``chunk_size`` (iterables: as given)."""
    if isinstance(source, str):
        raise TypeError("blob source must be bytes, not str")
    if isinstance(source, bytes) and len(source) <= chunk_size:
        if source:
            yield source
        return
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source).cast("B")
        for pos in range(0, len(view), chunk_size):
            yield bytes(view[pos : pos + chunk_size])
        return
    if isinstance(source, Readable):
        while True:
            chunk = source.read(chunk_size)
            if not chunk:
                return
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError("blob source read() must return bytes (open it in binary mode)")
            yield bytes(chunk) if not isinstance(chunk, bytes) else chunk
    else:
        for chunk in source:
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError(f"blob chunks must be bytes, got {type(chunk).__name__}")
            if chunk:
                yield bytes(chunk) if not isinstance(chunk, bytes) else chunk


class Digest:
    """Hashes and counts a blob's bytes as they pass, enforcing the caller's limits early.

    ``update`` raises :class:`BlobTooLarge` the moment the size passes ``max_bytes`` and
    :class:`BlobIntegrityError` the moment it passes ``expected_size``; ``finish`` checks the
    final size and hash against what the sender claimed.
    """

    def __init__(
        self,
        *,
        max_bytes: int | None = None,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> None:
        if expected_sha256 is not None:
            expected_sha256 = expected_sha256.lower()
            if _KEY_RE.fullmatch(expected_sha256) is None:
                raise InvalidRequest(f"invalid expected SHA-256 {expected_sha256!r}")
        if max_bytes is not None and expected_size is not None and expected_size > max_bytes:
            raise BlobTooLarge(f"blob of {expected_size} bytes exceeds the limit of {max_bytes}")
        self.max_bytes = max_bytes
        self.expected_sha256 = expected_sha256
        self.expected_size = expected_size
        self.size = 0
        self._hash = hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        """Account for the next chunk (raises before hashing it if a limit is passed)."""
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise BlobTooLarge(f"blob exceeds the limit of {self.max_bytes} bytes")
        if self.expected_size is not None and self.size > self.expected_size:
            raise BlobIntegrityError(f"blob is longer than the expected {self.expected_size} bytes")
        self._hash.update(chunk)

    def feed(self, source: BlobSource) -> Iterator[bytes]:
        """Chunks of ``source``, each accounted for by :meth:`update` before it is yielded."""
        for chunk in iter_chunks(source):
            self.update(chunk)
            yield chunk

    def finish(self) -> BlobInfo:
        """The blob's identity, after checking the expected size and hash if any were given."""
        if self.expected_size is not None and self.size != self.expected_size:
            raise BlobIntegrityError(f"blob has {self.size} bytes, expected {self.expected_size}")
        key = self._hash.hexdigest()
        if self.expected_sha256 is not None and key != self.expected_sha256:
            raise BlobIntegrityError(f"blob SHA-256 is {key}, expected {self.expected_sha256}")
        return BlobInfo(key=key, size=self.size, sha256=key)


def open_blob_store(settings: Settings) -> BlobStore:
    """The backend named by ``settings.blob_url``.

    ``file://PATH`` → :class:`~hie.hub.blobs.filesystem.FilesystemBlobStore` rooted at PATH;
    ``s3://BUCKET[/PREFIX]`` → :class:`~hie.hub.blobs.s3.S3BlobStore` on ``settings.s3_endpoint``
    (``host:port`` or a URL whose scheme decides TLS) with ``settings.s3_access_key`` /
    ``s3_secret_key``, ``settings.s3_secure``. The bucket is created if missing.
    """
    url = settings.blob_url
    if url.startswith("file://"):
        from hie.hub.blobs.filesystem import FilesystemBlobStore

        path = url.removeprefix("file://")
        if not path:
            raise ValueError("HIE_BLOB_URL file:// needs a path")
        return FilesystemBlobStore(Path(path))
    if url.startswith("s3://"):
        from hie.hub.blobs.s3 import S3BlobStore

        parts = urlsplit(url)
        if not parts.netloc:
            raise ValueError("HIE_BLOB_URL s3:// needs a bucket name")
        if not settings.s3_endpoint:
            raise ValueError("HIE_S3_ENDPOINT must be set for an s3:// blob URL")
        return S3BlobStore(
            endpoint=settings.s3_endpoint,
            bucket=parts.netloc,
            prefix=parts.path.strip("/"),
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key.get_secret_value(),
            secure=settings.s3_secure,
        )
    raise ValueError(f"unsupported HIE_BLOB_URL scheme: {url.split('://', 1)[0]!r}")
