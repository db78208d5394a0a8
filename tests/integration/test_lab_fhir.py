"""The FHIR route for lab results: a laboratory POSTs a transaction Bundle (DiagnosticReport,
Observations, Specimen, with its Patient), with the same validation, identity matching,
idempotency by identifier, and code checks as the HL7 route."""

from __future__ import annotations

from typing import Any

from tests.fixtures.auth import bearer
from tests.fixtures.labs import GP_PATIENTS, LAB, as_transaction, lab_registry
from tests.fixtures.records import FJ, golden_id

LAB_IDS = "https://lab7001.example/fhir/sid/results"


def lab_bundle(status: str = "final", value: float = 5.4, code: str = "2823-3") -> dict[str, Any]:
    """A laboratory's transaction: conditional create of the patient by the clinic's number,
    conditional updates of the report and its result by the lab's own identifiers."""
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": GP_PATIENTS, "value": "7000555"}],
        "name": [{"family": "Орлова", "given": ["Вера"]}],
        "birthDate": "1979-04-05",
        "gender": "female",
    }
    obs = {
        "resourceType": "Observation",
        "identifier": [{"system": LAB_IDS, "value": "R-1/1"}],
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": "urn:uuid:pat"},
        "valueQuantity": {
            "value": value,
            "unit": "ммоль/л",
            "system": "http://unitsofmeasure.org",
            "code": "mmol/L",
        },
        "performer": [{"reference": f"Organization/{LAB}"}],
    }
    report = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": LAB_IDS, "value": "R-1"}],
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": "24326-1"}]},
        "subject": {"reference": "urn:uuid:pat"},
        "result": [{"reference": "urn:uuid:obs"}],
        "performer": [{"reference": f"Organization/{LAB}"}],
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:pat",
                "resource": patient,
                "request": {
                    "method": "POST",
                    "url": "Patient",
                    "ifNoneExist": f"identifier={GP_PATIENTS}|7000555",
                },
            },
            {
                "fullUrl": "urn:uuid:obs",
                "resource": obs,
                "request": {"method": "PUT", "url": f"Observation?identifier={LAB_IDS}|R-1/1"},
            },
            {
                "fullUrl": "urn:uuid:rep",
                "resource": report,
                "request": {"method": "PUT", "url": f"DiagnosticReport?identifier={LAB_IDS}|R-1"},
            },
        ],
    }


def test_a_lab_posts_results_over_fhir(client) -> None:  # type: ignore[no-untyped-def]
    assert client.post("/fhir", json=as_transaction(lab_registry())).status_code == 200
    lab = {**FJ, **bearer(client.settings, "mis", org=LAB)}
    r = client.post("/fhir", json=lab_bundle(), headers=lab)
    assert r.status_code == 200, r.text
    entries = r.json()["entry"]
    assert [e["response"]["status"][:3] for e in entries] == ["201", "201", "201"]
    # LOINC is not loaded in this hub: the codes are stored, and flagged per entry
    outcome = entries[1]["response"]["outcome"]
    assert outcome["issue"][0]["severity"] == "warning"
    assert "2823-3" in outcome["issue"][0]["diagnostics"]
    # sent again, and then corrected: one report, one result, new versions
    assert client.post("/fhir", json=lab_bundle(), headers=lab).status_code == 200
    fixed = client.post("/fhir", json=lab_bundle("corrected", 5.1), headers=lab)
    assert fixed.status_code == 200
    obs = client.get(f"/fhir/Observation?identifier={LAB_IDS}|R-1/1", headers=lab).json()
    assert len(obs["entry"]) == 1
    res = obs["entry"][0]["resource"]
    assert res["status"] == "corrected" and res["meta"]["versionId"] == "3"
    # the patient went through the master patient index: the golden record finds the report
    src = client.get(f"/fhir/Patient?identifier={GP_PATIENTS}|7000555").json()
    golden = golden_id(client, src["entry"][0]["resource"]["id"])
    reports = client.get(f"/fhir/DiagnosticReport?patient={golden}").json()
    assert len(reports["entry"]) == 1
    # an invalid resource is refused whole, with an OperationOutcome naming it
    bad = lab_bundle()
    bad["entry"][1]["resource"]["valueQuantity"]["value"] = "пять"  # not a decimal
    r = client.post("/fhir", json=bad, headers=lab)
    assert r.status_code in (400, 422)
    assert r.json()["resourceType"] == "OperationOutcome"
    # and a lab cannot file results in another organisation's name
    forged = lab_bundle()
    forged["entry"][2]["resource"]["performer"] = [{"reference": "Organization/gp-9001"}]
    assert client.post("/fhir", json=forged, headers=lab).status_code == 403
