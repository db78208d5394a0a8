"""Who is sending? Transport-free lookups of registered MOs for the protocol adapters.

The MLLP adapter asks :meth:`SenderRegistry.mo_for_hl7_sender` with MSH-3/MSH-4, the DICOM
adapter asks :meth:`SenderRegistry.mo_for_dicom_caller` with the calling AE title and the
peer's address, and resolves C-MOVE destinations with :meth:`SenderRegistry.dicom_destination`.
``None`` means "not registered" — the adapter answers AR / rejects the association and logs it.

Everything is read through the store's FHIR search (``Endpoint?identifier=…&connection-type=…
&status=active``, ``Organization/…``), following the registration conventions of
:mod:`hie.registries.facility`. Only active Endpoints of active Organizations count. Answers
are cached for ``ttl`` seconds (2 s by default, so a registry change made anywhere — another
process included — is seen within seconds); :meth:`SenderRegistry.invalidate` drops the cache
at once after a write this process made.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import orjson

from hie.fhir.search import escape_value, parse_search
from hie.hub.logging import get_logger
from hie.hub.store.port import ResourceStore, StoredResource, iter_search
from hie.registries.facility import (
    CERTIFICATE_SYSTEM,
    CONNECTION_TYPE_SYSTEMS,
    DICOM_AE_TITLE_SYSTEM,
    DICOM_DIMSE,
    FRMO_SYSTEM,
    HL7_APPLICATION_SYSTEM,
    HL7V2_MLLP,
    PATIENT_ID_SYSTEM_SYSTEM,
    DicomAddress,
    bare_oid,
    connection_code,
    frmo_oid_of,
    is_ip_literal,
    parse_dicom_address,
    patient_id_systems_of,
    same_host,
)

log = get_logger("hie.registries.senders")

_PAGE = 1000


@dataclass(frozen=True, slots=True)
class RegisteredEndpoint:
    """One active Endpoint of a registered MO, with what the adapters need already parsed."""

    id: str
    connection_type: str | None
    address: str | None
    hl7_facilities: tuple[str, ...] = ()
    hl7_applications: tuple[str, ...] = ()
    dicom: DicomAddress | None = None
    # SHA-256 fingerprints (hex) of the TLS client certificates this connection presents
    certificates: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RegisteredMo:
    """A registered medical organisation: its Organization and its active Endpoints."""

    id: str
    name: str
    frmo_oid: str | None
    endpoints: tuple[RegisteredEndpoint, ...]
    patient_id_systems: tuple[str, ...] = ()

    @property
    def reference(self) -> str:
        """``Organization/<id>``."""
        return f"Organization/{self.id}"

    @property
    def patient_id_system(self) -> str | None:
        """The MO's (first, official-first) local patient identifier system, if registered."""
        return self.patient_id_systems[0] if self.patient_id_systems else None

    def has_certificate(self, sha256: str) -> bool:
        """Whether one of the MO's Endpoints lists this TLS client certificate fingerprint."""
        mine = sha256.lower().replace(":", "")
        return any(mine in ep.certificates for ep in self.endpoints)


class Destination(NamedTuple):
    """A DICOM node the hub opens associations to: host, port, and whether over TLS."""

    host: str
    port: int
    tls: bool = False


@dataclass(frozen=True, slots=True)
class _DicomEntry:
    org_id: str
    endpoint_id: str
    address: DicomAddress


def _json(stored: StoredResource) -> dict[str, Any]:
    return orjson.loads(stored.content or b"{}")  # type: ignore[no-any-return]


def _endpoint(res: dict[str, Any]) -> RegisteredEndpoint:
    code = connection_code(res)
    address = res.get("address") if isinstance(res.get("address"), str) else None
    facilities: list[str] = []
    applications: list[str] = []
    certificates: list[str] = []
    for ident in res.get("identifier") or []:
        if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
            continue
        system = ident.get("system")
        if system == HL7_APPLICATION_SYSTEM:
            applications.append(ident["value"].strip())
        elif system == CERTIFICATE_SYSTEM:
            certificates.append(ident["value"].strip().lower().replace(":", ""))
        elif system != DICOM_AE_TITLE_SYSTEM and code == HL7V2_MLLP:
            # DESIGN "Interfaces": Endpoint.identifier = the HL7 sending facility (MSH-4)
            facilities.append(ident["value"].strip())
    dicom = None
    if code == DICOM_DIMSE and address:
        try:
            dicom = parse_dicom_address(address)
        except ValueError:
            log.warning("registry.endpoint.bad_dicom_address", endpoint=res.get("id"))
    return RegisteredEndpoint(
        id=str(res.get("id")),
        connection_type=code,
        address=address,
        hl7_facilities=tuple(facilities),
        hl7_applications=tuple(applications),
        dicom=dicom,
        certificates=tuple(certificates),
    )


def _managing_org(res: dict[str, Any]) -> str | None:
    ref = (res.get("managingOrganization") or {}).get("reference")
    if isinstance(ref, str) and ref.startswith("Organization/") and ref.count("/") == 1:
        return ref.split("/", 1)[1]
    return None


def _hd_candidates(value: str | None) -> list[str]:
    """An HL7 HD (``namespace^universal id^type``) as the values it may be registered under:
    the whole string, the namespace id, the universal id (HL7 v2.5.1 §2.A.33)."""
    if value is None:
        return []
    value = value.strip()
    out = [value]
    if "^" in value:
        parts = [p.strip() for p in value.split("^")]
        out.extend(p for p in parts[:2] if p)
    return list(dict.fromkeys(v for v in out if v))


class SenderRegistry:
    """Lookups of registered senders over one resource store (thread-safe; cached)."""

    def __init__(
        self,
        store: ResourceStore,
        *,
        ttl: float = 2.0,
        resolve_hosts: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.resolve_hosts = resolve_hosts
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, ...], tuple[float, Any]] = {}

    # --- cache ----------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Forget every cached answer (call after writing to the registry)."""
        with self._lock:
            self._cache.clear()

    def _cached(self, key: tuple[str, ...], compute: Callable[[], Any]) -> Any:
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        value = compute()
        with self._lock:
            if len(self._cache) > 50_000:  # unknown senders must not grow it without bound
                self._cache.clear()
            self._cache[key] = (now + self.ttl, value)
        return value

    # --- searching --------------------------------------------------------------------------

    def _search(self, resource_type: str, items: list[tuple[str, str]]) -> Iterator[StoredResource]:
        q = parse_search(resource_type, items, default_count=_PAGE, max_count=_PAGE).query
        return iter_search(self.store, q)

    def _active_endpoints(self, connection_type: str, identifier: str | None = None) -> list[Any]:
        items = [
            ("connection-type", f"{CONNECTION_TYPE_SYSTEMS[connection_type]}|{connection_type}"),
            ("status", "active"),
        ]
        if identifier is not None:
            items.append(("identifier", escape_value(identifier)))
        return [_json(s) for s in self._search("Endpoint", items)]

    # --- MOs --------------------------------------------------------------------------------

    def mo(self, org_id: str) -> RegisteredMo | None:
        """The registered MO with Organization id ``org_id`` (None if unknown or inactive)."""
        result: RegisteredMo | None = self._cached(("mo", org_id), lambda: self._load_mo(org_id))
        return result

    def _load_mo(self, org_id: str) -> RegisteredMo | None:
        stored = self.store.read("Organization", org_id)
        if stored is None or stored.deleted:
            return None
        org = _json(stored)
        if org.get("active") is False:
            return None
        eps = [
            _endpoint(_json(s))
            for s in self._search(
                "Endpoint", [("organization", f"Organization/{org_id}"), ("status", "active")]
            )
        ]
        return RegisteredMo(
            id=org_id,
            name=str(org.get("name") or ""),
            frmo_oid=frmo_oid_of(org),
            endpoints=tuple(sorted(eps, key=lambda e: e.id)),
            patient_id_systems=patient_id_systems_of(org),
        )

    def mo_by_frmo_oid(self, oid: str) -> RegisteredMo | None:
        """The registered MO whose ФРМО OID is ``oid`` (``urn:oid:`` prefix tolerated)."""
        return self._mo_by_identifier(FRMO_SYSTEM, bare_oid(oid))

    def mo_for_patient_id_system(self, system: str) -> RegisteredMo | None:
        """The MO that registered ``system`` as its local patient identifier system, if one
        did (the MPI uses this to refuse identifier systems no MO registered)."""
        return self._mo_by_identifier(PATIENT_ID_SYSTEM_SYSTEM, system.strip())

    def _mo_by_identifier(self, system: str, value: str) -> RegisteredMo | None:
        def compute() -> str | None:
            if not value:
                return None
            token = f"{system}|{escape_value(value)}"
            ids = [s.id for s in self._search("Organization", [("identifier", token)])]
            if len(ids) > 1:
                log.warning("registry.identifier.ambiguous", system=system, organizations=ids)
                return None
            return ids[0] if ids else None

        org_id: str | None = self._cached(("org-by-ident", system, value), compute)
        return self.mo(org_id) if org_id else None

    def patient_id_system(self, mo: RegisteredMo | str) -> str | None:
        """The local patient identifier system of ``mo`` (a RegisteredMo or Organization id):
        the ``Organization.identifier`` with system ``PATIENT_ID_SYSTEM_SYSTEM``."""
        found = self.mo(mo) if isinstance(mo, str) else mo
        return found.patient_id_system if found else None

    # --- HL7 v2 -----------------------------------------------------------------------------

    def mo_for_hl7_sender(
        self, sending_application: str | None, sending_facility: str
    ) -> RegisteredMo | None:
        """The MO whose active ``hl7v2-mllp`` Endpoint is registered for this MSH-4 (and, if
        the Endpoint lists sending applications, this MSH-3); None when unknown or ambiguous.

        MSH-4 may arrive as a whole HD (``GP12LAB^1.2.643…^ISO``): the whole value, then its
        namespace id and its universal id are tried in turn.
        """
        apps = _hd_candidates(sending_application)
        for facility in _hd_candidates(sending_facility):
            org_id = self._cached(
                ("hl7", "^".join(apps), facility), partial(self._hl7_org, apps, facility)
            )
            if org_id:
                return self.mo(org_id)
        return None

    def _hl7_org(self, apps: list[str], facility: str) -> str | None:
        orgs: set[str] = set()
        for res in self._active_endpoints(HL7V2_MLLP, facility):
            ep = _endpoint(res)
            org_id = _managing_org(res)
            if org_id is None or facility not in ep.hl7_facilities:
                continue
            if ep.hl7_applications and not set(apps) & set(ep.hl7_applications):
                continue
            orgs.add(org_id)
        if len(orgs) > 1:
            log.warning("registry.hl7.ambiguous", facility=facility, organizations=sorted(orgs))
            return None
        return next(iter(orgs), None)

    # --- DICOM ------------------------------------------------------------------------------

    def _dicom_entries(self) -> list[_DicomEntry]:
        def compute() -> list[_DicomEntry]:
            out = []
            for res in self._active_endpoints(DICOM_DIMSE):
                org_id = _managing_org(res)
                ep = _endpoint(res)
                if org_id is not None and ep.dicom is not None:
                    out.append(_DicomEntry(org_id, ep.id, ep.dicom))
            return out

        entries: list[_DicomEntry] = self._cached(("dicom",), compute)
        return entries

    def _host_matches(self, registered: str, peer: str) -> bool:
        if same_host(registered, peer):
            return True
        if not self.resolve_hosts or is_ip_literal(registered):
            return False
        return any(same_host(ip, peer) for ip in self._resolve(registered))

    def _resolve(self, host: str) -> tuple[str, ...]:
        def compute() -> tuple[str, ...]:
            try:
                infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            except (OSError, UnicodeError):
                return ()
            return tuple(dict.fromkeys(str(info[4][0]) for info in infos))

        ips: tuple[str, ...] = self._cached(("resolve", host.lower()), compute)
        return ips

    def mo_for_dicom_caller(
        self, ae_title: str, host: str, certificate: str | None = None
    ) -> RegisteredMo | None:
        """The MO whose active ``dicom-dimse`` Endpoint has this calling AE title and, if its
        address names a host, that host is ``host`` (the association's peer address).

        A registration naming the peer's host wins over one naming no host; if two MOs still
        qualify the caller is ambiguous and None is returned.

        With ``certificate`` (the SHA-256 fingerprint of the verified TLS client certificate
        the peer presented) the MO is the one with this AE title that registered that
        certificate, wherever the peer connects from (a clinic behind a changing address);
        a certificate no MO with this AE title registered identifies nobody.
        """
        ae = ae_title.strip()
        candidates = [
            e
            for e in self._dicom_entries()
            if e.address.ae_title == ae and self._mo_active(e.org_id)
        ]
        if certificate is not None:
            owners = {
                e.org_id
                for e in candidates
                if (mo := self.mo(e.org_id)) is not None and mo.has_certificate(certificate)
            }
            if len(owners) > 1:
                log.warning("registry.dicom.ambiguous", ae_title=ae, organizations=sorted(owners))
            return self.mo(next(iter(owners))) if len(owners) == 1 else None
        strong = {
            e.org_id
            for e in candidates
            if e.address.host is not None and self._host_matches(e.address.host, host)
        }
        weak = {e.org_id for e in candidates if e.address.host is None}
        for orgs in (strong, weak):
            if len(orgs) == 1:
                return self.mo(next(iter(orgs)))
            if len(orgs) > 1:
                log.warning("registry.dicom.ambiguous", ae_title=ae, organizations=sorted(orgs))
                return None
        return None

    def dicom_destination(self, ae_title: str, *, for_mo: str | None = None) -> Destination | None:
        """Where the C-MOVE destination ``ae_title`` listens (from an active
        ``dicom[+tls]://AE@host:port`` address); with ``for_mo``, that MO's own registration is
        preferred. None if unknown, without host and port, or ambiguous."""
        ae = ae_title.strip()
        found = [
            e
            for e in self._dicom_entries()
            if e.address.ae_title == ae
            and e.address.host
            and e.address.port
            and self._mo_active(e.org_id)
        ]
        if for_mo is not None and any(e.org_id == for_mo for e in found):
            found = [e for e in found if e.org_id == for_mo]
        targets = {
            Destination(e.address.host, e.address.port, e.address.tls)
            for e in found
            if e.address.host and e.address.port
        }
        if len(targets) > 1:
            log.warning("registry.dicom.destination_ambiguous", ae_title=ae)
            return None
        return next(iter(targets)) if targets else None

    def _mo_active(self, org_id: str) -> bool:
        return self.mo(org_id) is not None
