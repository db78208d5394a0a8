"""The FHIR API driven over HTTP the way a client would, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from hie.fhir import model

FJ = {"Content-Type": "application/fhir+json"}


def patient(
    family: str = "Иванова",
    given: str = "Анна",
    snils: str = "112-233-445 95",
    birth: str = "1980-05-06",
    gender: str = "female",
) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.643.100.3", "value": snils}],
        "name": [{"family": family, "given": [given]}],
        "birthDate": birth,
        "gender": gender,
    }


def obs(
    pid: str, code: str = "718-7", value: float = 140, date: str = "2024-01-02T10:00:00Z"
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": date,
        "valueQuantity": {
            "value": value,
            "unit": "g/L",
            "system": "http://unitsofmeasure.org",
            "code": "g/L",
        },
    }


def create(client, res: dict[str, Any]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    r = client.post(f"/fhir/{res['resourceType']}", json=res, headers=FJ)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [
        e["resource"]["id"]
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode") == mode
    ]


def assert_outcome(r, status: int, code: str | None = None) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    if code:
        assert body["issue"][0]["code"] == code, body
    return body  # type: ignore[no-any-return]


def test_metadata_tells_what_is_supported(client) -> None:  # type: ignore[no-untyped-def]
    r = client.get("/fhir/metadata")
    assert r.status_code == 200
    cs = r.json()
    assert cs["fhirVersion"] == "4.0.1"
    types = {res["type"]: res for res in cs["rest"][0]["resource"]}
    for t in ("Patient", "Observation", "DocumentReference", "ImagingStudy", "Consent", "Task"):
        assert t in types
    pnames = {p["name"] for p in types["Patient"]["searchParam"]}
    assert {"name", "birthdate", "gender", "identifier", "_id", "_lastUpdated"} <= pnames
    assert {"code": "transaction"} in cs["rest"][0]["interaction"]
    ops = {t: {o["name"] for o in res.get("operation", [])} for t, res in types.items()}
    assert {"everything", "match", "document-timeline"} <= ops["Patient"]
    assert ops["DocumentReference"] == {"search-text"}
    assert any(u.endswith("IHE.MHD.DocumentResponder") for u in cs["instantiates"])
    model.validate(cs)


def test_crud_versions_and_headers(client) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/fhir/Patient", json=patient(), headers=FJ)
    assert r.status_code == 201
    p = r.json()
    assert r.headers["etag"] == 'W/"1"'
    assert r.headers["location"].endswith(f"/fhir/Patient/{p['id']}/_history/1")
    assert "last-modified" in r.headers and r.headers["x-request-id"]
    assert p["meta"]["versionId"] == "1"
    r = client.get(f"/fhir/Patient/{p['id']}")
    assert r.status_code == 200 and r.json()["name"][0]["family"] == "Иванова"
    assert (
        client.get(f"/fhir/Patient/{p['id']}", headers={"If-None-Match": 'W/"1"'}).status_code
        == 304
    )
    p["gender"] = "other"
    r = client.put(f"/fhir/Patient/{p['id']}", json=p, headers={**FJ, "If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.json()["meta"]["versionId"] == "2"
    # stale If-Match → 412
    assert_outcome(
        client.put(f"/fhir/Patient/{p['id']}", json=p, headers={**FJ, "If-Match": 'W/"1"'}), 412
    )
    assert client.get(f"/fhir/Patient/{p['id']}/_history/1").json()["gender"] == "female"
    assert_outcome(client.get(f"/fhir/Patient/{p['id']}/_history/9"), 404)
    hist = client.get(f"/fhir/Patient/{p['id']}/_history").json()
    assert hist["type"] == "history" and [
        e["resource"]["meta"]["versionId"] for e in hist["entry"]
    ] == ["2", "1"]
    # delete is a versioned tombstone
    r = client.delete(f"/fhir/Patient/{p['id']}")
    assert r.status_code == 204
    assert_outcome(client.get(f"/fhir/Patient/{p['id']}"), 410)
    assert client.get(f"/fhir/Patient/{p['id']}/_history/2").status_code == 200
    hist = client.get(f"/fhir/Patient/{p['id']}/_history").json()
    assert hist["entry"][0]["request"]["method"] == "DELETE"
    assert client.delete(f"/fhir/Patient/{p['id']}").status_code == 204  # idempotent


def test_update_as_create_and_prefer(client) -> None:  # type: ignore[no-untyped-def]
    body = {**patient(), "id": "mo12-777"}
    r = client.put("/fhir/Patient/mo12-777", json=body, headers={**FJ, "Prefer": "return=minimal"})
    assert r.status_code == 201 and r.content == b""
    assert r.headers["location"].endswith("/Patient/mo12-777/_history/1")
    r = client.put(
        "/fhir/Patient/mo12-777", json=body, headers={**FJ, "Prefer": "return=OperationOutcome"}
    )
    assert r.status_code == 200 and r.json()["resourceType"] == "OperationOutcome"
    assert_outcome(client.put("/fhir/Patient/other", json=body, headers=FJ), 400)


def test_conditional_create_update_delete(client) -> None:  # type: ignore[no-untyped-def]
    crit = "identifier=urn:oid:1.2.643.100.3|112-233-445 95"
    r1 = client.post("/fhir/Patient", json=patient(), headers={**FJ, "If-None-Exist": crit})
    r2 = client.post("/fhir/Patient", json=patient(), headers={**FJ, "If-None-Exist": crit})
    assert r1.status_code == 201 and r2.status_code == 200
    assert r1.json()["id"] == r2.json()["id"]
    r = client.put(f"/fhir/Patient?{crit}", json={**patient(), "gender": "unknown"}, headers=FJ)
    assert r.status_code == 200 and r.json()["id"] == r1.json()["id"]
    r = client.put(
        "/fhir/Patient?identifier=urn:oid:1.2.643.100.3|000-000-000 00",
        json=patient(snils="000-000-000 00"),
        headers=FJ,
    )
    assert r.status_code == 201
    create(client, patient(family="Петров", snils="123-456-789 64"))
    create(client, patient(family="Петров", snils="223-456-789 73"))
    assert_outcome(client.put("/fhir/Patient?family=Петров", json=patient(), headers=FJ), 412)
    ine = "family=" + quote("Петров")  # header values are ASCII: criteria are percent-encoded
    assert_outcome(
        client.post("/fhir/Patient", json=patient(), headers={**FJ, "If-None-Exist": ine}), 412
    )
    assert_outcome(client.delete("/fhir/Patient?family=Петров"), 412)
    assert client.delete(f"/fhir/Patient?{crit}").status_code == 200
    assert client.get(f"/fhir/Patient/{r1.json()['id']}").status_code == 410


def test_json_patch(client) -> None:  # type: ignore[no-untyped-def]
    p = create(client, patient())
    ops = [{"op": "replace", "path": "/gender", "value": "male"}]
    r = client.patch(
        f"/fhir/Patient/{p['id']}",
        json=ops,
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert (
        r.status_code == 200
        and r.json()["gender"] == "male"
        and r.json()["meta"]["versionId"] == "2"
    )
    bad = [{"op": "replace", "path": "/nope/x", "value": 1}]
    assert_outcome(
        client.patch(
            f"/fhir/Patient/{p['id']}",
            json=bad,
            headers={"Content-Type": "application/json-patch+json"},
        ),
        422,
    )
    invalid = [{"op": "replace", "path": "/gender", "value": 5}]
    assert_outcome(
        client.patch(
            f"/fhir/Patient/{p['id']}",
            json=invalid,
            headers={"Content-Type": "application/json-patch+json"},
        ),
        400,
    )
    assert_outcome(client.patch(f"/fhir/Patient/{p['id']}", json=ops, headers=FJ), 415)


def _seed(client) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    a = create(client, patient())["id"]
    b = create(
        client,
        patient(
            family="Петров", given="Иван", snils="123-456-789 64", birth="1975-01-31", gender="male"
        ),
    )["id"]
    for i in range(6):
        create(
            client,
            obs(a, "718-7" if i % 2 == 0 else "2345-7", 100 + i, f"2024-01-0{i + 1}T10:00:00Z"),
        )
    create(client, obs(b, "718-7", 150, "2023-12-31T23:00:00Z"))
    return a, b


def test_search_parameters_and_modifiers(client) -> None:  # type: ignore[no-untyped-def]
    a, b = _seed(client)
    s = lambda q: client.get(f"/fhir/{q}").json()  # noqa: E731
    assert ids(s("Patient?name=иван")) and set(ids(s("Patient?name=иван"))) == {
        a,
        b,
    }  # Иванова, Иван
    assert ids(s("Patient?family=Иванова")) == [a]
    assert ids(s("Patient?family:exact=иванова")) == []
    assert ids(s("Patient?family:contains=етр")) == [b]
    assert ids(s("Patient?gender=male")) == [b]
    assert ids(s("Patient?gender:not=male")) == [a]
    assert ids(s("Patient?birthdate=1980")) == [a]
    assert ids(s("Patient?birthdate=lt1976")) == [b]
    assert ids(s("Patient?identifier=urn:oid:1.2.643.100.3|123-456-789 64")) == [b]
    assert ids(s("Patient?identifier=123-456-789 64")) == [b]
    assert len(ids(s(f"Observation?subject=Patient/{a}"))) == 6
    assert len(ids(s(f"Observation?patient={a}&code=http://loinc.org|718-7"))) == 3
    assert len(ids(s(f"Observation?subject={a}&code=718-7,2345-7"))) == 6
    assert len(ids(s(f"Observation?subject={a}&date=ge2024-01-03&date=lt2024-01-05"))) == 2
    for prefix, n in (
        ("eq", 1),
        ("ne", 6),
        ("gt", 2),
        ("ge", 3),
        ("lt", 4),
        ("le", 5),
        ("sa", 2),
        ("eb", 4),
    ):
        assert len(ids(s(f"Observation?date={prefix}2024-01-04"))) == n, prefix
    assert len(ids(s("Observation?date=ap2024-01-04"))) >= 1
    assert len(ids(s("Observation?value-quantity=gt103"))) == 3
    assert len(ids(s("Observation?value-quantity=104|http://unitsofmeasure.org|g/L"))) == 1
    assert len(ids(s("Observation?value-quantity:missing=true"))) == 0
    assert len(ids(s("Observation?encounter:missing=true"))) == 7
    assert (
        len(ids(s("Observation?subject:Patient.identifier=urn:oid:1.2.643.100.3|112-233-445 95")))
        == 6
    )
    assert len(ids(s("Observation?subject.name=петров"))) == 1
    assert len(ids(s("Observation?subject:identifier=urn:oid:1.2.643.100.3|123-456-789 64"))) == 1
    assert ids(s(f"Patient?_id={a}")) == [a]
    assert len(ids(s("Observation?_lastUpdated=gt2000-01-01"))) == 7
    assert len(ids(s("Observation?category=laboratory&status=final"))) == 7


def test_include_revinclude_sort_total_summary_elements(client) -> None:  # type: ignore[no-untyped-def]
    a, b = _seed(client)
    bundle = client.get(f"/fhir/Observation?subject={a}&_include=Observation:subject").json()
    assert ids(bundle, "include") == [a]
    bundle = client.get(f"/fhir/Patient?_id={a}&_revinclude=Observation:subject").json()
    assert len(ids(bundle, "include")) == 6
    bundle = client.get(f"/fhir/Observation?subject={a}&_sort=-date&_total=accurate").json()
    dates = [e["resource"]["effectiveDateTime"] for e in bundle["entry"]]
    assert dates == sorted(dates, reverse=True) and bundle["total"] == 6
    bundle = client.get("/fhir/Observation?_summary=count").json()
    assert bundle["total"] == 7 and not bundle.get("entry")
    bundle = client.get(f"/fhir/Patient?_id={a}&_elements=birthDate").json()
    res = bundle["entry"][0]["resource"]
    assert "birthDate" in res and "name" not in res
    assert any(t["code"] == "SUBSETTED" for t in res["meta"]["tag"])
    res = client.get(f"/fhir/Patient/{a}?_summary=true").json()
    assert "name" in res and "text" not in res


def test_keyset_paging_is_stable_under_writes(client) -> None:  # type: ignore[no-untyped-def]
    a, _ = _seed(client)
    first = client.get(f"/fhir/Observation?subject={a}&_count=4").json()
    assert len(first["entry"]) == 4
    nxt = next(lnk["url"] for lnk in first["link"] if lnk["relation"] == "next")
    create(client, obs(a, "718-7", 99, "2020-01-01T00:00:00Z"))  # lands after the cursor
    second = client.get(nxt.replace("http://hub.test", "")).json()
    got = ids(first) + ids(second)
    assert len(got) == len(set(got)) == 7
    assert_outcome(client.get("/fhir/Observation?_cursor=@@@"), 400)


def test_unknown_parameters_strict_and_lenient(client) -> None:  # type: ignore[no-untyped-def]
    assert_outcome(client.get("/fhir/Patient?shoe-size=42"), 400, "not-supported")
    r = client.get("/fhir/Patient?shoe-size=42", headers={"Prefer": "handling=lenient"})
    assert r.status_code == 200
    outcome = [e for e in r.json()["entry"] if e["search"]["mode"] == "outcome"]
    assert "shoe-size" in outcome[0]["resource"]["issue"][0]["diagnostics"]
    assert_outcome(client.get("/fhir/Patient?birthdate=yesterday"), 400)
    assert_outcome(client.get("/fhir/Observation?value-quantity=abc"), 400)


def test_injection_attempts_are_just_values(client) -> None:  # type: ignore[no-untyped-def]
    _seed(client)
    for evil in ("' OR 1=1 --", "%", "_", "a\\b", "Robert'); DROP TABLE resources;--"):
        r = client.get("/fhir/Patient", params={"name": evil})
        assert r.status_code == 200 and ids(r.json()) == []
    assert len(ids(client.get("/fhir/Patient").json())) == 2


def _patient_once() -> dict[str, Any]:
    """A transaction entry creating :func:`patient` unless their SNILS is known."""
    return {
        "fullUrl": "urn:uuid:11111111-1111-1111-1111-111111111111",
        "resource": patient(),
        "request": {
            "method": "POST",
            "url": "Patient",
            "ifNoneExist": "identifier=urn:oid:1.2.643.100.3|112-233-445 95",
        },
    }


def test_transaction_urn_uuid_and_conditional_refs(client) -> None:  # type: ignore[no-untyped-def]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            _patient_once(),
            {
                "fullUrl": "urn:uuid:22222222-2222-2222-2222-222222222222",
                "resource": obs("x")
                | {"subject": {"reference": "urn:uuid:11111111-1111-1111-1111-111111111111"}},
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    r = client.post("/fhir", json=bundle, headers=FJ)
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["type"] == "transaction-response"
    assert [e["response"]["status"] for e in resp["entry"]] == ["201 Created", "201 Created"]
    pid = resp["entry"][0]["response"]["location"].split("/")[1]
    oid = resp["entry"][1]["response"]["location"].split("/")[1]
    assert client.get(f"/fhir/Observation/{oid}").json()["subject"]["reference"] == f"Patient/{pid}"
    # again: the conditional create finds the patient, the observation is new
    resp = client.post("/fhir", json=bundle, headers=FJ).json()
    assert resp["entry"][0]["response"]["status"] == "200 OK"
    assert resp["entry"][0]["response"]["location"].split("/")[1] == pid
    # conditional reference
    b2 = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": obs("x")
                | {
                    "subject": {
                        "reference": "Patient?identifier=urn:oid:1.2.643.100.3|112-233-445 95"
                    }
                },
                "request": {"method": "POST", "url": "Observation"},
            }
        ],
    }
    resp = client.post("/fhir", json=b2, headers=FJ).json()
    oid = resp["entry"][0]["response"]["location"].split("/")[1]
    assert client.get(f"/fhir/Observation/{oid}").json()["subject"]["reference"] == f"Patient/{pid}"
    assert len(ids(client.get(f"/fhir/Observation?subject={pid}").json())) == 3


def test_transaction_conditional_creates_by_identifier(client) -> None:  # type: ignore[no-untyped-def]
    """Conditional creates by one identifier are looked up together: each finds its own
    match, an escaped bar is part of the value, and two matches refuse the transaction."""

    def order(value: str) -> dict[str, Any]:
        return {
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "identifier": [{"system": "urn:lab:placer", "value": value}],
            "subject": {"reference": "urn:uuid:11111111-1111-1111-1111-111111111111"},
        }

    def entry(n: int, value: str, criteria: str) -> dict[str, Any]:
        return {
            "fullUrl": f"urn:uuid:0000000{n}-0000-0000-0000-000000000000",
            "resource": order(value),
            "request": {"method": "POST", "url": "ServiceRequest", "ifNoneExist": criteria},
        }

    pat = _patient_once()
    entries = [
        pat,
        entry(1, "A-1", "identifier=urn:lab:placer|A-1"),
        entry(2, "B|2", "identifier=urn:lab:placer|B\\|2"),  # an escaped bar in the value
    ]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    first = client.post("/fhir", json=bundle, headers=FJ).json()["entry"]
    assert [e["response"]["status"] for e in first] == ["201 Created"] * 3
    again = client.post("/fhir", json=bundle, headers=FJ).json()["entry"]
    assert [e["response"]["status"] for e in again] == ["200 OK"] * 3
    assert [e["response"]["location"].split("/")[1] for e in again] == [
        e["response"]["location"].split("/")[1] for e in first
    ]
    # a second order with number A-1, then a conditional create that finds both: refused
    r = client.post(
        "/fhir/ServiceRequest",
        json=order("A-1")
        | {"subject": {"reference": first[0]["response"]["location"].rsplit("/_history", 1)[0]}},
        headers=FJ,
    )
    assert r.status_code == 201, r.text
    bundle["entry"] = [pat, entry(1, "A-1", "identifier=urn:lab:placer|A-1")]
    assert_outcome(client.post("/fhir", json=bundle, headers=FJ), 412)
    assert len(ids(client.get("/fhir/ServiceRequest?identifier=urn:lab:placer|A-1").json())) == 2


def test_failed_transaction_leaves_no_trace(client) -> None:  # type: ignore[no-untyped-def]
    before = client.get("/fhir/Observation?_summary=count").json()["total"]
    cases = [
        # a reference to an entry that is not in the bundle
        [
            {"resource": patient(), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": obs("x")
                | {"subject": {"reference": "urn:uuid:99999999-9999-9999-9999-999999999999"}},
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
        # an invalid resource after a valid one
        [
            {"resource": patient(), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": {"resourceType": "Observation", "status": "final"},
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
        # a conditional reference that matches nothing
        [
            {
                "resource": obs("x") | {"subject": {"reference": "Patient?identifier=none|none"}},
                "request": {"method": "POST", "url": "Observation"},
            }
        ],
        # a version conflict
        [
            {"resource": patient(), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": {**patient(), "id": "nope"},
                "request": {"method": "PUT", "url": "Patient/nope", "ifMatch": 'W/"3"'},
            },
        ],
    ]
    for entries in cases:
        r = client.post(
            "/fhir",
            json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
            headers=FJ,
        )
        assert r.status_code in (400, 412, 422), r.text
        assert r.json()["resourceType"] == "OperationOutcome"
    assert client.get("/fhir/Observation?_summary=count").json()["total"] == before
    assert client.get("/fhir/Patient?_summary=count").json()["total"] == 0


def test_batch_entries_are_independent(client) -> None:  # type: ignore[no-untyped-def]
    p = create(client, patient())
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": obs(p["id"]), "request": {"method": "POST", "url": "Observation"}},
            {
                "resource": {"resourceType": "Observation"},
                "request": {"method": "POST", "url": "Observation"},
            },
            {"request": {"method": "GET", "url": f"Patient/{p['id']}"}},
            {"request": {"method": "GET", "url": "Patient/missing"}},
            {"request": {"method": "DELETE", "url": f"Patient/{p['id']}"}},
        ],
    }
    resp = client.post("/fhir", json=bundle, headers=FJ).json()
    statuses = [e["response"]["status"] for e in resp["entry"]]
    assert statuses[0] == "201 Created" and statuses[1] == "400" and statuses[2] == "200 OK"
    assert statuses[3] == "404" and statuses[4] == "204 No Content"
    assert resp["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"


def test_everything_and_validate(client) -> None:  # type: ignore[no-untyped-def]
    a, b = _seed(client)
    org = create(client, {"resourceType": "Organization", "name": "Поликлиника № 12"})
    enc = create(
        client,
        {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": f"Patient/{a}"},
            "serviceProvider": {"reference": f"Organization/{org['id']}"},
        },
    )
    bundle = client.get(f"/fhir/Patient/{a}/$everything?_count=100").json()
    got = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]}
    assert (
        ("Patient", a) in got
        and ("Encounter", enc["id"]) in got
        and ("Organization", org["id"]) in got
    )
    assert sum(1 for t, _ in got if t == "Observation") == 6
    assert ("Patient", b) not in got
    only = client.get(f"/fhir/Patient/{a}/$everything?_type=Observation&_count=4").json()
    assert len(ids(only)) == 4 and any(lnk["relation"] == "next" for lnk in only["link"])
    assert_outcome(client.get("/fhir/Patient/missing/$everything"), 404)
    r = client.post("/fhir/Patient/$validate", json=patient(), headers=FJ)
    assert r.status_code == 200 and r.json()["issue"][0]["severity"] == "information"
    body = assert_outcome(
        client.post("/fhir/Patient/$validate", json={**patient(), "gender": 3}, headers=FJ), 400
    )
    assert "Patient.gender" in body["issue"][0]["expression"]


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"{not json", FJ, 400),
        (b"", FJ, 400),
        (b"[]", FJ, 400),
        (b'{"resourceType": "Observation", "status": "final", "code": {}}', FJ, 400),
        (b'{"resourceType": "Patient", "birthDate": "31.12.1980"}', FJ, 400),
        (b'{"resourceType": "Patient", "shoeSize": 42}', FJ, 400),
        (b'<Patient xmlns="http://hl7.org/fhir"/>', {"Content-Type": "application/fhir+xml"}, 415),
        (b'{"resourceType": "Patient"}', {"Content-Type": "text/plain"}, 415),
    ],
)
def test_bad_bodies_get_operation_outcomes(
    client, body: bytes, headers: dict[str, str], status: int
) -> None:  # type: ignore[no-untyped-def]
    assert_outcome(client.post("/fhir/Patient", content=body, headers=headers), status)
    assert client.get("/fhir/Patient?_summary=count").json()["total"] == 0


def test_invalid_element_names_its_path(client) -> None:  # type: ignore[no-untyped-def]
    r = client.post(
        "/fhir/Patient", json={"resourceType": "Patient", "birthDate": "31.12.1980"}, headers=FJ
    )
    body = assert_outcome(r, 400, "structure")
    assert body["issue"][0]["expression"] == ["Patient.birthDate"]
    assert body["issue"][0]["details"]["coding"][0]["code"] == "HIE-1002"


def test_size_limits_and_unknown_routes(client) -> None:  # type: ignore[no-untyped-def]
    big = {
        **patient(),
        "text": {
            "status": "generated",
            "div": '<div xmlns="http://www.w3.org/1999/xhtml">' + "x" * 70_000 + "</div>",
        },
    }
    assert_outcome(client.post("/fhir/Patient", json=big, headers=FJ), 413, "too-long")
    assert_outcome(client.get("/fhir/NotAType/1"), 404)
    assert_outcome(client.get("/fhir/Claim/1"), 405)  # a FHIR type the hub does not serve
    assert_outcome(client.post("/fhir/Observation", json=patient(), headers=FJ), 400)  # wrong type


def test_system_search_history_health_metrics(client) -> None:  # type: ignore[no-untyped-def]
    a, _ = _seed(client)
    bundle = client.get(f"/fhir?_id={a}").json()
    assert ids(bundle) == [a]
    # a system-level search lists every record the server holds: the two MOs' records and
    # the master patient index's golden record of each person
    found = [e["resource"] for e in client.get("/fhir?_type=Patient").json()["entry"]]
    golden = [r for r in found if any(t["code"] == "golden" for t in r["meta"].get("tag", []))]
    assert len(found) == 4 and len(golden) == 2
    hist = client.get("/fhir/_history?_count=3").json()
    assert len(hist["entry"]) == 3 and any(lnk["relation"] == "next" for lnk in hist["link"])
    assert len(client.get("/fhir/Observation/_history").json()["entry"]) == 7
    r = client.get("/healthz", headers={"X-Request-ID": "abc123"})
    assert r.json()["status"] == "ok" and r.headers["x-request-id"] == "abc123"
    assert "hie_http_requests_total" in client.get("/metrics").text


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (
            {"identifier": [{"system": "urn:oid:1.2.643.100.3", "value": "112-233-445 96"}]},
            "invalid-snils-checksum",
        ),
        (
            {"identifier": [{"system": "urn:oid:1.2.643.100.3", "value": "12-34"}]},
            "malformed-snils",
        ),
        ({"birthDate": "2090-01-01"}, "impossible-birth-date"),
        ({"birthDate": "1850-06-01"}, "impossible-birth-date"),
        ({"name": [{"use": "official"}]}, "empty-name"),
        ({"identifier": [{"value": "12345"}]}, "identifier-without-system"),
    ],
)
def test_unusable_demographics_are_refused_with_a_specific_error(
    client, change: dict[str, Any], code: str
) -> None:  # type: ignore[no-untyped-def]
    body = {**patient(), **change}
    res = assert_outcome(client.post("/fhir/Patient", json=body, headers=FJ), 400)
    assert code in res["issue"][0]["diagnostics"] and res["issue"][0]["expression"]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": obs("x"), "request": {"method": "POST", "url": "Observation"}},
            {"resource": body, "request": {"method": "PUT", "url": "Patient/bad-1"}},
        ],
    }
    assert_outcome(client.post("/fhir", json=bundle, headers=FJ), 400)
    assert client.get("/fhir/Observation?_summary=count").json()["total"] == 0
    assert client.get("/fhir/Patient?_summary=count").json()["total"] == 0


def test_conditional_updates_by_identifier_in_one_transaction(client) -> None:  # type: ignore[no-untyped-def]
    """Conditional updates by one identifier each are looked up together, per type; for
    Patient the lookup also leaves golden records out (a probe of the same index table)."""
    people = [patient(snils=s, family=f) for s, f in (("112-233-445 95", "Иванова"),)]
    people.append(patient(snils="223-344-556 39", family="Петрова", given="Мария"))

    def bundle(gender: str) -> dict[str, Any]:
        return {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": {**p, "gender": gender},
                    "request": {
                        "method": "PUT",
                        "url": f"Patient?identifier=urn:oid:1.2.643.100.3|{p['identifier'][0]['value']}",
                    },
                }
                for p in people
            ],
        }

    first = client.post("/fhir", json=bundle("female"), headers=FJ)
    assert first.status_code == 200, first.text
    assert [e["response"]["status"][:3] for e in first.json()["entry"]] == ["201", "201"]
    again = client.post("/fhir", json=bundle("other"), headers=FJ)
    assert again.status_code == 200, again.text
    assert [e["response"]["status"][:3] for e in again.json()["entry"]] == ["200", "200"]
    ids = {e["response"]["location"].split("/")[1] for e in again.json()["entry"]}
    assert ids == {e["response"]["location"].split("/")[1] for e in first.json()["entry"]}
