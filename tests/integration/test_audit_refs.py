"""What each audit record is about (``audit_ref``) is written after the record, in batches, on
every backend: a reader still finds every record committed before its query, each record is
indexed once however many processes index at the same time, and a trail from before the
deferral is picked up where its references end."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select, text

from hie.hub.audit import AuditRecord, SqlAuditLog, audit_ref, open_audit_log


@pytest.fixture
def trails() -> Iterator[list[SqlAuditLog]]:
    """Opens trails on one fresh database, as separate processes would (closed after)."""
    opened: list[SqlAuditLog] = []
    yield opened
    for t in opened:
        t.close()


def _open(store_url: str, opened: list[SqlAuditLog], *, indexes: bool = True) -> SqlAuditLog:
    trail = open_audit_log(store_url)
    trail.migrate()
    if not indexes:  # a process that appends and never indexes (the reader must)
        trail._index_later = lambda: None  # type: ignore[method-assign]
    opened.append(trail)
    return trail


def _rec(patient: str, *entities: str, subtype: str = "read") -> AuditRecord:
    return AuditRecord(
        action="R",
        subtype=subtype,
        outcome=0,
        status=200,
        method="GET",
        path="/fhir/Observation",
        agent="tester",
        patients=[patient],
        entities=list(entities),
    )


def _ref_rows(trail: SqlAuditLog, ref: str) -> list[int]:
    with trail.engine.connect() as conn:
        return [
            int(s) for (s,) in conn.execute(select(audit_ref.c.seq).where(audit_ref.c.ref == ref))
        ]


def test_a_reader_finds_a_record_whose_references_are_not_written_yet(store_url, trails) -> None:  # type: ignore[no-untyped-def]
    writer = _open(store_url, trails, indexes=False)
    reader = _open(store_url, trails)
    rec = _rec("p-late", "Observation/o-late")
    writer.append_many([rec])
    assert _ref_rows(writer, "Patient/p-late") == []  # nobody indexed it yet
    assert [r.seq for r in reader.records(refs=["Patient/p-late"])[0]] == [rec.seq]
    assert [r.seq for r in reader.records(refs=["Observation/o-late"])[0]] == [rec.seq]
    assert _ref_rows(writer, "Patient/p-late") == [rec.seq]


def test_references_are_written_in_the_background_without_a_reader(store_url, trails) -> None:  # type: ignore[no-untyped-def]
    writer = _open(store_url, trails)
    recs = [_rec(f"p-bg-{i}", f"Observation/o-bg-{i}") for i in range(5)]
    writer.append_many(recs)
    deadline = time.monotonic() + 10
    while _ref_rows(writer, "Patient/p-bg-4") == [] and time.monotonic() < deadline:
        time.sleep(0.05)
    for r in recs:
        assert _ref_rows(writer, f"Patient/{r.patients[0]}") == [r.seq]
        assert _ref_rows(writer, r.entities[0]) == [r.seq]


def test_a_page_of_results_is_found_by_its_patients_not_by_each_result(store_url, trails) -> None:  # type: ignore[no-untyped-def]
    trail = _open(store_url, trails, indexes=False)
    page = _rec("p-page", "Observation/o-1", "Observation/o-2", subtype="search")
    read = _rec("p-page", "Observation/o-1")
    trail.append_many([page, read])
    assert [r.seq for r in trail.records(refs=["Patient/p-page"])[0]] == [read.seq, page.seq]
    found = trail.records(refs=["Observation/o-1"])[0]
    assert [r.seq for r in found] == [read.seq]
    assert trail.read(page.seq).entities == ["Observation/o-1", "Observation/o-2"]  # kept


def test_indexers_in_two_processes_write_each_reference_once(store_url, trails) -> None:  # type: ignore[no-untyped-def]
    writer = _open(store_url, trails, indexes=False)
    writer.append_many([_rec(f"p-{i}") for i in range(900)])  # several batches
    a, b = _open(store_url, trails, indexes=False), _open(store_url, trails, indexes=False)
    counted: list[int] = []
    threads = [threading.Thread(target=lambda t=t: counted.append(t.index_refs())) for t in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counted) == 900
    with writer.engine.connect() as conn:
        rows = conn.execute(select(func.count(), func.count(func.distinct(audit_ref.c.seq)))).one()
    assert tuple(rows) == (900, 900)


def test_a_trail_from_before_deferred_references_continues_where_they_end(
    store_url, trails
) -> None:  # type: ignore[no-untyped-def]
    trail = _open(store_url, trails, indexes=False)
    old = [_rec("p-old", "Observation/o-old") for _ in range(3)]
    trail.append_many(old)
    assert trail.index_refs() == 3
    with trail.engine.begin() as conn:  # as the schema was: references in the same commit
        conn.execute(text("DROP TABLE audit_ref_position"))
    new = _rec("p-new")
    trail.append_many([new])
    trail.migrate()  # the next start of the hub
    assert trail.index_refs() == 1
    assert _ref_rows(trail, "Patient/p-old") == [r.seq for r in old]  # not indexed twice
    assert _ref_rows(trail, "Patient/p-new") == [new.seq]
