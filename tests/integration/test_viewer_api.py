"""The viewer's routes over HTTP: open without a token (static, no patient data) while
DICOMweb still needs one; the study link redirects into OHIF and moves a token into the URL
fragment; a token in a link never reaches the audit trail; OHIF's config points at our own
DICOMweb; without fetched assets the viewer says how to install them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hie.fhir.app import create_app
from hie.hub.runtime import open_hub
from hie.pacs.viewer_assets import MOUNT
from tests.fixtures.dicom import uid
from tests.fixtures.viewer import link_viewer, require_viewer_assets


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Any]:
    from hie.hub.settings import load_settings

    settings = load_settings(data_dir=tmp_path / "var")
    hub = open_hub(settings)
    hub.store.migrate()
    app = create_app(settings, hub, start_worker=False)
    with TestClient(app, base_url="http://hub.test", follow_redirects=False) as c:
        c.hub = hub  # type: ignore[attr-defined]
        c.settings = settings  # type: ignore[attr-defined]
        yield c


def test_viewer_pages_are_open_but_dicomweb_is_not(client: Any) -> None:
    page = client.get("/viewer/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'lang="ru"' in page.text and "Исследования" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/viewer/studies").text == page.text
    assert client.get("/viewer").headers["location"] == "/viewer/"
    assert client.get("/viewer/token.js").status_code == 200
    assert client.get("/viewer/studies.js").status_code == 200
    # DICOMweb and the rest of the hub still need a token; look-alike paths are not open
    assert client.get("/dicomweb/studies").status_code == 401
    assert client.get(f"/dicomweb/studies/{uid()}/thumbnail").status_code == 401
    assert client.get("/viewerx/").status_code == 401
    assert client.get("/fhir/Patient").status_code == 401


def test_ohif_config_points_at_our_own_dicomweb(client: Any) -> None:
    r = client.get(f"{MOUNT}app-config.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    js = r.text
    assert 'var dicomweb = origin + "/dicomweb";' in js
    for root in ("qidoRoot", "wadoRoot", "wadoUriRoot"):
        assert f"{root}: dicomweb," in js
    assert 'routerBasename: "/viewer/ohif"' in js
    assert '"Bearer " + token' in js and "sessionStorage" in js
    assert "https://" not in js  # nothing off-origin


def test_without_assets_the_viewer_says_how_to_install_them(client: Any) -> None:
    study = uid()
    for path in (f"/viewer/study/{study}", f"{MOUNT}", f"{MOUNT}viewer"):
        r = client.get(path)
        assert r.status_code == 503, path
        assert "hie viewer fetch" in r.text and "не установлен" in r.text
    assert client.get("/viewer/study/not-a-uid").status_code == 400


def test_the_study_link_redirects_into_ohif(client: Any) -> None:
    require_viewer_assets()
    link_viewer(client.settings)
    study = uid()
    r = client.get(f"/viewer/study/{study}")
    assert r.status_code == 302
    assert r.headers["location"] == f"{MOUNT}viewer?StudyInstanceUIDs={study}"
    assert r.headers["cache-control"] == "no-store"
    # a token in the link moves into the fragment, which browsers never send to a server
    r = client.get(f"/viewer/study/{study}?token=abc.def.ghi")
    assert r.headers["location"] == f"{MOUNT}viewer?StudyInstanceUIDs={study}#token=abc.def.ghi"
    # OHIF: its files, and index.html for its client-side routes
    index = client.get(f"{MOUNT}viewer?StudyInstanceUIDs={study}")
    assert index.status_code == 200 and 'window.PUBLIC_URL="/viewer/ohif/"' in index.text
    assert "connect-src 'self'" in index.headers["content-security-policy"]
    assert index.headers["cache-control"] == "no-cache"
    bundle = next(p for p in index.text.split('"') if p.startswith(f"{MOUNT}app.bundle."))
    js = client.get(bundle)
    assert js.status_code == 200 and "immutable" in js.headers["cache-control"]
    assert client.get(f"{MOUNT}no-such-file.js").status_code == 404
    assert client.get(f"{MOUNT}..%2f..%2fhie.db").status_code == 404
    assert client.get(f"{MOUNT}hie-viewer.json").status_code == 404  # the marker is ours


def test_open_viewer_pages_leave_no_record_and_a_token_is_never_kept(client: Any) -> None:
    secret = "eyJ.secret-token.sig"
    assert client.get(f"/viewer/?token={secret}&lang=en").status_code == 200
    client.get(f"/viewer/study/{uid()}?token={secret}")
    assert client.get(f"/viewer/no-such-page?token={secret}").status_code == 404
    time.sleep(0.3)
    records, _ = client.hub.audit.records(count=50)
    viewer = [r for r in records if r.path.startswith("/viewer")]
    # the open pages carry no patient data: only failed requests are recorded (the study
    # link answers 503 here, where the viewer's files are not installed)
    assert viewer and all(r.status >= 400 for r in viewer), [(r.path, r.status) for r in viewer]
    assert 404 in {r.status for r in viewer}
    assert all(secret not in r.path for r in records)
