"""Lab results over HL7 v2 into the integrated record (hie.adapters.hl7_listener +
hie.lab_exchange.service), on every backend: ACK after commit, stored once, corrections as new
versions, every refusal kept for replay."""

from __future__ import annotations

from typing import Any

import pytest

from hie.adapters.hl7_listener import Hl7Listener
from hie.adapters.hl7v2 import parse
from hie.fhir import model
from hie.fhir.service import FhirService, content_json
from hie.hub.auth import acting_as
from hie.hub.rejected import open_rejected_store
from hie.hub.store.port import Query, ReferenceCond
from hie.lab_exchange.service import message_id
from hie.registries.patient_index import attach_mpi
from tests.fixtures.hl7v2 import oru_message
from tests.fixtures.labs import GP, GP_PATIENTS, LAB, as_transaction, lab_registry


@pytest.fixture
def listener(store: Any, store_url: str, settings_for: Any) -> Any:
    settings = settings_for(store_url)
    svc = FhirService(store, settings)
    mpi = attach_mpi(svc)
    assert mpi is not None
    svc.transaction(as_transaction(lab_registry()), "")
    rejected = open_rejected_store(settings.database_url)
    rejected.migrate()
    out = Hl7Listener(svc, mpi, rejected, workers=1)
    out.senders.resolve_hosts = False
    yield out
    out.close()
    rejected.close()


def msa(ack: bytes) -> list[str]:
    """MSA-1 of an ACK, and its ERR segments' codes."""
    segs = ack.decode("utf-8", "replace").split("\r")
    code = next(s.split("|")[1] for s in segs if s.startswith("MSA|"))
    errs = [s.split("|")[3].split("^")[0] for s in segs if s.startswith("ERR|")]
    return [code, *errs]


def rows(listener: Hl7Listener, rtype: str) -> list[dict[str, Any]]:
    found = listener.svc.store.search(Query(rtype, count=500)).items
    return [content_json(r) for r in found]


def test_a_result_is_stored_once_and_acknowledged_after_commit(listener: Hl7Listener) -> None:
    raw = oru_message("cbc", control_id="R-1")
    (ack,) = listener.process(raw)
    assert msa(ack)[0] == "AA", ack
    reports = rows(listener, "DiagnosticReport")
    assert len(reports) == 1 and len(rows(listener, "Observation")) == 10
    rep = reports[0]
    assert rep["status"] == "final" and rep["performer"][0]["reference"] == f"Organization/{LAB}"
    # the order was made from the OBR, with the ordering doctor's role at the clinic
    (order,) = rows(listener, "ServiceRequest")
    assert rep["basedOn"][0]["reference"] == f"ServiceRequest/{order['id']}"
    assert order["requester"]["reference"] == "PractitionerRole/pr-smirnov-gp"
    # the patient is the clinic's record of her, matched into the index
    (patient,) = [p for p in rows(listener, "Patient") if not p.get("meta", {}).get("tag")]
    assert {i["system"] for i in patient["identifier"]} >= {GP_PATIENTS}
    assert rep["subject"]["reference"] == f"Patient/{patient['id']}"
    golden = listener.adt.mpi.golden_of(patient["id"])
    by_golden = Query(
        "DiagnosticReport", [ReferenceCond("subject", "Patient", str(golden), expand=True)]
    )
    assert [r.id for r in listener.svc.store.search(by_golden).items] == [rep["id"]]
    # every stored resource is valid FHIR R4 (the mapping is trusted on the hot path)
    for rtype in ("DiagnosticReport", "Observation", "Specimen", "ServiceRequest"):
        for res in rows(listener, rtype):
            model.validate(res)
    # the same message again: AA, nothing new
    (again,) = listener.process(raw)
    assert msa(again)[0] == "AA"
    assert len(rows(listener, "Observation")) == 10 and len(rows(listener, "DiagnosticReport")) == 1
    assert listener.rejected.count() == 0


def test_a_correction_is_a_new_version_not_a_duplicate(listener: Hl7Listener) -> None:
    listener.process(oru_message("cbc", control_id="R-1"))
    fixed = oru_message("cbc", control_id="R-2", result_status="C", obx={1: {5: "151", 11: "C"}})
    (ack,) = listener.process(fixed)
    assert msa(ack)[0] == "AA"
    (rep,) = rows(listener, "DiagnosticReport")
    assert rep["status"] == "corrected" and rep["meta"]["versionId"] == "2"
    assert len(rows(listener, "Observation")) == 10
    corrected = [o for o in rows(listener, "Observation") if o["status"] == "corrected"]
    assert len(corrected) == 1 and corrected[0]["valueQuantity"]["value"] == 151


def test_a_control_id_reused_for_other_content_is_refused_and_kept(listener: Hl7Listener) -> None:
    listener.process(oru_message("cbc", control_id="R-1"))
    other = oru_message("biochem", control_id="R-1")
    (ack,) = listener.process(other)
    assert msa(ack) == ["AR", "205"]
    assert len(rows(listener, "DiagnosticReport")) == 1
    (kept,) = listener.rejected.list()
    assert kept.code == "205" and kept.control_id == "R-1"
    assert listener.rejected.get(kept.id).raw == other  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("raw", "expected", "stored"),
    [
        (oru_message("cbc", sending_facility="NOBODY"), ["AR", "103"], False),  # unknown sender
        (oru_message("cbc", obx={2: {5: "много"}}), ["AE", "102"], False),  # NM not a number
        (oru_message("cbc", pid=None), ["AE", "100"], False),  # no PID
        (b"MSH|^~\\&|LIS|LAB7001|HIE|SPB|20250301||ZZZ^Z01|Z1|P|2.5.1\r", ["AR", "200"], False),
        (b"\x00\x01binary garbage\xff", ["AR", "100"], False),
    ],
    ids=["unknown-sender", "nm-not-a-number", "no-pid", "unknown-type", "garbage"],
)
def test_bad_messages_get_their_ack_and_are_kept(
    listener: Hl7Listener, raw: bytes, expected: list[str], stored: bool
) -> None:
    (ack,) = listener.process(raw)
    got = msa(ack)
    assert got[0] == expected[0] and expected[1] in got[1:], ack
    assert bool(rows(listener, "DiagnosticReport")) is stored
    (kept,) = listener.rejected.list()
    assert kept.code == expected[1]
    assert listener.rejected.get(kept.id).raw == raw  # type: ignore[union-attr]


def test_an_unknown_code_is_stored_and_warned_about(listener: Hl7Listener) -> None:
    raw = oru_message("cbc", control_id="R-9", obx={3: {3: ("ZZ-1", "Новый тест", "L")}})
    (ack,) = listener.process(raw)
    codes = msa(ack)
    assert codes[0] == "AA" and "103" in codes[1:]
    assert len(rows(listener, "Observation")) == 10


def test_enhanced_mode_commit_then_application_ack(listener: Hl7Listener) -> None:
    raw = oru_message("cbc", control_id="E-1", accept_ack="AL", application_ack="AL")
    commit, app = listener.process(raw)
    assert msa(commit)[0] == "CA" and msa(app)[0] == "AA"
    only_errors = oru_message("cbc", control_id="E-2", accept_ack="NE", application_ack="ER")
    assert listener.process(only_errors) == []  # nothing asked for on success


def test_the_stored_message_header_names_the_message(listener: Hl7Listener) -> None:
    raw = oru_message("cbc", control_id="R-7")
    listener.process(raw)
    header = parse(raw).header
    stored = listener.svc.store.read("MessageHeader", message_id(header.sending_facility, "R-7"))
    assert stored is not None
    res = content_json(stored)
    assert res["sender"]["reference"] == f"Organization/{LAB}"
    assert res["focus"][0]["reference"].startswith("DiagnosticReport/")


def test_results_are_the_labs_records(listener: Hl7Listener, store: Any) -> None:
    """Written as the sending MO: the lab reads them without a care relationship, the clinic
    only once it treats the patient."""
    listener.process(oru_message("cbc", control_id="R-1"))
    from hie.hub.auth import Principal, parse_scopes

    def seen(org: str) -> int:
        p = Principal("t", frozenset({"clinician"}), org=org, scopes=parse_scopes("user/*.rs"))
        with acting_as(p):
            grant = listener.svc.grant("Observation", "s")
        return len(store.search(Query("Observation", list(grant.conds), count=100)).items)

    assert seen(LAB) == 10
    assert seen(GP) == 0
