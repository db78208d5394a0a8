"""The demo city's documents (issue #7): ``hie demo`` publishes each patient's clinical documents
(PDF with a text layer and CDA R2) through the FHIR transaction path a clinic's MIS uses; the
bodies land in the real filesystem blob store, the outbox worker indexes their text in the
embedded Tantivy index, and running the demo again updates the same documents.

What the hub should hold is worked out from the same deterministic ``Generator`` calls that
``load_demo`` makes."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pypdf import PdfReader
from typer.testing import CliRunner

from hie.cli import app
from hie.demo import Generator
from hie.fhir.documents import blob_of
from hie.hub.store.port import Query
from tests.fixtures.records import GOLDEN

runner = CliRunner()
SEED = 2026  # the CLI's default seed
PATIENTS, PER_PATIENT = 3, 15
DEMO = ["demo", "--patients", str(PATIENTS), "--per-patient", str(PER_PATIENT)]
BASE = "http://hub.test/fhir"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HIE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("HIE_LOG_LEVEL", "WARNING")
    return tmp_path / "var"


def expected_documents() -> dict[str, list[list[dict[str, Any]]]]:
    """Patient id → the submissions (List, DocumentReference, Binary) ``hie demo`` sends."""
    gen = Generator(SEED)
    gen.city()
    out = {}
    for _ in range(PATIENTS):
        record = gen.patient_with_record(PER_PATIENT)
        out[record[0]["id"]] = gen.patient_documents(record)
    return out


@pytest.fixture
def hub(env: Path) -> Iterator[Any]:
    """A hub over the demo's data dir whose outbox worker runs the full-text indexer."""
    from hie.fhir.indexing import SearchIndexer
    from hie.hub.runtime import open_hub
    from hie.hub.settings import load_settings

    hub = open_hub(load_settings())
    hub.add_consumers([SearchIndexer(hub.store, lambda: hub.search_index, blobs=lambda: hub.blobs)])
    yield hub
    hub.close()


def demo() -> None:
    res = runner.invoke(app, DEMO)
    assert res.exit_code == 0, res.output


def count(hub: Any, rtype: str) -> int:
    return hub.store.search(Query(rtype, count=1, total=True)).total or 0


def read(hub: Any, rtype: str, rid: str) -> dict[str, Any]:
    stored = hub.store.read_many([(rtype, rid)])
    assert stored and stored[0].content, f"{rtype}/{rid} is not stored"
    res: dict[str, Any] = orjson.loads(stored[0].content)
    return res


def body_text(body: bytes, content_type: str) -> str:
    """The text a reader of the document sees: the PDF's text layer, the CDA's paragraphs."""
    if content_type == "application/pdf":
        return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(body)).pages)
    return "\n".join(
        html.unescape(p) for p in re.findall(r"<paragraph>(.*?)</paragraph>", body.decode())
    )


def body_word(body: bytes, content_type: str, docref: dict[str, Any]) -> str:
    """The longest Russian word of the body that the DocumentReference itself does not
    contain, so finding it shows the body's text was indexed."""
    meta = json.dumps(docref, ensure_ascii=False).lower()
    words = re.findall(r"[а-яё]+", body_text(body, content_type).lower())
    return max((w for w in words if w not in meta), key=lambda w: (len(w), w))


def test_demo_publishes_documents_to_blob_store_and_index(env: Path, hub: Any) -> None:
    from hie.fhir.document_timeline import document_timeline
    from hie.fhir.service import FhirService

    demo()
    hub.worker.drain(timeout=120)
    expected = expected_documents()
    svc = FhirService(hub.store, hub.settings, lambda: hub.search_index, blobs=lambda: hub.blobs)
    types: set[str] = set()
    for pid, submissions in expected.items():
        assert 2 <= len(submissions) <= 4
        # the subject is the record the demo made for the patient at their MO, not a new one
        patient = read(hub, "Patient", pid)
        assert not any(t.get("code") == "golden" for t in patient.get("meta", {}).get("tag", []))
        for submission, docref_sent, binary_sent in submissions:
            docref = read(hub, "DocumentReference", docref_sent["id"])
            assert docref["subject"]["reference"] == f"Patient/{pid}"
            assert docref["custodian"] == docref_sent["custodian"]
            enc = docref["context"]["encounter"][0]["reference"]
            assert read(hub, *enc.split("/"))["subject"]["reference"] == f"Patient/{pid}"
            assert docref["date"] < "2025-11-02"  # the demo world's past
            # the body is in the blob store, the Binary holds only where it is
            body = base64.b64decode(binary_sent["data"])
            binary = read(hub, "Binary", binary_sent["id"])
            assert "data" not in binary
            assert binary["securityContext"]["reference"] == f"DocumentReference/{docref['id']}"
            ctype = binary_sent["contentType"]
            assert (
                binary["contentType"] == ctype == docref["content"][0]["attachment"]["contentType"]
            )
            types.add(ctype)
            ref = blob_of(binary)
            assert ref is not None and ref.key == hashlib.sha256(body).hexdigest()
            assert b"".join(hub.blobs.open(ref.key)) == body
            att = docref["content"][0]["attachment"]
            assert att["url"] == f"Binary/{binary['id']}" and att["size"] == len(body)
            # the submission set lists the document
            listed = read(hub, "List", submission["id"])
            assert listed["entry"][0]["item"]["reference"] == f"DocumentReference/{docref['id']}"
            # full text: a word only the body has finds the document, within the patient
            word = body_word(body, ctype, docref)
            found = hub.search_index.ids_matching(word, "DocumentReference", f"Patient/{pid}")
            assert f"DocumentReference/{docref['id']}" in found, (word, ctype)
        # the documents are on the person's golden record (clinician view, portal)
        golden = orjson.loads(
            svc.search("Patient", [("_tag", GOLDEN), ("link", f"Patient/{pid}")], BASE)
        )
        golden_id = golden["entry"][0]["resource"]["id"]
        timeline = document_timeline(svc, golden_id, [])
        listed_ids = {d["id"] for g in timeline["groups"] for d in g["documents"]}
        assert listed_ids == {s[1]["id"] for s in submissions}
        assert all(d["indexable"] for g in timeline["groups"] for d in g["documents"])
    assert types == {"application/pdf", "application/hl7-cda+xml"}
    n = sum(len(s) for s in expected.values())
    assert count(hub, "DocumentReference") == count(hub, "Binary") == n

    # another form of a word the bodies have ("Медицинская организация"): Russian stemming
    hits = hub.search_index.search("медицинской", resource_type="DocumentReference", limit=50)
    assert hits.total == n


def test_demo_twice_does_not_duplicate_documents(env: Path, hub: Any) -> None:
    demo()
    hub.worker.drain(timeout=120)
    before = {t: count(hub, t) for t in ("DocumentReference", "Binary", "List", "Patient")}
    blobs = sorted(p.name for p in (env / "blobs").rglob("*") if p.is_file())
    indexed = hub.search_index.count()
    assert before["DocumentReference"] >= 2 * PATIENTS

    demo()
    hub.worker.drain(timeout=120)
    assert {t: count(hub, t) for t in before} == before
    assert sorted(p.name for p in (env / "blobs").rglob("*") if p.is_file()) == blobs
    assert hub.search_index.count() == indexed
    # the same documents, updated in place
    for submissions in expected_documents().values():
        for _, docref, _ in submissions:
            stored = hub.store.read_many([("DocumentReference", docref["id"])])
            assert stored[0].version == 2


def test_demo_documents_per_patient_zero_sends_none(env: Path, hub: Any) -> None:
    res = runner.invoke(app, [*DEMO, "--documents-per-patient", "0"])
    assert res.exit_code == 0, res.output
    assert count(hub, "DocumentReference") == count(hub, "Binary") == 0
    assert count(hub, "Patient") == 2 * PATIENTS  # MO records and their golden records


def test_documents_leave_the_rest_of_the_demo_unchanged() -> None:
    """Asking for documents draws from a stream of their own: the records are what they were,
    and the same record always gets the same documents."""
    plain, with_docs = Generator(5), Generator(5)
    for _ in range(4):
        record = with_docs.patient_with_record(30)
        first = with_docs.patient_documents(record)
        assert first == with_docs.patient_documents(record)
        assert plain.patient_with_record(30) == record
    assert Generator(5).patient_documents(record, 0) == []
