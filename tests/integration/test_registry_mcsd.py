"""IHE mCSD (ITI-90 Find Matching Care Services) style queries over a loaded demo city, through
the FHIR API on every resource-store backend; and ``_history`` for directory sync."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from hie.demo import MOS_BY_ID, Generator
from hie.fhir.dates import format_instant
from hie.fhir.service import FhirService
from hie.registries.facility import (
    DICOM_DIMSE,
    FRMO_SYSTEM,
    HIE_CONNECTION_TYPE_SYSTEM,
    HL7_CONNECTION_TYPE_SYSTEM,
    HL7_FACILITY_SYSTEM,
    MEDICAL_SPECIALTY_SYSTEM,
    MO_KIND_SYSTEM,
)
from hie.registries.loader import load_file

LOCATIONS = """\
id,name,organization_id,parent_id,type,status,address,city,postal_code,latitude,longitude
loc-gmb2,Главный корпус ГМБ № 2,mo-0019,,HOSP,active,"пр. Энгельса, д. 5",Санкт-Петербург,194156,60.03,30.33
loc-gmb2-ct,Отделение лучевой диагностики,mo-0019,loc-gmb2,RADDX,active,,,,,
loc-gmb2-old,Старый корпус,mo-0019,loc-gmb2,HOSP,inactive,,,,,
loc-gp12,Поликлиника ГП № 12,mo-0001,,OF,active,,,,,
"""


@pytest.fixture
def city(client: Any, tmp_path: Path) -> Any:
    city = Generator(11).city()
    svc = FhirService(client.hub.store, client.hub.settings)
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": r} for r in city.resources()]}  # fmt: skip
    path = tmp_path / "city.json"
    import json

    path.write_text(json.dumps(bundle, ensure_ascii=False), encoding="utf-8")
    assert load_file(svc, path).exit_code == 0
    (tmp_path / "locations.csv").write_text(LOCATIONS, encoding="utf-8")
    report = load_file(svc, tmp_path / "locations.csv")
    assert report.exit_code == 0, report.problems
    return city


def search(client: Any, path: str, **params: str) -> list[dict[str, Any]]:
    res = client.get(f"/fhir/{path}", params={"_count": "500", **params})
    assert res.status_code == 200, res.text
    return res.json().get("entry", [])


def ids(entries: list[dict[str, Any]], mode: str = "match") -> set[str]:
    return {
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in entries
        if e["search"]["mode"] == mode
    }


def test_organization_searches(client: Any, city: Any) -> None:
    mo = MOS_BY_ID["mo-0019"]
    assert ids(search(client, "Organization", identifier=f"{FRMO_SYSTEM}|{mo.oid}")) == {
        "Organization/mo-0019"
    }
    hospitals = ids(search(client, "Organization", type=f"{MO_KIND_SYSTEM}|hospital"))
    assert hospitals == {f"Organization/{m.id}" for m in MOS_BY_ID.values() if m.kind == "hospital"}
    by_name = ids(search(client, "Organization", **{"name:contains": "Мариинская"}))
    assert by_name == {"Organization/mo-0020"}
    assert ids(search(client, "Organization", name="ГМБ")) >= {"Organization/mo-0019"}  # alias
    parts = ids(search(client, "Organization", partof="Organization/mo-0013"))
    assert parts == {f"Organization/{m.id}" for m in MOS_BY_ID.values() if m.parent_id == "mo-0013"}
    # drill-down by district: the address string search covers Address.district
    kirovsky = ids(search(client, "Organization", address="Кировский район"))
    assert kirovsky == {
        f"Organization/{m.id}" for m in MOS_BY_ID.values() if m.district == "Кировский район"
    }
    assert len(search(client, "Organization", active="true")) == len(city.organizations)
    assert search(client, "Organization", active="false") == []


def test_location_searches(client: Any, city: Any) -> None:
    at = ids(search(client, "Location", organization="Organization/mo-0019"))
    assert at == {"Location/loc-gmb2", "Location/loc-gmb2-ct", "Location/loc-gmb2-old"}
    assert ids(search(client, "Location", partof="Location/loc-gmb2", status="active")) == {
        "Location/loc-gmb2-ct"
    }
    hosp = "http://terminology.hl7.org/CodeSystem/v3-RoleCode|HOSP"
    assert ids(search(client, "Location", type=hosp)) == {
        "Location/loc-gmb2",
        "Location/loc-gmb2-old",
    }
    assert ids(search(client, "Location", name="поликлиника")) == {"Location/loc-gp12"}


def test_practitioner_and_role_searches(client: Any, city: Any) -> None:
    pr = city.practitioners[0]
    snils = pr["identifier"][0]
    found = search(client, "Practitioner", identifier=f"{snils['system']}|{snils['value']}")
    assert ids(found) == {f"Practitioner/{pr['id']}"}
    family = pr["name"][0]["family"]
    assert f"Practitioner/{pr['id']}" in ids(search(client, "Practitioner", family=family))
    assert f"Practitioner/{pr['id']}" in ids(search(client, "Practitioner", name=family))
    assert len(search(client, "Practitioner", active="true")) == len(city.practitioners)
    # roles of one MO with their practitioners (mCSD: _include=PractitionerRole:practitioner)
    entries = search(
        client,
        "PractitionerRole",
        organization="Organization/mo-0001",
        _include="PractitionerRole:practitioner",
    )
    roles = [r for r in city.roles if r["organization"]["reference"] == "Organization/mo-0001"]
    assert ids(entries) == {f"PractitionerRole/{r['id']}" for r in roles}
    assert ids(entries, "include") == {r["practitioner"]["reference"] for r in roles}
    cardio = ids(
        search(client, "PractitionerRole", specialty=f"{MEDICAL_SPECIALTY_SYSTEM}|cardiology")
    )
    assert cardio == {
        f"PractitionerRole/{r['id']}"
        for r in city.roles
        if r["specialty"][0]["coding"][0]["code"] == "cardiology"
    }
    assert search(client, "PractitionerRole", active="true")


def test_revinclude_roles_and_endpoints_of_an_organization(client: Any, city: Any) -> None:
    entries = search(
        client,
        "Organization",
        _id="mo-0019",
        _revinclude="PractitionerRole:organization,Endpoint:organization",
    )
    assert ids(entries) == {"Organization/mo-0019"}
    included = ids(entries, "include")
    roles = {
        f"PractitionerRole/{r['id']}"
        for r in city.roles
        if r["organization"]["reference"] == "Organization/mo-0019"
    }
    assert roles and roles <= included
    assert {"Endpoint/ep-0019-mllp", "Endpoint/ep-0019-dimse"} <= included


def test_endpoint_searches(client: Any, city: Any) -> None:
    mllp = search(
        client, "Endpoint", **{"connection-type": f"{HL7_CONNECTION_TYPE_SYSTEM}|hl7v2-mllp"}
    )
    assert len(mllp) == len(MOS_BY_ID)
    dimse = search(
        client,
        "Endpoint",
        **{"connection-type": f"{HIE_CONNECTION_TYPE_SYSTEM}|{DICOM_DIMSE}", "status": "active"},
    )
    assert len(dimse) == sum(1 for m in MOS_BY_ID.values() if m.ae_title)
    found = search(client, "Endpoint", identifier=f"{HL7_FACILITY_SYSTEM}|GP12LAB")
    assert ids(found) == {"Endpoint/ep-0001-mllp"}
    assert ids(search(client, "Endpoint", organization="Organization/mo-0001")) == {
        "Endpoint/ep-0001-mllp",
        "Endpoint/ep-0001-dimse",
    }


def test_last_updated_and_history_for_sync(client: Any, city: Any, tmp_path: Path) -> None:
    time.sleep(0.01)
    since = format_instant(time.time_ns() // 1000)
    assert search(client, "Organization", _lastUpdated=f"gt{since}") == []
    csv = "id,frmo_oid,name,parent_id\nmo-0015,{},Переименованное отделение,mo-0013\n".format(
        MOS_BY_ID["mo-0015"].oid
    )
    (tmp_path / "rename.csv").write_text(csv, encoding="utf-8")
    svc = FhirService(client.hub.store, client.hub.settings)
    assert load_file(svc, tmp_path / "rename.csv").updated == 1
    changed = search(client, "Organization", _lastUpdated=f"gt{since}")
    assert ids(changed) == {"Organization/mo-0015"}
    # a directory consumer syncs with the type-level history since its last poll
    res = client.get("/fhir/Organization/_history", params={"_since": since})
    assert res.status_code == 200
    entries = res.json()["entry"]
    assert [e["resource"]["id"] for e in entries] == ["mo-0015"]
    assert entries[0]["request"]["method"] == "PUT"
    everything = client.get("/fhir/Organization/_history", params={"_count": "1000"}).json()
    assert len(everything["entry"]) == len(city.organizations) + 1
