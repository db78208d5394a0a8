"""National identifier systems of the Russian Federation: URIs, checks and canonical forms.

The one source of truth for the identifier systems the hub recognises as *national* (issued by
the state, unique per person across every MO) and for their validation. ``hie.demo`` generates
values with these systems; the master patient index (:mod:`hie.registries.mpi`) matches on them.

========  =================================================  ===============  ====================
kind      system URI                                         constant         canonical form
========  =================================================  ===============  ====================
SNILS     urn:oid:1.2.643.100.3                              SNILS_SYSTEM     11 digits, check [1]
OMS       https://fhir.ru/ig/core/systems/oms                OMS_SYSTEM       16 digits, check [2]
passport  https://fhir.ru/ig/core/systems/identity-document  PASSPORT_SYSTEM  10 digits
ФРМО      urn:oid:1.2.643.5.1.13.13.11.1461                  FRMO_SYSTEM      an MO's OID
========  =================================================  ===============  ====================

Sources:

- SNILS (СНИЛС, страховой номер индивидуального лицевого счёта): the federal OID
  1.2.643.100.3 used for СНИЛС in ЕГИСЗ СЭМД and by the HL7 FHIR Russia Core IG
  (``identifier[snils]`` slice of ``core-patient``). [1] Check number: the Pension Fund
  (now Social Fund) rule, :func:`snils_check`; applied to numbers above 001-001-998.
- OMS policy (полис ОМС, единый номер полиса — ЕНП): there is no federal OID for the number
  itself (СЭМД carry it as typed fields), so the RuCore IG NamingSystem URI; the policy kind is
  coded from НСИ «Типы полисов ОМС» (``OMS_POLICY_KIND_SYSTEM``,
  ``urn:oid:1.2.643.5.1.13.13.99.2.245``, code 3 = полис единого образца). [2] Check digit:
  ФФОМС order № 79 of 2011, which is the Luhn algorithm (:func:`oms_check_digit`).
- Passport (паспорт гражданина РФ): the RuCore IG identity-document NamingSystem URI; the
  identifier type is HL7 v2 table 0203 ``PPN`` (``IDENTIFIER_TYPE_SYSTEM``).
- ФРМО (Федеральный реестр медицинских организаций): НСИ Минздрава (ФРНСИ) dictionary OID
  1.2.643.5.1.13.13.11.1461; identifies organisations, so it is not in
  :data:`NATIONAL_SYSTEMS`.

:data:`NATIONAL_SYSTEMS` lists the person identifiers (SNILS, OMS, passport) in order of
strength: SNILS is issued once for life; the ЕНП is lifelong too, but a newborn is treated on
the mother's policy until its own is issued; a passport is replaced at 20 and 45 and when lost.

:func:`normalise_identifier` gives the canonical value the index stores and compares (SNILS
``112-233-445 95`` → ``11223344595``) and raises :class:`IdentifierError` with a specific
reason for a malformed value or a wrong check number.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from hie.hub.errors import InvalidResource

SNILS_SYSTEM = "urn:oid:1.2.643.100.3"
OMS_SYSTEM = "https://fhir.ru/ig/core/systems/oms"
PASSPORT_SYSTEM = "https://fhir.ru/ig/core/systems/identity-document"
FRMO_SYSTEM = "urn:oid:1.2.643.5.1.13.13.11.1461"
# НСИ «Типы полисов ОМС»; code 3 is the single-format policy (полис единого образца).
OMS_POLICY_KIND_SYSTEM = "urn:oid:1.2.643.5.1.13.13.99.2.245"
# HL7 v2 table 0203 (identifier type: MR, PPN, …) as a FHIR code system.
IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"

NationalKind = Literal["snils", "oms", "passport"]


@dataclass(frozen=True, slots=True)
class NationalSystem:
    """A national person-identifier system: its URI, short name and how it is checked."""

    system: str
    kind: NationalKind
    title: str
    # True if two different valid values for one person are implausible (issued once for life).
    lifelong: bool


NATIONAL_SYSTEMS: dict[str, NationalSystem] = {
    SNILS_SYSTEM: NationalSystem(SNILS_SYSTEM, "snils", "СНИЛС", lifelong=True),
    OMS_SYSTEM: NationalSystem(OMS_SYSTEM, "oms", "Полис ОМС (ЕНП)", lifelong=True),
    PASSPORT_SYSTEM: NationalSystem(
        PASSPORT_SYSTEM, "passport", "Паспорт гражданина РФ", lifelong=False
    ),
}

IdentifierProblem = Literal[
    "identifier-without-system",
    "identifier-without-value",
    "malformed-snils",
    "invalid-snils-checksum",
    "malformed-oms",
    "invalid-oms-check-digit",
    "malformed-passport",
]


class IdentifierError(InvalidResource):
    """An identifier value that cannot be right: ``reason`` names the rule it breaks.

    A FHIR edge turns it into an OperationOutcome (HIE-1002, ``issue`` ``value``); the message
    says which identifier and why, without echoing the full number into logs.
    """

    issue = "value"

    def __init__(self, reason: IdentifierProblem, message: str, *, system: str = "") -> None:
        super().__init__(message, expression=["Patient.identifier"])
        self.reason: IdentifierProblem = reason
        self.system = system


@lru_cache(maxsize=4096)
def normalise_system(system: str) -> str:
    """Canonical form of an identifier system URI.

    A bare OID (``1.2.643.100.3``, as HL7 v2 CX-4 often carries it) becomes ``urn:oid:…``
    (RFC 3001); the ``urn:oid:`` prefix is case-insensitive; surrounding blanks are dropped.
    """
    s = system.strip()
    if s[:8].lower() == "urn:oid:":
        return "urn:oid:" + s[8:]
    if s and s[0].isdigit() and all(part.isdigit() for part in s.split(".")):
        return "urn:oid:" + s
    return s


_SEPARATORS = str.maketrans("", "", " \t-./\u00a0№")


def _digits(value: str) -> str:
    """``value`` without the separators people type: blanks, hyphens, dots, slashes, №."""
    return value.translate(_SEPARATORS)


# --- SNILS -------------------------------------------------------------------------------


def snils_check(number9: str) -> str:
    """Two-digit SNILS check number for the first nine digits (Pension Fund algorithm).

    Weighted sum of the digits with weights 9..1; below 100 the sum itself, 100 and 101 give
    00, above 101 the sum mod 101 (and a remainder of 100 again gives 00).
    """
    total = sum(int(d) * w for d, w in zip(number9, range(9, 0, -1), strict=True))
    if total < 100:
        return f"{total:02d}"
    if total in (100, 101):
        return "00"
    rem = total % 101
    return "00" if rem == 100 else f"{rem:02d}"


def format_snils(digits11: str) -> str:
    """Format 11 digits as ``123-456-789 01``."""
    d = digits11
    return f"{d[0:3]}-{d[3:6]}-{d[6:9]} {d[9:11]}"


def _snils_digits(value: str) -> str | None:
    digits = _digits(value.strip())
    if len(digits) != 11 or not digits.isascii() or not digits.isdigit():
        return None
    return digits


def _snils_checked(digits: str) -> bool:
    # The Pension Fund checks the control number only for numbers above 001-001-998.
    return int(digits[:9]) <= 1001998 or snils_check(digits[:9]) == digits[9:]


def snils_is_valid(value: str) -> bool:
    """True if ``value`` is a well-formed SNILS whose check number is right.

    Accepts ``123-456-789 01`` or bare ``12345678901``. The Pension Fund checks the control
    number only for numbers above 001-001-998; smaller numbers are valid whatever it is.
    """
    digits = _snils_digits(value)
    return digits is not None and _snils_checked(digits)


# --- OMS policy --------------------------------------------------------------------------


# A digit doubled, its digits summed (Luhn).
_LUHN_DOUBLE = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def oms_check_digit(first15: str) -> str:
    """Check digit of a 16-digit single-format OMS policy number (единый номер полиса).

    ФФОМС's algorithm (order № 79 of 2011): the digits in odd places counting from the right
    form a number that is doubled; the digits in even places are written in front of it; the
    digits of the result are summed and the check digit brings the sum to a multiple of 10.
    Doubling a whole number carries at most one into each next digit, so this is exactly the
    Luhn algorithm.
    """
    rev = first15[::-1]
    total = sum(_LUHN_DOUBLE[int(ch)] for ch in rev[0::2]) + sum(int(ch) for ch in rev[1::2])
    return str((10 - total % 10) % 10)


def oms_is_valid(value: str) -> bool:
    """True if ``value`` is 16 digits (blanks allowed) with a correct check digit."""
    v = value.replace(" ", "")
    if len(v) != 16 or not v.isascii() or not v.isdigit():
        return False
    return oms_check_digit(v[:15]) == v[15]


# --- canonical values --------------------------------------------------------------------


def normalise_identifier(system: str, value: str) -> str:
    """Canonical ``value`` of an identifier in ``system``, as the index stores and compares it.

    - SNILS: the 11 digits (``112-233-445 95`` → ``11223344595``); raises ``malformed-snils``
      unless there are exactly 11 digits once hyphens and blanks are dropped, and
      ``invalid-snils-checksum`` if the check number is wrong.
    - OMS policy: the 16 digits; ``malformed-oms`` / ``invalid-oms-check-digit``.
    - passport: series and number as 10 digits (``4012 345678`` → ``4012345678``);
      ``malformed-passport`` otherwise.
    - any other system (MO-local numbers): the value with surrounding blanks dropped, compared
      exactly (a local number's case and inner punctuation are the MO's business).

    Raises :class:`IdentifierError` also for an empty system or value.
    """
    sys_ = normalise_system(system)
    if not sys_:
        raise IdentifierError("identifier-without-system", "identifier has a value but no system")
    v = value.strip()
    if not v:
        raise IdentifierError(
            "identifier-without-value", f"identifier of system {sys_} has no value", system=sys_
        )
    if sys_ == SNILS_SYSTEM:
        digits = _snils_digits(v)
        if digits is None:
            raise IdentifierError(
                "malformed-snils",
                "SNILS must be 11 digits, written 123-456-789 01 or 12345678901",
                system=sys_,
            )
        if not _snils_checked(digits):
            raise IdentifierError(
                "invalid-snils-checksum",
                f"SNILS check number {digits[9:]} is wrong for this number "
                f"(expected {snils_check(digits[:9])})",
                system=sys_,
            )
        return digits
    if sys_ == OMS_SYSTEM:
        digits = _digits(v)
        if len(digits) != 16 or not digits.isascii() or not digits.isdigit():
            raise IdentifierError(
                "malformed-oms", "OMS policy number (ЕНП) must be 16 digits", system=sys_
            )
        if oms_check_digit(digits[:15]) != digits[15]:
            raise IdentifierError(
                "invalid-oms-check-digit",
                f"OMS policy check digit {digits[15]} is wrong for this number "
                f"(expected {oms_check_digit(digits[:15])})",
                system=sys_,
            )
        return digits
    if sys_ == PASSPORT_SYSTEM:
        digits = _digits(v)
        if len(digits) != 10 or not digits.isascii() or not digits.isdigit():
            raise IdentifierError(
                "malformed-passport",
                "passport must be a 4-digit series and a 6-digit number (4012 345678)",
                system=sys_,
            )
        return digits
    return v


def is_national(system: str) -> bool:
    """True if ``system`` (in any accepted spelling) is one of :data:`NATIONAL_SYSTEMS`."""
    return normalise_system(system) in NATIONAL_SYSTEMS
