"""The rejected-message store on SQLite and PostgreSQL, and ``hie messages list|show``.

Every test runs on both engines (``store_url`` from ``tests/conftest.py``: a fresh SQLite
``hie.db`` or a fresh database on the test PostgreSQL server).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hie.cli import app
from hie.hub.errors import Conflict, InvalidRequest, NotFound
from hie.hub.rejected import RejectedStore, open_rejected_store, rejected_url

runner = CliRunner()

# a lab message in Windows-1251 (MSH-18 8859/5 senders do this too) with a NUL and a stray
# high byte: the store must give back exactly these bytes
CP1251 = (
    "MSH|^~\\&|LABAPP|LAB01|HIE|HUB|20260115103000||ORU^R01|C-1251|P|2.5.1|||||RU|CP1251\r"
    "PID|1||7000123^^^LAB01^MR||Тестова^Анна^Сергеевна||19850312|F\r"
    "OBX|1|ST|X^Комментарий||Ёжик в тумане|\r"
).encode("cp1251") + b"\x00\xff\x0b\x1c\r"


@pytest.fixture
def rejected(store_url: str) -> Iterator[RejectedStore]:
    store = open_rejected_store(store_url)
    store.migrate()
    store.migrate()  # idempotent
    yield store
    store.close()


def keep_some(store: RejectedStore, n: int, **overrides: object) -> list[int]:
    ids = []
    for i in range(n):
        fields: dict[str, object] = {
            "channel": "mllp" if i % 2 == 0 else "dicom",
            "kind": "rejected",
            "raw": f"MSH|^~\\&|A|B|||x||ADT^A01|CTL{i}|P|2.5\r".encode(),
            "sender": "LABAPP|LAB01",
            "peer": "10.0.0.7",
            "code": "207",
            "reason": f"reason {i}",
            "control_id": f"CTL{i}",
        }
        fields.update(overrides)
        ids.append(store.keep(**fields))  # type: ignore[arg-type]
    return ids


def test_sqlite_store_is_its_own_file_beside_the_resource_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'var' / 'hie.db'}"
    assert rejected_url(url) == f"sqlite:///{tmp_path / 'var' / 'rejected.db'}"
    assert rejected_url("postgresql://hie@db/hie") == "postgresql://hie@db/hie"
    store = open_rejected_store(url)
    store.migrate()
    store.keep(channel="mllp", kind="garbage", raw=b"junk")
    with store.engine.connect() as conn:
        sync = conn.exec_driver_sql("PRAGMA synchronous").scalar()
    store.close()
    assert sync == 2  # FULL
    db = sqlite3.connect(tmp_path / "var" / "rejected.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert not (tmp_path / "var" / "hie.db").exists()  # the resource store is not touched


def test_keep_and_get_give_back_the_exact_bytes(rejected: RejectedStore) -> None:
    when = datetime(2026, 1, 15, 7, 30, 0, 123456, tzinfo=UTC)
    ident = rejected.keep(
        channel="mllp",
        kind="rejected",
        raw=CP1251,
        sender="LABAPP|LAB01",
        peer="10.0.0.7:51514",
        code="207",
        reason="OBX-5 is not a number",
        control_id="C-1251",
        received=when,
    )
    msg = rejected.get(ident)
    assert msg is not None and msg.raw == CP1251
    assert (msg.channel, msg.kind, msg.code, msg.sender, msg.peer, msg.control_id) == (
        "mllp",
        "rejected",
        "207",
        "LABAPP|LAB01",
        "10.0.0.7:51514",
        "C-1251",
    )
    assert msg.size == len(CP1251) and msg.status == "open" and msg.received == when
    assert msg.reason == "OBX-5 is not a number"
    assert msg.replayed_at is None and msg.discarded_at is None
    assert rejected.get(ident + 1000) is None
    # the same moment given in another zone is the same instant
    msk = when.astimezone(datetime.now().astimezone().tzinfo)
    other = rejected.keep(channel="fhir", kind="failed", raw=b"{}", received=msk)
    got = rejected.get(other)
    assert got is not None and got.received == when


def test_a_5_mib_message_and_a_too_large_head(rejected: RejectedStore) -> None:
    big = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    ident = rejected.keep(channel="stow", kind="failed", raw=big, code="HIE-1500")
    got = rejected.get(ident)
    assert got is not None and got.raw == big and got.size == 5 * 1024 * 1024
    head = big[: 64 * 1024]
    ident = rejected.keep(channel="mllp", kind="too-large", raw=head, size=40_000_000)
    got = rejected.get(ident)
    assert got is not None and got.raw == head and got.size == 40_000_000


def test_list_pages_newest_first_without_raw(rejected: RejectedStore) -> None:
    ids = keep_some(rejected, 7)
    first = rejected.list(limit=3)
    assert [m.id for m in first] == ids[::-1][:3] and all(m.raw is None for m in first)
    second = rejected.list(limit=3, before_id=first[-1].id)
    third = rejected.list(limit=3, before_id=second[-1].id)
    assert [m.id for m in first + second + third] == ids[::-1]
    assert rejected.list(limit=3, before_id=third[-1].id) == []
    assert [m.id for m in rejected.list(channel="dicom")] == [ids[5], ids[3], ids[1]]
    # since: received at or after
    old = rejected.keep(
        channel="mllp", kind="rejected", raw=b"x", received=datetime.now(UTC) - timedelta(days=3)
    )
    recent = rejected.list(since=datetime.now(UTC) - timedelta(days=1), limit=100)
    assert old not in [m.id for m in recent] and len(recent) == 7
    with pytest.raises(InvalidRequest):
        rejected.list(status="lost")


def test_replay_discard_and_count(rejected: RejectedStore) -> None:
    a, b, c = keep_some(rejected, 3)
    assert rejected.count() == 3 and rejected.count(status="open") == 3
    assert rejected.count(channel="dicom") == 1
    rejected.mark_replayed(a, "AA: DiagnosticReport/123")
    rejected.discard(b, "duplicate of a message received later")
    got_a, got_b = rejected.get(a), rejected.get(b)
    assert got_a is not None and got_a.status == "replayed"
    assert got_a.replay_outcome == "AA: DiagnosticReport/123" and got_a.replayed_at is not None
    assert abs(got_a.replayed_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert got_b is not None and got_b.status == "discarded" and got_b.discarded_at is not None
    assert got_b.discard_reason == "duplicate of a message received later"
    assert rejected.count(status="open") == 1
    assert rejected.count(status="replayed") == 1 and rejected.count(status="discarded") == 1
    assert [m.id for m in rejected.list(status="open")] == [c]
    # replaying again records the newer outcome; a closed message cannot be discarded
    rejected.mark_replayed(a, "AE again")
    got_a = rejected.get(a)
    assert got_a is not None and got_a.replay_outcome == "AE again"
    with pytest.raises(Conflict):
        rejected.discard(a, "too late")
    with pytest.raises(NotFound):
        rejected.mark_replayed(9999, "x")
    with pytest.raises(NotFound):
        rejected.discard(9999, "x")


def test_long_fields_are_clipped_not_refused(rejected: RejectedStore) -> None:
    ident = rejected.keep(
        channel="mllp",
        kind="rejected",
        raw=b"x",
        sender="S" * 1000,
        control_id="C" * 500,
        reason="R" * 10_000,
    )
    got = rejected.get(ident)
    assert got is not None and len(got.sender) == 255 and len(got.control_id) == 200
    assert len(got.reason) == 2000


def test_kept_messages_survive_reopening_and_concurrent_keeps(store_url: str) -> None:
    store = open_rejected_store(store_url)
    store.migrate()

    async def keep_many() -> list[int]:
        return await asyncio.gather(
            *(store.keep_async(channel="mllp", kind="rejected", raw=b"m%d" % i) for i in range(20))
        )

    ids = asyncio.run(keep_many())
    store.close()
    assert len(set(ids)) == 20
    again = open_rejected_store(store_url)
    assert sorted(m.raw for m in map(again.get, ids) if m) == sorted(b"m%d" % i for i in range(20))
    again.close()


# --- hie messages --------------------------------------------------------------------------------


def test_messages_list_and_show(cli_env: str) -> None:
    res = runner.invoke(app, ["messages", "list"])
    assert res.exit_code == 0 and "no kept messages" in res.output
    store = open_rejected_store(cli_env)
    store.migrate()
    first = store.keep(
        channel="mllp",
        kind="rejected",
        raw=CP1251,
        sender="LABAPP|LAB01",
        peer="10.0.0.7",
        code="207",
        reason="OBX-5\r\nis not a number",
        control_id="C-1251",
    )
    second = store.keep(
        channel="dicom", kind="failed", raw=b"\x00DICM", code="HIE-1500", reason="disk full"
    )
    store.discard(second, "test")
    store.close()

    res = runner.invoke(app, ["messages", "list"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split() == [
        "ID",
        "RECEIVED",
        "CHANNEL",
        "SENDER",
        "KIND",
        "CODE",
        "SIZE",
        "STATUS",
        "REASON",
    ]
    assert lines[1].split()[0] == str(second) and lines[2].split()[0] == str(first)
    assert "+03:00" in lines[2]  # shown in Moscow time
    assert lines[2].split()[3:9] == [
        "mllp",
        "LABAPP|LAB01",
        "rejected",
        "207",
        str(len(CP1251)),
        "open",
    ]
    assert lines[2].endswith("OBX-5 is not a number")  # one line per message
    res = runner.invoke(app, ["messages", "list", "--status", "open", "--channel", "mllp"])
    assert [ln.split()[0] for ln in res.stdout.splitlines()[1:]] == [str(first)]
    res = runner.invoke(app, ["messages", "list", "--limit", "1"])
    assert len(res.stdout.splitlines()) == 2
    res = runner.invoke(app, ["messages", "list", "--status", "lost"])
    assert res.exit_code == 2

    res = runner.invoke(app, ["messages", "show", str(first)])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "control id: C-1251" in out and "status:     open" in out
    assert "shown as windows-1251" in out
    body = out.split("---\n", 1)[1].splitlines()
    assert body[0].startswith("MSH|^~\\&|LABAPP|LAB01|")
    assert body[1] == "PID|1||7000123^^^LAB01^MR||Тестова^Анна^Сергеевна||19850312|F"
    assert body[2] == "OBX|1|ST|X^Комментарий||Ёжик в тумане|"
    # control bytes are shown, not sent to the terminal (0xFF is "я" in Windows-1251)
    assert body[3] == "\\x00я\\x0b\\x1c"

    res = runner.invoke(app, ["messages", "show", str(first), "--raw"])
    assert res.exit_code == 0 and res.stdout_bytes == CP1251

    res = runner.invoke(app, ["messages", "show", str(second)])
    assert "discarded:" in res.stdout and "why:" in res.stdout
    res = runner.invoke(app, ["messages", "show", "424242"])
    assert res.exit_code == 1 and "no kept message 424242" in res.output


def test_messages_replay_after_the_sender_is_registered(cli_env: str) -> None:
    """A result from a laboratory the hub did not know is kept (AR); once the laboratory is
    registered, ``hie messages replay --all`` files it, and the message is marked replayed."""
    from hie.adapters.hl7_listener import Hl7Listener
    from hie.fhir.service import FhirService
    from hie.hub.runtime import open_hub
    from hie.hub.settings import load_settings
    from hie.hub.store.port import Query
    from hie.registries.patient_index import attach_mpi
    from tests.fixtures.hl7v2 import oru_message
    from tests.fixtures.labs import as_transaction, lab_registry

    hub = open_hub(load_settings())
    hub.store.migrate()
    try:
        svc = FhirService(hub.store, hub.settings)
        mpi = attach_mpi(svc)
        assert mpi is not None
        listener = Hl7Listener(svc, mpi, hub.rejected, workers=1)
        assert listener.apply(oru_message("cbc", control_id="LATE-1")).code == "AR"
        listener.process(oru_message("cbc", control_id="LATE-1"))
        listener.close()
        assert runner.invoke(app, ["messages", "replay", "--all"]).exit_code == 1  # still unknown
        svc.transaction(as_transaction(lab_registry()), "")
        res = runner.invoke(app, ["messages", "replay", "--all"])
        assert res.exit_code == 0, res.output
        assert ": AA" in res.output
        (kept,) = hub.rejected.list()
        assert kept.status == "replayed"
        assert len(hub.store.search(Query("Observation", count=50)).items) == 10
        assert runner.invoke(app, ["messages", "replay", "--all"]).exit_code == 2  # none open
    finally:
        hub.close()
