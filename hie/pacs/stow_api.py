"""STOW-RS: store instances over HTTP (PS3.18 10.5).

``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study}`` take a
``multipart/related; type="application/dicom"`` body of Part 10 files. The caller is a
clinic's system: a token of role ``mis`` naming its MO (``org``), which must be a registered,
active Organization (:meth:`~hie.registries.senders.SenderRegistry.mo`) — the instances are
that MO's, exactly as if its modality had sent them by C-STORE. Any other caller gets 403.

The body is read as it arrives and spooled part by part (:mod:`hie.pacs.multipart`); past
``HIE_DICOM_MAX_UPLOAD_BYTES`` the request is refused with 413 while it streams, and nothing
of it is stored — only a complete body is. Then each part goes to the archive
(:mod:`hie.pacs.stow`) and the answer lists what was stored and what failed, why.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from hie.fhir.service import FhirService
from hie.hub.audit import note_access
from hie.hub.auth import Forbidden, current_principal
from hie.hub.errors import PayloadTooLarge, UnsupportedMediaType
from hie.hub.logging import get_logger
from hie.hub.runtime import Hub
from hie.hub.settings import Settings
from hie.pacs.access import STUDY_RESOURCE
from hie.pacs.dicomweb import accepts_json, dicomweb_base, json_response
from hie.pacs.multipart import MultipartReader, Part, boundary_of, parse_media_type
from hie.pacs.storage import StorageService
from hie.pacs.stow import DICOM, Outcome, response, store_parts
from hie.registries.senders import RegisteredMo

log = get_logger("hie.pacs.stow_api")


class _Archive:
    """The app's one storage service (its blob-writer threads), made on the first store and
    closed when the app shuts down."""

    def __init__(self, service: FhirService, hub: Hub) -> None:
        self.service, self.hub = service, hub
        self._lock = threading.Lock()
        self._storage: StorageService | None = None

    def storage(self) -> StorageService:
        with self._lock:
            if self._storage is None:
                self._storage = StorageService(self.service, self.hub.blobs, self.hub.rejected)
            return self._storage

    def close(self) -> None:
        with self._lock:
            if self._storage is not None:
                self._storage.close()
                self._storage = None


def stow_router(service: FhirService, hub: Hub, settings: Settings) -> APIRouter:
    """``POST /dicomweb/studies[/{study}]``."""
    archive = _Archive(service, hub)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(archive.close)

    router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"], lifespan=lifespan)
    limit = settings.dicom_max_upload_bytes

    def sender() -> RegisteredMo:
        p = current_principal.get()
        if p is None or not p.has_role("mis") or not p.org:
            raise Forbidden("STOW-RS is for a medical organisation's system (role mis with org)")
        service.grant(STUDY_RESOURCE, "c")  # the token's scopes must allow creating
        mo = archive.storage().senders.mo(p.org)
        if mo is None:
            raise Forbidden("the token's organisation is not a registered, active MO")
        return mo

    async def store(request: Request, study: str | None) -> Response:
        mo = await run_in_threadpool(sender)
        ctype = parse_media_type(request.headers.get("content-type", ""))
        part_type = ctype.params.get("type", DICOM).lower()
        if ctype.type != "multipart/related" or part_type != DICOM:
            raise UnsupportedMediaType(
                'STOW-RS takes multipart/related; type="application/dicom" (Part 10 files)'
            )
        accepts_json(request)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
        reader = MultipartReader(boundary_of(request.headers["content-type"]), limit)
        try:
            async for chunk in request.stream():
                reader.feed(chunk)
        except BaseException:  # a refusal or a client gone mid-body: drop what was spooled
            reader.close()
            raise
        parts = reader.finish()
        client = request.client
        try:
            outcomes = await run_in_threadpool(
                _store, archive.storage(), parts, mo, study, client.host if client else ""
            )
        finally:
            for part in parts:
                part.close()
        stored = [o.stored for o in outcomes if o.stored is not None]
        studies = dict.fromkeys(s.imaging_study_id for s in stored if s.imaging_study_id)
        note_access(
            "store",
            action="C",
            patients=list(dict.fromkeys(s.patient_ref for s in stored if s.patient_ref)),
            entities=[f"{STUDY_RESOURCE}/{i}" for i in studies],
        )
        status, body = response(outcomes, dicomweb_base(settings, request), study)
        log.info(
            "stow.done",
            mo=mo.id,
            parts=len(outcomes),
            stored=len(stored),
            failed=len(outcomes) - len(stored),
        )
        return json_response(body, status)

    @router.post("/studies")
    async def store_instances(request: Request) -> Response:
        """Store instances (PS3.18 10.5)."""
        return await store(request, None)

    @router.post("/studies/{study}")
    async def store_study_instances(request: Request, study: str) -> Response:
        """Store instances of one study (PS3.18 10.5)."""
        return await store(request, study)

    return router


def _store(
    storage: StorageService, parts: list[Part], mo: RegisteredMo, study: str | None, peer: str
) -> list[Outcome]:
    return store_parts(storage, parts, mo, study_uid=study, peer=peer)
