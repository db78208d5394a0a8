"""The image archive over HTTP: DICOMweb at ``/dicomweb`` and the viewer at ``/viewer``.

One router gathers the services, each in its own module:

- :mod:`~hie.pacs.qido_api` — QIDO-RS search (studies, series, instances);
- :mod:`~hie.pacs.wado_api` — WADO-RS retrieve (instances, metadata, bulk data, frames);
- :mod:`~hie.pacs.render_api` — rendered images and thumbnails;
- :mod:`~hie.pacs.stow_api` — STOW-RS store;
- :mod:`~hie.pacs.viewer_api` — the radiologists' viewer.

Every route runs as the request's principal: what it may see is the access policy's
(:func:`hie.pacs.access.visible_studies`), and the HTTP layer audits each request.
"""

from __future__ import annotations

from fastapi import APIRouter

from hie.fhir.service import FhirService
from hie.hub.runtime import Hub
from hie.hub.settings import Settings
from hie.pacs.qido_api import qido_router
from hie.pacs.render_api import render_router
from hie.pacs.stow_api import stow_router
from hie.pacs.viewer_api import viewer_router
from hie.pacs.wado_api import wado_router


def dicomweb_router(service: FhirService, hub: Hub, settings: Settings) -> APIRouter:
    """DICOMweb (``/dicomweb``) and the viewer (``/viewer``)."""
    router = APIRouter()
    for part in (qido_router, render_router, wado_router, stow_router, viewer_router):
        router.include_router(part(service, hub, settings))
    return router
