"""C-MOVE and C-GET against the running DICOM listener: dcmtk's movescu (to a storescp the
test starts as the registered destination) and getscu, and pynetdicom as a client for the
sub-operation counts, failure lists, cancel, unknown destinations, the access policy and the
audit record of every retrieve."""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEGBaseline8Bit
from pynetdicom import build_role, evt
from pynetdicom.sop_class import CTImageStorage

from hie.pacs.storage import Stored
from tests.fixtures.dicom import (
    AE_A,
    IMPLICIT,
    bundled_instance,
    ct_instance,
    dcmtk,
    uid,
)
from tests.fixtures.dicom_qr import (
    AE_C,
    MO_C,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    WS_A,
    QrHub,
    qr_hub,
    received,
    storescp,
)

pytestmark = pytest.mark.skipif(dcmtk("movescu") is None, reason="dcmtk is not installed")


@pytest.fixture
def h(tmp_path: Path) -> Iterator[QrHub]:
    with qr_hub(tmp_path) as running:
        yield running


def a_study(h: QrHub, n: int = 3, **kw: Any) -> list[Stored]:
    study, series = uid(), uid()
    return [
        h.store(
            ct_instance(study_uid=study, series_uid=series, instance_number=i + 1, seed=i, **kw)
        )
        for i in range(n)
    ]


def with_jpeg(h: QrHub, study: Stored) -> str:
    """A JPEG Baseline instance (stored as received) in ``study``; returns its SOP UID."""
    ds = bundled_instance("SC_rgb_jpeg_dcmtk.dcm", patient_id="12345", name="Иванова^Мария")
    ds.StudyInstanceUID = study.study_uid
    h.store(ds, ts=str(JPEGBaseline8Bit))
    return str(ds.SOPInstanceUID)


def ident(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def cmove(h: QrHub, ds: Dataset, dest: str, calling: str = AE_A) -> list[tuple[Any, Any]]:
    assoc = h.associate(calling, [STUDY_ROOT_MOVE])
    assert assoc.is_established
    try:
        return list(assoc.send_c_move(ds, dest, STUDY_ROOT_MOVE))
    finally:
        assoc.release()


class GetClient:
    """pynetdicom as a C-GET SCU that accepts CT Image Storage (SCP role) only."""

    def __init__(self, h: QrHub, calling: str = AE_A, cancel_after: int | None = None):
        self.h = h
        self.calling = calling
        self.cancel_after = cancel_after
        self.stored: list[str] = []
        self.assoc: Any = None

    def on_store(self, event: Any) -> int:
        self.stored.append(str(event.dataset.SOPInstanceUID))
        if self.cancel_after is not None and len(self.stored) == self.cancel_after:
            cx = self.assoc._get_valid_context(STUDY_ROOT_GET, "", "scu")
            self.assoc.send_c_cancel(1, cx.context_id)
        return 0x0000

    def get(self, ds: Dataset) -> list[tuple[Any, Any]]:
        self.assoc = self.h.associate(
            self.calling,
            [STUDY_ROOT_GET, CTImageStorage],
            ext_neg=[build_role(CTImageStorage, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, self.on_store)],
        )
        assert self.assoc.is_established
        try:
            return list(self.assoc.send_c_get(ds, STUDY_ROOT_GET, msg_id=1))
        finally:
            self.assoc.release()


def test_movescu_sends_a_study_to_the_registered_destination(h: QrHub, tmp_path: Path) -> None:
    study = a_study(h, 3)
    with storescp(h.ws_a_port, tmp_path / "in", WS_A) as out:
        done = h.dcmtk(
            "movescu",
            "-S",
            "-v",
            "-aem",
            WS_A,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study[0].study_uid}",
        )
        assert done.returncode == 0, done.stderr
        assert "Final Move Response (Success)" in done.stderr
        files = received(out)
    got = {str(dcmread(f).SOPInstanceUID): f for f in files}
    assert sorted(got) == sorted(s.sop_uid for s in study)
    # sent as stored: the bytes after the file meta are the archive's
    first = study[0]
    row = h.listener.storage.index.instance(first.sop_uid)
    assert row is not None
    stored = dcmread(BytesIO(b"".join(h.hub.blobs.open(row.blob_key))))
    sent = dcmread(got[first.sop_uid])
    assert sent.PixelData == stored.PixelData and sent.PatientID == "12345"
    [rec] = h.audits("retrieve")
    assert rec.outcome == 0 and rec.status == 0 and rec.org == "mo-dicom-a"
    assert "completed=3 failed=0" in rec.path and f"to {WS_A}" in rec.path
    assert rec.patients == [first.patient_ref]
    assert rec.entities == [f"ImagingStudy/{first.imaging_study_id}"]


def test_patient_root_move_by_patient_id(h: QrHub, tmp_path: Path) -> None:
    a_study(h, 2)
    a_study(h, 1)
    a_study(h, 1, patient_id="999", name="Другой^Пациент")
    with storescp(h.ws_a_port, tmp_path / "in", WS_A) as out:
        done = h.dcmtk(
            "movescu",
            "-P",
            "-aem",
            WS_A,
            "-k",
            "QueryRetrieveLevel=PATIENT",
            "-k",
            "PatientID=12345",
        )
        assert done.returncode == 0, done.stderr
        files = received(out)
    assert len(files) == 3
    assert {dcmread(f).PatientID for f in files} == {"12345"}


def test_unknown_or_foreign_move_destinations_are_0xa801(h: QrHub) -> None:
    study = a_study(h, 1)[0]
    for dest in ("NOWHERE", AE_C):  # unregistered; registered, but by another MO
        [(status, _)] = cmove(h, ident("STUDY", StudyInstanceUID=study.study_uid), dest)
        assert status.Status == 0xA801
    recs = h.audits("retrieve")
    assert [(r.outcome, r.status) for r in recs] == [(4, 0xA801), (4, 0xA801)]
    assert recs[0].patients == [] and "NOWHERE" in recs[0].path


def test_move_counts_and_a_transfer_syntax_the_destination_refused(
    h: QrHub, tmp_path: Path
) -> None:
    study = a_study(h, 2)
    jpeg = with_jpeg(h, study[0])
    # storescp accepts uncompressed only by default: the JPEG sub-operation fails
    with storescp(h.ws_a_port, tmp_path / "in", WS_A) as out:
        rsps = cmove(h, ident("STUDY", StudyInstanceUID=study[0].study_uid), WS_A)
        files = received(out)
    assert len(files) == 2
    pending = [s for s, _ in rsps if s.Status == 0xFF00]
    assert [p.NumberOfRemainingSuboperations for p in pending] == [2, 1, 0]
    final, failed = rsps[-1]
    assert final.Status == 0xB000
    assert final.NumberOfCompletedSuboperations == 2
    assert final.NumberOfFailedSuboperations == 1
    assert final.NumberOfWarningSuboperations == 0
    assert failed.FailedSOPInstanceUIDList == jpeg
    [rec] = h.audits("retrieve")
    assert rec.outcome == 4 and rec.status == 0xB000 and "completed=2 failed=1" in rec.path
    # a destination accepting JPEG gets it as stored
    with storescp(h.ws_a_port, tmp_path / "all", WS_A, "+xa") as out:
        rsps = cmove(h, ident("IMAGE", SOPInstanceUID=jpeg), WS_A)
        [f] = received(out)
    assert rsps[-1][0].Status == 0x0000
    assert str(dcmread(f).file_meta.TransferSyntaxUID) == str(JPEGBaseline8Bit)


def test_a_retrieve_without_its_unique_key_is_refused(h: QrHub, tmp_path: Path) -> None:
    a_study(h, 1)
    with storescp(h.ws_a_port, tmp_path / "in", WS_A) as out:
        rsps = cmove(h, ident("STUDY", StudyInstanceUID=""), WS_A)
        assert received(out) == []
    status = rsps[-1][0]
    assert status.Status == 0xA900 and str(status.ErrorComment).startswith("HIE-1306")
    rsps = GetClient(h).get(ident("SERIES", StudyInstanceUID="1.2.3"))
    assert rsps[-1][0].Status == 0xA900
    assert [r.outcome for r in h.audits("retrieve")] == [4, 4]


def test_getscu_retrieves_a_series(h: QrHub, tmp_path: Path) -> None:
    study = a_study(h, 3)
    a_study(h, 2)
    out = tmp_path / "get"
    out.mkdir()
    done = h.dcmtk(
        "getscu",
        "-S",
        "-v",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={study[0].study_uid}",
        "-k",
        f"SeriesInstanceUID={study[0].series_uid}",
    )
    assert done.returncode == 0, done.stderr
    assert "Number of Completed Suboperations : 3" in done.stderr
    assert sorted(str(dcmread(f).SOPInstanceUID) for f in received(out)) == sorted(
        s.sop_uid for s in study
    )
    [rec] = h.audits("retrieve")
    assert rec.outcome == 0 and "C-GET" in rec.path and "completed=3" in rec.path


def test_get_counts_and_the_failed_instance_list(h: QrHub) -> None:
    study = a_study(h, 2)
    jpeg = with_jpeg(h, study[0])  # Secondary Capture: the client offers no context for it
    client = GetClient(h)
    rsps = client.get(ident("STUDY", StudyInstanceUID=study[0].study_uid))
    assert sorted(client.stored) == sorted(s.sop_uid for s in study)
    pending = [s for s, _ in rsps if s.Status == 0xFF00]
    assert [(p.NumberOfRemainingSuboperations, p.NumberOfCompletedSuboperations) for p in pending][
        -1
    ] == (0, 2)
    final, failed = rsps[-1]
    assert final.Status == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 1)
    assert failed.FailedSOPInstanceUIDList == jpeg
    # nothing the client can take: every sub-operation failed
    rsps = client.get(ident("IMAGE", SOPInstanceUID=jpeg))
    assert rsps[-1][0].Status == 0xA702


def test_cancel_between_sub_operations(h: QrHub) -> None:
    study = a_study(h, 12, size=64)
    client = GetClient(h, cancel_after=1)
    rsps = client.get(ident("STUDY", StudyInstanceUID=study[0].study_uid))
    final, failed = rsps[-1]
    assert final.Status == 0xFE00
    assert final.NumberOfCompletedSuboperations >= 1
    assert final.NumberOfRemainingSuboperations > 0
    assert final.NumberOfCompletedSuboperations + final.NumberOfRemainingSuboperations == 12
    [rec] = h.audits("retrieve")
    assert rec.status == 0xFE00 and "cancelled" in rec.path


def test_access_policy_for_retrieve(h: QrHub, tmp_path: Path) -> None:
    study = a_study(h, 2)
    keys = ident("STUDY", StudyInstanceUID=study[0].study_uid)
    # MO C neither wrote nor treats the patient: a retrieve finds nothing to send
    client = GetClient(h, calling=AE_C)
    [(status, _)] = client.get(keys)
    assert status.Status == 0x0000 and status.NumberOfCompletedSuboperations == 0
    assert client.stored == []
    with storescp(h.ws_c_port, tmp_path / "c1", AE_C) as out:
        [(status, _)] = cmove(h, keys, AE_C, calling=AE_C)
        assert status.Status == 0x0000 and received(out) == []
    # treating the patient: MO C may pull the study to its own workstation
    h.treat(study[0].patient_ref, MO_C)
    with storescp(h.ws_c_port, tmp_path / "c2", AE_C) as out:
        rsps = cmove(h, keys, AE_C, calling=AE_C)
        assert rsps[-1][0].Status == 0x0000 and len(received(out)) == 2
    # the patient's consent closes it again
    h.deny(study[0].patient_ref, MO_C)
    client = GetClient(h, calling=AE_C)
    [(status, _)] = client.get(keys)
    assert status.NumberOfCompletedSuboperations == 0 and client.stored == []
    recs = h.audits("retrieve")
    assert [r.org for r in recs] == [MO_C] * 4
    assert [r.patients for r in recs] == [[], [], [study[0].patient_ref], []]
    assert "completed=2" in recs[2].path
    assert recs[2].entities == [f"ImagingStudy/{study[0].imaging_study_id}"]


def test_explicit_vr_instances_travel_to_an_implicit_only_receiver(
    h: QrHub, tmp_path: Path
) -> None:
    study = a_study(h, 1)
    with storescp(h.ws_a_port, tmp_path / "in", WS_A, "+xi") as out:
        rsps = cmove(h, ident("STUDY", StudyInstanceUID=study[0].study_uid), WS_A)
        [f] = received(out)
    assert rsps[-1][0].Status == 0x0000
    # stored explicit, sent implicit: the only change of encoding the hub makes (lossless)
    assert str(dcmread(f).file_meta.TransferSyntaxUID) == IMPLICIT
