"""The blob store: content-addressed, streamed storage for document bodies and DICOM instances.

:class:`BlobStore` is the port; :func:`open_blob_store` picks a backend from ``HIE_BLOB_URL``:
``file://PATH`` (:class:`FilesystemBlobStore`, the embedded default) or ``s3://BUCKET``
(:class:`hie.hub.blobs.s3.S3BlobStore`, imported only when asked for, since it needs ``minio``).
"""

from hie.hub.blobs.filesystem import FilesystemBlobStore
from hie.hub.blobs.port import CHUNK_SIZE, BlobInfo, BlobSource, BlobStore, open_blob_store

__all__ = [
    "CHUNK_SIZE",
    "BlobInfo",
    "BlobSource",
    "BlobStore",
    "FilesystemBlobStore",
    "open_blob_store",
]
