"""Access control over the stored records: what the policy table needs to know from the data.

:mod:`hie.hub.policy` decides from a principal and a few facts; this module finds the facts in
the resource store and keeps them cached until the records they come from change
(:meth:`~hie.hub.store.port.ResourceStore.change_marker`):

- **Consents** (:meth:`Access.denials`): what active patient Consents close to one MO. A
  ``deny`` provision naming the MO (``provision.actor``) or naming no organisation closes the
  patient's records to it: all of them, or only those carrying one of its
  ``provision.securityLabel`` codes (psychiatry, HIV, reproductive health, …). A ``permit``
  naming organisations but not this one closes everything ("only these MOs may see it").
- **Proxies** (:meth:`Access.proxy_for`): the people a patient may act for. A RelatedPerson of
  the person whose identifier is one of the caller's own (SNILS, OMS policy, …), active, is a
  proxy when its relationship is a parent's and the person is under
  :data:`~hie.hub.policy.PARENTAL_AGE`, or when the person's active Consent permits that
  RelatedPerson (``provision.actor``): a guardian, or the parent of an older child.
- **Sensitivity labels** (:func:`label_sensitive`): records coded with a sensitive diagnosis or
  test get the matching ``meta.security`` label when written, so a Consent that closes a
  category closes them.
- **Break-the-glass notices** (:meth:`Access.notify_break_glass`).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any

import orjson

from hie.fhir.dates import format_instant
from hie.fhir.search import escape_value, parse_search
from hie.hub.audit import AccessNote, AuditRecord
from hie.hub.auth import Forbidden, Principal
from hie.hub.memo import IdentityMemo
from hie.hub.policy import (
    ACT_CODE,
    CARE_ROLES,
    PARENT_RELATIONSHIPS,
    PARENTAL_AGE,
    ROLE_CODE,
    AccessPolicy,
    Denials,
    Grant,
    category,
    sensitive_labels,
)
from hie.hub.store.port import (
    IdCond,
    Query,
    ResourceStore,
    StoredResource,
    WriteTx,
    iter_search,
)
from hie.hub.store.sql import now_us

Json = dict[str, Any]
NOTIFICATION_SYSTEM = "https://hie.spb.ru/fhir/CodeSystem/notification"
# A remembered grant: the types whose changes it depends on (none: the policy table alone),
# their change markers and the date when it was made, and the grant.
_Remembered = tuple[tuple[str, ...], object, Grant]
# What a remembered grant may depend on besides the policy table (and the date).
_CONSENT_SOURCES = ("Consent",)
_ACTS_FOR_SOURCES = ("Consent", "RelatedPerson", "Patient")
# Where a resource type keeps the codes that can make it sensitive (top-level elements).
_CODED = ("code", "reasonCode", "conclusionCode", "category", "type", "diagnosis")


@dataclass(frozen=True, slots=True)
class _Consent:
    patient: str
    kind: str  # deny | permit
    actors: frozenset[str]  # references: Organization/…, RelatedPerson/…
    labels: tuple[str, ...]
    ends: str | None  # provision.period.end


def _load(stored: StoredResource) -> Json:
    return orjson.loads(stored.content or b"{}")  # type: ignore[no-any-return]


def _ref(value: Any, rtype: str) -> str | None:
    ref = str((value or {}).get("reference", "")) if isinstance(value, dict) else ""
    return ref.removeprefix(f"{rtype}/") if ref.startswith(f"{rtype}/") else None


def _consent(res: Json) -> _Consent | None:
    patient = _ref(res.get("patient"), "Patient")
    prov: Json = res["provision"] if isinstance(res.get("provision"), dict) else {}
    kind = str(prov.get("type") or "")
    if not patient or kind not in ("deny", "permit"):
        return None
    actors = frozenset(
        str((a.get("reference") or {}).get("reference", ""))
        for a in prov.get("actor") or []
        if isinstance(a, dict) and isinstance(a.get("reference"), dict)
    )
    labels = tuple(
        str(c.get("code"))
        for c in prov.get("securityLabel") or []
        if isinstance(c, dict) and c.get("system") == ACT_CODE and c.get("code")
    )
    period: Json = prov["period"] if isinstance(prov.get("period"), dict) else {}
    return _Consent(patient, kind, actors, labels, period.get("end"))


def _current(c: _Consent, today: str) -> bool:
    return c.ends is None or str(c.ends)[:10] >= today


def codings(res: Json) -> Iterator[tuple[str | None, str]]:
    """The (system, code) pairs of a resource's top-level coded elements."""
    for name in _CODED:
        value = res.get(name)
        for concept in value if isinstance(value, list) else [value]:
            if not isinstance(concept, dict):
                continue
            inner = concept.get("condition") if name == "diagnosis" else None
            if isinstance(inner, dict):  # Encounter.diagnosis.condition is a reference
                continue
            for coding in concept.get("coding") or []:
                if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                    yield coding.get("system"), coding["code"]


def label_sensitive(res: Json) -> None:
    """Add ``meta.security`` labels for the sensitive categories the record's codes flag
    (what the sender labelled stays)."""
    if category(str(res.get("resourceType"))) != "clinical":
        return
    labels = sensitive_labels(codings(res))
    if not labels:
        return
    meta = res.setdefault("meta", {})
    have = {(s.get("system"), s.get("code")) for s in meta.get("security") or []}
    extra = [{"system": ACT_CODE, "code": lb} for lb in labels if (ACT_CODE, lb) not in have]
    if extra:
        meta["security"] = [*(meta.get("security") or []), *extra]


# Elements that name the organisation a record comes from (FHIR R4): an MO writes only records
# whose source organisation, where named, is itself.
AUTHOR_ORGANISATION: dict[str, tuple[tuple[str, ...], ...]] = {
    "Patient": (("managingOrganization",),),
    "Encounter": (("serviceProvider",),),
    "Observation": (("performer",),),
    "DiagnosticReport": (("performer",), ("resultsInterpreter",)),
    "DocumentReference": (("custodian",), ("author",)),
    "Immunization": (("performer", "actor"),),
    "MedicationRequest": (("requester",),),
    "ServiceRequest": (("requester",),),
    "Condition": (("recorder",), ("asserter",)),
    "AllergyIntolerance": (("recorder",), ("asserter",)),
    "ImagingStudy": (("referrer",),),
    "Specimen": (("collection", "collector"),),
    "Provenance": (("agent", "who"), ("agent", "onBehalfOf")),
}


def _walk(value: Any, path: tuple[str, ...]) -> Iterator[Any]:
    if not path:
        yield value
        return
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, dict) and path[0] in item:
            yield from _walk(item[path[0]], path[1:])


def check_author(org: str, res: Json) -> None:
    """Refuse a record an MO writes in another organisation's name (:class:`Forbidden`)."""
    rtype = str(res.get("resourceType"))
    for path in AUTHOR_ORGANISATION.get(rtype, ()):
        for ref in _walk(res, path):
            for one in ref if isinstance(ref, list) else [ref]:
                other = _ref(one, "Organization")
                if other is not None and other != org:
                    where = ".".join((rtype, *path))
                    raise Forbidden(
                        f"{where} names Organization/{other}: an MO writes only its own "
                        f"records (this token is for Organization/{org})"
                    )


class Access:
    """The policy applied to one resource store, with the facts it needs cached."""

    def __init__(self, store: ResourceStore, policy: AccessPolicy) -> None:
        self.store = store
        self.policy = policy
        self._lock = threading.Lock()
        self._consents: tuple[object, list[_Consent]] | None = None
        self._denials: dict[str | None, tuple[object, Denials]] = {}
        self._proxies: dict[str, tuple[object, frozenset[str]]] = {}
        # (principal, type, permission) -> (what it depends on, under which generation, grant)
        self._grants: dict[tuple[Principal, str | None, str], _Remembered] = {}
        self._recent: IdentityMemo[_Remembered] = IdentityMemo(10_000)

    def grant(self, p: Principal, resource_type: str | None, permission: str) -> Grant:
        """The policy's grant for ``p``, with the Consents and proxies that concern it.
        A grant that depends on them is remembered until a Consent (for a patient acting
        for someone: also a RelatedPerson or Patient) changes, or the day does (a Consent's
        period ends on a date); the others are the policy table's alone, remembered as they
        are. The token cache hands a principal's requests one object, so they find their
        grant by its identity (:class:`~hie.hub.memo.IdentityMemo`) before its value."""
        kind = (resource_type, permission)
        hit = self._recent.get(kind, p)
        if hit is None:
            with self._lock:
                hit = self._grants.get((p, resource_type, permission))
            if hit is not None:  # an equal principal (another token of the same person)
                self._recent.put(hit, kind, p)
        if hit is not None:
            sources, generation, grant = hit
            if not sources or generation == self._generation(sources):
                return grant
        consents = (
            permission in "rs"
            and p.has_role(*CARE_ROLES)
            and not p.has_role("service")
            and category(resource_type or "Patient") == "clinical"
        )
        acts_for = bool(p.person and p.patient and p.person != p.patient)
        sources = _ACTS_FOR_SOURCES if acts_for else _CONSENT_SOURCES if consents else ()
        generation = self._generation(sources) if sources else None
        grant = self.policy.grant(
            p,
            resource_type,
            permission,
            denied=self.denials(p.org) if consents else Denials(),
            proxy_for=self.proxy_for(p.person) if acts_for and p.person else frozenset(),
        )
        entry = (sources, generation, grant)
        with self._lock:
            if len(self._grants) > 10_000:
                self._grants.clear()
            self._grants[(p, resource_type, permission)] = entry
        self._recent.put(entry, kind, p)
        return grant

    def _generation(self, sources: tuple[str, ...]) -> tuple[object, ...]:
        """What a grant depending on ``sources`` is remembered under: the date, and their
        change markers (read before the grant is made, so a change meanwhile only makes the
        next request make it again)."""
        return (date.today(), *map(self.store.change_marker, sources))

    # --- consents ---------------------------------------------------------------------------

    def _all_consents(self) -> tuple[object, list[_Consent]]:
        generation = self.store.change_marker("Consent")
        with self._lock:
            if self._consents is not None and self._consents[0] == generation:
                return self._consents
        found: list[_Consent] = []
        q = parse_search("Consent", [("status", "active")], default_count=1000, max_count=1000)
        for stored in iter_search(self.store, q.query):
            c = _consent(_load(stored))
            if c is not None:
                found.append(c)
        with self._lock:
            self._consents = (generation, found)
            self._denials.clear()
        return generation, found

    def denials(self, org: str | None) -> Denials:
        """What active Consents close to MO ``org`` (see the module docstring)."""
        generation, consents = self._all_consents()
        with self._lock:
            hit = self._denials.get(org)
            if hit is not None and hit[0] == generation:
                return hit[1]
        me = f"Organization/{org}"
        today = date.today().isoformat()
        whole: dict[str, None] = {}
        labelled: dict[str, dict[str, None]] = {}
        for c in consents:
            if not _current(c, today):
                continue
            orgs = {a for a in c.actors if a.startswith("Organization/")}
            if c.kind == "deny" and (not orgs or me in orgs):
                if c.labels:
                    for label in c.labels:
                        labelled.setdefault(label, {})[c.patient] = None
                else:
                    whole[c.patient] = None
            elif c.kind == "permit" and orgs and me not in orgs:
                whole[c.patient] = None
        result = Denials(
            tuple(sorted(whole)),
            tuple((lb, tuple(sorted(p))) for lb, p in sorted(labelled.items())),
        )
        with self._lock:
            if len(self._denials) > 10_000:
                self._denials.clear()
            self._denials[org] = (generation, result)
        return result

    # --- proxies ----------------------------------------------------------------------------

    def proxy_for(self, person: str) -> frozenset[str]:
        """The patients ``person`` (a Patient id: the caller's own record) may act for."""
        generation = tuple(
            self.store.change_marker(t) for t in ("RelatedPerson", "Consent", "Patient")
        )
        with self._lock:
            hit = self._proxies.get(person)
            if hit is not None and hit[0] == generation:
                return hit[1]
        result = frozenset(self._find_proxied(person))
        with self._lock:
            if len(self._proxies) > 10_000:
                self._proxies.clear()
            self._proxies[person] = (generation, result)
        return result

    def _find_proxied(self, person: str) -> Iterator[str]:
        me = self.store.read("Patient", person)
        if me is None or me.deleted:
            return
        idents = [
            f"{escape_value(str(i['system']))}|{escape_value(str(i['value']))}"
            for i in _load(me).get("identifier") or []
            if isinstance(i, dict) and i.get("system") and i.get("value")
        ]
        if not idents:
            return
        q = parse_search(
            "RelatedPerson", [("identifier", ",".join(idents))], default_count=100, max_count=100
        )
        _, consents = self._all_consents()
        today = date.today()
        for stored in iter_search(self.store, q.query):
            rp = _load(stored)
            whom = _ref(rp.get("patient"), "Patient")
            if not whom or rp.get("active") is False:
                continue
            codes = {
                str(c.get("code"))
                for r in rp.get("relationship") or []
                for c in (r.get("coding") or [] if isinstance(r, dict) else [])
                if isinstance(c, dict) and c.get("system") == ROLE_CODE
            }
            if codes & PARENT_RELATIONSHIPS and self._under_age(whom, today):
                yield whom
                continue
            me_ref = f"RelatedPerson/{stored.id}"
            if any(
                c.patient == whom and c.kind == "permit" and me_ref in c.actors
                for c in consents
                if _current(c, today.isoformat())
            ):
                yield whom

    def _under_age(self, patient: str, today: date) -> bool:
        child = self.store.read("Patient", patient)
        if child is None or child.deleted:
            return False
        born = str(_load(child).get("birthDate") or "")
        try:
            birth = date.fromisoformat(born[:10]) if len(born) >= 10 else None
        except ValueError:
            return False
        if birth is None:
            return False
        age = today.year - birth.year - ((today.month, today.day) < (birth.month, birth.day))
        return age < PARENTAL_AGE

    # --- break the glass --------------------------------------------------------------------

    def beyond_usual(self, p: Principal, patients: Iterable[str]) -> list[str]:
        """The ``patients`` whose records ``p`` could not have read without breaking the
        glass (their Patient record lies outside ``p``'s usual grant)."""
        wanted = sorted(set(patients))
        if not wanted:
            return []
        usual = dataclasses.replace(p, purpose=None, purpose_reason=None)
        grant = self.grant(usual, "Patient", "r")
        q = Query("Patient", [IdCond(tuple(wanted)), *grant.conds], count=len(wanted))
        seen = {r.id for r in self.store.search(q).items}
        return [w for w in wanted if w not in seen]

    def notify_break_glass(
        self,
        p: Principal,
        note: AccessNote,
        rec: AuditRecord,
        write: Callable[[WriteTx, Json, str, str, int], object],
        new_id: Callable[[], str],
    ) -> None:
        """After an emergency access: a Communication to each patient whose records it
        opened beyond the usual grant (the portal shows it), saying who looked, from which
        MO, when and why."""
        touched = self.beyond_usual(p, note.patients)
        if not touched:
            return
        when = now_us()
        who = rec.practitioner and f"Practitioner/{rec.practitioner}"
        text = (
            f"Экстренный доступ к вашей медицинской карте (break-the-glass): "
            f"{'/'.join(rec.roles)}{f', МО {rec.org}' if rec.org else ''}; причина: {rec.reason}. "
            f"Запись журнала аудита AuditEvent/{rec.seq}. / Emergency access to your record: "
            f"reason given: {rec.reason}."
        )
        with self.store.transaction() as tx:
            for pid in touched:
                msg: Json = {
                    "resourceType": "Communication",
                    "status": "completed",
                    "category": [
                        {"coding": [{"system": NOTIFICATION_SYSTEM, "code": "break-the-glass"}]}
                    ],
                    "subject": {"reference": f"Patient/{pid}"},
                    "recipient": [{"reference": f"Patient/{pid}"}],
                    "sent": format_instant(when),
                    "payload": [{"contentString": text}],
                    "about": [{"reference": f"AuditEvent/{rec.seq}"}],
                }
                if who:
                    msg["sender"] = {"reference": who}
                write(tx, msg, "Communication", new_id(), when)
