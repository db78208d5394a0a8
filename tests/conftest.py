"""Shared fixtures: settings in a temporary data dir, real PostgreSQL, a migrated store."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.postgres import PgServer, find_pg_bin, postgres_server

# Every DICOM listener a test starts writes its blob journal in segments written out in full
# when created; 4 MB ones (instead of 64) keep that small, and rotate often
os.environ.setdefault("HIE_DICOM_JOURNAL_MB", "4")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server per test worker (skipped only where no binaries exist)."""
    if find_pg_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries are required in CI")
        pytest.skip("no PostgreSQL binaries on this machine (install Debian's postgresql)")
    base = Path(tempfile.mkdtemp(prefix="hie-pg-"))
    with postgres_server(base) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL for each resource-store backend (fresh database per test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hie.db'}"
    server: PgServer = request.getfixturevalue("pg_server")
    return server.new_database()


@pytest.fixture
def store(store_url: str) -> Iterator[object]:
    """A migrated resource store on each backend."""
    from hie.hub.store import open_resource_store

    st = open_resource_store(store_url)
    st.migrate()
    yield st
    st.close()


@pytest.fixture
def cli_env(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``HIE_*`` variables for the CLI (typer's runner) on a fresh data dir of each backend."""
    monkeypatch.setenv("HIE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("HIE_DATABASE_URL", store_url)
    monkeypatch.setenv("HIE_LOG_LEVEL", "WARNING")
    return store_url


@pytest.fixture
def settings_for(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Build hub settings in a temporary data dir for a database URL."""
    from hie.hub.settings import load_settings

    def make(database_url: str | None = None, **overrides: object):  # type: ignore[no-untyped-def]
        return load_settings(
            data_dir=tmp_path / "var",
            database_url=database_url or f"sqlite:///{tmp_path / 'var' / 'hie.db'}",
            **overrides,
        )

    return make


@pytest.fixture
def client(store_url: str, settings_for):  # type: ignore[no-untyped-def]
    """An HTTP client for the hub's app on each resource-store backend."""
    from fastapi.testclient import TestClient

    from hie.fhir.app import create_app
    from hie.hub.runtime import open_hub
    from tests.fixtures.auth import bearer

    settings = settings_for(store_url, max_body_bytes=64 * 1024)
    hub = open_hub(settings)
    hub.store.migrate()
    app = create_app(settings, hub, start_worker=False)
    with TestClient(app, base_url="http://hub.test", headers=bearer(settings)) as c:
        c.hub = hub  # type: ignore[attr-defined]
        c.settings = settings  # type: ignore[attr-defined]
        yield c


@pytest.fixture
def as_hub():  # type: ignore[no-untyped-def]
    """Run the test's in-process service calls as the hub itself (HTTP calls carry their own
    token): the app's FhirService refuses calls without a principal."""
    from hie.hub.auth import HUB, acting_as

    with acting_as(HUB) as p:
        yield p
