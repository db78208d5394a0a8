"""Vendoring the OHIF Viewer (hie.pacs.viewer_assets) with a synthetic npm tarball served by a
local registry: the sha512 integrity is checked, dist/ is unpacked and relocated under
/viewer/ohif/, unsafe archives are refused, and an unreachable registry is a clear error."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hie.pacs import viewer_assets as va

INDEX = (
    '<!doctype html><html><head><script>window.PUBLIC_URL="/"</script>'
    '<link rel="manifest" href="/manifest.json"><script src="/app-config.js"></script>'
    '<script defer src="/app.bundle.0123456789abcdef.js"></script>'
    '<link href="/app.bundle.css" rel="stylesheet"></head><body></body></html>'
)
BUNDLE = (  # as OHIF 3.13's production bundle spells them
    '(() => { __webpack_require__.p = "/"; })();'
    " browserImportFunction('/dicom-microscopy-viewer/x.js');"
)


def tarball(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


GOOD = {
    "package/package.json": b'{"name": "@ohif/app"}',
    "package/dist/index.html": INDEX.encode(),
    "package/dist/app.bundle.0123456789abcdef.js": BUNDLE.encode(),
    "package/dist/app.bundle.css": b"@font-face{src:url(/a34f9d1faa5f3315.woff2)}",
    "package/dist/app.bundle.0123456789abcdef.js.map": b"{}",
    "package/dist/sw.js": b"importScripts('https://cdn.example/workbox.js')",
    "package/dist/app-config.js": b"window.config = {dataSources: ['https://elsewhere']}",
    "package/dist/assets/favicon.ico": b"ico",
}


class Registry:
    """A tiny npm registry: package metadata and one tarball."""

    def __init__(self, data: bytes, integrity: str | None = None) -> None:
        self.data = data
        self.integrity = integrity or sri(data)
        self.hits: list[str] = []
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                registry.hits.append(self.path)
                if self.path == f"/@ohif%2Fapp/{va.VERSION}":
                    body = json.dumps(
                        {
                            "dist": {
                                "tarball": f"{registry.base}/app.tgz",
                                "integrity": registry.integrity,
                            }
                        }
                    ).encode()
                elif self.path == "/app.tgz":
                    body = registry.data
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def registry() -> Iterator[Registry]:
    reg = Registry(tarball(GOOD))
    yield reg
    reg.close()


def test_fetch_verifies_unpacks_and_relocates(registry: Registry, tmp_path: Path) -> None:
    got = va.fetch(tmp_path, registry=registry.base)
    root = va.target_dir(tmp_path)
    assert got.path == root and got.integrity == registry.integrity and got.mount == va.MOUNT
    index = (root / "index.html").read_text()
    assert 'window.PUBLIC_URL="/viewer/ohif/"' in index
    assert 'src="/viewer/ohif/app.bundle.0123456789abcdef.js"' in index
    assert 'href="/viewer/ohif/app.bundle.css"' in index and 'href="/manifest.json"' not in index
    bundle = (root / "app.bundle.0123456789abcdef.js").read_text()
    assert '__webpack_require__.p = "/viewer/ohif/";' in bundle
    assert "/viewer/ohif/dicom-microscopy-viewer/x.js" in bundle
    assert "url(/viewer/ohif/a34f9d1faa5f3315.woff2)" in (root / "app.bundle.css").read_text()
    assert (root / "assets" / "favicon.ico").read_bytes() == b"ico"
    # no source maps, no CDN-loading service worker, no packaged config (the hub makes its own)
    for left_out in ("app.bundle.0123456789abcdef.js.map", "sw.js", "app-config.js"):
        assert not (root / left_out).exists()
    assert va.installed(tmp_path) == got
    # fetching again with the same integrity downloads nothing
    registry.hits.clear()
    va.fetch(tmp_path, registry=registry.base)
    assert registry.hits == [f"/@ohif%2Fapp/{va.VERSION}"]


def test_a_tarball_that_does_not_match_its_integrity_is_refused(tmp_path: Path) -> None:
    reg = Registry(tarball(GOOD), integrity=sri(b"something else"))
    try:
        with pytest.raises(va.ViewerAssetsError, match="does not match"):
            va.fetch(tmp_path, registry=reg.base)
    finally:
        reg.close()
    assert va.installed(tmp_path) is None
    assert not va.target_dir(tmp_path).exists()


def test_unsafe_or_unbuilt_packages_are_refused(tmp_path: Path) -> None:
    evil = tarball({**GOOD, "package/dist/../../escape.js": b"x"})
    with pytest.raises(va.ViewerAssetsError, match="unsafe path"):
        va.unpack(evil, tmp_path, va.VERSION, sri(evil))
    source_only = tarball({"package/package.json": b"{}", "package/src/index.js": b""})
    with pytest.raises(va.ViewerAssetsError, match="no built app"):
        va.unpack(source_only, tmp_path, va.VERSION, sri(source_only))
    assert va.installed(tmp_path) is None
    assert [p.name for p in tmp_path.iterdir()] == []  # no half-unpacked directory left


def test_an_unreachable_registry_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(va.ViewerAssetsError, match="cannot be reached"):
        va.fetch(tmp_path, registry="http://127.0.0.1:9", timeout=2)


def test_integrity_strings() -> None:
    data = b"abc"
    va.check_integrity(data, sri(data))
    va.check_integrity(data, "sha1-xyz " + sri(data))
    with pytest.raises(va.ViewerAssetsError):
        va.check_integrity(data, "sha1-qZk+NkcGgWq6PiVxeFDCbJzQ2J0=")
