"""Lab results and orders into the integrated record: the operations the MLLP listener calls.

:meth:`LabIntake.ingest_order` stores an ORM^O01 / OML^O21 from a clinic (a new order, or a
change of its status). :meth:`LabIntake.ingest_result` takes one ORU^R01, already parsed and
from a registered MO, and returns what its acknowledgement must say (:class:`LabResult`).
What it does, in order:

1. maps the message (:func:`hie.lab_exchange.oru.map_oru`): invalid content is ``AE`` with the
   problems located for ERR segments, and nothing is written;
2. checks the codes of reports and results against the reference data (LOINC, the MO's local
   lab code list): an unknown code is accepted, warned about in the ACK (ERR severity W, 103)
   and counted (``hie_unknown_codes_total``);
3. **idempotency**: the message is recorded as a MessageHeader whose id is derived from the
   sending facility and MSH-10, with the digest of its bytes. The same message again is
   ``AA`` and changes nothing; another message under a control id already used is ``AR``
   (205, duplicate key) and is not stored;
4. writes everything in **one transaction**, as the sending MO (the records are its own):
   the patient (found by the MO's number for them, or created and matched by the master
   patient index), the order (found by its placer or filler number, or created from the
   OBR so the result always has one: a later order with the same numbers updates it), the
   specimens, the report and its results (each updated in place by its identifier, so a
   re-sent or corrected result is a new version, never a duplicate), and the MessageHeader.
   The answer is ``AA`` only after that commit.

Critical results are not handled here: the alerting consumer reads committed reports from the
outbox (:mod:`hie.lab_exchange.alerts`), so the ACK never waits for it.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from hie.adapters.hl7v2 import (
    APPLICATION_INTERNAL_ERROR,
    TABLE_VALUE_NOT_FOUND,
    Hl7Problem,
    Message,
    MessageHeader,
)
from hie.fhir.search import escape_value, parse_search
from hie.fhir.service import FhirService
from hie.hub.auth import HUB, Principal, Scope, acting_as
from hie.hub.errors import HieError
from hie.hub.logging import get_logger
from hie.hub.store.sql import now_us
from hie.lab_exchange.orders import OrderMessage, map_order
from hie.lab_exchange.oru import (
    LAB_NAMESPACE,
    Entry,
    LabContext,
    LabReport,
    OruMessage,
    map_oru,
    practitioner_reference,
)
from hie.registries.senders import RegisteredMo, SenderRegistry

log = get_logger("hie.lab")

Json = dict[str, Any]
# HL7 table 0357: 205 duplicate key identifier.
DUPLICATE_KEY: str = "205"
DIGEST_SYSTEM = "https://hie.spb.ru/fhir/CodeSystem/message-digest"
LOCAL_LAB_CODES = "https://hie.spb.ru/fhir/CodeSystem/lab-local/"
V2_EVENT = "http://terminology.hl7.org/CodeSystem/v2-0003"
# ORC-1 order controls that carry a whole order (new, or a replacement of one)
NEW_ORDER = frozenset({"NW", "XO", "RO", "SN", "PA"})
# HL7 table 0357: 204 unknown key identifier
UNKNOWN_KEY = "204"
# meta.tag of an order the hub made from a result that arrived before its order
ORDER_ORIGIN = "https://hie.spb.ru/fhir/CodeSystem/lab-order-origin"


@dataclass(slots=True)
class LabResult:
    """What one lab message did, and what its ACK says (MSA-1 and the ERR segments)."""

    ack_code: Literal["AA", "AE", "AR"]
    errors: list[Hl7Problem] = field(default_factory=list)
    warnings: list[Hl7Problem] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)  # DiagnosticReport ids written
    duplicate: bool = False  # the same message again: acknowledged, nothing written
    critical: int = 0  # critical results among them (alerts follow from the outbox)


def mo_principal(mo: RegisteredMo, via: str) -> Principal:
    """The principal a registered MO's system acts as over a non-HTTP channel (MLLP, DICOM):
    role ``mis`` for that MO, so what it writes is its own (access policy, issue #5)."""
    return Principal(
        subject=f"{via}:{mo.id}",
        roles=frozenset({"mis"}),
        org=mo.id,
        scopes=(Scope("system", "*", frozenset("cruds")),),
        issuer=via,
        name=mo.name,
    )


def message_id(facility: str, control_id: str) -> str:
    """The MessageHeader id of a message: one per sending facility and MSH-10."""
    return str(uuid.uuid5(LAB_NAMESPACE, f"message|{facility}|{control_id}"))


class LabIntake:
    """ORU^R01 → the integrated record (see the module docstring)."""

    def __init__(
        self,
        svc: FhirService,
        senders: SenderRegistry | None = None,
    ) -> None:
        self.svc = svc
        self.senders = senders or SenderRegistry(svc.store)
        self._lock = threading.Lock()
        self._practitioners: dict[tuple[Any, ...], Json | None] = {}
        self._directory_marker: tuple[object, ...] = ()

    def ingest_result(self, raw: bytes, msg: Message, mo: RegisteredMo) -> LabResult:
        """Apply one ORU^R01 from ``mo``; never raises for anything a sender can send
        (header problems are the caller's: it parsed the message)."""
        oru = map_oru(
            msg,
            local_code_system=LOCAL_LAB_CODES + mo.id,
            default_system=mo.patient_id_system,
            system_for_authority=self._system_for_authority,
            organization=mo.reference,
        )
        if oru.errors:
            return LabResult("AE", list(oru.errors), list(oru.warnings))
        result = LabResult("AA", warnings=[*oru.warnings, *self._check_codes(oru)])
        with acting_as(mo_principal(mo, "mllp")):
            answer = self._store(
                raw, msg, mo, result, lambda mid, digest: self._bundle(oru, msg, mo, mid, digest)
            )
        if answer is None:
            return result
        result.reports = [
            str(e["response"]["location"]).split("/")[1]
            for e in answer["entry"]
            if str((e.get("response") or {}).get("location", "")).startswith("DiagnosticReport/")
        ]
        result.critical = sum(len(r.critical) for p in oru.patients for r in p.reports)
        log.info("lab.stored", mo=mo.id, reports=len(result.reports), critical=result.critical)
        return result

    def ingest_order(self, raw: bytes, msg: Message, mo: RegisteredMo) -> LabResult:
        """Apply one ORM^O01 or OML^O21 from ``mo`` (the ordering clinic): a new order is
        stored (its ServiceRequest keyed by the placer number, and a Task for the lab's
        workflow); a cancel, hold or release changes the status of the stored order. Results
        that arrived before their order are linked to it afterwards."""
        lab = self.senders.mo_for_hl7_sender(None, msg.header.receiving_facility)
        om = map_order(
            msg,
            local_code_system=LOCAL_LAB_CODES + mo.id,
            default_system=mo.patient_id_system,
            system_for_authority=self._system_for_authority,
            performer=lab.reference if lab is not None else None,
        )
        if om.errors:
            return LabResult("AE", list(om.errors), list(om.warnings))
        result = LabResult("AA", warnings=list(om.warnings))
        with acting_as(mo_principal(mo, "mllp")):
            try:
                answer = self._store(
                    raw,
                    msg,
                    mo,
                    result,
                    lambda mid, digest: self._order_bundle(om, mo, mid, digest),
                )
            except Hl7Problem as problem:
                return LabResult("AE", [problem], result.warnings)
        if answer is not None:
            self._link_earlier_results(om)
        log.info("lab.order", mo=mo.id, orders=len(om.orders), code=result.ack_code)
        return result

    def _store(
        self,
        raw: bytes,
        msg: Message,
        mo: RegisteredMo,
        result: LabResult,
        build: Callable[[str, str], Json],
    ) -> Json | None:
        """Idempotency, then the transaction ``build`` makes (as the current principal).
        None when nothing was written (a repeat, or a refusal recorded in ``result``)."""
        header = msg.header
        mid = message_id(header.sending_facility, header.control_id)
        digest = hashlib.sha256(raw).hexdigest()
        seen = self.svc.store.read("MessageHeader", mid)
        if seen is not None and not seen.deleted:
            again = self._again(seen.content, digest, result)
            result.ack_code, result.errors, result.duplicate = (
                again.ack_code,
                again.errors,
                again.duplicate,
            )
            if again.ack_code != "AA":
                result.warnings = []
            return None
        bundle = build(mid, digest)
        try:
            return self.svc.transaction(bundle, "", validated=True)
        except HieError as err:
            # refused by the policy or the store (another MO's record, an ambiguous number):
            # nothing was written; the sender hears why
            log.info("lab.refused", code=err.code, mo=mo.id)
            result.ack_code = "AE"
            result.errors = [Hl7Problem(APPLICATION_INTERNAL_ERROR, err.message, "MSH", 1)]
            return None

    # --- steps ----------------------------------------------------------------------------

    def _system_for_authority(self, namespace: str) -> str | None:
        """A CX.4 namespace naming a registered MO (by its HL7 facility) → that MO's system."""
        other = self.senders.mo_for_hl7_sender(None, namespace)
        return other.patient_id_system if other is not None else None

    def _check_codes(self, oru: OruMessage) -> list[Hl7Problem]:
        """Warnings (103, ERR severity W) for report and result codes the reference data
        does not know; the records are stored all the same."""
        out: list[Hl7Problem] = []
        seen: set[str] = set()
        for group in oru.patients:
            for rep in group.reports:
                for entry, segment, field_no in (
                    (rep.report, "OBR", 4),
                    *((o, "OBX", 3) for o in rep.observations),
                ):
                    for _system, message in self.svc.unknown_codes(entry.resource):
                        if message in seen:
                            continue
                        seen.add(message)
                        out.append(
                            Hl7Problem(
                                TABLE_VALUE_NOT_FOUND,
                                f"{segment}-{field_no}: {message}; stored and flagged",
                                segment,
                                1,
                                field_no,
                            )
                        )
        return out

    def _again(self, content: bytes | None, digest: str, result: LabResult) -> LabResult:
        """A control id already stored: the same bytes are acknowledged again, anything
        else under that id is refused."""
        tags = (orjson.loads(content or b"{}").get("meta") or {}).get("tag") or []
        stored = next((t.get("code") for t in tags if t.get("system") == DIGEST_SYSTEM), None)
        if stored == digest:
            result.duplicate = True
            return result
        return LabResult(
            "AR",
            [
                Hl7Problem(
                    DUPLICATE_KEY,
                    "MSH-10: this message control id was already used by this sending facility "
                    "for a different message; send new content under a new control id",
                    "MSH",
                    1,
                    10,
                    reject=True,
                )
            ],
        )

    def _bundle(
        self, oru: OruMessage, msg: Message, mo: RegisteredMo, mid: str, digest: str
    ) -> Json:
        """The transaction that stores the message (see the module docstring, step 4)."""
        entries: list[Json] = []
        requesters = self._requesters(msg, mo)
        focus: list[Json] = []
        n = 0
        for group in oru.patients:
            entries.append(_create_once(group.patient))
            for rep in group.reports:
                order_url = self._order(rep, group.patient, requesters, n, entries)
                n += 1
                for entry in (*rep.specimens, rep.report, *rep.observations):
                    res = dict(entry.resource)
                    if "basedOn" in res:
                        res["basedOn"] = [{"reference": order_url}]
                    entries.append(_upsert(entry, res))
                focus.append({"reference": rep.report.full_url})
        entries.append(_message_header(msg.header, mo, mid, digest, focus))
        return {"resourceType": "Bundle", "type": "transaction", "entry": entries}

    def _order_bundle(self, om: OrderMessage, mo: RegisteredMo, mid: str, digest: str) -> Json:
        """The transaction that stores an order message."""
        entries: list[Json] = []
        if om.patient is not None:
            entries.append(_create_once(om.patient))
        focus: list[Json] = []
        for n, order in enumerate(om.orders):
            sr = dict(order.service_request.resource)
            if sr.get("requester"):
                sr["requester"] = self._resolve_practitioner(sr["requester"])
            if order.control in NEW_ORDER:
                entries += [_upsert(s, s.resource) for s in order.specimens]
                entries.append(_upsert(order.service_request, sr))
                entries.append(_upsert(order.task, order.task.resource))
                focus.append({"reference": order.service_request.full_url})
                continue
            # a change of an order the hub has: its status, the rest as stored
            found = self._find_order(order.placer, order.filler)
            if found is None:
                raise Hl7Problem(
                    UNKNOWN_KEY,
                    f"ORC-2/ORC-3: order control {order.control} names an order the hub does "
                    "not have; send the order first",
                    "ORC",
                    n + 1,
                    2,
                )
            stored = self.svc.store.read("ServiceRequest", found)
            assert stored is not None
            current = orjson.loads(stored.content or b"{}")
            current["status"] = sr.get("status", current.get("status"))
            entries.append(
                {
                    "resource": current,
                    "request": {"method": "PUT", "url": f"ServiceRequest/{found}"},
                }
            )
            focus.append({"reference": f"ServiceRequest/{found}"})
        entries.append(_message_header(om.header, mo, mid, digest, focus))
        return {"resourceType": "Bundle", "type": "transaction", "entry": entries}

    def _link_earlier_results(self, om: OrderMessage) -> None:
        """Results that arrived before their order point at an order the hub made from them:
        the hub (keeping the links, like the patient index) adds the clinic's order to their
        ``basedOn``."""
        with acting_as(HUB):
            for order in om.orders:
                if order.control not in NEW_ORDER or not order.placer:
                    continue
                found = self._search("ServiceRequest", [("identifier", _token(order.placer))], 10)
                sent = [r for r in found if not _from_result(r)]
                made = [r for r in found if _from_result(r)]
                if not sent or not made:
                    continue
                target = {"reference": f"ServiceRequest/{sent[0].id}"}
                when = now_us()
                with self.svc.store.transaction() as tx:
                    for placeholder in made:
                        reports = self._search(
                            "DiagnosticReport",
                            [("based-on", f"ServiceRequest/{placeholder.id}")],
                            100,
                        )
                        for rep in reports:
                            res = orjson.loads(rep.content or b"{}")
                            if target not in res.get("basedOn", []):
                                res["basedOn"] = [*res.get("basedOn", []), target]
                                self.svc.write_internal(tx, res, "DiagnosticReport", rep.id, when)

    def _requesters(self, msg: Message, mo: RegisteredMo) -> list[Json | None]:
        """The ordering provider of each OBR (OBR-16, else ORC-12), resolved in the
        practitioner registry where it is known (a PractitionerRole names their MO)."""
        ctx = LabContext.of(msg, LOCAL_LAB_CODES + mo.id)
        out: list[Json | None] = []
        orc = None
        for seg in msg.segments:
            if seg.name == "ORC":
                orc = seg
            elif seg.name == "OBR":
                ref = practitioner_reference(ctx, seg, 16)
                if ref is None and orc is not None:
                    ref = practitioner_reference(ctx, orc, 12)
                out.append(self._resolve_practitioner(ref))
                orc = None
        return out

    def _resolve_practitioner(self, ref: Json | None) -> Json | None:
        """The registry's PractitionerRole (or Practitioner) for an identifier reference;
        cached until the practitioner directory changes."""
        ident = (ref or {}).get("identifier")
        if not ident:
            return ref
        marker = tuple(
            self.svc.store.change_marker(t) for t in ("Practitioner", "PractitionerRole")
        )
        key = (ident["system"], ident["value"], (ref or {}).get("display"))
        with self._lock:
            if self._directory_marker != marker:
                self._practitioners.clear()
                self._directory_marker = marker
            if key in self._practitioners:
                return self._practitioners[key]
        found = self._lookup_practitioner(ref or {}, ident)
        with self._lock:
            if len(self._practitioners) > 50_000:
                self._practitioners.clear()
            self._practitioners[key] = found
        return found

    def _lookup_practitioner(self, ref: Json, ident: Json) -> Json | None:
        token = f"{escape_value(ident['system'])}|{escape_value(ident['value'])}"
        found = self._search("Practitioner", [("identifier", token)], 2)
        if len(found) != 1:
            return ref
        pid = found[0].id
        roles = self._search(
            "PractitionerRole", [("practitioner", f"Practitioner/{pid}"), ("active", "true")], 1
        )
        target = f"PractitionerRole/{roles[0].id}" if roles else f"Practitioner/{pid}"
        out: Json = {"reference": target}
        if ref and ref.get("display"):
            out["display"] = ref["display"]
        return out

    def _search(self, rtype: str, items: list[tuple[str, str]], count: int) -> list[Any]:
        """Current resources matching ``items`` (directory lookups; no principal needed)."""
        q = parse_search(rtype, items, default_count=count, max_count=count).query
        return list(self.svc.store.search(q).items)

    def _order(
        self,
        rep: LabReport,
        patient: Entry,
        requesters: list[Json | None],
        n: int,
        entries: list[Json],
    ) -> str:
        """The order the report answers (a reference): the clinic's order found by its
        placer number, else by the filler number; else one made from the OBR, tagged as
        such, which a later order with the same numbers takes over (:meth:`ingest_order`)."""
        found = self._find_order(rep.placer, rep.filler)
        if found is not None:
            return f"ServiceRequest/{found}"
        number = rep.filler or rep.placer or {}
        name = f"ServiceRequest|{number.get('system')}|{number.get('value')}"
        url = "urn:uuid:" + str(uuid.uuid5(LAB_NAMESPACE, name))
        order: Json = {
            "resourceType": "ServiceRequest",
            "meta": {"tag": [{"system": ORDER_ORIGIN, "code": "from-result"}]},
            "identifier": [i for i in (rep.placer, rep.filler) if i],
            "status": "completed" if rep.report.resource.get("status") == "final" else "active",
            "intent": "order",
            "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "108252007"}]}],
            "code": rep.report.resource.get("code"),
            "subject": {"reference": patient.full_url},
        }
        requester = requesters[n] if n < len(requesters) else None
        if requester:
            order["requester"] = requester
        key = _token(number)
        entries.append(
            {
                "fullUrl": url,
                "resource": order,
                "request": {
                    "method": "POST",
                    "url": "ServiceRequest",
                    "ifNoneExist": f"identifier={key}",
                },
            }
        )
        return url

    def _find_order(self, placer: Json | None, filler: Json | None) -> str | None:
        """The id of the order with these numbers, preferring one a clinic sent over one
        made from an earlier result. Linking results to orders is the hub's work (like the
        patient index's), so it looks across senders; the reference reveals no content."""
        numbers = [(str(n.get("system")), str(n.get("value"))) for n in (placer, filler) if n]
        if not numbers:
            return None
        hits = self.svc.store.ids_by_token("ServiceRequest", "identifier", numbers)
        ids = list(dict.fromkeys(i for n in numbers for i in hits[n]))[:10]
        if not ids:  # a new order: the usual case, one prepared query
            return None
        found = sorted(
            self.svc.store.read_many([("ServiceRequest", i) for i in ids]),
            key=lambda r: r.rid or 0,
        )
        sent = [r for r in found if not _from_result(r)]
        return str((sent or found)[0].id) if found else None


def _message_header(
    header: MessageHeader, mo: RegisteredMo, mid: str, digest: str, focus: list[Json]
) -> Json:
    """The transaction entry recording the message: what arrived, from whom, its digest."""
    res: Json = {
        "resourceType": "MessageHeader",
        "id": mid,
        "meta": {"tag": [{"system": DIGEST_SYSTEM, "code": digest}]},
        "eventCoding": {"system": V2_EVENT, "code": header.trigger_event or "R01"},
        "source": {"endpoint": f"urn:hl7v2:{header.sending_facility}"},
        "sender": {"reference": mo.reference},
    }
    if header.sending_application:
        res["source"]["name"] = header.sending_application
    if focus:
        res["focus"] = focus
    return {"resource": res, "request": {"method": "PUT", "url": f"MessageHeader/{mid}"}}


def _token(ident: Json) -> str:
    """``system|value`` of an Identifier, escaped for a search."""
    return f"{escape_value(str(ident.get('system')))}|{escape_value(str(ident.get('value')))}"


def _from_result(stored: Any) -> bool:
    tags = (orjson.loads(stored.content or b"{}").get("meta") or {}).get("tag") or []
    return any(t.get("system") == ORDER_ORIGIN for t in tags)


def _create_once(entry: Entry) -> Json:
    """An entry that creates the resource unless one with its identifier exists."""
    out: Json = {"fullUrl": entry.full_url, "resource": entry.resource}
    if entry.identifier:
        out["request"] = {
            "method": "POST",
            "url": entry.resource_type,
            "ifNoneExist": f"identifier={_token(entry.identifier)}",
        }
    else:
        out["request"] = {"method": "POST", "url": entry.resource_type}
    return out


def _upsert(entry: Entry, res: Json) -> Json:
    """An entry that updates the resource with the entry's identifier (or creates it)."""
    key = _token(entry.identifier or {"system": "", "value": ""})
    return {
        "fullUrl": entry.full_url,
        "resource": res,
        "request": {"method": "PUT", "url": f"{entry.resource_type}?identifier={key}"},
    }
