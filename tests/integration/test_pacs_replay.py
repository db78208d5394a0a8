"""Replaying refused DICOM instances (:mod:`hie.pacs.replay`) on every backend: an instance
the archive refused is kept; once the cause is fixed — the MO's patient numbering
registered, two patients merged — a replay stores it as the MO that sent it, through
``POST /admin/messages/{id}/$replay`` and ``hie messages replay`` as well. A replay that is
refused again leaves the message open and is not kept twice.

Instances reach the rejected-message store the way they do in production: sent to the
storage service as a modality's C-STORE hands them over (the network is tested in
``test_pacs_dicom``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from pydicom.dataset import Dataset
from typer.testing import CliRunner

from hie.cli import app
from hie.fhir.service import FhirService
from hie.hub.errors import Conflict
from hie.hub.rejected import RejectedMessage, RejectedStore
from hie.hub.runtime import Hub, open_hub
from hie.pacs.errors import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    DicomRefused,
    InstanceConflict,
    InstanceMismatch,
    PatientUnresolved,
    UnreadableInstance,
)
from hie.pacs.index import DicomIndex
from hie.pacs.p10 import file_meta
from hie.pacs.replay import replay_instance, replayable
from hie.pacs.storage import Received, StorageService, Stored
from hie.registries.facility import patient_id_system_identifier
from hie.registries.patient_index import MasterPatientIndex, attach_mpi
from tests.fixtures.auth import bearer
from tests.fixtures.dicom import (
    AE_A,
    IMPLICIT,
    MO_A,
    as_transaction,
    ct_instance,
    dicom_endpoint,
    dicom_registry,
    encode,
    store_as,
)

runner = CliRunner()

# a polyclinic whose ultrasound sends images before the MO's patient numbering is registered
MO_C = "mo-dicom-c"
AE_C = "US_C"
SYSTEM_C = "urn:oid:1.2.643.5.1.13.13.12.2.78.9103.100"
PEER_C = "10.20.30.40:41000"


def polyclinic(*, numbering: bool, active: bool = True) -> list[dict[str, Any]]:
    """MO C and its modality; ``numbering``: its patient identifier system is registered."""
    org: dict[str, Any] = {
        "resourceType": "Organization",
        "id": MO_C,
        "name": "Поликлиника № 9103",
        "active": active,
    }
    if numbering:
        org["identifier"] = [patient_id_system_identifier(SYSTEM_C)]
    return [org, dicom_endpoint(MO_C, AE_C)]


def received(ds: Dataset, ae: str = AE_C) -> Received:
    return Received(
        dataset=encode(ds, IMPLICIT),
        transfer_syntax=IMPLICIT,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        calling_ae=ae,
        peer=PEER_C,
    )


def send_c(storage: StorageService, ds: Dataset) -> Stored:
    """``ds`` as MO C's ultrasound sends it by C-STORE."""
    mo = storage.senders.mo(MO_C)
    assert mo is not None
    return storage.store(received(ds), mo)


def newest(rejected: RejectedStore) -> RejectedMessage:
    found = rejected.list(channel="dicom", limit=1)
    assert found, "nothing was kept"
    kept = rejected.get(found[0].id)
    assert kept is not None
    return kept


class Archive:
    """A migrated hub with MOs A and B registered, MO C without its patient numbering, and
    the storage service over it."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.svc = FhirService(hub.store, hub.settings)
        mpi = attach_mpi(self.svc)
        assert mpi is not None
        self.mpi: MasterPatientIndex = mpi
        self.register(dicom_registry() + polyclinic(numbering=False))
        self.storage = StorageService(self.svc, hub.blobs, hub.rejected)
        self.index = DicomIndex(hub.store)

    def register(self, resources: list[dict[str, Any]]) -> None:
        self.svc.transaction(as_transaction(resources), "")

    def refused(self, ds: Dataset, expected: type[DicomRefused]) -> RejectedMessage:
        """Send ``ds`` as MO C, expect the refusal, and give the message kept for it."""
        with pytest.raises(expected):
            send_c(self.storage, ds)
        return newest(self.hub.rejected)

    def replay(self, kept: RejectedMessage) -> Any:
        fresh = self.hub.rejected.get(kept.id)
        assert fresh is not None
        return replay_instance(self.storage, fresh)

    def status(self, ident: int) -> str:
        kept = self.hub.rejected.get(ident)
        assert kept is not None
        return kept.status

    def resource(self, rtype: str, id: str) -> dict[str, Any]:
        stored = self.hub.store.read(rtype, id)
        assert stored is not None and stored.content is not None
        return orjson.loads(stored.content)  # type: ignore[no-any-return]


@pytest.fixture
def archive(store_url: str, settings_for) -> Iterator[Archive]:  # type: ignore[no-untyped-def]
    hub = open_hub(settings_for(store_url))
    hub.store.migrate()
    arc = Archive(hub)
    yield arc
    arc.storage.close()
    hub.close()


# --- the replay -------------------------------------------------------------------------------


def test_an_instance_is_stored_once_its_mo_registers_its_patient_numbering(
    archive: Archive,
) -> None:
    ds = ct_instance(patient_id="C-501", name="Орлова^Вера", issuer="SOME-RIS")
    kept = archive.refused(ds, PatientUnresolved)
    assert (kept.kind, kept.code, kept.sender, kept.peer) == (
        "rejected",
        "HIE-1304",
        f"{AE_C}|{MO_C}",
        PEER_C,
    )
    assert replayable(kept) and kept.control_id == str(ds.SOPInstanceUID)

    # replayed before the cause is fixed: refused the same way, open, not kept again
    again = archive.replay(kept)
    assert again.outcome == "refused" and again.stored is None
    assert again.status == DATASET_MISMATCH and isinstance(again.refused, PatientUnresolved)
    assert again.text.startswith("A900 HIE-1304: Organization/mo-dicom-c has no registered")
    assert archive.status(kept.id) == "open"
    assert archive.hub.rejected.count() == 1
    assert archive.index.counts()["dicom_instances"] == 0

    # the operator registers MO C's patient numbering; the replay files it as MO C's
    archive.register(polyclinic(numbering=True))
    done = archive.replay(kept)
    assert done.outcome == "stored" and done.status == 0 and done.refused is None
    stored = done.stored
    assert stored is not None and not stored.duplicate
    assert done.text == f"0000 stored: ImagingStudy/{stored.imaging_study_id}"
    row = archive.index.instance(str(ds.SOPInstanceUID))
    assert row is not None and row.owner == MO_C and row.transfer_syntax == IMPLICIT
    # the archive holds exactly the bytes that were kept (file meta + the dataset as sent)
    assert b"".join(archive.hub.blobs.open(row.blob_key)) == kept.raw
    patient = archive.resource("Patient", stored.patient_ref)
    assert {"system": SYSTEM_C, "value": "C-501"} in patient["identifier"]
    assert patient["managingOrganization"] == {"reference": f"Organization/{MO_C}"}
    study = archive.resource("ImagingStudy", stored.imaging_study_id)
    assert study["subject"] == {"reference": f"Patient/{stored.patient_ref}"}
    assert study["numberOfInstances"] == 1
    assert archive.index.study(str(ds.StudyInstanceUID))["owner"] == MO_C  # type: ignore[index]
    # the message is closed with what came of it, and is not replayed twice
    after = archive.hub.rejected.get(kept.id)
    assert after is not None and after.status == "replayed"
    assert after.replay_outcome == done.text and after.replayed_at is not None
    with pytest.raises(Conflict):
        archive.replay(kept)
    assert archive.hub.rejected.count() == 1


def test_an_instance_of_another_patients_study_is_stored_once_the_two_are_merged(
    archive: Archive, as_hub: Any
) -> None:
    archive.register(polyclinic(numbering=True))
    first = send_c(archive.storage, ct_instance(patient_id="C-1", name="Орлова^Вера"))
    # the RIS kept a second chart for the same woman: a study of hers, then an image of the
    # first study filed under the second chart's number
    other = send_c(
        archive.storage,
        ct_instance(patient_id="C-2", name="Орлова^Вера^Ивановна", birth_date="19790101"),
    )
    assert archive.mpi.golden_of(first.patient_ref) != archive.mpi.golden_of(other.patient_ref)
    late = ct_instance(
        patient_id="C-2",
        name="Орлова^Вера^Ивановна",
        birth_date="19790101",
        study_uid=first.study_uid,
        instance_number=2,
    )
    kept = archive.refused(late, InstanceMismatch)
    assert kept.code == "HIE-1302"

    still = archive.replay(kept)
    assert still.outcome == "refused" and isinstance(still.refused, InstanceMismatch)
    assert archive.status(kept.id) == "open" and archive.hub.rejected.count() == 1

    # an operator finds the two charts are one person and merges their golden records
    golden_first = archive.mpi.golden_of(first.patient_ref)
    golden_other = archive.mpi.golden_of(other.patient_ref)
    assert golden_first is not None and golden_other is not None
    archive.mpi.merge(golden_other, golden_first, reason="one person, two charts")
    done = archive.replay(kept)
    assert done.outcome == "stored", done.text
    assert done.stored is not None and done.stored.study_uid == first.study_uid
    assert done.stored.imaging_study_id == first.imaging_study_id
    assert archive.status(kept.id) == "replayed"
    study = archive.index.study(first.study_uid)
    assert study is not None and study["num_instances"] == 2


def test_an_instance_that_arrived_meanwhile_is_replayed_as_a_duplicate(archive: Archive) -> None:
    ds = ct_instance(patient_id="C-77", name="Белов^Игорь", sex="M")
    kept = archive.refused(ds, PatientUnresolved)
    archive.register(polyclinic(numbering=True))
    archive.storage.senders.invalidate()
    # the modality sent it again itself once the registry was fixed
    sent = send_c(archive.storage, ds)
    assert not sent.duplicate
    done = archive.replay(kept)
    assert done.outcome == "duplicate" and done.status == 0
    assert done.stored is not None and done.stored.blob_key == sent.blob_key
    assert done.text == "0000 duplicate: the same bytes were already stored"
    after = archive.hub.rejected.get(kept.id)
    assert after is not None and after.status == "replayed"
    assert after.replay_outcome == done.text
    assert archive.index.counts()["dicom_instances"] == 1
    study = archive.resource("ImagingStudy", sent.imaging_study_id)
    assert study["numberOfInstances"] == 1 and study["meta"]["versionId"] == "1"


def test_a_conflicting_instance_is_refused_again_and_stays_open(archive: Archive) -> None:
    ds = ct_instance(seed=1)
    first = store_as(archive.storage, ds, MO_A)
    other = ct_instance(seed=2, sop_uid=str(ds.SOPInstanceUID), study_uid=str(ds.StudyInstanceUID))
    with pytest.raises(InstanceConflict):
        store_as(archive.storage, other, MO_A)
    kept = newest(archive.hub.rejected)
    assert (kept.kind, kept.sender) == ("conflict", f"{AE_A}|{MO_A}") and replayable(kept)
    for _ in range(2):
        out = archive.replay(kept)
        assert out.outcome == "refused" and out.status == CANNOT_UNDERSTAND
        assert isinstance(out.refused, InstanceConflict)
        assert out.text.startswith("C000 HIE-1303: an instance with this SOP Instance UID")
        assert archive.status(kept.id) == "open"
    assert archive.hub.rejected.count() == 1  # refused replays are not kept again
    row = archive.index.instance(str(ds.SOPInstanceUID))
    assert row is not None and row.blob_key == first.blob_key  # the first is still kept


def test_an_mo_no_longer_registered_cannot_replay(archive: Archive) -> None:
    kept = archive.refused(ct_instance(patient_id="C-9"), PatientUnresolved)
    archive.register(polyclinic(numbering=True, active=False))
    with pytest.raises(Conflict) as caught:
        archive.replay(kept)
    assert "Organization/mo-dicom-c" in caught.value.message
    assert "no longer a registered, active MO" in caught.value.message
    assert archive.status(kept.id) == "open" and archive.hub.rejected.count() == 1
    # registered again (and its numbering with it): the replay stores it
    archive.register(polyclinic(numbering=True))
    assert archive.replay(kept).outcome == "stored"


def test_what_a_replay_cannot_store_is_a_conflict(archive: Archive) -> None:
    rejected = archive.hub.rejected
    ds = ct_instance()
    # the storage service keeps the dataset alone when its UIDs were too broken for file meta
    alone = rejected.keep(
        channel="dicom",
        kind="rejected",
        raw=encode(ds, IMPLICIT),
        sender=f"{AE_A}|{MO_A}",
        code="HIE-1302",
        reason="SOPInstanceUID is not a valid UID (PS3.5 9.1)",
        control_id=str(ds.SOPInstanceUID),
    )
    # file meta, but the dataset behind it cut short
    meta = file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), IMPLICIT)
    cut = rejected.keep(
        channel="dicom",
        kind="rejected",
        raw=meta + encode(ds, IMPLICIT)[:-7],
        sender=f"{AE_A}|{MO_A}",
        code="HIE-1304",
        control_id=str(ds.SOPInstanceUID),
    )
    # what the storage service itself keeps of a truncated dataset: refused as unreadable
    with pytest.raises(UnreadableInstance):
        store_as(archive.storage, ds, MO_A, raw=encode(ds, IMPLICIT)[:-7])
    unreadable = newest(rejected)
    assert unreadable.code == "HIE-1301" and not replayable(unreadable)
    hl7 = rejected.keep(channel="mllp", kind="rejected", raw=b"MSH|^~\\&|A|B\r", code="103")
    for ident, why in (
        (alone, "without File Meta Information"),
        (cut, "is not a whole dataset"),
        (unreadable.id, "is not a DICOM instance a replay could store"),
        (hl7, "is not a DICOM instance a replay could store"),
    ):
        kept = rejected.get(ident)
        assert kept is not None
        with pytest.raises(Conflict) as caught:
            replay_instance(archive.storage, kept)
        assert why in caught.value.message, caught.value.message
        assert archive.status(ident) == "open"
    # a message closed already
    kept = archive.refused(ct_instance(patient_id="C-3"), PatientUnresolved)
    rejected.discard(kept.id, "sent to the wrong hub")
    with pytest.raises(Conflict) as caught:
        archive.replay(kept)
    assert "is discarded" in caught.value.message
    assert archive.index.counts()["dicom_instances"] == 0


# --- the admin API ------------------------------------------------------------------------------


def code_of(r: Any) -> str:
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome", oo
    return str(oo["issue"][0]["details"]["coding"][0]["code"])


def test_admin_replay_of_a_dicom_instance(client: Any) -> None:
    hub: Hub = client.hub
    admin = bearer(client.settings, "admin")
    r = client.post("/fhir", json=as_transaction(dicom_registry() + polyclinic(numbering=False)))
    assert r.status_code == 200, r.text
    svc = FhirService(hub.store, client.settings)
    attach_mpi(svc)
    storage = StorageService(svc, hub.blobs, hub.rejected)
    try:
        ds = ct_instance(patient_id="C-42", name="Зайцева^Нина")
        with pytest.raises(PatientUnresolved):
            send_c(storage, ds)
    finally:
        storage.close()
    ident = newest(hub.rejected).id
    shown = client.get(f"/admin/messages/{ident}", headers=admin).json()
    assert shown["channel"] == "dicom" and shown["replayable"] is True

    url = f"/admin/messages/{ident}/$replay"
    r = client.post(url, headers=admin)
    assert r.status_code == 200, r.text
    refused = r.json()
    assert set(refused) == {"id", "outcome", "outcome_text", "problems", "message"}
    assert refused["outcome"] == "refused" and refused["outcome_text"] == "отклонено / refused"
    (problem,) = refused["problems"]
    assert problem["severity"] == "error" and problem["code"] == "HIE-1304"
    assert problem["dimse_status"] == "A900" and "patient identifier system" in problem["message"]
    assert refused["message"]["status"] == "open" and refused["message"]["replayable"] is True
    assert hub.rejected.count() == 1

    # the operator registers the numbering over FHIR; the replay stores the instance
    r = client.post("/fhir", json=as_transaction(polyclinic(numbering=True)))
    assert r.status_code == 200, r.text
    r = client.post(url, headers=admin)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["id"] == ident and done["problems"] == []
    assert done["outcome"] == "stored" and done["outcome_text"] == "сохранено / stored"
    msg = done["message"]
    assert msg["status"] == "replayed" and msg["replayable"] is False
    assert msg["replay_outcome"].startswith("0000 stored: ImagingStudy/")
    study_id = msg["replay_outcome"].removeprefix("0000 stored: ImagingStudy/")
    study = client.get(f"/fhir/ImagingStudy/{study_id}")
    assert study.status_code == 200, study.text
    assert study.json()["identifier"][0]["value"] == f"urn:oid:{ds.StudyInstanceUID}"
    row = DicomIndex(hub.store).instance(str(ds.SOPInstanceUID))
    assert row is not None and row.owner == MO_C
    assert b"".join(hub.blobs.open(row.blob_key)).endswith(encode(ds, IMPLICIT))

    # closed: a second replay is a conflict
    again = client.post(url, headers=admin)
    assert again.status_code == 409 and code_of(again) == "HIE-1006"
    # the replay's audit record names the study it wrote
    recs, _ = hub.audit.records(subtypes=["rejected-replay"], count=10)
    ok = [x for x in recs if x.path == url and x.status == 200]
    assert len(ok) == 2 and all(x.roles == ["admin"] for x in ok)
    assert f"ImagingStudy/{study_id}" in ok[0].entities and ok[0].patients

    # an instance kept without file meta cannot be replayed: 409, still open
    alone = hub.rejected.keep(
        channel="dicom",
        kind="rejected",
        raw=encode(ct_instance(), IMPLICIT),
        sender=f"{AE_C}|{MO_C}",
        code="HIE-1302",
    )
    r = client.post(f"/admin/messages/{alone}/$replay", headers=admin)
    assert r.status_code == 409, r.text
    assert code_of(r) == "HIE-1006" and "File Meta Information" in r.text
    assert hub.rejected.get(alone).status == "open"  # type: ignore[union-attr]


# --- hie messages replay ------------------------------------------------------------------------


def test_cli_replays_dicom_and_hl7_messages_oldest_first(cli_env: str) -> None:
    """``hie messages replay ID`` stores a kept instance; ``--all`` replays the open messages
    of both channels, oldest first, and exits 1 while any still fails."""
    from hie.adapters.hl7_listener import Hl7Listener
    from hie.hub.settings import load_settings
    from tests.fixtures.hl7v2 import oru_message
    from tests.fixtures.labs import lab_registry

    hub = open_hub(load_settings())
    hub.store.migrate()
    try:
        arc = Archive(hub)
        try:
            ds = ct_instance(patient_id="C-1")
            first = arc.refused(ds, PatientUnresolved)
            listener = Hl7Listener(arc.svc, arc.mpi, hub.rejected, workers=1)
            listener.process(oru_message("cbc", control_id="LATE-7"))  # unknown laboratory
            listener.close()
            # the next image of the same series
            nxt = ct_instance(
                patient_id="C-1",
                study_uid=str(ds.StudyInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                instance_number=2,
            )
            second = arc.refused(nxt, PatientUnresolved)
        finally:
            arc.storage.close()
        (hl7,) = hub.rejected.list(channel="mllp")

        res = runner.invoke(app, ["messages", "replay", str(first.id)])
        assert res.exit_code == 1, res.output
        assert res.stdout.startswith(f"{first.id}: A900 HIE-1304: Organization/mo-dicom-c")
        res = runner.invoke(app, ["messages", "replay", "--all"])
        assert res.exit_code == 1, res.output
        lines = res.stdout.splitlines()
        assert [ln.split(":")[0] for ln in lines] == [str(first.id), str(hl7.id), str(second.id)]
        assert lines[1].startswith(f"{hl7.id}: AR")
        assert hub.rejected.count(status="open") == 3

        arc.register(polyclinic(numbering=True))
        res = runner.invoke(app, ["messages", "replay", str(first.id)])
        assert res.exit_code == 0, res.output
        assert res.stdout.startswith(f"{first.id}: 0000 stored: ImagingStudy/")
        arc.register(lab_registry())
        res = runner.invoke(app, ["messages", "replay", "--all"])
        assert res.exit_code == 0, res.output
        lines = res.stdout.splitlines()
        assert lines[0].startswith(f"{hl7.id}: AA")
        assert lines[1].startswith(f"{second.id}: 0000 stored: ImagingStudy/")
        assert hub.rejected.count(status="open") == 0
        index = DicomIndex(hub.store)
        assert index.counts()["dicom_instances"] == 2
        # the ImagingStudy counts are caught up after the batch, as after an association
        study = index.study(str(ds.StudyInstanceUID))
        assert study is not None and study["num_instances"] == 2 and study["stale"] == 0
        imaging = arc.resource("ImagingStudy", study["imaging_study_id"])
        assert imaging["numberOfInstances"] == 2
        # nothing open: nothing to replay; a replayed id is refused (exit 1)
        assert runner.invoke(app, ["messages", "replay", "--all"]).exit_code == 2
        res = runner.invoke(app, ["messages", "replay", str(first.id)])
        assert res.exit_code == 1 and "replayed" in res.output
    finally:
        hub.close()
