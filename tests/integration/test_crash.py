"""Crash safety: a real ``hie serve`` killed with SIGKILL in the middle of a write loop.

Several client threads create Patients, update them and send transaction Bundles (a Patient
and 20 Observations); after a random 1–3 s the whole server (every process of it) is killed,
restarted on the same data directory, written to again and killed again, three times. After
every crash:

- the database is intact (SQLite ``PRAGMA integrity_check``; every resource has all its
  versions, its index rows, and exactly one outbox event per stored version);
- every write the server acknowledged is readable with the acknowledged version and content;
- every transaction the client got no answer for is all-or-nothing;
- at the end the restarted outbox worker catches up (no event is stuck behind the crashes).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from hie.demo import Generator
from hie.hub.settings import load_settings
from hie.hub.store import open_resource_store
from tests.fixtures.auth import bearer
from tests.fixtures.ports import free_port

MARK = "urn:hie-test:crash"  # identifier system: one value per Patient/transaction write
N_OBS = 20
ROUNDS = 3
WRITERS = 3
FJ = {"Content-Type": "application/fhir+json"}
ROOT = Path(__file__).resolve().parents[2]


class Server:
    """One ``hie serve`` process group on a data dir; restartable, killable with SIGKILL."""

    def __init__(self, data_dir: Path, database_url: str | None) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = ""
        self.log = data_dir.parent / "server.log"
        self.starts = 0
        # the server verifies tokens with the development key of its data dir
        self.auth = bearer(load_settings(data_dir=data_dir))

    def start(self) -> None:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("HIE_")}
        env |= {
            "HIE_DATA_DIR": str(self.data_dir),
            "HIE_HTTP_HOST": "127.0.0.1",
            "HIE_HTTP_PORT": str(port),
            "HIE_MLLP_PORT": "0",
            "HIE_DICOM_PORT": "0",
            "HIE_LOG_LEVEL": "WARNING",
            "HIE_RATE_LIMIT_PER_SECOND": "0",  # the writers are a load test, not a flood
        }
        if self.database_url:
            env["HIE_DATABASE_URL"] = self.database_url
        # alternate restarts between the one-process hub and two HTTP worker processes (which
        # hand SQLite's write lock over through a file lock), so a kill hits both layouts
        env["HIE_HTTP_WORKERS"] = "2" if self.starts % 2 == 0 else "1"
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"\n=== start {self.starts} on port {port} ===\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hie.cli", "serve"],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the kill reaches every worker
            )
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"hie serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"hie serve did not become healthy:\n{self.log_tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL every process of the server at once (no shutdown code runs)."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self.proc = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the HTTP worker processes die with it
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def diagnosis(self) -> str:
        """What a failed round needs to be understood: every thread's stack of every server
        process (``SIGUSR1``, see ``hie.hub.logging``) and, on PostgreSQL, what each
        connection is doing and waiting for."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGUSR1)
                time.sleep(1)
            except ProcessLookupError:
                pass
        out = self.log_tail(30_000)
        if self.database_url:
            import psycopg

            with psycopg.connect(self.database_url, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT pid, state, wait_event_type, wait_event, now() - xact_start, "
                    "left(query, 300) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchall()
            out += "\n=== pg_stat_activity ===\n" + "\n".join(map(str, rows))
        return out


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers a test starts; every one still running is killed at teardown, pass or fail."""
    started: list[Server] = []
    yield started
    for srv in started:
        srv.kill()


@dataclass
class Ledger:
    """What the clients saw: acknowledged versions and unanswered transactions."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)
    acked_txn: dict[str, str] = field(default_factory=dict)  # marker → Patient id
    unanswered_txn: list[str] = field(default_factory=list)
    unanswered_patients: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def ack(self, rtype: str, id: str, version: int, marker: str) -> None:
        with self.lock:
            old = self.acked.get((rtype, id))
            if old is None or old[0] < version:
                self.acked[(rtype, id)] = (version, marker)


def marked(res: dict[str, Any], marker: str) -> dict[str, Any]:
    res.setdefault("identifier", []).append({"system": MARK, "value": marker})
    return res


def markers_of(res: dict[str, Any]) -> set[str]:
    return {i["value"] for i in res.get("identifier", []) if i.get("system") == MARK}


def version_of(location: str) -> tuple[str, str, int]:
    parts = location.split("/_history/")
    rtype, id = parts[0].split("/")[-2:]
    return rtype, id, int(parts[1])


def writer(
    base: str, auth: dict[str, str], seed: int, ledger: Ledger, stop: threading.Event
) -> None:
    """Write until the server goes away (or ``stop``), recording what was acknowledged."""
    gen = Generator(seed)
    rng = random.Random(seed)
    mine: list[tuple[str, dict[str, Any]]] = []  # acknowledged Patients to update
    with httpx.Client(base_url=base, timeout=30, headers=auth) as http:
        while not stop.is_set():
            marker = uuid.uuid4().hex
            roll = rng.random()
            try:
                if roll < 0.5:
                    bundle = gen.transaction_with_patient(N_OBS)
                    for e in bundle["entry"]:
                        marked(e["resource"], marker)
                    with ledger.lock:
                        ledger.unanswered_txn.append(marker)
                    r = http.post("/fhir", json=bundle, headers=FJ)
                    if r.status_code != 200:
                        ledger.failures.append(f"transaction: {r.status_code} {r.text[:300]}")
                        continue
                    with ledger.lock:
                        ledger.unanswered_txn.remove(marker)
                    for e in r.json()["entry"]:
                        rtype, id, version = version_of(e["response"]["location"])
                        ledger.ack(rtype, id, version, marker)
                        if rtype == "Patient":
                            ledger.acked_txn[marker] = id
                elif roll < 0.8 or not mine:
                    res = marked(gen.patient(), marker)
                    with ledger.lock:
                        ledger.unanswered_patients.append(marker)
                    r = http.post("/fhir/Patient", json=res, headers=FJ)
                    if r.status_code != 201:
                        ledger.failures.append(f"create: {r.status_code} {r.text[:300]}")
                        continue
                    with ledger.lock:
                        ledger.unanswered_patients.remove(marker)
                    body = r.json()
                    assert r.headers["etag"] == 'W/"1"'
                    ledger.ack("Patient", body["id"], 1, marker)
                    mine.append((body["id"], res))
                else:
                    id, res = rng.choice(mine)
                    res = {**res, "id": id, "identifier": [{"system": MARK, "value": marker}]}
                    r = http.put(f"/fhir/Patient/{id}", json=res, headers=FJ)
                    if r.status_code != 200:
                        ledger.failures.append(f"update: {r.status_code} {r.text[:300]}")
                        continue
                    version = int(r.headers["etag"].removeprefix('W/"').rstrip('"'))
                    ledger.ack("Patient", id, version, marker)
            except httpx.TransportError:
                return  # the server is gone; the write in flight stays unanswered


def write_until_killed(srv: Server, ledger: Ledger, round_no: int, rng: random.Random) -> None:
    stop = threading.Event()
    acked_before = len(ledger.acked)
    threads = [
        threading.Thread(
            target=writer, args=(srv.base, srv.auth, 1000 * round_no + i, ledger, stop), daemon=True
        )
        for i in range(WRITERS)
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(rng.uniform(1.0, 3.0))
    finally:
        srv.kill()
        stop.set()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads), "a client thread hung after the kill"
    assert len(ledger.acked) > acked_before, f"round {round_no}: nothing was acknowledged"


def check_database(database_url: str) -> None:
    """Structural checks straight on the crashed database (before the restart)."""
    if database_url.startswith("sqlite"):
        db = database_url.split("///", 1)[1]
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    store: Any = open_resource_store(database_url)
    try:
        with store.engine.connect() as conn:
            broken = conn.execute(
                text(
                    "SELECT r.rtype, r.id, r.version, h.n, h.m FROM resources r LEFT JOIN"
                    " (SELECT rid, count(*) AS n, max(version) AS m FROM resource_history"
                    "  GROUP BY rid) h ON h.rid = r.rid"
                    " WHERE h.n IS NULL OR h.n <> r.version OR h.m <> r.version"
                )
            ).all()
            assert broken == [], f"resources whose history is incomplete: {broken[:5]}"
            empty = conn.execute(
                text(
                    "SELECT r.rtype, r.id FROM resources r JOIN resource_history h"
                    " ON h.rid = r.rid AND h.version = r.version"
                    " WHERE h.content IS NULL OR NOT EXISTS"
                    " (SELECT 1 FROM idx_token t WHERE t.rid = r.rid)"
                )
            ).all()
            assert empty == [], f"current versions without content or index rows: {empty[:5]}"
            versions = {
                (r[0], r[1], r[2])
                for r in conn.execute(
                    text(
                        "SELECT r.rtype, r.id, h.version FROM resource_history h"
                        " JOIN resources r ON r.rid = h.rid"
                    )
                )
            }
            events = conn.execute(text("SELECT rtype, id, version FROM outbox")).all()
            assert len(events) == len({tuple(e) for e in events}), "duplicate outbox events"
            outbox = {(e[0], e[1], e[2]) for e in events}
            assert versions - outbox == set(), "committed versions without an outbox event"
            assert outbox - versions == set(), "outbox events for versions never stored"
    finally:
        store.close()


def check_acknowledged(http: httpx.Client, ledger: Ledger) -> None:
    """Every acknowledged write is there, at least at the acknowledged version."""
    by_type: dict[str, list[str]] = {}
    for rtype, id in ledger.acked:
        by_type.setdefault(rtype, []).append(id)
    for rtype, ids in by_type.items():
        for i in range(0, len(ids), 100):
            chunk = ids[i : i + 100]
            r = http.get(f"/fhir/{rtype}", params={"_id": ",".join(chunk), "_count": "200"})
            assert r.status_code == 200, r.text
            found = {e["resource"]["id"]: e["resource"] for e in r.json().get("entry", [])}
            missing = set(chunk) - set(found)
            assert not missing, f"acknowledged {rtype} lost: {sorted(missing)[:5]}"
            for id in chunk:
                version, marker = ledger.acked[(rtype, id)]
                res = found[id]
                current = int(res["meta"]["versionId"])
                assert current >= version, f"{rtype}/{id} went back to {current} from {version}"
                if current != version:  # an unanswered update came after: read the acked one
                    vr = http.get(f"/fhir/{rtype}/{id}/_history/{version}")
                    assert vr.status_code == 200, vr.text
                    res = vr.json()
                    assert res["meta"]["versionId"] == str(version)
                assert marker in markers_of(res), f"{rtype}/{id} v{version} has other content"


def count(http: httpx.Client, path: str, **params: str) -> int:
    r = http.get(path, params={**params, "_summary": "count"})
    assert r.status_code == 200, r.text
    return int(r.json()["total"])


def check_all_or_nothing(http: httpx.Client, ledger: Ledger) -> None:
    """Acknowledged transactions are whole; unanswered ones are whole or absent."""
    for pid in ledger.acked_txn.values():
        assert count(http, "/fhir/Observation", subject=f"Patient/{pid}") == N_OBS
    for marker in ledger.unanswered_txn:
        patients = count(http, "/fhir/Patient", identifier=f"{MARK}|{marker}")
        observations = count(http, "/fhir/Observation", identifier=f"{MARK}|{marker}")
        assert (patients, observations) in ((0, 0), (1, N_OBS)), (
            f"transaction {marker} half-written: {patients} Patient, {observations} Observations"
        )
        if patients:
            r = http.get("/fhir/Patient", params={"identifier": f"{MARK}|{marker}"})
            pid = r.json()["entry"][0]["resource"]["id"]
            assert count(http, "/fhir/Observation", subject=f"Patient/{pid}") == N_OBS
    for marker in ledger.unanswered_patients:
        assert count(http, "/fhir/Patient", identifier=f"{MARK}|{marker}") in (0, 1)


def register_senders(srv: Server) -> None:
    """The demo city's MOs (whose patient-number systems the generated patients carry) and
    the test's marker system are registered first: the hub refuses Patient identifiers in
    systems no MO registered."""
    from hie.demo import as_transaction
    from hie.registries.facility import patient_id_system_identifier

    org = {
        "resourceType": "Organization",
        "id": "crash-test-mo",
        "name": "Crash test MO",
        "identifier": [patient_id_system_identifier(MARK)],
    }
    bundle = as_transaction([*Generator(1).city().resources(), org])
    r = httpx.post(f"{srv.base}/fhir", json=bundle, headers={**FJ, **srv.auth}, timeout=60)
    assert r.status_code == 200, r.text[:500]


def run_crash_rounds(tmp_path: Path, servers: list[Server], database_url: str | None) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    data_dir = tmp_path / "var"
    db_url = database_url or f"sqlite:///{data_dir / 'hie.db'}"
    srv = Server(data_dir, database_url)
    servers.append(srv)
    ledger = Ledger()
    srv.start()
    register_senders(srv)
    for round_no in range(1, ROUNDS + 1):
        try:
            write_until_killed(srv, ledger, round_no, rng)
            assert ledger.failures == [], ledger.failures[:3]
            check_database(db_url)
            srv.start()
            # generous: once (in CI, on PostgreSQL) a read after a restart took over 30 s and
            # the cause was not found; a hang still fails, now with every thread's stack and
            # PostgreSQL's sessions printed (Server.diagnosis)
            with httpx.Client(base_url=srv.base, timeout=120, headers=srv.auth) as http:
                check_acknowledged(http, ledger)
                check_all_or_nothing(http, ledger)
        except BaseException:
            print(f"crash round {round_no} (seed {seed}) failed:\n{srv.diagnosis()}")  # noqa: T201
            raise
    # the restarted outbox worker catches up past every crash
    deadline = time.monotonic() + 40
    lag = -1
    while time.monotonic() < deadline:
        lag = httpx.get(f"{srv.base}/healthz", timeout=5).json()["outbox_lag"]
        if lag == 0:
            break
        time.sleep(0.2)
    assert lag == 0, f"outbox worker stuck {lag} events behind after restart"


def test_sigkill_during_writes_sqlite(tmp_path: Path, servers: list[Server]) -> None:
    run_crash_rounds(tmp_path, servers, None)


def test_sigkill_during_writes_postgresql(
    tmp_path: Path, servers: list[Server], pg_server: Any
) -> None:
    run_crash_rounds(tmp_path, servers, pg_server.new_database())
