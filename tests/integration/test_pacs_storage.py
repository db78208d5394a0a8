"""The storage service of the central image archive on each resource-store backend: index rows,
blob, source Patient and ImagingStudy committed together; identity through the master patient
index; every bad instance refused with the right status and kept for replay."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from hie.fhir import model
from hie.fhir.service import MPI_SYSTEM, FhirService
from hie.hub.runtime import Hub, open_hub
from hie.hub.store.port import Query, TokenCond
from hie.pacs.errors import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    InstanceConflict,
    InstanceMismatch,
    PatientUnresolved,
    UnreadableInstance,
)
from hie.pacs.index import DicomIndex
from hie.pacs.p10 import read_header
from hie.pacs.storage import StorageService
from hie.registries.patient_index import attach_mpi
from hie.registries.senders import RegisteredMo
from tests.fixtures.dicom import (
    IMPLICIT,
    MO_A,
    MO_B,
    SYSTEM_A,
    SYSTEM_B,
    as_transaction,
    bundled_instance,
    ct_instance,
    dicom_registry,
    encode,
    store_as,
    uid,
)


class Archive:
    """A migrated hub with the two MOs registered and the storage service over it."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.svc = FhirService(hub.store, hub.settings)
        attach_mpi(self.svc)
        self.svc.transaction(as_transaction(dicom_registry()), "")
        self.storage = StorageService(self.svc, hub.blobs, hub.rejected)
        self.index = DicomIndex(hub.store)

    def mo(self, org: str) -> RegisteredMo:
        found = self.storage.senders.mo(org)
        assert found is not None
        return found

    def send(self, ds: Any, org: str = MO_A, ts: str = IMPLICIT, raw: bytes | None = None) -> Any:
        return store_as(self.storage, ds, org, ts, raw)

    def resource(self, rtype: str, id: str) -> dict[str, Any]:
        stored = self.hub.store.read(rtype, id)
        assert stored is not None and stored.content is not None
        return orjson.loads(stored.content)  # type: ignore[no-any-return]

    def golden_of(self, patient_ref: str) -> str | None:
        with self.hub.store.identity_reader() as idx:
            return idx.group_of("Patient", patient_ref)


@pytest.fixture
def archive(store_url: str, settings_for) -> Iterator[Archive]:  # type: ignore[no-untyped-def]
    hub = open_hub(settings_for(store_url))
    hub.store.migrate()
    yield Archive(hub)
    hub.close()


def test_an_instance_becomes_index_rows_a_blob_a_patient_and_an_imaging_study(
    archive: Archive,
) -> None:
    ds = ct_instance()
    done = archive.send(ds)
    assert not done.duplicate
    row = archive.index.instance(str(ds.SOPInstanceUID))
    assert row is not None and row.blob_key == done.blob_key and row.owner == MO_A
    # the bytes are kept as received, behind the hub's file meta
    blob = b"".join(archive.hub.blobs.open(row.blob_key))
    assert blob.endswith(encode(ds, IMPLICIT))
    assert read_header(blob).SOPInstanceUID == ds.SOPInstanceUID
    # the source Patient is the MO's record under its own numbering, linked to a golden one
    patient = archive.resource("Patient", done.patient_ref)
    assert {"system": SYSTEM_A, "value": "12345"} in patient["identifier"]
    assert patient["name"][0]["family"] == "Иванова"
    assert patient["birthDate"] == "1980-05-12" and patient["gender"] == "female"
    assert archive.golden_of(done.patient_ref) is not None
    # one ImagingStudy, valid FHIR, pointing at DICOMweb
    study = archive.resource("ImagingStudy", done.imaging_study_id)
    model.validate(dict(study))
    assert study["subject"] == {"reference": f"Patient/{done.patient_ref}"}
    assert study["identifier"][0]["value"] == f"urn:oid:{ds.StudyInstanceUID}"
    assert study["numberOfInstances"] == 1 and study["numberOfSeries"] == 1
    assert study["series"][0]["modality"]["code"] == "CT"
    assert study["series"][0]["bodySite"]["code"] == "43799004"
    assert study["endpoint"] == [{"reference": "Endpoint/hie-dicomweb"}]
    assert study["started"] == "2024-03-15T10:15:00+03:00"
    endpoint = archive.resource("Endpoint", "hie-dicomweb")
    assert endpoint["address"].endswith("/dicomweb")
    assert archive.index.study(str(ds.StudyInstanceUID))["owner"] == MO_A  # type: ignore[index]


def test_the_imaging_study_follows_the_instances_as_they_arrive(archive: Archive) -> None:
    study_uid, s1, s2 = uid(), uid(), uid()
    for n in range(3):
        first = archive.send(ct_instance(study_uid=study_uid, series_uid=s1, instance_number=n + 1))
    # instances of a known series count in the index at once; the ImagingStudy follows when
    # the refresher passes (the worker's job, or the end of the association)
    study = archive.resource("ImagingStudy", first.imaging_study_id)
    assert study["numberOfInstances"] == 1 and study["meta"]["versionId"] == "1"
    assert archive.index.study(study_uid)["stale"] == 1  # type: ignore[index]
    assert archive.storage.refresh_summaries() == 1
    study = archive.resource("ImagingStudy", first.imaging_study_id)
    model.validate(dict(study))
    assert study["numberOfInstances"] == 3 and study["series"][0]["numberOfInstances"] == 3
    assert study["meta"]["versionId"] == "2" and study["started"] == "2024-03-15T10:15:00+03:00"
    assert archive.storage.refresh_summaries() == 0  # nothing stale: nothing rewritten
    # a new series is written into the ImagingStudy by its first instance's transaction
    last = archive.send(
        ct_instance(study_uid=study_uid, series_uid=s2, series_number=2, modality="SR")
    )
    study = archive.resource("ImagingStudy", last.imaging_study_id)
    model.validate(dict(study))
    assert study["numberOfInstances"] == 4 and study["numberOfSeries"] == 2
    assert [s["numberOfInstances"] for s in study["series"]] == [3, 1]
    assert [m["code"] for m in study["modality"]] == ["CT", "SR"]
    assert study["meta"]["versionId"] == "3"
    row = archive.index.study(study_uid)
    assert row is not None and row["modalities"] == "CT\\SR" and row["num_instances"] == 4
    assert row["stale"] == 0
    assert archive.index.counts() == {
        "dicom_patients": 1,
        "dicom_studies": 1,
        "dicom_series": 2,
        "dicom_instances": 4,
    }


def test_stale_counts_are_caught_up_by_a_new_storage_service(archive: Archive) -> None:
    """The stale mark is in the database: a hub restarted after a crash catches up."""
    study_uid, series = uid(), uid()
    for n in range(4):
        done = archive.send(ct_instance(study_uid=study_uid, series_uid=series, instance_number=n))
    restarted = StorageService(archive.svc, archive.hub.blobs, archive.hub.rejected)
    assert restarted.refresh_summaries() == 1
    study = archive.resource("ImagingStudy", done.imaging_study_id)
    assert study["numberOfInstances"] == 4 and study["series"][0]["numberOfInstances"] == 4


def test_the_same_instance_again_is_accepted_and_changes_nothing(archive: Archive) -> None:
    ds = ct_instance()
    first = archive.send(ds)
    again = archive.send(ds)
    assert again.duplicate and again.blob_key == first.blob_key
    study = archive.resource("ImagingStudy", first.imaging_study_id)
    assert study["numberOfInstances"] == 1 and study["meta"]["versionId"] == "1"


def test_different_bytes_under_a_stored_sop_instance_uid_are_a_conflict(
    archive: Archive,
) -> None:
    ds = ct_instance(seed=1)
    first = archive.send(ds)
    other = ct_instance(seed=2, sop_uid=str(ds.SOPInstanceUID), study_uid=str(ds.StudyInstanceUID))
    with pytest.raises(InstanceConflict) as caught:
        archive.send(other)
    assert caught.value.dimse_status == CANNOT_UNDERSTAND
    # the first is kept; the second went to the rejected-message store, bytes and all
    row = archive.index.instance(str(ds.SOPInstanceUID))
    assert row is not None and row.blob_key == first.blob_key
    kept = archive.hub.rejected.list(channel="dicom")
    assert [(k.kind, k.code) for k in kept] == [("conflict", "HIE-1303")]
    full = archive.hub.rejected.get(kept[0].id)
    assert full is not None and full.raw is not None
    assert full.raw.endswith(encode(other, IMPLICIT))
    assert full.control_id == str(ds.SOPInstanceUID)


def test_two_mos_same_patient_id_are_two_people(archive: Archive) -> None:
    a = archive.send(ct_instance(patient_id="12345", name="Иванова^Мария"), org=MO_A)
    b = archive.send(
        ct_instance(patient_id="12345", name="Кузнецов^Пётр", birth_date="19551010", sex="M"),
        org=MO_B,
    )
    assert a.patient_ref != b.patient_ref
    assert archive.golden_of(a.patient_ref) != archive.golden_of(b.patient_ref)
    pa, pb = archive.resource("Patient", a.patient_ref), archive.resource("Patient", b.patient_ref)
    assert pa["identifier"][0]["system"] == SYSTEM_A
    assert pb["identifier"][0]["system"] == SYSTEM_B
    assert archive.index.studies_of_person(a.patient_ref) == [a.study_uid]
    assert archive.index.studies_of_person(b.patient_ref) == [b.study_uid]


def test_one_person_in_two_mos_has_all_studies_on_the_golden_record(archive: Archive) -> None:
    # same person (name, birth date) and the issuer names MO A's numbering: B sends a study
    # of A's patient 777 — it is filed under A's record, not as B's patient 777
    a = archive.send(ct_instance(patient_id="777", name="Сидорова^Анна"), org=MO_A)
    b = archive.send(
        ct_instance(
            patient_id="777", name="Сидорова^Анна", issuer=SYSTEM_A.removeprefix("urn:oid:")
        ),
        org=MO_B,
    )
    assert b.patient_ref == a.patient_ref
    golden = archive.golden_of(a.patient_ref)
    assert golden is not None
    assert sorted(archive.index.studies_of_person(golden)) == sorted([a.study_uid, b.study_uid])


def test_an_existing_source_patient_is_reused_not_duplicated(archive: Archive) -> None:
    first = archive.send(ct_instance(patient_id="900"))
    second = archive.send(ct_instance(patient_id="900", name="Другое^Имя"))
    assert first.patient_ref == second.patient_ref
    assert archive.resource("Patient", first.patient_ref)["name"][0]["family"] == "Иванова"


@pytest.mark.parametrize("cut", [1, 7, 200, 600])
def test_a_truncated_dataset_is_refused_and_nothing_is_stored(archive: Archive, cut: int) -> None:
    ds = ct_instance(size=32)
    raw = encode(ds, IMPLICIT)
    with pytest.raises(UnreadableInstance) as caught:
        archive.send(ds, raw=raw[:-cut])
    assert caught.value.dimse_status == CANNOT_UNDERSTAND
    assert archive.index.counts()["dicom_instances"] == 0
    assert archive.hub.store.read("Endpoint", "hie-dicomweb") is None
    assert list(archive.hub.blobs.iter_keys()) == []
    assert archive.hub.rejected.count(channel="dicom") == 1


@pytest.mark.parametrize("missing", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_a_dataset_without_its_uids_is_refused(archive: Archive, missing: str) -> None:
    ds = ct_instance()
    sop = str(ds.SOPInstanceUID)
    delattr(ds, missing)
    raw = encode(ds, IMPLICIT)
    ds.SOPInstanceUID = sop  # the request still names it
    with pytest.raises(InstanceMismatch) as caught:
        archive.send(ds, raw=raw)
    assert caught.value.dimse_status == DATASET_MISMATCH
    assert missing in caught.value.message
    assert archive.index.counts()["dicom_instances"] == 0


def test_a_dataset_that_contradicts_its_request_is_refused(archive: Archive) -> None:
    ds = ct_instance()
    raw = encode(ds, IMPLICIT)
    ds.SOPInstanceUID = uid()
    with pytest.raises(InstanceMismatch):
        archive.send(ds, raw=raw)


def test_a_new_patient_without_a_name_cannot_be_filed(archive: Archive) -> None:
    with pytest.raises(PatientUnresolved) as caught:
        archive.send(ct_instance(name=""))
    assert caught.value.dimse_status == DATASET_MISMATCH
    counts = archive.index.counts()
    assert counts["dicom_instances"] == 0 and counts["dicom_patients"] == 0


def test_a_study_cannot_change_patients(archive: Archive) -> None:
    first = archive.send(ct_instance(patient_id="1"))
    with pytest.raises(InstanceMismatch):
        archive.send(
            ct_instance(
                patient_id="2",
                name="Кузнецов^Пётр",
                birth_date="19551010",
                study_uid=first.study_uid,
            )
        )
    assert archive.index.counts()["dicom_instances"] == 1


def test_bundled_test_files_in_several_transfer_syntaxes_are_stored_as_received(
    archive: Archive,
) -> None:
    for name in (
        "CT_small.dcm",  # explicit VR little endian
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "image_dfl.dcm",  # deflated
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
        "JPGExtended.dcm",
        "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEGLSNearLossless_16.dcm",
        "JPEG2000.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_RLE.dcm",
        "UN_sequence.dcm",  # a sequence of VR UN with undefined length
    ):
        ds = bundled_instance(name)
        ts = str(ds.file_meta.TransferSyntaxUID)
        raw = encode(ds, ts)
        done = archive.send(ds, ts=ts, raw=raw)
        blob = b"".join(archive.hub.blobs.open(done.blob_key))
        assert blob.endswith(raw), name
        row = archive.index.instance(str(ds.SOPInstanceUID))
        assert row is not None and row.transfer_syntax == ts


def test_an_unknown_issuer_leaves_the_number_to_the_sending_mo(archive: Archive) -> None:
    done = archive.send(ct_instance(patient_id="31", issuer="SOME-RIS"), org=MO_B)
    patient = archive.resource("Patient", done.patient_ref)
    assert patient["identifier"][0] == {"system": SYSTEM_B, "value": "31"}
    row = archive.index.study(done.study_uid)
    assert row is not None and row["issuer"] == "SOME-RIS" and row["id_system"] == SYSTEM_B


def test_concurrent_senders_of_one_new_study_all_land_once(archive: Archive) -> None:
    study = uid()
    errors: list[BaseException] = []

    def sender(n: int) -> None:
        series = uid()
        try:
            for i in range(5):
                archive.send(
                    ct_instance(
                        study_uid=study, series_uid=series, series_number=n, instance_number=i
                    )
                )
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    archive.storage.refresh_summaries()
    row = archive.index.study(study)
    assert row is not None and row["num_instances"] == 20 and row["num_series"] == 4
    assert row["stale"] == 0
    res = archive.resource("ImagingStudy", row["imaging_study_id"])
    assert res["numberOfInstances"] == 20 and len(res["series"]) == 4
    assert sum(s["numberOfInstances"] for s in res["series"]) == 20
    assert archive.index.counts()["dicom_patients"] == 1


def test_concurrent_studies_of_one_new_patient_make_one_source_patient(archive: Archive) -> None:
    # two modalities of one MO send different studies of a patient the hub has not seen yet
    # (on PostgreSQL both transactions would otherwise find nobody and both create one)
    archive.send(ct_instance(patient_id="WARM-UP"))  # the hub's own first writes are done
    start = threading.Barrier(4)
    errors: list[BaseException] = []
    refs: list[str] = []

    def sender() -> None:
        try:
            start.wait(30)
            refs.append(archive.send(ct_instance(patient_id="NEW-77")).patient_ref)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert len(set(refs)) == 1
    q = Query(
        "Patient",
        [
            TokenCond("identifier", SYSTEM_A, "NEW-77"),
            TokenCond("_tag", MPI_SYSTEM, "golden", negate=True),
        ],
    )
    assert [r.id for r in archive.hub.store.search(q).items] == refs[:1]
