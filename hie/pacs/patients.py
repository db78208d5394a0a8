"""Whose images are these? A DICOM patient as the sending MO's record of a person.

A Patient ID (0010,0020) means nothing without the numbering it belongs to: two MOs' "12345"
are two people (Orthanc files them as one; the hub must not). The numbering is decided here:

1. Issuer of Patient ID (0010,0021), or the Universal Entity ID of its qualifiers
   (0010,0024 > 0040,0032), naming something the facility registry knows — an MO's
   registered patient identifier system (URI or bare OID), an MO's ФРМО OID, an MO's HL7
   sending facility — gives that MO's system. A national system (SNILS) is used as is.
2. Otherwise (no issuer, or one the registry does not know) the number is the sending MO's
   own: its registered patient identifier system. An MO without one cannot send images
   (:class:`~hie.pacs.errors.PatientUnresolved`), as it cannot send lab results.

The resulting :class:`DicomPatient` becomes a FHIR source Patient of the sending MO
(:func:`patient_resource`), matched to the golden record by the master patient index like
any other MO's record. Other Patient IDs (0010,1002) whose issuer resolves the same way are
added as further identifiers; unresolvable ones are left out (they could only mis-link).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hie.hub.logging import get_logger
from hie.pacs.errors import PatientUnresolved
from hie.pacs.p10 import Header
from hie.registries.identifiers import (
    NATIONAL_SYSTEMS,
    IdentifierError,
    normalise_identifier,
    normalise_system,
)
from hie.registries.senders import RegisteredMo, SenderRegistry

log = get_logger("hie.pacs.patients")

Json = dict[str, Any]
# (0010,0040) Patient's Sex → FHIR AdministrativeGender
_GENDER = {"M": "male", "F": "female", "O": "other"}


@dataclass(frozen=True, slots=True)
class DicomPatient:
    """The patient of an instance, with its number placed in an identifier system."""

    system: str
    value: str
    issuer: str
    others: tuple[tuple[str, str], ...]  # (system, value) of resolvable Other Patient IDs


class IssuerResolver:
    """Issuer of Patient ID → identifier system, through the facility registry (cached by
    the registry for a few seconds)."""

    def __init__(self, senders: SenderRegistry) -> None:
        self.senders = senders

    def system_for(self, issuer: str) -> str | None:
        """The identifier system ``issuer`` names, or None if the registry does not know it."""
        issuer = issuer.strip()
        if not issuer:
            return None
        system = normalise_system(issuer)
        if system in NATIONAL_SYSTEMS:
            return system
        if self.senders.mo_for_patient_id_system(system) is not None:
            return system
        for lookup in (self.senders.mo_by_frmo_oid, self._by_facility):
            mo = lookup(issuer)
            if mo is not None and mo.patient_id_system:
                return mo.patient_id_system
        return None

    def _by_facility(self, issuer: str) -> RegisteredMo | None:
        return self.senders.mo_for_hl7_sender(None, issuer)

    def resolve(self, hdr: Header, sender: RegisteredMo) -> DicomPatient:
        """Place the instance's Patient ID (see the module docstring)."""
        system = None
        for issuer in (hdr.issuer, hdr.issuer_universal):
            system = self.system_for(issuer)
            if system is not None:
                break
        if system is None:
            if hdr.issuer or hdr.issuer_universal:
                log.info("pacs.issuer_unknown", mo=sender.id)
            system = sender.patient_id_system
        if system is None:
            raise PatientUnresolved(
                f"Organization/{sender.id} has no registered patient identifier system, so "
                "its Patient IDs cannot be told from another MO's; register one in the "
                "facility registry"
            )
        value = _checked(system, hdr.patient_id)
        if value is None:
            raise PatientUnresolved("Patient ID (0010,0020) is not valid in its issuer's system")
        others: list[tuple[str, str]] = []
        for pid, issuer in hdr.other_ids:
            other = self.system_for(issuer)
            checked = _checked(other, pid) if other else None
            if other and checked and (other, checked) != (system, value):
                others.append((other, checked))
        return DicomPatient(system, value, hdr.issuer, tuple(dict.fromkeys(others)))


def _checked(system: str, value: str) -> str | None:
    """``value`` as the index stores it in ``system`` (None if it cannot be valid there)."""
    try:
        return normalise_identifier(system, value)
    except IdentifierError:
        return None


def fhir_date(da: str) -> str | None:
    """A DICOM DA (``YYYYMMDD``) as a FHIR date, or None if it is not one."""
    da = da.strip()
    if len(da) != 8 or not da.isdigit():
        return None
    y, m, d = int(da[:4]), int(da[4:6]), int(da[6:])
    if not (1 <= m <= 12 and 1 <= d <= 31 and y >= 1880):
        return None
    return f"{da[:4]}-{da[4:6]}-{da[6:]}"


def patient_resource(hdr: Header, patient: DicomPatient, sender: RegisteredMo) -> Json:
    """The sending MO's source Patient for an instance's patient module (PS3.3 C.7.1.1)."""
    res: Json = {
        "resourceType": "Patient",
        "identifier": [
            {"system": patient.system, "value": patient.value},
            *({"system": s, "value": v} for s, v in patient.others),
        ],
        "managingOrganization": {"reference": sender.reference},
    }
    n = hdr.name
    if n.family or n.given or n.middle:
        name: Json = {"use": "official"}
        if n.family:
            name["family"] = n.family
        given = [g for g in (n.given, n.middle) if g]
        if given:
            name["given"] = given
        if n.prefix:
            name["prefix"] = [n.prefix]
        if n.suffix:
            name["suffix"] = [n.suffix]
        res["name"] = [name]
    born = fhir_date(hdr.birth_date)
    if born is not None:
        res["birthDate"] = born
    gender = _GENDER.get(hdr.sex.upper()[:1]) if hdr.sex else None
    if gender is not None:
        res["gender"] = gender
    return res
