"""The query engine over the DICOM index (:mod:`hie.pacs.query`), on SQLite and PostgreSQL:
every level, each kind of matching of PS3.4 C.2.2.2, the golden patient, limits, refusals of
bad identifiers, and the access condition applied in the SQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import ColumnElement

from hie.hub.auth import acting_as
from hie.lab_exchange.service import mo_principal
from hie.pacs.access import visible_studies
from hie.pacs.query import (
    GOLDEN_ISSUER,
    DicomQuery,
    InvalidMatchValue,
    InvalidQuery,
    Level,
    Match,
    search,
    search_page,
)
from tests.fixtures.dicom import MO_A, MO_B, SYSTEM_A, ct_instance, uid
from tests.fixtures.dicom_qr import MO_C, QrHub, qr_hub


@pytest.fixture
def h(store_url: str, tmp_path: Path) -> Iterator[QrHub]:
    with qr_hub(tmp_path, store_url) as running:
        yield running


def find(
    h: QrHub, level: Level, visible: ColumnElement[bool] | None = None, **kw: object
) -> list[Match]:
    keys = kw.pop("keys", {})
    return search(h.hub.store.engine, DicomQuery(level, keys, **kw), visible)  # type: ignore[arg-type]


def studies(h: QrHub, visible: ColumnElement[bool] | None = None, **keys: str) -> list[str]:
    return [m.attrs["StudyInstanceUID"] for m in find(h, Level.STUDY, visible, keys=keys)]


def visible_to(h: QrHub, org: str) -> ColumnElement[bool] | None:
    mo = h.listener.senders.mo(org)
    assert mo is not None
    with acting_as(mo_principal(mo, "dicom")):
        return visible_studies(h.svc)


def test_each_level_returns_its_keys_and_those_above(h: QrHub) -> None:
    study, s1, s2 = uid(), uid(), uid()
    h.store(ct_instance(study_uid=study, series_uid=s1, instance_number=1))
    h.store(ct_instance(study_uid=study, series_uid=s1, instance_number=2))
    last = h.store(ct_instance(study_uid=study, series_uid=s2, series_number=2, modality="SR"))
    [patient] = find(h, Level.PATIENT, root="PATIENT", keys={"PatientID": "12345"})
    assert patient.attrs["PatientName"] == "Иванова^Мария^Петровна"
    assert patient.attrs["IssuerOfPatientID"] == SYSTEM_A.removeprefix("urn:oid:")
    assert patient.attrs["NumberOfPatientRelatedStudies"] == 1
    assert patient.attrs["NumberOfPatientRelatedSeries"] == 2
    assert patient.attrs["NumberOfPatientRelatedInstances"] == 3
    assert patient.patient_ref == last.patient_ref
    [st] = find(h, Level.STUDY, keys={"StudyInstanceUID": study})
    assert st.attrs["ModalitiesInStudy"] == "CT\\SR"
    assert st.attrs["NumberOfStudyRelatedSeries"] == 2
    assert st.attrs["NumberOfStudyRelatedInstances"] == 3
    assert st.attrs["StudyDate"] == "20240315" and st.attrs["PatientID"] == "12345"
    assert st.attrs["RetrieveAETitle"] == "HUB" and st.imaging_study_id == last.imaging_study_id
    series = find(h, Level.SERIES, keys={"StudyInstanceUID": study})
    assert [(m.attrs["Modality"], m.attrs["NumberOfSeriesRelatedInstances"]) for m in series] == [
        ("CT", 2),
        ("SR", 1),
    ]
    images = find(h, Level.IMAGE, keys={"SeriesInstanceUID": s1})
    assert [m.attrs["InstanceNumber"] for m in images] == [1, 2]
    assert all(m.blob_key and m.size and m.transfer_syntax for m in images)
    assert images[0].attrs["Rows"] == 16 and images[0].attrs["StudyInstanceUID"] == study
    assert h.hub.blobs.exists(images[0].blob_key or "")


def test_wildcards_names_and_lists(h: QrHub) -> None:
    a = h.store(ct_instance(accession="A_1", body_part="HEAD")).study_uid
    b = h.store(ct_instance(patient_id="54321", name="Кузнецов^Пётр", accession="AB1")).study_uid
    c = h.store(ct_instance(patient_id="777", name="Smith^John", accession="A[1]")).study_uid
    assert studies(h, PatientName="иванова*") == [a]  # PN: case-insensitive, Cyrillic too
    assert studies(h, PatientName="Иванова^Мария^Петровна") == [a]
    assert studies(h, PatientName="Иванова") == []  # single value matching is the whole name
    assert studies(h, PatientName="*^П?тр") == [b]
    assert studies(h, PatientName="SMITH^J?HN") == [c]
    assert studies(h, AccessionNumber="A?1") == [a, b]
    assert studies(h, AccessionNumber="A_*") == [a]  # '_' and '[' are literal
    assert studies(h, AccessionNumber="A[*") == [c]
    assert studies(h, AccessionNumber="a?1") == []  # other VRs are case-sensitive
    assert studies(h, AccessionNumber="*") == [a, b, c]  # a lone '*' is universal
    assert studies(h, PatientID="54321\\777") == []  # not a list: LO
    assert studies(h, StudyInstanceUID=f"{a}\\{c}") == [a, c]  # list of UIDs
    assert studies(h, ModalitiesInStudy="MR\\CT") == [a, b, c]
    assert studies(h, ModalitiesInStudy="MR") == []
    fuzzy = find(h, Level.STUDY, keys={"PatientName": "пёт"}, fuzzy=True)
    assert [m.attrs["StudyInstanceUID"] for m in fuzzy] == [b]  # any component's prefix
    fuzzy = find(h, Level.STUDY, keys={"PatientName": "мар иван"}, fuzzy=True)
    assert [m.attrs["StudyInstanceUID"] for m in fuzzy] == [a]


def test_date_and_time_ranges(h: QrHub) -> None:
    dated = {}
    for day, time in (("20240101", "080000"), ("20240215", "101500.25"), ("20240315", "235959")):
        ds = ct_instance()
        ds.StudyDate, ds.StudyTime = day, time
        dated[day] = h.store(ds).study_uid
    jan, feb, mar = dated.values()
    assert studies(h, StudyDate="20240101-20240215") == [jan, feb]
    assert studies(h, StudyDate="20240215-") == [feb, mar]
    assert studies(h, StudyDate="-20240101") == [jan]
    assert studies(h, StudyDate="20240215") == [feb]
    assert studies(h, StudyTime="1015") == [feb]  # the whole minute
    assert studies(h, StudyTime="-1015") == [jan, feb]
    assert studies(h, StudyTime="1000-") == [feb, mar]
    # separately, the date and the time ranges each hold; combined, one date-time range
    early = ct_instance()
    early.StudyDate, early.StudyTime = "20240210", "070000"
    feb10 = h.store(early).study_uid
    keys = {"StudyDate": "20240101-20240315", "StudyTime": "0900-2300"}
    assert studies(h, **keys) == [feb]
    combined = find(h, Level.STUDY, keys=keys, combined_datetime=True)
    assert [m.attrs["StudyInstanceUID"] for m in combined] == [feb, feb10]
    for bad in ("2024-03-15", "20241345", "2024031", "20240315-20240101", "a-b", "--"):
        with pytest.raises(InvalidMatchValue):
            studies(h, StudyDate=bad)
    for bad in ("2500", "10:15", "1015-0900-1"):
        with pytest.raises(InvalidMatchValue):
            studies(h, StudyTime=bad)


def test_the_golden_patient_finds_every_mos_studies(h: QrHub) -> None:
    person = {"name": "Сидорова^Анна^Ивановна", "birth_date": "19750203", "sex": "F"}
    a = h.store(ct_instance(patient_id="111", **person), org=MO_A)
    b = h.store(ct_instance(patient_id="222", **person), org=MO_B)
    h.store(ct_instance(patient_id="333"), org=MO_B)  # someone else
    with h.hub.store.identity_reader() as idx:
        golden = idx.group_of("Patient", a.patient_ref)
    assert golden is not None
    for pid in (golden, a.patient_ref, b.patient_ref):
        assert sorted(studies(h, _patient=pid)) == sorted([a.study_uid, b.study_uid])
        by_issuer = studies(h, PatientID=pid, IssuerOfPatientID=GOLDEN_ISSUER)
        assert sorted(by_issuer) == sorted([a.study_uid, b.study_uid])
    # each study still says which MO's number it was filed under
    rows = find(h, Level.STUDY, keys={"_patient": golden, "PatientID": ""})
    assert sorted(m.attrs["PatientID"] for m in rows) == ["111", "222"]
    patients = find(h, Level.PATIENT, root="PATIENT", keys={"_patient": golden})
    assert sorted(m.patient_ref for m in patients) == sorted([a.patient_ref, b.patient_ref])


def test_limits_offsets_and_the_hard_cap(h: QrHub) -> None:
    uids = [h.store(ct_instance(patient_id=f"9{i}")).study_uid for i in range(5)]
    engine = h.hub.store.engine
    page = search_page(engine, DicomQuery(Level.STUDY, {}), None, cap=3)
    assert [m.attrs["StudyInstanceUID"] for m in page.matches] == uids[:3] and page.more
    page = search_page(engine, DicomQuery(Level.STUDY, {}, limit=10, offset=3), None, cap=3)
    assert [m.attrs["StudyInstanceUID"] for m in page.matches] == uids[3:] and not page.more
    page = search_page(engine, DicomQuery(Level.STUDY, {}, limit=2, offset=1), None, cap=3)
    assert [m.attrs["StudyInstanceUID"] for m in page.matches] == uids[1:3] and page.more


def test_identifiers_the_archive_refuses(h: QrHub) -> None:
    h.store(ct_instance())
    with pytest.raises(InvalidQuery, match="SERIES-level key"):
        find(h, Level.STUDY, keys={"Modality": "CT"})
    with pytest.raises(InvalidQuery, match="no PATIENT level"):
        find(h, Level.PATIENT, keys={"PatientID": ""})
    with pytest.raises(InvalidQuery, match="needs one PatientID"):
        find(h, Level.STUDY, root="PATIENT", hierarchical=True, keys={"PatientID": "1*"})
    with pytest.raises(InvalidQuery, match="needs one StudyInstanceUID"):
        find(h, Level.SERIES, hierarchical=True, keys={"Modality": "CT"})
    with pytest.raises(InvalidMatchValue):
        find(h, Level.STUDY, keys={"StudyInstanceUID": "1.2.x"})
    with pytest.raises(InvalidMatchValue):
        find(h, Level.SERIES, keys={"SeriesNumber": "one"})
    # relational queries (QIDO) need no keys above; patient root finds by Patient ID
    assert len(find(h, Level.SERIES, keys={"Modality": "CT"})) == 1
    assert (
        len(find(h, Level.STUDY, root="PATIENT", hierarchical=True, keys={"PatientID": "12345"}))
        == 1
    )
    # keys the index does not keep are ignored (returned empty by the DICOM adapter)
    assert len(find(h, Level.STUDY, keys={"OtherPatientIDs": "X"})) == 1


def test_the_access_condition_is_applied_in_the_query(h: QrHub) -> None:
    mine = [h.store(ct_instance(patient_id=f"5{i}", name=f"Пациент^{i}")) for i in range(3)]
    theirs = h.store(ct_instance(patient_id="60", name="Другой^Пациент"), org=MO_B)
    everything = [s.study_uid for s in [*mine, theirs]]
    assert studies(h) == everything
    # MO A sees its own studies, not MO B's
    as_a = visible_to(h, MO_A)
    assert as_a is not None
    assert studies(h, as_a) == everything[:3]
    # limits count only what may be seen
    engine = h.hub.store.engine
    page = search_page(engine, DicomQuery(Level.STUDY, {}, limit=1, offset=2), as_a)
    assert [m.attrs["StudyInstanceUID"] for m in page.matches] == [everything[2]]
    assert not page.more
    # MO C neither wrote nor treats anyone: nothing at any level
    as_c = visible_to(h, MO_C)
    assert studies(h, as_c) == []
    assert find(h, Level.PATIENT, as_c, root="PATIENT", keys={"PatientID": ""}) == []
    assert find(h, Level.IMAGE, as_c) == []
    # once MO C treats a patient, that patient's studies appear (the condition is live)
    h.treat(mine[1].patient_ref, MO_C)
    as_c = visible_to(h, MO_C)
    assert studies(h, as_c) == [mine[1].study_uid]
    [patient] = find(h, Level.PATIENT, as_c, root="PATIENT", keys={"PatientID": ""})
    assert patient.attrs["NumberOfPatientRelatedStudies"] == 1
    assert len(find(h, Level.IMAGE, as_c)) == 1
    # and the patient's consent closing the record to MO C hides them again
    h.deny(mine[1].patient_ref, MO_C)
    assert studies(h, visible_to(h, MO_C)) == []
    assert studies(h, visible_to(h, MO_A)) == everything[:3]  # the MO's own records stay
