"""Export of the audit trail to a syslog collector / IHE ATNA Audit Record Repository.

Each record of the trail (:mod:`hie.hub.audit`) becomes one IHE ATNA *Record Audit Event*
[ITI-20] (IHE ITI TF-2 §3.20): an RFC 5424 syslog message whose MSG is a DICOM audit message
(DICOM PS3.15 Annex A.5, XML). It goes out over UDP (RFC 5426, one datagram per message),
plain TCP or TLS (RFC 5425); both stream transports frame each message with octet counting,
``MSG-LEN SP SYSLOG-MSG`` (RFC 5425 §4.3, RFC 6587 §3.4.1). ``HIE_AUDIT_SYSLOG_URL`` turns it
on (``udp://``, ``tcp://`` or ``tls://host:port``); ``HIE_AUDIT_SYSLOG_CA`` names the CA
bundle a ``tls://`` collector's certificate must chain to (empty: the system's CAs).

**Delivery.** :class:`AuditExporter` keeps a cursor per collector in the trail's database
(``audit_export``): the last seq sent. It reads the records after it in order, sends a batch
and only then moves the cursor, so a collector outage delays records and never drops them,
and a restart resumes where the last successful send ended. It is *at least once*: a batch
whose sending failed half-way is sent again whole. Each message carries the record's seq in
the registered ``meta`` element (``[meta sequenceId="…"]``, RFC 5424 §7.3.1; the seq modulo
2^31−1, which is what the field allows) so a collector can drop repeats. A batch counts as
sent over TCP/TLS once the collector's TCP stack has acknowledged every byte (Linux
``SIOCOUTQ`` back at zero), not merely once it left this process; syslog itself has no
application-level acknowledgement, so a collector that crashes after its kernel took the
bytes but before it stored them loses them — use a collector with a disk queue. UDP gives
no such knowledge: a datagram is sent when the kernel accepted it (an unreachable collector
on the same network shows up as an error on the next send); use ``tls://`` where the trail
must arrive.

**Syslog header** (ITI TF-2 §3.20.4.1.2; DICOM PS3.15 A.6/A.7): facility 10
(security/authorization); severity 5 (notice) for a success and 4 (warning) for a failure,
refusal or security alert, so PRI is ``<85>`` or ``<84>``; VERSION 1; TIMESTAMP the record's
own time (UTC, microseconds), so a message delayed by an outage still says when the access
happened; HOSTNAME this host; APP-NAME ``hie``; PROCID the process id; MSGID
``IHE+RFC-3881``, which ITI-20 prescribes (DICOM's own ``DICOM+RFC3881`` is only a "may");
MSG starts with the UTF-8 BOM, as RFC 5424 §6.4 asks of a UTF-8 MSG (names and reasons may
be Cyrillic).

**Mapping of a record to the DICOM audit message** (PS3.15 A.5.1 schema, A.5.3 events):

- *EventIdentification*: ``EventDateTime`` = when recorded; ``EventOutcomeIndicator`` = the
  record's outcome (0 success, 4 refused or bad request, 8 server failure);
  ``EventOutcomeDescription`` = the HTTP status of a failure and the record's reason (why
  refused, a break-the-glass reason, a merge's reason); ``PurposeOfUse`` (the XUA++
  addition to the schema) = the declared purpose, HL7 v3 ActReason (``ETREAT`` for break the
  glass). ``EventID`` and ``EventActionCode``:

  ================================= ========================================== ==========
  record                            EventID                                    action
  ================================= ========================================== ==========
  401 (no or bad token)             (110114, DCM, "User Authentication") with  E
                                    EventTypeCode (110122, DCM, "Login")
  403 (refused by policy/consent)   (110113, DCM, "Security Alert") with       E
                                    (110132, DCM, "Use of Restricted
                                    Function")
  ``/fhir/AuditEvent…``             (110101, DCM, "Audit Log Used")            R
  search, history, $everything      (110112, DCM, "Query")                     E
  anything about a patient          (110110, DCM, "Patient Record")            C R U D E
                                                                               as recorded
  anything else (directory, …)      (rest, audit-event-type, "RESTful          as recorded
                                    Operation") — the code BALP uses
  ================================= ========================================== ==========

  A further ``EventTypeCode`` names the REST interaction (``read``, ``search``, ``create``…;
  http://hl7.org/fhir/restful-interaction) or the hub's operation (``merge``, ``unmerge``,
  ``audit-stats``…).
- *ActiveParticipant*: the requestor — ``UserID`` its token subject (``(unauthenticated)``
  if none), ``AlternativeUserID`` its OAuth client, ``UserName`` its Practitioner,
  ``UserIsRequestor`` true, ``NetworkAccessPointID`` its address (type 2 IP, or 1 a name),
  ``RoleIDCode`` (110153, DCM, "Source Role ID") and each of its hub roles; the hub —
  ``UserID`` its base URL (or source id), not the requestor, (110152, DCM, "Destination
  Role ID"), this host as access point; the requestor's MO, when it has one, as
  ``Organization/<id>`` (not the requestor).
- *AuditSourceIdentification*: ``AuditSourceID`` (default: the host name),
  ``AuditEnterpriseSiteID`` when configured, ``AuditSourceTypeCode`` 4 (application server).
- *ParticipantObjectIdentification*: each patient — type 1 (person), role 1 (patient),
  ID type (2, RFC-3881, "Patient Number"), ID the hub's Patient id (HL7 CX
  ``id^^^&OID&ISO`` when an assigning authority OID is configured), life cycle by action
  (1 origination, 3 amendment, 6 access/use, 14 logical deletion) when it succeeded; each
  other resource — type 2 (system object), ID type (12, RFC-3881, "URI"), ID its URL; a
  query — type 2, role 24 (query), ID type the REST interaction, ID the searched path,
  ``ParticipantObjectQuery`` the base64 of the path and query string, and a detail
  ``entities-more`` when the record named more resources than it lists; the audit log
  itself for *Audit Log Used* — type 2, role 13 (security resource), ID type URI, name
  "Security Audit Log" (A.5.3, Audit Log Used). Patient names are never in the trail, so
  never here.

A message larger than ``max_message_bytes`` (32 KiB by default: DICOM PS3.15 A.6 requires a
collector to take at least 32768 octets) is split into several messages of the same event,
each with every participant and a share of the patients and resources (a query object goes
into each), so nothing is truncated by a collector.

Log lines name counts, seqs and errors only, never a record's contents.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import ipaddress
import os
import re
import select
import socket
import ssl
import struct
import termios
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import urlsplit

from prometheus_client import Counter, Gauge

from hie.hub.audit import AuditRecord, SqlAuditLog
from hie.hub.errors import HieError
from hie.hub.logging import get_logger
from hie.hub.settings import Settings

log = get_logger("hie.audit.export")

SENT = Counter(
    "hie_audit_export_records_total", "Audit records sent to a syslog/ATNA collector", ["target"]
)
FAILURES = Counter(
    "hie_audit_export_failures_total", "Failed attempts to send audit records", ["target"]
)
LAG = Gauge("hie_audit_export_lag_records", "Audit records not yet sent", ["target"])

# --- codes ---------------------------------------------------------------------------------------

DCM = "DCM"
RFC3881 = "RFC-3881"
REST = "http://hl7.org/fhir/restful-interaction"
EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ACT_REASON = "2.16.840.1.113883.5.8"  # HL7 v3 ActReason, the code system of purposes of use
HUB_ROLE = "https://hie.spb.ru/fhir/CodeSystem/role"
HUB_OPERATION = "https://hie.spb.ru/fhir/CodeSystem/operation"

# the REST interactions of http://hl7.org/fhir/restful-interaction our subtypes can be
REST_CODES = frozenset(
    {
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "history",
        "create",
        "search",
        "capabilities",
        "transaction",
        "batch",
        "operation",
    }
)
QUERIES = frozenset({"search", "history", "everything"})  # as hie.fhir.audit_api shows them
_PURPOSES = {
    "TREAT": "treatment",
    "ETREAT": "Emergency Treatment",
    "HPAYMT": "healthcare payment",
    "HOPERAT": "healthcare operations",
    "PATRQT": "patient requested",
    "PUBHLTH": "public health",
    "HRESCH": "healthcare research",
    "HSYSADMIN": "health system administration",
}
# ParticipantObjectDataLifeCycle by action (PS3.15 A.5.1 schema)
_LIFE_CYCLE = {"C": "1", "U": "3", "R": "6", "E": "6", "D": "14"}

# --- syslog header (RFC 5424 §6) -----------------------------------------------------------------

FACILITY_AUTHPRIV = 10  # security/authorization messages (ITI TF-2 §3.20.4.1.2)
SEVERITY_WARNING = 4
SEVERITY_NOTICE = 5
APP_NAME = "hie"
MSGID = "IHE+RFC-3881"  # ITI TF-2 §3.20.4.1.2
BOM = b"\xef\xbb\xbf"
MAX_MESSAGE_BYTES = 32768  # DICOM PS3.15 A.6: a collector takes at least this
DEFAULT_PORTS = {"udp": 514, "tcp": 514, "tls": 6514}  # RFC 5426 §3.3, RFC 5425 §4.1
CONFIRM_SECONDS = 1.0  # longest wait for a TLS 1.3 collector's verdict on a new connection

# characters XML 1.0 cannot carry at all (§2.2); replaced, so a stray byte in a reason
# never makes the whole message ill-formed
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True, slots=True)
class AuditSource:
    """Who reports the events: the AuditSourceIdentification and the hub's own participant.

    ``base_url`` (``HIE_BASE_URL``) makes resource ids absolute URLs and identifies the hub;
    ``patient_authority`` (an OID) turns patient ids into HL7 CX ``id^^^&OID&ISO``."""

    source_id: str = "hie"
    host: str = ""
    site: str = ""
    base_url: str = ""
    patient_authority: str = ""


# --- the DICOM audit message ---------------------------------------------------------------------


def audit_message_xml(rec: AuditRecord, source: AuditSource | None = None) -> bytes:
    """One trail record as a DICOM audit message (PS3.15 A.5, UTF-8 XML; mapping in the
    module docstring), every patient and resource in one message."""
    root, spread, sticky = _build(rec, source or AuditSource())
    return _serialize(root, [*spread, *sticky])


def audit_messages(
    rec: AuditRecord, source: AuditSource | None = None, *, max_bytes: int = MAX_MESSAGE_BYTES
) -> list[bytes]:
    """:func:`audit_message_xml`, split into several messages of the same event when one
    would exceed ``max_bytes``: each has every participant and a share of the patients and
    resources, and the query object (see module docstring)."""
    root, spread, sticky = _build(rec, source or AuditSource())
    whole = _serialize(root, [*spread, *sticky])
    if len(whole) <= max_bytes or len(spread) <= 1:
        return [whole]
    budget = max_bytes - len(_serialize(root, sticky))
    out: list[bytes] = []
    chunk: list[ET.Element] = []
    used = 0
    for obj in spread:
        size = len(ET.tostring(obj, encoding="unicode").encode())
        if chunk and used + size > budget:
            out.append(_serialize(root, [*chunk, *sticky]))
            chunk, used = [], 0
        chunk.append(obj)
        used += size
    out.append(_serialize(root, [*chunk, *sticky]))
    return out


def severity_for(rec: AuditRecord) -> int:
    """Syslog severity of a record's message: notice for a success, warning for a failure or
    a security alert (ITI TF-2 §3.20.4.1.2: 5 or 4)."""
    return SEVERITY_NOTICE if rec.outcome == 0 and rec.status < 400 else SEVERITY_WARNING


@dataclass(frozen=True, slots=True)
class _Event:
    code: str
    system: str
    text: str
    action: str
    types: tuple[tuple[str, str, str], ...] = ()


def _classify(rec: AuditRecord) -> _Event:
    """EventID, action and EventTypeCodes of a record (table in the module docstring)."""
    action = rec.action if rec.action in ("C", "R", "U", "D", "E") else "E"
    if rec.status == 401:  # PS3.15 A.5.3 "User Authentication": a failed login
        return _Event("110114", DCM, "User Authentication", "E", (("110122", DCM, "Login"),))
    if rec.status == 403:  # A.5.3 "Security Alert"
        return _Event(
            "110113", DCM, "Security Alert", "E", (("110132", DCM, "Use of Restricted Function"),)
        )
    if _path_only(rec.path).startswith("/fhir/AuditEvent"):  # A.5.3 "Audit Log Used"
        return _Event("110101", DCM, "Audit Log Used", "R")
    if rec.subtype in QUERIES:  # A.5.3 "Query"
        return _Event("110112", DCM, "Query", "E")
    if _patients(rec):  # A.5.3 "Patient Record"
        return _Event("110110", DCM, "Patient Record", action)
    return _Event("rest", EVENT_TYPE, "RESTful Operation", action)


def _build(
    rec: AuditRecord, source: AuditSource
) -> tuple[ET.Element, list[ET.Element], list[ET.Element]]:
    """The message without its participant objects, the objects that may be spread over
    several messages (patients, resources) and those each message carries (query, log)."""
    ev = _classify(rec)
    root = ET.Element("AuditMessage")

    # EventIdentification: EventID, EventTypeCode*, EventOutcomeDescription?, PurposeOfUse*
    # in that order (A.5.1 schema)
    outcome = rec.outcome if rec.outcome in (0, 4, 8, 12) else (0 if rec.status < 400 else 8)
    event = _el(
        root,
        "EventIdentification",
        EventActionCode=ev.action,
        EventDateTime=_utc(rec.recorded),
        EventOutcomeIndicator=str(outcome),
    )
    _coded(event, "EventID", ev.code, ev.system, ev.text)
    for code, system, text in ev.types:
        _coded(event, "EventTypeCode", code, system, text)
    if rec.subtype:
        system = REST if rec.subtype in REST_CODES else HUB_OPERATION
        _coded(event, "EventTypeCode", rec.subtype, system, rec.subtype)
    why = [f"HTTP {rec.status}"] if outcome else []
    if rec.reason:
        why.append(rec.reason)
    if why:
        ET.SubElement(event, "EventOutcomeDescription").text = _text("; ".join(why))
    if rec.purpose:
        _coded(
            event, "PurposeOfUse", rec.purpose, ACT_REASON, _PURPOSES.get(rec.purpose, rec.purpose)
        )

    # ActiveParticipant: the requestor, the hub, the requestor's MO
    requestor = _el(
        root,
        "ActiveParticipant",
        UserID=rec.agent or "(unauthenticated)",
        AlternativeUserID=rec.client_id if rec.client_id != rec.agent else None,
        UserName=f"Practitioner/{rec.practitioner}" if rec.practitioner else None,
        UserIsRequestor="true",
        NetworkAccessPointID=rec.source,
        NetworkAccessPointTypeCode=_nap_type(rec.source) if rec.source else None,
    )
    _coded(requestor, "RoleIDCode", "110153", DCM, "Source Role ID")
    for role in rec.roles:
        _coded(requestor, "RoleIDCode", role, HUB_ROLE, role)
    hub = _el(
        root,
        "ActiveParticipant",
        UserID=source.base_url or source.source_id,
        UserIsRequestor="false",
        NetworkAccessPointID=source.host or None,
        NetworkAccessPointTypeCode=_nap_type(source.host) if source.host else None,
    )
    _coded(hub, "RoleIDCode", "110152", DCM, "Destination Role ID")
    if rec.org:
        _el(root, "ActiveParticipant", UserID=f"Organization/{rec.org}", UserIsRequestor="false")

    # AuditSourceIdentification (A.5.1 schema; type 4: application server process)
    src = _el(
        root,
        "AuditSourceIdentification",
        AuditEnterpriseSiteID=source.site or None,
        AuditSourceID=source.source_id,
    )
    _coded(src, "AuditSourceTypeCode", "4", SOURCE_TYPE, "Application Server")

    spread: list[ET.Element] = []
    life = _LIFE_CYCLE.get(ev.action) if outcome == 0 else None
    for pid in _patients(rec):
        obj = _object(
            ParticipantObjectID=_cx(pid, source.patient_authority),
            ParticipantObjectTypeCode="1",
            ParticipantObjectTypeCodeRole="1",
            ParticipantObjectDataLifeCycle=life,
        )
        _coded(obj, "ParticipantObjectIDTypeCode", "2", RFC3881, "Patient Number")
        spread.append(obj)
    for ref in rec.entities:
        if ref.startswith("Patient/"):
            continue
        obj = _object(ParticipantObjectID=_url(source, ref), ParticipantObjectTypeCode="2")
        _coded(obj, "ParticipantObjectIDTypeCode", "12", RFC3881, "URI")
        spread.append(obj)

    sticky: list[ET.Element] = []
    if ev.code == "110101":
        log_obj = _object(
            ParticipantObjectID=_url(source, _path_only(rec.path).removeprefix("/fhir/")),
            ParticipantObjectTypeCode="2",
            ParticipantObjectTypeCodeRole="13",
        )
        _coded(log_obj, "ParticipantObjectIDTypeCode", "12", RFC3881, "URI")
        ET.SubElement(log_obj, "ParticipantObjectName").text = "Security Audit Log"
        sticky.append(log_obj)
    if rec.subtype in QUERIES:
        query = _object(
            ParticipantObjectID=_path_only(rec.path) or "/",
            ParticipantObjectTypeCode="2",
            ParticipantObjectTypeCodeRole="24",
        )
        system = REST if rec.subtype in REST_CODES else HUB_OPERATION
        _coded(query, "ParticipantObjectIDTypeCode", rec.subtype, system, rec.subtype)
        ET.SubElement(query, "ParticipantObjectQuery").text = base64.b64encode(
            rec.path.encode()
        ).decode()
        if rec.entities_more:
            ET.SubElement(
                query,
                "ParticipantObjectDetail",
                type="entities-more",
                value=base64.b64encode(str(rec.entities_more).encode()).decode(),
            )
        sticky.append(query)
    return root, spread, sticky


def _serialize(root: ET.Element, objects: Sequence[ET.Element]) -> bytes:
    """The message with ``objects`` appended (the root itself is left as it was)."""
    for obj in objects:
        root.append(obj)
    try:
        body = ET.tostring(root, encoding="unicode", short_empty_elements=True)
    finally:
        for obj in objects:
            root.remove(obj)
    return b'<?xml version="1.0" encoding="UTF-8"?>' + body.encode()


def _el(parent: ET.Element, tag: str, **attrs: str | None) -> ET.Element:
    """A child element with the attributes that have a value (absent ones left out)."""
    return ET.SubElement(parent, tag, {k: _text(v) for k, v in attrs.items() if v})


def _object(**attrs: str | None) -> ET.Element:
    return ET.Element(
        "ParticipantObjectIdentification", {k: _text(v) for k, v in attrs.items() if v}
    )


def _coded(parent: ET.Element, tag: str, code: str, system: str, text: str) -> ET.Element:
    """A CodedValueType element: csd-code, codeSystemName and originalText are all required
    by the A.5.1 schema."""
    return _el(parent, tag, **{"csd-code": code, "codeSystemName": system, "originalText": text})


def _text(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value)


def _patients(rec: AuditRecord) -> list[str]:
    """The patients a record concerns, in order, once each (its entities may name some)."""
    found = dict.fromkeys(rec.patients)
    for ref in rec.entities:
        if ref.startswith("Patient/"):
            found.setdefault(ref[8:], None)
    return list(found)


def _cx(pid: str, authority: str) -> str:
    # HL7 v2 CX with only the assigning authority's universal id (ITI TF-2 patient ids)
    return f"{pid}^^^&{authority}&ISO" if authority else pid


def _url(source: AuditSource, ref: str) -> str:
    base = source.base_url.rstrip("/")
    return f"{base}/fhir/{ref}" if base else ref


def _path_only(path: str) -> str:
    return path.split("?", 1)[0]


def _nap_type(address: str) -> str:
    """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine name."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "1"
    return "2"


def _utc(micros: int) -> str:
    """An instant (epoch microseconds; 0 = now) as xsd:dateTime / RFC 5424 TIMESTAMP, UTC
    with microseconds (RFC 5424 §6.2.3 allows six digits of TIME-SECFRAC)."""
    if micros <= 0:
        micros = time.time_ns() // 1000
    secs, frac = divmod(micros, 1_000_000)
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:06d}Z"


# --- syslog framing ------------------------------------------------------------------------------


def syslog_frame(
    msg: bytes,
    *,
    timestamp: int = 0,
    hostname: str | None = None,
    app_name: str = APP_NAME,
    procid: str | None = None,
    msgid: str = MSGID,
    severity: int = SEVERITY_NOTICE,
    facility: int = FACILITY_AUTHPRIV,
    structured_data: str = "-",
    bom: bool = True,
) -> bytes:
    """One RFC 5424 SYSLOG-MSG: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG``.

    ``timestamp`` is epoch microseconds (0: now); header fields keep only printable US-ASCII
    and are cut to their RFC 5424 §6 lengths, an empty one becomes the NILVALUE ``-``;
    ``bom`` starts MSG with the UTF-8 BOM (§6.4)."""
    pri = facility * 8 + severity
    header = " ".join(
        (
            f"<{pri}>1",
            _utc(timestamp),
            _field(hostname if hostname is not None else socket.gethostname(), 255),
            _field(app_name, 48),
            _field(procid if procid is not None else str(os.getpid()), 128),
            _field(msgid, 32),
            structured_data or "-",
        )
    )
    return header.encode() + b" " + (BOM if bom else b"") + msg


def octet_counted(frame: bytes) -> bytes:
    """``MSG-LEN SP SYSLOG-MSG`` (RFC 5425 §4.3, RFC 6587 §3.4.1): the stream framing."""
    return b"%d %b" % (len(frame), frame)


def sequence_sd(seq: int) -> str:
    """``[meta sequenceId="N"]`` for a record's seq (RFC 5424 §7.3.1: 1..2147483647, so
    the seq wraps there)."""
    return f'[meta sequenceId="{(seq - 1) % 2147483647 + 1}"]'


def _field(value: str, limit: int) -> str:
    kept = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return kept or "-"


# --- transports ----------------------------------------------------------------------------------


class AuditExportError(HieError):
    """The collector could not be reached or did not take a batch (it is sent again)."""

    code = "HIE-1510"
    status = 503
    issue = "transient"


@dataclass(frozen=True, slots=True)
class Target:
    """A collector: transport, host and port."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_target(url: str) -> Target:
    """``udp://host[:514]``, ``tcp://host[:514]`` or ``tls://host[:6514]``."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(
            f"audit syslog URL {url!r} is not udp://host:port, tcp://host:port or tls://host:port"
        )
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise ValueError(f"audit syslog URL {url!r} has a bad port") from exc
    return Target(scheme, parts.hostname, port)


class Transport(Protocol):
    """Carries framed syslog messages to one collector."""

    def send(self, frames: Sequence[bytes]) -> None:
        """Deliver ``frames`` in order; raise ``OSError`` if they may not all have arrived."""

    def close(self) -> None:
        """Drop the connection (the next send opens a new one)."""


class UdpTransport:
    """RFC 5426: one datagram per message, on a connected socket (so an ICMP "port
    unreachable" from a collector that is down surfaces as an error)."""

    def __init__(self, target: Target, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def send(self, frames: Sequence[bytes]) -> None:
        """Send each frame as its own datagram."""
        if self._sock is None:
            family, kind, proto, _, addr = socket.getaddrinfo(
                self.target.host, self.target.port, type=socket.SOCK_DGRAM
            )[0]
            sock = socket.socket(family, kind, proto)
            sock.settimeout(self.timeout)
            try:
                sock.connect(addr)
            except OSError:
                sock.close()
                raise
            self._sock = sock
        for frame in frames:
            self._sock.send(frame)

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class StreamTransport:
    """TCP (RFC 6587) or TLS (RFC 5425), octet-counted frames on one kept-open connection."""

    def __init__(self, target: Target, timeout: float, tls: ssl.SSLContext | None) -> None:
        self.target = target
        self.timeout = timeout
        self.tls = tls
        self._sock: socket.socket | None = None

    def send(self, frames: Sequence[bytes]) -> None:
        """Write the frames and wait until the collector's TCP stack has acknowledged them."""
        if self._sock is not None and self._peer_closed(self._sock):
            self.close()
        if self._sock is None:
            self._sock = self._connect()
        self._sock.sendall(b"".join(octet_counted(f) for f in frames))
        self._wait_acknowledged(self._sock)

    def close(self) -> None:
        """Close the connection."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        raw = socket.create_connection((self.target.host, self.target.port), self.timeout)
        try:
            # each batch is waited for until acknowledged: no Nagle delay on its last segment
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self.tls is None:
                return raw
            sock = self.tls.wrap_socket(raw, server_hostname=self.target.host)
            self._confirm_accepted(sock)
            return sock
        except BaseException:
            raw.close()
            raise

    def _confirm_accepted(self, sock: ssl.SSLSocket) -> None:
        """Make sure a TLS 1.3 collector accepted us before anything is sent.

        In TLS 1.3 the client's handshake is over before the server has judged the client's
        certificate (RFC 8446 §2, figure 1: it goes with the client's Finished); a collector
        that requires one (ATNA node authentication) and refuses ours, or our lack of one,
        says so in an alert just after. Records written meanwhile would be acknowledged by
        its TCP stack and then thrown away, so wait for its first word: a session ticket
        (sent only after the client's Finished, §4.6.1) means go on, an alert raises
        ``ssl.SSLError``. A collector that sends no
        tickets costs a wait of ``CONFIRM_SECONDS`` per connection. TLS 1.2 settles all of
        this inside the handshake."""
        if sock.version() != "TLSv1.3":
            return
        deadline = time.monotonic() + CONFIRM_SECONDS
        heard = False
        sock.setblocking(False)
        try:
            while (left := deadline - time.monotonic()) > 0:
                # after a ticket, a short quiet spell is enough (a second ticket may follow)
                readable, _, _ = select.select([sock], [], [], min(left, 0.05) if heard else left)
                if not readable:
                    return
                try:
                    data = sock.recv(1)
                except ssl.SSLWantReadError:
                    heard = True  # a ticket (or part of a record) was taken in
                    continue
                if data == b"":
                    raise ConnectionResetError("the collector closed the connection after TLS")
                return  # it should never send data; nothing to refuse us for, though
        finally:
            sock.settimeout(self.timeout)

    def _peer_closed(self, sock: socket.socket) -> bool:
        """Whether the collector has closed the connection: it never sends anything on a
        syslog connection (RFC 5425 and 6587 are one-way), so readable means end of stream
        or an error — or, over TLS 1.3, a session ticket, which the TLS layer swallows."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        if not readable:
            return False
        sock.setblocking(False)
        try:
            if isinstance(sock, ssl.SSLSocket):
                data = sock.recv(1)
            else:
                data = sock.recv(1, socket.MSG_PEEK)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return False
        except OSError:
            return True
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(self.timeout)
        return data == b""

    def _wait_acknowledged(self, sock: socket.socket) -> None:
        """Wait until nothing written is unacknowledged (Linux ``SIOCOUTQ``), giving up
        after ``timeout`` seconds without progress. Elsewhere: return at once."""
        waited, last, pause = 0.0, -1, 0.0005
        while True:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            try:
                raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
            except OSError:
                return  # not Linux (or not TCP): what sendall gave is all we know
            pending = struct.unpack("i", raw)[0]
            if pending == 0:
                return
            if pending != last:
                last, waited = pending, 0.0
            elif waited > self.timeout:
                raise TimeoutError(f"the collector acknowledged nothing for {self.timeout} s")
            time.sleep(pause)
            waited += pause
            pause = min(pause * 2, 0.05)


def tls_context(ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    """A client context that verifies the server (a syslog collector; a DICOM node the hub
    calls): against ``ca`` (PEM bundle) when given, else the system's CAs; TLS 1.2 at least
    (RFC 5425 §4.2, RFC 7525); ``cert``/``key`` present a client certificate (ATNA node
    authentication)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx


def open_transport(
    target: Target, *, ca: str = "", cert: str = "", key: str = "", timeout: float = 10.0
) -> Transport:
    """The transport for ``target``'s scheme."""
    if target.scheme == "udp":
        return UdpTransport(target, timeout)
    tls = tls_context(ca, cert, key) if target.scheme == "tls" else None
    return StreamTransport(target, timeout, tls)


# --- the exporter --------------------------------------------------------------------------------


class AuditExporter:
    """Sends the audit trail to one collector, in order, at least once (module docstring).

    ``export_once`` sends what is pending; ``start``/``stop`` run it in a daemon thread that
    polls every ``poll_seconds`` and, after a failure, retries after a pause doubling from
    0.5 s up to ``max_backoff`` seconds. ``backfill=False`` starts a collector that has no
    cursor yet at the end of the trail instead of its beginning."""

    def __init__(
        self,
        trail: SqlAuditLog,
        url: str,
        *,
        ca: str = "",
        batch: int = 500,
        hostname: str | None = None,
        cert: str = "",
        key: str = "",
        source: AuditSource | None = None,
        poll_seconds: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 10.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        backfill: bool = True,
    ) -> None:
        self.trail = trail
        self.target = parse_target(url)
        self.key = str(self.target)  # the cursor's name, and the metrics' label
        self.batch = max(1, batch)
        self.hostname = hostname or socket.gethostname()
        self.source = source or AuditSource(source_id=self.hostname, host=self.hostname)
        self.poll_seconds = poll_seconds
        self.max_backoff = max_backoff
        self.max_message_bytes = max_message_bytes
        self.backfill = backfill
        self.procid = str(os.getpid())
        self._transport = open_transport(self.target, ca=ca, cert=cert, key=key, timeout=timeout)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._placed = False

    def export_once(self) -> int:
        """Send every record after the cursor, batch by batch, moving the cursor after each
        batch was sent; returns how many were sent. Raises :class:`AuditExportError` when the
        collector fails (the cursor then stays after the last batch that got through)."""
        with self._lock:
            self._place_cursor()
            cursor = self.trail.export_cursor(self.key)
            sent = 0
            while not (sent and self._stop.is_set()):
                recs = self.trail.records_after(cursor, self.batch)
                if not recs:
                    break
                frames = [f for r in recs for f in self._frames(r)]
                try:
                    self._transport.send(frames)
                except OSError as exc:
                    self._transport.close()
                    FAILURES.labels(self.key).inc()
                    self._update_lag(cursor)  # so an outage shows as a growing lag
                    raise AuditExportError(
                        f"audit export to {self.key} failed: {type(exc).__name__}: {exc}"[:300]
                    ) from exc
                cursor = recs[-1].seq
                self.trail.set_export_cursor(self.key, cursor)
                SENT.labels(self.key).inc(len(recs))
                sent += len(recs)
                if len(recs) < self.batch:
                    break
            self._update_lag(cursor)
            if sent:
                log.debug("audit.export.sent", target=self.key, records=sent, through_seq=cursor)
            return sent

    def lag(self) -> int:
        """How many records the collector has not been sent yet."""
        return max(0, _newest_seq(self.trail) - self.trail.export_cursor(self.key))

    def start(self) -> None:
        """Run the exporter in a daemon thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="hie-audit-export", daemon=True)
            self._thread.start()

    def stop(self, *, flush: bool = True) -> None:
        """Stop the thread; with ``flush``, try once more to send what is pending (a collector
        that is down then only delays those records to the next start)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if flush:
            self._stop.clear()
            try:
                self.export_once()
            except Exception as exc:  # noqa: BLE001 - pending records wait for the next start
                log.warning("audit.export.pending", target=self.key, error=type(exc).__name__)
            finally:
                self._stop.set()
        self._transport.close()

    def close(self) -> None:
        """:meth:`stop`, sending what is pending first."""
        self.stop()

    def _loop(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                sent = self.export_once()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any outage
                backoff = min(self.max_backoff, backoff * 2 or 0.5)
                log.warning(
                    "audit.export.failed",
                    target=self.key,
                    error=str(exc)[:300] if isinstance(exc, HieError) else type(exc).__name__,
                    retry_in=backoff,
                )
                self._stop.wait(backoff)
                continue
            backoff = 0.0
            if sent == 0:
                self._stop.wait(self.poll_seconds)

    def _place_cursor(self) -> None:
        """Without backfill, a new collector starts at the trail's end (once)."""
        if self._placed:
            return
        if not self.backfill and not self.trail.has_export_cursor(self.key):
            self.trail.set_export_cursor(self.key, _newest_seq(self.trail))
        self._placed = True

    def _frames(self, rec: AuditRecord) -> list[bytes]:
        severity = severity_for(rec)
        room = self.max_message_bytes - 400  # the syslog header, BOM and length prefix
        return [
            syslog_frame(
                msg,
                timestamp=rec.recorded,
                hostname=self.hostname,
                procid=self.procid,
                severity=severity,
                structured_data=sequence_sd(rec.seq),
            )
            for msg in audit_messages(rec, self.source, max_bytes=room)
        ]

    def _update_lag(self, cursor: int) -> None:
        try:
            LAG.labels(self.key).set(max(0, _newest_seq(self.trail) - cursor))
        except Exception as exc:  # noqa: BLE001 - a gauge is not worth failing a send for
            log.warning("audit.export.lag-unknown", target=self.key, error=type(exc).__name__)


def _newest_seq(trail: SqlAuditLog) -> int:
    newest, _ = trail.records(count=1)
    return newest[0].seq if newest else 0


def exporter_from_settings(settings: Settings, trail: SqlAuditLog) -> AuditExporter | None:
    """The exporter ``HIE_AUDIT_SYSLOG_URL`` / ``HIE_AUDIT_SYSLOG_CA`` ask for (not started),
    or None when export is off. A malformed URL raises ``ValueError`` (refuse to start)."""
    if not settings.audit_syslog_url:
        return None
    host = socket.gethostname()
    return AuditExporter(
        trail,
        settings.audit_syslog_url,
        ca=settings.audit_syslog_ca,
        hostname=host,
        source=AuditSource(source_id=host, host=host, base_url=settings.public_base),
    )
