"""HL7 v2 lab orders (ORM^O01, OML^O21) → FHIR R4 ServiceRequest and Task (pure functions).

:func:`map_order` takes a message parsed by :func:`hie.adapters.hl7v2.parse` and returns an
:class:`OrderMessage`: the PID's Patient (as :mod:`hie.lab_exchange.oru` maps it) and per ORDER
group (ORC with its OBR) a :class:`LabOrder` — the ServiceRequest, the Task that puts it on the
laboratory's work list, and the Specimens (SPM in OML; OBR-15 in ORM before v2.5).

The ServiceRequest is keyed by the placer order number (ORC-2, else OBR-2; the filler number
ORC-3/OBR-3 when there is none), in the system :func:`~hie.lab_exchange.oru.entity_system` gives
— the same one a lab's ORU uses for OBR-2, so the DiagnosticReport's ``basedOn`` identifier finds
this ServiceRequest. Both numbers are identifiers typed PLAC/FILL. The Task carries the same
identifier (a Task is looked up by type, so there is no clash) and ``focus`` is the
ServiceRequest's ``urn:uuid:``.

ORC-1 (order control, table 0119) with ORC-5 (order status, table 0038) decide the status:
NW → active, CA/OC/CR/DC/OD/DR → revoked, HD/OH → on-hold, RL → active, and SC/XO/XX/RE/OK by
ORC-5 (CM → completed, CA/DC → revoked, HD → on-hold, IP/SC/A → active). :attr:`LabOrder.control`
keeps ORC-1: for a cancel or a hold the caller changes the status of the ServiceRequest it has
rather than replacing it with this one (which carries only what the message sent).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Final

from hie.adapters.hl7v2 import (
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    TABLE_VALUE_NOT_FOUND,
    Hl7Problem,
    Message,
    Segment,
    check_header,
    latest_today,
)
from hie.lab_exchange.oru import (
    ICD10_SYSTEM,
    SNOMED,
    Entry,
    LabContext,
    MappedMessage,
    codeable_concept,
    full_url,
    internal_error,
    key_of,
    map_patient,
    no_authority,
    order_number,
    practitioner_reference,
    specimens_of,
)

ORDER_MESSAGES: Final = {"ORM": ("O01",), "OML": ("O21",)}

TASK_CODE_SYSTEM: Final = "http://hl7.org/fhir/CodeSystem/task-code"
# FHIR's example category for lab requests (servicerequest-category): SNOMED CT 108252007.
_LAB_CATEGORY: Final = {
    "coding": [{"system": SNOMED, "code": "108252007", "display": "Laboratory procedure"}]
}

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class LabOrder:
    """One ORDER group: the ServiceRequest, its Task and Specimens.

    ``control`` is ORC-1 (NW new, CA cancel, HD hold, …); ``placer`` and ``filler`` are the
    order numbers as Identifiers (type PLAC / FILL).
    """

    service_request: Entry
    task: Entry
    specimens: list[Entry]
    control: str
    placer: Json | None
    filler: Json | None


@dataclass(frozen=True, slots=True)
class OrderMessage(MappedMessage):
    """A mapped ORM^O01 or OML^O21: the patient and the orders."""

    patient: Entry | None
    orders: list[LabOrder]

    def entries(self) -> list[Entry]:
        """Every resource: the patient, then each order's specimens, ServiceRequest and Task."""
        out: list[Entry] = [self.patient] if self.patient else []
        for order in self.orders:
            out += [*order.specimens, order.service_request, order.task]
        return out


# ORC-1 order control (table 0119) → ServiceRequest.status; None: ORC-5 decides.
_CONTROL_STATUS: Final[dict[str, str | None]] = {
    "NW": "active",
    "OK": "active",
    "RL": "active",
    "CH": "active",
    "PA": "active",
    "RO": "active",
    "CA": "revoked",
    "OC": "revoked",
    "CR": "revoked",
    "DC": "revoked",
    "OD": "revoked",
    "DR": "revoked",
    "HD": "on-hold",
    "OH": "on-hold",
    "SC": None,
    "XO": None,
    "XX": None,
    "XR": None,
    "RE": None,
    "SN": None,
}
# ORC-5 order status (table 0038) → ServiceRequest.status.
_ORDER_STATUS: Final = {
    "CM": "completed",
    "CA": "revoked",
    "DC": "revoked",
    "RP": "revoked",
    "HD": "on-hold",
    "IP": "active",
    "SC": "active",
    "A": "active",
    "ER": "entered-in-error",
}
# ServiceRequest.status → the Task's (the lab's work item follows the request).
_TASK_STATUS: Final = {
    "active": "requested",
    "on-hold": "on-hold",
    "revoked": "cancelled",
    "completed": "completed",
    "entered-in-error": "entered-in-error",
}
# TQ1-9 / TQ.6 priority (table 0485) → ServiceRequest.priority.
_PRIORITY: Final = {
    "S": "stat",
    "A": "asap",
    "R": "routine",
    "P": "urgent",  # preoperative
    "T": "urgent",  # timing critical
    "C": "routine",  # callback
}


@dataclass(slots=True)
class _Order:
    orc: Segment
    obr: Segment | None = None
    tq1: Segment | None = None
    dg1: list[Segment] = field(default_factory=list)
    spm: list[Segment] = field(default_factory=list)
    notes: list[Segment] = field(default_factory=list)


def _groups(ctx: LabContext, segments: list[Segment]) -> tuple[Segment | None, list[_Order]]:
    """The PID and the ORDER groups (ORM^O01 §4.4.1, OML^O21 §4.4.6): ORC starts an order;
    TQ1, OBR, DG1, SPM and NTE belong to the order before them; OBX are read by nobody."""
    pid: Segment | None = None
    orders: list[_Order] = []
    for seg in segments[1:]:
        name = seg.name
        if name == "PID":
            if pid is not None:
                ctx.error(
                    SEGMENT_SEQUENCE_ERROR,
                    "a second PID segment: an order message is about one patient",
                    seg,
                    None,
                )
                continue
            pid = seg
        elif name == "ORC":
            orders.append(_Order(seg))
        elif not orders:
            if name in ("OBR", "TQ1", "DG1", "SPM"):
                ctx.error(
                    SEGMENT_SEQUENCE_ERROR,
                    f"a {name} segment comes before any ORC: an order starts with ORC",
                    seg,
                    None,
                )
        elif name == "OBR":
            if orders[-1].obr is not None:
                ctx.error(
                    SEGMENT_SEQUENCE_ERROR,
                    "a second OBR in one order: each test is its own ORC and OBR",
                    seg,
                    None,
                )
                continue
            orders[-1].obr = seg
        elif name == "TQ1" and orders[-1].tq1 is None:
            orders[-1].tq1 = seg
        elif name == "DG1":
            orders[-1].dg1.append(seg)
        elif name == "SPM":
            orders[-1].spm.append(seg)
        elif name == "NTE" and not orders[-1].spm:
            orders[-1].notes.append(seg)
    return pid, orders


def _status(ctx: LabContext, orc: Segment) -> tuple[str, str | None]:
    """ORC-1 and the ServiceRequest.status it and ORC-5 give (None: an error was recorded)."""
    r = ctx.reader
    control = r.text(orc.get(1)).upper()  # ORC-1 order control (table 0119)
    if not control:
        ctx.error(REQUIRED_FIELD_MISSING, "ORC-1 (order control) is empty", orc, 1)
        return control, None
    if control not in _CONTROL_STATUS:
        ctx.error(
            TABLE_VALUE_NOT_FOUND,
            f"ORC-1 (order control) {control[:4]} is not one this hub acts on "
            "(NW, CA, OC, DC, HD, RL, SC, XO, …)",
            orc,
            1,
        )
        return control, None
    status = _CONTROL_STATUS[control]
    order_status = r.text(orc.get(5)).upper()  # ORC-5 order status (table 0038)
    if status is None:
        status = _ORDER_STATUS.get(order_status, "active")
        if order_status and order_status not in _ORDER_STATUS:
            ctx.warn(TABLE_VALUE_NOT_FOUND, "ORC-5 (order status) is unknown; active", orc, 5)
    return control, status


def _priority(ctx: LabContext, order: _Order) -> str | None:
    """TQ1-9 priority (v2.5+), else OBR-27.6 / ORC-7.6 (TQ priority) → ServiceRequest.priority."""
    r = ctx.reader
    code = ""
    where: tuple[Segment, int] | None = None
    if order.tq1 is not None and order.tq1.get(9):
        code, where = r.comp(order.tq1.get(9), 1), (order.tq1, 9)
    elif order.obr is not None and r.comp(order.obr.get(27), 6):
        code, where = r.comp(order.obr.get(27), 6), (order.obr, 27)
    elif r.comp(order.orc.get(7), 6):
        code, where = r.comp(order.orc.get(7), 6), (order.orc, 7)
    if not code or where is None:
        return None
    priority = _PRIORITY.get(code.upper())
    if priority is None:
        ctx.warn(
            TABLE_VALUE_NOT_FOUND,
            f"{where[0].name}-{where[1]} (priority) is not in table 0485; no priority is set",
            where[0],
            where[1],
        )
    return priority


def _order(
    ctx: LabContext, order: _Order, subject: str, organization: str | None
) -> LabOrder | None:
    """One ORDER group → ServiceRequest, Task and Specimens."""
    orc, obr = order.orc, order.obr
    control, status = _status(ctx, orc)
    # ORC-2/OBR-2 placer and ORC-3/OBR-3 filler order numbers → identifier PLAC/FILL (§4.5.1)
    placer = order_number(ctx, (orc, 2), (obr, 2), type_code="PLAC")
    filler = order_number(ctx, (orc, 3), (obr, 3), type_code="FILL")
    key_ident = placer or filler
    if key_ident is None:
        ctx.error(
            REQUIRED_FIELD_MISSING,
            "ORC-2 (placer order number) is empty, and so are OBR-2, ORC-3 and OBR-3",
            orc,
            2,
            component=1,
        )
        return None
    r = ctx.reader
    code = None
    if obr is not None:
        code = codeable_concept(ctx, r.reps(obr.get(4))[0]) if obr.get(4) else None
        if code is None:
            ctx.error(
                REQUIRED_FIELD_MISSING,
                "OBR-4 (universal service identifier) is empty",
                obr,
                4,
                component=1,
            )
    elif control == "NW":
        ctx.error(
            SEGMENT_SEQUENCE_ERROR,
            "a new order (ORC-1 NW) has no OBR: the test ordered is not named",
            orc,
            None,
        )
    if status is None:
        return None
    key = key_of(key_ident)
    sr_url = full_url("ServiceRequest", key["system"], key["value"])
    authored = ctx.when(orc, 9, "date/time of transaction")  # ORC-9 → authoredOn
    # ORC-12 ordering provider, else OBR-16 → requester (an identifier for the caller)
    requester = practitioner_reference(ctx, orc, 12)
    if requester is None and obr is not None:
        requester = practitioner_reference(ctx, obr, 16)
    collected = ctx.when(obr, 7, "observation date/time") if obr is not None else None
    specimens = specimens_of(ctx, order.spm, obr, key, subject, collected)
    priority = _priority(ctx, order)
    reasons = [
        cc
        for dg1 in order.dg1
        if dg1.get(3)
        # DG1-3 diagnosis code (CE; I10 is МКБ-10) → ServiceRequest.reasonCode (§6.5.2.3)
        and (cc := codeable_concept(ctx, r.reps(dg1.get(3))[0], ICD10_SYSTEM)) is not None
    ]
    # NTE-3 comment (FT, repeating) → ServiceRequest.note
    notes = ["\n".join(r.lines(x) for x in r.reps(n.get(3))) for n in order.notes]
    sr: Json = {
        "resourceType": "ServiceRequest",
        "identifier": [i for i in (placer, filler) if i],
        "status": status,
        "intent": "order",
        "category": [_LAB_CATEGORY],
    }
    if priority:
        sr["priority"] = priority
    if code is not None:
        sr["code"] = code  # OBR-4 → ServiceRequest.code (§4.5.3.4)
    sr["subject"] = {"reference": subject}
    if authored:
        sr["authoredOn"] = authored
    if requester:
        sr["requester"] = requester
    if organization:
        sr["performer"] = [{"reference": organization}]
    if reasons:
        sr["reasonCode"] = reasons
    if specimens:
        sr["specimen"] = [{"reference": s.full_url} for s in specimens]
    if any(notes):
        sr["note"] = [{"text": n} for n in notes if n]
    task: Json = {
        "resourceType": "Task",
        "identifier": [key],
        "basedOn": [{"reference": sr_url}],
        "status": _TASK_STATUS[status],
        "intent": "order",
        "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": "fulfill"}]},
    }
    if priority:
        task["priority"] = priority
    task["focus"] = {"reference": sr_url}
    task["for"] = {"reference": subject}
    if authored:
        task["authoredOn"] = authored
    if requester:
        task["requester"] = requester
    if organization:
        task["owner"] = {"reference": organization}
    task_entry = Entry(full_url("Task", key["system"], key["value"]), task, key)
    return LabOrder(Entry(sr_url, sr, key), task_entry, specimens, control, placer, filler)


def map_order(
    msg: Message,
    *,
    local_code_system: str,
    default_system: str | None,
    system_for_authority: Callable[[str], str | None] = no_authority,
    performer: str | None = None,
    today: date | None = None,
) -> OrderMessage:
    """Map one parsed ORM^O01 or OML^O21 (v2.3–2.5.1) to FHIR R4 resources.

    ``local_code_system``, ``default_system`` and ``system_for_authority`` are as for
    :func:`~hie.lab_exchange.oru.map_oru`; ``performer`` (``Organization/<id>``, the laboratory
    the order goes to, when the caller knows it from MSH-5/MSH-6) becomes the ServiceRequest's
    performer and the Task's owner.

    Raises :class:`Hl7Problem` (reject, AR) only for header problems; everything else is in
    the result's ``errors`` (AE) and ``warnings``: no PID (100), no ORC-2 and no other order
    number (101), a new order without OBR or OBR-4 (100/101), an unknown ORC-1 (103).
    Anything unexpected becomes code 207, never another exception.
    """
    check_header(msg.header, ORDER_MESSAGES)
    try:
        return _map_order(
            msg, local_code_system, default_system, system_for_authority, performer, today
        )
    except Hl7Problem:
        raise
    except Exception as exc:  # the edge must always be able to answer; 207 is "internal"
        raise internal_error(exc) from exc


def _map_order(
    msg: Message,
    local_code_system: str,
    default_system: str | None,
    system_for_authority: Callable[[str], str | None],
    performer: str | None,
    today: date | None,
) -> OrderMessage:
    ctx = LabContext.of(msg, local_code_system)
    pid, groups = _groups(ctx, msg.segments)
    patient = None
    if pid is None:
        ctx.errors.append(
            Hl7Problem(
                SEGMENT_SEQUENCE_ERROR,
                "the order has no PID segment: the hub files orders to a patient",
                "PID",
            )
        )
    else:
        bound = today or latest_today()
        patient = map_patient(ctx, pid, default_system, system_for_authority, bound)
    if not groups:
        ctx.errors.append(
            Hl7Problem(SEGMENT_SEQUENCE_ERROR, "the message has no ORC segment", "ORC")
        )
    orders: list[LabOrder] = []
    if patient is not None:
        for group in groups:
            mapped = _order(ctx, group, patient.full_url, performer)
            if mapped is not None:
                orders.append(mapped)
    return OrderMessage(
        header=msg.header,
        errors=ctx.errors,
        warnings=ctx.warnings,
        patient=patient,
        orders=orders,
    )
