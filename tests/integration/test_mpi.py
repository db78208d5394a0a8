"""The master patient index over HTTP, on every resource-store backend: golden records and
links, the integrated record through them, review Tasks, $match, PIXm, merge and unmerge."""

from __future__ import annotations

from typing import Any

import pytest

from hie.registries.facility import patient_id_system_identifier
from hie.registries.identifiers import SNILS_SYSTEM, format_snils, snils_check

FJ = {"Content-Type": "application/fhir+json"}
MPI = "https://hie.spb.ru/fhir/CodeSystem/mpi"
GOLDEN = f"{MPI}|golden"
MO12 = "https://mo12.spb.example/mrn"
MO40 = "https://mo40.spb.example/mrn"


def snils(n: int) -> str:
    nine = f"{100_000_000 + n:09d}"
    return format_snils(nine + snils_check(nine))


def person(
    family: str = "Иванова",
    given: str = "Анна",
    middle: str | None = "Сергеевна",
    birth: str = "1985-03-07",
    gender: str = "female",
    ids: list[tuple[str, str]] | None = None,
    phone: str | None = None,
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Patient",
        "name": [
            {"use": "official", "family": family, "given": [given, *([middle] if middle else [])]}
        ],
        "birthDate": birth,
        "gender": gender,
    }
    if ids:
        res["identifier"] = [{"system": s, "value": v} for s, v in ids]
    if phone:
        res["telecom"] = [{"system": "phone", "value": phone}]
    return res


def post(client, res: dict[str, Any]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    r = client.post(f"/fhir/{res['resourceType']}", json=res, headers=FJ)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def golden_of(client, pid: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The golden record linked (seealso) to source record ``pid``."""
    b = client.get(f"/fhir/Patient?_tag={GOLDEN}&link=Patient/{pid}").json()
    found = [e["resource"] for e in b.get("entry", [])]
    assert len(found) == 1, found
    return found[0]


def entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if "resource" in e]


def obs(pid: str, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "valueQuantity": {"value": value, "unit": "g/L"},
    }


@pytest.fixture(autouse=True)
def _registered(client) -> None:  # type: ignore[no-untyped-def]
    """MO12 and MO40 register their patient-number systems, as every MO must."""
    register_mos(client)


def register_mos(client) -> None:  # type: ignore[no-untyped-def]
    for oid, name, system in (("mo12", "Поликлиника 12", MO12), ("mo40", "Больница 40", MO40)):
        org = {
            "resourceType": "Organization",
            "id": oid,
            "name": name,
            "identifier": [patient_id_system_identifier(system)],
        }
        assert client.put(f"/fhir/Organization/{oid}", json=org, headers=FJ).status_code in (
            200,
            201,
        )


def params(**named: Any) -> dict[str, Any]:
    out = []
    for name, value in named.items():
        name = name.replace("_", "-")
        if isinstance(value, bool):
            out.append({"name": name, "valueBoolean": value})
        elif isinstance(value, str) and value.startswith("Patient/"):
            out.append({"name": name, "valueReference": {"reference": value}})
        elif isinstance(value, dict):
            out.append({"name": name, "resource": value})
        else:
            out.append({"name": name, "valueString": value})
    return {"resourceType": "Parameters", "parameter": out}


def op(client, name: str, **named: Any):  # type: ignore[no-untyped-def]
    return client.post(f"/fhir/Patient/${name}", json=params(**named), headers=FJ)


def test_two_mos_records_of_one_person_share_a_golden_record(client) -> None:  # type: ignore[no-untyped-def]
    a = post(client, person(ids=[(SNILS_SYSTEM, snils(1)), (MO12, "12-0001")]))
    # the other MO writes the name in Latin (ICAO), without the patronymic, same SNILS
    b = post(
        client, person("Ivanova", "Anna", None, ids=[(SNILS_SYSTEM, snils(1)), (MO40, "A-77")])
    )
    g = golden_of(client, a["id"])
    assert golden_of(client, b["id"])["id"] == g["id"]
    assert g["active"] is True and g["meta"]["tag"][0]["code"] == "golden"
    assert {(i["system"], i["value"]) for i in g["identifier"]} == {
        (SNILS_SYSTEM, snils(1)),
        (MO12, "12-0001"),
        (MO40, "A-77"),
    }
    assert sorted(lnk["other"]["reference"] for lnk in g["link"]) == sorted(
        [f"Patient/{a['id']}", f"Patient/{b['id']}"]
    )
    assert all(lnk["type"] == "seealso" for lnk in g["link"])
    # the source records stay as the MOs sent them
    assert client.get(f"/fhir/Patient/{a['id']}").json()["meta"]["versionId"] == "1"
    # the integrated record: the golden id, or either MO's id, finds both MOs' results
    o1, o2 = post(client, obs(a["id"], 120))["id"], post(client, obs(b["id"], 131))["id"]
    for pid in (g["id"], a["id"], b["id"]):
        found = {r["id"] for r in entries(client.get(f"/fhir/Observation?patient={pid}").json())}
        assert found == {o1, o2}
    everything = entries(client.get(f"/fhir/Patient/{g['id']}/$everything").json())
    assert {f"{r['resourceType']}/{r['id']}" for r in everything} >= {
        f"Patient/{g['id']}",
        f"Patient/{a['id']}",
        f"Patient/{b['id']}",
        f"Observation/{o1}",
        f"Observation/{o2}",
    }
    # a plain Patient search lists the MOs' records; golden records are asked for by tag (PDQm)
    plain = {r["id"] for r in entries(client.get("/fhir/Patient?birthdate=1985-03-07").json())}
    assert plain == {a["id"], b["id"]}
    pdqm = entries(client.get(f"/fhir/Patient?_tag={GOLDEN}&family=Иванова").json())
    assert [r["id"] for r in pdqm] == [g["id"]]
    pdqm = entries(client.get(f"/fhir/Patient?_tag={GOLDEN}&identifier={MO40}|A-77").json())
    assert [r["id"] for r in pdqm] == [g["id"]]


def test_transliteration_and_typos_link_without_identifiers(client) -> None:  # type: ignore[no-untyped-def]
    a = post(client, person(phone="+7 921 555-01-02"))
    # Latin name, a typo in the given name, day and month swapped, same phone written otherwise
    b = post(client, person("Ivanova", "Ana", "Sergeevna", birth="1985-07-03", phone="89215550102"))
    assert golden_of(client, a["id"])["id"] == golden_of(client, b["id"])["id"]
    # the decision is explained: rule, score and each field's contribution
    r = client.get(f"/fhir/Patient/{b['id']}/$mpi-explain")
    assert r.status_code == 200
    entry = r.json()["parameter"][0]["part"]
    named = {p["name"]: p for p in entry}
    assert named["kind"]["valueCode"] == "match"
    assert named["decision"]["valueString"] == "auto-link"
    assert named["rule"]["valueString"] == "probabilistic"
    assert named["score"]["valueDecimal"] >= 28
    fields = {p["part"][0]["valueString"] for p in entry if p["name"] == "detail"}
    assert "birth-date:swapped-day-month" in fields and "phone:same" in fields


def test_different_people_get_their_own_golden_records(client) -> None:  # type: ignore[no-untyped-def]
    a = post(client, person(ids=[(SNILS_SYSTEM, snils(2))]))
    twin = post(client, person(given="Мария", ids=[(SNILS_SYSTEM, snils(3))]))
    other = post(client, person("Петров", "Иван", "Ильич", "1950-01-01", "male"))
    goldens = {golden_of(client, p["id"])["id"] for p in (a, twin, other)}
    assert len(goldens) == 3


def test_decide_many_says_what_a_write_would_do_and_writes_nothing(client) -> None:  # type: ignore[no-untyped-def]
    a = post(client, person(ids=[(SNILS_SYSTEM, snils(4))], phone="+79215550104"))
    mpi = client.app.state.fhir.mpi
    before = client.get("/fhir/Patient?_summary=count&_tag=" + GOLDEN).json()["total"]
    same = person(given="Анан", phone="+79215550104")  # a typo, no SNILS
    maybe = person(birth="1985-03-17", middle=None)
    stranger = person("Петров", "Иван", "Ильич", "1950-01-01", "male")
    decided = mpi.decide_many([same, maybe, stranger])
    assert [d.decision for d in decided] == ["auto-link", "review", "new"]
    assert decided[0].person_id == golden_of(client, a["id"])["id"]
    after = client.get("/fhir/Patient?_summary=count&_tag=" + GOLDEN).json()["total"]
    assert after == before
    # and the write then does what it said
    linked = post(client, same)
    assert golden_of(client, linked["id"])["id"] == decided[0].person_id


def test_possible_match_is_kept_apart_and_sent_to_review(client) -> None:  # type: ignore[no-untyped-def]
    a = post(client, person(phone="+79215550103"))
    # same name and birth year, another day of birth, no phone: could be her, could be not
    b = post(client, person(birth="1985-03-17", middle=None))
    ga, gb = golden_of(client, a["id"]), golden_of(client, b["id"])
    assert ga["id"] != gb["id"]
    tasks = entries(client.get(f"/fhir/Task?focus=Patient/{b['id']}").json())
    assert len(tasks) == 1
    task = tasks[0]
    assert task["status"] == "requested" and task["code"]["coding"][0]["code"] == "possible-match"
    inputs = {i["type"]["text"]: i for i in task["input"]}
    assert inputs["candidate"]["valueReference"]["reference"] == f"Patient/{ga['id']}"
    assert 16 <= inputs["score"]["valueDecimal"] < 28
    assert "birth-date" in inputs["explanation"]["valueString"]
    # the operator decides they are one person: merge the new golden record into the other
    r = op(
        client, "merge", source_patient=f"Patient/{gb['id']}", target_patient=f"Patient/{ga['id']}"
    )
    assert r.status_code == 200, r.text
    assert golden_of(client, b["id"])["id"] == ga["id"]


def test_golden_records_are_not_writable_by_senders(client) -> None:  # type: ignore[no-untyped-def]
    a = post(client, person(ids=[(SNILS_SYSTEM, snils(4))]))
    g = golden_of(client, a["id"])
    forged = {**person(), "meta": {"tag": [{"system": MPI, "code": "golden"}]}}
    for r in (
        client.post("/fhir/Patient", json=forged, headers=FJ),
        client.put(f"/fhir/Patient/{g['id']}", json={**person(), "id": g["id"]}, headers=FJ),
        client.delete(f"/fhir/Patient/{g['id']}"),
        client.patch(
            f"/fhir/Patient/{g['id']}",
            json=[{"op": "replace", "path": "/gender", "value": "male"}],
            headers={"Content-Type": "application/json-patch+json"},
        ),
    ):
        assert r.status_code == 422, r.text
        assert "golden" in r.json()["issue"][0]["diagnostics"]
    assert (
        client.get(f"/fhir/Patient/{g['id']}").json()["meta"]["versionId"] == g["meta"]["versionId"]
    )
    # a sender's conditional create by its identifier finds its own record, not the golden one
    r = client.post(
        "/fhir/Patient",
        json=person(ids=[(SNILS_SYSTEM, snils(4))]),
        headers={**FJ, "If-None-Exist": f"identifier={SNILS_SYSTEM}|{snils(4)}"},
    )
    assert r.status_code == 200 and r.json()["id"] == a["id"]


def test_update_that_reveals_a_duplicate_opens_a_review_task(client) -> None:  # type: ignore[no-untyped-def]
    a = post(client, person(ids=[(SNILS_SYSTEM, snils(5))]))
    b = post(client, person("Сидорова", "Ольга", "Петровна", "1990-02-02"))
    assert golden_of(client, a["id"])["id"] != golden_of(client, b["id"])["id"]
    # the second MO fixes its record: it is Anna, with her SNILS
    fixed = {**person(ids=[(SNILS_SYSTEM, snils(5))]), "id": b["id"]}
    assert client.put(f"/fhir/Patient/{b['id']}", json=fixed, headers=FJ).status_code == 200
    tasks = entries(client.get(f"/fhir/Task?focus=Patient/{b['id']}").json())
    assert len(tasks) == 1
    cand = {i["type"]["text"]: i for i in tasks[0]["input"]}["candidate"]
    assert cand["valueReference"]["reference"] == f"Patient/{golden_of(client, a['id'])['id']}"
    # never merged automatically; its own golden record now carries the new SNILS
    gb = golden_of(client, b["id"])
    assert gb["id"] != golden_of(client, a["id"])["id"]
    assert (SNILS_SYSTEM, snils(5)) in {(i["system"], i["value"]) for i in gb["identifier"]}


def test_transaction_links_records_inside_it(client) -> None:  # type: ignore[no-untyped-def]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{i}",
                "resource": res,
                "request": {"method": "POST", "url": "Patient"},
            }
            for i, res in enumerate(
                [
                    person(ids=[(SNILS_SYSTEM, snils(6)), (MO12, "x1")]),
                    person(ids=[(SNILS_SYSTEM, snils(6)), (MO40, "y1")]),
                ],
                start=1,
            )
        ],
    }
    r = client.post("/fhir", json=bundle, headers=FJ)
    assert r.status_code == 200, r.text
    ids = [e["response"]["location"].split("/")[1] for e in r.json()["entry"]]
    assert golden_of(client, ids[0])["id"] == golden_of(client, ids[1])["id"]
    later = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {
                    **obs("x", 100),
                    "subject": {"reference": f"Patient?identifier={SNILS_SYSTEM}|{snils(6)}"},
                },
                "request": {"method": "POST", "url": "Observation"},
            }
        ],
    }
    # a conditional reference matching both MOs' records of one person is resolved to the
    # person's golden record
    r = client.post("/fhir", json=later, headers=FJ)
    assert r.status_code == 200, r.text
    oid = r.json()["entry"][0]["response"]["location"].split("/")[1]
    subject = client.get(f"/fhir/Observation/{oid}").json()["subject"]["reference"]
    assert subject == f"Patient/{golden_of(client, ids[0])['id']}"


def test_deleting_the_last_source_deletes_the_golden_record(client) -> None:  # type: ignore[no-untyped-def]
    a = post(client, person(ids=[(SNILS_SYSTEM, snils(7))]))
    b = post(client, person(ids=[(SNILS_SYSTEM, snils(7)), (MO40, "d-1")]))
    g = golden_of(client, a["id"])
    assert client.delete(f"/fhir/Patient/{b['id']}").status_code in (200, 204)
    g2 = golden_of(client, a["id"])
    assert g2["id"] == g["id"] and (MO40, "d-1") not in {
        (i["system"], i["value"]) for i in g2["identifier"]
    }
    assert client.delete(f"/fhir/Patient/{a['id']}").status_code in (200, 204)
    assert client.get(f"/fhir/Patient/{g['id']}").status_code == 410


def test_match_returns_graded_golden_records(client) -> None:  # type: ignore[no-untyped-def]
    a = post(client, person(ids=[(SNILS_SYSTEM, snils(8))], phone="+79215550104"))
    post(client, person("Петров", "Иван", "Ильич", "1950-01-01", "male"))
    g = golden_of(client, a["id"])
    r = op(client, "match", resource=person("Ivanova", "Anna", None, phone="8 (921) 555-01-04"))
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert bundle["type"] == "searchset" and [e["resource"]["id"] for e in bundle["entry"]] == [
        g["id"]
    ]
    search = bundle["entry"][0]["search"]
    assert search["extension"][0]["valueCode"] == "certain" and search["score"] > 0.9
    # a weaker description is only possible or probable; onlyCertainMatches drops it
    weak = person(birth="1985-03-17", middle=None)
    r = op(client, "match", resource=weak)
    graded = [e["search"]["extension"][0]["valueCode"] for e in r.json()["entry"]]
    assert graded and graded[0] in ("probable", "possible")
    r = op(client, "match", resource=weak, onlyCertainMatches=True)
    assert r.json()["entry"] == []
    # bad input
    assert (
        op(client, "match", resource={"resourceType": "Patient", "gender": "female"}).status_code
        == 422
    )
    assert op(client, "match", resource={"resourceType": "Observation"}).status_code == 400
    bad = client.post("/fhir/Patient/$match", json={"resourceType": "Bundle"}, headers=FJ)
    assert bad.status_code == 400


def test_pixm_cross_references_every_identifier(client) -> None:  # type: ignore[no-untyped-def]
    a = post(client, person(ids=[(SNILS_SYSTEM, snils(9)), (MO12, "12-9")]))
    b = post(client, person(ids=[(SNILS_SYSTEM, snils(9)), (MO40, "40-9")]))
    g = golden_of(client, a["id"])
    r = client.get(f"/fhir/Patient/$ihe-pix?sourceIdentifier={MO12}|12-9")
    assert r.status_code == 200, r.text
    parts = r.json()["parameter"]
    idents = {
        (p["valueIdentifier"]["system"], p["valueIdentifier"]["value"])
        for p in parts
        if p["name"] == "targetIdentifier"
    }
    assert idents == {(SNILS_SYSTEM, snils(9)), (MO40, "40-9")}
    refs = [p["valueReference"]["reference"] for p in parts if p["name"] == "targetId"]
    assert refs[0] == f"Patient/{g['id']}" and set(refs) == {
        f"Patient/{x}" for x in (g["id"], a["id"], b["id"])
    }
    r = client.get(f"/fhir/Patient/$ihe-pix?sourceIdentifier={MO12}|12-9&targetSystem={MO40}")
    assert [
        p["valueIdentifier"]["value"]
        for p in r.json()["parameter"]
        if p["name"] == "targetIdentifier"
    ] == ["40-9"]
    # ITI-83 error cases: unknown domain 400, unknown target domain 403, unknown patient 404
    assert client.get("/fhir/Patient/$ihe-pix?sourceIdentifier=urn:oid:9.9.9|1").status_code == 400
    r = client.get(f"/fhir/Patient/$ihe-pix?sourceIdentifier={MO12}|12-9&targetSystem=urn:oid:9.9")
    assert r.status_code == 403
    assert client.get(f"/fhir/Patient/$ihe-pix?sourceIdentifier={MO12}|nobody").status_code == 404
    assert client.get("/fhir/Patient/$ihe-pix").status_code == 400


def test_merge_resolves_references_and_unmerge_restores(client) -> None:  # type: ignore[no-untyped-def]
    a = post(client, person(ids=[(SNILS_SYSTEM, snils(10))]))
    b = post(client, person("Смирнова", "Елена", "Олеговна", "1970-10-10"))
    ga, gb = golden_of(client, a["id"])["id"], golden_of(client, b["id"])["id"]
    oa, ob = post(client, obs(a["id"], 1))["id"], post(client, obs(b["id"], 2))["id"]

    def obs_of(pid: str) -> set[str]:
        return {r["id"] for r in entries(client.get(f"/fhir/Observation?patient={pid}").json())}

    assert obs_of(ga) == {oa} and obs_of(gb) == {ob}
    # preview changes nothing
    r = op(
        client,
        "merge",
        source_patient=f"Patient/{gb}",
        target_patient=f"Patient/{ga}",
        preview=True,
    )
    assert r.status_code == 200 and obs_of(ga) == {oa}
    r = op(
        client,
        "merge",
        source_patient=f"Patient/{gb}",
        target_patient=f"Patient/{ga}",
        reason="одно лицо",
    )
    assert r.status_code == 200, r.text
    result = {p["name"]: p for p in r.json()["parameter"]}["result"]["resource"]
    assert result["id"] == ga
    assert {"type": "replaces", "other": {"reference": f"Patient/{gb}"}} in result["link"]
    assert obs_of(ga) == {oa, ob} and obs_of(gb) == {oa, ob} and obs_of(b["id"]) == {oa, ob}
    retired = client.get(f"/fhir/Patient/{gb}").json()
    assert retired["active"] is False
    assert retired["link"] == [{"other": {"reference": f"Patient/{ga}"}, "type": "replaced-by"}]
    audit = entries(
        client.get(f"/fhir/AuditEvent?entity=Patient/{gb}&subtype=merge,unmerge").json()
    )
    assert [e["subtype"][0]["code"] for e in audit] == ["merge"]
    # the same merge again (a repeated A40) is a no-op that says so
    r = op(client, "merge", source_patient=f"Patient/{gb}", target_patient=f"Patient/{ga}")
    assert r.status_code == 200 and "already" in r.text
    assert (
        client.get(f"/fhir/Patient/{ga}").json()["meta"]["versionId"] == result["meta"]["versionId"]
    )
    # into itself, circular, into an unknown patient: clear errors, nothing changes
    r = op(client, "merge", source_patient=f"Patient/{ga}", target_patient=f"Patient/{ga}")
    assert r.status_code == 400 and "merge-into-self" in r.text
    r = op(client, "merge", source_patient=f"Patient/{ga}", target_patient=f"Patient/{gb}")
    assert r.status_code == 422 and "merge-target-retired" in r.text
    r = op(client, "merge", source_patient="Patient/nope", target_patient=f"Patient/{ga}")
    assert r.status_code == 404 and "unknown-patient" in r.text
    # a record into its own golden record: already so
    r = op(client, "merge", source_patient=f"Patient/{a['id']}", target_patient=f"Patient/{ga}")
    assert r.status_code == 200 and "already" in r.text
    # unmerge restores the two people exactly
    r = op(client, "unmerge", source_patient=f"Patient/{gb}")
    assert r.status_code == 200, r.text
    assert obs_of(ga) == {oa} and obs_of(gb) == {ob}
    restored = client.get(f"/fhir/Patient/{gb}").json()
    assert restored["active"] is True and restored["link"] == [
        {"other": {"reference": f"Patient/{b['id']}"}, "type": "seealso"}
    ]
    assert not any(
        lnk["type"] == "replaces" for lnk in client.get(f"/fhir/Patient/{ga}").json()["link"]
    )
    r = op(client, "unmerge", source_patient=f"Patient/{gb}")
    assert r.status_code == 422 and "not-merged" in r.text
    audit = entries(
        client.get(f"/fhir/AuditEvent?entity=Patient/{gb}&subtype=merge,unmerge").json()
    )
    assert sorted(e["subtype"][0]["code"] for e in audit) == ["merge", "unmerge"]


def test_mo_level_merge_of_two_charts_retires_one(client) -> None:  # type: ignore[no-untyped-def]
    old = post(client, person(ids=[(MO12, "old-1")], phone="+79215550105"))
    new = post(
        client, person("Кузнецова", "Ирина", "Павловна", "1961-06-06", ids=[(MO12, "new-1")])
    )
    r = client.post(
        "/fhir/Patient/$merge",
        json={
            "resourceType": "Parameters",
            "parameter": [
                {
                    "name": "source-patient-identifier",
                    "valueIdentifier": {"system": MO12, "value": "old-1"},
                },
                {
                    "name": "target-patient-identifier",
                    "valueIdentifier": {"system": MO12, "value": "new-1"},
                },
            ],
        },
        headers=FJ,
    )
    assert r.status_code == 200, r.text
    src = client.get(f"/fhir/Patient/{old['id']}").json()
    assert src["active"] is False and src["link"][0]["other"]["reference"] == f"Patient/{new['id']}"
    g = golden_of(client, new["id"])
    assert {(i["system"], i["value"]) for i in g["identifier"]} >= {
        (MO12, "old-1"),
        (MO12, "new-1"),
    }
    # unmerge gives the old chart back as it was
    r = op(client, "unmerge", source_patient=f"Patient/{old['id']}")
    assert r.status_code == 200, r.text
    back = client.get(f"/fhir/Patient/{old['id']}").json()
    assert "active" not in back and "link" not in back and back["telecom"] == old["telecom"]
    assert golden_of(client, old["id"])["id"] != golden_of(client, new["id"])["id"]


@pytest.mark.parametrize(
    "body", [{}, {"resourceType": "Patient"}, {"resourceType": "Parameters", "parameter": "x"}]
)
def test_merge_rejects_malformed_parameters(client, body: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/fhir/Patient/$merge", json=body, headers=FJ)
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    r = client.post("/fhir/Patient/$merge", json=params(source_patient="Patient/x"), headers=FJ)
    assert r.status_code == 400 and "target-patient" in r.text


def test_identifier_systems_no_mo_registered_are_refused(client) -> None:  # type: ignore[no-untyped-def]
    stray = person(ids=[("https://stray.example/mrn", "1")])
    r = client.post("/fhir/Patient", json=stray, headers=FJ)
    assert r.status_code == 400, r.text
    issue = r.json()["issue"][0]
    assert "unregistered-identifier-system" in issue["diagnostics"]
    assert issue["expression"] == ["Patient.identifier[0].system"]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": person(ids=[(MO12, "ok-1")]),
                "request": {"method": "POST", "url": "Patient"},
            },
            {"resource": stray, "request": {"method": "POST", "url": "Patient"}},
        ],
    }
    assert client.post("/fhir", json=bundle, headers=FJ).status_code == 400
    assert entries(client.get(f"/fhir/Patient?identifier={MO12}|ok-1").json()) == []
    # national identifiers and registered systems are fine
    assert (
        client.post("/fhir/Patient", json=person(ids=[(MO12, "ok-1")]), headers=FJ).status_code
        == 201
    )
