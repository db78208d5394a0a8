"""The OHIF Viewer's built assets, vendored at install time (never from a CDN at run time,
never committed to git).

The npm package ``@ohif/app`` carries the built application in ``dist/`` (index.html, the
webpack bundles, web workers, WebAssembly codecs). :func:`fetch` downloads its tarball from
the npm registry, checks it against the registry's ``sha512`` integrity (Subresource
Integrity form, as ``npm`` itself does), and unpacks ``dist/`` into
``<dest>/ohif-<version>/`` (``$HIE_DATA_DIR/viewer`` by default; ``hie viewer fetch``).

OHIF is built for the root of a web site (webpack public path ``/``); the hub serves it under
:data:`MOUNT`, so unpacking relocates it — the webpack runtime's public path, the absolute
links in ``index.html`` and the stylesheets, and the one absolute dynamic import — as a build with
``PUBLIC_URL=/viewer/ohif/`` would. Source maps and the Workbox service worker (which loads
Workbox from Google's CDN) are left out. A marker file, :data:`MARKER`, records what was
unpacked; the hub serves only a complete, marked unpack (:func:`installed`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

from hie.hub.errors import HieError

PACKAGE = "@ohif/app"
VERSION = "3.13.2"  # the version the hub's app-config and tests are written for
REGISTRY = "https://registry.npmjs.org"
MOUNT = "/viewer/ohif/"  # where the hub serves the app (hie.pacs.viewer_api)
MARKER = "hie-viewer.json"
MAX_TARBALL_BYTES = 200 << 20  # 3.13.2 is 50 MB; refuse anything absurd
MAX_UNPACKED_BYTES = 1 << 30

# webpack's runtime public path, as OHIF's production build writes it
_PUBLIC_PATH = '__webpack_require__.p = "/";'
_SKIPPED_SUFFIXES = (".map",)
_SKIPPED_NAMES = frozenset({"sw.js", "_headers", "_redirects", "serve.json", "app-config.js"})


class ViewerAssetsError(HieError):
    """The viewer's assets could not be fetched or unpacked (network, integrity, layout)."""

    code = "HIE-1325"
    status = 503
    issue = "transient"


@dataclass(frozen=True)
class Installed:
    """An unpacked viewer: its directory and what the marker says."""

    path: Path
    package: str
    version: str
    integrity: str
    mount: str


def target_dir(dest: Path, version: str = VERSION) -> Path:
    """Where ``version`` unpacks under ``dest``."""
    return dest / f"ohif-{version}"


def installed(dest: Path, version: str = VERSION) -> Installed | None:
    """The unpacked viewer of ``version`` under ``dest``, or None when there is none (or an
    incomplete one, or one relocated for another mount)."""
    root = target_dir(dest, version)
    try:
        meta = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("mount") != MOUNT or not (root / "index.html").is_file():
        return None
    return Installed(
        path=root,
        package=str(meta.get("package", "")),
        version=str(meta.get("version", "")),
        integrity=str(meta.get("integrity", "")),
        mount=MOUNT,
    )


def package_metadata(
    client: httpx.Client, version: str = VERSION, registry: str = REGISTRY
) -> tuple[str, str]:
    """The tarball URL and ``sha512-…`` integrity of ``@ohif/app@version`` from the registry."""
    url = f"{registry.rstrip('/')}/{PACKAGE.replace('/', '%2F')}/{version}"
    try:
        r = client.get(url, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        raise ViewerAssetsError(f"the npm registry cannot be reached: {exc}") from None
    if r.status_code != 200:
        raise ViewerAssetsError(f"the npm registry answered {r.status_code} for {url}")
    dist = r.json().get("dist") or {}
    tarball, integrity = dist.get("tarball"), dist.get("integrity")
    if not tarball or not str(integrity or "").startswith("sha512-"):
        raise ViewerAssetsError(f"{PACKAGE}@{version} has no tarball with a sha512 integrity")
    return str(tarball), str(integrity)


def check_integrity(data: bytes, integrity: str) -> None:
    """``data`` against a Subresource Integrity string (``sha512-<base64>``; any of several
    space-separated hashes may match, the strongest sha512 is what npm publishes)."""
    for item in integrity.split():
        algo, _, b64 = item.partition("-")
        if algo == "sha512":
            want = base64.b64decode(b64)
            if hashlib.sha512(data).digest() == want:
                return
            raise ViewerAssetsError("the downloaded tarball does not match its sha512 integrity")
    raise ViewerAssetsError("no sha512 integrity to check the tarball against")


def download(client: httpx.Client, url: str, limit: int = MAX_TARBALL_BYTES) -> bytes:
    """The tarball's bytes (at most ``limit``)."""
    buf = io.BytesIO()
    try:
        with client.stream("GET", url) as r:
            if r.status_code != 200:
                raise ViewerAssetsError(f"the tarball download answered {r.status_code}")
            for chunk in r.iter_bytes():
                buf.write(chunk)
                if buf.tell() > limit:
                    raise ViewerAssetsError(f"the tarball is larger than {limit} bytes")
    except httpx.HTTPError as exc:
        raise ViewerAssetsError(f"the tarball cannot be downloaded: {exc}") from None
    return buf.getvalue()


def _member_path(name: str) -> PurePosixPath | None:
    """The path under ``dist/`` of a tarball member, or None for what is not unpacked."""
    p = PurePosixPath(name)
    parts = p.parts
    if len(parts) < 3 or parts[0] != "package" or parts[1] != "dist":
        return None
    rel = PurePosixPath(*parts[2:])
    if rel.is_absolute() or ".." in rel.parts:
        raise ViewerAssetsError(f"the tarball has an unsafe path: {name!r}")
    if rel.name.endswith(_SKIPPED_SUFFIXES) or (len(rel.parts) == 1 and rel.name in _SKIPPED_NAMES):
        return None
    return rel


def relocate_index(html: str, mount: str = MOUNT) -> str:
    """``index.html`` for ``mount``: absolute links and ``window.PUBLIC_URL`` moved under it."""
    out = html.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{mount}"')
    for attr in ("href", "src"):
        out = out.replace(f'{attr}="/', f'{attr}="{mount}')
    return out


def relocate_css(css: str, mount: str = MOUNT) -> str:
    """A stylesheet for ``mount``: its absolute ``url(/…)`` references (fonts) moved."""
    return css.replace("url(/", f"url({mount}")


def relocate_script(js: str, mount: str = MOUNT) -> tuple[str, int]:
    """A bundle for ``mount``: webpack's public path and the absolute import of the
    microscopy viewer; the number of replacements made."""
    n = js.count(_PUBLIC_PATH)
    js = js.replace(_PUBLIC_PATH, f'__webpack_require__.p = "{mount}";')
    old = "'/dicom-microscopy-viewer/"
    n += js.count(old)
    js = js.replace(old, f"'{mount}dicom-microscopy-viewer/")
    return js, n


def unpack(data: bytes, dest: Path, version: str, integrity: str, mount: str = MOUNT) -> Path:
    """Unpack ``package/dist`` of the tarball into ``target_dir(dest, version)``, relocated
    for ``mount``; atomic (a temporary directory renamed into place)."""
    dest.mkdir(parents=True, exist_ok=True)
    final = target_dir(dest, version)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=dest))
    try:
        total = 0
        relocated = 0
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar:
                rel = _member_path(member.name)
                if rel is None or not member.isfile():
                    continue  # directories are made as needed; links are never followed
                total += member.size
                if total > MAX_UNPACKED_BYTES:
                    raise ViewerAssetsError("the package unpacks to more than 1 GB")
                src = tar.extractfile(member)
                if src is None:
                    continue
                body = src.read()
                if len(rel.parts) == 1 and rel.name == "index.html":
                    body = relocate_index(body.decode("utf-8"), mount).encode("utf-8")
                elif len(rel.parts) == 1 and rel.suffix == ".css":
                    text = body.decode("utf-8", "surrogateescape")
                    body = relocate_css(text, mount).encode("utf-8", "surrogateescape")
                elif len(rel.parts) == 1 and rel.suffix == ".js":
                    text, n = relocate_script(body.decode("utf-8", "surrogateescape"), mount)
                    if n:
                        relocated += n
                        body = text.encode("utf-8", "surrogateescape")
                out = tmp.joinpath(*rel.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(body)
        if not (tmp / "index.html").is_file() or relocated == 0:
            raise ViewerAssetsError(
                f"{PACKAGE}@{version} has no built app in dist/ that can be relocated"
            )
        meta: dict[str, Any] = {
            "package": PACKAGE,
            "version": version,
            "integrity": integrity,
            "mount": mount,
            "bytes": total,
        }
        (tmp / MARKER).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def fetch(
    dest: Path,
    version: str = VERSION,
    registry: str = REGISTRY,
    *,
    force: bool = False,
    timeout: float = 120.0,
    progress: Callable[[str], None] | None = None,
) -> Installed:
    """Download, verify and unpack ``@ohif/app@version`` under ``dest`` (nothing to do when
    the same integrity is already unpacked, unless ``force``)."""
    say = progress or (lambda _msg: None)
    with httpx.Client(timeout=timeout, follow_redirects=True) as client:
        tarball, integrity = package_metadata(client, version, registry)
        have = installed(dest, version)
        if have is not None and have.integrity == integrity and not force:
            say(f"{PACKAGE}@{version} is already in {have.path}")
            return have
        say(f"downloading {tarball}")
        data = download(client, tarball)
    check_integrity(data, integrity)
    say(f"integrity {integrity[:20]}… verified; unpacking")
    path = unpack(data, dest, version, integrity)
    found = installed(dest, version)
    assert found is not None, path
    say(f"{PACKAGE}@{version} unpacked into {path}")
    return found


def main(argv: list[str] | None = None) -> int:
    """``python -m hie.pacs.viewer_assets [DEST]``: fetch into DEST (default
    ``$HIE_DATA_DIR/viewer``, as ``hie viewer fetch`` does)."""
    import sys

    from hie.hub.settings import load_settings

    args = sys.argv[1:] if argv is None else argv
    dest = Path(args[0]) if args else load_settings().data_dir / "viewer"
    try:
        fetch(dest, progress=lambda m: print(m, file=sys.stderr))  # noqa: T201
    except ViewerAssetsError as exc:
        sys.stderr.write(f"viewer assets not fetched: {exc.message}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
