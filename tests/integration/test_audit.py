"""The audit trail over HTTP, on every backend: every access leaves a record before the answer,
refusals too; patients read the records about them; the trail is append-only and its hash
chain shows tampering (``hie audit verify``)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import DBAPIError

from hie.hub.audit import audit_url
from hie.hub.errors import StorageError
from tests.fixtures.audit import durability_of
from tests.fixtures.auth import bearer
from tests.fixtures.records import encounter, golden_id, observation, person, post


@pytest.fixture
def two(client) -> dict[str, str]:  # type: ignore[no-untyped-def]
    a = post(client, person("Орлов", "Пётр", "1990-02-03"))["id"]
    b = post(client, person("Соколов", "Игорь", "1960-07-08"))["id"]
    golden = {k: golden_id(client, p) for k, p in (("a", a), ("b", b))}
    for pid in (a, b):
        post(client, encounter(pid, "mo-12"))  # both treated at MO 12
    return {
        "a": a,
        "b": b,
        "golden_a": golden["a"],
        "obs_a": post(client, observation(a))["id"],
        "obs_b": post(client, observation(b))["id"],
    }


def _verify_cli(client) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """``hie audit verify`` on the test hub's data."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIE_")}
    env |= {
        "HIE_DATA_DIR": str(client.settings.data_dir),
        "HIE_DATABASE_URL": client.settings.database_url,
    }
    return subprocess.run(
        [sys.executable, "-m", "hie.cli", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
    )


def _trail(client, **params: str) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    r = client.get("/fhir/AuditEvent", params=params, headers=bearer(client.settings, "admin"))
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json()["entry"]]


def _refs(event: dict[str, Any]) -> set[str]:
    return {e["what"]["reference"] for e in event.get("entity", []) if "what" in e}


def test_a_clinicians_read_is_recorded_with_who_what_and_whom(client, two) -> None:  # type: ignore[no-untyped-def]
    doc = bearer(client.settings, "clinician", org="mo-12", practitioner="pr-5")
    assert client.get(f"/fhir/Observation/{two['obs_a']}", headers=doc).status_code == 200
    event = _trail(client, entity=f"Observation/{two['obs_a']}", subtype="read")[0]
    assert event["action"] == "R" and event["outcome"] == "0"
    agent, org = event["agent"]
    assert agent["who"]["reference"] == "Practitioner/pr-5"
    assert [r["text"] for r in agent["role"]] == ["clinician"]
    assert agent["network"]["address"] == "testclient"
    assert org["who"]["reference"] == "Organization/mo-12"
    assert _refs(event) == {f"Patient/{two['a']}", f"Observation/{two['obs_a']}"}


def test_a_search_names_every_patient_it_returned(client, two) -> None:  # type: ignore[no-untyped-def]
    doc = bearer(client.settings, "clinician", org="mo-12")
    assert client.get("/fhir/Observation?code=718-7", headers=doc).status_code == 200
    for pid in (two["a"], two["b"]):
        events = _trail(client, patient=pid, subtype="search")
        assert any("/fhir/Observation?code=718-7" in _query(e) for e in events), pid


def _query(event: dict[str, Any]) -> str:
    import base64

    return "".join(
        base64.b64decode(e["query"]).decode() for e in event.get("entity", []) if "query" in e
    )


def test_refused_attempts_are_recorded(client, two) -> None:  # type: ignore[no-untyped-def]
    r = client.get(f"/fhir/Observation/{two['obs_b']}", headers={"Authorization": ""})
    assert r.status_code == 401
    me = bearer(client.settings, "patient", patient=two["golden_a"])
    assert client.get(f"/fhir/Observation/{two['obs_b']}", headers=me).status_code == 403
    events = [e for e in _trail(client) if e["outcome"] == "4"]
    anonymous = next(
        e for e in events if e["agent"][0]["who"]["identifier"]["value"] == "(unauthenticated)"
    )
    assert "bearer token" in anonymous["outcomeDesc"]
    refused = next(e for e in events if e["agent"][0].get("role") == [{"text": "patient"}])
    assert refused["subtype"][0]["code"] == "read"


def test_patients_read_the_log_of_their_record_only(client, two) -> None:  # type: ignore[no-untyped-def]
    doc = bearer(client.settings, "clinician", org="mo-12")
    client.get(f"/fhir/Observation/{two['obs_a']}", headers=doc)
    client.get(f"/fhir/Observation/{two['obs_b']}", headers=doc)
    me = bearer(client.settings, "patient", patient=two["golden_a"])
    mine = client.get("/fhir/AuditEvent", headers=me)
    assert mine.status_code == 200
    events = [e["resource"] for e in mine.json()["entry"]]
    assert events, "the patient sees who read their record"
    seen = set().union(*(_refs(e) for e in events))
    assert f"Observation/{two['obs_a']}" in seen
    assert f"Observation/{two['obs_b']}" not in seen and f"Patient/{two['b']}" not in seen
    looked = [
        e
        for e in events
        if any(r.get("text") == "clinician" for r in e["agent"][0].get("role", []))
    ]
    assert any(
        a["who"].get("reference") == "Organization/mo-12" for e in looked for a in e["agent"]
    )
    # someone else's log: nothing, and no record of theirs by id
    other = client.get(f"/fhir/AuditEvent?patient={two['b']}", headers=me).json()
    assert other["entry"] == []
    b_event = _trail(client, entity=f"Observation/{two['obs_b']}")[0]
    assert client.get(f"/fhir/AuditEvent/{b_event['id']}", headers=me).status_code == 403
    # clinicians do not browse the trail
    assert client.get("/fhir/AuditEvent", headers=doc).status_code == 403


def test_paging_through_the_trail(client, two) -> None:  # type: ignore[no-untyped-def]
    adm = bearer(client.settings, "admin")
    for _ in range(5):
        client.get(
            f"/fhir/Patient/{two['a']}", headers=bearer(client.settings, "clinician", org="mo-12")
        )
    seen: list[str] = []
    url: str | None = f"/fhir/AuditEvent?entity=Patient/{two['a']}&subtype=read&_count=2"
    while url:
        page = client.get(url, headers=adm).json()
        seen += [e["resource"]["id"] for e in page["entry"]]
        url = next((x["url"] for x in page["link"] if x["relation"] == "next"), None)
        url = url.split("hub.test", 1)[-1] if url else None
    assert len(seen) == 5 and len(set(seen)) == 5
    assert [int(s) for s in seen] == sorted((int(s) for s in seen), reverse=True)


def test_nothing_is_served_unaudited(client, two, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    async def broken(_rec: object, **_kw: object) -> object:
        raise StorageError("audit database is down")

    def broken_now(_recs: object) -> None:
        raise StorageError("audit database is down")

    monkeypatch.setattr(client.hub.audit, "append_async", broken)
    monkeypatch.setattr(client.hub.audit, "append_many", broken_now)
    r = client.get(f"/fhir/Observation/{two['obs_a']}")
    assert r.status_code == 503
    assert r.json()["resourceType"] == "OperationOutcome"
    assert two["obs_a"] not in r.text


def test_the_record_of_a_write_is_as_durable_as_the_write(client, two, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    trail = client.hub.audit
    statements: list[str] = []
    if trail.dialect == "postgresql":  # the records' own commits: synced or not
        event.listen(trail.engine, "before_cursor_execute", _collect(statements))
    asked = durability_of(monkeypatch, trail, lambda r: r.method)
    assert client.get(f"/fhir/Observation/{two['obs_a']}").status_code == 200
    assert (
        client.get(f"/fhir/Observation/{two['obs_a']}", headers={"Authorization": "x"}).status_code
        == 401
    )
    changed = {**client.get(f"/fhir/Observation/{two['obs_a']}").json(), "status": "amended"}
    assert client.put(f"/fhir/Observation/{two['obs_a']}", json=changed).status_code == 200
    assert (
        client.put(
            f"/fhir/Observation/{two['obs_a']}", json={"resourceType": "Observation"}
        ).status_code
        == 400
    )
    assert asked == [("GET", False), ("GET", False), ("GET", False), ("PUT", True), ("PUT", False)]
    if trail.dialect == "postgresql":  # each append: synced unless it says otherwise first
        appends = [
            "synchronous_commit TO OFF" in statements[i - 1]
            for i, s in enumerate(statements)
            if "pg_advisory_xact_lock(7218300114)" in s
        ]
        assert sorted(appends) == [False, True, True, True, True]  # only the write waited
        assert trail.verify().ok


def _collect(into: list[str]) -> Any:
    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        into.append(statement)

    return before


def test_the_trail_is_append_only_and_tamper_evident(client, two, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client.get(f"/fhir/Observation/{two['obs_a']}")
    trail = client.hub.audit
    assert trail.verify().ok
    engine = create_engine(trail.url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as conn:
        for sql in (
            "UPDATE audit_log SET recorded = 0",
            "DELETE FROM audit_log",
            "DELETE FROM audit_ref",
        ):
            with pytest.raises(DBAPIError, match="append-only"):
                conn.execute(text(sql))
            conn.rollback()
    # someone with the database's owner rights drops the guard and edits a record
    with engine.begin() as conn:
        if trail.dialect == "sqlite":
            conn.execute(text("DROP TRIGGER audit_log_no_update"))
        else:
            conn.execute(text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only"))
        body = bytes(conn.execute(text("SELECT body FROM audit_log WHERE seq = 2")).scalar_one())
        forged = body.replace(b'"status":201', b'"status":200')
        assert forged != body
        conn.execute(text("UPDATE audit_log SET body = :b WHERE seq = 2"), {"b": forged})
    engine.dispose()
    result = trail.verify()
    assert not result.ok and result.first_bad == 2 and "changed" in result.problem
    # and the CLI says so with exit code 1
    out = _verify_cli(client)
    assert out.returncode == 1 and "BROKEN at record 2" in out.stderr


def test_cli_verify_passes_on_an_intact_trail(client, two) -> None:  # type: ignore[no-untyped-def]
    client.get(f"/fhir/Observation/{two['obs_a']}")
    out = _verify_cli(client)
    assert out.returncode == 0, out.stderr
    assert "intact" in out.stdout
    assert audit_url(client.settings.database_url) == client.hub.audit.url


def test_officials_get_counts_not_records(client, two) -> None:  # type: ignore[no-untyped-def]
    doc = bearer(client.settings, "clinician", org="mo-12")
    client.get(f"/fhir/Observation/{two['obs_a']}", headers=doc)
    client.get("/fhir/Observation/none", headers=doc)  # 404: a minor failure
    off = bearer(client.settings, "official")
    assert client.get("/fhir/AuditEvent", headers=off).status_code == 403
    r = client.get("/fhir/AuditEvent/$stats?since=2020-01-01", headers=off)
    assert r.status_code == 200, r.text
    counts = {
        (p["name"], p["part"][0]["valueString"]): p["part"][1]["valueInteger"]
        for p in r.json()["parameter"]
    }
    assert counts[("role", "clinician")] >= 2
    assert counts[("outcome", "0")] >= 1 and counts[("outcome", "4")] >= 1
    assert two["a"] not in r.text and two["obs_a"] not in r.text
    assert client.get("/fhir/AuditEvent/$stats", headers=doc).status_code == 403
