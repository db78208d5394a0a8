"""The ATNA export's pure parts: a trail record as a DICOM audit message (PS3.15 A.5) and the
RFC 5424 / RFC 5425 framing around it."""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from hie.hub.audit import AuditRecord
from hie.hub.audit_export import (
    BOM,
    AuditSource,
    audit_message_xml,
    audit_messages,
    exporter_from_settings,
    octet_counted,
    parse_target,
    sequence_sd,
    severity_for,
    syslog_frame,
)

WHEN = 1_700_000_000_123_456  # 2023-11-14T22:13:20.123456Z
SOURCE = AuditSource(source_id="hie-hub", host="hub.example", base_url="https://hie.example")


def rec(**kw: Any) -> AuditRecord:
    """A successful clinician read unless told otherwise."""
    base: dict[str, Any] = {
        "action": "R",
        "subtype": "read",
        "outcome": 0,
        "status": 200,
        "method": "GET",
        "path": "/fhir/Observation/obs-1",
        "agent": "user-7",
        "roles": ["clinician"],
        "org": "mo-12",
        "practitioner": "pr-5",
        "client_id": "emr-client",
        "source": "10.1.2.3",
        "patients": ["pat-1"],
        "entities": ["Observation/obs-1"],
        "request_id": "req-1",
        "recorded": WHEN,
        "seq": 17,
    }
    return AuditRecord(**(base | kw))


def parse(xml: bytes) -> ET.Element:
    assert xml.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    return ET.fromstring(xml)


def event_id(root: ET.Element) -> tuple[str, str]:
    ev = root.find("EventIdentification/EventID")
    assert ev is not None
    return ev.get("csd-code", ""), ev.get("codeSystemName", "")


def objects(root: ET.Element, role: str | None = None) -> list[ET.Element]:
    found = root.findall("ParticipantObjectIdentification")
    return [o for o in found if role is None or o.get("ParticipantObjectTypeCodeRole") == role]


def check_schema_shape(root: ET.Element) -> None:
    """What the A.5.1 schema requires of every message, checked by hand (no validator)."""
    assert root.tag == "AuditMessage"
    tags = [c.tag for c in root]
    # EventIdentification, ActiveParticipant+, AuditSourceIdentification,
    # ParticipantObjectIdentification*, in this order
    assert tags[0] == "EventIdentification"
    n_ap = 1
    while tags[n_ap] == "ActiveParticipant":
        n_ap += 1
    assert n_ap >= 2
    assert tags[n_ap] == "AuditSourceIdentification"
    assert set(tags[n_ap + 1 :]) <= {"ParticipantObjectIdentification"}

    ev = root[0]
    assert set(ev.attrib) >= {"EventDateTime", "EventOutcomeIndicator"}
    assert ev.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    assert ev.get("EventActionCode") in {"C", "R", "U", "D", "E"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", ev.get("EventDateTime", ""))
    order = {"EventID": 0, "EventTypeCode": 1, "EventOutcomeDescription": 2, "PurposeOfUse": 3}
    ranks = [order[c.tag] for c in ev]
    assert ranks == sorted(ranks) and ranks[0] == 0 and ranks.count(0) == 1

    for ap in root.findall("ActiveParticipant"):
        assert ap.get("UserID")
        assert ap.get("UserIsRequestor") in {"true", "false"}
        assert {c.tag for c in ap} <= {"RoleIDCode"}
        if ap.get("NetworkAccessPointID"):
            assert ap.get("NetworkAccessPointTypeCode") in {"1", "2"}
    assert [ap.get("UserIsRequestor") for ap in root.findall("ActiveParticipant")].count(
        "true"
    ) == 1
    src = root.find("AuditSourceIdentification")
    assert src is not None and src.get("AuditSourceID")

    for obj in objects(root):
        assert obj.get("ParticipantObjectID")
        assert obj[0].tag == "ParticipantObjectIDTypeCode"
        names = [c.tag for c in obj if c.tag in ("ParticipantObjectName", "ParticipantObjectQuery")]
        assert len(names) <= 1

    for el in root.iter():
        if el.tag in {
            "EventID",
            "EventTypeCode",
            "PurposeOfUse",
            "RoleIDCode",
            "AuditSourceTypeCode",
            "ParticipantObjectIDTypeCode",
        }:  # CodedValueType: all three required
            assert el.get("csd-code") and el.get("codeSystemName") and el.get("originalText")
        for value in el.attrib.values():
            assert value and value != "None"


# --- one message per kind of record -------------------------------------------------------------


def test_a_read_of_a_patients_record_is_a_patient_record_event() -> None:
    root = parse(audit_message_xml(rec(), SOURCE))
    check_schema_shape(root)
    assert event_id(root) == ("110110", "DCM")
    ev = root[0]
    assert ev.get("EventActionCode") == "R" and ev.get("EventOutcomeIndicator") == "0"
    assert ev.get("EventDateTime") == "2023-11-14T22:13:20.123456Z"
    assert ev.find("EventOutcomeDescription") is None
    types = [(t.get("csd-code"), t.get("codeSystemName")) for t in ev.findall("EventTypeCode")]
    assert types == [("read", "http://hl7.org/fhir/restful-interaction")]

    requestor, hub, org = root.findall("ActiveParticipant")
    assert requestor.attrib == {
        "UserID": "user-7",
        "AlternativeUserID": "emr-client",
        "UserName": "Practitioner/pr-5",
        "UserIsRequestor": "true",
        "NetworkAccessPointID": "10.1.2.3",
        "NetworkAccessPointTypeCode": "2",
    }
    roles = [r.get("csd-code") for r in requestor.findall("RoleIDCode")]
    assert roles == ["110153", "clinician"]
    assert hub.get("UserID") == "https://hie.example" and hub.get("UserIsRequestor") == "false"
    assert hub.get("NetworkAccessPointID") == "hub.example"
    assert hub.get("NetworkAccessPointTypeCode") == "1"
    assert [r.get("csd-code") for r in hub.findall("RoleIDCode")] == ["110152"]
    assert org.get("UserID") == "Organization/mo-12" and org.get("UserIsRequestor") == "false"

    src = root.find("AuditSourceIdentification")
    assert src is not None and src.get("AuditSourceID") == "hie-hub"

    (patient,) = objects(root, role="1")
    assert patient.get("ParticipantObjectID") == "pat-1"
    assert patient.get("ParticipantObjectTypeCode") == "1"
    assert patient.get("ParticipantObjectDataLifeCycle") == "6"  # access/use
    id_type = patient.find("ParticipantObjectIDTypeCode")
    assert id_type is not None
    assert (id_type.get("csd-code"), id_type.get("codeSystemName")) == ("2", "RFC-3881")
    (resource,) = [o for o in objects(root) if o.get("ParticipantObjectTypeCode") == "2"]
    assert resource.get("ParticipantObjectID") == "https://hie.example/fhir/Observation/obs-1"
    uri = resource.find("ParticipantObjectIDTypeCode")
    assert uri is not None and uri.get("csd-code") == "12"


def test_a_search_is_a_query_with_the_query_string_and_every_patient() -> None:
    path = "/fhir/Observation?code=http://loinc.org|718-7&_count=2"
    r = rec(
        action="E",
        subtype="search",
        path=path,
        patients=["pat-1", "pat-2"],
        entities=["Observation/a", "Observation/b"],
        entities_more=5,
    )
    root = parse(audit_message_xml(r, SOURCE))
    check_schema_shape(root)
    assert event_id(root) == ("110112", "DCM")
    assert root[0].get("EventActionCode") == "E"
    assert [p.get("ParticipantObjectID") for p in objects(root, role="1")] == ["pat-1", "pat-2"]
    (query,) = objects(root, role="24")
    assert query.get("ParticipantObjectTypeCode") == "2"
    assert query.get("ParticipantObjectID") == "/fhir/Observation"
    q = query.find("ParticipantObjectQuery")
    assert q is not None and base64.b64decode(q.text or "").decode() == path
    detail = query.find("ParticipantObjectDetail")
    assert detail is not None and detail.get("type") == "entities-more"
    assert base64.b64decode(detail.get("value", "")) == b"5"


@pytest.mark.parametrize("subtype", ["history", "everything"])
def test_history_and_everything_are_queries_too(subtype: str) -> None:
    root = parse(audit_message_xml(rec(subtype=subtype, path=f"/fhir/Patient/p/{subtype}")))
    check_schema_shape(root)
    assert event_id(root) == ("110112", "DCM")
    (query,) = objects(root, role="24")
    id_type = query.find("ParticipantObjectIDTypeCode")
    assert id_type is not None and id_type.get("csd-code") == subtype


@pytest.mark.parametrize(
    ("action", "subtype", "life_cycle"),
    [("C", "create", "1"), ("U", "update", "3"), ("U", "patch", "3"), ("D", "delete", "14")],
)
def test_writes_keep_their_action_and_life_cycle(
    action: str, subtype: str, life_cycle: str
) -> None:
    root = parse(audit_message_xml(rec(action=action, subtype=subtype, method="POST")))
    check_schema_shape(root)
    assert event_id(root) == ("110110", "DCM")
    assert root[0].get("EventActionCode") == action
    (patient,) = objects(root, role="1")
    assert patient.get("ParticipantObjectDataLifeCycle") == life_cycle


def test_a_merge_names_both_patients() -> None:
    r = rec(
        action="U",
        subtype="merge",
        method="",
        path="mpi:merge",
        source=None,
        reason="admin: same person",
        patients=["src", "dst"],
        entities=["Patient/src", "Patient/dst"],
    )
    root = parse(audit_message_xml(r))
    check_schema_shape(root)
    assert event_id(root) == ("110110", "DCM")
    assert [p.get("ParticipantObjectID") for p in objects(root, role="1")] == ["src", "dst"]
    assert len(objects(root)) == 2  # the Patient entities are the patients, not extra objects
    types = root[0].findall("EventTypeCode")
    assert [(t.get("csd-code"), t.get("codeSystemName")) for t in types] == [
        ("merge", "https://hie.spb.ru/fhir/CodeSystem/operation")
    ]
    desc = root[0].find("EventOutcomeDescription")
    assert desc is not None and desc.text == "admin: same person"


def test_an_unauthenticated_call_is_a_failed_login() -> None:
    r = rec(
        outcome=4,
        status=401,
        agent=None,
        roles=[],
        org=None,
        practitioner=None,
        client_id=None,
        reason="token expired",
        patients=[],
        entities=[],
    )
    root = parse(audit_message_xml(r))
    check_schema_shape(root)
    assert event_id(root) == ("110114", "DCM")
    ev = root[0]
    assert ev.get("EventOutcomeIndicator") == "4" and ev.get("EventActionCode") == "E"
    assert [t.get("csd-code") for t in ev.findall("EventTypeCode")] == ["110122", "read"]
    desc = ev.find("EventOutcomeDescription")
    assert desc is not None and desc.text == "HTTP 401; token expired"
    requestor = root.findall("ActiveParticipant")[0]
    assert requestor.get("UserID") == "(unauthenticated)"
    assert "AlternativeUserID" not in requestor.attrib and "UserName" not in requestor.attrib
    assert len(root.findall("ActiveParticipant")) == 2  # no MO
    assert objects(root) == []
    assert severity_for(r) == 4


def test_a_refusal_is_a_security_alert_naming_the_patient() -> None:
    r = rec(outcome=4, status=403, reason="the patient closed the record to mo-12")
    root = parse(audit_message_xml(r))
    check_schema_shape(root)
    assert event_id(root) == ("110113", "DCM")
    ev = root[0]
    assert ev.get("EventOutcomeIndicator") == "4"
    assert [t.get("csd-code") for t in ev.findall("EventTypeCode")] == ["110132", "read"]
    (patient,) = objects(root, role="1")
    # nothing was accessed: no life cycle stage
    assert "ParticipantObjectDataLifeCycle" not in patient.attrib
    assert severity_for(r) == 4


def test_a_server_failure_is_a_serious_failure() -> None:
    root = parse(audit_message_xml(rec(outcome=8, status=503)))
    check_schema_shape(root)
    assert event_id(root) == ("110110", "DCM")
    assert root[0].get("EventOutcomeIndicator") == "8"
    desc = root[0].find("EventOutcomeDescription")
    assert desc is not None and desc.text == "HTTP 503"


def test_break_the_glass_carries_the_purpose_of_use_and_the_reason() -> None:
    r = rec(purpose="ETREAT", reason="пациент без сознания")
    root = parse(audit_message_xml(r))
    check_schema_shape(root)
    pou = root[0].find("PurposeOfUse")
    assert pou is not None
    assert pou.attrib == {
        "csd-code": "ETREAT",
        "codeSystemName": "2.16.840.1.113883.5.8",
        "originalText": "Emergency Treatment",
    }
    desc = root[0].find("EventOutcomeDescription")
    assert desc is not None and desc.text == "пациент без сознания"
    assert root[0].get("EventOutcomeIndicator") == "0"


def test_reading_the_audit_trail_is_audit_log_used() -> None:
    r = rec(
        action="E",
        subtype="search",
        path="/fhir/AuditEvent?patient=pat-1",
        roles=["patient"],
        org=None,
        practitioner=None,
        entities=[],
    )
    root = parse(audit_message_xml(r, SOURCE))
    check_schema_shape(root)
    assert event_id(root) == ("110101", "DCM")
    assert root[0].get("EventActionCode") == "R"
    (log_obj,) = objects(root, role="13")
    assert log_obj.get("ParticipantObjectID") == "https://hie.example/fhir/AuditEvent"
    name = log_obj.find("ParticipantObjectName")
    assert name is not None and name.text == "Security Audit Log"
    assert [p.get("ParticipantObjectID") for p in objects(root, role="1")] == ["pat-1"]


def test_a_directory_read_is_a_rest_operation() -> None:
    r = rec(path="/fhir/Organization/mo-1", patients=[], entities=["Organization/mo-1"])
    root = parse(audit_message_xml(r))
    check_schema_shape(root)
    assert event_id(root) == ("rest", "http://terminology.hl7.org/CodeSystem/audit-event-type")
    assert root[0].get("EventActionCode") == "R"
    (obj,) = objects(root)
    assert obj.get("ParticipantObjectID") == "Organization/mo-1"  # no base URL configured


def test_a_record_without_any_optional_part_is_still_complete() -> None:
    bare = AuditRecord(
        action="?", subtype="", outcome=0, status=200, method="", path="", agent=None
    )
    root = parse(audit_message_xml(bare))
    check_schema_shape(root)
    assert event_id(root)[0] == "rest"
    assert root[0].get("EventActionCode") == "E"  # unknown action → execute
    assert root[0].findall("EventTypeCode") == []
    assert objects(root) == []
    assert b"None" not in audit_message_xml(bare)


def test_characters_xml_cannot_carry_are_replaced_not_fatal() -> None:
    r = rec(reason='bad\x00byte\x1b and <tag> & "quotes"', agent="user\x07")
    root = parse(audit_message_xml(r))  # well-formed
    desc = root[0].find("EventOutcomeDescription")
    assert desc is not None and desc.text == 'bad\ufffdbyte\ufffd and <tag> & "quotes"'
    assert root.findall("ActiveParticipant")[0].get("UserID") == "user\ufffd"


def test_a_patient_authority_makes_cx_ids() -> None:
    source = AuditSource(patient_authority="1.2.643.5.1.13")
    root = parse(audit_message_xml(rec(), source))
    (patient,) = objects(root, role="1")
    assert patient.get("ParticipantObjectID") == "pat-1^^^&1.2.643.5.1.13&ISO"


def test_a_large_record_is_split_into_messages_that_each_fit() -> None:
    patients = [f"patient-{i:04d}" for i in range(300)]
    entities = [f"Observation/obs-{i:04d}" for i in range(300)]
    r = rec(
        action="E",
        subtype="search",
        path="/fhir/Observation?x=1",
        patients=patients,
        entities=entities,
    )
    whole = audit_message_xml(r)
    assert len(whole) > 32000
    parts = audit_messages(r, max_bytes=16000)
    assert len(parts) > 2
    seen_patients: list[str] = []
    seen_resources: list[str] = []
    for part in parts:
        assert len(part) <= 16000
        root = parse(part)
        check_schema_shape(root)
        assert event_id(root) == ("110112", "DCM")
        assert len(objects(root, role="24")) == 1  # the query goes with every part
        seen_patients += [p.get("ParticipantObjectID", "") for p in objects(root, role="1")]
        seen_resources += [
            o.get("ParticipantObjectID", "")
            for o in objects(root)
            if o.get("ParticipantObjectTypeCode") == "2"
            and o.get("ParticipantObjectTypeCodeRole") is None
        ]
    assert seen_patients == patients
    assert seen_resources == entities
    assert audit_messages(rec()) == [audit_message_xml(rec())]


# --- RFC 5424 / 5425 ----------------------------------------------------------------------------

HEADER = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<proc>\S+) (?P<msgid>\S+) "
    rb"(?P<sd>-|\[[^\]]*\]) (?P<msg>.*)",
    re.S,
)


def test_a_syslog_frame_has_the_rfc5424_header_and_a_bom() -> None:
    xml = audit_message_xml(rec())
    frame = syslog_frame(
        xml,
        timestamp=WHEN,
        hostname="hub-1.example",
        procid="4242",
        structured_data=sequence_sd(17),
    )
    m = HEADER.fullmatch(frame)
    assert m is not None
    assert m["pri"] == b"85"  # facility 10 authpriv * 8 + severity 5 notice
    assert m["ts"] == b"2023-11-14T22:13:20.123456Z"
    assert m["host"] == b"hub-1.example"
    assert m["app"] == b"hie" and m["proc"] == b"4242"
    assert m["msgid"] == b"IHE+RFC-3881"
    assert m["sd"] == b'[meta sequenceId="17"]'
    assert m["msg"] == BOM + xml
    warning = syslog_frame(b"x", hostname="h", severity=severity_for(rec(outcome=4, status=403)))
    assert warning.startswith(b"<84>1 ")


def test_header_fields_are_printable_ascii_within_their_lengths() -> None:
    frame = syslog_frame(
        b"<x/>",
        hostname="хост с пробелами" + "h" * 300,
        app_name="a" * 60,
        procid="",
        msgid="m" * 40,
        bom=False,
    )
    m = HEADER.fullmatch(frame)
    assert m is not None
    assert m["host"] == b"h" * 255  # non-ASCII and spaces dropped, cut at 255
    assert m["app"] == b"a" * 48
    assert m["proc"] == b"-"  # empty → NILVALUE
    assert m["msgid"] == b"m" * 32
    assert m["sd"] == b"-"
    assert m["msg"] == b"<x/>"
    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", m["ts"])  # now


def test_sequence_ids_stay_in_the_range_rfc5424_allows() -> None:
    assert sequence_sd(1) == '[meta sequenceId="1"]'
    assert sequence_sd(2147483647) == '[meta sequenceId="2147483647"]'
    assert sequence_sd(2147483648) == '[meta sequenceId="1"]'


def test_octet_counting_frames_split_back_exactly() -> None:
    frames = [syslog_frame("сообщение {i}".encode() * i, hostname="h") for i in range(1, 6)]
    stream = b"".join(octet_counted(f) for f in frames)
    out, rest = [], stream
    while rest:
        length, _, rest = rest.partition(b" ")
        n = int(length)
        out.append(rest[:n])
        rest = rest[n:]
    assert out == frames
    assert octet_counted(b"abc") == b"3 abc"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("udp://collector", "udp://collector:514"),
        ("tcp://10.0.0.5:1514", "tcp://10.0.0.5:1514"),
        ("tls://arr.example", "tls://arr.example:6514"),
        ("TLS://[::1]:6514", "tls://[::1]:6514"),
    ],
)
def test_collector_urls(url: str, expected: str) -> None:
    assert str(parse_target(url)) == expected


@pytest.mark.parametrize("url", ["http://x:1", "tcp://", "collector:514", "udp://h:99999"])
def test_bad_collector_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="audit syslog URL"):
        parse_target(url)


def test_settings_turn_the_exporter_on(tmp_path: Path) -> None:
    from hie.hub.audit import open_audit_log
    from hie.hub.settings import load_settings

    trail = open_audit_log(f"sqlite:///{tmp_path / 'hie.db'}")
    try:
        off = load_settings(data_dir=tmp_path)
        assert exporter_from_settings(off, trail) is None
        on = load_settings(
            data_dir=tmp_path,
            audit_syslog_url="tls://arr.example:6514",
            base_url="https://hie.example/",
        )
        e = exporter_from_settings(on, trail)
        assert e is not None and e.key == "tls://arr.example:6514"
        assert e.source.base_url == "https://hie.example"
        with pytest.raises(ValueError, match="audit syslog URL"):
            exporter_from_settings(load_settings(data_dir=tmp_path, audit_syslog_url="x"), trail)
    finally:
        trail.close()
