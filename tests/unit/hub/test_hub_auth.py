"""Bearer tokens, SMART scopes and the principal (hie.hub.auth): every way a token can be bad."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hie.hub.auth import (
    DEV_ISSUER,
    DevTokenIssuer,
    DevTokensRefused,
    JwksSource,
    Scope,
    TokenVerifier,
    Unauthenticated,
    parse_scope,
    parse_scopes,
    principal_from_claims,
)
from hie.hub.settings import Settings, load_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "var")


# --- scopes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("patient/*.rs", Scope("patient", "*", frozenset("rs"))),
        ("user/Observation.rs", Scope("user", "Observation", frozenset("rs"))),
        ("system/*.cruds", Scope("system", "*", frozenset("cruds"))),
        ("patient/Observation.read", Scope("patient", "Observation", frozenset("rs"))),  # v1
        ("user/*.write", Scope("user", "*", frozenset("cud"))),
        ("user/*.*", Scope("user", "*", frozenset("cruds"))),
        ("openid", None),
        ("launch/patient", None),
        ("patient/Observation.rs?category=laboratory", None),  # granular: not honoured
        ("patient/*.sr", None),  # v2 letters keep their order
        ("patient/*.rrs", None),
        ("doctor/*.rs", None),
        ("patient/Obs-ervation.rs", None),
        ("patient/.rs", None),
    ],
)
def test_scope_parsing(text: str, expected: Scope | None) -> None:
    assert parse_scope(text) == expected


def test_scope_grants_by_type_and_letter() -> None:
    scopes = parse_scopes("openid patient/Observation.rs user/Consent.c")
    assert len(scopes) == 2
    obs, consent = scopes
    assert obs.grants("Observation", "r") and obs.grants("Observation", "s")
    assert not obs.grants("Observation", "c") and not obs.grants("Condition", "r")
    assert consent.grants("Consent", "c") and not consent.grants("Consent", "r")


def test_claims_become_a_principal_keycloak_style() -> None:
    p = principal_from_claims(
        {
            "sub": "u1",
            "iss": "https://kc/realms/spb",
            "azp": "hie-portal",
            "realm_access": {"roles": ["offline_access", "clinician"]},
            "resource_access": {"hie-portal": {"roles": ["radiologist"]}},
            "fhirUser": "https://hub/fhir/Practitioner/pr-7",
            "hie_org": "mo-12",
            "scope": "openid user/*.rs",
        }
    )
    assert p.roles == {"clinician", "radiologist"}  # unknown roles dropped
    assert p.practitioner == "pr-7" and p.org == "mo-12" and p.patient is None
    assert p.scope_allows("DiagnosticReport", "r") and not p.scope_allows("DiagnosticReport", "c")


# --- development tokens --------------------------------------------------------------------


def test_dev_token_round_trip(settings: Settings) -> None:
    issuer = DevTokenIssuer(settings)
    token = issuer.issue("patient", patient="p-1")
    p = TokenVerifier(settings).verify(token)
    assert p.roles == {"patient"} and p.patient == "p-1" and p.issuer == DEV_ISSUER
    assert p.scope_allows("Observation", "r") and p.scope_allows("Consent", "c")
    assert not p.scope_allows("Observation", "c")
    key = settings.data_dir / "keys" / "dev-token-signing.pem"
    assert key.stat().st_mode & 0o077 == 0  # readable by its owner only
    # the same key next time (a restarted hub still accepts the tokens it gave out)
    assert DevTokenIssuer(settings).kid == issuer.kid


def test_dev_tokens_are_refused_in_production(tmp_path: Path) -> None:
    prod = load_settings(data_dir=tmp_path, env="production", oidc_issuer="https://idp.example")
    with pytest.raises(DevTokensRefused):
        DevTokenIssuer(prod)


def test_unknown_role_is_refused(settings: Settings) -> None:
    with pytest.raises(ValueError, match="unknown role"):
        DevTokenIssuer(settings).issue("superuser")


# --- every way a token can be bad ----------------------------------------------------------


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    c = {
        "iss": DEV_ISSUER,
        "aud": "hie-hub",
        "sub": "s1",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "hie_roles": ["clinician"],
        "scope": "user/*.rs",
    }
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def _sign(settings: Settings, claims: dict[str, Any], **kw: Any) -> str:
    issuer = DevTokenIssuer(settings)
    return jwt.encode(claims, issuer._key, algorithm="ES256", headers={"kid": issuer.kid}, **kw)


def _refused(settings: Settings, token: str) -> str:
    with pytest.raises(Unauthenticated) as err:
        TokenVerifier(settings).verify(token)
    return err.value.message


def test_a_good_token_passes(settings: Settings) -> None:
    p = TokenVerifier(settings).verify(_sign(settings, _claims()))
    assert p.roles == {"clinician"} and p.subject == "s1"


def test_expired(settings: Settings) -> None:
    old = int(time.time()) - 3600
    assert "expired" in _refused(settings, _sign(settings, _claims(exp=old, iat=old - 60)))


def test_expired_within_the_clock_skew_still_passes(settings: Settings) -> None:
    just = int(time.time()) - 30  # the default skew is 60 s
    TokenVerifier(settings).verify(_sign(settings, _claims(exp=just)))


def test_skew_is_bounded(tmp_path: Path) -> None:
    lax = load_settings(data_dir=tmp_path, auth_clock_skew_seconds=86_400)
    old = int(time.time()) - 3600
    assert "expired" in _refused(lax, _sign(lax, _claims(exp=old, iat=old - 60)))


def test_not_yet_valid(settings: Settings) -> None:
    later = int(time.time()) + 3600
    assert "not valid yet" in _refused(settings, _sign(settings, _claims(nbf=later)))


def test_wrong_audience(settings: Settings) -> None:
    assert "not meant for this hub" in _refused(
        settings, _sign(settings, _claims(aud="another-api"))
    )


def test_wrong_issuer(settings: Settings) -> None:
    assert "issuer" in _refused(settings, _sign(settings, _claims(iss="https://evil.example")))


def test_missing_exp(settings: Settings) -> None:
    assert "'exp'" in _refused(settings, _sign(settings, _claims(exp=None)))


def test_no_known_role(settings: Settings) -> None:
    token = _sign(settings, _claims(hie_roles=["root"]))
    assert "no role" in _refused(settings, token)


def test_signed_by_another_key(settings: Settings) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    kid = DevTokenIssuer(settings).kid
    token = jwt.encode(_claims(), other, algorithm="ES256", headers={"kid": kid})
    assert "signature" in _refused(settings, token)


def test_unknown_key_id(settings: Settings) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(_claims(), other, algorithm="ES256", headers={"kid": "not-ours"})
    assert "development key" in _refused(settings, token)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_alg_none_is_refused(settings: Settings) -> None:
    head = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = _b64(json.dumps(_claims()).encode())
    assert "'none'" in _refused(settings, f"{head}.{body}.")


def test_hmac_with_the_public_key_is_refused(settings: Settings) -> None:
    # the classic key-confusion attack: HS256 keyed with the issuer's public key
    pub = (
        DevTokenIssuer(settings)
        ._key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(_claims()).encode())
    import hashlib
    import hmac

    sig = _b64(hmac.new(pub, f"{head}.{body}".encode(), hashlib.sha256).digest())
    assert "HS256" in _refused(settings, f"{head}.{body}.{sig}")


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "Bearer", "ey.ey.ey"])
def test_malformed(settings: Settings, garbage: str) -> None:
    assert _refused(settings, garbage)


def test_tampered_claims(settings: Settings) -> None:
    token = _sign(settings, _claims())
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["hie_roles"] = ["service"]
    forged = _b64(json.dumps(claims).encode())
    assert "signature" in _refused(settings, f"{head}.{forged}.{sig}")


def test_header_forms(settings: Settings) -> None:
    v = TokenVerifier(settings)
    token = _sign(settings, _claims())
    assert v.verify_header(f"Bearer {token}").subject == "s1"
    assert v.verify_header(f"bearer {token}").subject == "s1"
    for bad in (None, "", f"Basic {token}", "Bearer "):
        with pytest.raises(Unauthenticated):
            v.verify_header(bad)
    assert v.cached(f"Bearer {token}") is not None  # verified once, then a lookup


# --- an OIDC provider's JWKS, served over real HTTP ------------------------------------------


class _Provider:
    """A minimal OIDC provider: discovery document and JWKS, keys rotatable."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.jwks_hits = 0
        provider = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": provider.url, "jwks_uri": provider.url + "/jwks"}
                elif self.path == "/jwks":
                    provider.jwks_hits += 1
                    body = {"keys": [provider.jwk(k) for k in provider.keys]}
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def rotate(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self, kid: str) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[kid].public_key()))
        return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}

    def token(self, kid: str, **over: Any) -> str:
        claims = _claims(iss=self.url, **over)
        return jwt.encode(claims, self.keys[kid], algorithm="RS256", headers={"kid": kid})


@pytest.fixture
def provider() -> Iterator[_Provider]:
    p = _Provider()
    p.rotate("k1")
    yield p
    p.server.shutdown()


def test_tokens_verify_against_the_providers_jwks(tmp_path: Path, provider: _Provider) -> None:
    cfg = load_settings(data_dir=tmp_path, oidc_issuer=provider.url)
    v = TokenVerifier(cfg)
    assert v.verify(provider.token("k1")).issuer == provider.url
    # a development token is not the provider's
    dev = DevTokenIssuer(load_settings(data_dir=tmp_path)).issue("clinician")
    with pytest.raises(Unauthenticated):
        v.verify(dev)


def test_rotated_keys_are_fetched_once_when_a_new_kid_appears(
    tmp_path: Path, provider: _Provider
) -> None:
    clock = [1000.0]
    keys = JwksSource(provider.url, cache_seconds=300, clock=lambda: clock[0])
    cfg = load_settings(data_dir=tmp_path, oidc_issuer=provider.url)
    v = TokenVerifier(cfg, keys=keys)
    v.verify(provider.token("k1"))
    assert provider.jwks_hits == 1
    v.verify(provider.token("k1", sub="s2"))
    assert provider.jwks_hits == 1  # cached
    provider.rotate("k2")
    clock[0] += 60  # past the refetch interval for unknown key ids
    assert v.verify(provider.token("k2")).subject == "s1"
    assert provider.jwks_hits == 2
    # a forged kid does not make the hub hammer the provider
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(_claims(iss=provider.url), other, algorithm="RS256", headers={"kid": "x"})
    for _ in range(5):
        with pytest.raises(Unauthenticated):
            v.verify(forged)
    assert provider.jwks_hits == 2


def test_provider_outage_keeps_the_keys_it_had(tmp_path: Path, provider: _Provider) -> None:
    clock = [1000.0]
    keys = JwksSource(provider.url, cache_seconds=300, clock=lambda: clock[0])
    v = TokenVerifier(load_settings(data_dir=tmp_path, oidc_issuer=provider.url), keys=keys)
    v.verify(provider.token("k1"))
    provider.server.shutdown()
    provider.server.server_close()
    clock[0] += 3600  # the cache is stale, the provider is gone
    assert v.verify(provider.token("k1", sub="s3")).subject == "s3"


def test_no_provider_no_entry(tmp_path: Path) -> None:
    v = TokenVerifier(load_settings(data_dir=tmp_path, oidc_issuer="http://127.0.0.1:9"))
    with pytest.raises(Unauthenticated, match="unavailable"):
        v.verify(_sign(load_settings(data_dir=tmp_path), _claims(iss="http://127.0.0.1:9")))


# --- request floods ---------------------------------------------------------------------------


def test_rate_limiter_token_bucket() -> None:
    from hie.hub.auth import RateLimiter, TooManyRequests

    clock = [0.0]
    lim = RateLimiter(rate=2.0, burst=3.0, clock=lambda: clock[0])
    for _ in range(3):
        lim.check("a")
    with pytest.raises(TooManyRequests) as err:
        lim.check("a")
    assert err.value.status == 429 and 0 < err.value.retry_after <= 0.5
    lim.check("b")  # another principal has its own bucket
    clock[0] += 0.5  # one token back at 2/s
    lim.check("a")
    with pytest.raises(TooManyRequests):
        lim.check("a")
    assert RateLimiter(rate=0, burst=0).check("x") is None  # 0 disables


def test_smart_configuration_names_the_providers_endpoints(
    tmp_path: Path, provider: _Provider
) -> None:
    from hie.hub.auth import smart_configuration

    conf = smart_configuration(load_settings(data_dir=tmp_path, oidc_issuer=provider.url))
    assert conf["issuer"] == provider.url and conf["jwks_uri"] == provider.url + "/jwks"
    gone = smart_configuration(load_settings(data_dir=tmp_path, oidc_issuer="http://127.0.0.1:9"))
    assert "jwks_uri" not in gone and gone["capabilities"]  # provider down: what we know
