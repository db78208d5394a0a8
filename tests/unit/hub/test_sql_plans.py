"""Query plans SQLite must keep: a probe of one candidate row's tokens stays on the rid index,
so its cost does not grow with how many rows share the code (ITI-67's ``status=current``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from hie.hub.store import open_resource_store
from hie.hub.store import sql as store_sql
from hie.hub.store.port import ReferenceCond, TokenCond


def _plan(tmp_path: Path, system: str | None) -> list[str]:
    url = f"sqlite:///{tmp_path / 'hie.db'}"
    store = open_resource_store(url)
    store.migrate()
    store.close()
    conds = [
        ReferenceCond("patient", "Patient", "p-1", expand=True),
        TokenCond("status", system, "current"),
    ]
    compiler = store_sql._Compiler("sqlite", "DocumentReference")
    stmt = store_sql.select(store_sql.R.c.rid).where(*compiler.where(conds))
    sql = str(
        stmt.compile(dialect=store_sql._DIALECTS["sqlite"], compile_kwargs={"literal_binds": True})
    )
    conn = sqlite3.connect(tmp_path / "hie.db")
    try:
        return [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql) if "idx_token" in r[3]]
    finally:
        conn.close()


def test_a_token_probe_with_any_system_searches_the_rows_own_tokens(tmp_path: Path) -> None:
    plan = _plan(tmp_path, None)
    assert plan and all("ix_idx_token_rid" in step for step in plan), plan


def test_a_token_probe_with_a_system_uses_the_whole_lookup_key(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "http://hl7.org/fhir/document-reference-status")
    assert plan and all("ix_idx_token_lookup" in step and "rid=?" in step for step in plan), plan
