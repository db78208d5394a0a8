"""Query plans SQLite must keep: a probe of one candidate row's tokens stays on the rid index,
so its cost does not grow with how many rows share the code (ITI-67's ``status=current``);
reads by (type, id) and reverse-reference lookups use their keys, never a scan."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event

from hie.hub.store import open_resource_store
from hie.hub.store import sql as store_sql
from hie.hub.store.port import IdCond, IndexRows, NewVersion, Query, ReferenceCond, TokenCond


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


def _plans_of(tmp_path: Path, call: Callable[[Any], object]) -> list[str]:
    """The query plan of every statement ``call(store)`` runs, step by step (through the
    engine or the store's lean reads)."""
    store = open_resource_store(f"sqlite:///{tmp_path / 'hie.db'}")
    store.migrate()
    seen: list[tuple[str, Any]] = []

    def note(_conn: Any, _cur: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, params))

    event.listen(store.engine, "before_cursor_execute", note)
    lean = store._lean  # the reads that bypass the engine
    if lean is not None:
        run = lean.rows

        def rows(statement: str, params: Any) -> list[Any]:
            seen.append((statement, list(params)))
            return run(statement, params)

        lean.rows = rows  # type: ignore[method-assign]
    try:
        call(store)
    finally:
        event.remove(store.engine, "before_cursor_execute", note)
        store.close()
    conn = sqlite3.connect(tmp_path / "hie.db")
    try:
        return [
            r[3]
            for stmt, params in seen
            for r in conn.execute("EXPLAIN QUERY PLAN " + stmt, params)
        ]
    finally:
        conn.close()


def test_reading_resources_by_type_and_id_uses_the_key_not_a_scan(tmp_path: Path) -> None:
    # (rtype, id) IN (VALUES …) made SQLite scan every resource: 60 ms for 20 documents
    # at 100,000 ($search-text reads each page this way)
    refs = [("DocumentReference", f"d{i}") for i in range(20)] + [("Binary", "b1")]
    plan = _plans_of(tmp_path, lambda store: store.read_many(refs))
    assert plan and not [step for step in plan if step.startswith("SCAN resources")], plan


def test_finding_what_references_some_targets_uses_the_reference_index(tmp_path: Path) -> None:
    targets = [("Patient", "p1"), ("Patient", "p2"), ("Group", "g1")]
    plan = _plans_of(
        tmp_path, lambda store: store.referencing(targets, "DocumentReference", "subject", 10)
    )
    assert plan and not [step for step in plan if step.startswith("SCAN")], plan


def test_a_search_by_ids_is_driven_by_the_id_key(tmp_path: Path) -> None:
    # _content gives ids; beside the patient and status probes and ORDER BY rid, a bare
    # id IN (…) let SQLite walk every DocumentReference in rid order (35 ms at 100,000)
    query = Query(
        "DocumentReference",
        conds=[
            ReferenceCond("patient", "Patient", "p-1", expand=True),
            TokenCond("status", None, "current"),
            IdCond(("d1", "d2", "d3")),
        ],
        count=50,
    )
    plan = _plans_of(tmp_path, lambda store: store.search(query))
    assert any("(rtype=? AND id=?)" in step for step in plan), plan
    assert "SEARCH resources USING INDEX ix_resources_type_rid (rtype=?)" not in plan, plan


def test_the_change_marker_reads_the_end_of_an_index_not_every_row(tmp_path: Path) -> None:
    # the grant of a patient acting for a child asks about Patient: a city's millions of them
    store = open_resource_store(f"sqlite:///{tmp_path / 'hie.db'}")
    store.migrate()
    with store.transaction() as tx:
        for n in range(3000):
            tx.write(NewVersion("Patient", f"p{n}", b"{}", IndexRows(), "POST"), 1, 1_000 + n)
    marker = store.change_marker("Patient")
    store.close()
    stmt = store_sql._CHANGE_MARKER.compile(dialect=store_sql._DIALECTS["sqlite"])
    conn = sqlite3.connect(tmp_path / "hie.db")
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    conn.set_progress_handler(count, 1)  # called once per virtual-machine instruction
    try:
        params = [
            stmt.params[name] if name != "rtype" else "Patient" for name in stmt.positiontup or ()
        ]
        row = conn.execute(str(stmt), params).fetchone()
    finally:
        conn.close()
    assert tuple(row) == marker and marker[1] == 1_000 + 2999
    assert steps[0] < 1_000, steps[0]  # reading the 3,000 rows took 18,000
