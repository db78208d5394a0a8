"""Lab results over HL7 v2 into the integrated record (hie.adapters.hl7_listener +
hie.lab_exchange.service), on every backend: ACK after commit, stored once, corrections as new
versions, every refusal kept for replay."""

from __future__ import annotations

from typing import Any

import pytest

from hie.adapters.hl7_listener import Hl7Listener
from hie.adapters.hl7v2 import parse
from hie.fhir import model
from hie.fhir.service import content_json
from hie.hub.auth import acting_as
from hie.hub.store.port import Query, ReferenceCond
from hie.lab_exchange.service import message_id
from tests.fixtures.hl7v2 import orm_message, oru_message
from tests.fixtures.labs import GP, GP_PATIENTS, LAB, lab_listener


@pytest.fixture
def listener(store: Any, store_url: str, settings_for: Any) -> Any:
    settings = settings_for(store_url)
    with lab_listener(store, settings) as out:
        yield out


def msa(ack: bytes) -> list[str]:
    """MSA-1 of an ACK, and its ERR segments' codes."""
    segs = ack.decode("utf-8", "replace").split("\r")
    code = next(s.split("|")[1] for s in segs if s.startswith("MSA|"))
    errs = []
    for seg in (s.split("|") for s in segs if s.startswith("ERR|")):
        if len(seg) > 3:  # v2.5+: ERR-3 code^text^HL70357
            errs.append(seg[3].split("^")[0])
        else:  # v2.3/2.4: ERR-1 seg^seq^field^code&text&HL70357, one repetition each
            errs += [rep.split("^")[3].split("&")[0] for rep in seg[1].split("~")]
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
        (oru_message("cbc").split(b"\r", 1)[1], ["AR", "100"], False),  # no MSH
        (oru_message("cbc").replace(b"MSH|", b"MSH*", 1), ["AR", "102"], False),  # field sep
        (oru_message("cbc", pid={1: "1", 5: ("Иванова", "Анна")}), ["AE", "101"], False),
    ],
    ids=[
        "unknown-sender",
        "nm-not-a-number",
        "no-pid",
        "unknown-type",
        "garbage",
        "missing-msh",
        "wrong-field-separator",
        "pid-without-identity",
    ],
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


def test_a_critical_result_alerts_the_ordering_doctor(listener: Hl7Listener) -> None:
    """The whole chain from the wire: an ORU with a critical potassium (OBX-8 HH) → the
    outbox consumer → a Task for the ordering doctor's role at the clinic, and a stat
    Communication to her and the clinic."""
    from datetime import datetime

    from hie.lab_exchange.alerts import CriticalResultAlerts

    (ack,) = listener.process(oru_message("biochem", control_id="K-1"))
    assert msa(ack)[0] == "AA"
    # the synthetic report was issued on 2025-03-01: the consumer runs "that day"
    then = datetime.fromisoformat("2025-03-01T12:30:00+03:00").timestamp()
    alerts = CriticalResultAlerts(
        listener.svc.store, listener.svc, listener.svc.settings, clock=lambda: then
    )
    alerts.handle(listener.svc.store.outbox_read(alerts.name, 1000))
    (task,) = rows(listener, "Task")
    assert task["owner"]["reference"] == "PractitionerRole/pr-smirnov-gp"
    assert task["status"] == "requested" and task["priority"] == "stat"
    (note,) = rows(listener, "Communication")
    recipients = {r["reference"] for r in note["recipient"]}
    assert {"PractitionerRole/pr-smirnov-gp", f"Organization/{GP}"} <= recipients
    assert "Калий" in note["payload"][0]["contentString"]


def test_an_order_then_its_result_are_linked(listener: Hl7Listener) -> None:
    (ack,) = listener.process(orm_message("cbc", control_id="O-1"))
    assert msa(ack)[0] == "AA", ack
    (order,) = rows(listener, "ServiceRequest")
    assert order["status"] == "active" and not order.get("meta", {}).get("tag")
    assert order["requester"]["reference"] == "PractitionerRole/pr-smirnov-gp"
    assert len(rows(listener, "Task")) == 1  # the lab's work item
    listener.process(oru_message("cbc", control_id="R-1"))
    (rep,) = rows(listener, "DiagnosticReport")
    assert rep["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]
    assert len(rows(listener, "ServiceRequest")) == 1  # no second order made up


def test_a_result_before_its_order_is_linked_when_the_order_comes(listener: Hl7Listener) -> None:
    listener.process(oru_message("cbc", control_id="R-1"))
    (made,) = rows(listener, "ServiceRequest")
    assert made["meta"]["tag"][0]["code"] == "from-result"
    listener.process(orm_message("cbc", control_id="O-1"))
    sent = [o for o in rows(listener, "ServiceRequest") if not o.get("meta", {}).get("tag")]
    assert len(sent) == 1
    (rep,) = rows(listener, "DiagnosticReport")
    assert {"reference": f"ServiceRequest/{sent[0]['id']}"} in rep["basedOn"]


def test_a_cancel_changes_the_order_and_an_unknown_one_is_refused(listener: Hl7Listener) -> None:
    listener.process(orm_message("cbc", control_id="O-1"))
    (ack,) = listener.process(orm_message("cbc", control_id="O-2", control="CA"))
    assert msa(ack)[0] == "AA", ack
    (order,) = rows(listener, "ServiceRequest")
    assert order["status"] == "revoked" and order["meta"]["versionId"] == "2"
    (ack,) = listener.process(
        orm_message("cbc", control_id="O-3", control="CA", placer="GP-NO-SUCH")
    )
    assert msa(ack)[:2] == ["AE", "204"]
    (kept,) = listener.rejected.list()
    assert kept.code == "204"
