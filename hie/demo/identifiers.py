"""Russian personal and organisational identifiers of the demo: generators and builders.

The identifier systems themselves (SNILS ``urn:oid:1.2.643.100.3``, OMS policy, passport, ФРМО)
and the SNILS / OMS checks live in :mod:`hie.registries.identifiers`, the one source of truth,
with the table of their sources; they are re-exported here so demo code can keep using
``hie.demo.identifiers.SNILS_SYSTEM`` and friends. This module adds what only the demo needs:
random valid numbers, St Petersburg MO OIDs and FHIR ``Identifier`` builders.

- ФРМО (Федеральный реестр медицинских организаций, НСИ OID 1.2.643.5.1.13.13.11.1461): an
  MO's identifier is its OID under ``1.2.643.5.1.13.13.12.2.<region>`` (78 = St Petersburg).
- MO-local medical record numbers use a system under the MO's own OID (``<MO OID>.100``).
"""

from __future__ import annotations

import random
from typing import Any

from hie.registries.identifiers import (
    FRMO_SYSTEM,
    IDENTIFIER_TYPE_SYSTEM,
    OMS_POLICY_KIND_SYSTEM,
    OMS_SYSTEM,
    PASSPORT_SYSTEM,
    SNILS_SYSTEM,
    format_snils,
    oms_check_digit,
    oms_is_valid,
    snils_check,
    snils_is_valid,
)

__all__ = [
    "FRMO_SYSTEM",
    "IDENTIFIER_TYPE_SYSTEM",
    "OMS_POLICY_KIND_SYSTEM",
    "OMS_SYSTEM",
    "PASSPORT_SYSTEM",
    "SNILS_SYSTEM",
    "SPB_MO_OID_ROOT",
    "format_snils",
    "mrn_identifier",
    "mrn_system",
    "oms_check_digit",
    "oms_identifier",
    "oms_is_valid",
    "passport_identifier",
    "random_oms",
    "random_passport",
    "random_snils",
    "snils_check",
    "snils_identifier",
    "snils_is_valid",
]

# Root of St Petersburg MO OIDs in ФРМО (region code 78).
SPB_MO_OID_ROOT = "1.2.643.5.1.13.13.12.2.78"
# OKATO code of St Petersburg: the first two digits of passport series issued there.
_SPB_OKATO = "40"


def mrn_system(mo_oid: str) -> str:
    """Identifier system of the local medical record numbers of the MO with OID ``mo_oid``."""
    return f"urn:oid:{mo_oid}.100"


# --- SNILS -------------------------------------------------------------------------------


def random_snils(rng: random.Random) -> str:
    """A random valid SNILS, formatted (``123-456-789 01``).

    Issued numbers never hold the same digit three times in a row, so neither do ours.
    """
    while True:
        n9 = f"{rng.randrange(1001999, 10**9):09d}"
        if not any(n9[i] == n9[i + 1] == n9[i + 2] for i in range(7)):
            return format_snils(n9 + snils_check(n9))


# --- OMS policy --------------------------------------------------------------------------


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
