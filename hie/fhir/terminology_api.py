"""The FHIR terminology operations over HTTP: ``CodeSystem/$lookup``, ``$validate-code`` (on
CodeSystem and ValueSet), ``ValueSet/$expand`` and ``ConceptMap/$translate``, each at type and
instance level, as GET (simple parameters in the URL) and POST (a ``Parameters`` body).

The logic lives in :mod:`hie.registries.terminology`; this router only maps HTTP to it. Include
it before the generic FHIR router, whose ``/fhir/{rtype}/{id}`` would otherwise take
``/fhir/CodeSystem/$lookup`` for a read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from hie.fhir.api import fhir_response, query_items, read_json_body
from hie.fhir.service import FhirService
from hie.hub.settings import Settings
from hie.registries.terminology import (
    OPERATIONS,
    OpParams,
    Terminology,
    terminology_for,
    terminology_operations,
)

Json = dict[str, Any]
__all__ = ["terminology_operations", "terminology_router"]


def terminology_router(
    service: FhirService, settings: Settings, terminology: Terminology | None = None
) -> APIRouter:
    """The router for the terminology operations (prefix ``/fhir``)."""
    term = terminology or terminology_for(service.store)
    router = APIRouter(prefix="/fhir", tags=["terminology"])
    limit = settings.max_document_bytes  # an inline ValueSet can be large

    def endpoint(method: Callable[..., Json], instance: bool) -> Callable[..., Any]:
        async def handle(request: Request) -> Response:
            query = query_items(request)
            if request.method == "POST":
                params = OpParams.from_parameters(
                    await read_json_body(request, limit, what="a Parameters resource"), query
                )
            else:
                params = OpParams.from_query(query)
            rid = request.path_params.get("id") if instance else None
            return fhir_response(await run_in_threadpool(method, params, rid))

        return handle

    for rtype, name, method_name, has_instance in OPERATIONS:
        method = getattr(term, method_name)
        if method_name == "lookup":
            method = _type_level(method)
        router.add_api_route(
            f"/{rtype}/${name}",
            endpoint(method, False),
            methods=["GET", "POST"],
            name=f"{rtype}-{name}",
            summary=f"{rtype} ${name}",
        )
        if has_instance:
            router.add_api_route(
                f"/{rtype}/{{id}}/${name}",
                endpoint(method, True),
                methods=["GET", "POST"],
                name=f"{rtype}-{name}-instance",
                summary=f"{rtype}/{{id}} ${name}",
            )
    return router


def _type_level(method: Callable[[OpParams], Json]) -> Callable[[OpParams, str | None], Json]:
    def call(params: OpParams, rid: str | None) -> Json:
        del rid
        return method(params)

    return call
