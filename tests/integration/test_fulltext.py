"""``_content`` / ``_text`` over HTTP: the outbox worker feeds the embedded Tantivy index, and
FHIR searches find Russian text by word form, on SQLite and PostgreSQL resource stores."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

from tests.integration.test_fhir_api import FJ, assert_outcome, create, ids, patient

PNEUMONIA = "Внебольничная пневмония нижней доли правого лёгкого"
HYPERTENSION = "Гипертоническая болезнь второй стадии"


def report(pid: str, conclusion: str) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "36643-5"}],
            "text": "Рентгенография органов грудной клетки",
        },
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": "2024-02-03T09:00:00Z",
        "conclusion": conclusion,
    }


def condition(pid: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "urn:oid:1.2.643.5.1.13.13.11.1005", "code": "I11.9"}]},
        "note": [{"text": text}],
    }


def document(pid: str, description: str) -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": f"Patient/{pid}"},
        "description": description,
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "title": "эпикриз.txt",
                    "data": base64.b64encode(description.encode()).decode(),
                }
            }
        ],
    }


def content_ids(
    client, rtype: str, text: str, extra: str = "", param: str = "_content"
) -> list[str]:  # type: ignore[no-untyped-def]
    r = client.get(f"/fhir/{rtype}?{param}={quote(text)}{extra}")
    assert r.status_code == 200, r.text
    return sorted(ids(r.json()))


def drain(client) -> None:  # type: ignore[no-untyped-def]
    client.hub.worker.drain(timeout=30)


def test_content_finds_russian_text_by_word_form(client) -> None:  # type: ignore[no-untyped-def]
    pid = create(client, patient())["id"]
    dr = create(client, report(pid, PNEUMONIA))["id"]
    cond = create(client, condition(pid, HYPERTENSION))["id"]
    doc = create(client, document(pid, "Выписной эпикриз: пневмония, выздоровление"))["id"]
    # not indexed until the outbox worker has run: the index, not SQL, answers _content
    assert content_ids(client, "DiagnosticReport", "пневмонии") == []
    drain(client)
    # other word forms of the same words (Russian stemming), ё written as е
    assert content_ids(client, "DiagnosticReport", "пневмонии") == [dr]
    assert content_ids(client, "DiagnosticReport", "правое легкое") == [dr]
    assert content_ids(client, "DiagnosticReport", "рентгенографии грудной") == [dr]
    assert content_ids(client, "DiagnosticReport", "пневмонии", param="_text") == [dr]
    assert content_ids(client, "Condition", "гипертонической болезни") == [cond]
    assert content_ids(client, "DocumentReference", "эпикризы") == [doc]
    assert content_ids(client, "DocumentReference", "пневмонией") == [doc]
    # every word must match; the type restricts
    assert content_ids(client, "DiagnosticReport", "пневмония болезнь") == []
    assert content_ids(client, "Condition", "пневмония") == []
    # the searchset is an ordinary one: _summary=count counts the matches
    r = client.get(f"/fhir/DiagnosticReport?_content={quote('пневмония')}&_summary=count")
    assert r.json()["total"] == 1


def test_content_on_a_type_without_full_text_is_400(client) -> None:  # type: ignore[no-untyped-def]
    r = client.get(f"/fhir/Observation?_content={quote('пневмония')}")
    body = assert_outcome(r, 400)
    assert "Observation" in body["issue"][0]["diagnostics"]
    assert_outcome(client.get("/fhir/Patient?_text=x"), 400)


def test_update_replaces_and_delete_removes_text(client) -> None:  # type: ignore[no-untyped-def]
    pid = create(client, patient())["id"]
    res = create(client, report(pid, PNEUMONIA))
    dr = res["id"]
    drain(client)
    assert content_ids(client, "DiagnosticReport", "пневмония") == [dr]

    updated = report(pid, HYPERTENSION) | {"id": dr}
    r = client.put(f"/fhir/DiagnosticReport/{dr}", json=updated, headers=FJ)
    assert r.status_code == 200, r.text
    drain(client)
    assert content_ids(client, "DiagnosticReport", "пневмония") == []
    assert content_ids(client, "DiagnosticReport", "болезнью") == [dr]

    assert client.delete(f"/fhir/DiagnosticReport/{dr}").status_code in (200, 204)
    drain(client)
    assert content_ids(client, "DiagnosticReport", "болезнью") == []
    assert content_ids(client, "DiagnosticReport", "рентгенография") == []
    assert client.hub.search_index.ids_matching("болезни", "DiagnosticReport") == []


def test_content_combines_with_other_parameters(client) -> None:  # type: ignore[no-untyped-def]
    p1 = create(client, patient(snils="112-233-445 95"))["id"]
    p2 = create(client, patient(family="Петров", given="Пётр", snils="123-456-789 64"))["id"]
    a = create(client, report(p1, PNEUMONIA))["id"]
    b = create(client, report(p2, "Правосторонняя пневмония"))["id"]
    c = create(client, report(p1, HYPERTENSION))["id"]
    drain(client)
    assert content_ids(client, "DiagnosticReport", "пневмония") == sorted([a, b])
    assert content_ids(client, "DiagnosticReport", "пневмония", f"&subject=Patient/{p1}") == [a]
    assert content_ids(client, "DiagnosticReport", "пневмония", f"&subject=Patient/{p2}") == [b]
    assert content_ids(client, "DiagnosticReport", "болезни", f"&subject=Patient/{p2}") == []
    assert content_ids(client, "DiagnosticReport", "болезни", "&status=final") == [c]
    assert content_ids(client, "DiagnosticReport", "болезни", "&status=preliminary") == []
    # _include still works on the filtered page
    r = client.get(
        f"/fhir/DiagnosticReport?_content={quote('пневмония')}&subject=Patient/{p2}"
        "&_include=DiagnosticReport:subject"
    )
    assert ids(r.json()) == [b]
    assert ids(r.json(), "include") == [p2]


def test_content_for_a_person_covers_every_mo_record(client) -> None:  # type: ignore[no-untyped-def]
    snils = "112-233-445 95"
    ids = [{"system": "urn:oid:1.2.643.100.3", "value": snils}]
    base = {"resourceType": "Patient", "name": [{"family": "Иванова", "given": ["Анна"]}]}
    a = client.post("/fhir/Patient", json={**base, "identifier": ids}, headers=FJ).json()["id"]
    b = client.post("/fhir/Patient", json={**base, "identifier": ids}, headers=FJ).json()["id"]
    d1 = client.post("/fhir/DocumentReference", json=document(a, "пневмония"), headers=FJ)
    d2 = client.post("/fhir/DocumentReference", json=document(b, "пневмонии нет"), headers=FJ)
    drain(client)
    # either MO's record of the person finds both MOs' documents
    for pid in (a, b):
        r = client.get(f"/fhir/DocumentReference?patient={pid}&_content=пневмония").json()
        found = {e["resource"]["id"] for e in r.get("entry", [])}
        assert found == {d1.json()["id"], d2.json()["id"]}
