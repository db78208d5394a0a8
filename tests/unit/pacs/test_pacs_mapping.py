"""The pure mappings of the archive: DICOM patient → source Patient, index rows →
ImagingStudy (validated as FHIR R4), DICOM dates and times."""

from __future__ import annotations

import pytest

from hie.fhir import model
from hie.pacs.imaging_study import (
    SeriesSummary,
    StudySummary,
    body_site,
    dicomweb_endpoint,
    fhir_datetime,
    imaging_study,
)
from hie.pacs.p10 import Header, PatientName
from hie.pacs.patients import DicomPatient, fhir_date, patient_resource
from hie.registries.senders import RegisteredMo

MO = RegisteredMo(id="mo-1", name="МО", frmo_oid=None, endpoints=(), patient_id_systems=("urn:x",))


def _series(n: int, modality: str = "CT", number: int | None = 1) -> SeriesSummary:
    return SeriesSummary(f"1.2.{n}", modality, number, "desc", "CHEST", "20240101", "0930", 3)


def test_imaging_study_is_valid_fhir_with_series_counts_and_endpoint() -> None:
    study = StudySummary("1.2.3", "20240315", "101500.123", "ACC1", "КТ", "Смирнов^Олег", 5)
    res = imaging_study(
        study, [_series(2, "MR", 2), _series(1, "CT", 1), _series(3, "", None)], "p1"
    )
    model.validate(dict(res))
    assert res["subject"] == {"reference": "Patient/p1"}
    assert res["identifier"][1]["value"] == "ACC1"
    assert [s["uid"] for s in res["series"]] == ["1.2.1", "1.2.2", "1.2.3"]
    assert res["series"][2]["modality"]["code"] == "OT" and "number" not in res["series"][2]
    assert [m["code"] for m in res["modality"]] == ["CT", "MR", "OT"]
    assert res["referrer"] == {"display": "Смирнов Олег"}
    assert res["started"] == "2024-03-15T10:15:00+03:00"


def test_endpoint_is_valid_fhir() -> None:
    res = dicomweb_endpoint("https://hub.example/")
    model.validate(dict(res))
    assert res["address"] == "https://hub.example/dicomweb"


@pytest.mark.parametrize(
    ("da", "tm", "off", "want"),
    [
        ("20240315", "", "", "2024-03-15"),
        ("20240315", "07", "", "2024-03-15T07:00:00+03:00"),
        ("20240315", "07:30:15", "+0000", "2024-03-15T07:30:15+00:00"),
        ("20240315", "2599", "", "2024-03-15"),
        ("2024", "", "", None),
    ],
)
def test_fhir_datetime(da: str, tm: str, off: str, want: str | None) -> None:
    assert fhir_datetime(da, tm, off) == want


def test_body_site_known_and_unknown() -> None:
    assert body_site("chest") == {
        "system": "http://snomed.info/sct",
        "code": "43799004",
        "display": "Chest",
    }
    assert body_site("ELBOW") == {"display": "ELBOW"}
    assert body_site("") is None


def test_patient_resource_from_the_patient_module() -> None:
    hdr = Header(
        "1.2.840.10008.5.1.4.1.1.2",
        "1.1",
        "1.2",
        "1.3",
        "12345",
        name=PatientName("Иванова Мария Петровна", "Иванова", "Мария", "Петровна", "", ""),
        birth_date="19800512",
        sex="F",
    )
    patient = DicomPatient("urn:x", "12345", "", (("urn:oid:1.2.643.100.3", "11223344595"),))
    res = patient_resource(hdr, patient, MO)
    model.validate(dict(res))
    assert res["identifier"] == [
        {"system": "urn:x", "value": "12345"},
        {"system": "urn:oid:1.2.643.100.3", "value": "11223344595"},
    ]
    assert res["name"] == [{"use": "official", "family": "Иванова", "given": ["Мария", "Петровна"]}]
    assert res["birthDate"] == "1980-05-12" and res["gender"] == "female"
    assert res["managingOrganization"] == {"reference": "Organization/mo-1"}


@pytest.mark.parametrize(
    ("da", "want"), [("19800512", "1980-05-12"), ("19801340", None), ("", None), ("1980", None)]
)
def test_fhir_date(da: str, want: str | None) -> None:
    assert fhir_date(da) == want
