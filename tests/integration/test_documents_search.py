"""Documents over HTTP: ``DocumentReference/$search-text`` (full text of the bodies, snippets,
best first) and ``Patient/{id}/$document-timeline``, with the access rules of every search.

Real SQLite (and one PostgreSQL run), the filesystem blob store, the embedded Tantivy index; the
outbox worker extracts and indexes the bodies. Documents are stored as the publish path leaves
them (:func:`tests.fixtures.documents.store_document`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from hie.fhir.document_content import CDA_MEDIA_TYPE
from hie.fhir.document_search import SNIPPET_EXTENSION
from tests.fixtures.auth import bearer
from tests.fixtures.documents import CDA_SECTIONS, make_cda, make_pdf, store_document
from tests.fixtures.records import FJ, closing, encounter, golden_id, person, post

PNEUMONIA = "Внебольничная пневмония нижней доли правого легкого"
ORG_NAMES = {
    "mo-12": "Городская поликлиника № 12",
    "mo-40": "Городская больница № 40",
}
CONSULT_NOTE = ("http://loinc.org", "11488-4", "Консультативное заключение")


@pytest.fixture
def app(request: pytest.FixtureRequest, tmp_path: Path, settings_for: Any) -> Iterator[Any]:
    """The hub's HTTP app (SQLite unless the test asks for ``postgresql`` indirectly), with
    the service role's token by default and the outbox worker drained by hand."""
    from fastapi.testclient import TestClient

    from hie.fhir.app import create_app
    from hie.hub.runtime import open_hub

    backend = getattr(request, "param", "sqlite")
    url = f"sqlite:///{tmp_path / 'hie.db'}"
    if backend == "postgresql":
        url = request.getfixturevalue("pg_server").new_database()
    settings = settings_for(url)
    hub = open_hub(settings)
    hub.store.migrate()
    application = create_app(settings, hub, start_worker=False)
    with TestClient(application, base_url="http://hub.test", headers=bearer(settings)) as c:
        c.hub = hub  # type: ignore[attr-defined]
        c.settings = settings  # type: ignore[attr-defined]
        yield c


def drain(client: Any) -> None:
    client.hub.worker.drain(timeout=60)


def as_(client: Any, role: str, **claims: Any) -> dict[str, str]:
    return bearer(client.settings, role, **claims)


@pytest.fixture
def city(app: Any) -> dict[str, Any]:
    """Two people; A visits MO 12 (open encounter) and has documents from MO 12 and MO 40;
    B has one document. Everything is indexed."""
    for org, name in ORG_NAMES.items():
        res = {"resourceType": "Organization", "id": org, "name": name}
        assert app.put(f"/fhir/Organization/{org}", json=res, headers=FJ).status_code in (200, 201)
    a = post(app, person("Смирнова", "Ольга", "1980-01-02"))["id"]
    b = post(app, person("Кузнецова", "Мария", "1975-05-06"))["id"]
    visit = encounter(a, "mo-12") | {"period": {"start": "2024-02-01T08:00:00Z"}}
    enc_a = post(app, visit)["id"]
    hub = app.hub
    docs = {
        "pdf": store_document(
            hub,
            a,
            make_pdf(PNEUMONIA, "Выписан с улучшением"),
            "application/pdf",
            description="Выписной эпикриз",
            author_org="mo-12",
            encounter=enc_a,
            date="2024-02-03T09:00:00Z",
        ),
        "cda": store_document(
            hub,
            a,
            make_cda(*CDA_SECTIONS),
            CDA_MEDIA_TYPE,
            author_org="mo-40",
            doc_type=CONSULT_NOTE,
            date="2024-03-10T10:00:00Z",
        ),
        "text": store_document(
            hub,
            a,
            "Жалоб нет. <script>alert(1)</script> Пневмонией не болел.".encode(),
            "text/plain",
            doc_type=None,
            date="2023-12-01T10:00:00Z",
        ),
        "locked": store_document(
            hub,
            a,
            make_pdf(PNEUMONIA, user_password="pw"),
            "application/pdf",
            description="Протокол операции",
            author_org="mo-12",
            encounter=enc_a,
            date="2024-02-02T09:00:00Z",
        ),
        "old": store_document(
            hub,
            a,
            "Пневмония, прежняя версия".encode(),
            "text/plain",
            status="superseded",
            author_org="mo-12",
        ),
        "b": store_document(
            hub, b, make_pdf("Правосторонняя пневмония"), "application/pdf", author_org="mo-40"
        ),
    }
    drain(app)
    return {
        "a": a,
        "b": b,
        "golden_a": golden_id(app, a),
        "golden_b": golden_id(app, b),
        "enc_a": enc_a,
        "docs": docs,
    }


def search(client: Any, q: str, extra: str = "", headers: dict[str, str] | None = None) -> Any:
    r = client.get(
        f"/fhir/DocumentReference/$search-text?q={quote(q)}{extra}", headers=headers or {}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["resourceType"] == "Bundle" and body["type"] == "searchset"
    return body


def ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def snippet(entry: dict[str, Any]) -> str:
    (ext,) = [x for x in entry["search"]["extension"] if x["url"] == SNIPPET_EXTENSION]
    return str(ext["valueString"])


# --- $search-text ------------------------------------------------------------------------------


def test_search_text_finds_bodies_by_word_form_with_snippets(app, city) -> None:  # type: ignore[no-untyped-def]
    d = city["docs"]
    found = search(app, "пневмонии")
    # the bodies' text, every word form; current documents by default, as ITI-67
    assert sorted(ids(found)) == sorted([d["pdf"], d["cda"], d["text"], d["b"]])
    assert d["locked"] not in ids(found)  # encrypted: only its metadata is searchable
    assert found["total"] == len(found["entry"])
    scores = [e["search"]["score"] for e in found["entry"]]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    for entry in found["entry"]:
        assert entry["search"]["mode"] == "match"
        assert (
            entry["fullUrl"] == f"http://hub.test/fhir/DocumentReference/{entry['resource']['id']}"
        )
        assert "<mark>" in snippet(entry)
    by_id = {e["resource"]["id"]: e for e in found["entry"]}
    assert "<mark>пневмония</mark>" in snippet(by_id[d["pdf"]]).lower()
    assert "<mark>Пневмония</mark>" in snippet(by_id[d["cda"]])
    # the body's markup is shown as text, never as markup
    text_snippet = snippet(by_id[d["text"]])
    assert "<script>" not in text_snippet and "&lt;script&gt;" in text_snippet
    # the metadata is searched too: the encrypted document by its description
    assert ids(search(app, "протокол операции")) == [d["locked"]]
    # status filter; a CDA's table text
    both = ids(search(app, "пневмония", "&status=current,superseded"))
    assert d["old"] in both and d["pdf"] in both
    assert ids(search(app, "пневмония", "&status=superseded")) == [d["old"]]
    assert ids(search(app, "гемоглобин")) == [d["cda"]]


def test_search_text_for_one_person(app, city) -> None:  # type: ignore[no-untyped-def]
    d = city["docs"]
    mine = {d["pdf"], d["cda"], d["text"]}
    for pid in (city["golden_a"], city["a"], f"Patient/{city['a']}"):
        got = set(ids(search(app, "пневмония", f"&patient={pid}&status=current")))
        assert got == mine, pid
    assert ids(search(app, "пневмония", f"&patient={city['b']}")) == [d["b"]]


def test_search_text_pages(app, city) -> None:  # type: ignore[no-untyped-def]
    seen: list[str] = []
    url: str | None = f"/fhir/DocumentReference/$search-text?q={quote('пневмония')}&_count=2"
    totals = set()
    while url:
        r = app.get(url)
        assert r.status_code == 200, r.text
        page = r.json()
        totals.add(page["total"])
        assert len(page["entry"]) <= 2
        seen.extend(ids(page))
        url = next((x["url"] for x in page["link"] if x["relation"] == "next"), None)
        if url:
            url = url.split("hub.test", 1)[-1]
    assert len(totals) == 1 and len(seen) == totals.pop() == len(set(seen))


@pytest.mark.parametrize(
    "query",
    [
        "",
        "q=",
        "q=%20%20",
        "q=!!!%20---",
        "q=x&_count=-1",
        "q=x&foo=1",
        "q=x&q=y",
        "q=x&_offset=99999",
    ],
)
def test_bad_queries_are_400(app, query: str) -> None:  # type: ignore[no-untyped-def]
    r = app.get(f"/fhir/DocumentReference/$search-text?{query}")
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "error"


def test_search_text_follows_the_grant(app, city) -> None:  # type: ignore[no-untyped-def]
    d = city["docs"]
    a_docs = {d["pdf"], d["cda"], d["text"]}
    # an MO with no care relationship with anyone finds nothing
    stranger = as_(app, "clinician", org="mo-77")
    assert search(app, "пневмония", headers=stranger)["total"] == 0
    assert search(app, "пневмония", f"&patient={city['a']}", headers=stranger)["entry"] == []
    # MO 12 treats A (open encounter): A's documents, not B's
    mo12 = as_(app, "clinician", org="mo-12")
    assert set(ids(search(app, "пневмония", headers=mo12))) == a_docs
    # the patient sees their own documents only, whatever they ask for
    me = as_(app, "patient", patient=city["golden_a"])
    assert set(ids(search(app, "пневмония", headers=me))) == a_docs
    assert search(app, "пневмония", f"&patient={city['b']}", headers=me)["total"] == 0
    other = as_(app, "patient", patient=city["golden_b"])
    assert ids(search(app, "пневмония", headers=other)) == [d["b"]]
    # A closes her record to MO 12: gone from its searches at once
    post(app, closing(city["a"], "deny", ["mo-12"]))
    assert search(app, "пневмония", headers=mo12)["total"] == 0
    assert set(ids(search(app, "пневмония", headers=me))) == a_docs  # not the patient's own
    # an official never gets rows
    r = app.get(
        f"/fhir/DocumentReference/$search-text?q={quote('пневмония')}",
        headers=as_(app, "official"),
    )
    assert r.status_code == 403


def test_search_text_is_audited(app, city) -> None:  # type: ignore[no-untyped-def]
    d = city["docs"]
    me = as_(app, "patient", patient=city["golden_a"])
    found = search(app, "улучшение", headers=me)
    assert ids(found) == [d["pdf"]]
    records, _ = app.hub.audit.records(refs=[f"Patient/{city['a']}"], count=10)
    rec = next(r for r in records if "$search-text" in r.path)
    assert rec.subtype == "search" and rec.action == "R"
    assert f"DocumentReference/{d['pdf']}" in rec.entities
    assert city["a"] in rec.patients
    assert "patient" in rec.roles


# --- $document-timeline ------------------------------------------------------------------------


def timeline(client: Any, pid: str, group: str | None = None, **kw: Any) -> Any:
    url = f"/fhir/Patient/{pid}/$document-timeline" + (f"?group={group}" if group else "")
    r = client.get(url, **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def test_timeline_groups_by_encounter_by_default(app, city) -> None:  # type: ignore[no-untyped-def]
    d = city["docs"]
    out = timeline(app, city["golden_a"])
    assert out["group"] == "encounter" and out["truncated"] is False
    assert out["total"] == 4  # current documents only: not the superseded one, not B's
    groups = {g["key"]: g for g in out["groups"]}
    assert set(groups) == {f"Encounter/{city['enc_a']}", "none"}
    visit = groups[f"Encounter/{city['enc_a']}"]
    assert visit["label"] == "Амбулаторный приём 01.02.2024, Городская поликлиника № 12"
    assert [x["id"] for x in visit["documents"]] == [d["pdf"], d["locked"]]  # newest first
    assert groups["none"]["label"] == "Без случая обращения"
    assert [x["id"] for x in groups["none"]["documents"]] == [d["cda"], d["text"]]
    # groups in order of their newest document
    assert [g["key"] for g in out["groups"]] == ["none", f"Encounter/{city['enc_a']}"]
    pdf = visit["documents"][0]
    assert pdf["date"] == "2024-02-03T09:00:00Z"
    assert pdf["date_display"] == "03.02.2024 12:00"  # Moscow time
    assert pdf["type"] == "Выписной эпикриз" and pdf["title"] == "Выписной эпикриз"
    assert pdf["status"] == "current"
    assert pdf["author_org"] == {
        "reference": "Organization/mo-12",
        "display": "Городская поликлиника № 12",
    }
    assert pdf["encounter"] == f"Encounter/{city['enc_a']}"
    assert pdf["content_type"] == "application/pdf" and pdf["size"] > 0
    assert pdf["indexable"] is True
    assert visit["documents"][1]["indexable"] is False  # the encrypted one
    # the source record's id gives the same timeline
    assert timeline(app, city["a"])["groups"] == out["groups"]


def test_timeline_by_organization_and_type(app, city) -> None:  # type: ignore[no-untyped-def]
    d = city["docs"]
    by_org = timeline(app, city["a"], "organization")
    labels = {g["key"]: (g["label"], [x["id"] for x in g["documents"]]) for g in by_org["groups"]}
    assert labels == {
        "Organization/mo-40": ("Городская больница № 40", [d["cda"]]),
        "Organization/mo-12": ("Городская поликлиника № 12", [d["pdf"], d["locked"]]),
        "none": ("Организация не указана", [d["text"]]),
    }
    by_type = timeline(app, city["a"], "type")
    labels = {g["key"]: (g["label"], [x["id"] for x in g["documents"]]) for g in by_type["groups"]}
    assert labels == {
        "http://loinc.org|11488-4": ("Консультативное заключение", [d["cda"]]),
        "http://loinc.org|18842-5": ("Выписной эпикриз", [d["pdf"], d["locked"]]),
        "none": ("Тип документа не указан", [d["text"]]),
    }
    r = app.get(f"/fhir/Patient/{city['a']}/$document-timeline?group=author")
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"


def test_timeline_follows_the_grant(app, city) -> None:  # type: ignore[no-untyped-def]
    path = f"/fhir/Patient/{city['golden_a']}/$document-timeline"
    assert app.get(path, headers=as_(app, "clinician", org="mo-77")).status_code == 403
    assert app.get(path, headers=as_(app, "patient", patient=city["golden_b"])).status_code == 403
    assert app.get("/fhir/Patient/nobody/$document-timeline").status_code == 404
    mine = timeline(app, city["golden_a"], headers=as_(app, "patient", patient=city["golden_a"]))
    assert mine["total"] == 4
    mo12 = timeline(app, city["a"], headers=as_(app, "clinician", org="mo-12"))
    assert mo12["total"] == 4
    records, _ = app.hub.audit.records(refs=[f"Patient/{city['a']}"], count=20)
    rec = next(r for r in records if "$document-timeline" in r.path)
    assert rec.subtype == "search"
    assert f"DocumentReference/{city['docs']['pdf']}" in rec.entities


def test_indexable_is_null_until_indexed(app, city) -> None:  # type: ignore[no-untyped-def]
    late = store_document(app.hub, city["a"], b"later", "text/plain", date="2025-01-01T00:00:00Z")
    out = timeline(app, city["a"], "type")
    flags = {x["id"]: x["indexable"] for g in out["groups"] for x in g["documents"]}
    assert flags[late] is None
    drain(app)
    out = timeline(app, city["a"], "type")
    assert {x["id"]: x["indexable"] for g in out["groups"] for x in g["documents"]}[late] is True


# --- the same on PostgreSQL ------------------------------------------------------------------


@pytest.mark.parametrize("app", ["postgresql"], indirect=True)
def test_search_and_timeline_on_postgresql(app) -> None:  # type: ignore[no-untyped-def]
    a = post(app, person("Смирнова", "Ольга", "1980-01-02"))["id"]
    b = post(app, person("Кузнецова", "Мария", "1975-05-06"))["id"]
    post(app, encounter(a, "mo-12"))
    doc = store_document(app.hub, a, make_pdf(PNEUMONIA), "application/pdf", author_org="mo-12")
    store_document(app.hub, b, make_pdf(PNEUMONIA), "application/pdf")
    locked = store_document(app.hub, a, make_pdf("x", user_password="pw"), "application/pdf")
    drain(app)
    mo12 = as_(app, "clinician", org="mo-12")
    found = search(app, "пневмонии", headers=mo12)
    assert ids(found) == [doc] and "<mark>" in snippet(found["entry"][0])
    golden = golden_id(app, a)
    assert ids(search(app, "пневмонии", f"&patient={golden}")) == [doc]
    out = timeline(app, golden, headers=mo12)
    flags = {x["id"]: x["indexable"] for g in out["groups"] for x in g["documents"]}
    assert flags == {doc: True, locked: False}
