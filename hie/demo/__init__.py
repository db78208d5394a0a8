"""hie.demo: the one synthetic-data generator, deterministic by seed.

``Generator(seed)`` makes St Petersburg patients (Russian names, SNILS, OMS policy, addresses),
the demo city (~30 MOs as Organizations with their HL7 v2 and DICOM Endpoints, practitioners
and roles), lab results and whole patient records as plain FHIR R4 dicts, and transaction
Bundles for load tests. ``make run``'s demo data, the tests and the benchmarks all use it.
Pure Python: ``random.Random(seed)`` only; it never imports ``fhir.resources``.

Modules: ``names`` (name tables, patronymics, transliteration), ``identifiers`` (identifier
systems, SNILS/OMS generation and checks), ``city`` (districts, streets, MOs), ``clinical``
(lab tests, vitals, diagnoses, vaccines, drugs), ``generator`` (``Generator`` and the record
variants used by MPI benchmarks).
"""

from hie.demo.city import MOS, MOS_BY_ID, CityData, MoInfo, mo_by_facility
from hie.demo.generator import (
    REFERENCE_DATE,
    Generator,
    as_transaction,
    swap_day_month,
    transliterate_variant,
    typo_variant,
)
from hie.demo.identifiers import oms_is_valid, snils_is_valid

__all__ = [
    "MOS",
    "MOS_BY_ID",
    "REFERENCE_DATE",
    "CityData",
    "Generator",
    "MoInfo",
    "as_transaction",
    "mo_by_facility",
    "oms_is_valid",
    "snils_is_valid",
    "swap_day_month",
    "transliterate_variant",
    "typo_variant",
]
