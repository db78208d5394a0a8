"""The radiologists' web viewer at ``/viewer``, served against the hub's own DICOMweb.

- ``/viewer/`` (also ``/viewer/studies``): the study list, Russian first (``?lang=en`` for
  English), which searches QIDO-RS and links each study to its viewer;
- ``/viewer/study/{StudyInstanceUID}``: the study link (from the clinician view, a report,
  the study list) — a redirect into the OHIF Viewer's route
  ``/viewer/ohif/viewer?StudyInstanceUIDs=…``;
- ``/viewer/ohif/…``: the OHIF Viewer, unpacked at install time by ``hie viewer fetch``
  (:mod:`hie.pacs.viewer_assets`) into ``$HIE_DATA_DIR/viewer``; its ``app-config.js`` is
  generated here (:mod:`hie.pacs.viewer_pages`) and points OHIF's DICOMweb data source at
  ``/dicomweb`` on the same origin, with the user's bearer token.

Everything under ``/viewer`` is static and carries no patient data, so it needs no token
(:data:`hie.fhir.app.OPEN_PREFIXES`); the pages read studies through DICOMweb, which does.
A token given in a link (``?token=…``) is taken into the tab's session storage by the page
and is blanked from the request before the audit record is written.
"""

from __future__ import annotations

import mimetypes
import re
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from hie.fhir.service import FhirService
from hie.hub.errors import InvalidRequest, NotFound
from hie.hub.runtime import Hub
from hie.hub.settings import Settings
from hie.pacs import viewer_assets as assets
from hie.pacs import viewer_pages as pages

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # PS3.5 9.1
_HASHED = re.compile(r"(^|\.)[0-9a-f]{16}\.(js|wasm|woff2)$|\.bundle\.[0-9a-f]{16}\.js$")
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".wasm": "application/wasm",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".jsonc": "application/json",
    ".svg": "image/svg+xml",
    ".woff2": "font/woff2",
}
NO_CACHE = "no-cache"
IMMUTABLE = "public, max-age=31536000, immutable"
STATIC = "public, max-age=3600"
# The hub's own pages: scripts and requests to this origin only.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data: blob:; "
    "style-src 'self' 'unsafe-inline'; frame-ancestors 'self'; base-uri 'none'"
)
# OHIF: inline bootstrap script, WebAssembly codecs, workers from blobs; nothing off-origin.
OHIF_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval' 'wasm-unsafe-eval' "
    "blob:; worker-src 'self' blob:; connect-src 'self' blob: data:; img-src 'self' data: "
    "blob:; style-src 'self' 'unsafe-inline'; font-src 'self' data:; media-src 'self' blob:; "
    "frame-ancestors 'self'; base-uri 'self'"
)


def viewer_dir(settings: Settings) -> Path:
    """Where ``hie viewer fetch`` unpacks the viewer for this hub."""
    return settings.data_dir / "viewer"


def _headers(cache: str, csp: str | None = None) -> dict[str, str]:
    h = {
        "Cache-Control": cache,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if csp:
        h["Content-Security-Policy"] = csp
    return h


def forget_token(request: Request) -> str | None:
    """The ``token`` query parameter, blanked in the request (so neither the audit record
    nor a log line keeps it)."""
    raw = request.scope.get("query_string", b"")
    if b"token=" not in raw:
        return None
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    token = next((v for k, v in pairs if k == "token"), None)
    kept = [(k, "(redacted)" if k == "token" else v) for k, v in pairs]
    request.scope["query_string"] = urlencode(kept).encode("latin-1")
    return token or None


def viewer_router(service: FhirService, hub: Hub, settings: Settings) -> APIRouter:
    """The viewer's routes (no token needed: see the module docstring)."""
    del service, hub
    router = APIRouter(tags=["viewer"], include_in_schema=True)
    root = viewer_dir(settings)

    def app_dir() -> Path | None:
        found = assets.installed(root)
        return found.path if found is not None else None

    def missing() -> Response:
        body = pages.MISSING_HTML % {
            "package": assets.PACKAGE,
            "version": assets.VERSION,
            "where": str(assets.target_dir(root)),
        }
        return HTMLResponse(body, status_code=503, headers=_headers("no-store", PAGE_CSP))

    @router.get("/viewer", include_in_schema=False)
    def viewer_root(request: Request) -> Response:
        forget_token(request)
        return RedirectResponse("/viewer/", status_code=308)

    @router.get("/viewer/")
    @router.get("/viewer/studies")
    def study_list(request: Request) -> Response:
        """The radiologists' study list (HTML; studies are fetched by the page via QIDO-RS)."""
        forget_token(request)
        return HTMLResponse(pages.STUDY_LIST_HTML, headers=_headers(NO_CACHE, PAGE_CSP))

    @router.get("/viewer/token.js", include_in_schema=False)
    def token_js() -> Response:
        return Response(pages.TOKEN_JS, media_type=_TYPES[".js"], headers=_headers(NO_CACHE))

    @router.get("/viewer/studies.js", include_in_schema=False)
    def studies_js() -> Response:
        return Response(pages.STUDY_LIST_JS, media_type=_TYPES[".js"], headers=_headers(NO_CACHE))

    @router.get("/viewer/study/{study_uid}")
    def study_link(study_uid: str, request: Request) -> Response:
        """A study's link: into the OHIF Viewer showing it. A ``token`` query parameter
        travels on as a URL fragment (never sent to a server again)."""
        token = forget_token(request)
        if len(study_uid) > 64 or not _UID.match(study_uid):
            raise InvalidRequest("not a Study Instance UID")
        if app_dir() is None:
            return missing()
        target = f"{assets.MOUNT}viewer?StudyInstanceUIDs={quote(study_uid)}"
        if token:
            target += f"#token={quote(token, safe='')}"
        return RedirectResponse(target, status_code=302, headers=_headers("no-store"))

    @router.get(f"{assets.MOUNT}app-config.js", include_in_schema=False)
    def ohif_config() -> Response:
        return Response(pages.OHIF_CONFIG_JS, media_type=_TYPES[".js"], headers=_headers(NO_CACHE))

    @router.get(assets.MOUNT.rstrip("/"), include_in_schema=False)
    @router.get(assets.MOUNT + "{path:path}", include_in_schema=False)
    def ohif_file(request: Request, path: str = "") -> Response:
        """OHIF's files; its client-side routes (no file extension) get ``index.html``."""
        forget_token(request)
        base = app_dir()
        if base is None:
            return missing()
        target = (base / path).resolve() if path else base / "index.html"
        if not target.is_relative_to(base.resolve()):
            raise NotFound("no such viewer file")
        if not target.is_file() or target.name == assets.MARKER:
            if "." in path.rsplit("/", 1)[-1]:
                raise NotFound("no such viewer file")
            target = base / "index.html"  # a route of the single-page app
        if target.name == "index.html" and target.parent == base:
            return FileResponse(
                target, media_type=_TYPES[".html"], headers=_headers(NO_CACHE, OHIF_CSP)
            )
        suffix = target.suffix.lower()
        media = _TYPES.get(suffix) or mimetypes.guess_type(target.name)[0]
        cache = IMMUTABLE if _HASHED.search(target.name) else STATIC
        return FileResponse(
            target, media_type=media or "application/octet-stream", headers=_headers(cache)
        )

    return router
