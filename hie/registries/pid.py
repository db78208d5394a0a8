"""HL7 v2 PID → FHIR R4 Patient: the person as the sending MO knows them (pure functions).

Shared by every message that carries a PID: ADT for the master patient index
(:mod:`hie.registries.adt`), lab results and orders (:mod:`hie.lab_exchange`).
:func:`patient_from_pid` maps identifiers (PID-3, PID-19) with the MO's systems and the national
ones, names, addresses, telecoms, birth date and death (HL7 v2.5.1 §3.4.2); :func:`cx_identifiers`
maps any repeating CX field (MRG-1 too).

Problems are :class:`~hie.adapters.hl7v2.Hl7Problem`: invalid values raise (application error,
AE), doubtful ones are collected in :attr:`PidContext.warnings`. Messages never quote names or
identifier values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Final

from hie.adapters.hl7v2 import (
    DATA_TYPE_ERROR,
    DEFAULT_UTC_OFFSET,
    DTM,
    REQUIRED_FIELD_MISSING,
    TABLE_VALUE_NOT_FOUND,
    Hl7Problem,
    Reader,
    Segment,
    dtm_offset,
    latest_today,
)
from hie.registries.identifiers import (
    IDENTIFIER_TYPE_SYSTEM,
    NATIONAL_SYSTEMS,
    OMS_SYSTEM,
    PASSPORT_SYSTEM,
    SNILS_SYSTEM,
    IdentifierError,
    normalise_identifier,
    normalise_system,
)
from hie.registries.mpi.features import EARLIEST_BIRTH_YEAR

EN_QUALIFIER_URL = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-qualifier"


# --- dates -------------------------------------------------------------------------------


def _dtm_date(
    value: str, where: str, seg: Segment, field_no: int, what: str, today: date
) -> tuple[re.Match[str], str]:
    """Check the date part of a DTM; return the match and the FHIR date (YYYY[-MM[-DD]])."""

    def bad(reason: str) -> Hl7Problem:
        return Hl7Problem(
            DATA_TYPE_ERROR,
            f"{where} ({what}) {reason}",
            seg.name,
            seg.sequence,
            field_no,
            component=1,
        )

    m = DTM.fullmatch(value)
    if m is None:
        raise bad("is not an HL7 date/time (YYYY[MM[DD[HHMM[SS]]]][+ZZZZ])")
    year, month, day = int(m[1]), m[2], m[3]
    if month is not None and not 1 <= int(month) <= 12:
        raise bad("has a month that does not exist")
    if day is not None:
        try:
            date(year, int(month or 1), int(day))
        except ValueError:
            raise bad("is not a calendar date") from None
    if year < EARLIEST_BIRTH_YEAR:
        raise bad(f"is before {EARLIEST_BIRTH_YEAR}")
    if date(year, int(month or 1), int(day or 1)) > today:
        raise bad("is in the future")
    fhir = m[1] + (f"-{month}" if month else "") + (f"-{day}" if day else "")
    return m, fhir


# --- identifiers ---------------------------------------------------------------------------

_OID = re.compile(r"[0-2](?:\.(?:0|[1-9]\d*))+", re.ASCII)
_URI = re.compile(r"(?:https?://|urn:)\S+", re.IGNORECASE)
_SNILS_NAMES = frozenset({"SNILS", "СНИЛС"})
_OMS_NAMES = frozenset({"ENP", "OMS", "ОМС", "ЕНП"})
_PASSPORT_NAMES = frozenset({"PASSPORT", "ПАСПОРТ"})
# Table 0203 types that mean "the MO's own number for the patient".
_LOCAL_TYPES = frozenset({"", "MR", "PI", "PN"})
_REASONS: Final = {
    "malformed-snils": "a SNILS has 11 digits",
    "invalid-snils-checksum": "the SNILS check number does not match its first nine digits",
    "malformed-oms": "an OMS policy number (ENP) has 16 digits",
    "invalid-oms-check-digit": "the OMS policy check digit does not match the number",
    "malformed-passport": "a passport is a 4-digit series and a 6-digit number",
}
_TITLES: Final = {SNILS_SYSTEM: "SNILS", OMS_SYSTEM: "OMS policy", PASSPORT_SYSTEM: "passport"}
_SSN_NOISE = re.compile(r"[\s\-.]")


def _no_authority(_namespace: str) -> str | None:
    return None


@dataclass(slots=True)
class PidContext:
    """What mapping a PID needs to know about the sender, and where its warnings go.

    ``default_system`` is the sending MO's registered patient-id system, used for PID-3
    numbers typed MR/PI/PN (or untyped) whose authority is not otherwise resolved;
    ``system_for_authority`` maps a CX.4 namespace ID to a system (the facility registry);
    ``today`` bounds plausible dates; ``sender_offset`` is MSH-7's UTC offset (``+HH:MM``),
    the zone of times sent without one.
    """

    reader: Reader
    default_system: str | None
    system_for_authority: Callable[[str], str | None] = _no_authority
    today: date = field(default_factory=latest_today)
    sender_offset: str | None = None
    warnings: list[Hl7Problem] = field(default_factory=list)

    def warn(self, code: str, message: str, seg: Segment, field_no: int, **kw: Any) -> None:
        """Record a warning located at ``seg``-``field_no`` (keywords: component, repetition)."""
        self.warnings.append(Hl7Problem(code, message, seg.name, seg.sequence, field_no, **kw))


def where(seg: Segment, field_no: int, rep: int | None = None) -> str:
    """``PID-3 repetition 2 (segment PID number 2)``: a field named for a problem's text."""
    out = f"{seg.name}-{field_no}"
    if rep is not None:
        out += f" repetition {rep}"
    if seg.sequence > 1:
        out += f" (segment {seg.name} number {seg.sequence})"
    return out


def _resolve_system(ctx: PidContext, namespace: str, universal: str, type_code: str) -> str | None:
    """The identifier system of a CX, from its assigning authority (CX.4) and type (CX.5)."""
    # HD.2 universal ID; some senders put the OID or URI in HD.1 instead.
    authority = universal or (namespace if _OID.fullmatch(namespace) else "")
    if not authority and _URI.fullmatch(namespace):
        authority = namespace
    if _OID.fullmatch(authority):
        return normalise_system(authority)  # the SNILS OID gives SNILS_SYSTEM itself
    if _URI.fullmatch(authority):
        return authority
    ns = namespace.upper()
    if type_code in _SNILS_NAMES or ns in _SNILS_NAMES:
        return SNILS_SYSTEM
    if type_code in _OMS_NAMES or ns in _OMS_NAMES:
        return OMS_SYSTEM
    if type_code == "PPN" or ns in _PASSPORT_NAMES:
        return PASSPORT_SYSTEM
    if namespace:
        found = ctx.system_for_authority(namespace)
        if found and normalise_system(found):
            return normalise_system(found)
    if type_code in _LOCAL_TYPES and ctx.default_system:
        return normalise_system(ctx.default_system) or None
    return None


def _checked_value(system: str, value: str, seg: Segment, field_no: int, rep: int | None) -> str:
    try:
        return normalise_identifier(system, value)
    except IdentifierError as exc:
        title = _TITLES.get(system, "identifier")
        reason = _REASONS.get(exc.reason, "the value is not valid")
        # ``from None``: the IdentifierError's own text quotes check digits.
        raise Hl7Problem(
            DATA_TYPE_ERROR,
            f"{where(seg, field_no, rep)} ({title}): {exc.reason}: {reason}",
            seg.name,
            seg.sequence,
            field_no,
            component=1,
            repetition=rep,
        ) from None


def cx_identifiers(ctx: PidContext, seg: Segment, field_no: int) -> list[dict[str, Any]]:
    """A repeating CX field (PID-3, MRG-1) as FHIR Identifiers (HL7 v2.5.1 ch. 2A, CX)."""
    r = ctx.reader
    out: list[dict[str, Any]] = []
    for rep_no, rep in enumerate(r.reps(seg.get(field_no)), 1):
        value = r.comp(rep, 1)  # CX.1 ID number
        if not value:
            if r.text(rep.replace(r.component, "").replace(r.subcomponent, "")):
                ctx.warn(
                    REQUIRED_FIELD_MISSING,
                    f"{where(seg, field_no, rep_no)} has no ID number (CX.1); ignored",
                    seg,
                    field_no,
                    component=1,
                    repetition=rep_no,
                )
            continue
        namespace = r.comp(rep, 4, 1)  # CX.4 assigning authority: HD.1 namespace ID
        universal = r.comp(rep, 4, 2)  # HD.2 universal ID (an OID when HD.3 is ISO)
        type_code = r.comp(rep, 5).upper()  # CX.5 identifier type code (table 0203)
        system = _resolve_system(ctx, namespace, universal, type_code)
        if system is None:
            raise Hl7Problem(
                TABLE_VALUE_NOT_FOUND,
                f"{where(seg, field_no, rep_no)}: the identifier system cannot be resolved — "
                "its assigning authority (CX.4) and type (CX.5) match no national system and "
                "no system registered for the sender, and no default system applies",
                seg.name,
                seg.sequence,
                field_no,
                component=4,
                repetition=rep_no,
            )
        ident: dict[str, Any] = {
            "system": system,
            "value": _checked_value(system, value, seg, field_no, rep_no),
        }
        if system == PASSPORT_SYSTEM:
            ident["type"] = {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "PPN"}]}
        elif system not in NATIONAL_SYSTEMS:
            if type_code in _LOCAL_TYPES:
                code = type_code or "MR"  # an untyped local number is the record number
                ident["type"] = {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": code}]}
            else:
                ident["type"] = {"text": type_code}
        if not any(o["system"] == ident["system"] and o["value"] == ident["value"] for o in out):
            out.append(ident)
    return out


def _ssn_snils(ctx: PidContext, seg: Segment, identifiers: list[dict[str, Any]]) -> None:
    """PID-19 (SSN number) holding 11 digits is a SNILS in Russian feeds (§3.4.2.19)."""
    value = ctx.reader.text(seg.get(19))
    if not value:
        return
    digits = _SSN_NOISE.sub("", value)
    if len(digits) != 11 or not digits.isascii() or not digits.isdigit():
        ctx.warn(DATA_TYPE_ERROR, "PID-19 (SSN) is not an 11-digit SNILS; ignored", seg, 19)
        return
    snils = _checked_value(SNILS_SYSTEM, digits, seg, 19, None)
    known = [i["value"] for i in identifiers if i["system"] == SNILS_SYSTEM]
    if snils in known:
        return
    if known:
        ctx.warn(
            DATA_TYPE_ERROR,
            "PID-19 (SSN) holds a SNILS different from the one in PID-3; PID-19 ignored",
            seg,
            19,
        )
        return
    identifiers.append({"system": SNILS_SYSTEM, "value": snils})


# --- names, addresses, telecom -------------------------------------------------------------

# XPN.7 name type (table 0200) → HumanName.use; U (unspecified) and empty give no use.
_NAME_USE: Final = {"L": "official", "M": "maiden", "N": "nickname", "S": "anonymous", "U": None}


def _padded(comps: list[str], n: int) -> list[str]:
    """``comps`` with empty strings up to ``n`` (absent trailing components are empty)."""
    return comps + [""] * (n - len(comps)) if len(comps) < n else comps


def _names(ctx: PidContext, seg: Segment) -> list[dict[str, Any]]:
    """PID-5 patient name (XPN, repeating) → Patient.name (HL7 v2.5.1 §3.4.2.5)."""
    r = ctx.reader
    out: list[dict[str, Any]] = []
    for rep in r.reps(seg.get(5)):
        c = _padded(r.comps(rep), 7)  # each component's first subcomponent
        family = c[0]  # XPN.1 family name, FN.1 surname
        given = c[1]  # XPN.2 given name
        patronymic = c[2]  # XPN.3 second and further given names: the отчество
        if not (family or given or patronymic):
            continue
        name: dict[str, Any] = {}
        type_code = c[6].upper()  # XPN.7 name type code
        use = _NAME_USE.get(type_code, "usual") if type_code else None
        if use:
            name["use"] = use
        name["text"] = " ".join(p for p in (family, given, patronymic) if p)
        if family:
            name["family"] = family
        if given:
            name["given"] = [given, patronymic] if patronymic else [given]
        elif patronymic:
            # Alone, the patronymic would read as the first name: mark it ISO 21090 MID.
            name["given"] = [patronymic]
            name["_given"] = [{"extension": [{"url": EN_QUALIFIER_URL, "valueCode": "MID"}]}]
        suffixes = [s for s in (c[3], c[5]) if s]  # XPN.4 suffix, XPN.6 degree
        prefix = c[4]  # XPN.5 prefix
        if prefix:
            name["prefix"] = [prefix]
        if suffixes:
            name["suffix"] = suffixes
        out.append(name)
    return out


# XAD.7 address type (table 0190) → Address.use / Address.type.
_ADDRESS_USE: Final[dict[str, tuple[str | None, str | None]]] = {
    "H": ("home", None),
    "P": ("home", None),
    "B": ("work", None),
    "O": ("work", None),
    "C": ("temp", None),
    "BA": ("old", None),
    "M": (None, "postal"),
}


def _addresses(ctx: PidContext, seg: Segment) -> list[dict[str, Any]]:
    """PID-11 patient address (XAD, repeating) → Patient.address (HL7 v2.5.1 §3.4.2.11)."""
    r = ctx.reader
    out: list[dict[str, Any]] = []
    for rep in r.reps(seg.get(11)):
        # XAD.1 SAD: street or mailing address, else street name + dwelling number.
        street = r.comp(rep, 1, 1) or " ".join(
            p for p in (r.comp(rep, 1, 2), r.comp(rep, 1, 3)) if p
        )
        c = _padded(r.comps(rep), 7)
        other = c[1]  # XAD.2 other designation (flat, building)
        city = c[2]  # XAD.3
        state = c[3]  # XAD.4 state or province (субъект РФ)
        postal = c[4]  # XAD.5 zip or postal code
        country = c[5]  # XAD.6 country (ISO 3166)
        kind = c[6].upper()  # XAD.7 address type
        lines = [p for p in (street, other) if p]
        if not (lines or city or state or postal or country):
            continue
        addr: dict[str, Any] = {}
        use, type_ = _ADDRESS_USE.get(kind, (None, None))
        if use:
            addr["use"] = use
        if type_:
            addr["type"] = type_
        # Postcode first, then region, city and street: the order Russian records use.
        parts: list[str] = []
        for p in (postal, state, city, *lines):
            if p and p not in parts:
                parts.append(p)
        addr["text"] = ", ".join(parts)
        if lines:
            addr["line"] = lines
        for key, value in (
            ("city", city),
            ("state", state),
            ("postalCode", postal),
            ("country", country),
        ):
            if value:
                addr[key] = value
        out.append(addr)
    return out


# XTN.1 digits and the usual punctuation, with an optional extension (X123, ext. 123, доб. 123).
_PHONE = re.compile(r"\+?[\d\s().\-]+(?:\s*(?:[xX]|ext\.?|доб\.?)\s*\d+)?", re.ASCII)
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_MIN_PHONE_DIGITS = 5


def _telecoms(ctx: PidContext, seg: Segment, field_no: int) -> list[dict[str, Any]]:
    """PID-13 home / PID-14 business phone (XTN) → Patient.telecom (§3.4.2.13, §3.4.2.14)."""
    r = ctx.reader
    base_use = "home" if field_no == 13 else "work"
    out: list[dict[str, Any]] = []
    for rep_no, rep in enumerate(r.reps(seg.get(field_no)), 1):
        c = _padded(r.comps(rep), 12)
        use_code = c[1].upper()  # XTN.2 telecommunication use code (table 0201)
        equipment = c[2].upper()  # XTN.3 telecommunication equipment type (0202)
        email = c[3]  # XTN.4 communication address
        formatted = c[0]  # XTN.1 [NNN] [(999)]999-9999 [X99999] [C any text]
        unformatted = c[11]  # XTN.12 unformatted telephone number
        country, area, local = c[4], c[5], c[6]  # XTN.5 country, XTN.6 area, XTN.7 local
        extension = c[7]  # XTN.8
        if not (formatted or email or unformatted or local):
            continue
        use = {"WPN": "work", "PRN": "home", "ORN": "home", "VHN": "temp"}.get(use_code, base_use)
        entry: dict[str, Any]
        if equipment in ("INTERNET", "X.400") or use_code == "NET":
            address = email or formatted
            if equipment == "X.400" or not _EMAIL.fullmatch(address):
                ctx.warn(
                    DATA_TYPE_ERROR,
                    f"{where(seg, field_no, rep_no)} is not an e-mail address; dropped",
                    seg,
                    field_no,
                    component=4,
                    repetition=rep_no,
                )
                continue
            entry = {"system": "email", "value": address, "use": use}
        else:
            if local:
                number = " ".join(
                    p for p in (f"+{country.lstrip('+')}" if country else "", area, local) if p
                )
                if extension:
                    number += f" ext. {extension}"
            else:
                number = unformatted or formatted
            digits = sum(ch.isdigit() for ch in number)
            if not _PHONE.fullmatch(number) or digits < _MIN_PHONE_DIGITS:
                ctx.warn(
                    DATA_TYPE_ERROR,
                    f"{where(seg, field_no, rep_no)} is not a telephone number; dropped",
                    seg,
                    field_no,
                    component=1,
                    repetition=rep_no,
                )
                continue
            system = {"FX": "fax", "BP": "pager"}.get(equipment, "phone")
            entry = {"system": system, "value": number, "use": use}
            if equipment == "CP":
                entry["use"] = "mobile"
        out.append(entry)
    return out


# --- the patient ---------------------------------------------------------------------------

# PID-8 administrative sex (table 0001) → Patient.gender; М/Ж are what Russian MIS type.
_GENDER: Final = {
    "M": "male",
    "F": "female",
    "O": "other",
    "A": "other",
    "U": "unknown",
    "N": "unknown",
    "М": "male",
    "Ж": "female",
}


def _birth_date(ctx: PidContext, seg: Segment) -> str | None:
    """PID-7 date/time of birth (TS) → Patient.birthDate; the time is dropped (§3.4.2.7)."""
    value = ctx.reader.comp(seg.get(7), 1)  # TS.1
    if not value:
        return None
    _m, fhir = _dtm_date(value, where(seg, 7), seg, 7, "date of birth", ctx.today)
    return fhir


def _deceased(ctx: PidContext, seg: Segment, patient: dict[str, Any]) -> None:
    """PID-29 death date and time → deceasedDateTime, else PID-30 death indicator → Boolean."""
    r = ctx.reader
    when = r.comp(seg.get(29), 1)  # PID-29 patient death date and time (TS.1)
    indicator = r.text(seg.get(30)).upper()  # PID-30 patient death indicator (Y/N)
    if indicator not in ("", "Y", "N"):
        ctx.warn(TABLE_VALUE_NOT_FOUND, "PID-30 (death indicator) is not Y or N; ignored", seg, 30)
        indicator = ""
    if when:
        m, fhir = _dtm_date(when, where(seg, 29), seg, 29, "date of death", ctx.today)
        if m[4] is not None:
            hour, minute, second = int(m[4]), int(m[5] or 0), int(m[6] or 0)
            if hour > 23 or minute > 59 or second > 59:
                raise Hl7Problem(
                    DATA_TYPE_ERROR,
                    f"{where(seg, 29)} (date of death) has a time that does not exist",
                    seg.name,
                    seg.sequence,
                    29,
                    component=1,
                )
            if m[8] and dtm_offset(m) is None:
                raise Hl7Problem(
                    DATA_TYPE_ERROR,
                    f"{where(seg, 29)} (date of death) has a time zone offset that does not exist",
                    seg.name,
                    seg.sequence,
                    29,
                    component=1,
                )
            # FHIR dateTime with a time needs seconds and a zone.
            offset = dtm_offset(m) or ctx.sender_offset or DEFAULT_UTC_OFFSET
            fhir += f"T{hour:02d}:{minute:02d}:{second:02d}{m[7] or ''}{offset}"
        if indicator == "N":
            ctx.warn(
                DATA_TYPE_ERROR,
                "PID-30 (death indicator) is N but PID-29 has a death date; the date is kept",
                seg,
                30,
            )
        patient["deceasedDateTime"] = fhir
    elif indicator:
        patient["deceasedBoolean"] = indicator == "Y"


def patient_from_pid(ctx: PidContext, seg: Segment) -> dict[str, Any]:
    """One PID segment as a FHIR R4 Patient dict (HL7 v2.5.1 §3.4.2).

    Raises :class:`Hl7Problem` (AE) for a PID-3 system that cannot be resolved (103), a
    SNILS/OMS/passport that fails its check or an impossible date (102), no name (101);
    doubtful values are dropped with a warning in ``ctx.warnings``.
    """
    r = ctx.reader
    patient: dict[str, Any] = {"resourceType": "Patient"}
    identifiers = cx_identifiers(ctx, seg, 3)  # PID-3 → Patient.identifier (§3.4.2.3)
    _ssn_snils(ctx, seg, identifiers)  # PID-19 SSN number → SNILS (§3.4.2.19)
    if identifiers:
        patient["identifier"] = identifiers
    names = _names(ctx, seg)  # PID-5 → Patient.name (§3.4.2.5)
    if not names:
        raise Hl7Problem(
            REQUIRED_FIELD_MISSING,
            f"{where(seg, 5)} (patient name) has no family, given or second name",
            seg.name,
            seg.sequence,
            5,
        )
    patient["name"] = names
    # PID-13 home, PID-14 business phone → Patient.telecom (§3.4.2.13, §3.4.2.14)
    telecom = _telecoms(ctx, seg, 13) + _telecoms(ctx, seg, 14)
    unique = [t for i, t in enumerate(telecom) if t not in telecom[:i]]
    if unique:
        patient["telecom"] = unique
    sex = r.text(seg.get(8)).upper()  # PID-8 → Patient.gender (§3.4.2.8)
    if sex in _GENDER:
        patient["gender"] = _GENDER[sex]
    elif sex:
        ctx.warn(TABLE_VALUE_NOT_FOUND, "PID-8 (administrative sex) is not in table 0001", seg, 8)
    born = _birth_date(ctx, seg)  # PID-7 → Patient.birthDate (§3.4.2.7)
    if born:
        patient["birthDate"] = born
    _deceased(ctx, seg, patient)  # PID-29, PID-30 → Patient.deceased[x] (§3.4.2.29, §3.4.2.30)
    addresses = _addresses(ctx, seg)  # PID-11 → Patient.address (§3.4.2.11)
    if addresses:
        patient["address"] = addresses
    return patient
