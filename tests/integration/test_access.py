"""Access control over HTTP, on every resource-store backend: bearer tokens on every request,
the discovery documents open, refusals as OperationOutcome with ``WWW-Authenticate``."""

from __future__ import annotations

import time

import jwt
import pytest

from hie.hub.auth import DEV_ISSUER, DevTokenIssuer
from tests.fixtures.auth import bearer

FJ = {"Content-Type": "application/fhir+json"}


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
