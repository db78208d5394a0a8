"""Rendered images (hie.pacs.render) from pydicom's bundled test files: every transfer syntax
renders the same picture, the VOI and Modality LUT steps follow PS3.3, colour comes out as
RGB, and what cannot be rendered says why."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from hie.hub.errors import InvalidRequest
from hie.pacs.render import (
    JPEG,
    PNG,
    THUMBNAIL_SIZE,
    NoSuchFrame,
    NotRenderable,
    RenderOptions,
    Window,
    apply_window,
    choose_media_type,
    dataset_window,
    fit,
    parse_quality,
    parse_viewport,
    parse_window,
    render,
    thumbnail_options,
)


def path(name: str) -> str:
    found = get_testdata_file(name)
    assert found is not None, name
    return str(found)


def raw(name: str) -> bytes:
    return Path(path(name)).read_bytes()


def pixels(data: bytes) -> NDArray[np.uint8]:
    return np.asarray(Image.open(io.BytesIO(data)))


def png(source: bytes | Dataset, **options: object) -> NDArray[np.uint8]:
    return pixels(render(source, RenderOptions(media_type=PNG, **options)))  # type: ignore[arg-type]


# --- the VOI transform (PS3.3 C.11.2.1.2) ------------------------------------------------------


def test_linear_window_maps_the_window_onto_the_display_range() -> None:
    hu = np.array([-1000, -160.5, 40, 239.5, 3000], dtype=np.int16)
    out = apply_window(hu, Window(center=40, width=400))
    assert out.dtype == np.uint8
    assert out[0] == 0 and out[1] == 0  # at and below c - 0.5 - (w-1)/2
    assert out[3] == 255 and out[4] == 255  # above c - 0.5 + (w-1)/2
    assert abs(int(out[2]) - 128) <= 1  # the centre is mid-grey


def test_linear_exact_and_sigmoid_windows() -> None:
    x = np.array([-200.0, 0.0, 200.0])
    exact = apply_window(x, Window(0, 400, "LINEAR_EXACT"))
    assert exact.tolist() == [0, 128, 255]
    sigmoid = apply_window(x, Window(0, 400, "SIGMOID"))
    # PS3.3 C.11.2.1.3.1: y = 255 / (1 + exp(-4 (x - c) / w)); at c ± w/2 that is e^∓2
    assert sigmoid.tolist() == [30, 128, 225]
    assert (np.diff(apply_window(np.arange(-300, 300), Window(0, 400, "SIGMOID"))) >= 0).all()


def test_dataset_window_is_the_first_of_several() -> None:
    ds = Dataset()
    ds.WindowCenter = ["40", "300"]
    ds.WindowWidth = ["400", "1500"]
    assert dataset_window(ds) == Window(40.0, 400.0, "LINEAR")
    ds.VOILUTFunction = "SIGMOID"
    assert dataset_window(ds) == Window(40.0, 400.0, "SIGMOID")
    assert dataset_window(Dataset()) is None


def test_the_window_applies_after_the_modality_lut() -> None:
    """CT_small stores values with intercept -1024: a window in Hounsfield units must see
    them rescaled."""
    ds = dcmread(path("CT_small.dcm"))
    stored = ds.pixel_array.astype(np.float64)
    hu = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    out = png(raw("CT_small.dcm"), window=Window(40, 400))
    assert out.shape == stored.shape
    np.testing.assert_array_equal(out, apply_window(hu, Window(40, 400)))
    assert 0 < out.mean() < 255


def test_without_any_window_the_frame_range_is_stretched() -> None:
    ds = dcmread(path("CT_small.dcm"))
    assert "WindowCenter" not in ds
    out = png(ds)
    assert out.min() == 0 and out.max() == 255


def test_the_dataset_window_is_the_default() -> None:
    ds = dcmread(path("MR_small.dcm"))
    assert float(ds.WindowCenter) == 600 and float(ds.WindowWidth) == 1600
    np.testing.assert_array_equal(png(ds), apply_window(ds.pixel_array, Window(600, 1600)))
    # a window asked for wins over the dataset's
    narrow = png(ds, window=Window(600, 200))
    assert (narrow == 0).sum() > (png(ds) == 0).sum()


def test_monochrome1_is_inverted() -> None:
    ds = dcmread(path("MR_small.dcm"))
    normal = png(ds)
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_array_equal(png(ds), 255 - normal)


# --- every transfer syntax renders the same picture ---------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",  # RLE Lossless (pydicom's own decoder)
        "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless (pylibjpeg-openjpeg)
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless (pylibjpeg-libjpeg)
        "MR_small_bigendian.dcm",  # Explicit VR Big Endian
        "MR_small_implicit.dcm",
    ],
)
def test_lossless_syntaxes_render_like_the_uncompressed_original(name: str) -> None:
    np.testing.assert_array_equal(png(raw(name)), png(raw("MR_small.dcm")))


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "693_J2KI.dcm", "JPEG2000.dcm"])
def test_lossy_grey_scale_syntaxes_render(name: str) -> None:
    ds = dcmread(path(name))
    out = png(raw(name))
    assert out.shape == (ds.Rows, ds.Columns) and out.max() > out.min()


# --- colour --------------------------------------------------------------------------------------


def test_rgb_comes_out_as_rgb() -> None:
    """SC_rgb_rle: bands of red, green, blue, black, grey, white (top to bottom)."""
    out = png(raw("SC_rgb_rle.dcm"))
    assert out.shape == (100, 100, 3)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[20, 0].tolist() == [0, 255, 0]
    assert out[40, 0].tolist() == [0, 0, 255]
    assert out[99, 99].tolist() == [255, 255, 255]
    # 16 bits per sample scale down to the same picture
    np.testing.assert_array_equal(png(raw("SC_rgb_rle_16bit.dcm")), out)


def test_ybr_is_converted_to_rgb() -> None:
    ybr = png(raw("SC_ybr_full_422_uncompressed.dcm"))
    rgb = png(raw("SC_rgb_rle.dcm"))
    assert np.abs(ybr.astype(int) - rgb.astype(int)).max() <= 8  # colour-space rounding


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_jls_lossy_line.dcm"])
def test_compressed_colour_renders(name: str) -> None:
    out = png(raw(name))
    assert out.ndim == 3 and out.shape[2] == 3
    assert out[0, 0, 0] > 200 and out[0, 0, 1] < 60  # the red band survives compression


def test_palette_colour_goes_through_its_lookup_tables() -> None:
    ds = dcmread(path("examples_palette.dcm"))
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    out = png(ds)
    assert out.shape == (ds.Rows, ds.Columns, 3) and len(np.unique(out.reshape(-1, 3), axis=0)) > 8


def test_frames_of_a_multi_frame_instance() -> None:
    first = png(raw("SC_rgb_rle_2frame.dcm"), frame=1)
    second = png(raw("SC_rgb_rle_2frame.dcm"), frame=2)
    assert first[0, 0].tolist() == [255, 0, 0]
    assert second[0, 0].tolist() == [0, 255, 255]  # the second frame is the first inverted
    with pytest.raises(NoSuchFrame):
        render(raw("SC_rgb_rle_2frame.dcm"), RenderOptions(frame=3))
    with pytest.raises(NoSuchFrame):
        render(raw("MR_small.dcm"), RenderOptions(frame=2))


# --- sizes and encodings -------------------------------------------------------------------------


def test_viewport_fits_keeping_the_aspect_ratio() -> None:
    assert fit((512, 256), (128, 128)) == (128, 64)
    assert fit((256, 1024), (0, 100)) == (25, 100)
    assert fit((64, 64), (200, 0)) == (200, 200)
    out = pixels(render(raw("JPEG2000.dcm"), RenderOptions(viewport=(100, 100))))
    assert out.shape == (100, 25)  # 1024 rows × 256 columns


def test_thumbnail_is_small_jpeg() -> None:
    data = render(raw("liver_1frame.dcm"), thumbnail_options())
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and max(img.size) == THUMBNAIL_SIZE
    assert len(data) < 16_000


def test_jpeg_by_default_and_quality_matters() -> None:
    fine = render(raw("liver_1frame.dcm"), RenderOptions(quality=95))
    coarse = render(raw("liver_1frame.dcm"), RenderOptions(quality=10))
    assert fine[:3] == b"\xff\xd8\xff" and coarse[:3] == b"\xff\xd8\xff"
    assert len(coarse) < len(fine) / 2
    assert render(raw("MR_small.dcm"), RenderOptions(media_type=PNG))[:8] == b"\x89PNG\r\n\x1a\n"


# --- what cannot be rendered says why ------------------------------------------------------------


@pytest.mark.parametrize("name", ["test-SR.dcm", "rtplan.dcm", "waveform_ecg.dcm"])
def test_instances_without_an_image_are_not_renderable(name: str) -> None:
    with pytest.raises(NotRenderable, match="no pixel data") as err:
        render(raw(name))
    assert err.value.status == 406


def test_pixel_data_without_a_working_decoder_is_not_renderable() -> None:
    """JPEG-lossy.dcm is 12-bit JPEG Extended that no installed decoder reads."""
    with pytest.raises(NotRenderable, match="JPEG Extended"):
        render(raw("JPEG-lossy.dcm"))


def test_bytes_that_are_not_dicom_are_not_renderable() -> None:
    with pytest.raises(NotRenderable):
        render(b"\x00" * 10)


# --- query parameters (PS3.18 8.3.5.1) -----------------------------------------------------------


def test_parse_window() -> None:
    assert parse_window(None) is None
    assert parse_window("40,400") == Window(40, 400, "LINEAR")
    assert parse_window("-600,1500,sigmoid") == Window(-600, 1500, "SIGMOID")
    for bad in ("40", "a,b", "40,0", "40,400,cubic", "nan,400", "1,2,3,4"):
        with pytest.raises(InvalidRequest):
            parse_window(bad)


def test_parse_viewport_and_quality() -> None:
    assert parse_viewport("256,256") == (256, 256)
    assert parse_viewport(",300") == (0, 300)
    for bad in ("0,0", "10", "a,b", "10,10,0,0,5,5", "99999,1", "-5,10"):
        with pytest.raises(InvalidRequest):
            parse_viewport(bad)
    assert parse_quality(None) == 90 and parse_quality("50") == 50
    for bad in ("0", "101", "x"):
        with pytest.raises(InvalidRequest):
            parse_quality(bad)


def test_media_type_from_accept() -> None:
    assert choose_media_type(None) == JPEG
    assert choose_media_type("*/*") == JPEG
    assert choose_media_type("image/png") == PNG
    assert choose_media_type("image/jpeg;q=0.5, image/png") == PNG
    assert choose_media_type("image/png;q=0.2, image/jpeg;q=0.9") == JPEG
    assert choose_media_type("image/gif, image/*;q=0.1") == JPEG
    with pytest.raises(NotRenderable):
        choose_media_type("application/dicom")
    with pytest.raises(NotRenderable):
        choose_media_type("image/png;q=0")
