"""HL7 v2 ORU^R01 → FHIR R4 DiagnosticReport, Observation and Specimen (pure functions).

:func:`map_oru` takes a message parsed by :func:`hie.adapters.hl7v2.parse` (v2.3 to v2.5.1)
and returns an :class:`OruMessage`: per PATIENT_RESULT group the PID's Patient (mapped as the
ADT feed maps it, :mod:`hie.registries.pid`) and per ORDER_OBSERVATION group a
:class:`LabReport` — the DiagnosticReport (OBR), one Observation per OBX, the Specimens (SPM,
or OBR-15 before v2.5) and the Observations that are critical.

Identity, so that a re-sent or corrected result updates what is stored instead of adding to it:

- the report is keyed by its filler order number (OBR-3, else ORC-3; the placer number OBR-2 /
  ORC-2 when the lab sends none), in a system made from the number's assigning authority
  (EI.3 OID or URI, else EI.2 namespace, else the sending facility MSH-4); both numbers are
  kept as identifiers typed PLAC/FILL, so results and orders link either way round;
- an Observation by the report's key, OBX-3 (the observation identifier) and OBX-4 (sub-ID) —
  not OBX-1, which is only the position and changes when a lab re-sends part of a report;
- a Specimen by SPM-2, else by the report's key and its position.

Each resource has a ``urn:uuid:`` full URL, a uuid5 of its type and key (never random), and
references the others by it; the caller resolves them (a FHIR transaction with conditional
updates on :attr:`Entry.identifier` does exactly that).

Critical results are those whose OBX-8 says HH, LL or AA (table 0078: critically high, low,
abnormal), unless OBX-11 cancels them (X, D, W). Off-scale flags ``<`` and ``>`` and the
"significantly" flags HU/LU are not critical by themselves: they say an instrument limit or a
degree was passed, and a lab that means "call the clinician" sends HH/LL.

Problems are collected, not raised: ``errors`` (AE: the message must not be stored) for
invalid values — a non-numeric NM (102 at OBX-5), no OBR-4 or OBX-3 (101), no PID (100) — and
``warnings`` for what is doubtful or unknown — an unknown OBX-2 type or OBX-8 flag (103), a unit
the hub cannot code in UCUM (103; the unit text is kept). Only header problems raise (AR).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from functools import lru_cache
from hashlib import sha1
from typing import Any, Final, Literal
from urllib.parse import quote

from hie.adapters.hl7v2 import (
    APPLICATION_INTERNAL_ERROR,
    DATA_TYPE_ERROR,
    DEFAULT_UTC_OFFSET,
    DUPLICATE_KEY_IDENTIFIER,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    TABLE_VALUE_NOT_FOUND,
    Hl7Problem,
    Message,
    MessageHeader,
    Reader,
    Segment,
    check_header,
    fhir_datetime,
    fhir_instant,
    latest_today,
)
from hie.registries.identifiers import (
    IDENTIFIER_TYPE_SYSTEM,
    NATIONAL_SYSTEMS,
    SNILS_SYSTEM,
    IdentifierError,
    normalise_identifier,
    normalise_system,
)
from hie.registries.pid import PidContext, patient_from_pid

ORU_MESSAGES: Final = {"ORU": ("R01",)}

LOINC: Final = "http://loinc.org"
UCUM: Final = "http://unitsofmeasure.org"
SNOMED: Final = "http://snomed.info/sct"
ICD10_SYSTEM: Final = "urn:oid:1.2.643.5.1.13.13.11.1005"  # НСИ: МКБ-10
INTERPRETATION_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBSERVATION_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/observation-category"
DIAGNOSTIC_SERVICE_SECTION: Final = "http://terminology.hl7.org/CodeSystem/v2-0074"
DATA_ABSENT_REASON: Final = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
V2_TABLE: Final = "http://terminology.hl7.org/CodeSystem/v2-"
# The hub's identifier systems for HL7 v2 entity identifiers (EI: order and specimen numbers)
# and person numbers (XCN) whose assigning authority is a namespace, not an OID or a URI.
ENTITY_ID_BASE: Final = "https://hie.spb.ru/fhir/sid/hl7v2-entity/"
PRACTITIONER_ID_BASE: Final = "https://hie.spb.ru/fhir/sid/hl7v2-practitioner/"
# uuid5 namespace of every urn:uuid this package gives out.
LAB_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "https://hie.spb.ru/fhir/lab-exchange")

# Table 0078 flags that call for a clinician now (v3 ObservationInterpretation "critical").
CRITICAL_FLAGS: Final = frozenset({"HH", "LL", "AA"})

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Entry:
    """One mapped resource: its ``urn:uuid:`` full URL (other resources reference it by that),
    the resource, and the identifier a conditional update keys it by (``{system, value}``).

    Every reference (``{"reference": …}`` or a logical ``{"identifier": …}``) is the
    resource's own dict, so the caller may rewrite it in place; other parts that repeat
    within a message (a code, a reference range, an interpretation) may be shared between
    resources and are read-only.
    """

    full_url: str
    resource: Json
    identifier: dict[str, str] | None

    @property
    def resource_type(self) -> str:
        """``resource["resourceType"]``."""
        return str(self.resource["resourceType"])


@dataclass(frozen=True, slots=True)
class LabReport:
    """One ORDER_OBSERVATION group: the report, its results and specimens.

    ``critical`` lists the Observations (a subset of ``observations``) flagged HH, LL or AA;
    ``placer`` and ``filler`` are the order numbers as FHIR Identifiers (type PLAC / FILL),
    for linking the report to its ServiceRequest.
    """

    report: Entry
    observations: list[Entry]
    specimens: list[Entry]
    critical: list[Entry]
    placer: Json | None
    filler: Json | None


@dataclass(frozen=True, slots=True)
class PatientResult:
    """One PATIENT_RESULT group: the Patient as the sending MO knows the person, and the
    reports about them. ``patient.identifier`` is the MO's own number for the person (else
    the first identifier) — what the caller matches the record by."""

    patient: Entry
    reports: list[LabReport]


@dataclass(frozen=True, slots=True)
class MappedMessage:
    """What every mapped lab message carries: its header (for the ACK) and the problems found.

    When ``errors`` is not empty nothing may be stored and the answer is AE with them; the
    ``warnings`` go back in the ACK (AA) as ERR segments of severity W.
    """

    header: MessageHeader
    errors: list[Hl7Problem]
    warnings: list[Hl7Problem]

    @property
    def ack_code(self) -> Literal["AA", "AE"]:
        """MSA-1 for this message: AE if there are errors, else AA."""
        return "AE" if self.errors else "AA"


@dataclass(frozen=True, slots=True)
class OruMessage(MappedMessage):
    """A mapped ORU^R01: the results, per PATIENT_RESULT group."""

    patients: list[PatientResult]

    def entries(self) -> list[Entry]:
        """Every resource, patients first, each report followed by its specimens and results."""
        out: list[Entry] = []
        for group in self.patients:
            out.append(group.patient)
            for rep in group.reports:
                out += [rep.report, *rep.specimens, *rep.observations]
        return out


# --- the context shared by the lab mappings --------------------------------------------------


@dataclass(slots=True)
class LabContext:
    """What mapping one lab message needs, and where its problems go.

    ``local_code_system`` is the sending MO's code system for its own lab codes (OBR-4,
    OBX-3 in a coding system that is not LOINC or another known one); ``scope`` names the
    assigning authority of order numbers sent without one (the sending facility);
    ``offset`` is the zone of times sent without one (MSH-7's, else Moscow).
    """

    reader: Reader
    header: MessageHeader
    local_code_system: str
    scope: str
    offset: str
    errors: list[Hl7Problem] = field(default_factory=list)
    warnings: list[Hl7Problem] = field(default_factory=list)
    # Values mapped once per message: the ten OBX of a panel repeat times and performers.
    memo: dict[tuple[str, ...], Any] = field(default_factory=dict)

    @classmethod
    def of(cls, msg: Message, local_code_system: str) -> LabContext:
        """The context for ``msg`` from its header."""
        header = msg.header
        return cls(
            msg.reader,
            header,
            local_code_system,
            header.sending_facility,
            header.utc_offset or DEFAULT_UTC_OFFSET,
        )

    def error(self, code: str, message: str, seg: Segment, field_no: int | None, **kw: Any) -> None:
        """Record an error (AE) located at ``seg``-``field_no``."""
        self.errors.append(Hl7Problem(code, message, seg.name, seg.sequence, field_no, **kw))

    def warn(self, code: str, message: str, seg: Segment, field_no: int | None, **kw: Any) -> None:
        """Record a warning located at ``seg``-``field_no``."""
        self.warnings.append(Hl7Problem(code, message, seg.name, seg.sequence, field_no, **kw))

    def when(self, seg: Segment, field_no: int, what: str, *, instant: bool = False) -> str | None:
        """A TS/DTM field (TS.1) as a FHIR dateTime (or instant); an invalid one is an error."""
        raw = seg.get(field_no)
        if not raw:
            return None
        memo_key = ("instant" if instant else "dateTime", raw)
        known: str | None = self.memo.get(memo_key)
        if known is not None:
            return known
        value = self.reader.comp(raw, 1)
        if not value:
            return None
        try:
            out = fhir_instant(value, self.offset) if instant else fhir_datetime(value, self.offset)
            self.memo[memo_key] = out
            return out
        except ValueError as exc:
            self.error(
                DATA_TYPE_ERROR,
                f"{_name(seg, field_no)} ({what}) {exc}",
                seg,
                field_no,
                component=1,
            )
            return None


def _name(seg: Segment, field_no: int) -> str:
    """``OBX-5``, or ``OBX-5 (segment OBX number 3)`` for a later occurrence."""
    out = f"{seg.name}-{field_no}"
    if seg.sequence > 1:
        out += f" (segment {seg.name} number {seg.sequence})"
    return out


_NAMESPACE_BYTES: Final = LAB_NAMESPACE.bytes


def full_url(resource_type: str, system: str, value: str) -> str:
    """The ``urn:uuid:`` of a resource keyed by ``system|value``: the RFC 4122 name-based
    (SHA-1, version 5) UUID of ``type|system|value`` in :data:`LAB_NAMESPACE`, so the same key
    always gives the same URL and a re-sent message names the same resources. Computed here
    rather than by :func:`uuid.uuid5`, which costs three times as much."""
    x = sha1(_NAMESPACE_BYTES + f"{resource_type}|{system}|{value}".encode()).hexdigest()
    # the first 128 bits; version 5 in the 13th hex digit, variant 10xx in the 17th
    variant = "89ab"[int(x[16], 16) & 3]
    return f"urn:uuid:{x[:8]}-{x[8:12]}-5{x[13:16]}-{variant}{x[17:20]}-{x[20:32]}"


# --- codes -----------------------------------------------------------------------------------

_OID = re.compile(r"[0-2](?:\.(?:0|[1-9]\d*))+", re.ASCII)
_URI = re.compile(r"(?:https?://|urn:)\S+", re.IGNORECASE)
_HL7_TABLE = re.compile(r"HL7(\d{4})", re.ASCII)
# CE.3/CWE.3 name of coding system (table 0396) → FHIR system; anything else is local.
_CODING_SYSTEMS: Final = {
    "LN": LOINC,
    "LOINC": LOINC,
    "SCT": SNOMED,
    "SNOMEDCT": SNOMED,
    "UCUM": UCUM,
    "I10": ICD10_SYSTEM,
    "ICD10": ICD10_SYSTEM,
    "МКБ10": ICD10_SYSTEM,
}


def coding_system(ctx: LabContext, name: str, default: str | None = None) -> str:
    """The FHIR system for a CE.3/CWE.3 coding system name (HL7 table 0396): ``LN`` is LOINC,
    ``HL7nnnn`` the v2 table, an OID or URI itself; an empty name is ``default`` (the table a
    field is bound to) if given; anything else — ``L``, ``99zzz``, empty — is the sending MO's
    local code system."""
    if not name and default:
        return default
    known = _CODING_SYSTEMS.get(name)
    if known:
        return known
    key = name.strip().upper().replace("-", "").replace(" ", "")
    known = _CODING_SYSTEMS.get(key)
    if known:
        return known
    m = _HL7_TABLE.fullmatch(key)
    if m:
        return V2_TABLE + m[1]
    if _OID.fullmatch(name):
        return f"urn:oid:{name}"
    if _URI.fullmatch(name):
        return name
    return ctx.local_code_system


def codeable_concept(ctx: LabContext, raw: str, default_system: str | None = None) -> Json | None:
    """One CE/CWE/CNE repetition → CodeableConcept (HL7 v2.5.1 ch. 2A, CWE): the code
    (CWE.1–3) and the alternate code (CWE.4–6) as codings, the text from CWE.9 (original
    text), else CWE.2, else CWE.5. The sender's text is the concept's ``text``; a coding gets a
    ``display`` only in a local system (where the sender's text is the display). A code without
    a coding system is in ``default_system`` if given, else in the MO's local system."""
    return concept_of(ctx, ctx.reader.comps(raw), default_system)


def concept_of(ctx: LabContext, c: list[str], default_system: str | None = None) -> Json | None:
    """:func:`codeable_concept` from the repetition's components, already split."""
    if len(c) < 9:
        c = c + [""] * (9 - len(c))
    codings: list[Json] = []
    for i in (0, 3):
        code = c[i]
        if not code:
            continue
        system = coding_system(ctx, c[i + 2], default_system)
        coding: Json = {"system": system, "code": code}
        if c[i + 1] and system == ctx.local_code_system:
            coding["display"] = c[i + 1]
        if c[6 + i // 3]:  # CWE.7 / CWE.8 coding system version
            coding["version"] = c[6 + i // 3]
        codings.append(coding)
    text = c[8] or c[1] or c[4]
    if not codings and not text:
        return None
    cc: Json = {}
    if codings:
        cc["coding"] = codings
    if text:
        cc["text"] = text
    return cc


def _type(code: str) -> Json:
    return {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": code}]}


def entity_system(ctx: LabContext, namespace: str, universal: str) -> str:
    """The system of an EI (order or specimen number): EI.3 universal ID when it is an OID
    or a URI, else the EI.2 namespace (an OID there counts too), else the sending facility."""
    return _entity_system(namespace, universal, ctx.scope)


@lru_cache(maxsize=4096)
def _entity_system(namespace: str, universal: str, scope: str) -> str:
    for candidate in (universal, namespace):
        if _OID.fullmatch(candidate):
            return f"urn:oid:{candidate}"
        if _URI.fullmatch(candidate):
            return candidate
    return ENTITY_ID_BASE + quote(namespace or scope or "-", safe="")


def _ei(ctx: LabContext, parts: list[str], type_code: str | None) -> Json | None:
    """EI parts (entity ID, namespace, universal ID, type) → Identifier, or None if no ID."""
    parts = parts + [""] * (3 - len(parts))
    if not parts[0]:
        return None
    ident: Json = {}
    if type_code:
        ident["type"] = _type(type_code)
    ident["system"] = entity_system(ctx, parts[1], parts[2])
    ident["value"] = parts[0]
    return ident


def order_number(
    ctx: LabContext, *fields: tuple[Segment | None, int], type_code: str
) -> Json | None:
    """The first order number (EI) among ``(segment, field)`` pairs → Identifier typed
    ``type_code`` (PLAC placer, FILL filler; table 0203)."""
    for seg, field_no in fields:
        if seg is None:
            continue
        raw = seg.get(field_no)
        if raw:
            found = _ei(ctx, ctx.reader.comps(ctx.reader.reps(raw)[0]), type_code)
            if found:
                return found
    return None


def key_of(ident: Json) -> dict[str, str]:
    """``{system, value}`` of an Identifier: what a conditional update matches on."""
    return {"system": str(ident["system"]), "value": str(ident["value"])}


_SNILS_NAMES = frozenset({"SNILS", "СНИЛС"})


def practitioner_reference(ctx: LabContext, seg: Segment, field_no: int) -> Json | None:
    """The first XCN of a field (ORC-12, OBR-16, OBX-16) → a logical Practitioner reference:
    ``identifier`` (XCN.1 with a system from XCN.9 or XCN.13) and the name as ``display``.
    The caller resolves it against the practitioner registry."""
    r = ctx.reader
    reps = r.reps(seg.get(field_no))
    if not reps:
        return None
    rep = reps[0]
    c = r.comps(rep)
    c += [""] * (13 - len(c))
    value = c[0]  # XCN.1 ID number
    # XCN.2 family name (FN.1 surname), XCN.3 given name, XCN.4 second names (отчество)
    name = " ".join(p for p in (c[1], c[2], c[3]) if p)
    if not value and not name:
        return None
    ref: Json = {"type": "Practitioner"}
    if value:
        namespace, universal = r.comp(rep, 9, 1), r.comp(rep, 9, 2)  # XCN.9 assigning auth.
        id_type = c[12].upper()  # XCN.13 identifier type code
        system: str | None = None
        if id_type in _SNILS_NAMES or universal == "1.2.643.100.3":
            system = SNILS_SYSTEM
        elif _OID.fullmatch(universal) or _URI.fullmatch(universal):
            system = normalise_system(universal)
        elif _OID.fullmatch(namespace) or _URI.fullmatch(namespace):
            system = normalise_system(namespace)
        else:
            system = PRACTITIONER_ID_BASE + quote(namespace or ctx.scope or "-", safe="")
        if system in NATIONAL_SYSTEMS:
            try:
                value = normalise_identifier(system, value)
            except IdentifierError:
                ctx.warn(
                    DATA_TYPE_ERROR,
                    f"{_name(seg, field_no)}: the practitioner's SNILS is not valid; "
                    "the practitioner is named without it",
                    seg,
                    field_no,
                    component=1,
                    repetition=1,
                )
                value = ""
        if value:
            ref["identifier"] = {"system": system, "value": value}
    if name:
        ref["display"] = name
    return ref if len(ref) > 1 else None


# --- the patient -----------------------------------------------------------------------------


def map_patient(
    ctx: LabContext,
    pid: Segment,
    default_system: str | None,
    system_for_authority: Callable[[str], str | None],
    today: date,
) -> Entry | None:
    """The PID → the Patient entry, keyed by the MO's own number for the person (else its
    first identifier that is not national, else a national one). Problems go to ``ctx``;
    None when the PID cannot be used."""
    pctx = PidContext(
        ctx.reader, default_system, system_for_authority, today, ctx.header.utc_offset, ctx.warnings
    )
    try:
        patient = patient_from_pid(pctx, pid)
    except Hl7Problem as problem:
        ctx.errors.append(problem)
        return None
    idents: list[Json] = patient.get("identifier") or []
    mine = [i for i in idents if default_system and i["system"] == normalise_system(default_system)]
    local = [i for i in idents if i["system"] not in NATIONAL_SYSTEMS]
    candidates = mine or local or idents
    if not candidates:
        ctx.error(
            REQUIRED_FIELD_MISSING,
            f"{_name(pid, 3)} (patient identifier list) has no identifier: the result cannot "
            "be filed to a person",
            pid,
            3,
        )
        return None
    key = key_of(candidates[0])
    return Entry(full_url("Patient", key["system"], key["value"]), patient, key)


# --- units and numbers -----------------------------------------------------------------------

# Unit text as labs send it (key: lower case, no blanks, 10^n written 10*n) → UCUM code.
# Russian spellings first: Ед = units (U), МЕ = international units ([IU]), фл/пг the
# erythrocyte indices, "в п/зр" per high-power field (urine microscopy).
_UCUM_UNITS: Final[dict[str, str]] = {
    "ммоль/л": "mmol/L",
    "мкмоль/л": "umol/L",
    "нмоль/л": "nmol/L",
    "пмоль/л": "pmol/L",
    "моль/л": "mol/L",
    "г/л": "g/L",
    "мг/л": "mg/L",
    "мкг/л": "ug/L",
    "нг/л": "ng/L",
    "г/дл": "g/dL",
    "мг/дл": "mg/dL",
    "мкг/дл": "ug/dL",
    "нг/мл": "ng/mL",
    "пг/мл": "pg/mL",
    "мкг/мл": "ug/mL",
    "ед/л": "U/L",
    "ед/мл": "U/mL",
    "мед/л": "mU/L",
    "мкед/мл": "uU/mL",
    "ме/л": "[IU]/L",
    "ме/мл": "[IU]/mL",
    "мме/л": "m[IU]/L",
    "мме/мл": "m[IU]/mL",
    "мкме/мл": "u[IU]/mL",
    "%": "%",
    "10*9/л": "10*9/L",
    "10*12/л": "10*12/L",
    "10*6/л": "10*6/L",
    "тыс/мкл": "10*3/uL",
    "млн/мкл": "10*6/uL",
    "фл": "fL",
    "пг": "pg",
    "мм/ч": "mm/h",
    "мм/час": "mm/h",
    "с": "s",
    "сек": "s",
    "мин": "min",
    "мл/мин": "mL/min",
    "мл/мин/1,73м2": "mL/min/{1.73_m2}",
    "мл/мин/1.73м2": "mL/min/{1.73_m2}",
    "ммоль/моль": "mmol/mol",
    "мосм/кг": "mosm/kg",
    "ммрт.ст.": "mm[Hg]",
    "кпа": "kPa",
    "г/сут": "g/d",
    "мг/сут": "mg/d",
    "ммоль/сут": "mmol/d",
    "кл/мкл": "/uL",
    "клеток/мкл": "/uL",
    "вп/зр": "/[HPF]",
    "вп/з": "/[HPF]",
    "mmol/l": "mmol/L",
    "umol/l": "umol/L",
    "nmol/l": "nmol/L",
    "pmol/l": "pmol/L",
    "g/l": "g/L",
    "mg/l": "mg/L",
    "ug/l": "ug/L",
    "g/dl": "g/dL",
    "mg/dl": "mg/dL",
    "ng/ml": "ng/mL",
    "pg/ml": "pg/mL",
    "u/l": "U/L",
    "iu/l": "[IU]/L",
    "miu/l": "m[IU]/L",
    "uiu/ml": "u[IU]/mL",
    "miu/ml": "m[IU]/mL",
    "10*9/l": "10*9/L",
    "10*12/l": "10*12/L",
    "10*3/ul": "10*3/uL",
    "10*6/ul": "10*6/uL",
    "fl": "fL",
    "pg": "pg",
    "mm/h": "mm/h",
    "mm/hr": "mm/h",
    "s": "s",
    "sec": "s",
    "min": "min",
    "ml/min": "mL/min",
    "ml/min/1.73m2": "mL/min/{1.73_m2}",
    "mmol/mol": "mmol/mol",
    "mosm/kg": "mosm/kg",
    "mmhg": "mm[Hg]",
    "kpa": "kPa",
    "/ul": "/uL",
    "/hpf": "/[HPF]",
}
_UNIT_CHARS = str.maketrans(
    {
        "⁰": "0",
        "¹": "1",
        "²": "2",
        "³": "3",
        "⁴": "4",
        "⁵": "5",
        "⁶": "6",
        "⁷": "7",
        "⁸": "8",
        "⁹": "9",
        "µ": "u",
        "μ": "u",
        "ё": "е",
        " ": None,
    }
)


def _unit_key(text: str) -> str:
    key = text.strip().lower().translate(_UNIT_CHARS)
    if key[:1] in ("×", "x", "х") and key[1:3] == "10":  # ×10^9/л, x10*9/l, х10^9/л
        key = key[1:]
    if key.startswith("10"):
        key = key.replace("10^", "10*", 1).replace("10e", "10*", 1)
        if key[2:3].isdigit():  # 10⁹/л read as 109/л after the superscripts
            key = "10*" + key[2:]
    return key


@lru_cache(maxsize=4096)
def ucum_code(unit: str) -> str | None:
    """The UCUM code of a unit as labs write it (``ммоль/л``, ``×10⁹/л``, ``Ед/л``), if known."""
    return _UCUM_UNITS.get(_unit_key(unit)) if unit else None


def _unit(ctx: LabContext, seg: Segment) -> Json:
    """OBX-6 units (CE) → the unit part of a Quantity: the sender's text as ``unit`` and, when
    the unit is UCUM (CE.3 ``UCUM``) or in the hub's table, ``system``/``code``; an unknown unit
    keeps its text alone, with a warning (HL7 v2.5.1 §7.4.2.6)."""
    r = ctx.reader
    raw = seg.get(6)
    if not raw:
        return {}
    c = r.comps(raw)
    c += [""] * (3 - len(c))
    code, text, system = c[0], c[1], c[2].upper()
    shown = text or code
    if not shown:
        return {}
    if system == "UCUM" and code:
        return {"unit": shown, "system": UCUM, "code": code}
    ucum = ucum_code(code) or ucum_code(text)
    if ucum is None:
        ctx.warn(
            TABLE_VALUE_NOT_FOUND,
            f"{_name(seg, 6)} (units) is not a UCUM unit the hub knows; the unit text is kept",
            seg,
            6,
            component=1,
        )
        return {"unit": shown}
    return {"unit": shown, "system": UCUM, "code": ucum}


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)", re.ASCII)
_DECIMAL_COMMA = re.compile(r"[+-]?\d+,\d+", re.ASCII)


def _number(text: str) -> int | float | None:
    """An NM value as a JSON number (int when it has no fraction), or None if not a number."""
    if _NUMBER.fullmatch(text):
        return float(text) if "." in text else int(text)
    return None


# --- values ----------------------------------------------------------------------------------

# Table 0125 value types this mapping reads, and the ones it knows but does not keep.
_TEXT_TYPES: Final = frozenset({"ST", "TX", "FT", "ID", "IS"})
_CODED_TYPES: Final = frozenset({"CE", "CWE", "CNE", "CF"})
_DATE_TYPES: Final = frozenset({"DT", "DTM", "TS"})
_KNOWN_TYPES: Final = frozenset(
    {"AD", "CK", "CN", "CP", "CX", "DR", "ED", "MA", "MO", "NA", "PN", "RP", "SI", "TN"}
    | {"XAD", "XCN", "XON", "XPN", "XTN", "NM", "SN", "TM"}
    | _TEXT_TYPES
    | _CODED_TYPES
    | _DATE_TYPES
)
_NUMERIC: Final = frozenset({"NM", "SN"})
_SN_COMPARATORS: Final = {"<": "<", "<=": "<=", ">=": ">=", ">": ">"}
_TM = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(\.\d{1,4})?)?)?(?:[+-]\d{4})?", re.ASCII)


def _nm(ctx: LabContext, seg: Segment, text: str, what: str) -> int | float | None:
    """An NM value; a decimal comma (``5,3``, common in Russian feeds) is read as a point
    with a warning; anything else that is not a number is an error at OBX-5."""
    number = _number(text)
    if number is not None:
        return number
    if _DECIMAL_COMMA.fullmatch(text):
        ctx.warn(
            DATA_TYPE_ERROR,
            f"{_name(seg, 5)} ({what}) has a decimal comma; read as a decimal point",
            seg,
            5,
        )
        return float(text.replace(",", "."))
    ctx.error(
        DATA_TYPE_ERROR,
        f"{_name(seg, 5)} ({what}) is not a number"
        + (" (send a comparator or range as SN)" if text[:1] in "<>" else ""),
        seg,
        5,
    )
    return None


def _structured_numeric(ctx: LabContext, seg: Segment, rep: str, obs: Json, unit: Json) -> None:
    """SN: comparator^num1^separator/suffix^num2 (HL7 v2.5.1 ch. 2A, SN) → valueQuantity
    (with comparator), valueRange (``-``), valueRatio (``:``, ``/``) or, for ``2+``, text."""
    c = ctx.reader.comps(rep)
    c += [""] * (4 - len(c))
    comparator, n1, sep, n2 = c[0], c[1], c[2], c[3]
    first = _number(n1) if n1 else None
    second = _number(n2) if n2 else None
    if (n1 and first is None) or (n2 and second is None):
        ctx.error(DATA_TYPE_ERROR, f"{_name(seg, 5)} (SN) has a number that is not one", seg, 5)
        return
    if first is not None and second is not None and sep == "-":
        obs["valueRange"] = {"low": {"value": first, **unit}, "high": {"value": second, **unit}}
    elif first is not None and second is not None and sep in (":", "/"):
        obs["valueRatio"] = {"numerator": {"value": first}, "denominator": {"value": second}}
    elif first is not None and not sep and second is None:
        if comparator in ("", "="):
            obs["valueQuantity"] = {"value": first, **unit}
        elif comparator in _SN_COMPARATORS:
            q = {"value": first, "comparator": _SN_COMPARATORS[comparator], **unit}
            obs["valueQuantity"] = q
        else:  # "<>" (not equal) has no FHIR comparator
            ctx.warn(
                DATA_TYPE_ERROR,
                f"{_name(seg, 5)} (SN) comparator has no FHIR equivalent; kept as text",
                seg,
                5,
                component=1,
            )
            obs["valueString"] = "".join(c[:4])
    elif first is not None and sep == "+" and second is None:
        obs["valueString"] = f"{n1}+"  # a categorical "2+" (dipstick, agglutination)
    else:
        ctx.error(
            DATA_TYPE_ERROR,
            f"{_name(seg, 5)} (SN) is not a comparator and number, a range or a ratio",
            seg,
            5,
        )


def _value(ctx: LabContext, seg: Segment, value_type: str, obs: Json, unit: Json) -> None:
    """OBX-5 observation value by OBX-2 value type → Observation.value[x] (§7.4.2.5); ``unit``
    is OBX-6 as a Quantity's unit part (NM, SN)."""
    r = ctx.reader
    reps = [rep for rep in r.reps(seg.get(5)) if rep and rep != '""']
    if not reps:
        return
    if value_type in _TEXT_TYPES:
        read = r.lines if value_type in ("TX", "FT") else r.text
        text = "\n".join(t for t in map(read, reps) if t)  # a repetition is a line
        if text:
            obs["valueString"] = text
        return
    if len(reps) > 1:
        ctx.warn(
            DATA_TYPE_ERROR,
            f"{_name(seg, 5)} repeats; a {value_type} result has one value, the first is kept",
            seg,
            5,
            repetition=2,
        )
    rep = reps[0]
    if value_type == "NM":
        number = _nm(ctx, seg, r.text(rep), "numeric result")
        if number is not None:
            obs["valueQuantity"] = {"value": number, **unit}
    elif value_type == "SN":
        _structured_numeric(ctx, seg, rep, obs, unit)
    elif value_type in _CODED_TYPES:
        cc = codeable_concept(ctx, rep)
        if cc is not None:
            obs["valueCodeableConcept"] = cc
    elif value_type in _DATE_TYPES:
        try:
            obs["valueDateTime"] = fhir_datetime(r.comp(rep, 1), ctx.offset)
        except ValueError as exc:
            ctx.error(DATA_TYPE_ERROR, f"{_name(seg, 5)} ({value_type}) {exc}", seg, 5)
    elif value_type == "TM":
        m = _TM.fullmatch(r.text(rep))
        if m is None or int(m[1]) > 23 or int(m[2] or 0) > 59 or int(m[3] or 0) > 59:
            ctx.error(DATA_TYPE_ERROR, f"{_name(seg, 5)} (TM) is not a time of day", seg, 5)
        else:
            obs["valueTime"] = f"{m[1]}:{m[2] or '00'}:{m[3] or '00'}{m[4] or ''}"
    elif value_type in _KNOWN_TYPES:
        ctx.warn(
            TABLE_VALUE_NOT_FOUND,
            f"{_name(seg, 2)}: value type {value_type} is not kept by the hub; the value is "
            "dropped",
            seg,
            2,
        )
        obs["dataAbsentReason"] = {
            "coding": [{"system": DATA_ABSENT_REASON, "code": "unsupported"}]
        }
    else:
        ctx.warn(
            TABLE_VALUE_NOT_FOUND,
            f"{_name(seg, 2)}: value type is not in HL7 table 0125; the value is kept as text",
            seg,
            2,
        )
        text = "\n".join(t for t in map(r.text, reps) if t)
        if text:
            obs["valueString"] = text


# --- reference range, interpretation, status -------------------------------------------------

# Written with [0-9], not \d: a range in Arabic-Indic digits is text, not numbers.
_RANGE = re.compile(r"\s*(-?[0-9]+(?:[.,][0-9]+)?)\s*(?:-|–|—|\.\.)\s*(-?[0-9]+(?:[.,][0-9]+)?)\s*")
_BOUND = re.compile(r"\s*(<=|>=|<|>|≤|≥)\s*(-?[0-9]+(?:[.,][0-9]+)?)\s*")


def _decimal(text: str) -> int | float:
    text = text.replace(",", ".")
    return float(text) if "." in text else int(text)


def _reference_range(ctx: LabContext, seg: Segment, unit: Json) -> Json | None:
    """OBX-7 references range (ST) → Observation.referenceRange (§7.4.2.7): ``3.5-5.0`` gives
    low and high; ``<5``, ``>=10`` one bound and the text; anything else the text alone."""
    text = ctx.reader.text(seg.get(7))
    if not text:
        return None
    m = _RANGE.fullmatch(text)
    if m:
        return {
            "low": {"value": _decimal(m[1]), **unit},
            "high": {"value": _decimal(m[2]), **unit},
        }
    m = _BOUND.fullmatch(text)
    if m:
        side = "high" if m[1] in ("<", "<=", "≤") else "low"
        return {side: {"value": _decimal(m[2]), **unit}, "text": text}
    return {"text": text}


# Table 0078 abnormal flags → v3 ObservationInterpretation (same codes), with displays.
_INTERPRETATIONS: Final = {
    "N": "Normal",
    "L": "Low",
    "H": "High",
    "LL": "Critical low",
    "HH": "Critical high",
    "LU": "Significantly low",
    "HU": "Significantly high",
    "A": "Abnormal",
    "AA": "Critical abnormal",
    "<": "Off scale low",
    ">": "Off scale high",
    "U": "Significant change up",
    "D": "Significant change down",
    "B": "Better",
    "W": "Worse",
    "S": "Susceptible",
    "R": "Resistant",
    "I": "Intermediate",
    "MS": "moderately susceptible",
    "VS": "very susceptible",
    "POS": "Positive",
    "NEG": "Negative",
    "IND": "Indeterminate",
    "DET": "Detected",
    "ND": "Not detected",
    "E": "Equivocal",
    "RR": "Reactive",
    "WR": "Weakly reactive",
    "NR": "Non-reactive",
    "EX": "outside threshold",
    "HX": "above high threshold",
    "LX": "below low threshold",
    "QCF": "Quality control failure",
    "TOX": "Cytotoxic substance present",
}


def _interpretation(ctx: LabContext, seg: Segment) -> tuple[list[Json], set[str]]:
    """OBX-8 abnormal flags (table 0078, repeating) → Observation.interpretation (§7.4.2.8)."""
    r = ctx.reader
    out: list[Json] = []
    codes: set[str] = set()
    for rep_no, rep in enumerate(r.reps(seg.get(8)), 1):
        code = r.comp(rep, 1)
        if not code:
            continue
        key = code if code in _INTERPRETATIONS else code.upper()
        display = _INTERPRETATIONS.get(key)
        if display is None:
            ctx.warn(
                TABLE_VALUE_NOT_FOUND,
                f"{_name(seg, 8)} (abnormal flags) is not in HL7 table 0078; kept as text",
                seg,
                8,
                repetition=rep_no,
            )
            out.append({"text": code})
            continue
        codes.add(key)
        out.append({"coding": [{"system": INTERPRETATION_SYSTEM, "code": key, "display": display}]})
    return out, codes


# OBX-11 observation result status (table 0085) → Observation.status, as the HL7 v2-to-FHIR
# ConceptMap has it: C is a corrected result; R ("entered, not verified") is preliminary.
_OBX_STATUS: Final = {
    "F": "final",
    "C": "corrected",
    "P": "preliminary",
    "R": "preliminary",
    "S": "preliminary",
    "I": "registered",
    "O": "registered",
    "X": "cancelled",
    "N": "cancelled",
    "D": "entered-in-error",
    "W": "entered-in-error",
    "U": "final",
}
# OBR-25 result status (table 0123) → DiagnosticReport.status.
_OBR_STATUS: Final = {
    "O": "registered",
    "I": "registered",
    "S": "registered",
    "A": "partial",
    "R": "partial",
    "P": "preliminary",
    "C": "corrected",
    "F": "final",
    "X": "cancelled",
}
# When OBX-11 says nothing usable, the report's status stands for the result's.
_REPORT_TO_RESULT: Final = {
    "registered": "registered",
    "partial": "preliminary",
    "preliminary": "preliminary",
    "corrected": "corrected",
    "final": "final",
    "cancelled": "cancelled",
    "unknown": "unknown",
}
_NOT_A_RESULT: Final = frozenset({"cancelled", "entered-in-error"})


def _status(
    ctx: LabContext, seg: Segment, field_no: int, table: dict[str, str], what: str
) -> str | None:
    value = ctx.reader.text(seg.get(field_no)).upper()
    if value in table:
        return table[value]
    if value:
        ctx.warn(
            TABLE_VALUE_NOT_FOUND, f"{_name(seg, field_no)} ({what}) is unknown", seg, field_no
        )
    else:
        ctx.warn(REQUIRED_FIELD_MISSING, f"{_name(seg, field_no)} ({what}) is empty", seg, field_no)
    return None


# --- performers ------------------------------------------------------------------------------


def _organization_xon(ctx: LabContext, seg: Segment, field_no: int) -> Json | None:
    """XON (OBX-23 performing organization, v2.5+) → a logical Organization reference: the
    identifier XON.10 (else XON.3) in the system of XON.6, and XON.1 as display."""
    r = ctx.reader
    reps = r.reps(seg.get(field_no))
    if not reps:
        return None
    rep = reps[0]
    name = r.comp(rep, 1)
    value = r.comp(rep, 10) or r.comp(rep, 3)
    ref: Json = {"type": "Organization"}
    if value:
        namespace, universal = r.comp(rep, 6, 1), r.comp(rep, 6, 2)
        ref["identifier"] = {"system": entity_system(ctx, namespace, universal), "value": value}
    if name:
        ref["display"] = name
    return ref if len(ref) > 1 else None


def _organization_ce(ctx: LabContext, seg: Segment, field_no: int) -> Json | None:
    """CE (OBX-15 producer's ID: the lab that made the result) → Organization reference."""
    raw = seg.get(field_no)
    if not raw:
        return None
    c = ctx.reader.comps(raw)
    c += [""] * (3 - len(c))
    if not c[0] and not c[1]:
        return None
    ref: Json = {"type": "Organization"}
    if c[0]:
        ref["identifier"] = {"system": entity_system(ctx, "", c[2]), "value": c[0]}
    if c[1]:
        ref["display"] = c[1]
    return ref


# --- specimens -------------------------------------------------------------------------------


def specimens_of(
    ctx: LabContext,
    spms: list[Segment],
    obr: Segment | None,
    key: dict[str, str],
    subject: str,
    collected: str | None,
) -> list[Entry]:
    """The specimens of one order: each SPM (v2.5+, §7.4.3) or, without any, OBR-15 specimen
    source (v2.3/2.4; deprecated in v2.5). ``key`` is the order's, for specimens without an
    SPM-2 number; ``collected`` the default collection time (OBR-7)."""
    r = ctx.reader
    out: list[Entry] = []
    for n, spm in enumerate(spms, 1):
        res: Json = {"resourceType": "Specimen"}
        raw_id = r.reps(spm.get(2))
        ident = None
        if raw_id:
            # SPM-2 specimen ID (EIP): placer's EI in component 1, filler's in component 2,
            # each EI in subcomponents; the filler's (the lab's) number names the specimen.
            rep = raw_id[0]
            for comp in (2, 1):
                parts = [r.comp(rep, comp, s) for s in (1, 2, 3)]
                ident = _ei(ctx, parts, None)
                if ident:
                    break
        if ident is None:
            ident = {"system": key["system"], "value": f"{key['value']}/specimen/{n}"}
        res["identifier"] = [ident]
        raw_type = spm.get(4)
        kind = codeable_concept(ctx, r.reps(raw_type)[0], V2_TABLE + "0487") if raw_type else None
        if kind is not None:  # SPM-4 specimen type (table 0487) → Specimen.type
            res["type"] = kind
        res["subject"] = {"reference": subject}
        collection: Json = {}
        when = r.comp(spm.get(17), 1, 1)  # SPM-17 collection date/time, DR.1 range start
        if when:
            try:
                collection["collectedDateTime"] = fhir_datetime(when, ctx.offset)
            except ValueError as exc:
                ctx.error(DATA_TYPE_ERROR, f"{_name(spm, 17)} (collection time) {exc}", spm, 17)
        elif collected:
            collection["collectedDateTime"] = collected
        site = codeable_concept(ctx, spm.get(8)) if spm.get(8) else None
        if site is not None:  # SPM-8 specimen source site
            collection["bodySite"] = site
        if collection:
            res["collection"] = collection
        received = ctx.when(spm, 18, "specimen received time")  # SPM-18
        if received:
            res["receivedTime"] = received
        out.append(Entry(full_url("Specimen", ident["system"], ident["value"]), res, key_of(ident)))
    if out or obr is None or not obr.get(15):
        return out
    # OBR-15 specimen source (SPS; CM before v2.5): SPS.1 is a CE in subcomponents.
    rep = r.reps(obr.get(15))[0]
    sub = r.subcomponent
    first = rep.split(r.component, 1)[0]
    ce = first.replace(sub, r.component)
    kind = codeable_concept(ctx, ce, V2_TABLE + "0070") if first else None
    ident = {"system": key["system"], "value": f"{key['value']}/specimen/1"}
    res = {"resourceType": "Specimen", "identifier": [ident]}
    if kind is not None:  # SPS.1 specimen source name or code (table 0070) → Specimen.type
        res["type"] = kind
    res["subject"] = {"reference": subject}
    if collected:
        res["collection"] = {"collectedDateTime": collected}
    received = ctx.when(obr, 14, "specimen received time")  # OBR-14
    if received:
        res["receivedTime"] = received
    out.append(Entry(full_url("Specimen", ident["system"], ident["value"]), res, key_of(ident)))
    return out


# --- the message -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Order:
    orc: Segment | None
    obr: Segment | None = None
    observations: list[tuple[Segment, list[Segment]]] = field(default_factory=list)
    specimens: list[Segment] = field(default_factory=list)


@dataclass(slots=True)
class _Group:
    pid: Segment | None
    orders: list[_Order] = field(default_factory=list)


def _groups(ctx: LabContext, segments: list[Segment]) -> list[_Group]:
    """PATIENT_RESULT and ORDER_OBSERVATION groups (ORU^R01, HL7 v2.5.1 §7.3.1): PID starts a
    patient; ORC or OBR an order; OBX and NTE belong to what precedes them."""
    groups: list[_Group] = []
    order: _Order | None = None
    notes: list[Segment] | None = None
    for seg in segments[1:]:
        name = seg.name
        if name == "PID":
            groups.append(_Group(seg))
            order, notes = None, None
        elif name in ("ORC", "OBR"):
            if not groups:
                groups.append(_Group(None))
            if name == "OBR" and order is not None and order.obr is None:
                order.obr = seg  # the OBR of the ORC before it
            else:
                order = _Order(seg if name == "ORC" else None, seg if name == "OBR" else None)
                groups[-1].orders.append(order)
            notes = None
        elif name == "OBX":
            if order is None or order.obr is None:
                ctx.error(
                    SEGMENT_SEQUENCE_ERROR,
                    "an OBX segment comes before any OBR: results belong to an order",
                    seg,
                    None,
                )
                notes = None
                continue
            notes = []
            order.observations.append((seg, notes))
        elif name == "NTE" and notes is not None:
            notes.append(seg)
        elif name == "SPM" and order is not None:
            order.specimens.append(seg)
            notes = None
    return groups


def _observation(
    ctx: LabContext,
    obx: Segment,
    notes: list[Segment],
    report_key: dict[str, str],
    subject: str,
    placer: Json,
    defaults: Json,
    seen: set[str],
) -> tuple[Entry, bool] | None:
    """One OBX → (Observation entry, critical?); None when it has no usable OBX-3."""
    r = ctx.reader
    f = obx.fields
    if len(f) < 24:
        f = f + [""] * (24 - len(f))
    # OBX-3 observation identifier (CWE, first repetition)
    ids = r.comps(f[3].split(r.repetition, 1)[0])
    code_id = ids[0]
    code = concept_of(ctx, ids) if code_id else None
    if code is None:
        ctx.error(
            REQUIRED_FIELD_MISSING,
            f"{_name(obx, 3)} (observation identifier) has no code",
            obx,
            3,
            component=1,
        )
        return None
    sub_id = r.text(f[4])  # OBX-4 observation sub-ID
    local = f"{code_id}/{sub_id}" if sub_id else code_id
    if local in seen:
        set_id = r.text(f[1]) or str(obx.sequence)
        ctx.warn(
            DUPLICATE_KEY_IDENTIFIER,
            f"{_name(obx, 3)} repeats an observation of this order without a different OBX-4 "
            "(sub-ID); told apart by OBX-1",
            obx,
            4,
        )
        local = f"{local}#{set_id}"
    seen.add(local)
    ident = {"system": report_key["system"], "value": f"{report_key['value']}/{local}"}
    obs: Json = {
        "resourceType": "Observation",
        "identifier": [ident],
        "basedOn": [{"type": "ServiceRequest", "identifier": placer}],
    }
    # OBX-11 observation result status (table 0085) → status (§7.4.2.11)
    status = _OBX_STATUS.get(f[11]) or _status(ctx, obx, 11, _OBX_STATUS, "result status")
    obs["status"] = status or _REPORT_TO_RESULT[defaults["status"]]
    obs["category"] = [
        {
            "coding": [
                {"system": OBSERVATION_CATEGORY, "code": "laboratory", "display": "Laboratory"}
            ]
        }
    ]
    obs["code"] = code  # OBX-3 → Observation.code (§7.4.2.3)
    obs["subject"] = {"reference": subject}
    # OBX-14 date/time of the observation, else OBR-7 → effectiveDateTime (§7.4.2.14)
    effective = ctx.when(obx, 14, "date/time of the observation") if f[14] else None
    effective = effective or defaults["effective"]
    if effective:
        obs["effectiveDateTime"] = effective
    if defaults["issued"]:
        obs["issued"] = defaults["issued"]
    performers = _performers(ctx, obx, f, defaults["performer"])
    if performers:
        obs["performer"] = performers
    value_type = r.text(f[2]).upper()  # OBX-2 value type (table 0125)
    if not value_type and f[5]:
        ctx.warn(
            REQUIRED_FIELD_MISSING,
            f"{_name(obx, 2)} (value type) is empty but OBX-5 has a value; read as ST",
            obx,
            2,
        )
        value_type = "ST"
    # OBX-6 units → the Quantity's unit, UCUM-coded where known (§7.4.2.6)
    unit = _memo(ctx, ("OBX-6", f[6]), _unit, obx) if value_type in _NUMERIC and f[6] else {}
    _value(ctx, obx, value_type, obs, unit)
    if f[8]:  # OBX-8 abnormal flags → interpretation (§7.4.2.8)
        flags, codes = _memo(ctx, ("OBX-8", f[8]), _interpretation, obx)
        if flags:
            obs["interpretation"] = flags
    else:
        codes = set()
    if notes:  # NTE-3 comments after the OBX → Observation.note
        texts = ["\n".join(r.lines(x) for x in r.reps(n.get(3))) for n in notes]
        if any(texts):
            obs["note"] = [{"text": t} for t in texts if t]
    if defaults["specimen"]:
        obs["specimen"] = {"reference": defaults["specimen"]}
    if f[7]:  # OBX-7 references range → referenceRange (§7.4.2.7)
        ref_range = _reference_range(ctx, obx, unit)
        if ref_range is not None:
            obs["referenceRange"] = [ref_range]
    critical = not codes.isdisjoint(CRITICAL_FLAGS) and obs["status"] not in _NOT_A_RESULT
    entry = Entry(full_url("Observation", ident["system"], ident["value"]), obs, ident)
    return entry, critical


def _memo(ctx: LabContext, key: tuple[str, ...], compute: Callable[..., Any], *args: Any) -> Any:
    """``compute(ctx, *args)``, once per message for each ``key`` (the raw fields it reads) —
    unless it warned, so that every segment with a doubtful value gets its own warning. The
    result is shared by the resources that use it (read-only)."""
    memo = ctx.memo
    if key in memo:
        return memo[key]
    count = len(ctx.warnings)
    out = compute(ctx, *args)
    if len(ctx.warnings) == count:
        memo[key] = out
    return out


def _performer_refs(ctx: LabContext, obx: Segment) -> list[Json]:
    found = (
        _organization_xon(ctx, obx, 23),  # OBX-23 performing organization name (v2.5+)
        _organization_ce(ctx, obx, 15),  # OBX-15 producer's ID
        practitioner_reference(ctx, obx, 16),  # OBX-16 responsible observer
    )
    return [p for p in found if p is not None]


def _performers(ctx: LabContext, obx: Segment, f: list[str], default: str | None) -> list[Json]:
    """OBX-23 performing organization (v2.5+), OBX-15 producer's ID and OBX-16 responsible
    observer → Observation.performer; the report's performer when they name nobody. Each
    reference is the Observation's own (the caller may rewrite it)."""
    found: list[Json] = []
    if f[23] or f[15] or f[16]:
        found = _memo(ctx, ("performers", f[23], f[15], f[16]), _performer_refs, obx)
    if found:
        return [dict(p) for p in found]
    return [{"reference": default}] if default else []


def _report(
    ctx: LabContext, order: _Order, subject: str, organization: str | None
) -> LabReport | None:
    """One ORDER_OBSERVATION group → the DiagnosticReport, its Observations and Specimens."""
    obr = order.obr
    if obr is None:
        assert order.orc is not None
        ctx.error(
            SEGMENT_SEQUENCE_ERROR,
            "an ORC segment is not followed by its OBR: results belong to an observation request",
            order.orc,
            None,
        )
        return None
    orc = order.orc
    # OBR-2/ORC-2 placer and OBR-3/ORC-3 filler order numbers → identifier PLAC/FILL (§4.5.3)
    placer = order_number(ctx, (obr, 2), (orc, 2), type_code="PLAC")
    filler = order_number(ctx, (obr, 3), (orc, 3), type_code="FILL")
    if filler is None and placer is None:
        ctx.error(
            REQUIRED_FIELD_MISSING,
            f"{_name(obr, 3)} (filler order number) is empty, and so are OBR-2, ORC-2 and "
            "ORC-3: the result has no number to be filed and corrected by",
            obr,
            3,
            component=1,
        )
        return None
    if filler is None:
        ctx.warn(
            REQUIRED_FIELD_MISSING,
            f"{_name(obr, 3)} (filler order number) is empty; the result is filed by the "
            "placer order number",
            obr,
            3,
            component=1,
        )
    key = key_of(filler or placer or {})
    report_url = full_url("DiagnosticReport", key["system"], key["value"])
    r = ctx.reader
    code = codeable_concept(ctx, r.reps(obr.get(4))[0]) if obr.get(4) else None
    if code is None:
        ctx.error(
            REQUIRED_FIELD_MISSING,
            f"{_name(obr, 4)} (universal service identifier) is empty",
            obr,
            4,
            component=1,
        )
    status = _status(ctx, obr, 25, _OBR_STATUS, "result status") or "unknown"
    effective = ctx.when(obr, 7, "observation date/time")  # OBR-7 → effectiveDateTime
    issued = ctx.when(obr, 22, "results report/status change time", instant=True)  # OBR-22
    specimens = specimens_of(ctx, order.specimens, obr, key, subject, effective)
    order_ident = placer or filler or {}
    defaults: Json = {
        "status": status,
        "effective": effective,
        "issued": issued,
        "performer": organization,
        "specimen": specimens[0].full_url if specimens else None,
    }
    observations: list[Entry] = []
    critical: list[Entry] = []
    seen: set[str] = set()
    for obx, notes in order.observations:
        mapped = _observation(ctx, obx, notes, key, subject, order_ident, defaults, seen)
        if mapped is None:
            continue
        observations.append(mapped[0])
        if mapped[1]:
            critical.append(mapped[0])
    report: Json = {
        "resourceType": "DiagnosticReport",
        "identifier": [i for i in (filler, placer) if i],
        # the order it answers, by number: the caller links it to a ServiceRequest it has
        "basedOn": [{"type": "ServiceRequest", "identifier": order_ident}],
        "status": status,
        "category": [
            {
                "coding": [
                    {"system": DIAGNOSTIC_SERVICE_SECTION, "code": "LAB", "display": "Laboratory"}
                ]
            }
        ],
    }
    if code is not None:
        report["code"] = code  # OBR-4 → DiagnosticReport.code (§4.5.3.4)
    report["subject"] = {"reference": subject}
    if effective:
        report["effectiveDateTime"] = effective
    if issued:
        report["issued"] = issued
    if organization:
        report["performer"] = [{"reference": organization}]
    if specimens:
        report["specimen"] = [{"reference": s.full_url} for s in specimens]
    if observations:
        report["result"] = [{"reference": o.full_url} for o in observations]
    entry = Entry(report_url, report, key)
    return LabReport(entry, observations, specimens, critical, placer, filler)


def no_authority(_namespace: str) -> str | None:
    """The default ``system_for_authority``: no CX.4 namespace names a registered MO."""
    return None


def map_oru(
    msg: Message,
    *,
    local_code_system: str,
    default_system: str | None,
    system_for_authority: Callable[[str], str | None] = no_authority,
    organization: str | None = None,
    today: date | None = None,
) -> OruMessage:
    """Map one parsed ORU^R01 (v2.3–2.5.1) to FHIR R4 resources.

    ``local_code_system`` is the sending MO's system for its own lab codes;
    ``default_system`` and ``system_for_authority`` resolve PID-3 as for ADT
    (:class:`~hie.registries.pid.PidContext`); ``organization`` (``Organization/<id>``, the
    sending MO) is the report's performer and, where OBX-15/16/23 name nobody, the
    results'. ``today`` bounds plausible birth dates.

    Raises :class:`Hl7Problem` (reject, AR) only for header problems: not ORU^R01 (200/201),
    an unsupported version (203) or processing ID (202), no MSH-10 (101); anything unexpected
    becomes code 207, never another exception. Everything else is collected in the result's
    ``errors`` (AE) and ``warnings``.
    """
    check_header(msg.header, ORU_MESSAGES)
    try:
        return _map_oru(
            msg, local_code_system, default_system, system_for_authority, organization, today
        )
    except Hl7Problem:
        raise
    except Exception as exc:  # the edge must always be able to answer; 207 is "internal"
        raise internal_error(exc) from exc


def internal_error(exc: Exception) -> Hl7Problem:
    """Code 207 (application internal error) for an exception a mapping did not expect."""
    return Hl7Problem(
        APPLICATION_INTERNAL_ERROR,
        f"internal error while mapping the message ({type(exc).__name__})",
    )


def _map_oru(
    msg: Message,
    local_code_system: str,
    default_system: str | None,
    system_for_authority: Callable[[str], str | None],
    organization: str | None,
    today: date | None,
) -> OruMessage:
    ctx = LabContext.of(msg, local_code_system)
    bound = today or latest_today()
    patients: list[PatientResult] = []
    groups = _groups(ctx, msg.segments)
    if not any(g.orders for g in groups):
        ctx.errors.append(
            Hl7Problem(
                SEGMENT_SEQUENCE_ERROR,
                "the message has no OBR segment: ORU^R01 carries at least one order's results",
                "OBR",
            )
        )
    for group in groups:
        if group.pid is None:
            ctx.errors.append(
                Hl7Problem(
                    SEGMENT_SEQUENCE_ERROR,
                    "the results have no PID segment before them: the hub files results to "
                    "a patient",
                    "PID",
                )
            )
            continue
        patient = map_patient(ctx, group.pid, default_system, system_for_authority, bound)
        if patient is None:
            continue
        reports = [_report(ctx, order, patient.full_url, organization) for order in group.orders]
        patients.append(PatientResult(patient, [rep for rep in reports if rep is not None]))
    return OruMessage(
        header=msg.header, errors=ctx.errors, warnings=ctx.warnings, patients=patients
    )
