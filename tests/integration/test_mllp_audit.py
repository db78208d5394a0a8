"""Every HL7 v2 message leaves an audit record: who sent it, which patients and resources it
wrote, the outcome — unknown senders and unreadable frames as failed attempts (issue #5)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from hie.adapters.hl7_listener import Hl7Listener
from hie.adapters.mllp import Peer
from hie.hub.audit import AuditRecord, open_audit_log
from tests.fixtures.audit import durability_of
from tests.fixtures.hl7v2 import oru_message
from tests.fixtures.labs import LAB, lab_listener


@pytest.fixture
def listener(store: Any, store_url: str, settings_for: Any) -> Iterator[Hl7Listener]:
    settings = settings_for(store_url)
    trail = open_audit_log(settings.database_url)
    trail.migrate()
    with lab_listener(store, settings, trail) as out:
        yield out
    trail.close()


def newest(listener: Hl7Listener) -> AuditRecord:
    assert listener.svc.trail is not None
    records, _ = listener.svc.trail.records(count=1)
    return records[0]


PEER = Peer("10.1.2.3", 40000)


def test_a_stored_result_is_audited_with_its_patient_and_resources(
    listener: Hl7Listener,
) -> None:
    (ack,) = listener.process(oru_message("cbc", control_id="AUD-1"), PEER)
    assert b"MSA|AA" in ack
    rec = newest(listener)
    assert (rec.agent, rec.roles, rec.org) == (f"mllp:{LAB}", ["mis"], LAB)
    assert (rec.action, rec.outcome, rec.method, rec.source) == ("C", 0, "MLLP", "10.1.2.3")
    assert rec.path == "mllp:ORU^R01 AUD-1"
    assert any(e.startswith("DiagnosticReport/") for e in rec.entities)
    assert sum(e.startswith("Observation/") for e in rec.entities) == 10
    assert len(rec.patients) == 1
    # the patient finds the message in their own access log
    assert listener.svc.trail is not None
    mine, _ = listener.svc.trail.records(refs=[f"Patient/{rec.patients[0]}"])
    assert [r.seq for r in mine] == [rec.seq]


def _from_a_stranger(control_id: str) -> bytes:
    """An ORU^R01 from a sender the registry does not know."""
    return oru_message(
        "cbc",
        control_id=control_id,
        sending_application="NOBODY",
        sending_facility=("NOWHERE", "1.2.643.5.1.13.99999", "ISO"),
    )


def test_an_unknown_sender_is_audited_as_a_failed_attempt(listener: Hl7Listener) -> None:
    (ack,) = listener.process(_from_a_stranger("AUD-2"), PEER)
    assert b"MSA|AR" in ack
    rec = newest(listener)
    assert rec.agent is None and rec.outcome == 4 and rec.status == 400
    assert rec.entities == [] and rec.patients == []
    assert rec.reason and "MSH-3" in rec.reason


def test_an_unreadable_frame_is_audited(listener: Hl7Listener) -> None:
    listener._reject("garbage", b"\x00\x01binary", PEER, 8)
    rec = newest(listener)
    assert (rec.agent, rec.outcome, rec.path, rec.source) == (
        None,
        4,
        "mllp:unreadable",
        "10.1.2.3",
    )


def test_no_acknowledgement_when_the_trail_cannot_take_the_record(
    listener: Hl7Listener,
) -> None:
    assert listener.svc.trail is not None
    listener.svc.trail.close()  # the trail's database goes away
    (ack,) = listener.process(oru_message("cbc", control_id="AUD-3"), PEER)
    assert b"MSA|AE" in ack and b"audit trail" in ack
    # kept for replay
    kept = listener.rejected.list(limit=5)
    assert any(k.control_id == "AUD-3" for k in kept)


def test_the_record_of_applied_results_is_as_durable_as_the_results(
    listener: Hl7Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert listener.svc.trail is not None
    asked = durability_of(monkeypatch, listener.svc.trail, lambda r: r.path)
    (ack,) = listener.process(oru_message("cbc", control_id="AUD-4"), PEER)
    assert b"MSA|AA" in ack
    (ack,) = listener.process(_from_a_stranger("AUD-5"), PEER)
    assert b"MSA|AR" in ack
    assert asked == [("mllp:ORU^R01 AUD-4", True), ("mllp:ORU^R01 AUD-5", False)]
