"""The DICOM index's study → one FHIR R4 ImagingStudy (pure functions).

The ImagingStudy is how a study appears in the integrated record (the patient's timeline,
``Patient/$everything``, the portal): the study and each series with its modality, body part,
description and instance count, and an ``endpoint`` to the hub's DICOMweb service where the
images are. It is rewritten in the transaction of every instance that starts a study or a
series (so the series list is always current); an instance added to a known series only counts
in the index, and marks the study stale until a background pass brings the ImagingStudy's
counts up to date (:func:`with_counts`), within a second or at the end of the association.
Rewriting it per instance made a 200-image series leave 200 versions, outbox events and
history rows behind, and cost a third of the C-STORE time.

Instances are counted, not listed (``series.instance`` is 0..*): listing them would make the
n-th instance of a series rewrite n entries, and a 2,000-image CT would leave two million
instance entries in the resource history. Instance lookups go to the DICOM index (C-FIND,
QIDO-RS), which answers them from its own rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Json = dict[str, Any]

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
DICOM_UID_SYSTEM = "urn:dicom:uid"  # FHIR R4 ImagingStudy.identifier for the Study UID
ACCESSION_TYPE = {
    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
}
ENDPOINT_ID = "hie-dicomweb"
# Local times in DICOM carry no zone; the region's modalities run on Moscow time.
DEFAULT_OFFSET = "+03:00"

# (0018,0015) Body Part Examined defined terms → SNOMED CT (PS3.16 Annex L, CID 4031)
BODY_PARTS: dict[str, tuple[str, str]] = {
    "ABDOMEN": ("818981001", "Abdomen"),
    "BRAIN": ("12738006", "Brain"),
    "BREAST": ("76752008", "Breast"),
    "CHEST": ("43799004", "Chest"),
    "CSPINE": ("122494005", "Cervical spine"),
    "HAND": ("85562004", "Hand"),
    "HEAD": ("69536005", "Head"),
    "HEART": ("80891009", "Heart"),
    "KNEE": ("72696002", "Knee"),
    "LSPINE": ("122496007", "Lumbar spine"),
    "NECK": ("45048000", "Neck"),
    "PELVIS": ("816092008", "Pelvis"),
    "SKULL": ("89546000", "Skull"),
    "TSPINE": ("122495006", "Thoracic spine"),
}


@dataclass(frozen=True, slots=True)
class SeriesSummary:
    """One series as the index holds it."""

    series_uid: str
    modality: str
    series_number: int | None
    description: str
    body_part: str
    series_date: str
    series_time: str
    num_instances: int


@dataclass(frozen=True, slots=True)
class StudySummary:
    """One study as the index holds it."""

    study_uid: str
    study_date: str
    study_time: str
    accession: str
    description: str
    referring: str
    num_instances: int
    timezone_offset: str = ""


def fhir_datetime(da: str, tm: str, offset: str = "") -> str | None:
    """DICOM DA + TM (+ Timezone Offset From UTC ``±HHMM``) as a FHIR dateTime; a date
    alone when there is no time (FHIR wants a zone with any time)."""
    da = da.strip()
    if len(da) != 8 or not da.isdigit():
        return None
    date = f"{da[:4]}-{da[4:6]}-{da[6:]}"
    digits = tm.strip().replace(":", "").split(".", 1)[0]
    if len(digits) < 2 or not digits.isdigit():
        return date
    hh, mm, ss = digits[0:2], (digits[2:4] or "00"), (digits[4:6] or "00")
    if int(hh) > 23 or int(mm) > 59 or int(ss) > 60:
        return date
    zone = DEFAULT_OFFSET
    off = offset.strip()
    if len(off) == 5 and off[0] in "+-" and off[1:].isdigit():
        zone = f"{off[:3]}:{off[3:]}"
    return f"{date}T{hh}:{mm}:{min(int(ss), 59):02d}{zone}"


def body_site(body_part: str) -> Json | None:
    """A Coding for Body Part Examined: SNOMED CT where the defined term is known, else the
    term as the display."""
    term = body_part.strip().upper()
    if not term:
        return None
    known = BODY_PARTS.get(term)
    if known is None:
        return {"display": term}
    return {"system": SNOMED, "code": known[0], "display": known[1]}


def modality_coding(modality: str) -> Json:
    """A DICOM modality code (PS3.16 CID 29); ``OT`` (other) when the dataset has none."""
    return {"system": DCM, "code": modality.strip().upper() or "OT"}


def imaging_study(
    study: StudySummary,
    series: Sequence[SeriesSummary],
    patient_ref: str,
    endpoint_ref: str = f"Endpoint/{ENDPOINT_ID}",
) -> Json:
    """The ImagingStudy for a study and its series (see the module docstring)."""
    endpoint = [{"reference": endpoint_ref}]
    res: Json = {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study.study_uid}"}],
        "status": "available",
        "subject": {"reference": f"Patient/{patient_ref}"},
        "endpoint": endpoint,
        "numberOfSeries": len(series),
        "numberOfInstances": study.num_instances,
    }
    if study.accession:
        res["identifier"].append({"type": ACCESSION_TYPE, "value": study.accession})
    modalities = sorted({modality_coding(s.modality)["code"] for s in series})
    if modalities:
        res["modality"] = [{"system": DCM, "code": m} for m in modalities]
    started = fhir_datetime(study.study_date, study.study_time, study.timezone_offset)
    if started:
        res["started"] = started
    if study.referring:
        res["referrer"] = {"display": study.referring.replace("^", " ").strip()}
    if study.description:
        res["description"] = study.description
    out_series: list[Json] = []
    for s in sorted(series, key=lambda x: (x.series_number is None, x.series_number or 0)):
        one: Json = {
            "uid": s.series_uid,
            "modality": modality_coding(s.modality),
            "numberOfInstances": s.num_instances,
            "endpoint": endpoint,
        }
        if s.series_number is not None and s.series_number >= 0:
            one["number"] = s.series_number
        if s.description:
            one["description"] = s.description
        site = body_site(s.body_part)
        if site is not None:
            one["bodySite"] = site
        started = fhir_datetime(s.series_date, s.series_time, study.timezone_offset)
        if started:
            one["started"] = started
        out_series.append(one)
    if out_series:
        res["series"] = out_series
    return res


def with_counts(res: Json, num_instances: int, series: Sequence[SeriesSummary]) -> Json:
    """``res`` (an ImagingStudy this module built) with the index's instance counts."""
    counts = {s.series_uid: s.num_instances for s in series}
    out = {**res, "numberOfInstances": num_instances}
    if "series" in res:
        out["series"] = [
            {**one, "numberOfInstances": counts.get(one.get("uid"), one.get("numberOfInstances"))}
            for one in res["series"]
        ]
    return out


def dicomweb_endpoint(base_url: str) -> Json:
    """The hub's own DICOMweb Endpoint, which every ImagingStudy points at."""
    return {
        "resourceType": "Endpoint",
        "status": "active",
        "name": "Центральный архив медицинских изображений (DICOMweb)",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
        },
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": f"{base_url.rstrip('/')}/dicomweb",
    }
