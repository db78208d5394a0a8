"""The MLLP listener against MLLP clients that are not ours: ``mllp_send`` (python-hl7's
command-line sender, a separate process) over TCP and python-hl7's asyncio MLLP client over
TLS with client certificates from a throw-away CA (``tests/fixtures/tls.py``).
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import hl7
import pytest
from hl7.mllp import open_hl7_connection

from hie.adapters.mllp import (
    MllpServer,
    MllpThread,
    Peer,
    frame,
    mllp_server_from_settings,
)
from hie.adapters.tls import server_ssl_context
from tests.fixtures.tls import CLIENT_CN, CLIENT_O, Pki, make_pki


def message(control: str) -> bytes:
    """A synthetic ORU^R01 (an invented patient) with MSH-10 = ``control``."""
    return (
        f"MSH|^~\\&|LABAPP|LAB01|HIE|HUB|20260115103000+0300||ORU^R01^ORU_R01|{control}|P|2.5.1\r"
        f"PID|1||7000123^^^LAB01^MR||Тестова^Анна||19850312|F\r"
        f"OBR|1|ORD-{control}||2345-7^Glucose^LN\r"
        f"OBX|1|NM|2345-7^Glucose^LN||5.4|mmol/L|3.9-6.1|N|||F\r"
    ).encode()


class AckHandler:
    """Answers each message with an ACK (MSA-1 AA) echoing its MSH-10; records what came."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.peers: list[Peer] = []

    async def handle(self, raw: bytes, peer: Peer) -> list[bytes]:
        self.received.append(raw)
        self.peers.append(peer)
        control = raw.split(b"\r", 1)[0].split(b"|")[9]
        return [
            b"MSH|^~\\&|HIE|HUB|LABAPP|LAB01|20260115103001+0300||ACK^R01^ACK|ACK-"
            + control
            + b"|P|2.5.1\rMSA|AA|"
            + control
        ]

    async def reject(self, kind: str, head: bytes, peer: Peer, *, size: int) -> list[bytes]:
        return []


def mllp_send() -> str:
    exe = Path(sys.executable).parent / "mllp_send"
    found = str(exe) if exe.exists() else shutil.which("mllp_send")
    if found is None:
        pytest.skip("mllp_send is missing: install the dev dependencies (hl7)")
    return found


def test_mllp_send_gets_an_ack_for_every_message(tmp_path: Path) -> None:
    handler = AckHandler()
    thread = MllpThread(MllpServer(handler, host="127.0.0.1", port=0, idle_timeout_seconds=10.0))
    thread.start()
    try:
        controls = [f"LAB01-{i:04d}" for i in range(12)]
        batch = tmp_path / "batch.hl7"
        batch.write_bytes(b"".join(frame(message(c)) for c in controls))
        done = subprocess.run(
            [mllp_send(), "--port", str(thread.port), "--file", str(batch), "127.0.0.1"],
            capture_output=True,
            timeout=60,
            check=True,
        )
    finally:
        thread.stop()
    acks = [a.strip(b"\x0b\x1c\r") for a in done.stdout.split(b"\n") if a.strip()]
    assert len(acks) == len(controls)
    for ack_bytes, control in zip(acks, controls, strict=True):
        ack = hl7.parse(ack_bytes.decode())
        assert str(ack.segment("MSA")[1]) == "AA" and str(ack.segment("MSA")[2]) == control
    # what the server handed over is the message exactly as sent (mllp_send strips the CR
    # that ends the last segment before framing)
    assert handler.received == [message(c).rstrip(b"\r") for c in controls]
    assert all(p.host == "127.0.0.1" and not p.tls for p in handler.peers)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def send_over_tls(port: int, ctx: ssl.SSLContext, control: str) -> Any:
    """Send one message with python-hl7's asyncio client; return the parsed ACK."""
    reader, writer = await open_hl7_connection("127.0.0.1", port, ssl=ctx, encoding="utf-8")
    try:
        writer.writemessage(hl7.parse(message(control).decode()))
        await writer.drain()
        return await asyncio.wait_for(reader.readmessage(), 10)
    finally:
        writer.close()


def test_tls_with_client_certificates(pki: Pki) -> None:
    async def main() -> None:
        handler = AckHandler()
        ctx = server_ssl_context(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert))
        server = MllpServer(handler, host="127.0.0.1", port=0, ssl_context=ctx)
        await server.start()
        try:
            ack = await send_over_tls(server.port, pki.client_context(), "TLS-1")
            assert str(ack.segment("MSA")[1]) == "AA" and str(ack.segment("MSA")[2]) == "TLS-1"
            peer = handler.peers[0]
            assert peer.tls and peer.certificate is not None
            assert peer.certificate.subject == {"C": "RU", "O": CLIENT_O, "CN": CLIENT_CN}
            assert peer.certificate.sha256 == pki.client_sha256
            # no certificate, or one from another CA: refused, nothing handed over
            for ctx_bad in (
                pki.client_context(with_certificate=False),
                pki.client_context(other=True),
            ):
                with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                    await send_over_tls(server.port, ctx_bad, "REFUSED")
            assert len(handler.received) == 1
            # plain TCP to a TLS port gets nothing either
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(frame(message("PLAIN")))
            assert await asyncio.wait_for(r.read(), 10) == b""
            w.close()
            assert len(handler.received) == 1
        finally:
            await server.stop()
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(main())


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_tls_without_client_certificates_and_from_settings(pki: Pki, settings_for: Any) -> None:
    settings = settings_for(
        mllp_port=0,
        mllp_tls_cert=str(pki.server_cert),
        mllp_tls_key=str(pki.server_key),
    )

    async def main() -> None:
        handler = AckHandler()
        server = mllp_server_from_settings(settings, handler)
        assert server.ssl_context is not None
        assert server.ssl_context.verify_mode == ssl.CERT_NONE
        assert server.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2
        await server.start()
        try:
            client = ssl.create_default_context(cafile=str(pki.ca_cert))
            ack = await send_over_tls(server.port, client, "TLS-2")
            assert str(ack.segment("MSA")[2]) == "TLS-2"
            assert handler.peers[0].tls and handler.peers[0].certificate is None
            # TLS 1.1 is refused
            old = ssl.create_default_context(cafile=str(pki.ca_cert))
            old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            old.maximum_version = ssl.TLSVersion.TLSv1_1
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await send_over_tls(server.port, old, "OLD")
        finally:
            await server.stop()

    asyncio.run(main())
    # with a CA bundle configured, client certificates are required
    required = settings_for(
        mllp_port=0,
        mllp_tls_cert=str(pki.server_cert),
        mllp_tls_key=str(pki.server_key),
        mllp_tls_client_ca=str(pki.ca_cert),
    )
    ctx = mllp_server_from_settings(required, AckHandler()).ssl_context
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED
