"""The HTTP application: FHIR API, health, metrics, request ids, errors as OperationOutcome.

``create_app(settings)`` builds everything from settings (tests build their own); later parts
(DICOMweb, portal, dashboards) add their routers here.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hie import __version__
from hie.fhir.admin_api import admin_router
from hie.fhir.api import FHIR_JSON, FhirApi, fhir_response
from hie.fhir.audit_api import audit_router
from hie.fhir.documents_api import documents_router
from hie.fhir.indexing import SearchIndexer
from hie.fhir.mpi_api import mpi_router
from hie.fhir.service import FhirService, error_outcome, outcome
from hie.fhir.terminology_api import terminology_router
from hie.hub import logging as hlog
from hie.hub.audit import AccessNote, AuditRecord, SqlAuditLog, current_access, record_of
from hie.hub.auth import (
    Principal,
    RateLimiter,
    TokenVerifier,
    TooManyRequests,
    Unauthenticated,
    current_principal,
    smart_configuration,
)
from hie.hub.errors import HieError
from hie.hub.outbox import LagGate
from hie.hub.runtime import Hub, open_hub, settle_process
from hie.hub.settings import Settings
from hie.pacs.dicomweb_api import dicomweb_router
from hie.registries.patient_index import attach_mpi

log = hlog.get_logger("hie.http")

REQUESTS = Counter("hie_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "hie_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
UNCHAINED = Gauge(
    "hie_audit_unchained_bytes",
    "Audit records written ahead and not yet chained, in bytes (SQLite; NaN if unreadable)",
)


class RequestContext:
    """ASGI middleware: a request id on every response and log line, metrics per route."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for k, v in scope.get("headers", []):
            if k == b"x-request-id":
                rid = v.decode("latin-1")[:64]
        rid = rid or uuid.uuid4().hex
        token = hlog.request_id.set(rid)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - started
            REQUESTS.labels(scope["method"], path, str(status)).inc()
            LATENCY.labels(scope["method"], path).observe(elapsed)
            if status >= 500:
                log.error("request failed", method=scope["method"], route=path, status=status)
            hlog.request_id.reset(token)


# Open without a token: the health probe, the CapabilityStatement (read by a client before it
# has a token) and the portal's login page.
OPEN_PATHS = frozenset(
    {"/healthz", "/fhir/metadata", "/fhir/.well-known/smart-configuration", "/portal/login"}
)
# Open by prefix: the image viewer's static files and pages (hie.pacs.viewer_api), which
# carry no patient data; they read studies through DICOMweb, which needs a token.
OPEN_PREFIXES = ("/viewer/",)


def is_open(path: str) -> bool:
    """Whether ``path`` is served without a token."""
    return path in OPEN_PATHS or path == "/viewer" or path.startswith(OPEN_PREFIXES)


class Authenticate:
    """ASGI middleware: every request but :data:`OPEN_PATHS` and :data:`OPEN_PREFIXES` (and
    ``/viewer`` itself) carries a bearer token that verifies
    (:class:`hie.hub.auth.TokenVerifier`); its principal is set for the request
    (``hie.hub.auth.current_principal``). A missing or bad token gets 401 with an
    OperationOutcome and ``WWW-Authenticate`` (RFC 6750 §3)."""

    def __init__(self, app: ASGIApp, verifier: TokenVerifier, limiter: RateLimiter) -> None:
        self.app = app
        self.verifier = verifier
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        header = None
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                header = v.decode("latin-1")
        client = scope.get("client")
        address = client[0] if client else "-"
        note = current_access.get()
        try:
            principal = self.verifier.cached(header)
            if principal is None:  # a signature check, or a JWKS fetch: off the event loop
                self.limiter.check(f"ip:{address}")  # floods of bad tokens cost little
                principal = await run_in_threadpool(self.verifier.verify_header, header)
            self.limiter.check(principal.subject)
        except Unauthenticated as exc:
            log.info("auth.refused", path=scope["path"], reason=exc.message)
            if note is not None:
                note.reason = exc.message
            await _refuse(send, exc, "invalid_token" if header else None)
            return
        except TooManyRequests as exc:
            if note is not None:
                note.reason = exc.message
            retry = str(max(1, math.ceil(exc.retry_after)))
            await _refuse(
                send, exc, None, challenge=False, extra=[(b"retry-after", retry.encode())]
            )
            return
        purpose = _header(scope, b"x-purpose-of-use")
        if purpose:  # declared per request (break-the-glass: ETREAT with a reason)
            reason = _header(scope, b"x-break-glass-reason")
            principal = replace(principal, purpose=purpose.strip(), purpose_reason=reason)
            if note is not None:
                note.purpose, note.reason = purpose.strip(), reason
        scope.setdefault("state", {})["principal"] = principal
        token = current_principal.set(principal)
        try:
            await self.app(scope, receive, send)
        finally:
            current_principal.reset(token)


def _header(scope: Scope, name: bytes) -> str | None:
    """A request header as text (UTF-8 where the client sent it, Latin-1 otherwise)."""
    for k, v in scope.get("headers", []):
        if k == name:
            try:
                return str(v.decode("utf-8")).strip() or None
            except UnicodeDecodeError:
                return str(v.decode("latin-1")).strip() or None
    return None


async def _refuse(
    send: Send,
    exc: HieError,
    error: str | None,
    *,
    challenge: bool = True,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = orjson.dumps(error_outcome(exc))
    headers = [
        (b"content-type", FHIR_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        *(extra or []),
    ]
    if challenge:
        text = 'Bearer realm="hie"'
        if error:
            why = exc.message.replace('"', "'")
            text += f', error="{error}", error_description="{why}"'
        headers.append((b"www-authenticate", text.encode("latin-1", "replace")))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# Not audited unless refused: health, metrics, discovery and API docs carry no patient data.
UNAUDITED = OPEN_PATHS | {"/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect"}


def _unaudited(path: str) -> bool:
    """Successful requests that leave no record: probes, docs, and the open pages and files
    of the viewer (no patient data; what they then read through DICOMweb is audited)."""
    return path in UNAUDITED or is_open(path)


_ACTIONS = {"GET": ("R", "read"), "HEAD": ("R", "read"), "POST": ("C", "create")}
_ACTIONS |= {"PUT": ("U", "update"), "PATCH": ("U", "patch"), "DELETE": ("D", "delete")}


class AuditTrail:
    """ASGI middleware: every request leaves one record in the audit trail, committed before
    its response starts (:mod:`hie.hub.audit`). If the trail cannot be written the caller
    gets 503 instead of the answer: nothing is served unaudited."""

    def __init__(
        self,
        app: ASGIApp,
        trail: SqlAuditLog,
        on_override: Callable[[Principal | None, AccessNote, AuditRecord], None] | None = None,
    ) -> None:
        self.app = app
        self.trail = trail
        self.on_override = on_override  # tells patients whose records an emergency opened

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        note = AccessNote()
        token = current_access.set(note)
        dropped = False

        async def send_audited(message: Message) -> None:
            nonlocal dropped
            if dropped:
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                if status >= 400 or not _unaudited(scope["path"]):
                    rec = _audit_record(scope, note, status)
                    try:
                        # an emergency access is numbered at once: the patient's notice links it
                        await self.trail.append_async(rec, numbered=bool(note.overridden))
                    except HieError as exc:
                        dropped = True
                        await _refuse(send, exc, None, challenge=False)
                        return
                    if note.overridden and status < 400 and self.on_override is not None:
                        principal = scope.get("state", {}).get("principal")
                        await run_in_threadpool(self.on_override, principal, note, rec)
            await send(message)

        try:
            await self.app(scope, receive, send_audited)
        finally:
            current_access.reset(token)


def _audit_record(scope: Scope, note: AccessNote, status: int) -> AuditRecord:
    principal: Principal | None = scope.get("state", {}).get("principal")
    method = scope["method"]
    action, subtype = _ACTIONS.get(method, ("E", method.lower()))
    qs = _without_tokens(scope.get("query_string", b"").decode("latin-1"))
    client = scope.get("client")
    return record_of(
        note,
        principal,
        action=action,
        subtype=subtype,
        outcome=0 if status < 400 else (4 if status < 500 else 8),
        status=status,
        method=method,
        path=scope["path"] + (f"?{qs}" if qs else ""),
        source=client[0] if client else None,
        request_id=hlog.request_id.get() or None,
    )


_TOKEN_PARAMS = frozenset({"token", "access_token"})


def _without_tokens(qs: str) -> str:
    """The query string with any bearer token in it blanked: a link may carry one (the
    viewer's), and the audit trail is kept for years and read by patients."""
    if "token=" not in qs:
        return qs
    pairs = parse_qsl(qs, keep_blank_values=True)
    return urlencode([(k, "(redacted)" if k in _TOKEN_PARAMS else v) for k, v in pairs])


def _unchained(trail: SqlAuditLog) -> Callable[[], float]:
    """The audit backlog as ``/metrics`` shows it: a trail that cannot be read shows NaN
    rather than failing the whole scrape."""

    def measure() -> float:
        try:
            return float(trail.unchained_bytes())
        except Exception:  # noqa: BLE001 - a gauge, not the trail's own error path
            return math.nan

    return measure


def app_from_env() -> FastAPI:
    """App factory for ``hie serve``'s HTTP worker processes (settings from ``HIE_*``).

    In multi-process mode the parent process runs the outbox worker, so these never do.
    """
    from hie.hub.settings import load_settings

    settings = load_settings()
    hlog.configure(settings.log_level, settings.log_format)
    app = create_app(settings, start_worker=False, index_gate=True)
    settle_process()
    return app


def background_work(hub: Hub) -> None:
    """Register what the worker process runs (once per hub): the full-text indexer and the
    critical-result alerts (outbox consumers), and the alert escalator and the ImagingStudy
    count refresher (jobs)."""
    from hie.hub.store.sql import SqlResourceStore
    from hie.lab_exchange.alerts import AlertEscalator, CriticalResultAlerts
    from hie.pacs.storage import SummaryRefresher

    names = {c.name for c in hub.consumers}
    svc = FhirService(hub.store, hub.settings, trail=hub.audit)  # the hub's own writes
    if "search-index" not in names and hub.settings.search_url:
        hub.add_consumers(
            [
                SearchIndexer(
                    hub.store,
                    lambda: hub.search_index,
                    blobs=lambda: hub.blobs,
                    max_body_bytes=hub.settings.max_document_bytes,
                    extract_processes=hub.settings.index_extract_processes,
                )
            ]
        )
    if CriticalResultAlerts.name not in names:
        hub.add_consumers([CriticalResultAlerts(hub.store, svc, hub.settings)])
        hub.add_jobs([AlertEscalator(hub.store, svc, hub.settings)])
        if isinstance(hub.store, SqlResourceStore):  # the DICOM index lives beside it
            hub.add_jobs([SummaryRefresher(svc, hub.settings.dicom_summary_seconds)])


def create_app(
    settings: Settings,
    hub: Hub | None = None,
    *,
    start_worker: bool | None = None,
    index_gate: bool | None = None,
) -> FastAPI:
    """Build the HTTP app over ``hub`` (opened from settings when not given).

    ``index_gate``: document writes wait for the full-text indexer when it falls behind
    (:class:`LagGate`). ``hie serve`` turns it on wherever the indexer runs (this process,
    the parent of its HTTP workers, or a separate ``hie worker``; with none at all, writes
    wait at most the gate's stall time once). Otherwise it is on when this app runs the
    outbox worker."""
    hub = hub or open_hub(settings)
    background_work(hub)
    run_worker = settings.worker if start_worker is None else start_worker
    gate = (
        LagGate(
            hub.store,
            SearchIndexer.name,
            settings.index_max_lag_seconds,
            settings.index_lag_wait_seconds,
            max_waiters=settings.index_lag_max_waiters,
        )
        if (run_worker if index_gate is None else index_gate) and settings.search_url
        else None
    )
    service = FhirService(
        hub.store,
        settings,
        search_index=lambda: hub.search_index,
        require_principal=settings.auth_enabled,
        trail=hub.audit,
        blobs=lambda: hub.blobs,
        index_gate=gate,
    )
    mpi = attach_mpi(service)
    UNCHAINED.set_function(_unchained(hub.audit))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if run_worker:
            hub.start_worker()
        yield
        hub.close()

    app = FastAPI(
        title="HIE hub",
        version=__version__,
        description="Regional health information exchange hub — FHIR R4 API",
        lifespan=lifespan,
    )
    app.state.hub = hub
    app.state.fhir = service

    @app.exception_handler(HieError)
    async def hie_error(_request: Request, exc: HieError) -> Response:
        if exc.status >= 500:
            log.error("hub error", code=exc.code, error=exc.message)
        return fhir_response(error_outcome(exc), exc.status, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> Response:
        code = (
            "not-found"
            if exc.status_code == 404
            else "not-supported"
            if exc.status_code == 405
            else "processing"
        )
        return fhir_response(outcome("error", code, str(exc.detail)), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return fhir_response(outcome("error", "invalid", str(exc.errors()[:3])), 400)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", error_type=type(exc).__name__)
        return fhir_response(
            outcome("fatal", "exception", "internal error; see the hub's log"), 500
        )

    @app.get("/healthz", include_in_schema=True)
    def healthz() -> dict[str, Any]:
        acked, newest = (0, 0)
        try:
            hub.store.read("Patient", "-healthz-")
            db = "ok"
            if hub.consumers:
                acked, newest = hub.store.outbox_position(hub.consumers[0].name)
        except HieError as exc:
            db = f"error: {exc.message}"
        return {
            "status": "ok" if db == "ok" else "degraded",
            "database": db,
            "outbox_lag": max(0, newest - acked),
            "version": __version__,
        }

    @app.get("/fhir/.well-known/smart-configuration", tags=["auth"])
    def smart_config() -> Response:
        """SMART App Launch discovery: where to get a token, what the hub accepts."""
        return Response(orjson.dumps(smart_configuration(settings)), media_type="application/json")

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(terminology_router(service, settings))  # before /fhir/{rtype}/{id}
    app.include_router(audit_router(service, hub.audit, settings))
    app.include_router(documents_router(service, settings))  # before /fhir/{rtype}/{id}
    app.include_router(
        admin_router(service, mpi, lambda: hub.rejected, settings, lambda: hub.blobs)
    )
    if mpi is not None:
        app.include_router(mpi_router(mpi, settings))
    app.include_router(dicomweb_router(service, hub, settings))
    app.include_router(FhirApi(service, settings).router)
    if settings.auth_enabled:
        limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
        app.add_middleware(Authenticate, verifier=TokenVerifier(settings), limiter=limiter)
        app.add_middleware(  # outside authentication: it sees refusals too
            AuditTrail, trail=hub.audit, on_override=service.notify_break_glass
        )
    app.add_middleware(RequestContext)
    return app
