"""The audit trail exported to syslog / ATNA collectors over real sockets (issue #5).

Collectors here are real listeners — UDP, TCP and TLS with a certificate from a CA made in
the test, and Debian's ``rsyslogd`` where it is installed — fed from a real
:class:`SqlAuditLog` on SQLite and PostgreSQL. What must hold: every record arrives, in
order, once per successful send; a collector that is down or untrusted delays records and
loses none (the cursor does not move); a restarted exporter resumes from the cursor.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from hie.hub.audit import AuditRecord, SqlAuditLog, open_audit_log
from hie.hub.audit_export import BOM, AuditExporter, AuditExportError
from tests.fixtures.ports import free_port
from tests.fixtures.tls import Pki, make_pki

FRAME = re.compile(
    rb"<(?P<pri>\d+)>1 (?P<ts>\S+) (?P<host>\S+) hie (?P<proc>\S+) IHE\+RFC-3881 "
    rb'\[meta sequenceId="(?P<seq>\d+)"\] (?P<msg>.*)',
    re.S,
)


# --- collectors ---------------------------------------------------------------------------------


@dataclass
class Collector:
    """A syslog listener on loopback that keeps every message it received."""

    kind: str  # udp, tcp, tls
    tls: ssl.SSLContext | None = None
    port: int = 0
    frames: list[bytes] = field(default_factory=list)
    _sock: socket.socket | None = None
    _conns: list[socket.socket] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"{self.kind}://127.0.0.1:{self.port}"

    def start(self) -> Collector:
        """Listen (again, on the same port once it had one)."""
        kind = socket.SOCK_DGRAM if self.kind == "udp" else socket.SOCK_STREAM
        sock = socket.socket(socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self._sock = sock
        if self.kind == "udp":
            self._spawn(self._udp, sock)
        else:
            sock.listen(8)
            self._spawn(self._accept, sock)
        return self

    def stop(self) -> None:
        """Close the listener and every connection (as a collector that goes down)."""
        if self._sock is not None:
            # shutdown wakes a thread blocked in accept/recv on it
            for s in (self._sock, *self._conns):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        for t in self._threads:
            t.join(timeout=5)
        self._sock, self._conns, self._threads = None, [], []

    def messages(self) -> list[re.Match[bytes]]:
        with self._lock:
            frames = list(self.frames)
        out = []
        for f in frames:
            m = FRAME.fullmatch(f)
            assert m is not None, f[:200]
            out.append(m)
        return out

    def seqs(self) -> list[int]:
        return [int(m["seq"]) for m in self.messages()]

    def wait_for(self, n: int, timeout: float = 10.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while len(self.frames) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # and nothing more arrives
        return self.seqs()

    def _spawn(self, fn: Callable[[socket.socket], None], sock: socket.socket) -> None:
        t = threading.Thread(target=fn, args=(sock,), daemon=True)
        self._threads.append(t)
        t.start()

    def _udp(self, sock: socket.socket) -> None:
        while True:
            try:
                data, _ = sock.recvfrom(70000)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.frames.append(data)

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    conn.close()  # an untrusting client hung up in the handshake
                    continue
            self._conns.append(conn)
            self._spawn(self._read_frames, conn)

    def _read_frames(self, conn: socket.socket) -> None:
        """Octet-counted frames (RFC 5425 §4.3): ``MSG-LEN SP SYSLOG-MSG``."""
        buf = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while True:
                length, sp, rest = buf.partition(b" ")
                if not sp:
                    break
                assert length.isdigit() and not length.startswith(b"0"), buf[:40]
                n = int(length)
                if len(rest) < n:
                    break
                with self._lock:
                    self.frames.append(rest[:n])
                buf = rest[n:]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA made for the test, a collector certificate for 127.0.0.1 and a client's."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server_context(
    pki: Pki, *, client_certs: bool = False, tls: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """The collector's side; ``client_certs`` requires a client certificate from the CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls is not None:
        ctx.minimum_version = ctx.maximum_version = tls
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    if client_certs:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki.ca_cert)
    return ctx


@pytest.fixture
def collectors() -> Iterator[list[Collector]]:
    """Collectors a test started; all stopped afterwards."""
    started: list[Collector] = []
    yield started
    for c in started:
        c.stop()


@pytest.fixture
def collector(collectors: list[Collector]) -> Callable[..., Collector]:
    def make(kind: str, tls: ssl.SSLContext | None = None) -> Collector:
        c = Collector(kind, tls).start()
        collectors.append(c)
        return c

    return make


@pytest.fixture
def trail(store_url: str) -> Iterator[SqlAuditLog]:
    """A migrated audit trail on SQLite (``audit.db``) and on PostgreSQL."""
    t = open_audit_log(store_url)
    t.migrate()
    yield t
    t.close()


@pytest.fixture
def exporters() -> Iterator[list[AuditExporter]]:
    made: list[AuditExporter] = []
    yield made
    for e in made:
        e.stop(flush=False)


@pytest.fixture
def exporter(trail: SqlAuditLog, exporters: list[AuditExporter]) -> Callable[..., AuditExporter]:
    def make(url: str, **kw: object) -> AuditExporter:
        e = AuditExporter(trail, url, hostname="hub-test", timeout=3.0, **kw)  # type: ignore[arg-type]
        exporters.append(e)
        return e

    return make


def append(trail: SqlAuditLog, n: int, *, start: int = 0) -> list[int]:
    """``n`` records (a read of a different patient each) appended; their seqs."""
    recs = [
        AuditRecord(
            action="R",
            subtype="read",
            outcome=0,
            status=200,
            method="GET",
            path=f"/fhir/Observation/obs-{start + i}",
            agent="user-1",
            roles=["clinician"],
            org="mo-1",
            source="127.0.0.1",
            reason="Проверка" if i % 2 else None,
            patients=[f"pat-{start + i}"],
            entities=[f"Observation/obs-{start + i}"],
        )
        for i in range(n)
    ]
    trail.append_many(recs)
    return [r.seq for r in recs]


def patient_of(m: re.Match[bytes]) -> str:
    assert m["msg"].startswith(BOM)
    root = ET.fromstring(m["msg"][len(BOM) :])
    (obj,) = [
        o
        for o in root.findall("ParticipantObjectIdentification")
        if o.get("ParticipantObjectTypeCodeRole") == "1"
    ]
    return obj.get("ParticipantObjectID", "")


def metric(name: str, target: str) -> float:
    return REGISTRY.get_sample_value(name, {"target": target}) or 0.0


# --- transports ---------------------------------------------------------------------------------


def test_udp_sends_one_datagram_per_record(trail, collector, exporter) -> None:  # type: ignore[no-untyped-def]
    c = collector("udp")
    seqs = append(trail, 5)
    e = exporter(c.url)
    assert e.export_once() == 5
    assert c.wait_for(5) == seqs
    msgs = c.messages()
    assert [patient_of(m) for m in msgs] == [f"pat-{i}" for i in range(5)]
    assert {m["pri"] for m in msgs} == {b"85"} and {m["host"] for m in msgs} == {b"hub-test"}
    assert trail.export_cursor(e.key) == seqs[-1]
    assert e.export_once() == 0
    assert c.wait_for(6, timeout=0.3) == seqs  # nothing again


def test_tcp_delivers_in_order_exactly_once_per_send(trail, collector, exporter) -> None:  # type: ignore[no-untyped-def]
    c = collector("tcp")
    first = append(trail, 25)
    e = exporter(c.url, batch=7)  # several batches, one connection
    sent_before = metric("hie_audit_export_records_total", e.key)
    assert e.export_once() == 25
    assert c.wait_for(25) == first
    assert e.export_once() == 0
    later = append(trail, 3, start=25)
    assert e.export_once() == 3
    assert c.wait_for(28) == first + later
    assert [patient_of(m) for m in c.messages()] == [f"pat-{i}" for i in range(28)]
    assert metric("hie_audit_export_records_total", e.key) - sent_before == 28
    assert metric("hie_audit_export_lag_records", e.key) == 0
    assert e.lag() == 0


def test_tls_to_a_collector_the_configured_ca_vouches_for(trail, collector, exporter, pki) -> None:  # type: ignore[no-untyped-def]
    c = collector("tls", _server_context(pki))
    seqs = append(trail, 4)
    e = exporter(c.url, ca=str(pki.ca_cert))
    assert e.export_once() == 4
    assert c.wait_for(4) == seqs
    assert trail.export_cursor(e.key) == seqs[-1]


@pytest.mark.parametrize("trusted", ["system", "other"])
def test_tls_to_an_untrusted_collector_fails_and_keeps_the_cursor(  # type: ignore[no-untyped-def]
    trail, collector, exporter, pki, trusted
) -> None:
    c = collector("tls", _server_context(pki))
    append(trail, 3)
    e = exporter(c.url, ca="" if trusted == "system" else str(pki.other_ca_cert))
    failures = metric("hie_audit_export_failures_total", e.key)
    with pytest.raises(AuditExportError, match="CERTIFICATE_VERIFY_FAILED"):
        e.export_once()
    assert trail.export_cursor(e.key) == 0
    assert c.wait_for(1, timeout=0.3) == []
    assert metric("hie_audit_export_failures_total", e.key) == failures + 1
    assert e.lag() == 3


@pytest.mark.parametrize(
    "tls", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
def test_mutual_tls_with_a_client_certificate(trail, collector, exporter, pki, tls) -> None:  # type: ignore[no-untyped-def]
    c = collector("tls", _server_context(pki, client_certs=True, tls=tls))
    seqs = append(trail, 3)
    e = exporter(c.url, ca=str(pki.ca_cert), cert=str(pki.client_cert), key=str(pki.client_key))
    assert e.export_once() == 3
    assert c.wait_for(3) == seqs


@pytest.mark.parametrize(
    "tls", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
def test_a_collector_refusing_the_client_loses_nothing(
    trail, collector, exporter, pki, tls
) -> None:  # type: ignore[no-untyped-def]
    """TLS 1.3 tells the client only after its handshake: nothing may be counted as sent."""
    c = collector("tls", _server_context(pki, client_certs=True, tls=tls))
    append(trail, 3)
    e = exporter(c.url, ca=str(pki.ca_cert))  # no client certificate
    for _ in range(20):  # without the wait for the verdict, some tries would "succeed"
        with pytest.raises(AuditExportError):
            e.export_once()
        assert trail.export_cursor(e.key) == 0
    assert c.wait_for(1, timeout=0.3) == []


# --- outages and restarts -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "tls"])
def test_a_collector_outage_loses_nothing(trail, collector, exporter, pki, kind) -> None:  # type: ignore[no-untyped-def]
    c = collector(kind, _server_context(pki) if kind == "tls" else None)
    e = exporter(c.url, ca=str(pki.ca_cert))
    before = append(trail, 3)
    assert e.export_once() == 3
    assert c.wait_for(3) == before

    c.stop()
    during = append(trail, 4, start=3)
    with pytest.raises(AuditExportError):
        e.export_once()
    assert trail.export_cursor(e.key) == before[-1]
    with pytest.raises(AuditExportError):  # still down: still nothing moves
        e.export_once()
    assert trail.export_cursor(e.key) == before[-1]
    assert e.lag() == 4
    assert metric("hie_audit_export_lag_records", e.key) == 4

    c.start()  # back, on the same port
    after = append(trail, 2, start=7)
    assert e.export_once() == 6
    assert c.wait_for(9) == before + during + after
    assert trail.export_cursor(e.key) == after[-1]


def test_a_restarted_exporter_resumes_from_the_cursor(trail, store_url, collector) -> None:  # type: ignore[no-untyped-def]
    c = collector("tcp")
    first = append(trail, 5)
    e1 = AuditExporter(trail, c.url, hostname="hub-test")
    assert e1.export_once() == 5
    e1.stop(flush=False)

    later = append(trail, 3, start=5)
    reopened = open_audit_log(store_url)  # as a new process would
    try:
        e2 = AuditExporter(reopened, c.url, hostname="hub-test")
        assert e2.export_once() == 3
        e2.stop(flush=False)
    finally:
        reopened.close()
    assert c.wait_for(8) == first + later  # each exactly once


def test_without_backfill_a_new_collector_starts_at_the_end(trail, collector, exporter) -> None:  # type: ignore[no-untyped-def]
    append(trail, 4)
    c = collector("tcp")
    e = exporter(c.url, backfill=False)
    assert e.export_once() == 0
    later = append(trail, 2, start=4)
    assert e.export_once() == 2
    assert c.wait_for(2) == later


def test_the_thread_waits_out_a_collector_that_starts_late(trail, collector, exporter) -> None:  # type: ignore[no-untyped-def]
    c = collector("tcp")
    c.stop()  # its port is known, nothing listens yet
    e = exporter(c.url, poll_seconds=0.05, max_backoff=0.2)
    e.start()
    seqs = append(trail, 6)
    time.sleep(0.5)  # several refused attempts
    assert trail.export_cursor(e.key) == 0
    c.start()
    assert c.wait_for(6) == seqs
    more = append(trail, 2, start=6)
    assert c.wait_for(8) == seqs + more
    e.stop()
    assert trail.export_cursor(e.key) == more[-1]
    assert c.seqs() == seqs + more


def test_a_large_search_record_arrives_as_several_complete_messages(
    trail, collector, exporter
) -> None:  # type: ignore[no-untyped-def]
    c = collector("tcp")
    patients = [f"patient-{i:04d}" for i in range(400)]
    rec = AuditRecord(
        action="E",
        subtype="search",
        outcome=0,
        status=200,
        method="GET",
        path="/fhir/Patient?name=a",
        agent="user-1",
        patients=patients,
        entities=[f"Patient/{p}" for p in patients],
    )
    trail.append_many([rec])
    e = exporter(c.url)
    assert e.export_once() == 1
    time.sleep(0.2)
    msgs = c.messages()
    assert len(msgs) > 1 and {int(m["seq"]) for m in msgs} == {rec.seq}
    got = []
    for m in msgs:
        assert len(m[0]) <= 32768
        root = ET.fromstring(m["msg"][len(BOM) :])
        got += [
            o.get("ParticipantObjectID")
            for o in root.findall("ParticipantObjectIdentification")
            if o.get("ParticipantObjectTypeCodeRole") == "1"
        ]
    assert got == patients


# --- a real syslog daemon -----------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("rsyslogd") is None,
    reason="Debian's rsyslogd is not installed (apt install rsyslog)",
)
def test_rsyslogd_takes_the_messages(tmp_path: Path) -> None:
    trail = open_audit_log(f"sqlite:///{tmp_path / 'hie.db'}")
    trail.migrate()
    try:
        _rsyslogd_takes_the_messages(trail, tmp_path)
    finally:
        trail.close()


def _rsyslogd_takes_the_messages(trail: SqlAuditLog, tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "atna.log"
    conf = tmp_path / "rsyslog.conf"
    conf.write_text(
        f'global(workDirectory="{tmp_path}" maxMessageSize="64k")\n'
        'module(load="imtcp")\n'
        f'input(type="imtcp" address="127.0.0.1" port="{port}")\n'
        'template(name="atna" type="string" '
        'string="%pri%|%app-name%|%msgid%|%structured-data%|%msg%\\n")\n'
        f'*.* action(type="omfile" file="{out}" template="atna")\n'
    )
    proc = subprocess.Popen(
        [
            shutil.which("rsyslogd") or "rsyslogd",
            "-n",
            "-f",
            str(conf),
            "-i",
            str(tmp_path / "pid"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while True:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "rsyslogd did not listen"
                time.sleep(0.1)
        seqs = append(trail, 5)
        e = AuditExporter(trail, f"tcp://127.0.0.1:{port}", hostname="hub-test")
        assert e.export_once() == 5
        e.stop(flush=False)
        deadline = time.monotonic() + 15
        lines: list[str] = []
        while time.monotonic() < deadline:
            lines = out.read_text(encoding="utf-8").splitlines() if out.exists() else []
            if len(lines) >= 5:
                break
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert len(lines) == 5, lines
    for seq, line in zip(seqs, lines, strict=True):
        pri, app, msgid, sd, msg = line.split("|", 4)
        assert (pri, app, msgid) == ("85", "hie", "IHE+RFC-3881")
        assert sd == f'[meta sequenceId="{seq}"]'
        xml = msg.lstrip("\ufeff").encode()
        root = ET.fromstring(xml)
        assert root.tag == "AuditMessage"
        ev = root.find("EventIdentification/EventID")
        assert ev is not None and ev.get("csd-code") == "110110"


def test_the_hub_exports_its_own_requests_when_configured(
    store_url, settings_for, collector
) -> None:  # type: ignore[no-untyped-def]
    """``HIE_AUDIT_SYSLOG_URL`` set: the process running the outbox worker (``hie serve``,
    ``hie worker``) also sends the trail; a request to the API arrives at the collector."""
    from fastapi.testclient import TestClient

    from hie.fhir.app import create_app
    from hie.hub.runtime import open_hub
    from tests.fixtures.auth import bearer

    c = collector("tcp")
    settings = settings_for(store_url, audit_syslog_url=c.url)
    hub = open_hub(settings)
    hub.store.migrate()
    try:
        with TestClient(
            create_app(settings, hub, start_worker=True), base_url="http://hub.test"
        ) as api:
            assert (
                api.get("/fhir/Organization", headers=bearer(settings, "admin")).status_code == 200
            )
            (seq,) = c.wait_for(1)
            assert hub.audit.read(seq) is not None
            # the DICOM audit message names the hub and the request's path
            assert b"<AuditMessage" in c.frames[0] and b"Organization" in c.frames[0]
    finally:
        hub.close()
