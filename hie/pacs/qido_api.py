"""QIDO-RS: search for studies, series and instances (PS3.18 10.6).

``GET /dicomweb/studies``, ``/series``, ``/instances``, ``/studies/{study}/series``,
``/studies/{study}/instances`` and ``/studies/{study}/series/{series}/instances`` answer an
array of DICOM JSON results (``application/dicom+json``). The parameters and what each
result carries are :mod:`hie.pacs.qido`'s; matching is the one query engine's
(:func:`hie.pacs.query.search_page`, the same as C-FIND), run as the caller with the access
policy's condition inside the query — a study the caller may not see is never counted,
paged or returned. A malformed parameter or match value (a date that is not ``YYYYMMDD``, a
range the wrong way round) is 400.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from hie.fhir.service import FhirService
from hie.hub.runtime import Hub
from hie.hub.settings import Settings
from hie.pacs import qido
from hie.pacs.access import visible_studies
from hie.pacs.dicomweb import accepts_json, dicomweb_base, json_response, note
from hie.pacs.index import DicomIndex
from hie.pacs.query import Level, search_page


def qido_router(service: FhirService, hub: Hub, settings: Settings) -> APIRouter:
    """The QIDO-RS routes (module docstring)."""
    del hub
    router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])
    engine: list[Any] = []

    def run(q: qido.Qido) -> tuple[list[Any], bool]:
        if not engine:
            engine.append(DicomIndex(service.store).engine)
        page = search_page(engine[0], q.query, visible_studies(service), cap=None)
        patients, studies = qido.patients_and_studies(page.matches)
        note("query", patients, studies)
        return page.matches, page.more

    async def answer(
        request: Request, level: Level, top: Level, path: dict[str, str] | None = None
    ) -> Response:
        accepts_json(request)
        q = qido.parse(
            level,
            list(request.query_params.multi_items()),
            cap=settings.dicom_query_limit,
            path=path,
            top=top,
        )
        matches, more = await run_in_threadpool(run, q)
        base = dicomweb_base(settings, request)
        body = [qido.result(q, m, base) for m in matches]
        headers: dict[str, str] = {}
        warnings = qido.warnings(q, more)
        if warnings:
            headers["Warning"] = ", ".join(warnings)
        return json_response(body, headers=headers)

    @router.get("/studies")
    async def search_studies(request: Request) -> Response:
        """Search for studies (PS3.18 10.6.1.1)."""
        return await answer(request, Level.STUDY, Level.STUDY)

    @router.get("/series")
    async def search_all_series(request: Request) -> Response:
        """Search for series in every study."""
        return await answer(request, Level.SERIES, Level.STUDY)

    @router.get("/instances")
    async def search_all_instances(request: Request) -> Response:
        """Search for instances in every study."""
        return await answer(request, Level.IMAGE, Level.STUDY)

    @router.get("/studies/{study}/series")
    async def search_series(request: Request, study: str) -> Response:
        """Search for the series of a study."""
        return await answer(request, Level.SERIES, Level.SERIES, {"StudyInstanceUID": study})

    @router.get("/studies/{study}/instances")
    async def search_study_instances(request: Request, study: str) -> Response:
        """Search for the instances of a study."""
        return await answer(request, Level.IMAGE, Level.SERIES, {"StudyInstanceUID": study})

    @router.get("/studies/{study}/series/{series}/instances")
    async def search_instances(request: Request, study: str, series: str) -> Response:
        """Search for the instances of a series."""
        path = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
        return await answer(request, Level.IMAGE, Level.IMAGE, path)

    return router
