"""FHIR R4 REST over HTTP (FastAPI): maps HTTP to :class:`FhirService` and back.

Every response is ``application/fhir+json``; every error is an OperationOutcome with the
status of its :class:`~hie.hub.errors.HieError`. Bodies are read with a size limit while they
stream in; stored JSON goes out as is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from hie.fhir.binary_api import binary_routes
from hie.fhir.capability import capability_statement
from hie.fhir.dates import format_http_date, parse_http_date
from hie.fhir.service import FhirService, WriteResult, outcome
from hie.hub.errors import (
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from hie.hub.settings import Settings
from hie.hub.store.port import StoredResource

FHIR_JSON = "application/fhir+json; charset=utf-8"
JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
PATCH_TYPES = ("application/json-patch+json",)
LARGE_BODY_TYPES = ("Binary", "DocumentReference", "Bundle")
T = TypeVar("T")


def fhir_response(
    body: bytes | dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A FHIR JSON response."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(data, status_code=status, media_type=FHIR_JSON, headers=headers)


def _version_headers(stored: StoredResource, base: str) -> dict[str, str]:
    return {
        "ETag": f'W/"{stored.version}"',
        "Last-Modified": format_http_date(stored.last_updated),
        "Content-Location": f"{base}/{stored.resource_type}/{stored.id}/_history/{stored.version}",
    }


def _if_match(request: Request) -> int | None:
    raw = request.headers.get("if-match")
    if not raw:
        return None
    value = raw.strip().removeprefix("W/").strip('"')
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise InvalidRequest(f'If-Match {raw!r} is not a version ETag like W/"3"')
    return int(value)


async def read_json_body(
    request: Request, limit: int, allowed: tuple[str, ...] = JSON_TYPES, what: str = "a resource"
) -> Any:
    """Check the media type, stream the body in within ``limit`` bytes and parse the JSON."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in allowed:
        raise UnsupportedMediaType(
            f"Content-Type {ctype or '(none)'!r} is not supported; use {allowed[0]}"
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise InvalidRequest(f"the request body is empty (expected {what})")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None


def query_items(request: Request) -> list[tuple[str, str]]:
    """The URL's query items in order; a NUL character anywhere is refused."""
    return _no_nul(list(request.query_params.multi_items()))


def _no_nul(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if any("\x00" in k or "\x00" in v for k, v in items):
        raise InvalidRequest("the query contains a NUL character")
    return items


def _prefer(request: Request, key: str) -> str | None:
    for part in request.headers.get("prefer", "").split(";"):
        for item in part.split(","):
            k, _, v = item.strip().partition("=")
            if k.strip() == key:
                return v.strip().strip('"')
    return None


class FhirApi:
    """Holds the service and settings the FHIR routes use."""

    def __init__(self, service: FhirService, settings: Settings) -> None:
        self.svc = service
        self.settings = settings
        self.router = APIRouter(prefix="/fhir")
        self._routes()

    # --- helpers ---------------------------------------------------------------------------

    def base(self, request: Request) -> str:
        """The FHIR base URL as the client sees it."""
        if self.settings.base_url:
            return self.settings.base_url.rstrip("/") + "/fhir"
        return str(request.base_url).rstrip("/") + "/fhir"

    async def body(self, request: Request, resource_type: str | None, patch: bool = False) -> Any:
        """Read and parse a JSON body within the configured limit."""
        limit = (
            self.settings.max_document_bytes
            if resource_type in LARGE_BODY_TYPES or resource_type is None
            else self.settings.max_body_bytes
        )
        return await read_json_body(request, limit, PATCH_TYPES if patch else JSON_TYPES)

    @staticmethod
    async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking service code in the thread pool."""
        return await run_in_threadpool(fn, *args, **kwargs)

    def _written(self, request: Request, res: WriteResult, base: str) -> Response:
        headers = _version_headers(res.stored, base)
        if res.created:
            headers["Location"] = headers["Content-Location"]
        pref = _prefer(request, "return")
        if pref == "minimal":
            return Response(status_code=res.status, headers=headers)
        if pref == "OperationOutcome":
            st = res.stored
            oo = outcome(
                "information",
                "informational",
                f"{st.resource_type}/{st.id} is version {st.version}",
            )
            return fhir_response(oo, res.status, headers)
        return fhir_response(res.stored.content or b"{}", res.status, headers)

    @staticmethod
    def _lenient(request: Request) -> bool:
        return _prefer(request, "handling") == "lenient"

    # --- routes ----------------------------------------------------------------------------

    def _routes(self) -> None:  # noqa: C901 - one place lists every route
        r = self.router
        svc = self.svc
        binary_routes(self)  # before the generic /{rtype} routes

        @r.get("/metadata")
        async def metadata(request: Request) -> Response:
            return fhir_response(capability_statement(self.base(request), self.settings))

        @r.post("")
        async def system_bundle(request: Request) -> Response:
            bundle = await self.body(request, None)
            kind = bundle.get("type") if isinstance(bundle, dict) else None
            base = self.base(request)
            if kind == "batch":
                return fhir_response(await self.run(svc.batch, bundle, base))
            return fhir_response(await self.run(svc.transaction, bundle, base))

        @r.get("")
        async def system_search(request: Request) -> Response:
            items = query_items(request)
            body = await self.run(
                svc.search, None, items, self.base(request), lenient=self._lenient(request)
            )
            return fhir_response(body)

        @r.get("/_history")
        async def system_history(request: Request) -> Response:
            items = query_items(request)
            return fhir_response(await self.run(svc.history, None, None, items, self.base(request)))

        @r.get("/Patient/{id}/$everything")
        @r.post("/Patient/{id}/$everything")
        async def everything(request: Request, id: str) -> Response:
            items = query_items(request)
            return fhir_response(await self.run(svc.everything, id, items, self.base(request)))

        @r.post("/{rtype}/$validate")
        async def validate_type(request: Request, rtype: str) -> Response:
            res = await self.body(request, rtype)
            return fhir_response(await self.run(svc.validate_only, res, rtype))

        @r.post("/{rtype}/{id}/$validate")
        async def validate_instance(request: Request, rtype: str, id: str) -> Response:
            del id
            res = await self.body(request, rtype)
            return fhir_response(await self.run(svc.validate_only, res, rtype))

        @r.get("/{rtype}/_history")
        async def type_history(request: Request, rtype: str) -> Response:
            items = query_items(request)
            return fhir_response(
                await self.run(svc.history, rtype, None, items, self.base(request))
            )

        async def do_search(request: Request, rtype: str, items: list[tuple[str, str]]) -> Response:
            body = await self.run(
                svc.search, rtype, items, self.base(request), lenient=self._lenient(request)
            )
            return fhir_response(body)

        @r.get("/{rtype}")
        async def search_type(request: Request, rtype: str) -> Response:
            return await do_search(request, rtype, query_items(request))

        @r.post("/{rtype}/_search")
        async def search_post(request: Request, rtype: str) -> Response:
            ctype = request.headers.get("content-type", "").split(";")[0].strip()
            if ctype != "application/x-www-form-urlencoded":
                raise UnsupportedMediaType("POST _search takes application/x-www-form-urlencoded")
            form = await request.form()
            items = query_items(request) + [(k, str(v)) for k, v in form.multi_items()]
            return await do_search(request, rtype, _no_nul(items))

        @r.get("/{rtype}/_search")
        async def search_get(request: Request, rtype: str) -> Response:
            return await do_search(request, rtype, query_items(request))

        @r.post("/{rtype}")
        async def create(request: Request, rtype: str) -> Response:
            res = await self.body(request, rtype)
            out = await self.run(svc.create, res, rtype, request.headers.get("if-none-exist"))
            return self._written(request, out, self.base(request))

        @r.put("/{rtype}")
        async def conditional_update(request: Request, rtype: str) -> Response:
            items = query_items(request)
            if not items:
                raise InvalidRequest("PUT on a type needs search criteria (conditional update)")
            res = await self.body(request, rtype)
            out = await self.run(svc.conditional_update, res, rtype, items)
            return self._written(request, out, self.base(request))

        @r.delete("/{rtype}")
        async def conditional_delete(request: Request, rtype: str) -> Response:
            items = query_items(request)
            if not items:
                raise InvalidRequest("DELETE on a type needs search criteria")
            n = await self.run(svc.conditional_delete, rtype, items)
            return fhir_response(
                outcome("information", "informational", f"deleted {n} resource(s)")
            )

        @r.get("/{rtype}/{id}")
        async def read(request: Request, rtype: str, id: str) -> Response:
            stored = await self.run(svc.read, rtype, id)
            headers = _version_headers(stored, self.base(request))
            inm = request.headers.get("if-none-match")
            if inm and inm.strip() in (headers["ETag"], f'"{stored.version}"'):
                return Response(status_code=304, headers=headers)
            ims = request.headers.get("if-modified-since")
            if ims:
                since = parse_http_date(ims)
                if since is not None and stored.last_updated // 1_000_000 <= since // 1_000_000:
                    return Response(status_code=304, headers=headers)
            summary = request.query_params.get("_summary")
            elements = request.query_params.get("_elements")
            if summary or elements:
                from hie.fhir.service import content_json, shape

                body = shape(
                    content_json(stored),
                    None if summary == "false" else summary,
                    elements.split(",") if elements else None,
                )
                return fhir_response(body, headers=headers)
            return fhir_response(stored.content or b"{}", headers=headers)

        @r.put("/{rtype}/{id}")
        async def update(request: Request, rtype: str, id: str) -> Response:
            res = await self.body(request, rtype)
            out = await self.run(svc.update, res, rtype, id, _if_match(request))
            return self._written(request, out, self.base(request))

        @r.patch("/{rtype}/{id}")
        async def patch(request: Request, rtype: str, id: str) -> Response:
            ops = await self.body(request, rtype, patch=True)
            out = await self.run(svc.patch, ops, rtype, id, _if_match(request))
            return self._written(request, out, self.base(request))

        @r.delete("/{rtype}/{id}")
        async def delete(request: Request, rtype: str, id: str) -> Response:
            stored = await self.run(svc.delete, rtype, id)
            headers = {"ETag": f'W/"{stored.version}"'} if stored else {}
            if _prefer(request, "return") == "OperationOutcome":
                return fhir_response(
                    outcome("information", "informational", f"{rtype}/{id} deleted"),
                    headers=headers,
                )
            return Response(status_code=204, headers=headers)

        @r.get("/{rtype}/{id}/_history")
        async def instance_history(request: Request, rtype: str, id: str) -> Response:
            items = query_items(request)
            return fhir_response(await self.run(svc.history, rtype, id, items, self.base(request)))

        @r.get("/{rtype}/{id}/_history/{vid}")
        async def vread(request: Request, rtype: str, id: str, vid: str) -> Response:
            stored = await self.run(svc.vread, rtype, id, vid)
            headers = _version_headers(stored, self.base(request))
            return fhir_response(stored.content or b"{}", headers=headers)
