"""Access control over HTTP, on every resource-store backend: bearer tokens on every request,
the discovery documents open, refusals as OperationOutcome with ``WWW-Authenticate``."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from hie.hub.auth import DEV_ISSUER, DevTokenIssuer
from tests.fixtures.auth import bearer
from tests.fixtures.records import (
    FJ,
    GOLDEN,
    closing,
    consent,
    encounter,
    golden_id,
    observation,
    person,
    post,
)

NO_AUTH = {"Authorization": ""}  # drops the client fixture's default token


@pytest.mark.parametrize(
    "path", ["/fhir/Patient", "/fhir/Patient/x", "/fhir/_history", "/metrics", "/docs"]
)
def test_no_token_no_entry(client, path: str) -> None:  # type: ignore[no-untyped-def]
    r = client.get(path, headers=NO_AUTH)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith('Bearer realm="hie"')
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "login"
    assert "x-request-id" in r.headers


def test_writes_need_a_token_too(client) -> None:  # type: ignore[no-untyped-def]
    res = {"resourceType": "Organization", "name": "Без токена"}
    r = client.post("/fhir/Organization", json=res, headers={**FJ, **NO_AUTH})
    assert r.status_code == 401
    r = client.post("/fhir", json={"resourceType": "Bundle", "type": "batch"}, headers=NO_AUTH)
    assert r.status_code == 401


@pytest.mark.parametrize("path", ["/healthz", "/fhir/metadata"])
def test_discovery_and_health_are_open(client, path: str) -> None:  # type: ignore[no-untyped-def]
    assert client.get(path, headers=NO_AUTH).status_code == 200


def test_bad_tokens_say_why(client) -> None:  # type: ignore[no-untyped-def]
    issuer = DevTokenIssuer(client.settings)
    now = int(time.time())
    expired = issuer.issue("clinician", ttl=-3600)
    wrong_aud = jwt.encode(
        {"iss": DEV_ISSUER, "aud": "other", "sub": "x", "exp": now + 60, "hie_roles": ["admin"]},
        issuer._key,
        algorithm="ES256",
        headers={"kid": issuer.kid},
    )
    for token, why in ((expired, "expired"), (wrong_aud, "not meant for this hub")):
        r = client.get("/fhir/Organization", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
        assert why in r.json()["issue"][0]["diagnostics"]
    r = client.get("/fhir/Organization", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert r.status_code == 401


def test_a_good_token_is_served(client) -> None:  # type: ignore[no-untyped-def]
    r = client.get("/fhir/Organization", headers=bearer(client.settings, "admin"))
    assert r.status_code == 200 and r.json()["resourceType"] == "Bundle"


# --- the policy over HTTP: patient A may never see patient B -----------------------------------


@pytest.fixture
def city(client) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Two people with records (written by the hub's service role) and a practitioner."""
    pr = post(client, {"resourceType": "Practitioner", "name": [{"family": "Врачёва"}]})
    a = post(client, person("Смирнова", "Ольга", "1980-01-02"))
    b = post(client, person("Кузнецова", "Мария", "1975-05-06"))
    golden = {who: golden_id(client, p["id"]) for who, p in (("a", a), ("b", b))}
    obs_a = [post(client, observation(a["id"], 120 + i, pr["id"]))["id"] for i in range(3)]
    obs_b = [post(client, observation(b["id"], 90 + i, pr["id"]))["id"] for i in range(2)]
    consent_b = post(client, consent(b["id"]))["id"]
    for who in (a, b):  # both are being treated at MO 12 and MO 40
        for org in ("mo-12", "mo-40"):
            post(client, encounter(who["id"], org))
    return {
        "a": a["id"],
        "b": b["id"],
        "golden_a": golden["a"],
        "golden_b": golden["b"],
        "obs_a": obs_a,
        "obs_b": obs_b,
        "consent_b": consent_b,
        "practitioner": pr["id"],
    }


def _as(client, role: str, **claims: Any) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return bearer(client.settings, role, **claims)


def _ids(bundle: dict[str, Any], rtype: str | None = None) -> set[str]:
    return {
        e["resource"]["id"]
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode") != "outcome"
        and (rtype is None or e["resource"]["resourceType"] == rtype)
    }


def test_patient_reads_own_records_by_golden_or_source_id(client, city) -> None:  # type: ignore[no-untyped-def]
    for pid in (city["golden_a"], city["a"]):
        me = _as(client, "patient", patient=pid)
        r = client.get(f"/fhir/Observation/{city['obs_a'][0]}", headers=me)
        assert r.status_code == 200, r.text
        found = client.get("/fhir/Observation?_total=accurate", headers=me).json()
        assert _ids(found) == set(city["obs_a"]) and found["total"] == 3
        assert client.get(f"/fhir/Patient/{city['a']}", headers=me).status_code == 200


def test_patient_a_cannot_reach_patient_b_any_way(client, city) -> None:  # type: ignore[no-untyped-def]
    me = _as(client, "patient", patient=city["golden_a"])
    b, obs_b = city["b"], city["obs_b"][0]
    # by id
    for path in (
        f"/fhir/Observation/{obs_b}",
        f"/fhir/Observation/{obs_b}/_history/1",
        f"/fhir/Observation/{obs_b}/_history",
        f"/fhir/Patient/{b}",
        f"/fhir/Patient/{city['golden_b']}",
        f"/fhir/Patient/{b}/$everything",
        f"/fhir/Consent/{city['consent_b']}",
    ):
        r = client.get(path, headers=me)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert r.json()["issue"][0]["code"] == "forbidden"
    # by search, chained search, _include, _revinclude, _id
    for query in (
        f"/fhir/Observation?subject=Patient/{b}",
        f"/fhir/Observation?patient={city['golden_b']}",
        "/fhir/Observation?subject:Patient.name=Кузнецова",
        f"/fhir/Observation?_id={obs_b}",
        "/fhir/Patient?name=Кузнецова",
        f"/fhir/Patient?_id={b}",
        f"/fhir/Patient?_tag={GOLDEN}",
        f"/fhir/Consent?patient={b}",
    ):
        found = client.get(query, headers=me).json()
        assert found["resourceType"] == "Bundle", (query, found)
        leaked = _ids(found) & {b, city["golden_b"], obs_b, *city["obs_b"], city["consent_b"]}
        assert not leaked, (query, leaked)
    # an _include from own rows reaches only what the patient may see
    inc = client.get(
        "/fhir/Observation?_include=Observation:subject&_include=Observation:performer",
        headers=me,
    ).json()
    assert _ids(inc, "Patient") == {city["a"]}
    assert _ids(inc, "Practitioner") == {city["practitioner"]}
    rev = client.get("/fhir/Patient?_revinclude=Observation:subject", headers=me).json()
    assert _ids(rev, "Observation") == set(city["obs_a"])
    # history across records
    for path in ("/fhir/Observation/_history", "/fhir/_history"):
        assert client.get(path, headers=me).status_code == 403


def test_paging_counts_only_visible_rows(client, city) -> None:  # type: ignore[no-untyped-def]
    me = _as(client, "patient", patient=city["golden_a"])
    seen: list[str] = []
    url: str | None = "/fhir/Observation?_count=2&_total=accurate"
    while url:
        page = client.get(url, headers=me).json()
        assert page["total"] == 3
        seen.extend(_ids(page))
        url = next((x["url"] for x in page["link"] if x["relation"] == "next"), None)
        if url:
            url = url.split("hub.test", 1)[-1]
    assert sorted(seen) == sorted(city["obs_a"])


def test_patient_everything_is_only_their_own(client, city) -> None:  # type: ignore[no-untyped-def]
    me = _as(client, "patient", patient=city["golden_a"])
    r = client.get(f"/fhir/Patient/{city['golden_a']}/$everything", headers=me)
    assert r.status_code == 200
    ids = _ids(r.json())
    assert set(city["obs_a"]) <= ids
    assert not ids & {city["b"], *city["obs_b"], city["consent_b"]}


def test_patient_writes_only_theirconsent(client, city) -> None:  # type: ignore[no-untyped-def]
    me = {**FJ, **_as(client, "patient", patient=city["golden_a"])}
    r = client.post("/fhir/Consent", json=consent(city["a"]), headers=me)
    assert r.status_code == 201, r.text
    own = r.json()["id"]
    r = client.post("/fhir/Consent", json=consent(city["b"]), headers=me)
    assert r.status_code == 403
    # overwriting B's Consent under its id, even pointing it at A, is refused
    body = {**consent(city["a"]), "id": city["consent_b"]}
    r = client.put(f"/fhir/Consent/{city['consent_b']}", json=body, headers=me)
    assert r.status_code == 403
    assert client.delete(f"/fhir/Consent/{city['consent_b']}", headers=me).status_code == 403
    # a clinical write is not a patient's to make
    r = client.post("/fhir/Observation", json=observation(city["a"], 1.0), headers=me)
    assert r.status_code == 403
    # nor smuggled in a transaction
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": consent(city["b"]), "request": {"method": "POST", "url": "Consent"}}
        ],
    }
    assert client.post("/fhir", json=bundle, headers=me).status_code == 403
    # nothing of the refused writes landed
    mine = client.get("/fhir/Consent", headers=me).json()
    assert _ids(mine) == {own}
    assert client.get(f"/fhir/Consent/{city['consent_b']}").json()["patient"]["reference"] == (
        f"Patient/{city['b']}"
    )


def test_official_gets_no_rows(client, city) -> None:  # type: ignore[no-untyped-def]
    off = _as(client, "official")
    for path in (
        "/fhir/Observation",
        f"/fhir/Observation/{city['obs_a'][0]}",
        "/fhir/Patient",
        f"/fhir/Patient/{city['golden_a']}/$everything",
        "/fhir/_history",
    ):
        assert client.get(path, headers=off).status_code == 403, path
    assert client.get("/fhir/Organization", headers=off).status_code == 200


def test_admin_runs_registries_not_clinical_reads(client, city) -> None:  # type: ignore[no-untyped-def]
    adm = {**FJ, **_as(client, "admin")}
    assert client.get(f"/fhir/Observation/{city['obs_a'][0]}", headers=adm).status_code == 403
    assert client.get("/fhir/Patient", headers=adm).status_code == 403
    org = {"resourceType": "Organization", "name": "Поликлиника 99"}
    assert client.post("/fhir/Organization", json=org, headers=adm).status_code == 201


def test_the_audit_trail_is_append_only_for_everyone(client) -> None:  # type: ignore[no-untyped-def]
    event = {
        "resourceType": "AuditEvent",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110"},
        "recorded": "2026-01-01T00:00:00Z",
        "agent": [{"requestor": True, "who": {"display": "x"}}],
        "source": {"observer": {"display": "hub"}},
    }
    for role in ("service", "admin", "mis"):
        h = {**FJ, **_as(client, role)}
        assert client.post("/fhir/AuditEvent", json=event, headers=h).status_code == 403, role
        assert (
            client.put("/fhir/AuditEvent/x", json={**event, "id": "x"}, headers=h).status_code
            == 403
        )
        assert client.delete("/fhir/AuditEvent/x", headers=h).status_code == 403


def test_scopes_narrow_the_role(client, city) -> None:  # type: ignore[no-untyped-def]
    only_obs = _as(client, "clinician", org="mo-12", scope="user/Observation.rs")
    assert client.get("/fhir/Observation", headers=only_obs).status_code == 200
    assert client.get("/fhir/Condition", headers=only_obs).status_code == 403
    assert client.get("/fhir/Patient", headers=only_obs).status_code == 403
    # a clinician app launched for one patient (patient/ scopes) sees that patient only
    launched = _as(client, "clinician", org="mo-12", scope="patient/*.rs", patient=city["golden_b"])
    found = client.get("/fhir/Observation", headers=launched).json()
    assert _ids(found) == set(city["obs_b"])
    no_context = _as(client, "clinician", org="mo-12", scope="patient/*.rs")
    assert client.get("/fhir/Observation", headers=no_context).status_code == 403


def test_mpi_operations_follow_the_table(client, city) -> None:  # type: ignore[no-untyped-def]
    params = {
        "resourceType": "Parameters",
        "parameter": [{"name": "resource", "resource": person("Смирнова", "Ольга", "1980-01-02")}],
    }
    for role, status in (("clinician", 200), ("patient", 403), ("official", 403), ("admin", 403)):
        who = {"patient": city["golden_a"]} if role == "patient" else {"org": "mo-12"}
        h = {**FJ, **_as(client, role, **who)}
        r = client.post("/fhir/Patient/$match", json=params, headers=h)
        assert r.status_code == status, (role, r.text)
    explain = f"/fhir/Patient/{city['a']}/$mpi-explain"
    assert client.get(explain, headers=_as(client, "admin")).status_code == 200
    assert client.get(explain, headers=_as(client, "clinician", org="mo-12")).status_code == 403


@pytest.mark.parametrize(
    "query",
    [
        "name=' OR '1'='1",
        "name=%25",
        'name:exact=x"; DROP TABLE resources; --',
        "_id=' OR 1=1 --",
        "identifier=a|b' UNION SELECT * FROM resources --",
        "_sort=name;DROP TABLE resources",
    ],
)
def test_injection_through_search_parameters_finds_nothing_extra(client, city, query: str) -> None:  # type: ignore[no-untyped-def]
    me = _as(client, "patient", patient=city["golden_a"])
    r = client.get(f"/fhir/Patient?{query}", headers=me)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        assert not _ids(r.json()) & {city["b"], city["golden_b"]}
    # the store is intact
    assert client.get(f"/fhir/Patient/{city['b']}").status_code == 200


def test_request_floods_get_429_with_retry_after(store_url, settings_for) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from hie.fhir.app import create_app
    from hie.hub.runtime import open_hub

    settings = settings_for(store_url, rate_limit_per_second=0.5, rate_limit_burst=3)
    hub = open_hub(settings)
    hub.store.migrate()
    app = create_app(settings, hub, start_worker=False)
    with TestClient(app, base_url="http://hub.test") as c:
        flood = bearer(settings, "clinician")
        codes = [c.get("/fhir/Organization", headers=flood).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        r = c.get("/fhir/Organization", headers=flood)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["issue"][0]["code"] == "throttled"
        # another principal is not held up by the flood
        assert c.get("/fhir/Organization", headers=bearer(settings, "admin")).status_code == 200
        # bad tokens from one address are limited too, before any signature check
        bad = [
            c.get("/fhir/Organization", headers={"Authorization": "Bearer x.y.z"}).status_code
            for _ in range(5)
        ]
        # (the address's bucket also paid for the two good tokens' first signature checks)
        assert bad[0] == 401 and bad[-2:] == [429, 429]
        # and the refusals are in the audit trail
        throttled, _ = hub.audit.records(count=100)
        assert sum(1 for rec in throttled if rec.status == 429) >= 4


# --- patient consent and break-the-glass ------------------------------------------------------


def _seen(client, headers: dict[str, str]) -> set[str]:  # type: ignore[no-untyped-def]
    r = client.get("/fhir/Observation?_total=accurate&_count=100", headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == len(_ids(body))  # hidden rows are not counted
    return _ids(body)


def test_consent_closes_a_record_to_named_mos_immediately(client, city) -> None:  # type: ignore[no-untyped-def]
    mo12 = _as(client, "clinician", org="mo-12")
    mo40 = _as(client, "clinician", org="mo-40")
    everything = set(city["obs_a"]) | set(city["obs_b"])
    assert _seen(client, mo12) >= everything
    consent = post(client, closing(city["a"], "deny", ["mo-12"]))["id"]
    seen12 = _seen(client, mo12)
    assert not seen12 & set(city["obs_a"]) and set(city["obs_b"]) <= seen12
    assert client.get(f"/fhir/Observation/{city['obs_a'][0]}", headers=mo12).status_code == 403
    r = client.get(f"/fhir/Patient/{city['golden_a']}/$everything", headers=mo12)
    assert r.status_code == 403
    assert _seen(client, mo40) >= everything  # another MO is not concerned
    mis12 = _as(client, "mis", org="mo-12")
    assert not _seen(client, mis12) & set(city["obs_a"])
    # withdrawn: open again at once
    assert client.delete(f"/fhir/Consent/{consent}").status_code in (200, 204)
    assert _seen(client, mo12) >= set(city["obs_a"])


def test_deny_everyone_and_allow_only(client, city) -> None:  # type: ignore[no-untyped-def]
    mo12 = _as(client, "clinician", org="mo-12")
    mo40 = _as(client, "clinician", org="mo-40")
    post(client, closing(city["b"], "deny", []))  # B: closed to every MO
    post(client, closing(city["a"], "permit", ["mo-40"]))  # A: only MO 40
    assert not _seen(client, mo12) & (set(city["obs_a"]) | set(city["obs_b"]))
    seen40 = _seen(client, mo40)
    assert set(city["obs_a"]) <= seen40 and not seen40 & set(city["obs_b"])
    # the patient still reads their own record
    me = _as(client, "patient", patient=city["golden_b"])
    assert _seen(client, me) == set(city["obs_b"])


def test_break_the_glass_is_allowed_audited_and_notified(client, city) -> None:  # type: ignore[no-untyped-def]
    post(client, closing(city["a"], "deny", ["mo-12"]))
    doc = _as(client, "clinician", org="mo-12", practitioner=city["practitioner"])
    glass = {**doc, "X-Purpose-Of-Use": "ETREAT"}
    # no reason, no entry
    r = client.get(f"/fhir/Observation/{city['obs_a'][0]}", headers=glass)
    assert r.status_code == 403 and "reason" in r.text
    reason = "Пациент без сознания, приёмный покой"
    r = client.get(
        f"/fhir/Observation/{city['obs_a'][0]}",
        headers={**glass, "X-Break-Glass-Reason": reason.encode()},  # UTF-8 bytes
    )
    assert r.status_code == 200, r.text
    # audited with the purpose and the reason
    trail = client.get(
        f"/fhir/AuditEvent?entity=Observation/{city['obs_a'][0]}&subtype=read",
        headers=_as(client, "admin"),
    ).json()
    event = trail["entry"][0]["resource"]
    assert event["purposeOfEvent"][0]["coding"][0]["code"] == "ETREAT"
    assert event["outcomeDesc"] == reason
    # and the patient is told
    notes = client.get(f"/fhir/Communication?subject=Patient/{city['a']}").json()
    texts = [e["resource"]["payload"][0]["contentString"] for e in notes.get("entry", [])]
    assert len(texts) == 1 and reason in texts[0]
    mine = _as(client, "patient", patient=city["golden_a"])
    assert client.get("/fhir/Communication", headers=mine).json()["entry"]
    # an MIS cannot break the glass
    mis = {
        **_as(client, "mis", org="mo-12"),
        "X-Purpose-Of-Use": "ETREAT",
        "X-Break-Glass-Reason": "x",
    }
    assert client.get(f"/fhir/Observation/{city['obs_a'][0]}", headers=mis).status_code == 403


def test_smart_configuration_is_open_and_says_what_is_accepted(client) -> None:  # type: ignore[no-untyped-def]
    r = client.get("/fhir/.well-known/smart-configuration", headers=NO_AUTH)
    assert r.status_code == 200
    conf = r.json()
    assert conf["issuer"] == DEV_ISSUER  # development: tokens come from `hie token`
    assert {"permission-v2", "permission-v1", "context-standalone-patient"} <= set(
        conf["capabilities"]
    )
    assert "S256" in conf["code_challenge_methods_supported"]


def test_match_does_not_show_a_closed_record(client, city) -> None:  # type: ignore[no-untyped-def]
    post(client, closing(city["a"], "deny", ["mo-12"]))
    params = {
        "resourceType": "Parameters",
        "parameter": [{"name": "resource", "resource": person("Смирнова", "Ольга", "1980-01-02")}],
    }

    def found(org: str) -> set[str]:
        h = {**FJ, **_as(client, "clinician", org=org)}
        r = client.post("/fhir/Patient/$match", json=params, headers=h)
        assert r.status_code == 200, r.text
        return _ids(r.json())

    assert city["golden_a"] in found("mo-40")
    assert city["golden_a"] not in found("mo-12")


# --- care relationships, MO ownership, sensitive categories, proxies ---------------------------


def test_clinicians_read_the_patients_their_mo_treats(client, city) -> None:  # type: ignore[no-untyped-def]
    doc = _as(client, "clinician", org="mo-77")
    assert not _seen(client, doc)  # MO 77 treats nobody yet
    assert client.get(f"/fhir/Observation/{city['obs_a'][0]}", headers=doc).status_code == 403
    visit = post(client, encounter(city["a"], "mo-77"))  # A arrives at MO 77
    assert _seen(client, doc) == set(city["obs_a"])  # every MO's records of A, none of B
    golden = client.get(f"/fhir/Patient/{city['golden_a']}/$everything", headers=doc)
    assert golden.status_code == 200
    assert not _ids(golden.json()) & {city["b"], *city["obs_b"]}
    # the visit ends: the records close again
    done = {**visit, "status": "finished"}
    assert client.put(f"/fhir/Encounter/{visit['id']}", json=done, headers=FJ).status_code == 200
    assert not _seen(client, doc)
    # a referral of B to MO 77 opens B's records to it while it is active
    referral = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": f"Patient/{city['b']}"},
        "performer": [{"reference": "Organization/mo-77"}],
    }
    post(client, referral)
    assert _seen(client, doc) == set(city["obs_b"])
    rad = _as(client, "radiologist", org="mo-77")
    assert _seen(client, rad) == set(city["obs_b"])
    # a clinician whose token names no MO has no care relationships at all
    assert client.get("/fhir/Observation", headers=_as(client, "clinician")).status_code == 403


def test_break_the_glass_opens_a_patient_not_in_care_and_tells_them(client, city) -> None:  # type: ignore[no-untyped-def]
    doc = _as(client, "clinician", org="mo-77")
    glass = {
        **doc,
        "X-Purpose-Of-Use": "ETREAT",
        "X-Break-Glass-Reason": "ДТП, без сознания".encode(),
    }
    r = client.get(f"/fhir/Observation?subject=Patient/{city['a']}&_total=accurate", headers=glass)
    assert r.status_code == 200 and r.json()["total"] == 3
    notes = client.get(f"/fhir/Communication?subject=Patient/{city['a']}").json()
    assert len(notes.get("entry", [])) == 1
    assert not client.get(f"/fhir/Communication?subject=Patient/{city['b']}").json().get("entry")
    # a patient the clinician's MO treats anyway is not told of an ordinary read
    treated = _as(client, "clinician", org="mo-12")
    glass12 = {**treated, "X-Purpose-Of-Use": "ETREAT", "X-Break-Glass-Reason": "срочно".encode()}
    assert client.get(f"/fhir/Patient/{city['b']}", headers=glass12).status_code == 200
    assert not client.get(f"/fhir/Communication?subject=Patient/{city['b']}").json().get("entry")


def test_an_mo_reads_what_it_wrote_and_changes_only_its_own(client, city) -> None:  # type: ignore[no-untyped-def]
    mis77 = {**FJ, **_as(client, "mis", org="mo-77")}
    mis40 = {**FJ, **_as(client, "mis", org="mo-40")}
    mine = observation(city["a"], 130.0)
    r = client.post("/fhir/Observation", json=mine, headers=mis77)
    assert r.status_code == 201, r.text
    oid = r.json()["id"]
    # no care relationship, but its own record: readable
    assert client.get(f"/fhir/Observation/{oid}", headers=mis77).status_code == 200
    assert _seen(client, mis77) == {oid}
    # MO 40 treats A, so it reads it too, but may not change or delete it
    assert client.get(f"/fhir/Observation/{oid}", headers=mis40).status_code == 200
    changed = {**mine, "id": oid, "status": "amended"}
    assert client.put(f"/fhir/Observation/{oid}", json=changed, headers=mis40).status_code == 403
    assert client.delete(f"/fhir/Observation/{oid}", headers=mis40).status_code == 403
    assert client.put(f"/fhir/Observation/{oid}", json=changed, headers=mis77).status_code == 200
    # nor can it change a record another MO's system (or the hub) sent
    other = city["obs_a"][0]
    assert client.delete(f"/fhir/Observation/{other}", headers=mis40).status_code == 403
    # a record written in another MO's name is refused, in a transaction too
    forged = {**observation(city["a"], 1.0), "performer": [{"reference": "Organization/mo-12"}]}
    r = client.post("/fhir/Observation", json=forged, headers=mis40)
    assert r.status_code == 403 and "Organization/mo-12" in r.text
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": forged, "request": {"method": "POST", "url": "Observation"}}],
    }
    assert client.post("/fhir", json=bundle, headers=mis40).status_code == 403
    enc = encounter(city["a"], "mo-12")
    assert client.post("/fhir/Encounter", json=enc, headers=mis40).status_code == 403
    own = {**observation(city["a"], 2.0), "performer": [{"reference": "Organization/mo-40"}]}
    assert client.post("/fhir/Observation", json=own, headers=mis40).status_code == 201


def _condition(pid: str, icd10: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": icd10}]},
    }


def test_consent_can_close_one_sensitive_category(client, city) -> None:  # type: ignore[no-untyped-def]
    psy = post(client, _condition(city["a"], "F32.1"))
    flu = post(client, _condition(city["a"], "J10.1"))
    labels = [(s["system"], s["code"]) for s in psy["meta"].get("security", [])]
    assert labels == [("http://terminology.hl7.org/CodeSystem/v3-ActCode", "PSY")]
    assert "security" not in flu["meta"]
    consent = closing(city["a"], "deny", ["mo-12"])
    consent["provision"]["securityLabel"] = [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"}
    ]
    post(client, consent)
    mo12 = _as(client, "clinician", org="mo-12")
    mo40 = _as(client, "clinician", org="mo-40")
    found = client.get("/fhir/Condition?_total=accurate", headers=mo12).json()
    assert _ids(found) == {flu["id"]} and found["total"] == 1
    assert client.get(f"/fhir/Condition/{psy['id']}", headers=mo12).status_code == 403
    assert _seen(client, mo12) >= set(city["obs_a"])  # the rest of the record stays open
    assert _ids(client.get("/fhir/Condition", headers=mo40).json()) == {psy["id"], flu["id"]}
    # the patient sees their own
    me = _as(client, "patient", patient=city["golden_a"])
    assert _ids(client.get("/fhir/Condition", headers=me).json()) == {psy["id"], flu["id"]}


def _family(client) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """A mother, her 8-year-old son and her 17-year-old daughter, with RelatedPersons."""
    from hie.registries.identifiers import SNILS_SYSTEM
    from tests.fixtures.hl7v2 import snils

    mum_snils = snils("112233445")
    mum = post(
        client,
        {
            **person("Павлова", "Анна", "1985-03-04"),
            "identifier": [{"system": SNILS_SYSTEM, "value": mum_snils}],
        },
    )
    this_year = time.gmtime().tm_year
    son = post(client, person("Павлов", "Миша", f"{this_year - 8}-01-15", "male"))
    girl = post(client, person("Павлова", "Вера", f"{this_year - 17}-01-15"))
    out = {"mum": mum["id"], "son": son["id"], "girl": girl["id"]}
    for child in ("son", "girl"):
        rp = post(
            client,
            {
                "resourceType": "RelatedPerson",
                "active": True,
                "patient": {"reference": f"Patient/{out[child]}"},
                "identifier": [{"system": SNILS_SYSTEM, "value": mum_snils}],
                "relationship": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                                "code": "MTH",
                            }
                        ]
                    }
                ],
            },
        )
        out[f"rp_{child}"] = rp["id"]
        out[f"obs_{child}"] = post(client, observation(out[child], 125.0))["id"]
    return out


def test_a_parent_reads_a_young_childs_record_and_no_one_elses(client, city) -> None:  # type: ignore[no-untyped-def]
    fam = _family(client)
    as_mum_for = {
        k: _as(client, "patient", patient=fam[k], person=fam["mum"]) for k in ("son", "girl")
    }
    # the son is 8: his mother reads his record
    assert _seen(client, as_mum_for["son"]) == {fam["obs_son"]}
    # the daughter is 17: not without her consent
    r = client.get("/fhir/Observation", headers=as_mum_for["girl"])
    assert r.status_code == 403 and "proxy" in r.text
    permit = {
        **consent(fam["girl"]),
        "provision": {
            "type": "permit",
            "actor": [
                {
                    "role": {"text": "proxy"},
                    "reference": {"reference": f"RelatedPerson/{fam['rp_girl']}"},
                }
            ],
        },
    }
    post(client, permit)
    assert _seen(client, as_mum_for["girl"]) == {fam["obs_girl"]}
    # a proxy consent does not close the record to the MOs treating her
    post(client, encounter(fam["girl"], "mo-12"))
    assert fam["obs_girl"] in _seen(client, _as(client, "clinician", org="mo-12"))
    # someone else's child, or another patient, never
    stranger = _as(client, "patient", patient=fam["son"], person=city["a"])
    assert client.get("/fhir/Observation", headers=stranger).status_code == 403
    assert client.get(f"/fhir/Patient/{fam['son']}", headers=stranger).status_code == 403
