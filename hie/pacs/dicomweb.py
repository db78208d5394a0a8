"""What the DICOMweb routes share: the base URL clients see, DICOM JSON responses, and the
audit note of what a request touched.

Every query and retrieve runs as the request's principal: the studies it may see are the
access policy's (:func:`hie.pacs.access.visible_studies`), applied inside the index's query,
so a study the caller may not see is simply not found (404 on retrieve, absent from search:
its existence never leaks as a 403). What the request found goes into its audit record
(:func:`hie.hub.audit.note_access`): the patients (their source Patient records) and the
ImagingStudy resources, so each patient's access log shows who queried or retrieved what.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from fastapi import Request, Response

from hie.fhir.service import FhirService
from hie.hub.audit import note_access
from hie.hub.errors import HieError, NotFound
from hie.hub.settings import Settings
from hie.pacs.access import STUDY_RESOURCE, visible_studies
from hie.pacs.index import DicomIndex
from hie.pacs.multipart import MediaRange, parse_accept
from hie.pacs.query import DicomQuery, Level, Match, search

DICOM_JSON = "application/dicom+json"
JSON_TYPES = (DICOM_JSON, "application/json")


class NotAcceptable(HieError):
    """None of the media types (or transfer syntaxes) the client accepts can be served: the
    archive serves instances and frames as stored, without transcoding (PS3.18 8.7.5)."""

    code = "HIE-1330"
    status = 406
    issue = "not-supported"


def accepts_json(request: Request) -> None:
    """Refuse (406) a request that accepts no DICOM JSON (the XML form is not served)."""
    if not any(r.matches(t) for r in accepted(request) for t in JSON_TYPES):
        raise NotAcceptable("this resource is served as application/dicom+json")


def accepted(request: Request) -> list[MediaRange]:
    """The ``Accept`` ranges of a request (``*/*`` when there are none)."""
    return parse_accept(request.headers.get("accept"))


def dicomweb_base(settings: Settings, request: Request) -> str:
    """The DICOMweb base URL as the client sees it (``HIE_BASE_URL`` when set)."""
    if settings.base_url:
        return settings.base_url.rstrip("/") + "/dicomweb"
    return str(request.base_url).rstrip("/") + "/dicomweb"


def no_store_headers() -> dict[str, str]:
    """Patient data is not for shared caches."""
    return {"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A DICOM JSON response."""
    return Response(
        orjson.dumps(body),
        status_code=status,
        media_type=DICOM_JSON,
        headers={**no_store_headers(), **(headers or {})},
    )


def visible_instances(
    service: FhirService, study: str, series: str | None = None, instance: str | None = None
) -> list[Match]:
    """The stored instances under a DICOMweb path that the caller may see;
    :class:`~hie.hub.errors.NotFound` when there are none (absent and hidden alike)."""
    keys = {"StudyInstanceUID": study}
    if series is not None:
        keys["SeriesInstanceUID"] = series
    if instance is not None:
        keys["SOPInstanceUID"] = instance
    engine = DicomIndex(service.store).engine
    found = search(engine, DicomQuery(Level.IMAGE, keys), visible_studies(service), cap=None)
    found = [m for m in found if m.blob_key and m.size is not None]
    if not found:
        raise NotFound("no such study, series or instance (or not visible to this caller)")
    return found


def note(subtype: str, patients: Iterable[str], studies: Iterable[str]) -> None:
    """Tell the request's audit record what it touched (``subtype``: ``query`` for QIDO-RS,
    ``retrieve`` for WADO-RS — the DIMSE operations' names, :func:`hie.pacs.access.audit_dimse`)."""
    note_access(
        subtype,
        action="E",
        patients=list(dict.fromkeys(p for p in patients if p)),
        entities=[f"{STUDY_RESOURCE}/{s}" for s in dict.fromkeys(studies) if s],
    )


def negotiate(ranges: list[MediaRange], part_type: str, transfer_syntaxes: Iterable[str]) -> None:
    """Refuse (406) unless some accepted range admits ``multipart/related`` parts of
    ``part_type`` in every one of ``transfer_syntaxes`` (how they are stored). A range
    without a ``transfer-syntax`` parameter, or with ``*``, takes them as stored; a bare
    ``part_type`` range is answered with the multipart form the standard requires."""
    wanted = set(transfer_syntaxes)
    for r in ranges:
        if r.type == "multipart/related":
            inner = r.params.get("type", "")
            if inner and not MediaRange(inner.lower()).matches(part_type):
                continue
        elif not (r.matches(part_type) or r.type == "multipart/*"):
            continue
        ts = r.params.get("transfer-syntax", "*")
        if ts in ("", "*") or wanted <= {ts}:
            return
    stored = ", ".join(sorted(wanted))
    raise NotAcceptable(
        f"served only as {part_type} in the transfer syntax it is stored in ({stored}); "
        "ask with transfer-syntax=* or that one"
    )
