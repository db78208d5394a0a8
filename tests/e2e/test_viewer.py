"""The radiologists' viewer in real headless Chromium (Debian's) against a real hub over HTTP:
a study link opens the study in the OHIF Viewer, which reads it through the hub's DICOMweb
with the user's token and draws it; the study list shows the study in Russian (and English)
and links to it. Nothing is loaded from anywhere but the hub."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.dicom import MO_A, MO_B, bundled_instance, ct_instance, uid
from tests.fixtures.viewer import (
    HubServer,
    hub_server,
    launch_chromium,
    require_chromium,
    require_viewer_assets,
)

pytestmark = pytest.mark.slow

# How long OHIF may take to boot and draw in a 2-core CI box (software rendering).
DRAW_TIMEOUT_MS = 90_000


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HubServer]:
    require_viewer_assets()
    require_chromium()
    with hub_server(tmp_path / "var", viewer=True) as srv:
        yield srv


@pytest.fixture
def browser() -> Iterator[Any]:
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_chromium(p)
        try:
            yield b
        finally:
            b.close()


class Traffic:
    """Every response a page got, and every request that failed or left the hub."""

    def __init__(self, page: Any, base: str) -> None:
        self.base = base
        self.responses: list[tuple[int, str]] = []
        self.failed: list[str] = []
        self.elsewhere: list[str] = []
        page.on("response", lambda r: self.responses.append((r.status, r.url)))
        page.on("requestfailed", lambda r: self.failed.append(r.url))
        page.on("request", self._request)

    def _request(self, req: Any) -> None:
        if not req.url.startswith((self.base, "data:", "blob:")):
            self.elsewhere.append(req.url)

    def statuses(self, fragment: str) -> list[int]:
        return [s for s, u in self.responses if fragment in u]


def store_study(srv: HubServer) -> tuple[str, list[Any]]:
    """A CT study of three slices (pydicom's CT_small, synthetic patient) from MO A."""
    study, series = uid(), uid()
    sent = []
    for n in range(1, 4):
        ds = bundled_instance(
            "CT_small.dcm",
            study_uid=study,
            series_uid=series,
            name="Иванова^Мария^Петровна",
            patient_id="4455",
        )
        ds.InstanceNumber = n
        ds.StudyDescription = "КТ органов грудной клетки"
        srv.store(ds)
        sent.append(ds)
    return study, sent


DRAWN_JS = """() => {
  for (const c of document.querySelectorAll('canvas.cornerstone-canvas, .viewport-element canvas')) {
    if (!c.width || !c.height) continue;
    const ctx = c.getContext('2d');
    if (!ctx) continue;
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    const seen = new Set();
    for (let i = 0; i < d.length; i += 4 * 97) seen.add(d[i]);
    if (seen.size > 8) return seen.size;
  }
  return 0;
}"""


def test_a_study_link_opens_the_study_in_ohif(server: HubServer, browser: Any) -> None:
    study, sent = store_study(server)
    token = server.token("radiologist", org=MO_A)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    traffic = Traffic(page, server.base)
    page.goto(f"{server.base}/viewer/study/{study}#token={token}")
    # OHIF's viewer route, the token gone from the address bar and kept for the tab
    page.wait_for_url("**/viewer/ohif/viewer?StudyInstanceUIDs=*", timeout=DRAW_TIMEOUT_MS)
    page.wait_for_function(DRAWN_JS, timeout=DRAW_TIMEOUT_MS)
    assert "token" not in page.url
    assert page.evaluate("() => sessionStorage.getItem('hie.viewer.token')") == token
    # the study came through DICOMweb, authenticated, and nothing failed or left the hub
    assert 200 in traffic.statuses("/dicomweb/studies?")  # QIDO-RS
    assert 200 in traffic.statuses(f"/dicomweb/studies/{study}/series")
    assert 200 in traffic.statuses("/metadata")  # WADO-RS metadata
    pixel_reads = [s for s, u in traffic.responses if "/frames/" in u or "/rendered" in u]
    assert pixel_reads and all(s == 200 for s in pixel_reads)
    assert not [u for s, u in traffic.responses if s in (401, 403) or s >= 500]
    assert traffic.elsewhere == []
    # the study browser names the study, and OHIF speaks Russian first
    page.get_by_text("КТ органов грудной клетки").first.wait_for(timeout=DRAW_TIMEOUT_MS)
    page.get_by_text("Исследования", exact=True).first.wait_for(timeout=10_000)
    assert str(sent[0].SeriesInstanceUID) in " ".join(u for _, u in traffic.responses)
    page.close()


def test_the_study_list_shows_the_study_in_russian_and_opens_it(
    server: HubServer, browser: Any
) -> None:
    study, _sent = store_study(server)
    other = ct_instance(patient_id="999", name="Сидоров^Пётр")  # MO B's study
    server.store(other, org=MO_B)
    token = server.token("radiologist", org=MO_A)
    page = browser.new_page()
    traffic = Traffic(page, server.base)
    page.goto(f"{server.base}/viewer/?token={token}")
    row = page.locator(f"tr[data-study='{study}']")
    row.wait_for(timeout=30_000)
    assert page.evaluate("() => document.documentElement.lang") == "ru"
    heads = page.locator("#heads th").all_inner_texts()
    assert heads[:4] == ["Пациент", "ID пациента", "Дата", "Модальность"]
    cells = row.locator("td").all_inner_texts()
    assert cells[0] == "Иванова Мария Петровна" and cells[1] == "4455"
    assert "CT" in cells[3] and cells[4] == "КТ органов грудной клетки"
    assert cells[7] == "3"
    # only what this radiologist's MO may see
    assert page.locator(f"tr[data-study='{other.StudyInstanceUID}']").count() == 0
    assert "token" not in page.url  # taken into the tab's storage, out of the address bar
    # English on request
    page.goto(f"{server.base}/viewer/?lang=en")
    page.locator(f"tr[data-study='{study}']").wait_for(timeout=30_000)
    assert page.locator("#heads th").first.inner_text() == "Patient"
    # the row's link opens the study in the viewer
    page.locator(f"tr[data-study='{study}'] a.open").click()
    page.wait_for_url("**/viewer/ohif/viewer?StudyInstanceUIDs=*", timeout=DRAW_TIMEOUT_MS)
    page.wait_for_function(DRAWN_JS, timeout=DRAW_TIMEOUT_MS)
    assert traffic.elsewhere == []
    page.close()


def test_without_a_token_the_list_asks_for_one(server: HubServer, browser: Any) -> None:
    page = browser.new_page()
    traffic = Traffic(page, server.base)
    page.goto(f"{server.base}/viewer/")
    status = page.locator("#status")
    status.wait_for()
    page.wait_for_function("() => document.getElementById('status').textContent.length > 0")
    assert status.inner_text().startswith("Нет токена доступа")
    assert page.locator("#token-box").is_visible()
    assert not traffic.statuses("/dicomweb/")  # nothing asked of DICOMweb without a token
    # a token that does not verify gets the expired message
    page.fill("#token-input", "not.a.token")
    # the response is awaited, not looked up: Playwright may report it after the page has
    # already shown the message it led to
    with page.expect_response(lambda r: "/dicomweb/studies" in r.url) as answered:
        page.click("#token-box button")
    assert answered.value.status == 401
    page.wait_for_function(
        "() => document.getElementById('status').textContent.includes('недействителен')"
    )
    page.close()
