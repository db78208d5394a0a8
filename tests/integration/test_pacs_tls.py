"""DICOM over TLS (``HIE_DICOM_TLS_PORT``), driven by dcmtk's echoscu, storescu and movescu
with their ``+tls`` options and by pynetdicom: a modality presenting a certificate its MO
registered is known by it wherever it connects from; a certificate of another MO, no
certificate, another CA's certificate or plain TCP on the TLS port get nothing; a peer that
connects and never finishes its handshake holds up nobody else; a C-MOVE destination
registered as ``dicom+tls://`` gets its instances over TLS, the hub presenting its own
certificate."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from hie.adapters.dicom import DicomListener
from hie.hub.runtime import Hub
from hie.hub.settings import load_settings
from hie.pacs.index import DicomIndex
from hie.registries.facility import CERTIFICATE_SYSTEM
from tests.fixtures.dicom import (
    AE_A,
    MO_A,
    MO_B,
    ct_instance,
    dcmtk,
    dicom_endpoint,
    dicom_registry,
    write_file,
)
from tests.fixtures.dicom_qr import STUDY_ROOT_MOVE, listening, received, storescp
from tests.fixtures.ports import free_port
from tests.fixtures.tls import Pki, make_pki

pytestmark = pytest.mark.skipif(dcmtk("storescu") is None, reason="dcmtk is not installed")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
ELSEWHERE = "10.99.0.1"  # the address MO A registered for its modality: not this machine's
WS_TLS = "WS_TLS"  # MO A's workstation, reached over TLS


@dataclass
class TlsHub:
    hub: Hub
    listener: DicomListener
    pki: Pki
    ws_port: int

    def dcmtk(
        self,
        tool: str,
        *args: str,
        calling: str = AE_A,
        tls: tuple[str, ...] | None = None,
        port: int | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a dcmtk SCU against the TLS port (or ``port``); ``tls``: its TLS options
        (default: the registered client certificate, trusting the test CA)."""
        if tls is None:
            tls = (
                "+tls",
                str(self.pki.client_key),
                str(self.pki.client_cert),
                "+cf",
                str(self.pki.ca_cert),
            )
        return subprocess.run(
            [
                dcmtk(tool) or "",
                *tls,
                "-aet",
                calling,
                "-aec",
                "HUB",
                "127.0.0.1",
                str(port or self.listener.tls_port),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=DCMTK_ENV,
        )


def registry(pki: Pki, certificate_of: str, ws_port: int) -> list[dict[str, Any]]:
    """The test MOs; MO A's modality registered at an address that is not this machine's,
    its workstation at ``dicom+tls://WS_TLS@127.0.0.1:ws_port``, and the client certificate
    listed on ``certificate_of``'s DICOM Endpoint."""
    resources = dicom_registry()
    for r in resources:
        if r["resourceType"] != "Endpoint":
            continue
        if r["managingOrganization"]["reference"] == f"Organization/{MO_A}":
            r["address"] = r["address"].replace("127.0.0.1", ELSEWHERE)
        if r["managingOrganization"]["reference"] == f"Organization/{certificate_of}":
            r["identifier"].append({"system": CERTIFICATE_SYSTEM, "value": pki.client_sha256})
    ws = dicom_endpoint(MO_A, WS_TLS, port=ws_port)
    ws["address"] = ws["address"].replace("dicom://", "dicom+tls://")
    resources.append(ws)
    return resources


def tls_hub(tmp_path: Path, certificate_of: str) -> Iterator[TlsHub]:
    pki = make_pki(tmp_path / "pki")
    ws_port = free_port()
    settings = load_settings(
        data_dir=tmp_path / "var",
        dicom_port=free_port(),
        dicom_tls_port=free_port(),
        dicom_tls_cert=str(pki.server_cert),
        dicom_tls_key=str(pki.server_key),
        dicom_tls_client_ca=str(pki.ca_cert),
        dicom_timeout_seconds=3.0,
        mllp_port=0,
    )
    with listening(settings, registry(pki, certificate_of, ws_port)) as (hub, listener):
        yield TlsHub(hub, listener, pki, ws_port)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[TlsHub]:
    yield from tls_hub(tmp_path, certificate_of=MO_A)


@pytest.fixture
def certificate_of_b(tmp_path: Path) -> Iterator[TlsHub]:
    yield from tls_hub(tmp_path, certificate_of=MO_B)


def test_a_modality_with_its_mos_certificate_echoes_and_stores_from_any_address(
    running: TlsHub, tmp_path: Path
) -> None:
    echo = running.dcmtk("echoscu")
    assert echo.returncode == 0, echo.stderr
    ds = ct_instance(patient_id="TLS-1")
    stored = running.dcmtk("storescu", str(write_file(ds, tmp_path / "ct.dcm")))
    assert stored.returncode == 0, stored.stderr
    row = DicomIndex(running.hub.store).instance(str(ds.SOPInstanceUID))
    assert row is not None
    assert row.owner == MO_A  # the certificate's MO is the principal of what it wrote


def test_without_tls_the_same_modality_from_this_address_is_not_recognised(
    running: TlsHub,
) -> None:
    plain = running.dcmtk("echoscu", tls=(), port=running.listener.port)
    assert plain.returncode != 0
    assert "calling ae title not recogni" in (plain.stderr + plain.stdout).lower()


def test_a_certificate_another_mo_registered_is_rejected_at_association(
    certificate_of_b: TlsHub,
) -> None:
    done = certificate_of_b.dcmtk("echoscu")  # AE title of MO A, certificate of MO B
    assert done.returncode != 0
    assert "calling ae title not recogni" in (done.stderr + done.stdout).lower()


def test_no_certificate_another_cas_certificate_or_plain_tcp_fail_the_handshake(
    running: TlsHub,
) -> None:
    pki = running.pki
    anonymous = running.dcmtk("echoscu", tls=("+tla", "+cf", str(pki.ca_cert)))
    foreign = running.dcmtk(
        "echoscu",
        tls=(
            "+tls",
            str(pki.other_client_key),
            str(pki.other_client_cert),
            "+cf",
            str(pki.ca_cert),
        ),
    )
    plain = running.dcmtk("echoscu", tls=())
    for done in (anonymous, foreign, plain):
        assert done.returncode != 0, done.stdout
    assert running.dcmtk("echoscu").returncode == 0  # the listener is still serving


def test_a_peer_that_never_finishes_its_handshake_holds_up_nobody(running: TlsHub) -> None:
    silent = socket.create_connection(("127.0.0.1", running.listener.tls_port))
    half = socket.create_connection(("127.0.0.1", running.listener.tls_port))
    half.sendall(b"\x16\x03\x01\x00\xff")  # a TLS record header, then nothing
    try:
        done = running.dcmtk("echoscu")
        assert done.returncode == 0, done.stderr
        # and both are dropped after the network timeout, not kept forever
        for s in (silent, half):
            s.settimeout(15)
            assert s.recv(1024) == b""
    finally:
        silent.close()
        half.close()


def test_pynetdicom_as_a_tls_client_is_identified_by_its_certificate(running: TlsHub) -> None:
    ae = AE(ae_title=AE_A)
    ae.add_requested_context(Verification)
    ctx = running.pki.client_context()
    assoc = ae.associate(
        "127.0.0.1", running.listener.tls_port, ae_title="HUB", tls_args=(ctx, "localhost")
    )
    assert assoc.is_established
    try:
        status = assoc.send_c_echo()
        assert status.Status == 0x0000
    finally:
        assoc.release()


def test_a_tls_port_without_a_certificate_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HIE_DICOM_TLS_CERT"):
        load_settings(data_dir=tmp_path / "var", dicom_tls_port=2762)


def move_study(running: TlsHub, study_uid: str) -> list[int]:
    """C-MOVE a study to WS_TLS from pynetdicom over TLS (dcmtk's movescu has no TLS);
    the statuses of the responses."""
    ae = AE(ae_title=AE_A)
    ae.add_requested_context(STUDY_ROOT_MOVE)
    assoc = ae.associate(
        "127.0.0.1",
        running.listener.tls_port,
        ae_title="HUB",
        tls_args=(running.pki.client_context(), "localhost"),
    )
    assert assoc.is_established
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study_uid
    try:
        return [int(st.Status) for st, _ in assoc.send_c_move(ident, WS_TLS, STUDY_ROOT_MOVE)]
    finally:
        assoc.release()


def test_a_move_to_a_tls_destination_travels_over_tls(running: TlsHub, tmp_path: Path) -> None:
    ds = ct_instance(patient_id="TLS-2")
    assert running.dcmtk("storescu", str(write_file(ds, tmp_path / "ct.dcm"))).returncode == 0
    pki = running.pki
    # the workstation requires the hub's certificate (signed by the test CA) and presents
    # its own, which the hub checks against HIE_DICOM_TLS_CLIENT_CA and the host name
    tls = ("+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca_cert))
    with storescp(running.ws_port, tmp_path / "in", WS_TLS, *tls) as out:
        statuses = move_study(running, str(ds.StudyInstanceUID))
        files = received(out)
    assert statuses[-1] == 0x0000
    assert [str(dcmread(f).SOPInstanceUID) for f in files] == [str(ds.SOPInstanceUID)]


@pytest.mark.parametrize("node", ["plain TCP", "another CA's certificate"])
def test_a_tls_destination_the_hub_cannot_verify_gets_nothing(
    running: TlsHub, tmp_path: Path, node: str
) -> None:
    ds = ct_instance(patient_id="TLS-3")
    assert running.dcmtk("storescu", str(write_file(ds, tmp_path / "ct.dcm"))).returncode == 0
    pki = running.pki
    tls: tuple[str, ...] = ()
    if node != "plain TCP":  # the hub trusts the test CA only (HIE_DICOM_TLS_CLIENT_CA)
        tls = ("+tls", str(pki.other_client_key), str(pki.other_client_cert), "-ic")
    with storescp(running.ws_port, tmp_path / "in", WS_TLS, *tls) as out:
        statuses = move_study(running, str(ds.StudyInstanceUID))
        assert received(out) == []
    assert statuses[-1] != 0x0000
