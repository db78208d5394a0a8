"""HL7 v2 ADT into the master patient index (hie.registries.adt_intake), on every backend:
registered senders only, records keyed by the MO's own numbers, A40 merges robust to bad
feeds, and nothing written for a message that is refused."""

from __future__ import annotations

from typing import Any

import pytest

from hie.demo import MOS_BY_ID, Generator, as_transaction
from hie.fhir.service import FhirService, content_json
from hie.registries.adt_intake import AdtIntake
from hie.registries.identifiers import SNILS_SYSTEM
from hie.registries.patient_index import attach_mpi
from hie.registries.senders import SenderRegistry
from tests.fixtures.hl7v2 import (
    MRN_1,
    MRN_OLD,
    SNILS_1,
    SNILS_OID,
    adt_message,
    bad_snils,
    default_mrg,
    default_pid,
)

BASE = "http://hub.test/fhir"
MO = MOS_BY_ID["mo-0001"]  # registers MSH-4 GP12LAB (sending application LIS)


@pytest.fixture
def intake(store: Any, settings_for: Any) -> AdtIntake:
    svc = FhirService(store, settings_for())
    mpi = attach_mpi(svc)
    assert mpi is not None
    city = Generator(7).city()
    svc.transaction(as_transaction([*city.organizations, *city.endpoints]), BASE)
    return AdtIntake(svc, mpi, SenderRegistry(store, resolve_hosts=False))


def msg(event: str = "A01", **kw: Any) -> bytes:
    kw.setdefault("sending_application", "LIS")
    kw.setdefault("sending_facility", MO.hl7_facility)
    pid = kw.pop("pid", None) or default_pid(
        pid_3=[
            (MRN_1, "", "", ("", "", ""), "MR"),
            (SNILS_1, "", "", ("", SNILS_OID, "ISO"), "SNILS"),
        ]
    )
    return adt_message(event, pid=pid, **kw)


def patients(intake: AdtIntake) -> list[dict[str, Any]]:
    from hie.hub.store.port import Query

    return [content_json(r) for r in intake.svc.store.search(Query("Patient", count=100)).items]


def sources(intake: AdtIntake) -> list[dict[str, Any]]:
    return [p for p in patients(intake) if not p.get("meta", {}).get("tag")]


def test_registration_creates_the_mo_record_and_its_golden_record(intake: AdtIntake) -> None:
    res = intake.ingest(msg("A04"))
    assert res.ack_code == "AA", res.errors
    assert res.event == "A04" and res.control_id == "MSG00001" and res.mo == "mo-0001"
    [src] = sources(intake)
    assert src["id"] == res.patients[0]
    assert src["managingOrganization"]["reference"] == "Organization/mo-0001"
    assert {(i["system"], i["value"]) for i in src["identifier"]} == {
        (MO.mrn_system, MRN_1),
        (SNILS_SYSTEM, SNILS_1),
    }
    assert src["name"][0]["family"] == "Иванова"
    golden = intake.mpi.golden_of(src["id"])
    assert golden is not None and golden != src["id"]


@pytest.mark.parametrize("event", ["A01", "A04", "A08", "A28", "A31"])
def test_each_event_upserts_by_the_mo_number_and_resending_changes_nothing(
    intake: AdtIntake, event: str
) -> None:
    assert intake.ingest(msg("A28")).ack_code == "AA"
    first = sources(intake)[0]
    # the same person updated (a new phone) under the same MO number: one record, updated
    pid = default_pid(
        pid_3=[(MRN_1, "", "", ("", "", ""), "MR")],
        pid_13=("", "PRN", "CP", "", "7", "911", "7654321"),
    )
    res = intake.ingest(msg(event, pid=pid, control_id="MSG2"))
    assert res.ack_code == "AA", res.errors
    [src] = sources(intake)
    assert src["id"] == first["id"] and src["telecom"][0]["value"].endswith("7654321")
    again = intake.ingest(msg(event, pid=pid, control_id="MSG2"))
    assert again.ack_code == "AA" and len(sources(intake)) == 1
    assert intake.mpi.golden_of(src["id"]) == intake.mpi.golden_of(first["id"])


def test_unknown_sender_is_rejected_and_nothing_is_written(intake: AdtIntake) -> None:
    res = intake.ingest(msg(sending_facility="NOSUCHMO"))
    assert res.ack_code == "AR" and res.errors[0].code == "103"
    assert res.errors[0].segment == "MSH" and res.errors[0].field == 4
    assert patients(intake) == []


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"garbage\r", "100"),
        (b"", "100"),
        (adt_message("A01", message_type="ORU", sending_facility="GP12LAB"), "200"),
        (adt_message("A99", sending_facility="GP12LAB"), "201"),
    ],
)
def test_malformed_or_unsupported_messages_are_rejected(
    intake: AdtIntake, raw: bytes, code: str
) -> None:
    res = intake.ingest(raw)
    assert res.ack_code == "AR" and res.errors[0].code == code
    assert patients(intake) == []


def test_application_errors_are_ae_and_write_nothing(intake: AdtIntake) -> None:
    bad = default_pid(
        pid_3=[
            (bad_snils("112233445"), "", "", ("", SNILS_OID, "ISO"), "SNILS"),
            (MRN_1, "", "", ("", "", ""), "MR"),
        ]
    )
    res = intake.ingest(msg(pid=bad))
    assert res.ack_code == "AE" and res.errors[0].code == "102"
    # an identifier whose system no MO registered (a namespace the registry does not know)
    foreign = default_pid(pid_3=[("555", "", "", ("UNKNOWNMO", "", ""), "XX")])
    res = intake.ingest(msg(pid=foreign))
    assert res.ack_code == "AE" and res.errors[0].code == "103"
    # only a national identifier: no MO number to key the MO's record
    national = default_pid(pid_3=[(SNILS_1, "", "", ("", SNILS_OID, "ISO"), "SNILS")])
    res = intake.ingest(msg(pid=national))
    assert res.ack_code == "AE" and res.errors[0].code == "101" and res.errors[0].field == 3
    assert patients(intake) == []


def _old_chart(intake: AdtIntake) -> str:
    old = default_pid(
        pid_3=[(MRN_OLD, "", "", ("", "", ""), "MR")],
        pid_5=("Иванова", "Анна", "", "", "", "", "L"),
        pid_7="19850703",
    )
    res = intake.ingest(msg("A04", pid=old, control_id="OLD"))
    assert res.ack_code == "AA", res.errors
    return res.patients[0]


def test_a40_merges_the_prior_chart_into_the_surviving_one(intake: AdtIntake) -> None:
    old = _old_chart(intake)
    assert intake.ingest(msg("A04", control_id="NEW")).ack_code == "AA"
    res = intake.ingest(msg("A40", mrg=default_mrg(), control_id="M1"))
    assert res.ack_code == "AA", res.errors
    target = res.patients[0]
    assert [m.kind for m in res.merges] == ["record"]
    retired = content_json(intake.svc.read("Patient", old))
    assert retired["active"] is False
    assert retired["link"] == [{"other": {"reference": f"Patient/{target}"}, "type": "replaced-by"}]
    assert intake.mpi.golden_of(old) == intake.mpi.golden_of(target)
    # the same A40 again: acknowledged, nothing changes
    version = intake.svc.read("Patient", old).version
    res = intake.ingest(msg("A40", mrg=default_mrg(), control_id="M1"))
    assert res.ack_code == "AA" and res.merges[0].already
    assert intake.svc.read("Patient", old).version == version


def test_a40_before_the_patient_it_names_is_ae_and_writes_nothing(intake: AdtIntake) -> None:
    res = intake.ingest(msg("A40", mrg=default_mrg()))
    assert res.ack_code == "AE" and res.errors[0].code == "204"
    assert res.errors[0].segment == "MRG" and res.errors[0].field == 1
    assert patients(intake) == []  # the surviving patient was not created either


def test_a40_into_itself_is_refused(intake: AdtIntake) -> None:
    assert intake.ingest(msg("A04")).ack_code == "AA"
    same = default_mrg((MRN_1, "", "", ("", "", ""), "MR"))
    res = intake.ingest(msg("A40", mrg=same))
    assert res.ack_code == "AE" and "merge-into-self" in res.errors[0].message


def test_a40_circular_merge_is_refused(intake: AdtIntake) -> None:
    old = _old_chart(intake)
    assert intake.ingest(msg("A04", control_id="NEW")).ack_code == "AA"
    assert intake.ingest(msg("A40", mrg=default_mrg(), control_id="M1")).ack_code == "AA"
    version = intake.svc.read("Patient", old).version
    # now the other way round: the surviving chart into the retired one
    back_pid = default_pid(pid_3=[(MRN_OLD, "", "", ("", "", ""), "MR")], pid_7="19850703")
    back = intake.ingest(
        msg(
            "A40",
            pid=back_pid,
            mrg=default_mrg((MRN_1, "", "", ("", "", ""), "MR")),
            control_id="M2",
        )
    )
    assert back.ack_code == "AE" and "merge-target-retired" in back.errors[0].message
    assert intake.svc.read("Patient", old).version == version  # still retired, untouched
