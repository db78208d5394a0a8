"""Reference data (НСИ) over HTTP on SQLite and PostgreSQL: the terminology operations in their
GET and POST forms, versions, value set expansion, translation, the code check other parts use,
and the loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from hie.fhir.service import FhirService
from hie.registries.terminology import (
    LoadError,
    Terminology,
    flag_unknown,
    load_builtin,
    load_files,
    terminology_for,
)

FJ = {"Content-Type": "application/fhir+json"}
ICD = "urn:oid:1.2.643.5.1.13.13.11.1005"
LOINC = "http://loinc.org"
HUB = "https://hie.spb.ru/fhir"
VACCINE = f"{HUB}/CodeSystem/vaccine"
CVX = "http://hl7.org/fhir/sid/cvx"


@pytest.fixture
def tx(client):  # type: ignore[no-untyped-def]
    """The client with the shipped reference data loaded."""
    load_builtin(client.app.state.fhir)
    return client


def params(**values: Any) -> dict[str, Any]:
    """A Parameters resource: str → valueString (valueCode for a few), dict → by shape."""
    out = []
    for name, value in values.items():
        if isinstance(value, bool):
            out.append({"name": name, "valueBoolean": value})
        elif isinstance(value, int):
            out.append({"name": name, "valueInteger": value})
        elif isinstance(value, dict) and "resourceType" in value:
            out.append({"name": name, "resource": value})
        elif isinstance(value, dict) and "coding" in value:
            out.append({"name": name, "valueCodeableConcept": value})
        elif isinstance(value, dict):
            out.append({"name": name, "valueCoding": value})
        elif name in ("system", "url", "source", "target", "targetsystem"):
            out.append({"name": name, "valueUri": value})
        elif name in ("code", "displayLanguage"):
            out.append({"name": name, "valueCode": value})
        else:
            out.append({"name": name, "valueString": value})
    return {"resourceType": "Parameters", "parameter": out}


def out(body: dict[str, Any], name: str) -> Any:
    """The value of the first output parameter ``name`` (None when absent)."""
    assert body["resourceType"] == "Parameters", body
    for p in body.get("parameter", []):
        if p["name"] == name:
            return next((v for k, v in p.items() if k.startswith("value")), p.get("part"))
    return None


def parts(body: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Every output parameter ``name`` with parts, as {part name: value}."""
    return [
        {q["name"]: next(v for k, v in q.items() if k.startswith("value")) for q in p["part"]}
        for p in body["parameter"]
        if p["name"] == name
    ]


def ok(r) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    return r.json()  # type: ignore[no-any-return]


def assert_outcome(r, status: int, code: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["details"]["coding"][0]["code"] == code, body
    return body  # type: ignore[no-any-return]


def codes(vs: dict[str, Any]) -> list[str]:
    return [c["code"] for c in vs["expansion"].get("contains", [])]


def code_system(
    url: str, version: str, concepts: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "resourceType": "CodeSystem",
        "url": url,
        "version": version,
        "name": "TestLab",
        "status": "active",
        "content": "complete",
        "concept": concepts,
        **extra,
    }


# --- the shipped data as ordinary resources ----------------------------------------------------


def test_builtin_load_is_idempotent_and_plain_fhir(tx) -> None:  # type: ignore[no-untyped-def]
    again = load_builtin(tx.app.state.fhir)
    assert again.created == [] and again.updated == [] and len(again.unchanged) >= 20
    bundle = ok(tx.get("/fhir/CodeSystem", params={"url": LOINC}))
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["loinc-hie"]
    assert (
        ok(tx.get("/fhir/CodeSystem/loinc-hie/_history"))["entry"][0]["response"]["etag"] == 'W/"1"'
    )
    found = ok(tx.get("/fhir/CodeSystem", params={"code": "J18.9"}))  # concept.code is top level
    assert found["entry"] == []
    found = ok(tx.get("/fhir/CodeSystem", params={"code": "718-7", "version": "hie-2026.11"}))
    assert [e["resource"]["id"] for e in found["entry"]] == ["loinc-hie"]
    found = ok(tx.get("/fhir/ValueSet", params={"reference": LOINC, "_sort": "_id"}))
    assert [e["resource"]["id"] for e in found["entry"]] == ["document-type", "lab-test", "loinc"]
    found = ok(tx.get("/fhir/ConceptMap", params={"source-system": VACCINE}))
    assert [e["resource"]["id"] for e in found["entry"]] == ["vaccine-to-cvx"]
    found = ok(tx.get("/fhir/ConceptMap", params={"target-code": "58410-2"}))
    assert [e["resource"]["id"] for e in found["entry"]] == ["lab-panel-to-loinc"]
    types = {r["type"] for r in ok(tx.get("/fhir/metadata"))["rest"][0]["resource"]}
    assert {"CodeSystem", "ValueSet", "ConceptMap"} <= types


# --- $lookup ----------------------------------------------------------------------------------


def test_lookup_get_and_post(tx) -> None:  # type: ignore[no-untyped-def]
    body = ok(tx.get("/fhir/CodeSystem/$lookup", params={"system": LOINC, "code": "718-7"}))
    assert out(body, "name") == "LOINC" and out(body, "version") == "hie-2026.11"
    assert out(body, "display") == "Hemoglobin [Mass/volume] in Blood"
    (designation,) = parts(body, "designation")
    assert designation["language"] == "ru" and designation["value"] == "Гемоглобин"
    assert {"code": "EXAMPLE_UCUM_UNITS", "value": "g/L"} in parts(body, "property")
    coding = {"system": LOINC, "code": "2951-2"}
    body = ok(
        tx.post(
            "/fhir/CodeSystem/$lookup", json=params(coding=coding, displayLanguage="ru"), headers=FJ
        )
    )
    assert out(body, "display") == "Натрий"
    # МКБ-10 is case-insensitive and hierarchical: chapter → code
    body = ok(tx.get("/fhir/CodeSystem/$lookup", params={"system": ICD, "code": "j18.9"}))
    assert out(body, "display") == "Пневмония неуточненная"
    assert {"code": "parent", "value": "J00-J99"} in parts(body, "property")
    body = ok(
        tx.post(
            "/fhir/CodeSystem/$lookup",
            json=params(system=ICD, code="J00-J99", property="child"),
            headers=FJ,
        )
    )
    children = [p["value"] for p in parts(body, "property")]
    assert "J18.9" in children and "I10" not in children
    assert {p["code"] for p in parts(body, "property")} == {"child"}


def test_lookup_errors(tx) -> None:  # type: ignore[no-untyped-def]
    assert_outcome(
        tx.get("/fhir/CodeSystem/$lookup", params={"system": "http://nowhere.test", "code": "1"}),
        404,
        "HIE-1003",
    )
    body = assert_outcome(
        tx.get("/fhir/CodeSystem/$lookup", params={"system": LOINC, "code": "0000-0"}),
        404,
        "HIE-1003",
    )
    assert "0000-0" in body["issue"][0]["diagnostics"]
    assert_outcome(tx.get("/fhir/CodeSystem/$lookup", params={"system": LOINC}), 400, "HIE-1001")
    assert_outcome(tx.get("/fhir/CodeSystem/$lookup", params={"code": "718-7"}), 400, "HIE-1001")
    assert_outcome(
        tx.post("/fhir/CodeSystem/$lookup", json={"resourceType": "Patient"}, headers=FJ),
        400,
        "HIE-1001",
    )
    assert_outcome(tx.post("/fhir/CodeSystem/$lookup", content=b"{", headers=FJ), 400, "HIE-1001")
    assert_outcome(
        tx.post("/fhir/CodeSystem/$lookup", content=b"x", headers={"Content-Type": "text/plain"}),
        415,
        "HIE-1009",
    )
    assert_outcome(
        tx.get("/fhir/ValueSet/$expand", params={"url": "http://nowhere.test/vs"}), 404, "HIE-1003"
    )
    assert_outcome(tx.get("/fhir/ValueSet/nowhere/$expand"), 404, "HIE-1003")
    assert_outcome(tx.get("/fhir/ValueSet/$expand"), 400, "HIE-1001")
    assert_outcome(
        tx.get("/fhir/ValueSet/$expand", params={"url": f"{HUB}/ValueSet/mkb-10", "count": "-1"}),
        400,
        "HIE-1001",
    )


# --- $validate-code -----------------------------------------------------------------------------


def test_validate_code_on_code_systems(tx) -> None:  # type: ignore[no-untyped-def]
    url = "/fhir/CodeSystem/$validate-code"
    body = ok(tx.get(url, params={"url": LOINC, "code": "718-7"}))
    assert out(body, "result") is True and out(body, "message") is None
    assert out(body, "display") == "Hemoglobin [Mass/volume] in Blood"
    # a wrong display is a warning: the code is still valid
    body = ok(tx.get(url, params={"url": LOINC, "code": "718-7", "display": "Кровь"}))
    assert out(body, "result") is True and "does not match" in out(body, "message")
    # the Russian designation counts as a right display, case-insensitively
    body = ok(tx.get(url, params={"url": LOINC, "code": "718-7", "display": "гемоглобин"}))
    assert out(body, "result") is True and out(body, "message") is None
    body = ok(tx.get(url, params={"url": LOINC, "code": "0000-0"}))
    assert out(body, "result") is False and "fragment" in out(body, "message")
    # instance level, GET and POST; a codeableConcept is valid when one of its codings is
    body = ok(tx.get("/fhir/CodeSystem/mkb-10-hie/$validate-code", params={"code": "I10"}))
    assert out(body, "result") is True
    cc = {"coding": [{"system": ICD, "code": "X99.9"}, {"system": ICD, "code": "E11.9"}]}
    body = ok(
        tx.post(
            "/fhir/CodeSystem/mkb-10-hie/$validate-code",
            json=params(codeableConcept=cc),
            headers=FJ,
        )
    )
    assert out(body, "result") is True and out(body, "display").startswith("Инсулиннезависимый")
    body = ok(tx.post(url, json=params(coding={"system": ICD, "code": "X99.9"}), headers=FJ))
    assert out(body, "result") is False
    assert_outcome(tx.get(url, params={"url": "http://nowhere.test", "code": "1"}), 404, "HIE-1003")
    assert_outcome(tx.get(url, params={"url": LOINC}), 400, "HIE-1001")
    assert_outcome(
        tx.get("/fhir/CodeSystem/nowhere/$validate-code", params={"code": "1"}), 404, "HIE-1003"
    )


def test_validate_code_in_value_sets(tx) -> None:  # type: ignore[no-untyped-def]
    lab = f"{HUB}/ValueSet/lab-test"
    url = "/fhir/ValueSet/$validate-code"
    body = ok(
        tx.get(url, params={"url": lab, "system": LOINC, "code": "718-7", "display": "Гемоглобин"})
    )
    assert out(body, "result") is True and out(body, "message") is None
    body = ok(
        tx.get(url, params={"url": lab, "system": LOINC, "code": "18842-5"})
    )  # a document type
    assert out(body, "result") is False and "not in value set" in out(body, "message")
    body = ok(tx.get(url, params={"url": lab, "code": "2951-2"}))  # system inferred
    assert out(body, "result") is True
    coding = {"system": LOINC, "code": "18842-5"}
    body = ok(
        tx.post(
            "/fhir/ValueSet/document-type/$validate-code", json=params(coding=coding), headers=FJ
        )
    )
    assert out(body, "result") is True and out(body, "display") == "Discharge summary"
    body = ok(
        tx.get(
            "/fhir/ValueSet/document-type/$validate-code",
            params={"system": LOINC, "code": "18842-5", "displayLanguage": "ru"},
        )
    )
    assert out(body, "display") == "Выписной эпикриз"
    assert_outcome(
        tx.get(url, params={"url": "http://nowhere.test/vs", "system": LOINC, "code": "1"}),
        404,
        "HIE-1003",
    )
    assert_outcome(tx.get(url, params={"url": lab}), 400, "HIE-1001")


# --- $expand ---------------------------------------------------------------------------------


def test_expand_text_filter_in_russian_and_paging(tx) -> None:  # type: ignore[no-untyped-def]
    icd = f"{HUB}/ValueSet/mkb-10"
    vs = ok(tx.get("/fhir/ValueSet/$expand", params={"url": icd, "filter": "пневм"}))
    assert codes(vs) == ["J18.9"] and vs["expansion"]["total"] == 1
    assert vs["expansion"]["contains"][0] == {
        "system": ICD,
        "version": "hie-2026.11",
        "code": "J18.9",
        "display": "Пневмония неуточненная",
    }
    assert {"name": "filter", "valueString": "пневм"} in vs["expansion"]["parameter"]
    assert {"name": "version", "valueUri": f"{ICD}|hie-2026.11"} in vs["expansion"]["parameter"]
    vs = ok(tx.post("/fhir/ValueSet/$expand", json=params(url=icd, filter="ГИПЕРТЕНЗ"), headers=FJ))
    assert codes(vs) == ["I11.9", "I10"]  # a display starting with the filter ranks first
    vs = ok(tx.get("/fhir/ValueSet/lab-test/$expand", params={"filter": "холестерин лпвп"}))
    assert codes(vs) == ["14646-4"]  # by the Russian designation
    # paging: offset/count walk the whole expansion, total stays the same
    whole = ok(tx.get("/fhir/ValueSet/mkb-10/$expand"))
    total = whole["expansion"]["total"]
    assert total == len(codes(whole)) == 46
    seen: list[str] = []
    for offset in range(0, total, 10):
        page = ok(
            tx.get("/fhir/ValueSet/mkb-10/$expand", params={"offset": str(offset), "count": "10"})
        )
        assert page["expansion"]["total"] == total and page["expansion"]["offset"] == offset
        seen += codes(page)
    assert seen == codes(whole)
    page = ok(tx.post("/fhir/ValueSet/mkb-10/$expand", json=params(count=0), headers=FJ))
    assert page["expansion"]["total"] == total and "contains" not in page["expansion"]


def test_expand_hierarchy_filters_and_composition(tx) -> None:  # type: ignore[no-untyped-def]
    respiratory = {
        "resourceType": "ValueSet",
        "url": "http://example.test/ValueSet/respiratory",
        "status": "active",
        "compose": {
            "include": [
                {
                    "system": ICD,
                    "filter": [{"property": "concept", "op": "is-a", "value": "J00-J99"}],
                }
            ],
            "exclude": [{"system": ICD, "concept": [{"code": "J45.9"}]}],
        },
    }
    r = tx.put("/fhir/ValueSet/respiratory", json={**respiratory, "id": "respiratory"}, headers=FJ)
    assert r.status_code == 201, r.text
    vs = ok(tx.get("/fhir/ValueSet/respiratory/$expand"))
    assert codes(vs) == ["J00-J99", "J06.9", "J18.9", "J20.9", "J44.9"]
    # descendent-of leaves the chapter out; an inline value set needs POST
    inline = {
        **respiratory,
        "compose": {
            "include": [
                {
                    "system": ICD,
                    "filter": [{"property": "concept", "op": "descendent-of", "value": "J00-J99"}],
                }
            ]
        },
    }
    vs = ok(tx.post("/fhir/ValueSet/$expand", json=params(valueSet=inline), headers=FJ))
    assert "J00-J99" not in codes(vs) and "J45.9" in codes(vs)
    # a value set built from other value sets: the intersection of its valueSet entries
    both = {
        "resourceType": "ValueSet",
        "status": "active",
        "compose": {
            "include": [
                {"valueSet": ["http://example.test/ValueSet/respiratory", f"{HUB}/ValueSet/mkb-10"]}
            ]
        },
    }
    vs = ok(
        tx.post("/fhir/ValueSet/$expand", json=params(valueSet=both, filter="бронх"), headers=FJ)
    )
    assert codes(vs) == ["J20.9"]
    # an updated value set is expanded afresh
    respiratory["compose"]["exclude"] = []
    assert (
        tx.put(
            "/fhir/ValueSet/respiratory", json={**respiratory, "id": "respiratory"}, headers=FJ
        ).status_code
        == 200
    )
    assert "J45.9" in codes(ok(tx.get("/fhir/ValueSet/respiratory/$expand")))
    cyclic = {
        "resourceType": "ValueSet",
        "id": "cyclic",
        "url": "http://example.test/ValueSet/cyclic",
        "status": "active",
        "compose": {"include": [{"valueSet": ["http://example.test/ValueSet/cyclic"]}]},
    }
    assert tx.put("/fhir/ValueSet/cyclic", json=cyclic, headers=FJ).status_code == 201
    assert_outcome(tx.get("/fhir/ValueSet/cyclic/$expand"), 422, "HIE-1012")


def test_expand_is_limited_without_paging(client) -> None:  # type: ignore[no-untyped-def]
    svc: FhirService = client.app.state.fhir
    term = terminology_for(svc.store)
    cs = code_system(
        "http://example.test/big",
        "1",
        [{"code": f"C{i:05d}", "display": f"Код {i}"} for i in range(30)],
    )
    assert client.post("/fhir/CodeSystem", json=cs, headers=FJ).status_code == 201
    vs = {
        "resourceType": "ValueSet",
        "id": "big",
        "url": "http://example.test/vs/big",
        "status": "active",
        "compose": {"include": [{"system": "http://example.test/big"}]},
    }
    assert client.put("/fhir/ValueSet/big", json=vs, headers=FJ).status_code == 201
    term.max_expansion = 20
    try:
        body = assert_outcome(client.get("/fhir/ValueSet/big/$expand"), 400, "HIE-1001")
        assert body["issue"][0]["code"] == "too-costly"
        page = ok(client.get("/fhir/ValueSet/big/$expand", params={"count": "15", "offset": "20"}))
        assert codes(page) == [f"C{i:05d}" for i in range(20, 30)]
        assert codes(ok(client.get("/fhir/ValueSet/big/$expand", params={"filter": "код 2"})))[
            :2
        ] == ["C00002", "C00020"]
    finally:
        term.max_expansion = 10_000


# --- versions ---------------------------------------------------------------------------------


def test_versions_coexist_latest_is_default_old_stays_resolvable(client) -> None:  # type: ignore[no-untyped-def]
    url = "http://example.test/CodeSystem/lab-local"
    v1 = code_system(
        url,
        "1.9",
        [{"code": "HGB", "display": "Гемоглобин (v1)"}, {"code": "WBC", "display": "Лейкоциты"}],
    )
    v2 = code_system(
        url,
        "1.10",
        [
            {"code": "HGB", "display": "Гемоглобин"},
            {"code": "WBC", "display": "Лейкоциты"},
            {"code": "PLT", "display": "Тромбоциты"},
        ],
    )
    assert (
        client.put(
            "/fhir/CodeSystem/lab-local-1.10", json={**v2, "id": "lab-local-1.10"}, headers=FJ
        ).status_code
        == 201
    )
    assert (
        client.put(
            "/fhir/CodeSystem/lab-local-1.9", json={**v1, "id": "lab-local-1.9"}, headers=FJ
        ).status_code
        == 201
    )
    lookup = "/fhir/CodeSystem/$lookup"
    body = ok(client.get(lookup, params={"system": url, "code": "HGB"}))
    assert out(body, "version") == "1.10" and out(body, "display") == "Гемоглобин"  # 1.10 > 1.9
    body = ok(client.get(lookup, params={"system": url, "code": "HGB", "version": "1.9"}))
    assert out(body, "display") == "Гемоглобин (v1)"
    assert_outcome(
        client.get(lookup, params={"system": url, "code": "PLT", "version": "1.9"}), 404, "HIE-1003"
    )
    assert_outcome(
        client.get(lookup, params={"system": url, "code": "HGB", "version": "7"}), 404, "HIE-1003"
    )
    body = ok(
        client.get("/fhir/CodeSystem/$validate-code", params={"url": f"{url}|1.9", "code": "PLT"})
    )
    assert out(body, "result") is False
    # a value set pinned to the old version expands from it
    pinned = {
        "resourceType": "ValueSet",
        "id": "pinned",
        "url": "http://example.test/vs/pinned",
        "status": "active",
        "compose": {"include": [{"system": url, "version": "1.9"}]},
    }
    assert client.put("/fhir/ValueSet/pinned", json=pinned, headers=FJ).status_code == 201
    assert codes(ok(client.get("/fhir/ValueSet/pinned/$expand"))) == ["HGB", "WBC"]
    latest = {
        **pinned,
        "id": "latest",
        "url": "http://example.test/vs/latest",
        "compose": {"include": [{"system": url}]},
    }
    assert client.put("/fhir/ValueSet/latest", json=latest, headers=FJ).status_code == 201
    assert codes(ok(client.get("/fhir/ValueSet/latest/$expand"))) == ["HGB", "WBC", "PLT"]
    # writes are seen at once: an update of 1.10, then a new 2.0, then deleting both
    v2["concept"].append({"code": "ESR", "display": "СОЭ"})
    assert (
        client.put(
            "/fhir/CodeSystem/lab-local-1.10", json={**v2, "id": "lab-local-1.10"}, headers=FJ
        ).status_code
        == 200
    )
    assert ok(client.get(lookup, params={"system": url, "code": "ESR"}))
    assert "ESR" in codes(ok(client.get("/fhir/ValueSet/latest/$expand")))
    v3 = code_system(url, "2.0", [{"code": "HGB", "display": "Гемоглобин (2.0)"}])
    assert client.post("/fhir/CodeSystem", json=v3, headers=FJ).status_code == 201
    assert out(ok(client.get(lookup, params={"system": url, "code": "HGB"})), "version") == "2.0"
    assert codes(ok(client.get("/fhir/ValueSet/latest/$expand"))) == ["HGB"]
    found = ok(client.get("/fhir/CodeSystem", params={"url": url, "version": "2.0"}))
    assert (
        client.delete(f"/fhir/CodeSystem/{found['entry'][0]['resource']['id']}").status_code == 204
    )
    assert client.delete("/fhir/CodeSystem/lab-local-1.10").status_code == 204
    assert out(ok(client.get(lookup, params={"system": url, "code": "HGB"})), "version") == "1.9"
    assert_outcome(
        client.get("/fhir/CodeSystem/lab-local-1.10/$validate-code", params={"code": "HGB"}),
        410,
        "HIE-1004",
    )


# --- $translate --------------------------------------------------------------------------------


def test_translate_get_post_instance_and_reverse(tx) -> None:  # type: ignore[no-untyped-def]
    url = "/fhir/ConceptMap/$translate"
    body = ok(tx.get(url, params={"system": VACCINE, "code": "flu"}))
    assert out(body, "result") is True
    (match,) = parts(body, "match")
    assert match["equivalence"] == "wider"
    assert match["concept"] == {
        "system": CVX,
        "code": "88",
        "display": "influenza, unspecified formulation",
    }
    assert match["source"] == f"{HUB}/ConceptMap/vaccine-to-cvx"
    coding = {"system": f"{HUB}/CodeSystem/lab-panel", "code": "cbc"}
    body = ok(tx.post(url, json=params(coding=coding, targetsystem=LOINC), headers=FJ))
    assert [m["concept"]["code"] for m in parts(body, "match")] == ["58410-2"]
    body = ok(
        tx.get(
            "/fhir/ConceptMap/vaccine-to-cvx/$translate",
            params={"system": CVX, "code": "03", "reverse": "true"},
        )
    )
    assert [(m["equivalence"], m["concept"]["code"]) for m in parts(body, "match")] == [
        ("equivalent", "mmr")
    ]
    body = ok(
        tx.get(
            url,
            params={
                "url": f"{HUB}/ConceptMap/lab-panel-to-loinc",
                "system": f"{HUB}/CodeSystem/lab-panel",
                "code": "thyroid",
            },
        )
    )
    assert out(body, "result") is False and "no mapping" in out(body, "message")
    body = ok(tx.get(url, params={"system": "http://nowhere.test", "code": "1"}))
    assert out(body, "result") is False and parts(body, "match") == []
    assert_outcome(
        tx.get(url, params={"url": "http://nowhere.test/cm", "system": VACCINE, "code": "flu"}),
        404,
        "HIE-1003",
    )
    assert_outcome(tx.get(url, params={"system": VACCINE}), 400, "HIE-1001")
    assert_outcome(
        tx.get("/fhir/ConceptMap/nowhere/$translate", params={"system": VACCINE, "code": "flu"}),
        404,
        "HIE-1003",
    )


# --- the code check for incoming data ----------------------------------------------------------


def _unknown(system: str) -> float:
    return REGISTRY.get_sample_value("hie_unknown_codes_total", {"system": system}) or 0.0


def test_check_code_accepts_and_flags_unknown_codes(tx) -> None:  # type: ignore[no-untyped-def]
    term = terminology_for(tx.app.state.fhir.store)
    check = term.check_code(LOINC, "718-7", "Гемоглобин")
    assert check.known and check.system_known and check.display_ok and check.ok
    assert check.display == "Hemoglobin [Mass/volume] in Blood"
    check = term.check_code(LOINC, "718-7", "Глюкоза")
    assert check.known and not check.display_ok and "does not match" in check.message
    assert check.issue("Observation.code")["severity"] == "warning"
    check = term.check_code(LOINC, "99999-9")
    assert not check.known and check.system_known and "99999-9" in check.message
    check = term.check_code("http://lab.mo-0042.test/codes", "HGB")
    assert not check.known and not check.system_known
    issue = check.issue("Observation.code.coding[0]")
    assert issue == {
        "severity": "warning",
        "code": "code-invalid",
        "diagnostics": "code system http://lab.mo-0042.test/codes is not in the hub's reference data",
        "expression": ["Observation.code.coding[0]"],
    }
    assert not term.check_code(None, "x").known and not term.check_code(LOINC, "").known
    # the callers count what they flag
    before = _unknown(LOINC)
    for system, code in ((LOINC, "718-7"), (LOINC, "99999-9"), (LOINC, "88888-8")):
        if not term.check_code(system, code).known:
            flag_unknown(system)
    assert _unknown(LOINC) == before + 2
    metrics = tx.get("/metrics").text
    assert 'hie_unknown_codes_total{system="http://loinc.org"}' in metrics


def test_the_cache_loads_a_code_system_once_per_version(tx, as_hub) -> None:  # type: ignore[no-untyped-def]
    svc: FhirService = tx.app.state.fhir
    store = svc.store
    term = Terminology(store)
    cs = content_of(svc, "CodeSystem", "loinc-hie")
    loaded: list[str] = []
    search, read, vread = store.search, store.read, store.vread

    def counting_search(query):  # type: ignore[no-untyped-def]
        page = search(query)
        loaded.extend(f"{r.resource_type}/{r.id}" for r in page.items)
        return page

    def counting_read(rtype: str, id: str):  # type: ignore[no-untyped-def]
        loaded.append(f"{rtype}/{id}")
        return read(rtype, id)

    def counting_vread(rtype: str, id: str, version: int):  # type: ignore[no-untyped-def]
        found = vread(rtype, id, version)
        if found is not None:
            loaded.append(f"{rtype}/{id}")
        return found

    store.search, store.read, store.vread = counting_search, counting_read, counting_vread
    try:
        for _ in range(5):
            assert term.check_code(LOINC, "718-7").known
        assert loaded == ["CodeSystem/loinc-hie"]  # then only cheap probes for a newer version
        cs["concept"].append({"code": "99999-9", "display": "Test"})
        svc.update(cs, "CodeSystem", "loinc-hie")
        assert term.check_code(LOINC, "99999-9").known
        assert loaded == ["CodeSystem/loinc-hie", "CodeSystem/loinc-hie"]
    finally:
        store.search, store.read, store.vread = search, read, vread


def content_of(svc: FhirService, rtype: str, id: str) -> dict[str, Any]:
    import orjson

    return orjson.loads(svc.read(rtype, id).content or b"{}")  # type: ignore[no-any-return]


# --- loaders ------------------------------------------------------------------------------------


def test_csv_load_with_a_bad_row_loads_nothing(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    svc: FhirService = client.app.state.fhir
    system = "http://example.test/CodeSystem/mkb-full"
    bad = tmp_path / "mkb.csv"
    bad.write_text(
        "code,display,parent,designation_ru\nJ00-J99,Respiratory,,Болезни органов дыхания\nJ18.9,,J00-J99,Пневмония\n",
        encoding="utf-8",
    )
    with pytest.raises(LoadError) as err:
        load_files(svc, [bad], csv_system=system, csv_name="MKB", csv_version="2.24")
    assert [str(p) for p in err.value.problems] == [f"{bad}:3: code 'J18.9' has no display"]
    assert ok(client.get("/fhir/CodeSystem", params={"url": system}))["entry"] == []
    good = tmp_path / "mkb-good.csv"
    good.write_text(
        "code,display,parent,designation_ru\nJ00-J99,Respiratory,,Болезни органов дыхания\nJ18.9,Pneumonia,J00-J99,Пневмония неуточненная\n",
        encoding="utf-8",
    )
    report = load_files(svc, [good], csv_system=system, csv_name="MKB", csv_version="2.24")
    assert report.created == ["CodeSystem/mkb-2.24"]
    assert load_files(
        svc, [good], csv_system=system, csv_name="MKB", csv_version="2.24"
    ).unchanged == ["CodeSystem/mkb-2.24"]
    inline = {
        "resourceType": "ValueSet",
        "status": "active",
        "compose": {
            "include": [
                {
                    "system": system,
                    "filter": [{"property": "concept", "op": "is-a", "value": "J00-J99"}],
                }
            ]
        },
    }
    vs = ok(
        client.post(
            "/fhir/ValueSet/$expand", json=params(valueSet=inline, filter="пневм"), headers=FJ
        )
    )
    assert codes(vs) == ["J18.9"]


def test_json_load_validates_everything_first(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    svc: FhirService = client.app.state.fhir
    good = tmp_path / "good.json"
    good.write_text(
        '{"resourceType": "CodeSystem", "url": "http://example.test/cs/a", "version": "1", "status": "active", "content": "complete", "concept": [{"code": "A", "display": "Альфа"}]}',
        encoding="utf-8",
    )
    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "ValueSet", "status": "active"}}]}',
        encoding="utf-8",
    )
    with pytest.raises(LoadError, match="url"):
        load_files(svc, [good, bad])
    assert (
        ok(client.get("/fhir/CodeSystem", params={"url": "http://example.test/cs/a"}))["entry"]
        == []
    )
    report = load_files(svc, [good])
    assert report.created == ["CodeSystem/a-1"]  # no id: one made from the url and version
    body = ok(
        client.get(
            "/fhir/CodeSystem/$lookup", params={"system": "http://example.test/cs/a", "code": "A"}
        )
    )
    assert out(body, "display") == "Альфа"


def test_cli_terminology_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hie.cli import app

    monkeypatch.setenv("HIE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("HIE_LOG_LEVEL", "WARNING")
    runner = CliRunner()
    res = runner.invoke(app, ["terminology", "load", "--builtin"])
    assert res.exit_code == 0, res.output
    assert "24 created" in res.output
    res = runner.invoke(app, ["terminology", "load", "--builtin"])
    assert res.exit_code == 0 and "0 created, 0 updated, 24 unchanged" in res.output
    csv_file = tmp_path / "codes.csv"
    csv_file.write_text("code,display\nA,Альфа\nA,Альфа снова\n", encoding="utf-8")
    res = runner.invoke(
        app,
        ["terminology", "load", str(csv_file), "--system", "http://example.test/cs", "--name", "X"],
    )
    assert res.exit_code == 1
    assert f"{csv_file}:3: code 'A' repeats line 2" in res.output and "nothing loaded" in res.output
    assert runner.invoke(app, ["terminology", "load"]).exit_code == 2
