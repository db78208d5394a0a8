"""The `hie` command: help, config redaction, migrate and the demo loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hie.cli import app

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HIE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("HIE_LOG_LEVEL", "WARNING")
    return tmp_path / "var"


def test_help_lists_every_command() -> None:
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("serve", "worker", "db", "config", "demo", "search"):
        assert cmd in out


def test_config_show_redacts_secrets(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIE_S3_SECRET_KEY", "very-secret-value")
    monkeypatch.setenv("HIE_DATABASE_URL", "postgresql://hie:db-password@db.local/hie")
    res = runner.invoke(app, ["config", "show"])
    assert res.exit_code == 0, res.output
    assert "very-secret-value" not in res.output and "db-password" not in res.output
    shown = json.loads(res.stdout)
    assert shown["s3_secret_key"] == "**********"
    assert shown["database_url"] == "postgresql://hie:***@db.local/hie"
    assert shown["data_dir"] == str(env)


def test_production_refuses_development_secrets(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIE_ENV", "production")
    res = runner.invoke(app, ["config", "show"])
    assert res.exit_code == 2 and "HIE_OIDC_ISSUER" in res.output


def test_migrate_and_demo_load_a_city(env: Path) -> None:
    assert runner.invoke(app, ["db", "migrate"]).exit_code == 0
    res = runner.invoke(app, ["demo", "--patients", "3", "--per-patient", "10"])
    assert res.exit_code == 0, res.output
    from hie.hub.settings import load_settings
    from hie.hub.store import open_resource_store
    from hie.hub.store.port import Query, TokenCond

    store = open_resource_store(load_settings().database_url)
    golden = TokenCond("_tag", "https://hie.spb.ru/fhir/CodeSystem/mpi", "golden")

    def count(golden_records: bool) -> int | None:
        cond = TokenCond(golden.param, golden.system, golden.code, negate=not golden_records)
        return store.search(Query("Patient", [cond], count=100, total=True)).total

    orgs = store.search(Query("Organization", count=100, total=True))
    # three people: each MO record has its golden record in the master patient index
    assert count(False) == 3 and count(True) == 3 and (orgs.total or 0) >= 20
    # --if-empty leaves an existing hub alone; the same seed is idempotent
    assert "skipping" in runner.invoke(app, ["demo", "--if-empty"]).output
    assert runner.invoke(app, ["demo", "--patients", "3", "--per-patient", "10"]).exit_code == 0
    assert count(False) == 3 and count(True) == 3
    store.close()
