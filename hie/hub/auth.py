"""Who is calling: bearer tokens (OAuth2 JWT), SMART on FHIR scopes, the principal.

Every HTTP request carries ``Authorization: Bearer <JWT>``. :class:`TokenVerifier` checks it:

- the signature, with a key from the issuer's JWKS (``HIE_OIDC_ISSUER``: its
  ``/.well-known/openid-configuration`` names the ``jwks_uri``), cached for
  ``HIE_OIDC_JWKS_CACHE_SECONDS`` and fetched again, at most every
  :data:`JWKS_REFETCH_SECONDS`, when a token names a key id the cache lacks (the issuer
  rotated its keys); without an issuer (development) with the local key
  :class:`DevTokenIssuer` keeps in the data dir;
- only asymmetric algorithms (RS/PS/ES); ``alg: none`` and HMAC are refused before anything
  else, so a public key can never be used as an HMAC secret;
- ``iss``, ``aud`` (``HIE_OIDC_AUDIENCE``), ``exp`` (required), ``nbf`` and ``iat`` with a
  clock skew of ``HIE_AUTH_CLOCK_SKEW_SECONDS``, never more than :data:`MAX_SKEW_SECONDS`.

The claims become a :class:`Principal`: its roles (``hie_roles``/``roles``/``role``, or a
Keycloak token's ``realm_access.roles``), its MO (``hie_org``), practitioner and patient (SMART
``fhirUser`` and ``patient`` launch context) and its SMART scopes (v2 ``patient/*.rs``,
``user/Observation.rs``, ``system/*.cruds``; v1 ``.read``/``.write``/``.*`` understood).
What a principal may then do is the policy's business (:mod:`hie.hub.policy`).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hie.hub.errors import HieError
from hie.hub.logging import get_logger
from hie.hub.settings import Settings

log = get_logger("hie.auth")

ROLES = ("mis", "clinician", "radiologist", "patient", "official", "admin", "service")
# Asymmetric only: with HMAC allowed, a token "signed" with the issuer's public key would pass.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
MAX_SKEW_SECONDS = 300
JWKS_REFETCH_SECONDS = 30.0  # an unknown key id fetches the JWKS again, at most this often
DEV_ISSUER = "urn:hie:development"
DEV_KEY_FILE = "keys/dev-token-signing.pem"
PERMISSIONS = "cruds"  # SMART v2: create, read, update, delete, search


class Unauthenticated(HieError):
    """No token, or a token that does not verify (HTTP 401 with ``WWW-Authenticate``)."""

    code = "HIE-1101"
    status = 401
    issue = "login"


class Forbidden(HieError):
    """A verified principal asking for what it may not have (HTTP 403)."""

    code = "HIE-1102"
    status = 403
    issue = "forbidden"


class DevTokensRefused(HieError):
    """``hie token`` in production: tokens come from the identity provider there."""

    code = "HIE-1103"
    status = 403
    issue = "forbidden"


# --- SMART scopes --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scope:
    """One SMART resource scope: ``context/ResourceType.permissions``."""

    context: str  # patient | user | system
    resource_type: str  # a type or "*"
    permissions: frozenset[str]  # letters of "cruds"

    def grants(self, resource_type: str, permission: str) -> bool:
        """Whether this scope allows ``permission`` (one of c r u d s) on ``resource_type``."""
        return permission in self.permissions and self.resource_type in ("*", resource_type)


_V1 = {"read": "rs", "write": "cud", "*": "cruds"}


def parse_scope(text: str) -> Scope | None:
    """A resource scope from its text, or None for other scopes (``openid``, ``launch``,
    ``offline_access``) and for ones this hub does not grant: SMART v2 granular scopes with a
    query (``?category=…``) are not honoured, so they grant nothing rather than everything."""
    context, slash, rest = text.partition("/")
    if not slash or context not in ("patient", "user", "system") or "?" in rest:
        return None
    rtype, dot, perms = rest.rpartition(".")
    if not dot or not rtype or not (rtype == "*" or rtype.isalnum()):
        return None
    letters = _V1.get(perms, perms)
    # v2 permissions are a subset of "cruds" in that order
    if (
        not letters
        or any(c not in PERMISSIONS for c in letters)
        or len(set(letters)) != len(letters)
    ):
        return None
    if "".join(sorted(letters, key=PERMISSIONS.index)) != letters:
        return None
    return Scope(context, rtype, frozenset(letters))


def parse_scopes(value: str | Iterable[str] | None) -> tuple[Scope, ...]:
    """Every resource scope in a ``scope`` claim (space-separated text or a list)."""
    if value is None:
        return ()
    items = value.split() if isinstance(value, str) else [str(v) for v in value]
    return tuple(s for s in (parse_scope(i) for i in items) if s is not None)


# --- the principal ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as the verified token (or a registered MLLP/DICOM peer) says."""

    subject: str
    roles: frozenset[str]
    org: str | None = None  # Organization id of the caller's MO
    practitioner: str | None = None  # Practitioner id
    patient: str | None = None  # Patient id in context (role patient: whose record this is)
    person: str | None = None  # the caller's own Patient id (fhirUser), when a patient
    scopes: tuple[Scope, ...] = ()
    client_id: str | None = None
    issuer: str = ""
    token_id: str | None = None
    name: str | None = None
    expires: int | None = None
    purpose: str | None = None  # purpose of use declared for this request (ETREAT: emergency)
    purpose_reason: str | None = None  # the reason declared with it (break-the-glass)
    claims: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def has_role(self, *roles: str) -> bool:
        """Whether the principal holds any of ``roles``."""
        return any(r in self.roles for r in roles)

    def scope_allows(self, resource_type: str, permission: str) -> bool:
        """Whether some granted scope covers ``permission`` on ``resource_type``."""
        return any(s.grants(resource_type, permission) for s in self.scopes)

    @property
    def who(self) -> str:
        """A short description for logs and audit (no names)."""
        parts = [self.subject, "/".join(sorted(self.roles)) or "no-role"]
        if self.org:
            parts.append(f"org={self.org}")
        return " ".join(parts)


current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "hie_principal", default=None
)

# The hub itself, for in-process work on a service that requires a principal (maintenance
# jobs, tests of the FHIR service): the trusted ``service`` role.
HUB = Principal(
    subject="hie-hub",
    roles=frozenset({"service"}),
    scopes=(Scope("system", "*", frozenset(PERMISSIONS)),),
    issuer="internal",
)


@contextlib.contextmanager
def acting_as(principal: Principal) -> Iterator[Principal]:
    """Run the enclosed code as ``principal`` (what the HTTP middleware does per request)."""
    token = current_principal.set(principal)
    try:
        yield principal
    finally:
        current_principal.reset(token)


def _claim_roles(claims: dict[str, Any], client_id: str | None) -> frozenset[str]:
    found: list[str] = []
    for name in ("hie_roles", "roles", "role"):
        value = claims.get(name)
        if isinstance(value, str):
            found.extend(value.split())
        elif isinstance(value, list):
            found.extend(str(v) for v in value)
    realm = claims.get("realm_access")
    if isinstance(realm, dict) and isinstance(realm.get("roles"), list):
        found.extend(str(v) for v in realm["roles"])
    resource = claims.get("resource_access")
    if client_id and isinstance(resource, dict):
        mine = resource.get(client_id)
        if isinstance(mine, dict) and isinstance(mine.get("roles"), list):
            found.extend(str(v) for v in mine["roles"])
    return frozenset(r for r in found if r in ROLES)


def _ref_id(value: Any, rtype: str) -> str | None:
    """``Practitioner/12`` (or a full URL ending so) → ``12``, else None."""
    if not isinstance(value, str):
        return None
    head, _, ident = value.rstrip("/").rpartition("/")
    return ident if head.endswith(rtype) and ident else None


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    """The principal a verified token's claims describe."""
    client_id = claims.get("azp") or claims.get("client_id")
    fhir_user = claims.get("fhirUser")
    patient = claims.get("patient") or _ref_id(fhir_user, "Patient")
    practitioner = claims.get("practitioner") or _ref_id(fhir_user, "Practitioner")
    scopes = parse_scopes(claims.get("scope") if "scope" in claims else claims.get("scp"))
    return Principal(
        subject=str(claims.get("sub") or ""),
        roles=_claim_roles(claims, str(client_id) if client_id else None),
        org=str(claims["hie_org"]) if claims.get("hie_org") else None,
        practitioner=str(practitioner) if practitioner else None,
        patient=str(patient) if patient else None,
        person=_ref_id(fhir_user, "Patient"),
        scopes=scopes,
        client_id=str(client_id) if client_id else None,
        issuer=str(claims.get("iss") or ""),
        token_id=str(claims["jti"]) if claims.get("jti") else None,
        name=str(claims["name"]) if claims.get("name") else None,
        expires=int(claims["exp"]) if isinstance(claims.get("exp"), int) else None,
        claims=claims,
    )


# --- keys ------------------------------------------------------------------------------------


class DevTokenIssuer:
    """Development tokens (``hie token``) signed with an ES256 key kept in the data dir
    (created on first use, readable by its owner only). Refused in production."""

    def __init__(self, settings: Settings) -> None:
        if settings.env == "production":
            raise DevTokensRefused(
                "development tokens are refused when HIE_ENV=production; "
                "get a token from the identity provider (HIE_OIDC_ISSUER)"
            )
        self.settings = settings
        self.path = settings.data_dir / DEV_KEY_FILE
        self._key = _load_or_create_key(self.path)
        self.kid = _kid(self._key.public_key())

    def jwks(self) -> dict[str, Any]:
        """The public half as a JWKS."""
        return {"keys": [_public_jwk(self._key.public_key(), self.kid)]}

    def issue(
        self,
        role: str | Iterable[str],
        *,
        org: str | None = None,
        practitioner: str | None = None,
        patient: str | None = None,
        person: str | None = None,
        scope: str | None = None,
        subject: str | None = None,
        ttl: int = 3600,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """A signed token; ``scope`` defaults to what the role is meant to use. ``person``:
        the caller's own Patient record when it differs from ``patient`` (a proxy: a parent
        opening a child's record)."""
        roles = [role] if isinstance(role, str) else list(role)
        unknown = [r for r in roles if r not in ROLES]
        if unknown or not roles:
            raise ValueError(f"unknown role {unknown or roles}; roles are {', '.join(ROLES)}")
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": DEV_ISSUER,
            "aud": self.settings.oidc_audience,
            "sub": subject or f"dev-{roles[0]}-{secrets.token_hex(4)}",
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": secrets.token_hex(12),
            "hie_roles": roles,
            "scope": scope or default_scope(roles),
            "azp": "hie-dev",
        }
        if org:
            claims["hie_org"] = org
        if practitioner:
            claims["fhirUser"] = f"Practitioner/{practitioner}"
        if patient:
            claims["patient"] = patient
            claims.setdefault("fhirUser", f"Patient/{person or patient}")
        claims.update(extra or {})
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid})


def default_scope(roles: Iterable[str]) -> str:
    """The SMART scopes a development token of ``roles`` gets unless told otherwise."""
    by_role = {
        "patient": "openid fhirUser launch/patient patient/*.rs patient/Consent.cruds "
        "patient/DocumentReference.cru patient/Binary.cr",
        "mis": "system/*.cruds",
        "clinician": "openid fhirUser user/*.rs",
        "radiologist": "openid fhirUser user/*.rs",
        "official": "user/*.s",
        "admin": "system/*.cruds",
        "service": "system/*.cruds",
    }
    seen: dict[str, None] = {}
    for r in roles:
        for s in by_role.get(r, "").split():
            seen[s] = None
    return " ".join(seen)


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC private key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # first writer wins when two processes start at once
    except FileExistsError:
        tmp.unlink()
        return _load_or_create_key(path)
    tmp.unlink()
    return key


def _public_jwk(pub: ec.EllipticCurvePublicKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(pub))
    return {**jwk, "kid": kid, "use": "sig", "alg": "ES256"}


def _kid(pub: ec.EllipticCurvePublicKey) -> str:
    der = pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


class JwksSource:
    """The issuer's signing keys, fetched from its JWKS and cached (see module docstring)."""

    def __init__(
        self,
        issuer: str,
        *,
        cache_seconds: float = 300.0,
        fetch: Callable[[str], dict[str, Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.cache_seconds = cache_seconds
        self._fetch = fetch or _http_json
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, Any] = {}
        self._fetched = float("-inf")
        self._jwks_uri: str | None = None

    def key(self, kid: str | None) -> Any:
        """The public key for ``kid`` (the only key when the token names none)."""
        now = self._clock()
        with self._lock:
            stale = now - self._fetched > self.cache_seconds
            missing = self._lookup(kid) is None
            if stale or (missing and now - self._fetched > JWKS_REFETCH_SECONDS):
                self._refresh(now)
            found = self._lookup(kid)
        if found is None:
            raise Unauthenticated(
                f"the token's signing key {kid or '(no kid)'} is not the issuer's"
            )
        return found

    def _lookup(self, kid: str | None) -> Any:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def _refresh(self, now: float) -> None:
        try:
            if self._jwks_uri is None:
                conf = self._fetch(f"{self.issuer}/.well-known/openid-configuration")
                self._jwks_uri = str(conf["jwks_uri"])
            jwks = self._fetch(self._jwks_uri)
            keys = {}
            for i, jwk in enumerate(jwks.get("keys") or []):
                if jwk.get("use", "sig") != "sig":
                    continue
                keys[str(jwk.get("kid") or i)] = jwt.PyJWK(jwk).key
        except (httpx.HTTPError, KeyError, ValueError, jwt.PyJWTError) as exc:
            log.warning("auth.jwks.unavailable", issuer=self.issuer, error=str(exc)[:200])
            self._fetched = now - self.cache_seconds + JWKS_REFETCH_SECONDS  # retry soon
            if not self._keys:
                raise Unauthenticated("the identity provider's keys are unavailable") from None
            return  # keep the keys we had: a brief provider outage must not log everyone out
        self._keys = keys
        self._fetched = now
        log.info("auth.jwks.fetched", issuer=self.issuer, keys=len(keys))


SMART_CAPABILITIES = (
    "launch-standalone",
    "client-public",
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "context-standalone-patient",
    "permission-patient",
    "permission-user",
    "permission-v1",
    "permission-v2",
    "sso-openid-connect",
)


_DISCOVERY: dict[str, tuple[float, dict[str, Any]]] = {}  # issuer → (fetched, document)


def smart_configuration(
    settings: Settings, fetch: Callable[[str], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The SMART App Launch discovery document (``/.well-known/smart-configuration``): the
    identity provider's endpoints (read from its OpenID configuration) and what this hub
    accepts. Without an issuer (development) there is no authorization server: tokens come
    from ``hie token``."""
    doc: dict[str, Any] = {
        "issuer": settings.oidc_issuer or DEV_ISSUER,
        "scopes_supported": [
            "openid",
            "fhirUser",
            "launch/patient",
            "offline_access",
            "patient/*.rs",
            "user/*.rs",
            "system/*.cruds",
        ],
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "client_credentials"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
        "capabilities": list(SMART_CAPABILITIES),
    }
    if not settings.oidc_issuer:
        return doc
    issuer = settings.oidc_issuer.rstrip("/")
    hit = _DISCOVERY.get(issuer)
    if hit is not None and time.monotonic() - hit[0] < settings.oidc_jwks_cache_seconds:
        conf = hit[1]  # an open endpoint must not make the hub call the provider each time
    else:
        try:
            conf = (fetch or _http_json)(f"{issuer}/.well-known/openid-configuration")
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("auth.discovery.unavailable", error=str(exc)[:200])
            return doc
        _DISCOVERY[issuer] = (time.monotonic(), conf)
    for key in (
        "jwks_uri",
        "authorization_endpoint",
        "token_endpoint",
        "introspection_endpoint",
        "revocation_endpoint",
        "userinfo_endpoint",
    ):
        if conf.get(key):
            doc[key] = conf[key]
    return doc


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def _http_json(url: str) -> dict[str, Any]:
    r = httpx.get(url, timeout=5.0, follow_redirects=False)
    r.raise_for_status()
    data = r.json()
    if not isinstance(data, dict):
        raise ValueError(f"{url} did not return a JSON object")
    return data


class _DevKeySource:
    def __init__(self, issuer: DevTokenIssuer) -> None:
        self._pub = issuer._key.public_key()
        self.kid = issuer.kid

    def key(self, kid: str | None) -> Any:
        if kid not in (None, self.kid):
            raise Unauthenticated("the token is not signed with this hub's development key")
        return self._pub


# --- verification ----------------------------------------------------------------------------


class TokenVerifier:
    """Bearer token → :class:`Principal` (see module docstring). Verified tokens are kept
    until they expire (at most :attr:`CACHE_SIZE`), so a client's repeated calls cost one
    dictionary lookup rather than a signature check."""

    CACHE_SIZE = 10_000

    def __init__(self, settings: Settings, keys: Any | None = None) -> None:
        self.settings = settings
        self.audience = settings.oidc_audience
        self.skew = max(0, min(settings.auth_clock_skew_seconds, MAX_SKEW_SECONDS))
        if keys is not None:
            self.keys = keys
            self.issuer = settings.oidc_issuer or DEV_ISSUER
        elif settings.oidc_issuer:
            self.keys = JwksSource(
                settings.oidc_issuer, cache_seconds=settings.oidc_jwks_cache_seconds
            )
            self.issuer = settings.oidc_issuer
        else:
            self.keys = _DevKeySource(DevTokenIssuer(settings))
            self.issuer = DEV_ISSUER
        self._cache: OrderedDict[str, Principal] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, authorization: str | None) -> Principal | None:
        """The principal of an already verified, unexpired token in ``authorization``."""
        if not authorization or not authorization[:7].lower() == "bearer ":
            return None
        digest = _digest(authorization[7:].strip())
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and hit.expires is not None and hit.expires + self.skew > time.time():
            return hit
        return None

    def verify_header(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header value."""
        if not authorization:
            raise Unauthenticated("this request needs a bearer token (Authorization: Bearer …)")
        kind, _, token = authorization.strip().partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
        return self.verify(token.strip())

    def verify(self, token: str) -> Principal:
        """The principal of a JWT, or :class:`Unauthenticated` saying why not."""
        digest = _digest(token)
        now = time.time()
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None and hit.expires is not None and hit.expires + self.skew > now:
                self._cache.move_to_end(digest)
                return hit
        principal = self._verify(token)
        with self._lock:
            self._cache[digest] = principal
            while len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
        return principal

    def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("the bearer token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise Unauthenticated(
                f"the token's algorithm {alg!r} is not accepted (only {', '.join(ALGORITHMS)})"
            )
        key = self.keys.key(header.get("kid"))
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.skew,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                f"the token is not meant for this hub (aud != {self.audience})"
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"the token's issuer is not {self.issuer}") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the token's signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"the token lacks the {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the token is not valid: {exc}") from None
        principal = principal_from_claims(claims)
        if not principal.roles:
            raise Unauthenticated(
                f"the token carries no role this hub knows (one of {', '.join(ROLES)})"
            )
        return principal


# --- request floods --------------------------------------------------------------------------


class TooManyRequests(HieError):
    """A principal (or an address that fails to authenticate) over its request rate."""

    code = "HIE-1104"
    status = 429
    issue = "throttled"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimiter:
    """A token bucket per key (a principal's subject, or ``ip:<address>`` for callers that
    fail to authenticate): ``rate`` requests per second on average, bursts of ``burst``.
    Per process; idle buckets are forgotten."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, at)
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        """Take one request from ``key``'s bucket, or raise :class:`TooManyRequests`."""
        if self.rate <= 0:
            return
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise TooManyRequests(
                    f"too many requests; retry after {wait:.1f} s", retry_after=wait
                )
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > 100_000:  # forget full (idle) buckets
                full = [k for k, (t, _) in self._buckets.items() if t >= self.burst - 1]
                for k in full:
                    del self._buckets[k]
