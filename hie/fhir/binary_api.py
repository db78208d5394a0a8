"""Binary over HTTP: document bodies in and out (IHE MHD ITI-68 Retrieve Document).

``GET /fhir/Binary/{id}`` returns the bytes themselves with their own ``Content-Type``, a strong
``ETag`` (the body's SHA-256), ``Content-Disposition``, and byte ranges (``Range`` →
``206``/``416``, ``If-Range``), streamed from the blob store. A client that asks for FHIR JSON
(``Accept: application/fhir+json`` or ``_format=json``) gets the Binary resource with ``data``.
``POST /fhir/Binary`` and ``PUT /fhir/Binary/{id}`` take raw bytes with their own
``Content-Type`` (``X-Security-Context`` names the resource whose access rules the body
follows), or a FHIR JSON Binary; raw bodies are spooled to disk within the document limit,
never held in memory.
"""

from __future__ import annotations

import base64
import mimetypes
import re
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from hie.fhir.dates import format_http_date
from hie.fhir.document_content import parse_media_type
from hie.fhir.documents import blob_of
from hie.hub.errors import PayloadTooLarge, RangeNotSatisfiable

if TYPE_CHECKING:
    from hie.fhir.api import FhirApi

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_SPOOL_IN_MEMORY = 1 << 20  # a raw upload above this goes to a temporary file


def wants_json(request: Request) -> bool:
    """Whether the client asked for the Binary resource rather than its bytes."""
    fmt = request.query_params.get("_format", "")
    if fmt:
        return "json" in fmt
    accept = request.headers.get("accept", "")
    return any(t in accept for t in ("application/fhir+json", "application/json"))


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` of a single ``Range: bytes=…`` header, None for the whole body (no
    header, or several ranges, which RFC 9110 lets a server answer in full)."""
    if not header or "," in header:
        return None
    m = _RANGE.match(header.strip())
    if m is None or not (m.group(1) or m.group(2)):
        raise RangeNotSatisfiable(f"Range {header!r} is not bytes=start-end", size)
    first, last = m.group(1), m.group(2)
    if not first:  # the last N bytes
        n = int(last)
        if n == 0:
            raise RangeNotSatisfiable("an empty suffix range selects nothing", size)
        return max(size - n, 0), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if start >= size or end <= start:
        raise RangeNotSatisfiable(f"Range {header!r} is outside the body of {size} bytes", size)
    return start, end


def filename(binary_id: str, content_type: str) -> str:
    """The file name offered in ``Content-Disposition``."""
    base = parse_media_type(content_type)[0]
    ext = {"application/hl7-cda+xml": ".xml", "text/plain": ".txt"}.get(base)
    return binary_id + (ext or mimetypes.guess_extension(base) or ".bin")


async def spool_body(request: Request, limit: int) -> Any:
    """The request body in a temporary file (memory up to 1 MB), refused past ``limit``."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


def binary_routes(api: FhirApi) -> None:
    """Register the Binary routes on the FHIR router (before its generic routes)."""
    from hie.fhir.api import JSON_TYPES, _if_match, fhir_response, read_json_body

    r: APIRouter = api.router
    svc = api.svc

    async def write(request: Request, id: str | None) -> Response:
        ctype = request.headers.get("content-type", "").strip()
        if parse_media_type(ctype)[0] in JSON_TYPES or not ctype:
            res = await read_json_body(request, api.settings.max_document_bytes)
            if id is None:
                out = await api.run(svc.create, res, "Binary", request.headers.get("if-none-exist"))
            else:
                out = await api.run(svc.update, res, "Binary", id, _if_match(request))
            return api._written(request, out, api.base(request))
        body = await spool_body(request, api.settings.max_document_bytes)
        try:
            out = await api.run(
                svc.write_binary,
                body,
                ctype,
                request.headers.get("x-security-context"),
                id,
                _if_match(request),
            )
        finally:
            body.close()
        return api._written(request, out, api.base(request))

    @r.post("/Binary")
    async def create_binary(request: Request) -> Response:
        return await write(request, None)

    @r.put("/Binary/{id}")
    async def update_binary(request: Request, id: str) -> Response:
        return await write(request, id)

    @r.get("/Binary/{id}")
    async def read_binary(request: Request, id: str) -> Response:
        stored = await api.run(svc.read, "Binary", id)
        binary = orjson.loads(stored.content or b"{}")
        blob = blob_of(binary)
        if wants_json(request) or blob is None or svc.documents is None:
            if blob is not None and svc.documents is not None:
                data = await api.run(_read_all, svc.documents.blobs().open(blob.key))
                binary["data"] = base64.b64encode(data).decode()
            return fhir_response(binary, headers={"ETag": f'W/"{stored.version}"'})
        ctype = str(binary.get("contentType") or "application/octet-stream")
        etag = f'"{blob.key}"'
        headers = {
            "ETag": etag,
            "Last-Modified": format_http_date(stored.last_updated),
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{filename(id, ctype)}"',
            "Cache-Control": "private, no-store",
            "X-Content-Type-Options": "nosniff",
        }
        inm = request.headers.get("if-none-match")
        if inm and etag in [t.strip() for t in inm.split(",")]:
            return Response(status_code=304, headers=headers)
        rng = request.headers.get("range")
        if_range = request.headers.get("if-range")
        if if_range and if_range.strip() != etag:
            rng = None  # the body changed since the client's copy: send it whole
        span = byte_range(rng, blob.size)
        start, end = span or (0, blob.size)
        headers["Content-Length"] = str(end - start)
        status = 200
        if span is not None:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        chunks = svc.documents.blobs().open(blob.key, start, end)
        return StreamingResponse(
            iterate_in_threadpool(chunks), status_code=status, media_type=ctype, headers=headers
        )


def _read_all(chunks: Iterator[bytes]) -> bytes:
    return b"".join(chunks)
