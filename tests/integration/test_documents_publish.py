"""IHE MHD document sharing over HTTP: ITI-65 Provide Document Bundle, ITI-68 Retrieve Document,
replacement, and the bad-input cases of issue #7 — on SQLite and PostgreSQL, with the real
filesystem blob store, through an HTTP client that follows the MHD spec (not our code)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fixtures.auth import bearer
from tests.fixtures.documents import make_cda, make_pdf, submission_set
from tests.fixtures.http import post_chunked_until_answered
from tests.fixtures.labs import GP, GP_PATIENTS, LAB, as_transaction, lab_registry
from tests.fixtures.records import FJ, encounter, golden_id

PDF = make_pdf("Выписной эпикриз. Диагноз: пневмония внебольничная.", title="Эпикриз")
CDA = make_cda(("Диагноз", "<paragraph>Пневмония, J18.9</paragraph>"))
LOINC = "http://loinc.org"
DOC_IDS = "urn:ietf:rfc:3986"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sha1(data: bytes) -> str:
    return b64(hashlib.sha1(data).digest())  # noqa: S324 - FHIR R4 Attachment.hash


def patient_entry(number: str = "7000100", **extra: Any) -> dict[str, Any]:
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": GP_PATIENTS, "value": number}],
        "name": [{"family": "Соколова", "given": ["Анна"]}],
        "birthDate": "1984-02-11",
        "gender": "female",
        **extra,
    }
    return {
        "fullUrl": "urn:uuid:patient",
        "resource": patient,
        "request": {
            "method": "POST",
            "url": "Patient",
            "ifNoneExist": f"identifier={GP_PATIENTS}|{number}",
        },
    }


def provide_bundle(
    body: bytes = PDF,
    content_type: str = "application/pdf",
    *,
    patient: dict[str, Any] | None = None,
    attachment: dict[str, Any] | None = None,
    doc: dict[str, Any] | None = None,
    with_binary: bool = True,
    extra: list[dict[str, Any]] | None = None,
    unique: str = "1",
) -> dict[str, Any]:
    """An ITI-65 Provide Document Bundle: submission set List, DocumentReference, Binary."""
    att = {"contentType": content_type, "url": "urn:uuid:body", "title": "Эпикриз"}
    if attachment is not None:
        att = attachment
    docref = {
        "resourceType": "DocumentReference",
        "masterIdentifier": {"system": DOC_IDS, "value": f"urn:oid:1.2.643.99.{unique}"},
        "status": "current",
        "type": {"coding": [{"system": LOINC, "code": "18842-5"}]},
        "category": [{"coding": [{"system": LOINC, "code": "11488-4"}]}],
        "subject": {"reference": "urn:uuid:patient"},
        "date": "2026-11-20T10:00:00+03:00",
        "author": [{"reference": f"Organization/{GP}"}],
        "custodian": {"reference": f"Organization/{GP}"},
        "content": [{"attachment": att}],
        **(doc or {}),
    }
    entries = [patient or patient_entry()]
    entries.append(
        {
            "fullUrl": "urn:uuid:ss",
            "resource": submission_set("urn:uuid:patient", GP, ["urn:uuid:doc"]),
            "request": {"method": "POST", "url": "List"},
        }
    )
    entries.append(
        {
            "fullUrl": "urn:uuid:doc",
            "resource": docref,
            "request": {"method": "POST", "url": "DocumentReference"},
        }
    )
    if with_binary:
        entries.append(
            {
                "fullUrl": "urn:uuid:body",
                "resource": {
                    "resourceType": "Binary",
                    "contentType": content_type,
                    "data": b64(body),
                },
                "request": {"method": "POST", "url": "Binary"},
            }
        )
    entries.extend(extra or [])
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def created(response: Any, rtype: str) -> str:
    """The id of the ``rtype`` resource a transaction-response created."""
    for entry in response.json()["entry"]:
        loc = entry["response"].get("location", "")
        if loc.startswith(f"{rtype}/"):
            return str(loc.split("/")[1])
    raise AssertionError(f"no {rtype} in {response.json()}")


@pytest.fixture
def mhd(client: Any) -> Iterator[Any]:
    """The app with the clinic and laboratory registered; ``mhd.mo`` is the clinic's token."""
    assert client.post("/fhir", json=as_transaction(lab_registry())).status_code == 200
    client.mo = {**FJ, **bearer(client.settings, "mis", org=GP)}  # type: ignore[attr-defined]
    yield client


def publish(mhd: Any, bundle: dict[str, Any]) -> Any:
    return mhd.post("/fhir", json=bundle, headers=mhd.mo)


def test_provide_and_retrieve_a_pdf(mhd: Any) -> None:
    r = publish(mhd, provide_bundle())
    assert r.status_code == 200, r.text
    doc_id, bin_id = created(r, "DocumentReference"), created(r, "Binary")
    doc = mhd.get(f"/fhir/DocumentReference/{doc_id}").json()
    att = doc["content"][0]["attachment"]
    assert att["url"] == f"Binary/{bin_id}"
    assert (att["size"], att["hash"]) == (len(PDF), sha1(PDF))  # filled in by the hub
    binary = mhd.get(f"/fhir/Binary/{bin_id}", headers={"Accept": "application/fhir+json"})
    assert "data" in binary.json() and base64.b64decode(binary.json()["data"]) == PDF
    assert binary.json()["securityContext"] == {"reference": f"DocumentReference/{doc_id}"}
    # ITI-68: the bytes as sent, byte for byte
    raw = mhd.get(f"/fhir/Binary/{bin_id}", headers={"Accept": "*/*"})
    assert raw.status_code == 200 and raw.content == PDF
    assert raw.headers["content-type"] == "application/pdf"
    assert raw.headers["etag"] == f'"{hashlib.sha256(PDF).hexdigest()}"'
    assert raw.headers["content-disposition"] == f'inline; filename="{bin_id}.pdf"'
    assert raw.headers["accept-ranges"] == "bytes"
    # the golden patient finds it (ITI-67 by patient), and the submission set (ITI-66)
    pid = doc["subject"]["reference"].split("/")[1]
    gid = golden_id(mhd, pid)
    found = mhd.get(f"/fhir/DocumentReference?patient={gid}").json()
    assert [e["resource"]["id"] for e in found["entry"]] == [doc_id]
    lists = mhd.get(f"/fhir/List?patient={gid}&code=submissionset").json()
    assert [e["resource"]["entry"][0]["item"]["reference"] for e in lists["entry"]] == [
        f"DocumentReference/{doc_id}"
    ]


def test_byte_ranges_and_conditional_retrieve(mhd: Any) -> None:
    r = publish(mhd, provide_bundle())
    url = f"/fhir/Binary/{created(r, 'Binary')}"
    part = mhd.get(url, headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == PDF[:10]
    assert part.headers["content-range"] == f"bytes 0-9/{len(PDF)}"
    tail = mhd.get(url, headers={"Range": "bytes=-7"})
    assert tail.status_code == 206 and tail.content == PDF[-7:]
    rest = mhd.get(url, headers={"Range": f"bytes={len(PDF) - 3}-"})
    assert rest.content == PDF[-3:]
    bad = mhd.get(url, headers={"Range": f"bytes={len(PDF)}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(PDF)}"
    assert bad.json()["resourceType"] == "OperationOutcome"
    etag = part.headers["etag"]
    assert mhd.get(url, headers={"If-None-Match": etag}).status_code == 304
    stale = mhd.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == PDF


def test_inline_attachment_data_becomes_a_binary(mhd: Any) -> None:
    att = {"contentType": "application/hl7-cda+xml", "data": b64(CDA), "size": len(CDA)}
    r = publish(mhd, provide_bundle(attachment=att, with_binary=False))
    assert r.status_code == 200, r.text
    doc = mhd.get(f"/fhir/DocumentReference/{created(r, 'DocumentReference')}").json()
    att = doc["content"][0]["attachment"]
    assert "data" not in att and att["hash"] == sha1(CDA)
    assert mhd.get(f"/fhir/{att['url']}", headers={"Accept": "*/*"}).content == CDA


def test_binary_posted_first_then_referenced(mhd: Any) -> None:
    text = "Протокол осмотра: жалоб нет.".encode()
    r = mhd.post(
        "/fhir/Binary",
        content=text,
        headers={**mhd.mo, "Content-Type": "text/plain; charset=utf-8"},
    )
    assert r.status_code == 201, r.text
    bid = r.headers["location"].split("/Binary/")[1].split("/")[0]
    att = {"contentType": "text/plain; charset=utf-8", "url": f"Binary/{bid}"}
    r = publish(mhd, provide_bundle(attachment=att, with_binary=False))
    assert r.status_code == 200, r.text
    doc_id = created(r, "DocumentReference")
    binary = mhd.get(f"/fhir/Binary/{bid}", headers={"Accept": "application/fhir+json"}).json()
    assert binary["securityContext"]["reference"] == f"DocumentReference/{doc_id}"
    assert mhd.get(f"/fhir/Binary/{bid}", headers={"Accept": "*/*"}).content == text
    # another MO may not point its document at this body
    other = {**FJ, **bearer(mhd.settings, "mis", org=LAB)}
    doc = provide_bundle(attachment=att, with_binary=False)["entry"][2]["resource"]
    doc["subject"] = mhd.get(f"/fhir/DocumentReference/{doc_id}").json()["subject"]
    doc["author"] = [{"reference": f"Organization/{LAB}"}]
    doc.pop("custodian")
    assert mhd.post("/fhir/DocumentReference", json=doc, headers=other).status_code == 403


def test_replace_supersedes_and_search_shows_current(mhd: Any) -> None:
    first = publish(mhd, provide_bundle())
    old = created(first, "DocumentReference")
    new_pdf = make_pdf("Выписной эпикриз, исправленный.")
    replacing = provide_bundle(
        new_pdf,
        doc={
            "relatesTo": [{"code": "replaces", "target": {"reference": f"DocumentReference/{old}"}}]
        },
        unique="2",
    )
    r = publish(mhd, replacing)
    assert r.status_code == 200, r.text
    new = created(r, "DocumentReference")
    assert mhd.get(f"/fhir/DocumentReference/{old}").json()["status"] == "superseded"
    pid = mhd.get(f"/fhir/DocumentReference/{new}").json()["subject"]["reference"]
    current = mhd.get(f"/fhir/DocumentReference?subject={pid}").json()
    assert [e["resource"]["id"] for e in current["entry"]] == [new]
    both = mhd.get(f"/fhir/DocumentReference?subject={pid}&status=current,superseded").json()
    assert sorted(e["resource"]["id"] for e in both["entry"]) == sorted([old, new])
    # both bodies stay retrievable
    old_url = mhd.get(f"/fhir/DocumentReference/{old}").json()["content"][0]["attachment"]["url"]
    assert mhd.get(f"/fhir/{old_url}", headers={"Accept": "*/*"}).content == PDF
    # replacing the superseded version again is refused
    again = provide_bundle(
        new_pdf,
        doc={
            "relatesTo": [{"code": "replaces", "target": {"reference": f"DocumentReference/{old}"}}]
        },
        unique="3",
    )
    assert publish(mhd, again).status_code == 422


def test_signature_is_kept_and_signed_bytes_are_identical(mhd: Any) -> None:
    signature = b"-----BEGIN PKCS7-----\nMIIB...GOST R 34.10-2012...\n-----END PKCS7-----\n"
    provenance = {
        "fullUrl": "urn:uuid:prov",
        "resource": {
            "resourceType": "Provenance",
            "target": [{"reference": "urn:uuid:doc"}],
            "recorded": "2026-11-20T10:00:00+03:00",
            "agent": [{"who": {"reference": f"Organization/{GP}"}}],
            "signature": [
                {
                    "type": [
                        {"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1"}
                    ],
                    "when": "2026-11-20T10:00:00+03:00",
                    "who": {"reference": f"Organization/{GP}"},
                    "sigFormat": "application/pkcs7-signature",
                    "data": b64(signature),
                }
            ],
        },
        "request": {"method": "POST", "url": "Provenance"},
    }
    r = publish(mhd, provide_bundle(extra=[provenance]))
    assert r.status_code == 200, r.text
    doc_id, bin_id = created(r, "DocumentReference"), created(r, "Binary")
    prov = mhd.get(f"/fhir/Provenance?target=DocumentReference/{doc_id}").json()["entry"]
    assert base64.b64decode(prov[0]["resource"]["signature"][0]["data"]) == signature
    body = mhd.get(f"/fhir/Binary/{bin_id}", headers={"Accept": "*/*"}).content
    assert hashlib.sha256(body).digest() == hashlib.sha256(PDF).digest()


# --- bad input: each refused with an OperationOutcome, nothing half-written -----------------


def assert_refused(mhd: Any, bundle: dict[str, Any], status: int, fragment: str) -> None:
    before = mhd.get("/fhir/DocumentReference?status=current,superseded&_summary=count").json()
    r = publish(mhd, bundle)
    assert r.status_code == status, r.text
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert fragment in outcome["issue"][0]["diagnostics"], outcome
    after = mhd.get("/fhir/DocumentReference?status=current,superseded&_summary=count").json()
    assert after["total"] == before["total"]
    assert mhd.get("/fhir/List?_summary=count").json()["total"] == 0


def test_document_without_a_body(mhd: Any) -> None:
    att = {"contentType": "application/pdf", "title": "Эпикриз"}
    assert_refused(mhd, provide_bundle(attachment=att, with_binary=False), 422, "has no body")


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [("size", len(PDF) + 1, "size is"), ("hash", sha1(b"other"), "hash (base64 SHA-1)")],
)
def test_hash_or_size_mismatch(mhd: Any, field: str, value: Any, fragment: str) -> None:
    att = {"contentType": "application/pdf", "url": "urn:uuid:body", field: value}
    assert_refused(mhd, provide_bundle(attachment=att), 422, fragment)


@pytest.mark.parametrize(
    ("body", "declared", "fragment"),
    [
        (b"not a pdf at all", "application/pdf", "does not start with %PDF-"),
        (PDF, "text/plain", "the body is application/pdf"),
        (b"<ClinicalDocument><unclosed></ClinicalDocument>", "application/hl7-cda+xml", "XML"),
        (b"<?xml version='1.0'?><Other xmlns='x'/>", "application/hl7-cda+xml", "root element"),
    ],
)
def test_content_type_lie(mhd: Any, body: bytes, declared: str, fragment: str) -> None:
    assert_refused(mhd, provide_bundle(body, declared), 422, fragment)


def test_unknown_patient_with_no_demographics(mhd: Any) -> None:
    bundle = provide_bundle(
        doc={"subject": {"identifier": {"system": GP_PATIENTS, "value": "404404"}}}
    )
    bundle["entry"][1]["resource"].pop("subject")  # the List names no patient either
    bundle["entry"] = bundle["entry"][1:]
    assert_refused(mhd, bundle, 422, "names no patient")


def test_patient_named_by_identifier_is_found(mhd: Any) -> None:
    assert publish(mhd, provide_bundle()).status_code == 200
    bundle = provide_bundle(
        doc={"subject": {"identifier": {"system": GP_PATIENTS, "value": "7000100"}}}, unique="9"
    )
    bundle["entry"][1]["resource"].pop("subject")
    bundle["entry"] = bundle["entry"][1:]
    r = publish(mhd, bundle)
    assert r.status_code == 200, r.text
    doc = mhd.get(f"/fhir/DocumentReference/{created(r, 'DocumentReference')}").json()
    assert doc["subject"]["reference"].startswith("Patient/")


def test_author_organisation_not_the_sender(mhd: Any) -> None:
    bundle = provide_bundle(doc={"author": [{"reference": f"Organization/{LAB}"}]})
    assert_refused(mhd, bundle, 403, "an MO writes only its own")


def test_replace_pointing_at_another_patients_document(mhd: Any) -> None:
    first = publish(mhd, provide_bundle())
    old = created(first, "DocumentReference")
    other = provide_bundle(
        patient=patient_entry("7000200", name=[{"family": "Петров", "given": ["Иван"]}]),
        doc={
            "relatesTo": [{"code": "replaces", "target": {"reference": f"DocumentReference/{old}"}}]
        },
        unique="5",
    )
    r = publish(mhd, other)
    assert r.status_code == 422 and "another patient" in r.text
    assert mhd.get(f"/fhir/DocumentReference/{old}").json()["status"] == "current"


def upload_until_answered(port: int, authorization: str) -> tuple[int, int]:
    """POST a 2 GB chunked PDF to /fhir/Binary over a raw socket, reading the answer as soon as
    the hub gives one; returns (status, bytes sent by then)."""
    chunk = b"%PDF-1.7\n" + b"0" * (64 * 1024 - 9)
    headers = {"Content-Type": "application/pdf", "Authorization": authorization}
    return post_chunked_until_answered(port, "/fhir/Binary", headers, chunk, 2 << 30)


def test_body_over_the_limit_is_refused_while_streaming(client: Any, settings_for: Any) -> None:
    """A 2 GB raw body (sent in chunks, no Content-Length) to a real server is cut at the
    limit: 413 while the client is still sending, and no blob is left (the spool file is an
    anonymous temporary file, closed with the request)."""
    import threading

    import httpx
    import uvicorn

    from hie.fhir.app import create_app
    from hie.hub.runtime import open_hub
    from tests.fixtures.ports import free_port

    settings = settings_for(client.settings.database_url, max_document_bytes=256 * 1024)
    hub = open_hub(settings)
    app = create_app(settings, hub, start_worker=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            threading.Event().wait(0.02)
        status, sent = upload_until_answered(port, bearer(settings)["Authorization"])
        assert status == 413
        assert sent < 16 * 1024 * 1024  # answered at the limit, long before 2 GB were sent
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, headers=bearer(settings), timeout=30) as c:
            with_length = c.post(
                "/fhir/Binary",
                content=b"%PDF-" + b"0" * (300 * 1024),
                headers={"Content-Type": "application/pdf"},
            )
            assert with_length.status_code == 413
            assert with_length.json()["issue"][0]["diagnostics"].startswith("the body is")
            too_big = provide_bundle(make_pdf("x") + b"%" + b"0" * (300 * 1024))
            assert c.post("/fhir", json=too_big, headers=FJ).status_code == 413
    finally:
        server.should_exit = True
        thread.join(10)
    assert list(hub.blobs.iter_keys()) == []
    hub.close()


# --- access: the body follows its document's rules ---------------------------------------


def test_body_access_follows_the_document(mhd: Any) -> None:
    r = publish(mhd, provide_bundle())
    doc_id, bin_id = created(r, "DocumentReference"), created(r, "Binary")
    pid = mhd.get(f"/fhir/DocumentReference/{doc_id}").json()["subject"]["reference"]
    url = f"/fhir/Binary/{bin_id}"
    stranger = bearer(mhd.settings, "clinician", org=LAB)
    assert mhd.get(url, headers={**stranger, "Accept": "*/*"}).status_code == 403
    # once the laboratory's MO treats the patient (an open encounter), its clinician reads it
    enc = encounter(pid.split("/")[1], LAB)
    assert mhd.post("/fhir/Encounter", json=enc, headers=FJ).status_code == 201
    got = mhd.get(url, headers={**stranger, "Accept": "*/*"})
    assert got.status_code == 200 and got.content == PDF
    # the patient reads their own document's body
    gid = golden_id(mhd, pid.split("/")[1])
    own = bearer(mhd.settings, "patient", patient=gid)
    assert mhd.get(url, headers={**own, "Accept": "*/*"}).content == PDF
    other = bearer(mhd.settings, "patient", patient="someone-else")
    assert mhd.get(url, headers={**other, "Accept": "*/*"}).status_code in (403, 404)


def test_binary_meta_cannot_point_at_a_stored_body(mhd: Any) -> None:
    """A client may not name a blob itself (it could name another patient's body)."""
    r = publish(mhd, provide_bundle())
    bid = created(r, "Binary")
    stored = mhd.get(f"/fhir/Binary/{bid}", headers={"Accept": "application/fhir+json"}).json()
    forged = {"resourceType": "Binary", "contentType": "application/pdf", "meta": stored["meta"]}
    forged["meta"].pop("versionId")
    forged["data"] = b64(b"%PDF-1.4 x")
    assert mhd.post("/fhir/Binary", json=forged, headers=mhd.mo).status_code == 422
    assert (
        mhd.patch(
            f"/fhir/Binary/{bid}",
            json=[{"op": "remove", "path": "/securityContext"}],
            headers={**mhd.mo, "Content-Type": "application/json-patch+json"},
        ).status_code
        == 422
    )


# --- publishing waits for the full-text index when it falls behind ----------------------------


def test_publishing_waits_while_the_index_trails_then_goes_ahead(settings_for: Any) -> None:
    import time

    from fastapi.testclient import TestClient

    from hie.fhir.app import create_app
    from hie.hub.outbox import OutboxWorker
    from hie.hub.runtime import open_hub

    settings = settings_for(None, index_max_lag_seconds=0.2, index_lag_wait_seconds=0.8)
    hub = open_hub(settings)
    hub.store.migrate()
    # the outbox worker does not run: the index trails by as long as the test wants
    app = create_app(settings, hub, start_worker=False, index_gate=True)
    with TestClient(app, base_url="http://hub.test", headers=bearer(settings)) as c:
        assert c.post("/fhir", json=as_transaction(lab_registry())).status_code == 200
        mo = {**FJ, **bearer(settings, "mis", org=GP)}
        time.sleep(0.3)  # the registry's events are now older than the allowed lag
        started = time.monotonic()
        held = c.post("/fhir", json=provide_bundle(), headers=mo)
        held_for = time.monotonic() - started
        assert held.status_code == 200, held.text  # held at most the longest wait, then stored
        assert held_for >= 0.75
        # once the indexer has caught up, nothing waits
        OutboxWorker(hub.store, hub.consumers).drain(timeout=60)
        started = time.monotonic()
        free = c.post("/fhir", json=provide_bundle(patient=patient_entry("7000200")), headers=mo)
        assert free.status_code == 200, free.text
        assert time.monotonic() - started < 0.6
        found = c.get("/fhir/DocumentReference/$search-text", params={"q": "пневмония"})
        assert found.json()["total"] >= 1  # the held document was indexed
