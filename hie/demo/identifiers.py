"""Russian personal and organisational identifiers: systems, generators and checkers.

Every identifier system URI the demo data uses is a named constant here, in one place. The
registries issue confirms them against the federal reference data (НСИ Минздрава, ФРНСИ):

- SNILS (СНИЛС) — ``urn:oid:1.2.643.100.3``, the federal OID used for СНИЛС in ЕГИСЗ СЭМД.
- OMS policy (полис ОМС, единый номер полиса) — there is no federal OID for the number itself
  (СЭМД carry the policy as typed fields); we use the NamingSystem URI of the HL7 FHIR Russia
  Core IG (``https://fhir.ru/ig/core/systems/oms``), with the policy kind coded from НСИ
  «Типы полисов ОМС» (OID 1.2.643.5.1.13.13.99.2.245, code 3 = полис единого образца).
- Passport (паспорт гражданина РФ) — likewise the RuCore identity-document NamingSystem URI.
- ФРМО (Федеральный реестр медицинских организаций, НСИ OID 1.2.643.5.1.13.13.11.1461): an
  MO's identifier is its OID under ``1.2.643.5.1.13.13.12.2.<region>`` (78 = St Petersburg).
- MO-local medical record numbers use a system under the MO's own OID (``<MO OID>.100``).
"""

from __future__ import annotations

import random
from typing import Any

SNILS_SYSTEM = "urn:oid:1.2.643.100.3"
OMS_SYSTEM = "https://fhir.ru/ig/core/systems/oms"
PASSPORT_SYSTEM = "https://fhir.ru/ig/core/systems/identity-document"
FRMO_SYSTEM = "urn:oid:1.2.643.5.1.13.13.11.1461"
# Root of St Petersburg MO OIDs in ФРМО (region code 78).
SPB_MO_OID_ROOT = "1.2.643.5.1.13.13.12.2.78"
# НСИ «Типы полисов ОМС»; code 3 is the single-format policy (полис единого образца).
OMS_POLICY_KIND_SYSTEM = "urn:oid:1.2.643.5.1.13.13.99.2.245"
IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"

# OKATO code of St Petersburg: the first two digits of passport series issued there.
_SPB_OKATO = "40"


def mrn_system(mo_oid: str) -> str:
    """Identifier system of the local medical record numbers of the MO with OID ``mo_oid``."""
    return f"urn:oid:{mo_oid}.100"


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


def snils_is_valid(value: str) -> bool:
    """True if ``value`` is a well-formed SNILS whose check number is right.

    Accepts ``123-456-789 01`` or bare ``12345678901``. The Pension Fund checks the control
    number only for numbers above 001-001-998; smaller numbers are valid whatever it is.
    """
    digits = value.replace("-", "").replace(" ", "")
    if len(digits) != 11 or not digits.isascii() or not digits.isdigit():
        return False
    if int(digits[:9]) <= 1001998:
        return True
    return snils_check(digits[:9]) == digits[9:]


def random_snils(rng: random.Random) -> str:
    """A random valid SNILS, formatted (``123-456-789 01``).

    Issued numbers never hold the same digit three times in a row, so neither do ours.
    """
    while True:
        n9 = f"{rng.randrange(1001999, 10**9):09d}"
        if not any(n9[i] == n9[i + 1] == n9[i + 2] for i in range(7)):
            return format_snils(n9 + snils_check(n9))


# --- OMS policy --------------------------------------------------------------------------


def oms_check_digit(first15: str) -> str:
    """Check digit of a 16-digit single-format OMS policy number (единый номер полиса).

    ФФОМС's algorithm (order № 79 of 2011): the digits in odd places counting from the right
    form a number that is doubled; the digits in even places are written in front of it; the
    digits of the result are summed and the check digit brings the sum to a multiple of 10.
    Doubling a whole number carries at most one into each next digit, so this is exactly the
    Luhn algorithm.
    """
    total = 0
    for i, ch in enumerate(reversed(first15)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def oms_is_valid(value: str) -> bool:
    """True if ``value`` is 16 digits with a correct check digit."""
    v = value.replace(" ", "")
    if len(v) != 16 or not v.isascii() or not v.isdigit():
        return False
    return oms_check_digit(v[:15]) == v[15]


def random_oms(rng: random.Random) -> str:
    """A random valid 16-digit OMS policy number of a St Petersburg resident (starts 78)."""
    first15 = "78" + f"{rng.randrange(10**13):013d}"
    return first15 + oms_check_digit(first15)


# --- passport ----------------------------------------------------------------------------


def random_passport(rng: random.Random, issue_year: int) -> tuple[str, str]:
    """Series and number of a St Petersburg passport issued in ``issue_year``.

    The series is the region's OKATO code (40) followed by the last two digits of the year the
    form was printed; the number is six digits.
    """
    series = f"{_SPB_OKATO}{issue_year % 100:02d}"
    number = f"{rng.randrange(100000, 1000000):06d}"
    return series, number


# --- FHIR Identifier builders ------------------------------------------------------------


def snils_identifier(value: str) -> dict[str, Any]:
    """FHIR Identifier for a SNILS."""
    return {"use": "official", "type": {"text": "СНИЛС"}, "system": SNILS_SYSTEM, "value": value}


def oms_identifier(value: str) -> dict[str, Any]:
    """FHIR Identifier for a single-format OMS policy number."""
    return {
        "use": "official",
        "type": {
            "coding": [
                {
                    "system": OMS_POLICY_KIND_SYSTEM,
                    "code": "3",
                    "display": "Полис ОМС единого образца",
                }
            ],
            "text": "Полис ОМС",
        },
        "system": OMS_SYSTEM,
        "value": value,
    }


def passport_identifier(series: str, number: str) -> dict[str, Any]:
    """FHIR Identifier for a Russian internal passport (value ``4012 345678``)."""
    return {
        "use": "official",
        "type": {
            "coding": [
                {"system": IDENTIFIER_TYPE_SYSTEM, "code": "PPN", "display": "Passport number"}
            ],
            "text": "Паспорт гражданина РФ",
        },
        "system": PASSPORT_SYSTEM,
        "value": f"{series} {number}",
    }


def mrn_identifier(mo_oid: str, value: str, assigner: str | None = None) -> dict[str, Any]:
    """FHIR Identifier for a medical record number local to the MO with OID ``mo_oid``."""
    ident: dict[str, Any] = {
        "use": "usual",
        "type": {
            "coding": [
                {"system": IDENTIFIER_TYPE_SYSTEM, "code": "MR", "display": "Medical record number"}
            ],
            "text": "Номер медицинской карты",
        },
        "system": mrn_system(mo_oid),
        "value": value,
    }
    if assigner is not None:
        ident["assigner"] = {
            "identifier": {"system": FRMO_SYSTEM, "value": mo_oid},
            "display": assigner,
        }
    return ident
