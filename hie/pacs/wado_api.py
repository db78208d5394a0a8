"""WADO-RS: retrieve studies, series, instances, metadata, bulk data and frames (PS3.18 10.4).

- ``GET /dicomweb/studies/{study}[/series/{series}[/instances/{instance}]]`` — the
  instances as ``multipart/related; type="application/dicom"``, one Part 10 file per part,
  streamed from the blob store in the transfer syntax each was stored in (no transcoding:
  an ``Accept`` that insists on another transfer syntax gets 406); a strong ``ETag`` (the
  instance's content address, or a digest of the set of them) and ``If-None-Match``;
- ``…/metadata`` at the same three levels — an array of DICOM JSON datasets, read from each
  file's header (pydicom, up to the pixel data); binary values over 1 KB, and the pixel data,
  are ``BulkDataURI`` links to ``…/instances/{instance}/bulkdata/{path}``;
- ``…/instances/{instance}/bulkdata/{path}`` — one such value (``application/octet-stream``;
  compressed pixel data as its frames in their own media type);
- ``…/instances/{instance}/frames/{list}`` — frames: uncompressed as
  ``application/octet-stream`` (little endian), compressed as the encapsulated frame's bytes
  with the media type of its transfer syntax (``image/jpeg``, ``image/jls``, ``image/jp2``…).

Instances are found through the one query engine (:func:`hie.pacs.query.search`, IMAGE
level, no cap) with the caller's access condition, so a study the caller may not see is 404
— exactly as one that does not exist. Responses are generated part by part in the thread
pool, never holding more than a chunk (1 MB) of a file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from hie.fhir.service import FhirService
from hie.hub.blobs.port import BlobStore
from hie.hub.errors import NotFound
from hie.hub.logging import get_logger
from hie.hub.runtime import Hub
from hie.hub.settings import Settings
from hie.pacs import dicom_json, wado
from hie.pacs.dicomweb import (
    DICOM_JSON,
    accepted,
    accepts_json,
    dicomweb_base,
    negotiate,
    no_store_headers,
    note,
    visible_instances,
)
from hie.pacs.multipart import closing, multipart_type, new_boundary, part_head
from hie.pacs.query import Match

log = get_logger("hie.pacs.wado_api")

DICOM = "application/dicom"
OCTETS = "application/octet-stream"
PIXEL_DATA = "7FE00010"


def wado_router(service: FhirService, hub: Hub, settings: Settings) -> APIRouter:
    """The WADO-RS routes (module docstring)."""
    router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])

    def blobs() -> BlobStore:
        return hub.blobs

    def find(study: str, series: str | None = None, instance: str | None = None) -> list[Match]:
        """The instances under a path, as the caller may see them (404 if none)."""
        found = visible_instances(service, study, series, instance)
        note("retrieve", [m.patient_ref for m in found], [m.imaging_study_id for m in found])
        return found

    def url_of(base: str, m: Match) -> str:
        a = m.attrs
        return (
            f"{base}/studies/{a['StudyInstanceUID']}/series/{a['SeriesInstanceUID']}"
            f"/instances/{a['SOPInstanceUID']}"
        )

    # --- instances ---------------------------------------------------------------------------

    async def instances(
        request: Request, study: str, series: str | None = None, instance: str | None = None
    ) -> Response:
        found = await run_in_threadpool(find, study, series, instance)
        negotiate(accepted(request), DICOM, {m.transfer_syntax or "" for m in found})
        etag = _etag([m.blob_key or "" for m in found])
        headers = {**no_store_headers(), "ETag": etag}
        if _not_modified(request, etag):
            return Response(status_code=304, headers=headers)
        boundary = new_boundary()
        heads = [
            part_head(
                boundary,
                f"{DICOM}; transfer-syntax={m.transfer_syntax}",
                {"Content-Length": str(m.size)},
                first=i == 0,
            )
            for i, m in enumerate(found)
        ]
        tail = closing(boundary)
        headers["Content-Length"] = str(
            sum(len(h) for h in heads) + sum(m.size or 0 for m in found) + len(tail)
        )
        body = _instance_parts(blobs(), found, heads, tail)
        return StreamingResponse(
            iterate_in_threadpool(body),
            media_type=multipart_type(boundary, DICOM),
            headers=headers,
        )

    @router.get("/studies/{study}")
    async def retrieve_study(request: Request, study: str) -> Response:
        """A study's instances (PS3.18 10.4.1.1.1)."""
        return await instances(request, study)

    @router.get("/studies/{study}/series/{series}")
    async def retrieve_series(request: Request, study: str, series: str) -> Response:
        """A series' instances."""
        return await instances(request, study, series)

    @router.get("/studies/{study}/series/{series}/instances/{instance}")
    async def retrieve_instance(
        request: Request, study: str, series: str, instance: str
    ) -> Response:
        """One instance."""
        return await instances(request, study, series, instance)

    # --- metadata ----------------------------------------------------------------------------

    async def metadata(
        request: Request, study: str, series: str | None = None, instance: str | None = None
    ) -> Response:
        accepts_json(request)
        found = await run_in_threadpool(find, study, series, instance)
        base = dicomweb_base(settings, request)
        etag = "W/" + _etag([m.blob_key or "" for m in found] + [base])
        headers = {**no_store_headers(), "ETag": etag}
        if _not_modified(request, etag):
            return Response(status_code=304, headers=headers)
        urls = [url_of(base, m) for m in found]
        body = _metadata(blobs(), found, urls)
        return StreamingResponse(
            iterate_in_threadpool(body), media_type=DICOM_JSON, headers=headers
        )

    @router.get("/studies/{study}/metadata")
    async def study_metadata(request: Request, study: str) -> Response:
        """The metadata of a study's instances (PS3.18 10.4.1.1.2)."""
        return await metadata(request, study)

    @router.get("/studies/{study}/series/{series}/metadata")
    async def series_metadata(request: Request, study: str, series: str) -> Response:
        """The metadata of a series' instances."""
        return await metadata(request, study, series)

    @router.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
    async def instance_metadata(
        request: Request, study: str, series: str, instance: str
    ) -> Response:
        """The metadata of one instance."""
        return await metadata(request, study, series, instance)

    # --- frames and bulk data ------------------------------------------------------------------

    def header_of(m: Match) -> wado.Header:
        assert m.blob_key is not None and m.size is not None
        return wado.read_header(blobs(), m.blob_key, m.size)

    async def frames_response(
        request: Request, m: Match, hdr: wado.Header, wanted: Sequence[int] | None
    ) -> Response:
        """The frames ``wanted`` (None: all) as multipart parts."""
        stored_ts = m.transfer_syntax or hdr.transfer_syntax
        media, ts = wado.frame_media_type(stored_ts)
        negotiate(accepted(request), media, {ts})
        n_frames = wado.number_of_frames(hdr.ds)
        numbers = list(wanted) if wanted is not None else list(range(1, n_frames + 1))
        etag = _etag([m.blob_key or "", "frames", ",".join(map(str, numbers))])
        headers = {**no_store_headers(), "ETag": etag}
        if _not_modified(request, etag):
            return Response(status_code=304, headers=headers)
        parts = await run_in_threadpool(_frame_sources, blobs(), m, hdr, numbers)
        boundary = new_boundary()
        ctype = f"{media}; transfer-syntax={ts}"
        heads = [
            part_head(boundary, ctype, {"Content-Length": str(size)}, first=i == 0)
            for i, (size, _) in enumerate(parts)
        ]
        tail = closing(boundary)
        headers["Content-Length"] = str(
            sum(len(h) for h in heads) + sum(size for size, _ in parts) + len(tail)
        )

        def body() -> Iterator[bytes]:
            for head, (_, chunks) in zip(heads, parts, strict=True):
                yield head
                yield from chunks()
            yield tail

        return StreamingResponse(
            iterate_in_threadpool(body()),
            media_type=multipart_type(boundary, media),
            headers=headers,
        )

    @router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame_list}")
    async def retrieve_frames(
        request: Request, study: str, series: str, instance: str, frame_list: str
    ) -> Response:
        """Frames of an instance (PS3.18 10.4.1.1.3)."""
        m = (await run_in_threadpool(find, study, series, instance))[0]
        hdr = await run_in_threadpool(header_of, m)
        if hdr.pixels is None and not _deflated_pixels(hdr):
            raise NotFound("the instance has no pixel data")
        numbers = wado.parse_frame_list(frame_list, wado.number_of_frames(hdr.ds))
        return await frames_response(request, m, hdr, numbers)

    @router.get("/studies/{study}/series/{series}/instances/{instance}/bulkdata/{path:path}")
    async def retrieve_bulkdata(
        request: Request, study: str, series: str, instance: str, path: str
    ) -> Response:
        """One bulk data value a metadata ``BulkDataURI`` names (PS3.18 10.4.1.1.5)."""
        m = (await run_in_threadpool(find, study, series, instance))[0]
        hdr = await run_in_threadpool(header_of, m)
        steps = [p for p in path.strip("/").split("/") if p]
        if [s.upper() for s in steps] == [PIXEL_DATA]:
            if hdr.pixels is None and not _deflated_pixels(hdr):
                raise NotFound("the instance has no pixel data")
            if hdr.pixels is not None and hdr.pixels.length is None:  # encapsulated
                return await frames_response(request, m, hdr, None)
            value = await run_in_threadpool(_pixel_value, blobs(), m, hdr)
        else:
            value = wado.bulk_value(hdr.ds, steps)
        negotiate(accepted(request), OCTETS, {wado.EXPLICIT_LE})
        boundary = new_boundary()
        body = (
            part_head(boundary, OCTETS, {"Content-Length": str(len(value))}, first=True)
            + value
            + closing(boundary)
        )
        return Response(
            body,
            media_type=multipart_type(boundary, OCTETS),
            headers={**no_store_headers(), "ETag": _etag([m.blob_key or "", *steps])},
        )

    return router


# --- bodies --------------------------------------------------------------------------------


def _etag(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return f'"{parts[0]}"'
    return '"' + hashlib.sha256("\n".join(parts).encode()).hexdigest() + '"'


def _not_modified(request: Request, etag: str) -> bool:
    inm = request.headers.get("if-none-match") or ""
    return inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]


def _instance_parts(
    blobs: BlobStore, found: Sequence[Match], heads: Sequence[bytes], tail: bytes
) -> Iterator[bytes]:
    """Each instance's part head and file, one blob open at a time."""
    for head, m in zip(heads, found, strict=True):
        assert m.blob_key is not None
        chunks = blobs.open(m.blob_key)
        first = next(chunks, b"")
        yield head + first  # one write for a small file's head and bytes
        yield from chunks
    yield tail


def _metadata(blobs: BlobStore, found: Sequence[Match], urls: Sequence[str]) -> Iterator[bytes]:
    """The JSON array of the instances' metadata, one instance at a time."""
    yield b"["
    for i, (m, url) in enumerate(zip(found, urls, strict=True)):
        assert m.blob_key is not None and m.size is not None
        hdr = wado.read_header(blobs, m.blob_key, m.size)

        def bulk_uri(path: Sequence[str], url: str = url) -> str:
            return f"{url}/bulkdata/{'/'.join(path)}"

        js = dicom_json.dataset(hdr.ds, bulk_uri)
        if hdr.pixels is not None or _deflated_pixels(hdr):
            bits = int(hdr.ds.get("BitsAllocated") or 8)
            encapsulated = hdr.pixels is not None and hdr.pixels.length is None
            vr = "OB" if encapsulated or bits <= 8 else "OW"
            js[PIXEL_DATA] = {"vr": vr, "BulkDataURI": f"{url}/bulkdata/{PIXEL_DATA}"}
        yield (b"," if i else b"") + orjson.dumps(js)
    yield b"]"


def _deflated_pixels(hdr: wado.Header) -> bool:
    """A deflated instance (not entered by offset) that describes an image."""
    return (
        hdr.pixels is None
        and hdr.transfer_syntax == "1.2.840.10008.1.2.1.99"
        and bool(hdr.ds.get("Rows"))
    )


FrameSource = tuple[int, Any]  # (size in bytes, a function giving its chunks)


def _frame_sources(
    blobs: BlobStore, m: Match, hdr: wado.Header, numbers: Sequence[int]
) -> list[FrameSource]:
    """Size and byte source of each requested frame (sizes first: the response has a
    Content-Length)."""
    key, size = m.blob_key or "", m.size or 0
    if hdr.pixels is None:  # deflated: inflated whole (rare, small)
        ds = wado.read_full(blobs, key)
        frame = wado.native_frame_size(ds)
        data = bytes(ds.PixelData)
        out: list[FrameSource] = []
        for n in numbers:
            piece = data[(n - 1) * frame : n * frame]
            out.append((len(piece), lambda piece=piece: iter([piece])))
        return out
    if hdr.pixels.length is None:
        groups = wado.encapsulated_frames(blobs, key, size, hdr, numbers)
        return [
            (sum(f.length for f in g), lambda g=g: wado.fragment_bytes(blobs, key, g))
            for g in groups
        ]
    frame = wado.native_frame_size(hdr.ds)
    total = hdr.pixels.length
    out = []
    for n in numbers:
        start = (n - 1) * frame
        length = max(0, min(frame, total - start))
        out.append((length, lambda n=n: next(iter(wado.native_frames(blobs, key, hdr, [n])))))
    return out


def _pixel_value(blobs: BlobStore, m: Match, hdr: wado.Header) -> bytes:
    """The whole native Pixel Data value (little endian)."""
    if hdr.pixels is None:  # deflated
        return bytes(wado.read_full(blobs, m.blob_key or "").PixelData)
    return wado.native_value(blobs, m.blob_key or "", hdr)
