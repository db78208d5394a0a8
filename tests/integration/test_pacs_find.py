"""C-FIND against the running DICOM listener, driven by dcmtk's findscu and by pynetdicom as
a client: Patient Root and Study Root at every level, matching, the golden patient, the
hard limit, failure statuses with Error Comments, cancel, the access policy and the audit
record of every query."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from hie.pacs.query import GOLDEN_ISSUER
from tests.fixtures.dicom import AE_A, AE_B, MO_B, SYSTEM_A, ct_instance, dcmtk, uid
from tests.fixtures.dicom_qr import (
    AE_C,
    MO_C,
    PATIENT_ROOT_FIND,
    STUDY_ROOT_FIND,
    QrHub,
    qr_hub,
)

pytestmark = pytest.mark.skipif(dcmtk("findscu") is None, reason="dcmtk is not installed")


@pytest.fixture
def h(tmp_path: Path) -> Iterator[QrHub]:
    with qr_hub(tmp_path) as running:
        yield running


def findscu(
    h: QrHub,
    out: Path,
    *keys: str,
    root: str = "-S",
    calling: str = AE_A,
    options: tuple[str, ...] = (),
) -> Any:
    """findscu with ``keys`` (``-k`` each); returns (process, response datasets)."""
    out.mkdir(parents=True, exist_ok=True)
    args = [root, "-v", "-X", "-od", str(out), *options, "-k", "SpecificCharacterSet=ISO_IR 192"]
    for k in keys:
        args += ["-k", k]
    done = h.dcmtk("findscu", *args, calling=calling)
    return done, [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def cfind(h: QrHub, ident: Dataset, model: str = STUDY_ROOT_FIND, calling: str = AE_A) -> Any:
    """pynetdicom C-FIND: [(status, identifier)] of every response."""
    assoc = h.associate(calling, [model])
    assert assoc.is_established
    try:
        return list(assoc.send_c_find(ident, model))
    finally:
        assoc.release()


def query(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def test_findscu_study_root_study_level(h: QrHub, tmp_path: Path) -> None:
    study = h.store(ct_instance(accession="R-77")).study_uid
    h.store(ct_instance(study_uid=study, series_uid=uid(), series_number=2, modality="SR"))
    h.store(ct_instance(patient_id="54321", name="Кузнецов^Пётр", accession="R-78"))
    done, rsps = findscu(
        h,
        tmp_path / "a",
        "QueryRetrieveLevel=STUDY",
        "PatientName=иванова*",
        "StudyDate=20240301-20240331",
        "StudyInstanceUID",
        "AccessionNumber",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "IssuerOfPatientID",
        "PatientAge",
    )
    assert done.returncode == 0, done.stderr
    assert "Final Find Response (Success)" in done.stderr
    [rsp] = rsps
    assert rsp.StudyInstanceUID == study and rsp.AccessionNumber == "R-77"
    assert str(rsp.PatientName) == "Иванова^Мария^Петровна"
    assert list(rsp.ModalitiesInStudy) == ["CT", "SR"]
    assert rsp.NumberOfStudyRelatedSeries == 2 and rsp.NumberOfStudyRelatedInstances == 2
    assert rsp.IssuerOfPatientID == SYSTEM_A.removeprefix("urn:oid:")
    assert rsp.RetrieveAETitle == "HUB" and rsp.QueryRetrieveLevel == "STUDY"
    assert "PatientAge" in rsp and rsp.PatientAge in (None, "")  # not kept: returned empty
    assert "StudyDescription" not in rsp  # only what was asked


def test_patient_root_at_every_level(h: QrHub, tmp_path: Path) -> None:
    first = h.store(ct_instance(instance_number=1))
    h.store(
        ct_instance(
            study_uid=first.study_uid, series_uid=first.series_uid, instance_number=2, seed=2
        )
    )
    h.store(ct_instance(patient_id="54321", name="Кузнецов^Пётр"))
    done, pats = findscu(
        h,
        tmp_path / "p",
        "QueryRetrieveLevel=PATIENT",
        "PatientID=12345",
        "PatientName",
        "PatientBirthDate",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedInstances",
        root="-P",
    )
    assert done.returncode == 0, done.stderr
    [pat] = pats
    assert pat.PatientBirthDate == "19800512" and pat.NumberOfPatientRelatedInstances == 2
    done, sts = findscu(
        h,
        tmp_path / "s",
        "QueryRetrieveLevel=STUDY",
        "PatientID=12345",
        "StudyInstanceUID",
        root="-P",
    )
    assert [s.StudyInstanceUID for s in sts] == [first.study_uid]
    done, series = findscu(
        h,
        tmp_path / "se",
        "QueryRetrieveLevel=SERIES",
        "PatientID=12345",
        f"StudyInstanceUID={first.study_uid}",
        "SeriesInstanceUID",
        "Modality",
        "NumberOfSeriesRelatedInstances",
        root="-P",
    )
    [se] = series
    assert se.SeriesInstanceUID == first.series_uid and se.NumberOfSeriesRelatedInstances == 2
    done, images = findscu(
        h,
        tmp_path / "i",
        "QueryRetrieveLevel=IMAGE",
        "PatientID=12345",
        f"StudyInstanceUID={first.study_uid}",
        f"SeriesInstanceUID={first.series_uid}",
        "SOPInstanceUID",
        "InstanceNumber",
        "SOPClassUID",
        root="-P",
    )
    assert [i.InstanceNumber for i in images] == [1, 2]
    assert images[0].SOPInstanceUID == first.sop_uid
    # patient root without the Patient ID above the study level: 0xA900
    done, none = findscu(
        h, tmp_path / "bad", "QueryRetrieveLevel=STUDY", "StudyInstanceUID", root="-P"
    )
    assert none == [] and "DataSetDoesNotMatchSOPClass" in done.stderr


def test_study_root_series_and_uid_lists(h: QrHub, tmp_path: Path) -> None:
    a = h.store(ct_instance())
    b = h.store(ct_instance(patient_id="2"))
    h.store(ct_instance(patient_id="3"))
    done, rsps = findscu(
        h,
        tmp_path / "l",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={a.study_uid}\\{b.study_uid}",
        "PatientID",
    )
    assert sorted(r.PatientID for r in rsps) == ["12345", "2"]
    done, series = findscu(
        h,
        tmp_path / "se",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={b.study_uid}",
        "Modality=C?",
        "SeriesInstanceUID",
    )
    assert [s.SeriesInstanceUID for s in series] == [b.series_uid]


def test_failure_statuses_carry_an_error_comment(h: QrHub, tmp_path: Path) -> None:
    h.store(ct_instance())
    done, rsps = findscu(h, tmp_path / "d", "QueryRetrieveLevel=STUDY", "StudyDate=2024-03-15")
    assert rsps == [] and "Failed: UnableToProcess" in done.stderr
    [(status, _)] = cfind(h, query("STUDY", StudyDate="20241345"))
    assert status.Status == 0xC000 and str(status.ErrorComment).startswith("HIE-1307")
    [(status, _)] = cfind(h, query("STUDY", Modality="CT"))
    assert status.Status == 0xA900 and "SERIES-level key" in str(status.ErrorComment)
    [(status, _)] = cfind(h, query("PATIENT", PatientID="12345"))  # study root
    assert status.Status == 0xA900 and str(status.ErrorComment).startswith("HIE-1306")
    [(status, _)] = cfind(h, query("NOWHERE"))
    assert status.Status == 0xA900
    refused = h.audits("query")
    assert len(refused) == 5 and all(r.outcome == 4 for r in refused)
    assert [r.status for r in refused] == [0xC000, 0xC000, 0xA900, 0xA900, 0xA900]
    assert all(
        r.org == "mo-dicom-a" and r.source and r.source.startswith("127.0.0.1:") for r in refused
    )


def test_pending_per_match_then_success_and_the_hard_limit(tmp_path: Path) -> None:
    with qr_hub(tmp_path, dicom_query_limit=3) as h:
        for i in range(5):
            h.store(ct_instance(patient_id=f"7{i}"))
        rsps = cfind(h, query("STUDY", StudyInstanceUID="", PatientID=""))
        assert [s.Status for s, _ in rsps] == [0xFF00, 0xFF00, 0xFF00, 0x0000]
        assert [i.PatientID for _, i in rsps[:3]] == ["70", "71", "72"]
        assert all(i.SpecificCharacterSet == "ISO_IR 192" for _, i in rsps[:3])
        [rec] = h.audits("query")
        assert rec.outcome == 0 and len(rec.entities) == 3 and "(cut)" in rec.path


def test_cancel_stops_the_responses(tmp_path: Path) -> None:
    with qr_hub(tmp_path, dicom_query_limit=5000) as h:
        for i in range(600):
            h.store(ct_instance(size=2, seed=i))
        # ~0.5 kB per response: more than the socket buffers hold, so the hub is still
        # answering when findscu's C-CANCEL (after the first response) arrives
        keys = (
            "QueryRetrieveLevel=STUDY",
            "PatientID",
            "PatientName",
            "StudyInstanceUID",
            "StudyDescription",
            "ReferringPhysicianName",
            "IssuerOfPatientID",
            "StudyDate",
            "StudyTime",
            "AccessionNumber",
        )
        # the C-CANCEL races the hub's answers: when it lands in time the answer is Cancel
        # with fewer responses, otherwise every response was sent and the answer is Success
        # (whether it lands depends on the machine; C-MOVE cancel is tested in test_pacs_retrieve)
        for attempt in range(3):
            done, rsps = findscu(h, tmp_path / f"c{attempt}", *keys, options=("--cancel", "1"))
            if "Final Find Response (Cancel" in done.stderr:
                assert 1 <= len(rsps) < 600
            else:
                assert "Final Find Response (Success" in done.stderr, done.stderr[-300:]
                assert len(rsps) == 600
        recs = h.audits("query")  # each query audited once, before anything went out
        assert len(recs) == 3 and {r.outcome for r in recs} == {0}


def test_the_golden_patient_finds_two_mos_studies(h: QrHub, tmp_path: Path) -> None:
    person = {"name": "Сидорова^Анна^Ивановна", "birth_date": "19750203", "sex": "F"}
    a = h.store(ct_instance(patient_id="111", **person))
    b = h.store(ct_instance(patient_id="222", **person), org=MO_B)
    with h.hub.store.identity_reader() as idx:
        golden = idx.group_of("Patient", a.patient_ref)
    assert golden is not None
    # as the hub sees it (the unrestricted service role does not run DICOM: the MOs do, so
    # give MO B the care relationship that lets it see MO A's study)
    h.treat(a.patient_ref, MO_B)
    done, rsps = findscu(
        h,
        tmp_path / "g",
        "QueryRetrieveLevel=STUDY",
        f"PatientID={golden}",
        f"IssuerOfPatientID={GOLDEN_ISSUER}",
        "StudyInstanceUID",
        calling=AE_B,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(r.StudyInstanceUID for r in rsps) == sorted([a.study_uid, b.study_uid])
    # each study is answered with the number its MO filed it under
    assert sorted(r.PatientID for r in rsps) == ["111", "222"]


def test_access_policy_and_audit(h: QrHub, tmp_path: Path) -> None:
    mine = h.store(ct_instance(patient_id="500"))
    other = h.store(ct_instance(patient_id="600", name="Другой^Пациент"))
    keys = ("QueryRetrieveLevel=STUDY", "PatientID", "StudyInstanceUID")
    # MO A wrote both
    _, rsps = findscu(h, tmp_path / "1", *keys)
    assert len(rsps) == 2
    # MO C neither wrote nor treats: nothing, at every level and in either model
    _, rsps = findscu(h, tmp_path / "2", *keys, calling=AE_C)
    assert rsps == []
    _, rsps = findscu(
        h, tmp_path / "3", "QueryRetrieveLevel=PATIENT", "PatientID", root="-P", calling=AE_C
    )
    assert rsps == []
    rsps = cfind(h, query("IMAGE", SOPInstanceUID=""), calling=AE_C)  # relational: refused
    assert rsps[-1][0].Status == 0xA900
    # treating the patient opens the patient's studies, not the other one
    h.treat(mine.patient_ref, MO_C)
    _, rsps = findscu(h, tmp_path / "4", *keys, calling=AE_C)
    assert [r.StudyInstanceUID for r in rsps] == [mine.study_uid]
    # the patient's consent closes them again
    h.deny(mine.patient_ref, MO_C)
    _, rsps = findscu(h, tmp_path / "5", *keys, calling=AE_C)
    assert rsps == []
    # one audit record per C-FIND, naming patients and studies it disclosed
    recs = h.audits("query")
    assert len(recs) == 6
    assert recs[0].org == "mo-dicom-a" and recs[0].outcome == 0
    assert sorted(recs[0].patients) == sorted([mine.patient_ref, other.patient_ref])
    assert sorted(recs[0].entities) == sorted(
        f"ImagingStudy/{s.imaging_study_id}" for s in (mine, other)
    )
    assert recs[1].org == MO_C and recs[1].patients == [] and recs[1].entities == []
    assert recs[4].patients == [mine.patient_ref]
    assert recs[4].entities == [f"ImagingStudy/{mine.imaging_study_id}"]
    assert all(re.match(r"127\.0\.0\.1:\d+$", r.source or "") for r in recs)
    assert all(r.roles == ["mis"] and r.action == "E" for r in recs)


def test_patient_root_find_model_over_pynetdicom(h: QrHub) -> None:
    h.store(ct_instance(patient_id="41"))
    rsps = cfind(h, query("PATIENT", PatientID="4*", PatientName=""), PATIENT_ROOT_FIND)
    assert [s.Status for s, _ in rsps] == [0xFF00, 0x0000]
    assert rsps[0][1].PatientID == "41" and rsps[0][1].QueryRetrieveLevel == "PATIENT"


def test_no_identifier_is_formatted_for_pynetdicom_logs(
    h: QrHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pynetdicom formats every request and response identifier (patient data) for its debug
    # log whatever the level; the hub turns that off
    def formatted(*_: Any) -> Any:
        raise AssertionError("an identifier was formatted for a log")

    monkeypatch.setattr("pynetdicom.service_class.pretty_dataset", formatted)
    h.store(ct_instance(patient_id="42"))
    rsps = cfind(h, query("STUDY", PatientID="42", StudyInstanceUID=""))
    assert [s.Status for s, _ in rsps] == [0xFF00, 0x0000]
