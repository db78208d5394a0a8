"""WADO-RS rendered images and thumbnails over HTTP on each resource-store backend: stored
instances come back as JPEG or PNG with the asked-for window and size, thumbnails are small,
access follows the archive's policy (404 for a study the caller may not see), every read is
audited against the patient, and what cannot be rendered gets a clear 406."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from hie.fhir.app import create_app
from hie.fhir.service import FhirService
from hie.hub.runtime import Hub, open_hub
from hie.pacs.storage import StorageService
from hie.registries.patient_index import attach_mpi
from tests.fixtures.auth import bearer
from tests.fixtures.dicom import (
    IMPLICIT,
    MO_A,
    MO_B,
    as_transaction,
    bundled_instance,
    ct_instance,
    dicom_registry,
    store_as,
    uid,
)


class Archive:
    """A hub with the DICOM MOs registered, an HTTP client and the storage service."""

    def __init__(self, hub: Hub, client: TestClient) -> None:
        self.hub = hub
        self.c = client
        svc = FhirService(hub.store, hub.settings)
        attach_mpi(svc)
        svc.transaction(as_transaction(dicom_registry()), "")
        self.storage = StorageService(svc, hub.blobs, hub.rejected)

    def send(self, ds: Any, ts: str = IMPLICIT) -> Any:
        return store_as(self.storage, ds, MO_A, ts)

    def url(self, ds: Any, tail: str = "rendered") -> str:
        return (
            f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}/{tail}"
        )


@pytest.fixture
def archive(store_url: str, settings_for: Any) -> Iterator[Archive]:
    settings = settings_for(store_url)
    hub = open_hub(settings)
    hub.store.migrate()
    app = create_app(settings, hub, start_worker=False)
    with TestClient(app, base_url="http://hub.test", headers=bearer(settings)) as c:
        yield Archive(hub, c)


def image(r: Any) -> Image.Image:
    return Image.open(io.BytesIO(r.content))


def test_an_instance_is_rendered_as_jpeg_by_default_and_png_on_request(archive: Archive) -> None:
    ds = ct_instance(size=64)
    archive.send(ds)
    r = archive.c.get(archive.url(ds))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    assert image(r).format == "JPEG" and image(r).size == (64, 64)
    assert r.headers["cache-control"] == "private, no-cache" and r.headers["etag"]
    png = archive.c.get(archive.url(ds), headers={"Accept": "image/png"})
    assert png.headers["content-type"] == "image/png" and image(png).mode == "L"
    # the accept query parameter (PS3.18 8.3.3.1) works as well
    assert archive.c.get(archive.url(ds) + "?accept=image/png").content == png.content


def test_window_viewport_and_quality(archive: Archive) -> None:
    ds = ct_instance(size=64, seed=3)  # stored 0..4095, rescale intercept -1024
    archive.send(ds, ExplicitVRLittleEndian)
    png = {"Accept": "image/png"}
    # a window far above every value paints the image black; far below, white
    black = np.asarray(image(archive.c.get(archive.url(ds) + "?window=9000,10", headers=png)))
    white = np.asarray(image(archive.c.get(archive.url(ds) + "?window=-5000,10", headers=png)))
    assert black.max() == 0 and white.min() == 255
    # the window is in modality units: stored value 1024 is 0 HU
    hu = np.asarray(image(archive.c.get(archive.url(ds) + "?window=0,1", headers=png)))
    stored = np.frombuffer(ds.PixelData, dtype="<u2").reshape(64, 64)
    np.testing.assert_array_equal(hu == 255, stored.astype(int) - 1024 >= 0)
    sized = archive.c.get(archive.url(ds) + "?viewport=32,16")
    assert image(sized).size == (16, 16)  # the aspect ratio is kept
    fine = archive.c.get(archive.url(ds) + "?quality=95").content
    coarse = archive.c.get(archive.url(ds) + "?quality=5").content
    assert len(coarse) < len(fine)
    for bad in ("window=1", "viewport=0,0", "quality=0"):
        r = archive.c.get(archive.url(ds) + "?" + bad)
        assert r.status_code == 400, bad
        assert r.json()["resourceType"] == "OperationOutcome"


def test_frames_of_a_compressed_multi_frame_instance(archive: Archive) -> None:
    ds = bundled_instance("SC_rgb_rle_2frame.dcm")
    archive.send(ds, RLELossless)
    png = {"Accept": "image/png"}
    one = np.asarray(image(archive.c.get(archive.url(ds, "frames/1/rendered"), headers=png)))
    two = np.asarray(image(archive.c.get(archive.url(ds, "frames/2/rendered"), headers=png)))
    assert one[0, 0].tolist() == [255, 0, 0] and two[0, 0].tolist() == [0, 255, 255]
    assert archive.c.get(archive.url(ds, "frames/3/rendered")).status_code == 404
    assert archive.c.get(archive.url(ds, "frames/1,2/rendered")).status_code == 400
    # the instance itself renders its first frame
    whole = np.asarray(image(archive.c.get(archive.url(ds), headers=png)))
    np.testing.assert_array_equal(whole, one)


def test_thumbnails_of_instance_series_and_study(archive: Archive) -> None:
    study, s1, s2 = uid(), uid(), uid()
    shown = []
    for n in range(1, 4):
        ds = ct_instance(study_uid=study, series_uid=s2, series_number=2, instance_number=n)
        archive.send(ds)
    for n in range(1, 4):
        ds = ct_instance(
            study_uid=study, series_uid=s1, series_number=1, instance_number=n, size=256, seed=n
        )
        archive.send(ds)
        shown.append(ds)
    r = archive.c.get(archive.url(shown[0], "thumbnail"))
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert image(r).size == (128, 128) and len(r.content) < 20_000
    series = archive.c.get(f"/dicomweb/studies/{study}/series/{s1}/thumbnail")
    middle = archive.c.get(archive.url(shown[1], "thumbnail"))
    assert series.status_code == 200 and series.content == middle.content
    # the study's thumbnail is the first series' (by Series Number) middle image
    whole = archive.c.get(f"/dicomweb/studies/{study}/thumbnail")
    assert whole.content == middle.content
    sized = archive.c.get(archive.url(shown[0], "thumbnail") + "?viewport=64,64")
    assert image(sized).size == (64, 64)


def test_unchanged_images_revalidate_with_304(archive: Archive) -> None:
    ds = ct_instance()
    archive.send(ds)
    first = archive.c.get(archive.url(ds))
    again = archive.c.get(archive.url(ds), headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    other = archive.c.get(
        archive.url(ds) + "?window=40,400", headers={"If-None-Match": first.headers["etag"]}
    )
    assert other.status_code == 200  # other options are another representation


def test_access_follows_the_archive_policy_and_reads_are_audited(archive: Archive) -> None:
    ds = ct_instance(patient_id="777")
    done = archive.send(ds)
    settings = archive.hub.settings
    own = bearer(settings, "radiologist", org=MO_A)
    stranger = bearer(settings, "radiologist", org=MO_B)
    assert archive.c.get(archive.url(ds), headers=own).status_code == 200
    assert archive.c.get(archive.url(ds), headers=stranger).status_code == 404
    study_thumb = f"/dicomweb/studies/{ds.StudyInstanceUID}/thumbnail"
    assert archive.c.get(study_thumb, headers=stranger).status_code == 404
    assert archive.c.get(archive.url(ds), headers={"Authorization": ""}).status_code == 401
    # the read is in the patient's audit trail, as a retrieve of the ImagingStudy
    ref = f"Patient/{done.patient_ref}"
    for _ in range(100):
        recs, _more = archive.hub.audit.records(refs=[ref], count=20)
        if any(rec.path.endswith("/rendered") for rec in recs):
            break
        time.sleep(0.05)
    rendered = [rec for rec in recs if rec.path.endswith("/rendered") and rec.status == 200]
    assert rendered and rendered[0].subtype == "retrieve"
    assert f"ImagingStudy/{done.imaging_study_id}" in rendered[0].entities


def test_what_cannot_be_rendered_gets_a_clear_406(archive: Archive) -> None:
    ds = ct_instance()
    archive.send(ds)
    r = archive.c.get(archive.url(ds), headers={"Accept": "application/dicom"})
    assert r.status_code == 406 and "image/jpeg" in r.json()["issue"][0]["diagnostics"]
    sr = bundled_instance("test-SR.dcm")
    archive.send(sr)
    r = archive.c.get(archive.url(sr))
    assert r.status_code == 406
    assert "no pixel data" in r.json()["issue"][0]["diagnostics"]
    lossy = bundled_instance("JPEG-lossy.dcm")  # 12-bit JPEG no installed decoder reads
    archive.send(lossy, str(lossy.file_meta.TransferSyntaxUID))
    r = archive.c.get(archive.url(lossy))
    assert r.status_code == 406 and "cannot be decoded" in r.json()["issue"][0]["diagnostics"]
    missing = f"/dicomweb/studies/{uid()}/series/{uid()}/instances/{uid()}/rendered"
    assert archive.c.get(missing).status_code == 404
