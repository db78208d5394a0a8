"""`hie registry load` end to end through the CLI (embedded SQLite in a temporary data dir)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hie.cli import app

runner = CliRunner()

ORGS = """\
id,frmo_oid,name,parent_id,patient_id_system
org-1,1.2.643.5.1.13.13.12.2.78.9001,Поликлиника № 1,,urn:oid:1.2.643.5.1.13.13.12.2.78.9001.100
org-2,1.2.643.5.1.13.13.12.2.78.9002,Отделение № 2,org-1,
"""
BAD = (
    ORGS
    + """\
org-1,1.2.643.5.1.13.13.12.2.78.9003,Дубликат,,
org-4,1.2.643.5.1.13.13.12.2.78.09,Плохой OID,,
org-5,1.2.643.5.1.13.13.12.2.78.9005,Сирота,org-404,
org-6,1.2.643.5.1.13.13.12.2.78.9006,Хорошая,,
"""
)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HIE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("HIE_LOG_LEVEL", "WARNING")
    return tmp_path


def organizations(env: Path) -> set[str]:
    from hie.hub.settings import load_settings
    from hie.hub.store import open_resource_store
    from hie.hub.store.port import Query

    store = open_resource_store(load_settings().database_url)
    try:
        return {r.id for r in store.search(Query("Organization", count=100)).items}
    finally:
        store.close()


def test_help_lists_registry_load() -> None:
    assert "registry" in runner.invoke(app, ["--help"]).output
    out = runner.invoke(app, ["registry", "load", "--help"]).output
    for option in ("--kind", "--skip-bad", "--dry-run"):
        assert option in out


def test_load_good_file_then_reload(env: Path) -> None:
    path = env / "orgs.csv"
    path.write_text(ORGS, encoding="utf-8")
    res = runner.invoke(app, ["registry", "load", str(path)])
    assert res.exit_code == 0, res.output
    assert "2 were created" in res.stdout
    assert organizations(env) == {"org-1", "org-2"}
    res = runner.invoke(app, ["registry", "load", str(path), "--kind", "organizations"])
    assert res.exit_code == 0 and "2 unchanged" in res.stdout


def test_bad_rows_are_reported_with_line_numbers_and_nothing_loads(env: Path) -> None:
    path = env / "bad.csv"
    path.write_text(BAD, encoding="utf-8")
    res = runner.invoke(app, ["registry", "load", str(path)])
    assert res.exit_code == 1
    err = res.stderr
    assert f"{path}:2: bad: duplicate Organization id 'org-1'" in err
    assert f"{path}:4: bad: duplicate Organization id 'org-1'" in err
    assert f"{path}:5: bad: ФРМО OID '1.2.643.5.1.13.13.12.2.78.09' is malformed" in err
    assert f"{path}:6: bad: refers to Organization/org-404" in err
    assert f"{path}:3: bad: refers to Organization/org-1" in err
    assert ":7:" not in err
    assert "nothing loaded" in res.stdout
    assert organizations(env) == set()


def test_skip_bad_and_dry_run(env: Path) -> None:
    path = env / "bad.csv"
    path.write_text(BAD, encoding="utf-8")
    res = runner.invoke(app, ["registry", "load", str(path), "--skip-bad", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "1 would be created" in res.stdout and "dry run" in res.stdout
    assert f"{path}:5: skipped:" in res.stderr
    assert organizations(env) == set()
    res = runner.invoke(app, ["registry", "load", str(path), "--skip-bad", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["created"] == 1 and report["loaded"] and report["bad_rows"] == 5
    assert sorted({p["line"] for p in report["problems"]}) == [2, 3, 4, 5, 6]
    assert organizations(env) == {"org-6"}


def test_missing_column_and_bad_kind(env: Path) -> None:
    path = env / "o.csv"
    path.write_text("id,name\norg-1,Без OID\n", encoding="utf-8")
    res = runner.invoke(app, ["registry", "load", str(path), "--kind", "organizations"])
    assert res.exit_code == 1 and "o.csv:1: bad: missing required column(s): 'frmo_oid'" in (
        res.stderr
    )
    res = runner.invoke(app, ["registry", "load", str(path), "--kind", "hospitals"])
    assert res.exit_code == 2


def test_load_demo_city_bundle(env: Path) -> None:
    from hie.demo import Generator

    city = Generator(5).city()
    path = env / "city.ndjson"
    path.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in city.resources()), encoding="utf-8"
    )
    res = runner.invoke(app, ["registry", "load", str(path)])
    assert res.exit_code == 0, res.output
    assert f"{len(list(city.resources()))} were created" in res.stdout
    assert len(organizations(env)) == len(city.organizations)
