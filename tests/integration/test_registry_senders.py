"""Sender lookups (hie.registries.senders) over the demo city, on every resource-store backend."""

from __future__ import annotations

from typing import Any

import pytest

from hie.demo import MOS_BY_ID, Generator, as_transaction
from hie.fhir.service import FhirService
from hie.registries.facility import PATIENT_ID_SYSTEM_SYSTEM
from hie.registries.senders import Destination, SenderRegistry

BASE = "http://hub.test/fhir"


class Clock:
    """A clock the test moves by hand (for the cache's time to live)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def svc(store: Any, settings_for: Any) -> FhirService:
    svc = FhirService(store, settings_for())
    city = Generator(7).city()  # the MOs and their endpoints are what the lookups read
    svc.transaction(as_transaction([*city.organizations, *city.endpoints]), BASE)
    return svc


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reg(svc: FhirService, clock: Clock) -> SenderRegistry:
    return SenderRegistry(svc.store, ttl=2.0, clock=clock)


def _put(svc: FhirService, res: dict[str, Any]) -> None:
    svc.update(res, res["resourceType"], res["id"])


def _endpoint(svc: FhirService, id: str) -> dict[str, Any]:
    from hie.fhir.service import content_json

    return content_json(svc.read("Endpoint", id))


def test_registered_hl7_facility_is_found(reg: SenderRegistry) -> None:
    mo = reg.mo_for_hl7_sender("LIS", "GP12LAB")
    assert mo is not None and mo.id == "mo-0001"
    assert mo.frmo_oid == MOS_BY_ID["mo-0001"].oid
    assert mo.name == MOS_BY_ID["mo-0001"].name
    assert {e.id for e in mo.endpoints} == {"ep-0001-mllp", "ep-0001-dimse"}
    assert mo.reference == "Organization/mo-0001"


def test_hl7_facility_as_a_whole_hd_and_without_application(reg: SenderRegistry) -> None:
    oid = MOS_BY_ID["mo-0002"].oid
    found = reg.mo_for_hl7_sender(None, f"GP3LAB^{oid}^ISO")
    assert found is not None and found.id == "mo-0002"


def test_unknown_hl7_sender_is_none(reg: SenderRegistry) -> None:
    assert reg.mo_for_hl7_sender("LIS", "NO-SUCH-FACILITY") is None
    assert reg.mo_for_hl7_sender("LIS", "") is None
    # an AE title is not an HL7 facility
    assert reg.mo_for_hl7_sender("LIS", "GP12XR") is None


def test_inactive_hl7_endpoint_is_ignored(
    svc: FhirService, reg: SenderRegistry, clock: Clock
) -> None:
    assert reg.mo_for_hl7_sender("LIS", "GP17LAB") is not None
    ep = _endpoint(svc, "ep-0003-mllp")
    ep["status"] = "off"
    _put(svc, ep)
    clock.now += 2.5  # the change is visible once the cached answer expires
    assert reg.mo_for_hl7_sender("LIS", "GP17LAB") is None
    ep["status"] = "active"
    _put(svc, ep)
    reg.invalidate()  # … or at once after an invalidation
    assert reg.mo_for_hl7_sender("LIS", "GP17LAB") is not None


def test_inactive_organization_is_not_a_sender(svc: FhirService, reg: SenderRegistry) -> None:
    from hie.fhir.service import content_json

    org = content_json(svc.read("Organization", "mo-0004"))
    org["active"] = False
    _put(svc, org)
    assert reg.mo_for_hl7_sender(None, "GP25LAB") is None
    assert reg.mo_for_dicom_caller("GP25XR", "127.0.0.1") is None
    assert reg.dicom_destination("GP25XR") is None


def test_sending_application_restriction(svc: FhirService, reg: SenderRegistry) -> None:
    from hie.registries.facility import HL7_APPLICATION_SYSTEM

    ep = _endpoint(svc, "ep-0005-mllp")
    ep["identifier"].append({"system": HL7_APPLICATION_SYSTEM, "value": "ALISA"})
    _put(svc, ep)
    found = reg.mo_for_hl7_sender("ALISA", "GP32LAB")
    assert found is not None and found.id == "mo-0005"
    assert reg.mo_for_hl7_sender("OTHERAPP", "GP32LAB") is None
    assert reg.mo_for_hl7_sender(None, "GP32LAB") is None


def test_hl7_facility_claimed_by_two_mos_is_ambiguous(
    svc: FhirService, reg: SenderRegistry
) -> None:
    ep = _endpoint(svc, "ep-0006-mllp")
    ep["identifier"][0]["value"] = "GP44LAB"  # mo-0007's facility
    _put(svc, ep)
    assert reg.mo_for_hl7_sender("LIS", "GP44LAB") is None


def test_dicom_caller_matches_ae_title_and_host(reg: SenderRegistry) -> None:
    mo = reg.mo_for_dicom_caller("GMB2CT", "127.0.0.1")
    assert mo is not None and mo.id == "mo-0019"
    # an IPv4-mapped IPv6 peer address is the same host
    found = reg.mo_for_dicom_caller("GMB2CT", "::ffff:127.0.0.1")
    assert found is not None and found.id == "mo-0019"


def test_dicom_caller_from_the_wrong_host_is_none(reg: SenderRegistry) -> None:
    assert reg.mo_for_dicom_caller("GMB2CT", "10.20.30.40") is None


def test_unknown_dicom_caller_is_none(reg: SenderRegistry) -> None:
    assert reg.mo_for_dicom_caller("NOSUCHAE", "127.0.0.1") is None
    # an HL7 facility is not an AE title
    assert reg.mo_for_dicom_caller("GMB2LAB", "127.0.0.1") is None


def test_inactive_dicom_endpoint_is_ignored(svc: FhirService, reg: SenderRegistry) -> None:
    ep = _endpoint(svc, "ep-0019-dimse")
    ep["status"] = "suspended"
    _put(svc, ep)
    assert reg.mo_for_dicom_caller("GMB2CT", "127.0.0.1") is None
    assert reg.dicom_destination("GMB2CT") is None


def test_dicom_address_without_host_accepts_any_host(svc: FhirService, reg: SenderRegistry) -> None:
    ep = _endpoint(svc, "ep-0020-dimse")
    ep["address"] = "dicom://MARIINSKCT"
    _put(svc, ep)
    found = reg.mo_for_dicom_caller("MARIINSKCT", "192.0.2.7")
    assert found is not None and found.id == "mo-0020"
    assert reg.dicom_destination("MARIINSKCT") is None  # no host and port to move to


def test_dicom_host_name_is_resolved(svc: FhirService, reg: SenderRegistry) -> None:
    ep = _endpoint(svc, "ep-0021-dimse")
    ep["address"] = "dicom://ELIZMR@localhost:11221"
    _put(svc, ep)
    found = reg.mo_for_dicom_caller("ELIZMR", "127.0.0.1")
    assert found is not None and found.id == "mo-0021"
    assert reg.mo_for_dicom_caller("ELIZMR", "198.51.100.1") is None
    assert (
        SenderRegistry(svc.store, resolve_hosts=False).mo_for_dicom_caller("ELIZMR", "127.0.0.1")
        is None
    )


def test_same_ae_title_on_two_hosts_is_told_apart_by_host(
    svc: FhirService, reg: SenderRegistry
) -> None:
    ep = _endpoint(svc, "ep-0022-dimse")  # mo-0022 uses ALEXCT at 127.0.0.1
    other = {**_endpoint(svc, "ep-0023-dimse"), "address": "dicom://ALEXCT@10.1.1.1:104"}
    _put(svc, other)  # mo-0023 now also calls itself ALEXCT, from 10.1.1.1
    a = reg.mo_for_dicom_caller("ALEXCT", "127.0.0.1")
    b = reg.mo_for_dicom_caller("ALEXCT", "10.1.1.1")
    assert a is not None and a.id == "mo-0022" and ep["managingOrganization"]
    assert b is not None and b.id == "mo-0023"
    # which one is the C-MOVE destination is ambiguous, unless the caller's MO is known
    assert reg.dicom_destination("ALEXCT") is None
    assert reg.dicom_destination("ALEXCT", for_mo="mo-0023") == Destination("10.1.1.1", 104)


def test_dicom_destinations_are_parsed(reg: SenderRegistry) -> None:
    for mo in MOS_BY_ID.values():
        if mo.ae_title is not None:
            assert reg.dicom_destination(mo.ae_title) == Destination("127.0.0.1", mo.dicom_port)
    assert reg.dicom_destination("NOSUCHAE") is None
    assert reg.dicom_destination("GP12LAB") is None


def test_patient_id_system_is_registered_on_the_organization(reg: SenderRegistry) -> None:
    mo = reg.mo_for_hl7_sender("LIS", "GP12LAB")
    assert mo is not None
    expected = MOS_BY_ID["mo-0001"].mrn_system
    assert reg.patient_id_system(mo) == expected == mo.patient_id_system
    assert reg.patient_id_system("mo-0001") == expected
    assert reg.patient_id_system("no-such-mo") is None
    back = reg.mo_for_patient_id_system(expected)
    assert back is not None and back.id == "mo-0001"
    assert reg.mo_for_patient_id_system("urn:oid:1.2.3.4.5") is None


def test_mo_without_patient_id_system(svc: FhirService, reg: SenderRegistry) -> None:
    from hie.fhir.service import content_json

    org = content_json(svc.read("Organization", "mo-0008"))
    org["identifier"] = [
        i for i in org["identifier"] if i.get("system") != PATIENT_ID_SYSTEM_SYSTEM
    ]
    _put(svc, org)
    assert reg.patient_id_system("mo-0008") is None


def test_mo_by_frmo_oid(reg: SenderRegistry) -> None:
    oid = MOS_BY_ID["mo-0010"].oid
    for value in (oid, f"urn:oid:{oid}"):
        found = reg.mo_by_frmo_oid(value)
        assert found is not None and found.id == "mo-0010"
    assert reg.mo_by_frmo_oid("1.2.643.5.1.13.13.12.2.78.1") is None


def test_deleted_endpoint_is_forgotten(svc: FhirService, reg: SenderRegistry, clock: Clock) -> None:
    assert reg.mo_for_hl7_sender(None, "GP71LAB") is not None
    svc.delete("Endpoint", "ep-0011-mllp")
    clock.now += 2.5
    assert reg.mo_for_hl7_sender(None, "GP71LAB") is None
