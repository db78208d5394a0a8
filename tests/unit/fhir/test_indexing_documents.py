"""The search indexer and document bodies: text from the blob store, filter fields, and the
not-indexable flag for bodies that cannot be read (real SQLite, filesystem blobs, Tantivy)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from hie.fhir import indexing
from hie.fhir.document_content import CDA_MEDIA_TYPE, Extracted, extract_text
from hie.fhir.indexing import (
    PRESENCE_WORD,
    SearchIndexer,
    TextExtractor,
    document_fields,
    index_status,
    to_doc,
)
from hie.hub.outbox import OutboxWorker
from hie.hub.runtime import Hub, open_hub
from hie.hub.settings import load_settings
from tests.fixtures.documents import (
    CDA_SECTIONS,
    DICOM_BYTES,
    make_cda,
    make_pdf,
    store_document,
)

PNEUMONIA = "Внебольничная пневмония нижней доли правого лёгкого"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    settings = load_settings(data_dir=tmp_path / "var", mpi_enabled=False)
    h = open_hub(settings)
    h.store.migrate()
    yield h
    h.close()


def indexer(hub: Hub, max_body_bytes: int = 1 << 20) -> SearchIndexer:
    return SearchIndexer(
        hub.store,
        lambda: hub.search_index,
        blobs=lambda: hub.blobs,
        max_body_bytes=max_body_bytes,
    )


def drain(hub: Hub, ix: SearchIndexer) -> None:
    OutboxWorker(hub.store, [ix]).drain(timeout=30)


def found(hub: Hub, query: str, **filters: list[str]) -> list[str]:
    res = hub.search_index.search(
        query, resource_type="DocumentReference", filters=filters or None, limit=50
    )
    return sorted(h.id.removeprefix("DocumentReference/") for h in res.hits)


def unindexable(kind: str) -> float:
    value = REGISTRY.get_sample_value("hie_document_bodies_unindexable_total", {"kind": kind})
    return value or 0.0


# --- bodies are indexed with Russian and English morphology ----------------------------------


def test_pdf_cda_and_text_bodies_are_found_by_word_form(hub: Hub) -> None:
    ix = indexer(hub)
    pdf = store_document(
        hub, "p1", make_pdf(PNEUMONIA, "Выписан в удовлетворительном"), "application/pdf"
    )
    cda = store_document(hub, "p1", make_cda(*CDA_SECTIONS), CDA_MEDIA_TYPE)
    text = store_document(
        hub,
        "p2",
        "Гипертоническая болезнь. Patients admitted with infections".encode("cp1251"),
        "text/plain",
    )
    drain(hub, ix)
    # Russian: other word forms of the words in the body, ё written as е
    assert found(hub, "пневмонии") == sorted([pdf, cda])
    assert found(hub, "нижняя доля") == [pdf]
    assert found(hub, "гемоглобина") == [cda]
    assert found(hub, "гипертонической болезни") == [text]
    # English stemming
    assert found(hub, "infection admission") == []  # "admission" is not "admitted"
    assert found(hub, "infection patient") == [text]
    # flagged readable, restricted by patient
    assert found(hub, "пневмония", indexable=["true"]) == sorted([pdf, cda])
    assert hub.search_index.ids_matching("пневмония", "DocumentReference", "Patient/p2") == []


def test_snippet_marks_the_body_text(hub: Hub) -> None:
    ix = indexer(hub)
    store_document(hub, "p1", "Заключение: <b>пневмония</b> справа".encode(), "text/plain")
    drain(hub, ix)
    hit = hub.search_index.search("пневмонии", resource_type="DocumentReference").hits[0]
    assert "<mark>пневмония</mark>" in hit.snippet
    assert "&lt;b&gt;" in hit.snippet  # the body's own markup is escaped


def test_filter_fields_for_iti67_and_the_timeline() -> None:
    res: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": "d1",
        "status": "current",
        "docStatus": "final",
        "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5"}]},
        "category": [{"coding": [{"system": "urn:oid:1.2.643.5.1.13.13.11.1115", "code": "2"}]}],
        "author": [{"reference": "Organization/mo-12"}, {"reference": "Practitioner/7"}],
        "custodian": {"reference": "Organization/mo-40"},
        "date": "2024-02-03T09:00:00+03:00",
        "context": {"encounter": [{"reference": "Encounter/e1"}]},
        "subject": {"reference": "Patient/p1"},
        "content": [
            {
                "attachment": {"contentType": "Application/PDF", "url": "Binary/b1"},
                "format": {"code": "urn:ihe:iti:xds:2017:mimeTypeSufficient"},
            }
        ],
    }
    fields = document_fields(res)
    assert fields["ref"] == ["DocumentReference/d1"]
    assert fields["type"] == ["18842-5", "http://loinc.org|18842-5"]
    assert fields["category"] == ["2", "urn:oid:1.2.643.5.1.13.13.11.1115|2"]
    assert fields["author"] == ["Organization/mo-12", "Practitioner/7"]
    assert fields["custodian"] == ["Organization/mo-40"]
    assert fields["org"] == ["Organization/mo-12", "Organization/mo-40"]
    assert fields["encounter"] == ["Encounter/e1"]
    assert fields["date"] == ["2024-02-03"]
    assert fields["content_type"] == ["application/pdf"]
    assert fields["docStatus"] == ["final"]
    assert fields["format"] == ["urn:ihe:iti:xds:2017:mimeTypeSufficient"]
    doc = to_doc(res, fields=fields)
    assert doc.patient == "Patient/p1" and doc.fields["status"] == ["current"]
    assert doc.date is not None and doc.date.utcoffset() is not None
    assert doc.date.isoformat() == "2024-02-03T09:00:00+03:00"
    # every indexed document can be found by the presence word (see index_status)
    assert PRESENCE_WORD in doc.text


def test_filters_narrow_a_search(hub: Hub) -> None:
    ix = indexer(hub)
    a = store_document(hub, "p1", b"pneumonia", "text/plain", author_org="mo-12", encounter="e1")
    b = store_document(hub, "p1", b"pneumonia", "text/plain", author_org="mo-40")
    drain(hub, ix)
    assert found(hub, "pneumonia") == sorted([a, b])
    assert found(hub, "pneumonia", org=["Organization/mo-12"]) == [a]
    assert found(hub, "pneumonia", encounter=["Encounter/e1"]) == [a]
    assert found(hub, "pneumonia", type=["http://loinc.org|18842-5"]) == sorted([a, b])
    assert found(hub, "pneumonia", status=["current"], date=["2024-02-03"]) == sorted([a, b])


# --- bodies that cannot be read: flagged, logged, counted; the worker goes on ----------------


def flags(hub: Hub, doc_id: str) -> dict[str, list[str]]:
    """The document's flag fields, as the index answers filters on them."""
    out: dict[str, list[str]] = {}
    for kind in (
        "encrypted",
        "unreadable",
        "unsupported",
        "no-text",
        "too-large",
        "missing",
        "integrity",
    ):
        if doc_id in found(hub, PRESENCE_WORD, unindexable_kind=[kind]):
            out.setdefault("unindexable_kind", []).append(kind)
    for value in ("true", "false"):
        if doc_id in found(hub, PRESENCE_WORD, indexable=[value]):
            out.setdefault("indexable", []).append(value)
    return out


def test_unreadable_bodies_are_flagged_and_the_worker_goes_on(hub: Hub) -> None:
    ix = indexer(hub, max_body_bytes=200_000)
    before = {k: unindexable(k) for k in ("encrypted", "unreadable", "missing", "too-large")}
    encrypted = store_document(
        hub,
        "p1",
        make_pdf(PNEUMONIA, user_password="секрет"),
        "application/pdf",
        description="Эпикриз (зашифрован)",
    )
    corrupt = store_document(
        hub, "p1", b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage", "application/pdf"
    )
    missing = store_document(hub, "p1", make_pdf("нет файла"), "application/pdf", put_blob=False)
    large = store_document(hub, "p1", b"pneumonia " * 30_000, "text/plain")
    later = store_document(hub, "p1", make_pdf(PNEUMONIA), "application/pdf")
    drain(hub, ix)  # one batch: nothing raised, everything acknowledged
    assert hub.store.outbox_position(ix.name)[0] >= hub.store.outbox_position(ix.name)[1]
    # the readable document after them is indexed with its text
    assert found(hub, "пневмонии") == [later]
    assert flags(hub, later) == {"indexable": ["true"]}
    # the others are indexed on their metadata, flagged with the reason
    assert found(hub, "эпикриз зашифрован") == [encrypted]
    assert flags(hub, encrypted) == {"unindexable_kind": ["encrypted"], "indexable": ["false"]}
    assert flags(hub, corrupt) == {"unindexable_kind": ["unreadable"], "indexable": ["false"]}
    assert flags(hub, missing) == {"unindexable_kind": ["missing"], "indexable": ["false"]}
    assert flags(hub, large) == {"unindexable_kind": ["too-large"], "indexable": ["false"]}
    for kind, n in before.items():
        assert unindexable(kind) == n + 1, kind


def test_a_blob_store_outage_is_retried_not_flagged(hub: Hub) -> None:
    """A storage failure is transient: the batch fails (the worker retries it later) and the
    document is neither indexed without its text nor flagged."""
    from hie.hub.errors import StorageError

    class Down:
        def open(self, key: str, start: int = 0, end: int | None = None) -> Any:
            raise StorageError("the object store is unreachable")

    doc = store_document(hub, "p1", make_pdf(PNEUMONIA), "application/pdf")
    ix = SearchIndexer(hub.store, lambda: hub.search_index, blobs=lambda: Down())  # type: ignore[arg-type, return-value]
    events = hub.store.outbox_read(ix.name, 100)
    with pytest.raises(StorageError):
        ix.handle(events)
    assert found(hub, "пневмонии") == []
    drain(hub, indexer(hub))  # the store is back
    assert found(hub, "пневмонии") == [doc]


def test_reasons_are_exact_match_fields(hub: Hub) -> None:
    ix = indexer(hub)
    doc = store_document(hub, "p1", make_pdf("x", user_password="pw"), "application/pdf")
    drain(hub, ix)
    reasons = found(
        hub, PRESENCE_WORD, unindexable_reason=[f"Binary/{_binary_of(hub, doc)}: encrypted"]
    )
    assert reasons == [doc]


def _binary_of(hub: Hub, doc_id: str) -> str:
    stored = hub.store.read("DocumentReference", doc_id)
    assert stored is not None and stored.content
    url = orjson.loads(stored.content)["content"][0]["attachment"]["url"]
    return str(url).removeprefix("Binary/")


def test_unsupported_empty_and_tampered_bodies(hub: Hub) -> None:
    ix = indexer(hub)
    dicom = store_document(hub, "p1", DICOM_BYTES, "application/dicom")
    scan = store_document(hub, "p1", make_pdf(""), "application/pdf")
    tampered = store_document(hub, "p1", b"original words", "text/plain")
    # the blob's file no longer holds the bytes its key names
    key = _blob_key(hub, tampered)
    path = hub.blobs.path(key)  # type: ignore[attr-defined]
    path.chmod(0o644)
    path.write_bytes(b"tampered words")
    no_body = store_document(hub, "p1", None, "application/pdf", description="без файла")
    drain(hub, ix)
    assert flags(hub, dicom)["unindexable_kind"] == ["unsupported"]
    assert flags(hub, scan)["unindexable_kind"] == ["no-text"]
    assert flags(hub, tampered)["unindexable_kind"] == ["integrity"]
    assert found(hub, "tampered") == [] and found(hub, "original") == []
    assert flags(hub, no_body)["unindexable_kind"] == ["missing"]
    assert found(hub, "файла") == [no_body]


def _blob_key(hub: Hub, doc_id: str) -> str:
    from hie.fhir.documents import blob_of

    stored = hub.store.read("Binary", _binary_of(hub, doc_id))
    assert stored is not None and stored.content
    ref = blob_of(orjson.loads(stored.content))
    assert ref is not None
    return ref.key


def test_one_readable_body_and_one_not(hub: Hub) -> None:
    ix = indexer(hub)
    doc = store_document(
        hub,
        "p1",
        make_pdf(PNEUMONIA),
        "application/pdf",
        extra_bodies=[(make_pdf("x", user_password="pw"), "application/pdf")],
    )
    drain(hub, ix)
    assert found(hub, "пневмонии") == [doc]  # the readable body's text is searchable
    assert flags(hub, doc) == {"unindexable_kind": ["encrypted"], "indexable": ["false"]}


def test_without_a_blob_store_documents_are_indexed_on_metadata(hub: Hub) -> None:
    ix = SearchIndexer(hub.store, lambda: hub.search_index)
    doc = store_document(hub, "p1", make_pdf(PNEUMONIA), "application/pdf", description="Эпикриз")
    drain(hub, ix)
    assert found(hub, "эпикриз") == [doc]
    assert found(hub, "пневмонии") == []
    assert flags(hub, doc) == {}  # not known either way


def test_a_replaced_body_reindexes_its_document(hub: Hub) -> None:
    from hie.fhir.documents import BlobRef, blob_extension
    from hie.fhir.service import FhirService
    from hie.hub.store.sql import now_us

    ix = indexer(hub)
    doc = store_document(hub, "p1", b"first version", "text/plain")
    drain(hub, ix)
    assert found(hub, "first") == [doc]
    bid = _binary_of(hub, doc)
    stored = hub.store.read("Binary", bid)
    assert stored is not None and stored.content
    binary = orjson.loads(stored.content)
    info = hub.blobs.put(b"second version")
    binary["meta"] = {"extension": [blob_extension(BlobRef(info.key, info.size, "x"))]}
    with hub.store.transaction() as tx:
        FhirService(hub.store, hub.settings).write_internal(tx, binary, "Binary", bid, now_us())
    drain(hub, ix)
    assert found(hub, "second") == [doc] and found(hub, "first") == []


def test_deleted_documents_leave_the_index(hub: Hub) -> None:
    from hie.fhir.service import FhirService
    from hie.hub.store.sql import now_us

    ix = indexer(hub)
    doc = store_document(hub, "p1", b"pneumonia", "text/plain")
    drain(hub, ix)
    with hub.store.transaction() as tx:
        FhirService(hub.store, hub.settings).delete_internal(tx, "DocumentReference", doc, now_us())
    drain(hub, ix)
    assert found(hub, "pneumonia") == []


def test_index_status(hub: Hub) -> None:
    ix = indexer(hub)
    good = store_document(hub, "p1", b"pneumonia", "text/plain")
    bad = store_document(hub, "p1", make_pdf("x", user_password="pw"), "application/pdf")
    other = store_document(hub, "p2", b"pneumonia", "text/plain")
    drain(hub, ix)
    late = store_document(hub, "p1", b"pneumonia", "text/plain")  # not indexed yet
    status = index_status(hub.search_index, [good, bad, late], ["Patient/p1"])
    assert status.indexable(good) is True
    assert status.indexable(bad) is False
    assert status.indexable(late) is None
    assert status.indexable(other) is None  # not asked about


def test_search_reindex_keeps_the_body_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from hie.cli import app

    monkeypatch.setenv("HIE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("HIE_MPI_ENABLED", "false")
    monkeypatch.setenv("HIE_LOG_LEVEL", "WARNING")
    h = open_hub(load_settings())
    h.store.migrate()
    doc = store_document(h, "p1", make_pdf(PNEUMONIA), "application/pdf")
    bad = store_document(h, "p1", make_pdf("x", user_password="pw"), "application/pdf")
    h.close()
    res = CliRunner().invoke(app, ["search", "reindex"])
    assert res.exit_code == 0, res.output
    h = open_hub(load_settings())
    try:
        assert found(h, "пневмонии") == [doc]
        assert found(h, PRESENCE_WORD, indexable=["false"]) == [bad]
    finally:
        h.close()


def test_a_long_batch_becomes_searchable_as_it_goes(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a backlog of thousands of documents is one batch: its first documents are committed
    # (searchable) while the rest are still being read, not when the whole batch is done
    monkeypatch.setattr(indexing, "COMMIT_SECONDS", 0.0)
    docs = [store_document(hub, "p1", b"pneumonia", "text/plain") for _ in range(40)]
    ix = indexer(hub)
    searchable_before: list[int] = []
    real = ix.document

    def document(res: dict[str, Any]) -> Any:
        searchable_before.append(len(found(hub, "pneumonia")))
        return real(res)

    ix.document = document  # type: ignore[method-assign]
    drain(hub, ix)
    chunks = [searchable_before[i] for i in range(0, 40, indexing.CHUNK)]
    assert chunks == list(range(0, 40, indexing.CHUNK))
    assert found(hub, "pneumonia") == sorted(docs)


def test_a_long_batch_moves_the_outbox_position_as_it_goes(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the acknowledged position follows what is committed to the index, so a writer that
    # waits for the index (LagGate) sees its real lag, not the age of the whole batch
    monkeypatch.setattr(indexing, "COMMIT_SECONDS", 0.0)
    for _ in range(40):
        store_document(hub, "p1", b"pneumonia", "text/plain")
    events = hub.store.outbox_read("test-observer", 1000)
    ix = indexer(hub)
    seen: list[tuple[int, int]] = []  # (acknowledged seq, documents searchable)
    real = ix.document

    def document(res: dict[str, Any]) -> Any:
        seen.append((hub.store.outbox_behind(ix.name)[0], len(found(hub, "pneumonia"))))
        return real(res)

    ix.document = document  # type: ignore[method-assign]
    drain(hub, ix)
    acked = [a for a, _ in seen]
    assert acked == sorted(acked)
    assert acked[0] == 0 and acked[-1] > 0
    for position, searchable in seen:
        # every document at or before the position is already searchable
        covered = {
            e.id for e in events if e.seq <= position and e.resource_type == "DocumentReference"
        }
        assert len(covered) <= searchable
    assert hub.store.outbox_behind(ix.name) == (events[-1].seq, None)


# --- text extraction in worker processes ------------------------------------------------------


def crash_or_hang(data: bytes, content_type: str) -> Extracted:
    """extract_text, except that one body kills its worker process and another never ends
    (as a PDF that crashes or loops PDFium would)."""
    if data == b"CRASH":
        os._exit(1)
    if data == b"HANG":
        time.sleep(3600)
    return extract_text(data, content_type)


def test_extraction_in_worker_processes_finds_the_same_text(hub: Hub) -> None:
    ix = SearchIndexer(
        hub.store, lambda: hub.search_index, blobs=lambda: hub.blobs, extract_processes=2
    )
    try:
        pdf = store_document(hub, "p1", make_pdf(PNEUMONIA), "application/pdf")
        cda = store_document(hub, "p1", make_cda(*CDA_SECTIONS), CDA_MEDIA_TYPE)
        drain(hub, ix)
    finally:
        ix.close()
    assert found(hub, "пневмонии") == sorted([pdf, cda])
    assert found(hub, "гемоглобина") == [cda]


def test_a_body_that_crashes_or_hangs_its_worker_costs_that_document_only(hub: Hub) -> None:
    good = [store_document(hub, "p1", b"pneumonia, day %d" % i, "text/plain") for i in range(6)]
    crash = store_document(hub, "p1", b"CRASH", "text/plain")
    hang = store_document(hub, "p1", b"HANG", "text/plain")
    more = [store_document(hub, "p1", b"pneumonia again", "text/plain") for _ in range(3)]
    extractor = TextExtractor(2, timeout=2.0, fn=crash_or_hang)
    ix = SearchIndexer(
        hub.store, lambda: hub.search_index, blobs=lambda: hub.blobs, extractor=extractor
    )
    try:
        drain(hub, ix)
    finally:
        ix.close()
    assert found(hub, "pneumonia") == sorted(good + more)
    flagged = found(hub, PRESENCE_WORD, unindexable_kind=["extractor-error"])
    assert flagged == sorted([crash, hang])
