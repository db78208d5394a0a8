"""The scale-out blob store: any S3-compatible service (MinIO, SeaweedFS, AWS) via ``minio``.

This is the only module that imports ``minio``. Objects live at ``[PREFIX/]sha256/<key>``.
Since the key is only known once every byte has been read, a put streams a multipart upload of
unknown length into ``[PREFIX/]tmp/<uuid>`` while hashing, then copies it server-side to its
content address and removes the temporary object — on success and on every failure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.error import MinioException, S3Error

from hie.hub.blobs.port import (
    CHUNK_SIZE,
    BlobInfo,
    BlobSource,
    Digest,
    is_key,
    validate_key,
    validate_range,
)
from hie.hub.errors import BlobNotFound, StorageError

PART_SIZE = 5 << 20
"""Multipart part size: S3's minimum, which keeps a put's memory to a few parts' worth."""

STALE_TEMP_SECONDS = 24 * 3600
"""Temporary objects older than this are leftovers of a crashed process, swept on open."""

_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"})


def _translate(action: str, exc: BaseException, key: str | None = None) -> BaseException:
    """The error to raise for a client failure: ``BlobNotFound`` for a missing ``key``,
    ``StorageError`` for any other S3, HTTP or network failure, anything else unchanged."""
    if isinstance(exc, S3Error):
        if key is not None and exc.code in _NOT_FOUND:
            return BlobNotFound(f"no blob {key}")
        return StorageError(f"blob store: {action} failed: {exc.code}: {exc.message}")
    if isinstance(exc, MinioException | urllib3.exceptions.HTTPError | OSError):
        return StorageError(f"blob store: {action} failed: {exc}")
    return exc


@contextlib.contextmanager
def _storage(action: str, key: str | None = None) -> Iterator[None]:
    """Map client failures to ``StorageError`` (and a missing ``key`` to ``BlobNotFound``)."""
    try:
        yield
    except Exception as exc:
        mapped = _translate(action, exc, key)
        if mapped is exc:
            raise
        raise mapped from (None if isinstance(mapped, BlobNotFound) else exc)


class _FeedReader:
    """File-like view of a chunk iterator, for ``put_object``'s ``read(n)`` calls.

    Pulling a chunk runs it through the :class:`Digest`, so a size limit stops the upload
    before the offending bytes are sent.
    """

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""
        self.source_error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        if not self._pending:
            try:
                self._pending = next(self._chunks, b"")
            except BaseException as exc:  # the caller's source (or a limit) failed, not S3
                self.source_error = exc
                raise
        if size < 0 or size >= len(self._pending):
            out, self._pending = self._pending, b""
        else:
            out, self._pending = self._pending[:size], self._pending[size:]
        return out


def _split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """``host:port`` (TLS from ``secure``) or ``http(s)://host:port`` (TLS from the scheme)."""
    if "://" not in endpoint:
        return endpoint.strip("/"), secure
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"invalid S3 endpoint {endpoint!r}")
    if parts.path.strip("/"):
        raise ValueError(f"an S3 endpoint has no path: {endpoint!r}")
    return parts.netloc, parts.scheme == "https"


class S3BlobStore:
    """:class:`~hie.hub.blobs.port.BlobStore` on an S3 bucket (created if missing)."""

    def __init__(
        self,
        *,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        secure: bool = False,
        prefix: str = "",
        region: str | None = None,
        part_size: int = PART_SIZE,
        max_connections: int = 32,
    ) -> None:
        host, tls = _split_endpoint(endpoint, secure)
        timeout = urllib3.Timeout(connect=30, read=300)
        # Our own pool (minio's default holds 10 connections): the HTTP server reads blobs
        # from many threads at once. Retries mirror minio's defaults.
        self._http = urllib3.PoolManager(
            timeout=timeout,
            maxsize=max_connections,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(
                total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        self._client = Minio(
            host,
            access_key=access_key,
            secret_key=secret_key,
            secure=tls,
            region=region,
            http_client=self._http,
        )
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._root = f"{self._prefix}/" if self._prefix else ""
        self._part_size = part_size
        self._ensure_bucket()
        self._sweep_stale_temp()

    @property
    def bucket(self) -> str:
        """The bucket holding the blobs."""
        return self._bucket

    @property
    def prefix(self) -> str:
        """Object-name prefix inside the bucket ('' for none)."""
        return self._prefix

    @property
    def temp_prefix(self) -> str:
        """Object-name prefix of uploads in flight."""
        return f"{self._root}tmp/"

    def object_name(self, key: str) -> str:
        """The object a blob lives in (whether or not it exists); the key is validated."""
        return f"{self._root}sha256/{validate_key(key)}"

    def _ensure_bucket(self) -> None:
        with _storage(f"creating bucket {self._bucket}"):
            if self._client.bucket_exists(self._bucket):
                return
            try:
                self._client.make_bucket(self._bucket)
            except S3Error as exc:
                # Another process created it between our check and our request.
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
                if not self._client.bucket_exists(self._bucket):
                    raise

    def put(
        self,
        source: BlobSource,
        *,
        max_bytes: int | None = None,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> BlobInfo:
        """Stream ``source`` to a temporary object, then copy it to its content address.

        See :meth:`hie.hub.blobs.port.BlobStore.put`. The multipart upload is aborted (by the
        client) and the temporary object removed on every error. When ``expected_sha256``
        names a blob already stored (a sender's retry), the bytes are hashed and checked but
        not uploaded again.
        """
        digest = Digest(
            max_bytes=max_bytes, expected_sha256=expected_sha256, expected_size=expected_size
        )
        if digest.expected_sha256 is not None:
            known = self._stored_size(self.object_name(digest.expected_sha256))
            if known is not None:
                return self._verify_only(source, digest, known)
        tmp_name = f"{self.temp_prefix}{uuid.uuid4().hex}"
        reader = _FeedReader(digest.feed(source))
        try:
            try:
                # length=-1: size unknown, multipart in part_size pieces; one part in flight
                # at a time so memory stays bounded by a few parts.
                self._client.put_object(
                    self._bucket,
                    tmp_name,
                    reader,  # type: ignore[arg-type]  # minio only calls read(n)
                    length=-1,
                    part_size=self._part_size,
                    num_parallel_uploads=1,
                )
            except Exception as exc:
                if exc is reader.source_error:
                    raise  # limits, integrity, the source's own failure: unchanged
                raise _translate("uploading", exc) from exc
            info = digest.finish()
            final = self.object_name(info.key)
            with _storage("storing"):
                if self._stored_size(final) != info.size:
                    # Server-side copy; minio switches to a multipart copy above 5 GiB.
                    self._client.copy_object(
                        self._bucket, final, CopySource(self._bucket, tmp_name)
                    )
            return info
        finally:
            # A failure here leaves a tmp/ object that the stale sweep removes later.
            with contextlib.suppress(MinioException, urllib3.exceptions.HTTPError, OSError):
                self._client.remove_object(self._bucket, tmp_name)

    @staticmethod
    def _verify_only(source: BlobSource, digest: Digest, stored_size: int) -> BlobInfo:
        """The sender re-sent a blob we hold (its hash was given): check the bytes, skip the
        upload. A mismatch raises ``BlobIntegrityError`` and leaves the stored blob alone."""
        for _ in digest.feed(source):
            pass
        info = digest.finish()
        if info.size != stored_size:
            # Same SHA-256, different size: the stored copy is damaged. The source is spent,
            # so report it; the sender's retry without a hash will store a fresh copy.
            raise StorageError(f"stored blob {info.key} has {stored_size} bytes, not {info.size}")
        return info

    def _stored_size(self, name: str) -> int | None:
        """Size of an object, or None when there is none."""
        with _storage("stat"):
            try:
                stat = self._client.stat_object(self._bucket, name)
            except S3Error as exc:
                if exc.code in _NOT_FOUND:
                    return None
                raise
        return int(stat.size or 0)

    def open(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Stream bytes ``[start, end)`` of a blob; see :meth:`~hie.hub.blobs.port.BlobStore.open`.

        The GET is issued here, so a missing blob raises ``BlobNotFound`` immediately; the
        returned iterator releases the connection when exhausted, closed or garbage-collected.
        """
        name = self.object_name(key)
        validate_range(start, end)
        if end is not None and end <= start:
            self.stat(key)
            return iter(())
        length = 0 if end is None else end - start  # minio: 0 means "to the end"
        try:
            with _storage(f"reading {key}", key):
                response = self._client.get_object(self._bucket, name, offset=start, length=length)
        except StorageError as exc:
            # 416: the object exists but the range starts at or past its end.
            cause = exc.__cause__
            if isinstance(cause, S3Error) and cause.code == "InvalidRange":
                return iter(())
            raise
        return self._stream(response, key)

    @staticmethod
    def _stream(response: Any, key: str) -> Iterator[bytes]:
        try:
            with _storage(f"reading {key}"):
                yield from response.stream(CHUNK_SIZE)
        finally:
            response.close()
            response.release_conn()

    def stat(self, key: str) -> BlobInfo:
        """Key and size of a stored blob; ``BlobNotFound`` if missing."""
        name = self.object_name(key)
        with _storage(f"stat of {key}", key):
            stat = self._client.stat_object(self._bucket, name)
        return BlobInfo(key=key, size=int(stat.size or 0), sha256=key)

    def exists(self, key: str) -> bool:
        """Whether a blob with this key is stored."""
        try:
            self.stat(key)
        except BlobNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        """Remove a blob (idempotent: S3 deletes of missing objects succeed)."""
        name = self.object_name(key)
        with _storage(f"deleting {key}"):
            self._client.remove_object(self._bucket, name)

    def iter_keys(self) -> Iterator[str]:
        """Every stored key, in the bucket's listing order (lexicographic on S3)."""
        start = len(f"{self._root}sha256/")
        with _storage("listing"):
            for obj in self._client.list_objects(
                self._bucket, prefix=f"{self._root}sha256/", recursive=True
            ):
                name = str(obj.object_name)[start:]
                if is_key(name):
                    yield name

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.clear()

    def _sweep_stale_temp(self) -> None:
        """Remove temporary objects a crashed process left behind (only old ones)."""
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=STALE_TEMP_SECONDS)
        with contextlib.suppress(StorageError), _storage("sweeping temporary objects"):
            for obj in self._client.list_objects(
                self._bucket, prefix=self.temp_prefix, recursive=True
            ):
                if obj.last_modified is not None and obj.last_modified < cutoff:
                    self._client.remove_object(self._bucket, str(obj.object_name))

    def __repr__(self) -> str:
        return f"S3BlobStore(bucket={self._bucket!r}, prefix={self._prefix!r})"
