"""``/admin/messages`` over HTTP on every backend: operators list, read, download, replay and
discard what the listeners kept (issue #6); only ``admin`` and ``service`` may, and every call
is in the audit trail.

Messages reach the store the way they do in production: real HL7 v2 messages through an MLLP
intake (:class:`~hie.adapters.hl7_listener.Hl7Listener`) over the same hub, or frames kept
directly as the listener keeps them.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import pytest

from hie.adapters.hl7_listener import Hl7Listener
from hie.fhir.service import FhirService
from hie.hub.rejected import RejectedStore
from hie.registries.patient_index import attach_mpi
from tests.fixtures.auth import bearer
from tests.fixtures.hl7v2 import LAB_FACILITY, oru_message
from tests.fixtures.labs import GP, as_transaction, lab_registry

# a lab message in Windows-1251, declared in MSH-18, with a NUL and a stray byte after it
CP1251 = (
    "MSH|^~\\&|LABAPP|LAB01|HIE|HUB|20260115103000||ORU^R01|C-1251|P|2.5.1|||||RU|CP1251\r"
    "PID|1||7000123^^^LAB01^MR||Тестова^Анна^Сергеевна||19850312|F\r"
    "OBX|1|ST|X^Комментарий||Ёжик в тумане|\r"
).encode("cp1251") + b"\x00\xff\r"
# the same kind of message from a system that does not say it sends Windows-1251
UNDECLARED = (
    "MSH|^~\\&|LABAPP|LAB01|HIE|HUB|20260115103000||ORU^R01|C-2|P|2.3\r"
    "PID|1||7000124^^^LAB01^MR||Петрова^Ольга||19700101|F\r"
).encode("cp1251")


@pytest.fixture
def rejected(client: Any) -> RejectedStore:
    store: RejectedStore = client.hub.rejected
    return store


@pytest.fixture
def intake(client: Any) -> Iterator[Hl7Listener]:
    """An MLLP intake over the test hub, as ``hie serve`` builds it (its refusals go to the
    hub's rejected-message store)."""
    svc = FhirService(client.hub.store, client.settings, trail=client.hub.audit)
    mpi = attach_mpi(svc)
    assert mpi is not None
    handler = Hl7Listener(svc, mpi, client.hub.rejected, workers=1)
    handler.senders.resolve_hosts = False
    yield handler
    handler.close()


def admin(client: Any) -> dict[str, str]:
    return bearer(client.settings, "admin")


def keep_frames(store: RejectedStore, n: int) -> list[int]:
    """``n`` kept messages on two channels, received a day apart from 1 January 2026."""
    return [
        store.keep(
            channel="mllp" if i % 2 == 0 else "dicom",
            kind="rejected",
            raw=f"MSH|^~\\&|A|B|||x||ADT^A01|CTL{i}|P|2.5\r".encode(),
            sender="LABAPP|LAB01",
            peer="10.0.0.7:40001",
            code="207",
            reason=f"reason {i}",
            control_id=f"CTL{i}",
            received=datetime(2026, 1, 1 + i, 9, 30, tzinfo=UTC),
        )
        for i in range(n)
    ]


def listed(client: Any, **params: str) -> dict[str, Any]:
    r = client.get("/admin/messages", params=params, headers=admin(client))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = r.json()
    return body


def code_of(r: Any) -> str:
    """The stable HIE-xxxx code of an OperationOutcome answer."""
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome", oo
    return str(oo["issue"][0]["details"]["coding"][0]["code"])


# --- listing --------------------------------------------------------------------------------


def test_list_is_newest_first_pages_by_id_and_filters(client: Any, rejected: RejectedStore) -> None:
    ids = keep_frames(rejected, 5)
    rejected.discard(ids[1], "duplicate of another message")
    page = listed(client, _count="2")
    assert [m["id"] for m in page["items"]] == [ids[4], ids[3]] and page["count"] == 2
    first = page["items"][0]
    assert first == {
        "id": ids[4],
        "received": "2026-01-05T09:30:00.000Z",
        "channel": "mllp",
        "sender": "LABAPP|LAB01",
        "peer": "10.0.0.7:40001",
        "kind": "rejected",
        "code": "207",
        "reason": "reason 4",
        "control_id": "CTL4",
        "size": len(b"MSH|^~\\&|A|B|||x||ADT^A01|CTL4|P|2.5\r"),
        "status": "open",
        "status_text": "открыто / open",
        "replayable": True,
        "replayed_at": None,
        "replay_outcome": None,
        "discarded_at": None,
        "discard_reason": None,
    }
    # the next link keeps the filters and continues before the page's last id
    seen = [m["id"] for m in page["items"]]
    nxt = page["next"]
    while nxt:
        url = urlsplit(nxt)
        assert url.path == "/admin/messages" and "_count=2" in url.query
        r = client.get(f"{url.path}?{url.query}", headers=admin(client))
        assert r.status_code == 200
        seen += [m["id"] for m in r.json()["items"]]
        nxt = r.json()["next"]
    assert seen == ids[::-1]
    # filters: status, channel, since (a date is its first instant, UTC), combined
    assert [m["id"] for m in listed(client, status="open")["items"]] == [
        ids[4],
        ids[3],
        ids[2],
        ids[0],
    ]
    assert [m["id"] for m in listed(client, channel="dicom")["items"]] == [ids[3], ids[1]]
    assert [m["id"] for m in listed(client, since="2026-01-03")["items"]] == ids[2:][::-1]
    both = listed(client, status="discarded", channel="dicom", since="2026-01-01T00:00:00Z")
    (gone,) = both["items"]
    assert gone["id"] == ids[1] and gone["discard_reason"] == "duplicate of another message"
    assert gone["discarded_at"].endswith("Z") and gone["replayable"] is False
    assert listed(client, status="", channel="")["count"] == 5  # empty form fields
    # nothing of the bytes in a listing
    assert all("raw" not in m and "text" not in m for m in listed(client)["items"])
    assert listed(client, status="replayed") == {"items": [], "count": 0, "next": None}


@pytest.mark.parametrize(
    "query",
    ["status=lost", "_count=0", "_count=many", "before=x", "since=yesterday", "sort=received"],
)
def test_bad_list_queries_are_400_with_an_operation_outcome(client: Any, query: str) -> None:
    r = client.get(f"/admin/messages?{query}", headers=admin(client))
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    assert code_of(r) == "HIE-1001"


# --- show and raw -------------------------------------------------------------------------


def test_show_decodes_windows_1251_and_raw_gives_the_exact_bytes(
    client: Any, rejected: RejectedStore
) -> None:
    ident = rejected.keep(
        channel="mllp",
        kind="failed",
        raw=CP1251,
        sender="LABAPP|LAB01",
        code="207",
        reason="application internal error",
        control_id="C-1251",
    )
    r = client.get(f"/admin/messages/{ident}", headers=admin(client))
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    shown = r.json()
    assert shown["id"] == ident and shown["control_id"] == "C-1251" and shown["status"] == "open"
    assert shown["encoding"] == "windows-1251"
    assert shown["kept_bytes"] == shown["size"] == len(CP1251) and shown["truncated"] is False
    lines = shown["text"].split("\n")
    assert lines[0].startswith("MSH|^~\\&|LABAPP|LAB01|")
    assert lines[1] == "PID|1||7000123^^^LAB01^MR||Тестова^Анна^Сергеевна||19850312|F"
    assert lines[2] == "OBX|1|ST|X^Комментарий||Ёжик в тумане|"
    assert lines[3] == "\\x00я"  # a NUL is shown, not swallowed; 0xFF is я in Windows-1251
    assert urlsplit(shown["raw"]).path == f"/admin/messages/{ident}/raw"

    raw = client.get(f"/admin/messages/{ident}/raw", headers=admin(client))
    assert raw.status_code == 200
    assert raw.content == CP1251
    assert raw.headers["content-type"] == "application/octet-stream"
    assert raw.headers["content-disposition"] == f'attachment; filename="rejected-{ident}.hl7"'
    assert raw.headers["cache-control"] == "no-store"

    # undeclared Windows-1251 is recognised too; UTF-8 is read as UTF-8
    other = rejected.keep(channel="mllp", kind="rejected", raw=UNDECLARED, code="103")
    shown = client.get(f"/admin/messages/{other}", headers=admin(client)).json()
    assert shown["encoding"] == "windows-1251" and "Петрова^Ольга" in shown["text"]
    utf8 = UNDECLARED.decode("cp1251").encode("utf-8")
    third = rejected.keep(channel="mllp", kind="rejected", raw=utf8, code="103")
    shown = client.get(f"/admin/messages/{third}", headers=admin(client)).json()
    assert shown["encoding"] == "utf-8" and "Петрова^Ольга" in shown["text"]
    # ISO 8859-5, declared as HL7 table 0211 names it, is read as declared (not guessed)
    iso = UNDECLARED.decode("cp1251").replace("|2.3\r", "|2.3|||||RU|8859/5\r", 1)
    fourth = rejected.keep(channel="mllp", kind="rejected", raw=iso.encode("iso8859-5"))
    shown = client.get(f"/admin/messages/{fourth}", headers=admin(client)).json()
    assert shown["encoding"] == "iso8859-5" and "Петрова^Ольга" in shown["text"]


def test_a_too_large_frame_shows_its_head_and_says_so(client: Any, rejected: RejectedStore) -> None:
    head = b"MSH|^~\\&|LIS|LAB7001|HIE|SPB|20260301||ORU^R01|BIG-1|P|2.5.1\r" + b"X" * 100
    ident = rejected.keep(channel="mllp", kind="too-large", raw=head, size=10_000_000, code="207")
    shown = client.get(f"/admin/messages/{ident}", headers=admin(client)).json()
    assert shown["truncated"] is True and shown["size"] == 10_000_000
    assert shown["kept_bytes"] == len(head) and shown["replayable"] is False
    assert client.get(f"/admin/messages/{ident}/raw", headers=admin(client)).content == head


@pytest.mark.parametrize("path", ["999999", "abc", "-1", "1e3"])
def test_an_unknown_message_is_404(client: Any, path: str) -> None:
    for url in (f"/admin/messages/{path}", f"/admin/messages/{path}/raw"):
        r = client.get(url, headers=admin(client))
        assert r.status_code == 404 and code_of(r) == "HIE-1003", url
    r = client.post(f"/admin/messages/{path}/$replay", headers=admin(client))
    assert r.status_code == 404 and code_of(r) == "HIE-1003"


# --- replay ---------------------------------------------------------------------------------


def test_replay_after_the_sender_is_registered_stores_the_result(
    client: Any, intake: Hl7Listener, rejected: RejectedStore
) -> None:
    good = oru_message("cbc", control_id="R-1")
    bad = oru_message("cbc", control_id="R-2", obx={2: {5: "много"}})  # NM that is no number
    intake.process(good)
    intake.process(bad)
    found = listed(client, status="open")["items"]
    assert [(m["control_id"], m["code"], m["kind"]) for m in found] == [
        ("R-2", "103", "rejected"),  # the laboratory is not registered yet
        ("R-1", "103", "rejected"),
    ]
    assert LAB_FACILITY in found[0]["sender"]
    bad_id, good_id = found[0]["id"], found[1]["id"]

    # replayed before the cause is fixed: the same answer, and the message stays open
    r = client.post(f"/admin/messages/{good_id}/$replay", headers=admin(client))
    assert r.status_code == 200, r.text
    again = r.json()
    assert again["outcome"] == "AR" and again["outcome_text"] == "отклонено / rejected"
    assert [p["code"] for p in again["problems"]] == ["103"]
    assert again["problems"][0]["severity"] == "error"
    assert again["problems"][0]["location"] == "MSH-4"
    assert again["message"]["status"] == "open" and again["message"]["replayable"] is True
    assert rejected.count() == 2  # a failed replay is not kept a second time

    # the operator registers the laboratory (and the clinic whose patients it reports)
    assert client.post("/fhir", json=as_transaction(lab_registry())).status_code == 200
    r = client.post(f"/admin/messages/{good_id}/$replay", headers=admin(client))
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["outcome"] == "AA" and done["id"] == good_id
    assert all(p["severity"] == "warning" for p in done["problems"])
    msg = done["message"]
    assert msg["status"] == "replayed" and msg["replayable"] is False
    assert msg["replay_outcome"].startswith("AA") and msg["replayed_at"].endswith("Z")
    reports = client.get("/fhir/DiagnosticReport?_total=accurate").json()
    assert reports["total"] == 1
    (rep,) = [e["resource"] for e in reports["entry"]]
    assert rep["performer"][0]["reference"] == "Organization/lab-7001"
    observations = client.get("/fhir/Observation?_total=accurate&_count=1").json()
    assert observations["total"] == 10
    assert client.get(f"/fhir/Organization/{GP}").status_code == 200

    # the other message now fails for its own reason: AE, still open, nothing stored
    r = client.post(f"/admin/messages/{bad_id}/$replay", headers=admin(client))
    assert r.status_code == 200, r.text
    still = r.json()
    assert still["outcome"] == "AE" and "102" in [p["code"] for p in still["problems"]]
    assert still["message"]["status"] == "open" and still["message"]["replay_outcome"] is None
    assert client.get("/fhir/DiagnosticReport?_total=accurate").json()["total"] == 1

    # a replayed message is closed: neither replayed nor discarded again
    for action, body in (("$replay", None), ("$discard", {"reason": "done"})):
        r = client.post(f"/admin/messages/{good_id}/{action}", headers=admin(client), json=body)
        assert r.status_code == 409, r.text
        assert code_of(r) == "HIE-1006"
    assert listed(client, status="replayed")["items"][0]["id"] == good_id

    # the replay's audit record says what it did and which records it wrote
    recs, _ = client.hub.audit.records(subtypes=["rejected-replay"], count=10)
    replayed = [x for x in recs if x.path == f"/admin/messages/{good_id}/$replay"]
    assert [x.status for x in replayed] == [409, 200, 200]  # newest first
    ok = replayed[1]
    assert ok.action == "C" and ok.roles == ["admin"] and ok.outcome == 0
    assert client.hub.audit.durable(ok)  # synced before the answer, as what it filed
    assert any(e.startswith("DiagnosticReport/") for e in ok.entities)
    assert ok.patients  # the patient the result was filed for


def test_a_frame_that_never_was_a_message_cannot_be_replayed(
    client: Any, rejected: RejectedStore
) -> None:
    garbage = rejected.keep(channel="mllp", kind="garbage", raw=b"\x00\x01 not HL7", code="100")
    dicom = rejected.keep(channel="dicom", kind="rejected", raw=b"DICM", code="HIE-1002")
    for ident in (garbage, dicom):
        r = client.post(f"/admin/messages/{ident}/$replay", headers=admin(client))
        assert r.status_code == 409, r.text
        assert code_of(r) == "HIE-1006"
        assert rejected.get(ident).status == "open"  # type: ignore[union-attr]


# --- discard --------------------------------------------------------------------------------


def test_discard_closes_an_open_message_with_its_reason(
    client: Any, rejected: RejectedStore
) -> None:
    (ident,) = keep_frames(rejected, 1)
    url = f"/admin/messages/{ident}/$discard"
    for body in ({}, {"reason": "   "}, {"reason": 7}, ["x"]):
        r = client.post(url, headers=admin(client), json=body)
        assert r.status_code == 400 and code_of(r) == "HIE-1001", body
    r = client.post(url, headers=admin(client), content=b"reason=x")
    assert r.status_code in (400, 415)
    assert rejected.get(ident).status == "open"  # type: ignore[union-attr]

    r = client.post(url, headers=admin(client), json={"reason": "тестовое сообщение / a test"})
    assert r.status_code == 200, r.text
    gone = r.json()
    assert gone["status"] == "discarded" and gone["discard_reason"] == "тестовое сообщение / a test"
    assert gone["discarded_at"].endswith("Z") and gone["replayable"] is False
    again = client.post(url, headers=admin(client), json={"reason": "again"})
    assert again.status_code == 409 and code_of(again) == "HIE-1006"
    r = client.post(f"/admin/messages/{ident}/$replay", headers=admin(client))
    assert r.status_code == 409
    missing = client.post("/admin/messages/999999/$discard", headers=admin(client), json=gone)
    assert missing.status_code in (400, 404)  # no reason key in it, and no such message
    missing = client.post(
        "/admin/messages/999999/$discard", headers=admin(client), json={"reason": "x"}
    )
    assert missing.status_code == 404 and code_of(missing) == "HIE-1003"


# --- who may, and the audit trail ---------------------------------------------------------


def test_only_admin_and_service_may_and_every_call_is_audited(
    client: Any, rejected: RejectedStore
) -> None:
    (ident,) = keep_frames(rejected, 1)
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "/admin/messages", None),
        ("GET", f"/admin/messages/{ident}", None),
        ("GET", f"/admin/messages/{ident}/raw", None),
        ("POST", f"/admin/messages/{ident}/$replay", None),
        ("POST", f"/admin/messages/{ident}/$discard", {"reason": "not mine"}),
    ]
    others = {
        "clinician": bearer(client.settings, "clinician", org=GP, practitioner="pr-smirnov"),
        "patient": bearer(client.settings, "patient", patient="p-1"),
        "official": bearer(client.settings, "official"),
        "mis": bearer(client.settings, "mis", org=GP),
    }
    for role, headers in others.items():
        for method, url, body in calls:
            r = client.request(method, url, headers=headers, json=body)
            assert r.status_code == 403, (role, url, r.text)
            assert code_of(r).startswith("HIE-11")
    for method, url, body in calls:
        r = client.request(method, url, headers={"Authorization": ""}, json=body)
        assert r.status_code == 401, (url, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert rejected.get(ident).status == "open"  # type: ignore[union-attr]

    # the hub's own service role may, as admins may
    assert client.get("/admin/messages", headers=bearer(client.settings)).status_code == 200
    for method, url, body in calls[:3]:
        assert client.request(method, url, headers=admin(client), json=body).status_code == 200
    r = client.post(calls[4][1], headers=admin(client), json=calls[4][2])
    assert r.status_code == 200

    recs, _ = client.hub.audit.records(count=500)
    mine = [x for x in recs if x.path.startswith("/admin/messages")]
    refused = [x for x in mine if x.status in (401, 403)]
    assert len(refused) == len(calls) * (len(others) + 1)
    assert all(x.outcome == 4 for x in refused)
    assert {tuple(x.roles) for x in refused if x.status == 403} == {(r,) for r in others}
    assert all(x.agent is None for x in refused if x.status == 401)
    done = {(x.method, x.subtype, x.action) for x in mine if x.status == 200 and "admin" in x.roles}
    assert done == {
        ("GET", "rejected-search", "E"),
        ("GET", "rejected-read", "R"),
        ("GET", "rejected-raw", "R"),
        ("POST", "rejected-discard", "U"),
    }
    assert any(x.roles == ["service"] and x.subtype == "rejected-search" for x in mine)
