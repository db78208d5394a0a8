"""Document views over HTTP: full-text search with snippets and a patient's document timeline.

- ``GET /fhir/DocumentReference/$search-text?q=…&patient=…&status=…&_count=…&_offset=…``: a
  FHIR searchset Bundle, best match first (:mod:`hie.fhir.document_search`);
- ``GET /fhir/Patient/{id}/$document-timeline?group=encounter|organization|type``: JSON for
  the portal (:mod:`hie.fhir.document_timeline`).

Include this router before the generic FHIR router, whose ``/fhir/{rtype}/{id}`` would
otherwise read ``DocumentReference/$search-text`` as a resource id.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from hie.fhir.api import fhir_response, query_items
from hie.fhir.document_search import search_text
from hie.fhir.document_timeline import document_timeline
from hie.fhir.service import FhirService
from hie.hub.settings import Settings


def documents_router(service: FhirService, settings: Settings) -> APIRouter:
    """The router for ``$search-text`` and ``$document-timeline`` (prefix ``/fhir``)."""
    router = APIRouter(prefix="/fhir", tags=["documents"])

    def base(request: Request) -> str:
        if settings.base_url:
            return settings.base_url.rstrip("/") + "/fhir"
        return str(request.base_url).rstrip("/") + "/fhir"

    @router.get("/DocumentReference/$search-text", summary="Full-text search of documents")
    async def document_search_text(request: Request) -> Response:
        """Documents whose text (metadata and bodies) matches ``q``, with ``<mark>`` snippets."""
        items = query_items(request)
        body = await run_in_threadpool(search_text, service, items, base(request))
        return fhir_response(body)

    @router.get("/Patient/{id}/$document-timeline", summary="A patient's documents, grouped")
    async def patient_document_timeline(request: Request, id: str) -> Response:
        """The patient's current documents, newest first, grouped by encounter (default),
        organisation or type."""
        items = query_items(request)
        out = await run_in_threadpool(document_timeline, service, id, items)
        return Response(orjson.dumps(out), media_type="application/json")

    return router
