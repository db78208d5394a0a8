"""What the matcher compares: :class:`PersonFeatures` extracted from a FHIR Patient dict.

:func:`person_features` reads a Patient (plain FHIR R4 JSON, as stored) once and keeps only
normalised, comparable values:

- identifiers — ``(system, value)`` in canonical form (``normalise_identifier`` of
  :mod:`hie.registries.identifiers`); national ones (SNILS, OMS, passport) also in
  :attr:`~PersonFeatures.national`. A national identifier that fails its check is reported and
  left out, so a mistyped SNILS can never link two people.
- names — the official (else usual, else first current) ``HumanName``: family, given and the
  patronymic, which Russian practice sends as the second ``given`` (ФИО = family, given[0],
  given[1]); a ``given`` marked with the ISO 21090 ``EN-qualifier`` ``MID`` or a name extension
  whose URL ends in ``patronymic`` / ``middle-name`` also counts. Without parts, ``text`` is
  read as «Фамилия Имя Отчество». Each name gets a ``matching_key`` and a ``phonetic_key``
  (:mod:`hie.registries.translit`).
- birth date — a :class:`~datetime.date` (or only the year of a partial ``YYYY``/``YYYY-MM``);
  an impossible one (not a calendar date, in the future, before 1880) is a :class:`Problem`
  and is not used.
- gender; phones as their last 10 digits (+7 / 8 trunk prefixes dropped); the home address as
  postal code, a street key (street type words dropped) and house (``д. 5, корп. 2`` → ``5к2``)
  with flat.

:func:`validate_demographics` returns the :class:`Problem` list alone, for the bad-input rules
of the registries issue: invalid SNILS checksum, malformed identifiers, impossible birth date,
empty name, identifier without system (and, given a registry lookup, a system no MO
registered).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal

from hie.registries.identifiers import (
    NATIONAL_SYSTEMS,
    IdentifierError,
    normalise_identifier,
    normalise_system,
)
from hie.registries.translit import matching_key, phonetic_key

# Nobody alive was born before this; older dates are entry errors (1800 for 1980 and so on).
EARLIEST_BIRTH_YEAR = 1880

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One bad-input finding: a stable ``code``, a message and the element it is about.

    ``expression`` is a FHIRPath-like location (``Patient.identifier[0].value``) for the
    OperationOutcome the edge builds; messages never repeat a person's name or full number.
    """

    code: str
    message: str
    expression: str
    severity: Severity = "error"


@dataclass(frozen=True, slots=True)
class PersonFeatures:
    """The normalised, comparable facts about one person record (see the module docstring)."""

    identifiers: tuple[tuple[str, str], ...] = ()
    national: Mapping[str, str] = field(default_factory=dict)
    family: str = ""
    given: str = ""
    middle: str = ""
    family_key: str = ""
    given_key: str = ""
    middle_key: str = ""
    family_phonetic: str = ""
    given_phonetic: str = ""
    middle_phonetic: str = ""
    birth_date: date | None = None
    birth_year: int | None = None
    gender: str | None = None
    phones: tuple[str, ...] = ()
    postal_code: str | None = None
    street_key: str | None = None
    house: str | None = None
    flat: str | None = None
    problems: tuple[Problem, ...] = ()

    @property
    def local_identifiers(self) -> tuple[tuple[str, str], ...]:
        """Identifiers that are not national (MO-local record numbers and the like)."""
        return tuple(p for p in self.identifiers if p[0] not in NATIONAL_SYSTEMS)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for a cache column beside the golden record); problems omitted."""
        return {
            "identifiers": [list(p) for p in self.identifiers],
            "names": [self.family, self.given, self.middle],
            "birth_date": self.birth_date.isoformat() if self.birth_date else None,
            "birth_year": self.birth_year,
            "gender": self.gender,
            "phones": list(self.phones),
            "address": [self.postal_code, self.street_key, self.house, self.flat],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PersonFeatures:
        """Rebuild features saved by :meth:`to_json` (keys are recomputed, never trusted)."""
        identifiers = tuple((str(s), str(v)) for s, v in data.get("identifiers", []))
        national: dict[str, str] = {}
        for system, value in identifiers:
            if system in NATIONAL_SYSTEMS:
                national.setdefault(system, value)
        family, given, middle = (str(x) for x in data.get("names", ["", "", ""]))
        fk, gk, mk = matching_key(family), matching_key(given), matching_key(middle)
        born = data.get("birth_date")
        postal, street, house, flat = data.get("address", [None, None, None, None])
        return cls(
            identifiers=identifiers,
            national=national,
            family=family,
            given=given,
            middle=middle,
            family_key=fk,
            given_key=gk,
            middle_key=mk,
            family_phonetic=phonetic_key(fk),
            given_phonetic=phonetic_key(gk),
            middle_phonetic=phonetic_key(mk),
            birth_date=date.fromisoformat(born) if born else None,
            birth_year=data.get("birth_year"),
            gender=data.get("gender"),
            phones=tuple(data.get("phones", [])),
            postal_code=postal,
            street_key=street,
            house=house,
            flat=flat,
        )


# --- names ---------------------------------------------------------------------------------

_EN_QUALIFIER = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-qualifier"
_NAME_USE_ORDER = {"official": 0, "usual": 1, None: 2, "temp": 3, "nickname": 4}
_SKIPPED_NAME_USES = frozenset({"old", "maiden", "anonymous"})


def _is_middle_extension(url: str) -> bool:
    tail = url.rstrip("/").rsplit("/", 1)[-1].lower().replace("_", "-")
    return tail in {"patronymic", "middle-name", "middlename", "humanname-patronymic"}


def _pick_name(names: Sequence[Any]) -> Mapping[str, Any] | None:
    """The name to match on: official, else usual, else one without ``use``; never old."""
    usable = [n for n in names if isinstance(n, Mapping) and n.get("use") not in _SKIPPED_NAME_USES]
    if not usable:
        usable = [n for n in names if isinstance(n, Mapping)]
    if not usable:
        return None
    return min(usable, key=lambda n: _NAME_USE_ORDER.get(n.get("use"), 5))


def _name_parts(name: Mapping[str, Any]) -> tuple[str, str, str]:
    """(family, given, patronymic) of a HumanName, by Russian practice (see module docstring)."""
    family = _text(name.get("family"))
    given_list = [_text(g) for g in name.get("given") or [] if _text(g)]
    middle = ""
    # A given marked MID (ISO 21090 EN qualifier on the primitive's extension).
    for i, ext_holder in enumerate(name.get("_given") or []):
        if not isinstance(ext_holder, Mapping) or i >= len(name.get("given") or []):
            continue
        for ext in ext_holder.get("extension") or []:
            if ext.get("url") == _EN_QUALIFIER and ext.get("valueCode") == "MID":
                middle = _text((name.get("given") or [])[i])
    for ext in name.get("extension") or []:
        if isinstance(ext, Mapping) and _is_middle_extension(str(ext.get("url", ""))):
            middle = middle or _text(ext.get("valueString"))
    if middle:
        given_list = [g for g in given_list if g != middle]
        given = given_list[0] if given_list else ""
    else:
        given = given_list[0] if given_list else ""
        middle = given_list[1] if len(given_list) > 1 else ""
    if not family and not given and not middle:
        # Only text: «Фамилия Имя Отчество» (ФИО order).
        words = _text(name.get("text")).replace(",", " ").split()
        family = words[0] if words else ""
        given = words[1] if len(words) > 1 else ""
        middle = " ".join(words[2:])
    return family, given, middle


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


# --- birth date ----------------------------------------------------------------------------

_BIRTH_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def _birth(value: Any, today: date, problems: list[Problem]) -> tuple[date | None, int | None]:
    """Parse ``birthDate`` (FHIR ``date``: YYYY, YYYY-MM or YYYY-MM-DD) and flag bad ones."""
    if value is None:
        return None, None
    m = _BIRTH_DATE.match(value) if isinstance(value, str) else None
    if m is None:
        problems.append(
            Problem(
                "malformed-birth-date",
                "birthDate must be YYYY, YYYY-MM or YYYY-MM-DD",
                "Patient.birthDate",
            )
        )
        return None, None
    year = int(m.group(1))
    month = int(m.group(2)) if m.group(2) else None
    day = int(m.group(3)) if m.group(3) else None
    born: date | None = None
    if month is not None and not 1 <= month <= 12:
        problems.append(
            Problem(
                "impossible-birth-date",
                f"birthDate {value} has no month {month}",
                "Patient.birthDate",
            )
        )
        return None, None
    if month is not None and day is not None:
        try:
            born = date(year, month, day)
        except ValueError:
            problems.append(
                Problem(
                    "impossible-birth-date",
                    f"birthDate {value} is not a calendar date",
                    "Patient.birthDate",
                )
            )
            return None, None
    if year < EARLIEST_BIRTH_YEAR:
        problems.append(
            Problem(
                "impossible-birth-date",
                f"birthDate {value} is before {EARLIEST_BIRTH_YEAR}",
                "Patient.birthDate",
            )
        )
        return None, None
    if (born or date(year, month or 1, 1)) > today:
        problems.append(
            Problem(
                "impossible-birth-date",
                f"birthDate {value} is in the future",
                "Patient.birthDate",
            )
        )
        return None, None
    return born, year


# --- phones and addresses ------------------------------------------------------------------


def normalise_phone(value: str) -> str | None:
    """The last 10 digits of a Russian phone number, or None if it has fewer than 10.

    ``+7 (921) 123-45-67``, ``8 921 123 45 67`` and ``9211234567`` all give ``9211234567``:
    +7 is the country code and 8 the domestic trunk prefix (Россвязь numbering plan).
    """
    digits = "".join(ch for ch in value if ch.isdigit())
    if len(digits) < 10:
        return None
    return digits[-10:]


# Street type words of Russian addresses (ФИАС short and full forms): not part of the name.
_STREET_TYPES = frozenset(
    """ул улица пр пр-т просп проспект пер переулок наб набережная ш шоссе б-р бульв бульвар
    пл площадь пр-д проезд туп тупик аллея линия кан канал г город спб санкт-петербург
    st str street ave avenue pr prospekt ul""".split()
)
_HOUSE = re.compile(r"(?:^|[\s,])(?:д|дом)\.?\s*(\d+[а-яa-z]?)", re.IGNORECASE)
_BUILDING = re.compile(r"(?:^|[\s,])(?:корп|корпус|к|стр|строение|лит)\.?\s*(\w+)", re.IGNORECASE)
_FLAT = re.compile(r"(?:^|[\s,])(?:кв|квартира|пом)\.?\s*(\d+)", re.IGNORECASE)
_POSTAL = re.compile(r"\b(\d{6})\b")


def _address(addresses: Sequence[Any]) -> tuple[str | None, str | None, str | None, str | None]:
    """(postal code, street key, house, flat) of the home (else first) address."""
    usable = [a for a in addresses if isinstance(a, Mapping) and a.get("use") != "old"]
    if not usable:
        return None, None, None, None
    addr = next((a for a in usable if a.get("use") == "home"), usable[0])
    lines = [_text(x) for x in addr.get("line") or [] if _text(x)]
    line = ", ".join(lines) if lines else _text(addr.get("text"))
    postal = _text(addr.get("postalCode")) or None
    if postal is None:
        pm = _POSTAL.search(line)
        postal = pm.group(1) if pm else None
    street_key: str | None = None
    house: str | None = None
    flat: str | None = None
    parts = [p.strip() for p in line.split(",") if p.strip()]
    for part in parts:
        if _POSTAL.fullmatch(part):
            continue
        words = [w for w in re.split(r"[\s.]+", part) if w]
        if not words or any(ch.isdigit() for ch in words[0]):
            continue
        if words[0].lower().rstrip(".") in {"д", "дом", "кв", "корп", "к", "стр"}:
            continue
        name_words = [w for w in words if w.lower() not in _STREET_TYPES]
        if name_words:
            street_key = matching_key(" ".join(name_words)) or None
            break
    hm = _HOUSE.search(line)
    if hm:
        house = hm.group(1).lower()
        bm = _BUILDING.search(line, hm.end())
        if bm and not _FLAT.match(line, bm.start()):
            house += "к" + bm.group(1).lower()
    fm = _FLAT.search(line)
    if fm:
        flat = fm.group(1)
    return postal, street_key, house, flat


# --- identifiers ---------------------------------------------------------------------------


def _identifiers(
    idents: Sequence[Any],
    problems: list[Problem],
    is_known_system: Callable[[str], bool] | None,
) -> tuple[tuple[tuple[str, str], ...], dict[str, str]]:
    pairs: list[tuple[str, str]] = []
    national: dict[str, str] = {}
    for i, ident in enumerate(idents):
        if not isinstance(ident, Mapping):
            continue
        where = f"Patient.identifier[{i}]"
        raw_system = _text(ident.get("system"))
        raw_value = _text(ident.get("value"))
        if not raw_system:
            problems.append(
                Problem(
                    "identifier-without-system",
                    "identifier has no system, so nobody can tell whose number it is",
                    f"{where}.system",
                )
            )
            continue
        system = normalise_system(raw_system)
        try:
            value = normalise_identifier(system, raw_value)
        except IdentifierError as exc:
            problems.append(Problem(exc.reason, exc.message, f"{where}.value"))
            continue
        if (
            is_known_system is not None
            and system not in NATIONAL_SYSTEMS
            and not is_known_system(system)
        ):
            problems.append(
                Problem(
                    "unknown-identifier-system",
                    f"identifier system {system} is neither national nor registered by any MO",
                    f"{where}.system",
                )
            )
            continue
        pairs.append((system, value))
        if system in NATIONAL_SYSTEMS and system not in national:
            national[system] = value
    return tuple(pairs), national


# --- public --------------------------------------------------------------------------------


def _today() -> date:
    return datetime.now(UTC).date()


def person_features(
    patient: Mapping[str, Any],
    *,
    today: date | None = None,
    is_known_system: Callable[[str], bool] | None = None,
) -> PersonFeatures:
    """Extract :class:`PersonFeatures` from a FHIR R4 Patient dict (never raises on content).

    ``today`` bounds plausible birth dates (default: the UTC date). ``is_known_system``, when
    given, reports (and drops) identifiers whose system is neither national nor registered —
    the facility registry supplies it. Everything wrong is in :attr:`PersonFeatures.problems`.
    """
    problems: list[Problem] = []
    identifiers, national = _identifiers(patient.get("identifier") or [], problems, is_known_system)
    name = _pick_name(patient.get("name") or [])
    family, given, middle = _name_parts(name) if name is not None else ("", "", "")
    if not (family or given or middle):
        problems.append(
            Problem(
                "empty-name",
                "Patient has no name: no family, no given and no text",
                "Patient.name",
            )
        )
    born, year = _birth(patient.get("birthDate"), today or _today(), problems)
    gender = patient.get("gender")
    phones: list[str] = []
    for tel in patient.get("telecom") or []:
        if not isinstance(tel, Mapping) or tel.get("system", "phone") not in ("phone", "sms"):
            continue
        phone = normalise_phone(_text(tel.get("value")))
        if phone and phone not in phones:
            phones.append(phone)
    postal, street_key, house, flat = _address(patient.get("address") or [])
    family_key, given_key, middle_key = (
        matching_key(family),
        matching_key(given),
        matching_key(middle),
    )
    return PersonFeatures(
        identifiers=identifiers,
        national=national,
        family=family,
        given=given,
        middle=middle,
        family_key=family_key,
        given_key=given_key,
        middle_key=middle_key,
        family_phonetic=phonetic_key(family_key),
        given_phonetic=phonetic_key(given_key),
        middle_phonetic=phonetic_key(middle_key),
        birth_date=born,
        birth_year=year,
        gender=gender if gender in ("male", "female", "other") else None,
        phones=tuple(phones),
        postal_code=postal,
        street_key=street_key,
        house=house,
        flat=flat,
        problems=tuple(problems),
    )


def validate_demographics(
    patient: Mapping[str, Any],
    *,
    today: date | None = None,
    is_known_system: Callable[[str], bool] | None = None,
) -> list[Problem]:
    """The bad-input problems of a Patient, each with a stable code and a specific message.

    Codes: ``invalid-snils-checksum``, ``malformed-snils``, ``invalid-oms-check-digit``,
    ``malformed-oms``, ``malformed-passport``, ``identifier-without-system``,
    ``identifier-without-value``,
    ``unknown-identifier-system`` (only with ``is_known_system``), ``impossible-birth-date``
    (not a calendar date, in the future, before 1880), ``malformed-birth-date`` and
    ``empty-name``. An empty list means the demographics are usable for matching.
    """
    return list(person_features(patient, today=today, is_known_system=is_known_system).problems)
