"""WADO-RS rendered images and thumbnails (PS3.18 10.4.1.1.3, 10.4.1.1.4).

- ``GET /dicomweb/studies/{study}/series/{series}/instances/{instance}/rendered`` — the
  instance's first frame (a multi-frame instance is rendered as its first frame);
- ``…/instances/{instance}/frames/{frame}/rendered`` — one frame (1-based);
- ``…/instances/{instance}/thumbnail``, ``…/frames/{frame}/thumbnail`` — the same, small;
- ``…/series/{series}/thumbnail``, ``/dicomweb/studies/{study}/thumbnail`` — a
  representative image: the middle instance (by Instance Number) of the series, or of the
  study's first series (by Series Number) that has images.

``image/jpeg`` (the default) or ``image/png`` by ``Accept`` or the ``accept`` query parameter
(PS3.18 8.3.3.1); ``window=center,width[,function]``, ``viewport=width,height`` and
``quality`` as PS3.18 8.3.5.1 defines them. The pixels are rendered by :mod:`hie.pacs.render`.

Instances are found through the one query engine (:func:`hie.pacs.query.search`) with the
caller's access condition, so a study the caller may not see is 404, as one that does not
exist; each request's audit record names the patients and ImagingStudy resources it read.
Images are patient data: ``Cache-Control: private, no-cache`` with a strong ``ETag`` (the
stored file's content address and the rendering options), so a browser revalidates — access
is checked again — and an unchanged image costs a 304, not a rendering.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from hie.fhir.service import FhirService
from hie.hub.errors import InvalidRequest, PayloadTooLarge
from hie.hub.runtime import Hub
from hie.hub.settings import Settings
from hie.pacs import render as r
from hie.pacs.dicomweb import note, visible_instances
from hie.pacs.query import Match

MAX_RENDER_BYTES = 1 << 30  # a stored file read whole to render one of its frames


def _etag(m: Match, options: r.RenderOptions, kind: str) -> str:
    w = options.window
    text = "|".join(
        [
            kind,
            m.blob_key or "",
            str(options.frame),
            f"{w.center},{w.width},{w.function}" if w else "",
            f"{options.viewport[0]}x{options.viewport[1]}" if options.viewport else "",
            options.media_type,
            str(options.quality),
        ]
    )
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def representative(found: list[Match]) -> Match:
    """The image a series or study thumbnail shows: the middle instance (by Instance
    Number) of the first series (by Series Number) that has images."""
    images = [m for m in found if m.attrs.get("Rows")] or found
    series = min(
        {m.attrs.get("SeriesInstanceUID") for m in images},
        key=lambda uid: min(
            (_int(m.attrs.get("SeriesNumber")), str(uid))
            for m in images
            if m.attrs.get("SeriesInstanceUID") == uid
        ),
    )
    members = sorted(
        (m for m in images if m.attrs.get("SeriesInstanceUID") == series),
        key=lambda m: (_int(m.attrs.get("InstanceNumber")), str(m.attrs.get("SOPInstanceUID"))),
    )
    return members[(len(members) - 1) // 2]


def render_router(service: FhirService, hub: Hub, settings: Settings) -> APIRouter:
    """The rendered-image and thumbnail routes (module docstring)."""
    del settings
    router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])

    def find(study: str, series: str | None = None, instance: str | None = None) -> list[Match]:
        return visible_instances(service, study, series, instance)

    def produce(m: Match, options: r.RenderOptions) -> bytes:
        note("retrieve", [m.patient_ref], [m.imaging_study_id])
        if (m.size or 0) > MAX_RENDER_BYTES:
            raise PayloadTooLarge(f"instances over {MAX_RENDER_BYTES} bytes are not rendered")
        data = b"".join(hub.blobs.open(m.blob_key or ""))
        return r.render(data, options)

    def options_of(request: Request, frame: int, *, thumbnail: bool = False) -> r.RenderOptions:
        q = request.query_params
        media = r.choose_media_type(q.get("accept") or request.headers.get("accept"))
        viewport = r.parse_viewport(q.get("viewport"))
        quality = r.parse_quality(q.get("quality")) if q.get("quality") else None
        window = r.parse_window(q.get("window"))
        if thumbnail:
            small = r.thumbnail_options(media, viewport, quality)
            return replace(small, frame=frame, window=window)
        return r.RenderOptions(
            frame=frame,
            window=window,
            viewport=viewport,
            media_type=media,
            quality=quality or r.DEFAULT_QUALITY,
        )

    async def answer(
        request: Request,
        study: str,
        series: str | None,
        instance: str | None,
        frame: int,
        kind: str,
    ) -> Response:
        options = options_of(request, frame, thumbnail=kind == "thumbnail")
        found = await run_in_threadpool(find, study, series, instance)
        m = found[0] if instance is not None else representative(found)
        etag = _etag(m, options, kind)
        headers = {
            "ETag": etag,
            "Cache-Control": "private, no-cache",
            "Vary": "Accept",
            "X-Content-Type-Options": "nosniff",
        }
        inm = request.headers.get("if-none-match", "")
        if etag in [t.strip() for t in inm.split(",")]:
            note("retrieve", [m.patient_ref], [m.imaging_study_id])
            return Response(status_code=304, headers=headers)
        body = await run_in_threadpool(produce, m, options)
        return Response(body, media_type=options.media_type, headers=headers)

    def frame_number(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise InvalidRequest("rendered frames are one frame number (1-based) at a time")
        return int(text)

    base = "/studies/{study}/series/{series}/instances/{instance}"

    @router.get(base + "/rendered")
    async def rendered_instance(
        request: Request, study: str, series: str, instance: str
    ) -> Response:
        """The instance rendered (its first frame) as JPEG or PNG."""
        return await answer(request, study, series, instance, 1, "rendered")

    @router.get(base + "/frames/{frame}/rendered")
    async def rendered_frame(
        request: Request, study: str, series: str, instance: str, frame: str
    ) -> Response:
        """One frame rendered as JPEG or PNG."""
        return await answer(request, study, series, instance, frame_number(frame), "rendered")

    @router.get(base + "/thumbnail")
    async def instance_thumbnail(
        request: Request, study: str, series: str, instance: str
    ) -> Response:
        """The instance's thumbnail."""
        return await answer(request, study, series, instance, 1, "thumbnail")

    @router.get(base + "/frames/{frame}/thumbnail")
    async def frame_thumbnail(
        request: Request, study: str, series: str, instance: str, frame: str
    ) -> Response:
        """One frame's thumbnail."""
        return await answer(request, study, series, instance, frame_number(frame), "thumbnail")

    @router.get("/studies/{study}/series/{series}/thumbnail")
    async def series_thumbnail(request: Request, study: str, series: str) -> Response:
        """A representative image of the series, small."""
        return await answer(request, study, series, None, 1, "thumbnail")

    @router.get("/studies/{study}/thumbnail")
    async def study_thumbnail(request: Request, study: str) -> Response:
        """A representative image of the study, small."""
        return await answer(request, study, None, None, 1, "thumbnail")

    return router
