"""The demo city: MOs as Organizations with Endpoints, practitioners and roles."""

from __future__ import annotations

import re

from fhir.resources.R4B import get_fhir_model_class

from hie.demo import Generator, mo_by_facility
from hie.demo.city import (
    DISTRICT_STREETS,
    HIE_ENDPOINT_CONNECTION_TYPE_SYSTEM,
    HL7_ENDPOINT_CONNECTION_TYPE_SYSTEM,
    HL7_FACILITY_SYSTEM,
    MOS,
)
from hie.demo.identifiers import FRMO_SYSTEM, SPB_MO_OID_ROOT, snils_is_valid


def test_mo_table() -> None:
    assert 25 <= len(MOS) <= 40
    for attr in ("id", "oid", "name", "hl7_facility"):
        values = [getattr(mo, attr) for mo in MOS]
        assert len(set(values)) == len(values), attr
    ae_titles = [mo.ae_title for mo in MOS if mo.ae_title]
    assert len(set(ae_titles)) == len(ae_titles)
    assert all(len(ae) <= 16 and ae.isascii() and ae.isupper() for ae in ae_titles)
    assert all(mo.oid.startswith(SPB_MO_OID_ROOT + ".") for mo in MOS)
    assert all(mo.district in DISTRICT_STREETS for mo in MOS)
    assert {mo.kind for mo in MOS} >= {"polyclinic", "hospital", "laboratory", "diagnostic-centre"}
    assert mo_by_facility("GP12LAB") is MOS[0]
    assert mo_by_facility("NOPE") is None


def test_city_resources_are_valid_fhir() -> None:
    city = Generator(1).city()
    for res in city.resources():
        model = get_fhir_model_class(res["resourceType"])
        model.model_validate(res)
    assert len(city.organizations) == len(MOS)
    assert city.practitioners and len(city.practitioners) == len(city.roles)


def test_city_references_resolve_and_come_first() -> None:
    city = Generator(1).city()
    seen: set[str] = set()
    for res in city.resources():
        for ref in _references(res):
            assert ref in seen, f"{res['resourceType']}/{res['id']} references {ref} before it"
        seen.add(f"{res['resourceType']}/{res['id']}")
    assert any("partOf" in org for org in city.organizations)


def test_organization_identifier_is_frmo_oid() -> None:
    city = Generator(1).city()
    for org, mo in zip(sorted(city.organizations, key=lambda o: o["id"]), MOS, strict=True):
        assert org["id"] == mo.id
        assert org["identifier"][0] == {"use": "official", "system": FRMO_SYSTEM, "value": mo.oid}
        assert org["address"][0]["district"] == mo.district
        assert re.fullmatch(r"19\d{4}", org["address"][0]["postalCode"])


def test_endpoints() -> None:
    city = Generator(1).city()
    by_org: dict[str, list[dict[str, object]]] = {}
    for ep in city.endpoints:
        by_org.setdefault(ep["managingOrganization"]["reference"], []).append(ep)
    for mo in MOS:
        eps = by_org[mo.reference]
        mllp = [e for e in eps if e["connectionType"]["code"] == "hl7v2-mllp"]
        assert len(mllp) == 1
        assert mllp[0]["connectionType"]["system"] == HL7_ENDPOINT_CONNECTION_TYPE_SYSTEM
        assert mllp[0]["identifier"] == [{"system": HL7_FACILITY_SYSTEM, "value": mo.hl7_facility}]
        dimse = [e for e in eps if e["connectionType"]["code"] == "dicom-dimse"]
        if mo.ae_title is None:
            assert not dimse
        else:
            assert len(dimse) == 1
            assert dimse[0]["connectionType"]["system"] == HIE_ENDPOINT_CONNECTION_TYPE_SYSTEM
            assert dimse[0]["address"] == f"dicom://{mo.ae_title}@127.0.0.1:{mo.dicom_port}"
    # About a third or more of the MOs send images, as in St Petersburg.
    assert sum(1 for mo in MOS if mo.ae_title) >= len(MOS) // 3


def test_practitioners() -> None:
    city = Generator(1).city()
    for pr in city.practitioners:
        name = pr["name"][0]
        assert len(name["given"]) == 2
        assert name["text"] == " ".join([name["family"], *name["given"]])
        assert snils_is_valid(pr["identifier"][0]["value"])
        if pr["gender"] == "female":
            assert name["given"][1].endswith(("вна", "чна"))


def test_city_is_deterministic_and_independent_of_other_calls() -> None:
    g1, g2 = Generator(42), Generator(42)
    list(g2.patients(5))
    assert g1.city() == g2.city()
    assert Generator(42).city().practitioners != Generator(43).city().practitioners


def _references(obj: object) -> list[str]:
    found: list[str] = []
    if isinstance(obj, dict):
        ref = obj.get("reference")
        if isinstance(ref, str):
            found.append(ref)
        for value in obj.values():
            found += _references(value)
    elif isinstance(obj, list):
        for item in obj:
            found += _references(item)
    return found
