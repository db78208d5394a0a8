"""How an MO is registered with the hub (ФРМО-style facility registry): the conventions.

An MO is an ``Organization`` whose identifier is its ФРМО OID (``urn:oid:1.2.643.5.1.13.13.11.1461``
system, value ``1.2.643.5.1.13.13.12.2.<region>.<n>``). Its connections are ``Endpoint``
resources it manages (``Endpoint.managingOrganization``); only ``status = active`` ones count:

- HL7 v2 over MLLP: ``connectionType`` = ``hl7v2-mllp`` (HL7 ``endpoint-connection-type``);
  ``Endpoint.identifier`` = the HL7 sending facility (MSH-4) it uses (system
  :data:`HL7_FACILITY_SYSTEM`). Optional extra identifiers with system
  :data:`HL7_APPLICATION_SYSTEM` restrict which sending applications (MSH-3) may use it; with
  none, any application of that facility is accepted.
- DICOM DIMSE: ``connectionType`` = ``dicom-dimse`` (the hub's :data:`HIE_CONNECTION_TYPE_SYSTEM`),
  ``address`` = ``dicom://AE_TITLE@host:port`` — the calling AE title, the host its
  associations come from, and the C-MOVE destination; ``dicom+tls://…`` when the hub must
  reach it over TLS (C-MOVE, storage commitment reports). ``Endpoint.identifier`` carries the
  AE title too (system :data:`DICOM_AE_TITLE_SYSTEM`), but the address is authoritative.

The MO's own identifier system for local patient ids is registered as a second
``Organization.identifier``: ``system`` = :data:`PATIENT_ID_SYSTEM_SYSTEM`, ``value`` = the system
URI (e.g. ``urn:oid:1.2.643.5.1.13.13.12.2.78.8111.100``), ``type`` coded
:data:`HIE_IDENTIFIER_TYPE_SYSTEM` | ``patient-id-system``. Being an identifier, it is searchable
both ways (``Organization?identifier=<PATIENT_ID_SYSTEM_SYSTEM>|<uri>`` finds the MO that owns
a patient identifier system). An MO may register more than one.

Pure functions and constants only (it imports nothing but :mod:`hie.registries.identifiers`),
so the demo generator uses it to register its MOs the same way.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from hie.registries.identifiers import FRMO_SYSTEM as FRMO_SYSTEM

# --- identifier and code systems --------------------------------------------------------

# ФРМО (Федеральный реестр медицинских организаций), НСИ OID 1.2.643.5.1.13.13.11.1461, is
# FRMO_SYSTEM of hie.registries.identifiers (re-exported here).
# Every MO OID in ФРМО lies under this arc, then the region code (78 = St Petersburg).
FRMO_MO_OID_ROOT = "1.2.643.5.1.13.13.12.2"
# HL7 Endpoint connection types (R4 ``endpoint-connection-type``), e.g. ``hl7v2-mllp``.
HL7_CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
# The hub's own connection types, for what HL7 does not code (DICOM DIMSE associations).
HIE_CONNECTION_TYPE_SYSTEM = "https://hie.spb.ru/fhir/CodeSystem/endpoint-connection-type"
ENDPOINT_PAYLOAD_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"
# Endpoint.identifier system of HL7 v2 sending facilities (MSH-4) registered with the hub.
HL7_FACILITY_SYSTEM = "https://hie.spb.ru/fhir/sid/hl7v2-sending-facility"
# Endpoint.identifier system of HL7 v2 sending applications (MSH-3) an endpoint is limited to.
HL7_APPLICATION_SYSTEM = "https://hie.spb.ru/fhir/sid/hl7v2-sending-application"
# Endpoint.identifier: the SHA-256 fingerprint (hex) of a TLS client certificate the MO's
# system presents on that connection (MLLP and DICOM over TLS)
CERTIFICATE_SYSTEM = "https://hie.spb.ru/fhir/sid/tls-certificate-sha256"
# Endpoint.identifier system of DICOM AE titles registered with the hub.
DICOM_AE_TITLE_SYSTEM = "https://hie.spb.ru/fhir/sid/dicom-ae-title"
# Organization.identifier system whose values are the MO's local patient identifier systems.
PATIENT_ID_SYSTEM_SYSTEM = "https://hie.spb.ru/fhir/sid/patient-identifier-system"
# The hub's identifier-type code system (Identifier.type) and the code for the above.
HIE_IDENTIFIER_TYPE_SYSTEM = "https://hie.spb.ru/fhir/CodeSystem/identifier-type"
PATIENT_ID_SYSTEM_TYPE_CODE = "patient-id-system"

ORGANIZATION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/organization-type"
# The hub's code systems for the kind of MO and for medical specialties.
MO_KIND_SYSTEM = "https://hie.spb.ru/fhir/CodeSystem/mo-kind"
MEDICAL_SPECIALTY_SYSTEM = "https://hie.spb.ru/fhir/CodeSystem/medical-specialty"
PRACTITIONER_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/practitioner-role"

HL7V2_MLLP = "hl7v2-mllp"
DICOM_DIMSE = "dicom-dimse"
# Which code system each connection type the lookups use is coded in.
CONNECTION_TYPE_SYSTEMS: dict[str, str] = {
    HL7V2_MLLP: HL7_CONNECTION_TYPE_SYSTEM,
    DICOM_DIMSE: HIE_CONNECTION_TYPE_SYSTEM,
}
# R4 endpoint-connection-type codes (loaders accept these besides dicom-dimse).
HL7_CONNECTION_TYPES = frozenset(
    {
        "ihe-xcpd",
        "ihe-xca",
        "ihe-xdr",
        "ihe-xds",
        "ihe-iid",
        "dicom-wado-rs",
        "dicom-qido-rs",
        "dicom-stow-rs",
        "dicom-wado-uri",
        "hl7-fhir-rest",
        "hl7-fhir-msg",
        "hl7v2-mllp",
        "secure-email",
        "direct-project",
    }
)

# --- ФРМО OIDs ---------------------------------------------------------------------------

# 1.2.643.5.1.13.13.12.2.<region>.<n>[.<sub>…]: digits and dots, no empty or 0-led arcs
_FRMO_OID_RX = re.compile(
    r"^" + re.escape(FRMO_MO_OID_ROOT) + r"\.(?:[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,17})){1,4}$"
)


def frmo_oid_problem(value: str) -> str | None:
    """Why ``value`` is not a ФРМО MO OID (``1.2.643.5.1.13.13.12.2.<region>.<n>``), or None.

    A ``urn:oid:`` prefix is tolerated (strip it with :func:`bare_oid` before storing).
    """
    oid = bare_oid(value)
    if not oid:
        return "the ФРМО OID is empty"
    if not re.fullmatch(r"[0-9.]+", oid):
        return f"ФРМО OID {value!r} must contain only digits and dots"
    if not oid.startswith(FRMO_MO_OID_ROOT + "."):
        return f"ФРМО OID {value!r} must start with {FRMO_MO_OID_ROOT}.<region>."
    if not _FRMO_OID_RX.match(oid):
        return (
            f"ФРМО OID {value!r} is malformed: expected {FRMO_MO_OID_ROOT}.<region>.<number> "
            "(arcs of digits without leading zeros, separated by single dots)"
        )
    return None


def bare_oid(value: str) -> str:
    """``urn:oid:1.2.3`` → ``1.2.3`` (other values unchanged, stripped)."""
    value = value.strip()
    return value[8:] if value.lower().startswith("urn:oid:") else value


# --- DICOM addresses ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DicomAddress:
    """A parsed ``dicom://AE_TITLE@host:port`` address (host and port may be absent);
    ``tls``: written ``dicom+tls://``, the node is reached over TLS."""

    ae_title: str
    host: str | None
    port: int | None
    tls: bool = False


# AE title: 1–16 characters of the DICOM default repertoire, no backslash or control chars
# (PS3.5 §6.2, value representation AE); leading and trailing spaces are not significant.
_AE_RX = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def ae_title_problem(ae_title: str) -> str | None:
    """Why ``ae_title`` is not a valid DICOM AE title, or None."""
    if not ae_title.strip():
        return "the AE title is empty"
    if not _AE_RX.match(ae_title.strip()):
        return (
            f"AE title {ae_title!r} must be 1-16 printable ASCII characters without a backslash "
            "(DICOM PS3.5 §6.2, VR AE)"
        )
    return None


def parse_dicom_address(address: str) -> DicomAddress:
    """Parse ``dicom://AE@host:port`` (also ``dicom://AE@host``, ``dicom://AE``, IPv6
    ``dicom://AE@[::1]:104`` and ``dicom+tls://…`` for a node reached over TLS); raise
    ValueError saying what is wrong."""
    scheme, sep, rest = address.partition("://")
    tls = scheme.lower() == "dicom+tls"
    if not sep or scheme.lower() not in ("dicom", "dicom+tls"):
        raise ValueError(
            f"DICOM address {address!r} must look like dicom://AE_TITLE@host:port "
            "(or dicom+tls://…)"
        )
    ae, at, hostport = rest.rpartition("@")
    if not at:
        ae, hostport = rest, ""
    problem = ae_title_problem(ae)
    if problem:
        raise ValueError(f"DICOM address {address!r}: {problem}")
    host: str | None = None
    port: int | None = None
    if hostport:
        if hostport.startswith("["):
            host_part, _, after = hostport[1:].partition("]")
            port_part = after[1:] if after.startswith(":") else None
            if after and not after.startswith(":"):
                raise ValueError(f"DICOM address {address!r}: malformed IPv6 host")
        else:
            host_part, colon, port_text = hostport.partition(":")
            port_part = port_text if colon else None
        host = host_part or None
        if host is not None and not re.fullmatch(r"[A-Za-z0-9.\-_:%]+", host):
            raise ValueError(f"DICOM address {address!r}: {host!r} is not a host name or address")
        if port_part is not None:
            if not port_part.isdigit() or not 0 < int(port_part) < 65536:
                raise ValueError(f"DICOM address {address!r}: port must be 1-65535")
            port = int(port_part)
    return DicomAddress(ae.strip(), host, port, tls)


def format_dicom_address(
    ae_title: str, host: str | None, port: int | None, *, tls: bool = False
) -> str:
    """The ``dicom://AE@host:port`` form (brackets around IPv6 hosts; ``dicom+tls://``)."""
    out = f"{'dicom+tls' if tls else 'dicom'}://{ae_title}"
    if host:
        out += "@" + (f"[{host}]" if ":" in host else host)
        if port:
            out += f":{port}"
    return out


def same_host(registered: str, peer: str) -> bool:
    """True if the peer address ``peer`` (an IP) is the registered host ``registered``.

    IP literals are compared as addresses (an IPv4-mapped IPv6 peer matches its IPv4 form);
    names are compared case-insensitively; resolving names is the caller's choice.
    """
    reg = _ip(registered)
    got = _ip(peer)
    if reg is not None and got is not None:
        return reg == got
    return registered.strip().rstrip(".").lower() == peer.strip().rstrip(".").lower()


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(value.strip().strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_ip_literal(value: str) -> bool:
    """True when ``value`` is an IPv4 or IPv6 address rather than a host name."""
    return _ip(value) is not None


# --- reading registrations ---------------------------------------------------------------


def frmo_oid_of(org: dict[str, Any]) -> str | None:
    """The ФРМО OID an Organization carries, if any."""
    for ident in org.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("system") == FRMO_SYSTEM and ident.get("value"):
            return bare_oid(str(ident["value"]))
    return None


def patient_id_systems_of(org: dict[str, Any]) -> tuple[str, ...]:
    """The local patient identifier systems an Organization registers (official ones first)."""
    found: list[tuple[int, str]] = []
    for ident in org.get("identifier") or []:
        if (
            isinstance(ident, dict)
            and ident.get("system") == PATIENT_ID_SYSTEM_SYSTEM
            and ident.get("value")
        ):
            found.append((0 if ident.get("use") == "official" else 1, str(ident["value"])))
    return tuple(dict.fromkeys(v for _, v in sorted(found, key=lambda t: t[0])))


def patient_id_system_identifier(system_uri: str) -> dict[str, Any]:
    """The Organization.identifier that registers ``system_uri`` as the MO's patient ids."""
    return {
        "use": "secondary",
        "type": {
            "coding": [
                {
                    "system": HIE_IDENTIFIER_TYPE_SYSTEM,
                    "code": PATIENT_ID_SYSTEM_TYPE_CODE,
                    "display": "Система локальных идентификаторов пациентов МО",
                }
            ],
            "text": "Система идентификаторов пациентов",
        },
        "system": PATIENT_ID_SYSTEM_SYSTEM,
        "value": system_uri,
    }


def connection_code(endpoint: dict[str, Any]) -> str | None:
    """The Endpoint's connection type code (``hl7v2-mllp``, ``dicom-dimse``, …)."""
    ct = endpoint.get("connectionType")
    if isinstance(ct, dict) and isinstance(ct.get("code"), str):
        return str(ct["code"])
    return None


def identifier_values(res: dict[str, Any], system: str | None) -> tuple[str, ...]:
    """Values of the identifiers of ``res`` with ``system`` (None: any system)."""
    out = []
    for ident in res.get("identifier") or []:
        if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
            continue
        if system is None or ident.get("system") == system:
            out.append(ident["value"])
    return tuple(out)
