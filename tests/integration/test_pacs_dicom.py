"""The DICOM listener over the network, driven by clients that are not ours (dcmtk's echoscu
and storescu) and by pynetdicom as a client: Verification, Storage with the right statuses,
callers identified by AE title and address, stalled associations, and ``hie serve``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage, Verification

from hie.adapters.dicom import COMMITMENT_INSTANCE, COMMITMENT_PUSH, DicomListener, start_dicom
from hie.fhir.service import FhirService
from hie.hub.runtime import Hub, open_hub
from hie.hub.settings import load_settings
from hie.pacs.index import DicomIndex
from tests.fixtures.audit import durability_of
from tests.fixtures.dicom import (
    AE_A,
    AE_B,
    EXPLICIT,
    IMPLICIT,
    MO_A,
    as_transaction,
    bundled_instance,
    ct_instance,
    dcmtk,
    dicom_registry,
    encode,
    uid,
    write_file,
)
from tests.fixtures.ports import free_port

pytestmark = pytest.mark.skipif(dcmtk("storescu") is None, reason="dcmtk is not installed")
ROOT = Path(__file__).resolve().parents[2]
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # dcmtk leaves Nagle on otherwise (DESIGN)


class Running:
    """A hub with the registry loaded and its DICOM listener on a free port."""

    def __init__(self, hub: Hub, listener: DicomListener) -> None:
        self.hub = hub
        self.listener = listener
        self.port = listener.port
        self.index = DicomIndex(hub.store)

    def echoscu(self, calling: str = AE_A, called: str = "HUB") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [dcmtk("echoscu") or "", "-aet", calling, "-aec", called, "127.0.0.1", str(self.port)],
            capture_output=True,
            text=True,
            timeout=60,
            env=DCMTK_ENV,
        )

    def storescu(
        self, *files: Path, calling: str = AE_A, options: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                dcmtk("storescu") or "",
                "-v",
                "--required",  # contexts for the files' own SOP classes and transfer syntaxes
                *options,
                "-aet",
                calling,
                "-aec",
                "HUB",
                "127.0.0.1",
                str(self.port),
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=DCMTK_ENV,
        )

    def associate(self, calling: str = AE_A, contexts: list[Any] | None = None) -> Any:
        ae = AE(ae_title=calling)
        ae.network_timeout = 30
        for cx in contexts or [CTImageStorage, Verification]:
            ae.add_requested_context(cx, [IMPLICIT, EXPLICIT])
        return ae.associate("127.0.0.1", self.port, ae_title="HUB")


def load_registry(hub: Hub) -> None:
    FhirService(hub.store, hub.settings).transaction(as_transaction(dicom_registry()), "")


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    settings = load_settings(
        data_dir=tmp_path / "var",
        dicom_port=free_port(),
        dicom_timeout_seconds=2.0,
        mllp_port=0,
    )
    hub = open_hub(settings)
    hub.store.migrate()
    load_registry(hub)
    listener = start_dicom(hub)
    assert listener is not None
    try:
        yield Running(hub, listener)
    finally:
        listener.stop()
        hub.close()


def test_echoscu_from_a_registered_modality_succeeds(running: Running) -> None:
    done = running.echoscu()
    assert done.returncode == 0, done.stderr


def test_an_unknown_calling_ae_title_is_rejected_at_association(running: Running) -> None:
    done = running.echoscu(calling="STRANGER")
    assert done.returncode != 0
    assert "calling ae title not recogni" in (done.stderr + done.stdout).lower()
    assert running.echoscu(calling=AE_A).returncode == 0  # the registered one still works


def test_a_registered_ae_title_from_another_address_is_rejected(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "var", dicom_port=free_port(), mllp_port=0)
    hub = open_hub(settings)
    hub.store.migrate()
    regs = dicom_registry()
    for r in regs:  # the modalities are registered at an address the test is not
        if r["resourceType"] == "Endpoint":
            r["address"] = r["address"].replace("127.0.0.1", "10.11.12.13")
    FhirService(hub.store, hub.settings).transaction(as_transaction(regs), "")
    listener = start_dicom(hub)
    assert listener is not None
    try:
        assoc = Running(hub, listener).associate()
        assert assoc.is_rejected
    finally:
        listener.stop()
        hub.close()


def test_the_called_ae_title_must_be_the_hubs(running: Running) -> None:
    done = running.echoscu(called="NOT_HUB")
    assert done.returncode != 0
    assert "called ae title not recogni" in (done.stderr + done.stdout).lower()


def test_storescu_sends_a_study_that_appears_as_an_imaging_study(
    running: Running, tmp_path: Path
) -> None:
    study, series = uid(), uid()
    files = [
        write_file(
            ct_instance(study_uid=study, series_uid=series, instance_number=i, seed=i),
            tmp_path / "study" / f"{i}.dcm",
        )
        for i in range(1, 6)
    ]
    jpeg = bundled_instance(
        "SC_rgb_jpeg_dcmtk.dcm", patient_id="12345", name="Иванова^Мария", sex="F"
    )
    jpeg.StudyInstanceUID = study
    jpeg_file = write_file(
        jpeg, tmp_path / "jpeg" / "jpeg.dcm", str(jpeg.file_meta.TransferSyntaxUID)
    )
    done = running.storescu(*files)
    assert done.returncode == 0, done.stderr
    # JPEG baseline as it is (-xy: propose it, beside uncompressed in a context of its own)
    done = running.storescu(jpeg_file, options=("-xy",))
    assert done.returncode == 0, done.stderr
    assert running.index.counts()["dicom_instances"] == 6
    row = running.index.study(study)
    assert row is not None and row["num_instances"] == 6 and row["num_series"] == 2
    # the association's end brings the ImagingStudy's counts up to the index
    deadline = time.monotonic() + 10
    while True:
        stored = running.hub.store.read("ImagingStudy", row["imaging_study_id"])
        assert stored is not None and stored.content is not None
        res = orjson.loads(stored.content)
        if res["numberOfInstances"] == 6 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert res["numberOfInstances"] == 6
    # the JPEG instance is kept in the transfer syntax it was sent in
    jrow = running.index.instance(str(jpeg.SOPInstanceUID))
    assert jrow is not None and jrow.transfer_syntax == "1.2.840.10008.1.2.4.50"
    # each association's transfer of the study is audited once (DICOM "Instances
    # Transferred"), as the sending MO, about its patient and study
    records, _ = running.hub.audit.records(subtypes=["store"], count=50)
    assert len(records) == 2 and {r.outcome for r in records} == {0}
    assert {(r.agent, r.method, r.source, r.path) for r in records} == {
        (f"dicom:{MO_A}", "DIMSE", "127.0.0.1", f"dicom:store {study}")
    }
    assert {e for r in records for e in r.entities} == {f"ImagingStudy/{row['imaging_study_id']}"}
    assert len({p for r in records for p in r.patients}) == 1
    # the same files again: every one accepted, nothing changes; the resend is audited
    # once more (as a transfer that stored nothing new)
    again = running.storescu(*files)
    assert again.returncode == 0, again.stderr
    again = running.storescu(jpeg_file, options=("-xy",))
    assert again.returncode == 0, again.stderr
    assert running.index.counts()["dicom_instances"] == 6
    records, _ = running.hub.audit.records(subtypes=["store"], count=50)
    assert len(records) == 4 and {r.outcome for r in records} == {0}


def test_pynetdicom_statuses_for_good_duplicate_and_conflicting_instances(
    running: Running,
) -> None:
    assoc = running.associate()
    assert assoc.is_established
    try:
        ds = ct_instance(seed=1)
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000  # a retry is safe
        other = ct_instance(
            seed=2, sop_uid=str(ds.SOPInstanceUID), study_uid=str(ds.StudyInstanceUID)
        )
        status = assoc.send_c_store(other)
        assert status.Status == 0xC000
        assert str(status.ErrorComment).startswith("HIE-1303")
        no_name = ct_instance(name="", patient_id="404")
        status = assoc.send_c_store(no_name)
        assert status.Status == 0xA900 and str(status.ErrorComment).startswith("HIE-1304")
        no_series = ct_instance()
        del no_series.SeriesInstanceUID
        status = assoc.send_c_store(no_series)
        assert status.Status == 0xA900 and "SeriesInstanceUID" in str(status.ErrorComment)
    finally:
        assoc.release()
    assert running.index.counts()["dicom_instances"] == 1
    kept = running.hub.rejected.list(channel="dicom")
    assert sorted(k.code for k in kept) == ["HIE-1302", "HIE-1303", "HIE-1304"]
    assert {k.sender for k in kept} == {f"{AE_A}|mo-dicom-a"}


def test_the_record_of_a_stored_study_is_as_durable_as_the_instance(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = durability_of(monkeypatch, running.hub.audit, lambda r: r.outcome)
    assoc = running.associate()
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ct_instance(seed=3)).Status == 0x0000
        no_series = ct_instance()
        del no_series.SeriesInstanceUID
        assert assoc.send_c_store(no_series).Status == 0xA900
    finally:
        assoc.release()
    assert asked == [(0, True), (4, False)]  # stored: synced before the answer; refused: not


def test_a_truncated_dataset_over_the_network_is_refused(
    running: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = ct_instance(size=32)
    path = write_file(ds, tmp_path / "whole.dcm", EXPLICIT)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-300])
    # pynetdicom sends a file's dataset bytes as they are, without decoding, in this mode
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = running.associate()
    try:
        status = assoc.send_c_store(cut)
    finally:
        assoc.release()
    assert status.Status == 0xC000 and str(status.ErrorComment).startswith("HIE-1301")
    assert running.index.counts()["dicom_instances"] == 0


def test_two_mos_sending_the_same_patient_id_get_two_patients(running: Running) -> None:
    refs = []
    for calling, name in ((AE_A, "Иванова^Мария"), (AE_B, "Кузнецов^Пётр")):
        assoc = running.associate(calling)
        try:
            ds = ct_instance(patient_id="12345", name=name)
            assert assoc.send_c_store(ds).Status == 0x0000
        finally:
            assoc.release()
        row = running.index.study(str(ds.StudyInstanceUID))
        assert row is not None
        refs.append(row["patient_ref"])
    assert refs[0] != refs[1]
    with running.hub.store.identity_reader() as idx:
        assert idx.group_of("Patient", refs[0]) != idx.group_of("Patient", refs[1])


def test_a_stalled_association_is_aborted_with_nothing_half_stored(running: Running) -> None:
    assoc = running.associate()
    assert assoc.is_established
    ds = ct_instance(size=256)  # 128 KiB of pixels: many P-DATA PDUs
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(encode(ds, IMPLICIT))
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage)
    pdus = list(msg.encode_msg(cx.context_id, 4096))
    assert len(pdus) > 4
    for pdu in pdus[:3]:  # the command and the first fragments, then silence
        assoc.dul.send_pdu(pdu)
    deadline = time.monotonic() + 15
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.1)
    assert assoc.is_aborted, "the hub did not abort the stalled association"
    assert running.index.counts()["dicom_instances"] == 0
    assert list(running.hub.blobs.iter_keys()) == []
    # and the hub still serves others
    assert running.echoscu().returncode == 0


@pytest.mark.parametrize("http", [False, True], ids=["dicom-only", "with-http"])
def test_hie_serve_starts_the_dicom_listener_and_stops_cleanly(tmp_path: Path, http: bool) -> None:
    data = tmp_path / "var"
    settings = load_settings(data_dir=data)
    hub = open_hub(settings)
    hub.store.migrate()
    load_registry(hub)
    hub.close()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIE_")}
    env |= {
        "HIE_DATA_DIR": str(data),
        "HIE_HTTP_PORT": str(free_port()) if http else "0",
        "HIE_HTTP_WORKERS": "1",
        "HIE_MLLP_PORT": "0",
        "HIE_DICOM_PORT": str(port),
        "HIE_LOG_LEVEL": "WARNING",
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hie.cli", "serve"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        echo = subprocess.run(
            [dcmtk("echoscu") or "", "-aet", AE_A, "-aec", "HUB", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env=DCMTK_ENV,
        )
        assert echo.returncode == 0, echo.stderr
        ds = ct_instance()
        f = write_file(ds, tmp_path / "one.dcm")
        store = subprocess.run(
            [dcmtk("storescu") or "", "-aet", AE_A, "-aec", "HUB", "127.0.0.1", str(port), str(f)],
            capture_output=True,
            text=True,
            timeout=60,
            env=DCMTK_ENV,
        )
        assert store.returncode == 0, store.stderr
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    # a clean stop: the listeners and the hub were closed, so the blob journal's last
    # checkpoint put the instance's file in place
    assert proc.returncode == 0, log.read_text()
    hub = open_hub(settings)
    try:
        assert DicomIndex(hub.store).counts()["dicom_instances"] == 1
        row = DicomIndex(hub.store).instance(str(ds.SOPInstanceUID))
        assert row is not None
        assert hub.blobs.path(row.blob_key).is_file()  # type: ignore[attr-defined]
    finally:
        hub.close()
    assert "DICOM" in log.read_text()


def test_storage_commitment_is_reported_to_the_modality(tmp_path: Path) -> None:
    """Push model: the modality asks over its storage association; the hub answers the
    N-ACTION at once, then calls the modality's registered address with the N-EVENT-REPORT."""
    reports: list[tuple[int, Any]] = []
    got = threading.Event()

    def on_report(event: Any) -> tuple[int, None]:
        reports.append((event.request.EventTypeID, event.event_information))
        got.set()
        return 0x0000, None

    modality = AE(ae_title=AE_A)
    modality.add_supported_context(
        COMMITMENT_PUSH, [IMPLICIT, EXPLICIT], scu_role=True, scp_role=True
    )
    mod_port = free_port()
    server = modality.start_server(
        ("127.0.0.1", mod_port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
    )
    settings = load_settings(data_dir=tmp_path / "var", dicom_port=free_port(), mllp_port=0)
    hub = open_hub(settings)
    hub.store.migrate()
    FhirService(hub.store, settings).transaction(
        as_transaction(dicom_registry(port_a=mod_port)), ""
    )
    listener = start_dicom(hub)
    assert listener is not None
    try:
        run = Running(hub, listener)
        assoc = run.associate(contexts=[CTImageStorage, COMMITMENT_PUSH])
        try:
            stored = [ct_instance(seed=i) for i in range(2)]
            for ds in stored:
                assert assoc.send_c_store(ds).Status == 0x0000
            missing = uid()
            request = Dataset()
            request.TransactionUID = uid()
            request.ReferencedSOPSequence = []
            for sop_class, sop_uid in [
                *((str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in stored),
                (CTImageStorage, missing),
            ]:
                item = Dataset()
                item.ReferencedSOPClassUID = sop_class
                item.ReferencedSOPInstanceUID = sop_uid
                request.ReferencedSOPSequence.append(item)
            status, _ = assoc.send_n_action(request, 1, COMMITMENT_PUSH, COMMITMENT_INSTANCE)
            assert status.Status == 0x0000
        finally:
            assoc.release()
        assert got.wait(30), "no N-EVENT-REPORT arrived"
        event_type, info = reports[0]
        assert event_type == 2  # some failed
        assert info.TransactionUID == request.TransactionUID
        assert sorted(i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence) == sorted(
            str(d.SOPInstanceUID) for d in stored
        )
        [failed] = info.FailedSOPSequence
        assert failed.ReferencedSOPInstanceUID == missing and failed.FailureReason == 0x0112
    finally:
        listener.stop()
        hub.close()
        server.shutdown()
