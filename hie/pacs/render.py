"""Rendered images and thumbnails (PS3.18 10.4.1.1.3 and 10.4.1.1.4): a frame of a stored
instance as a JPEG or PNG a browser shows.

Pure functions from Part 10 bytes and :class:`RenderOptions` to encoded image bytes:

1. decode one frame (pydicom with numpy; JPEG, JPEG-LS and JPEG 2000 through the pylibjpeg
   plugins, RLE natively; only that frame of an encapsulated multi-frame is decoded);
2. grey-scale images: Modality LUT (rescale slope and intercept, PS3.3 C.11.1), then the VOI
   transform — the window asked for, else the dataset's first window (PS3.3 C.11.2.1.2, the
   ``LINEAR``, ``LINEAR_EXACT`` and ``SIGMOID`` functions), else its VOI LUT, else the
   frame's own range — down to 8 bits; ``MONOCHROME1`` is inverted (PS3.3 C.7.6.3.1.2);
3. colour images: RGB as decoded (YBR converted to RGB), ``PALETTE COLOR`` through its
   lookup tables, scaled to 8 bits;
4. scaled to fit the viewport, keeping the aspect ratio (PS3.18 8.3.5.1.3), and encoded with
   Pillow.

Whatever cannot be rendered raises :class:`NotRenderable` (HTTP 406, a clear message naming
what is missing) — never an unexplained server error. Messages quote no patient data.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
)
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from hie.hub.errors import HieError, InvalidRequest

JPEG = "image/jpeg"
PNG = "image/png"
MEDIA_TYPES = (JPEG, PNG)  # what we render to; JPEG is the default (PS3.18 8.7.4)
THUMBNAIL_SIZE = 128  # pixels on the longer side when a thumbnail names no viewport
DEFAULT_QUALITY = 90
MAX_VIEWPORT = 4096
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")  # PS3.3 C.11.2.1.3.1


class NotRenderable(HieError):
    """The instance has no image this archive can render (no pixel data, a transfer syntax
    without a decoder here, an unsupported photometric interpretation), or none in the media
    types asked for."""

    code = "HIE-1320"
    status = 406
    issue = "not-supported"


class NoSuchFrame(HieError):
    """The frame number is outside the instance's frames (PS3.18 10.4.1.1.3)."""

    code = "HIE-1321"
    status = 404
    issue = "not-found"


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): ``center`` and ``width`` in modality units."""

    center: float
    width: float
    function: str = "LINEAR"


@dataclass(frozen=True)
class RenderOptions:
    """What to render: the frame (1-based), the window (None: the dataset's), the viewport
    to fit in (columns, rows; None: the image's own size), the media type and JPEG
    quality (1–100)."""

    frame: int = 1
    window: Window | None = None
    viewport: tuple[int, int] | None = None
    media_type: str = JPEG
    quality: int = DEFAULT_QUALITY


# --- query parameters (PS3.18 8.3.5.1) ---------------------------------------------------------


def parse_window(value: str | None) -> Window | None:
    """``window=center,width,function`` (PS3.18 8.3.5.1.4); None when absent."""
    if not value:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in (2, 3):
        raise InvalidRequest("window is center,width[,function]")
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise InvalidRequest("window center and width must be numbers") from None
    function = parts[2].upper() if len(parts) == 3 and parts[2] else "LINEAR"
    if function not in VOI_FUNCTIONS:
        raise InvalidRequest(f"window function must be one of {', '.join(VOI_FUNCTIONS)}")
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise InvalidRequest("window width must be positive and both finite")
    if function == "LINEAR" and width < 1:
        raise InvalidRequest("a LINEAR window is at least 1 wide (PS3.3 C.11.2.1.2.1)")
    return Window(center, width, function)


def parse_viewport(value: str | None) -> tuple[int, int] | None:
    """``viewport=vw,vh`` (PS3.18 8.3.5.1.3: the rendered size; one of them may be empty to
    keep the aspect ratio from the other); None when absent. The source-region form
    (``vw,vh,sx,sy,sw,sh``) is not supported."""
    if not value:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2:
        raise InvalidRequest("viewport is width,height (a source region is not supported)")
    try:
        w, h = (int(p) if p else 0 for p in parts)
    except ValueError:
        raise InvalidRequest("viewport width and height must be whole numbers") from None
    if w < 0 or h < 0 or (w == 0 and h == 0) or max(w, h) > MAX_VIEWPORT:
        raise InvalidRequest(f"viewport sides must be 1..{MAX_VIEWPORT} (one may be empty)")
    return (w, h)


def parse_quality(value: str | None) -> int:
    """``quality=1..100`` (PS3.18 8.3.5.1.2), the JPEG quality; the default when absent."""
    if not value:
        return DEFAULT_QUALITY
    try:
        q = int(value)
    except ValueError:
        raise InvalidRequest("quality must be a whole number 1..100") from None
    if not 1 <= q <= 100:
        raise InvalidRequest("quality must be 1..100")
    return q


def choose_media_type(accept: str | None) -> str:
    """The media type to answer with from an ``Accept`` header (PS3.18 8.7.4: JPEG unless
    the client prefers PNG); :class:`NotRenderable` when it accepts neither."""
    if not accept:
        return JPEG
    ranked: list[tuple[float, int, str]] = []
    for n, item in enumerate(accept.split(",")):
        kind, _, params = item.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            key, _, val = p.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(val)
                except ValueError:
                    q = 0.0
        kind = kind.strip().lower()
        if q > 0 and kind:
            ranked.append((-q, n, kind))
    for _, _, kind in sorted(ranked):
        if kind in MEDIA_TYPES:
            return kind
        if kind in ("*/*", "image/*"):
            return JPEG
    raise NotRenderable(f"rendered images are {' or '.join(MEDIA_TYPES)} only")


# --- decoding ----------------------------------------------------------------------------------


def read_dataset(p10: bytes) -> Dataset:
    """The dataset of a stored Part 10 file (pixel data left encoded until a frame is asked
    for)."""
    try:
        return dcmread(io.BytesIO(p10), force=True)
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        raise NotRenderable(f"the stored instance cannot be read: {type(exc).__name__}") from None


def number_of_frames(ds: Dataset) -> int:
    """(0028,0008) Number of Frames, 1 when absent or empty."""
    try:
        n = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n = 1
    return max(n, 1)


def decode_frame(ds: Dataset, frame: int = 1) -> NDArray[Any]:
    """One frame's stored values (rows × columns, × samples for colour; YBR converted to
    RGB). :class:`NoSuchFrame` outside 1..Number of Frames; :class:`NotRenderable` when there
    is no pixel data or no decoder for its transfer syntax."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise NotRenderable("the instance has no pixel data (not an image)")
    frames = number_of_frames(ds)
    if not 1 <= frame <= frames:
        raise NoSuchFrame(f"frame {frame} is outside 1..{frames}")
    ts = UID(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    try:
        return pixel_array(ds, index=frame - 1 if frames > 1 else None)
    except NotImplementedError:
        raise NotRenderable(f"no decoder here for transfer syntax {ts or '(none)'}") from None
    except (ValueError, RuntimeError, AttributeError, KeyError, TypeError, EOFError) as exc:
        what = ts.name if ts else "(none)"
        raise NotRenderable(
            f"the pixel data cannot be decoded ({what}): {type(exc).__name__}"
        ) from None


def dataset_window(ds: Dataset) -> Window | None:
    """The dataset's first VOI window (PS3.3 C.11.2: the first of several is the default),
    looked for at the top level, then in the functional groups of an enhanced image."""
    holders: list[Dataset] = [ds]
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(group)
        if seq:
            voi = seq[0].get("FrameVOILUTSequence")
            if voi:
                holders.append(voi[0])
    for h in holders:
        center, width = h.get("WindowCenter"), h.get("WindowWidth")
        if center is None or width is None or center == "" or width == "":
            continue
        c = _first(center)
        w = _first(width)
        if c is None or w is None or w <= 0:
            continue
        function = str(h.get("VOILUTFunction") or "LINEAR").upper()
        if function not in VOI_FUNCTIONS:
            function = "LINEAR"
        if function == "LINEAR" and w < 1:
            w = 1.0
        return Window(c, w, function)
    return None


def _first(value: Any) -> float | None:
    try:
        v = float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return v if math.isfinite(v) else None


def apply_window(values: NDArray[Any], window: Window) -> NDArray[np.uint8]:
    """Values in modality units → 0..255 through ``window`` (PS3.3 C.11.2.1.2.1 LINEAR,
    C.11.2.1.3.2 LINEAR_EXACT, C.11.2.1.3.1 SIGMOID)."""
    x = values.astype(np.float64, copy=False)
    c, w = window.center, window.width
    y: NDArray[Any]
    if window.function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    elif window.function == "LINEAR_EXACT":
        y = np.clip((x - c) / w + 0.5, 0.0, 1.0) * 255.0
    else:
        y = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0) if w > 1 else (x > c - 0.5) * 1.0
        y = y * 255.0
    return np.rint(y).astype(np.uint8)


def _stretch(values: NDArray[Any], low: float, high: float) -> NDArray[np.uint8]:
    """Values in ``low..high`` → 0..255 linearly (a flat image is mid-grey... or black)."""
    x = values.astype(np.float64, copy=False)
    if not high > low:
        return np.zeros(x.shape, dtype=np.uint8)
    return np.rint(np.clip((x - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)


def to_display(ds: Dataset, arr: NDArray[Any], options: RenderOptions) -> NDArray[np.uint8]:
    """Stored values of one frame → 8-bit display values (grey: rows × columns; colour:
    rows × columns × 3), as the module docstring describes."""
    photometric = str(ds.get("PhotometricInterpretation") or "").upper()
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2", ""):
        if arr.ndim != 2:
            raise NotRenderable(f"unexpected shape {arr.shape} for one grey-scale frame")
        index = options.frame - 1 if number_of_frames(ds) > 1 else 0
        values = apply_modality_lut(arr, ds)
        window = options.window or dataset_window(ds)
        if window is not None:
            out = apply_window(values, window)
        elif "VOILUTSequence" in ds:
            voi = apply_voi_lut(values, ds, index=index, prefer_lut=True)
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2] or 16)
            out = _stretch(voi, 0, float((1 << bits) - 1))
        else:
            finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
            low = float(finite.min()) if finite.size else 0.0
            high = float(finite.max()) if finite.size else 0.0
            out = _stretch(values, low, high)
        if photometric == "MONOCHROME1":  # minimum value is white
            out = 255 - out
        return out
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except (ValueError, KeyError, AttributeError) as exc:
            raise NotRenderable(f"the palette cannot be applied: {exc}") from None
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2] or 8)
        return _stretch(rgb, 0, float((1 << (16 if bits > 8 else 8)) - 1))
    if samples == 3 and arr.ndim == 3 and arr.shape[-1] == 3:
        if photometric not in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
            raise NotRenderable(f"photometric interpretation {photometric} is not supported")
        if arr.dtype == np.uint8:
            return np.ascontiguousarray(arr)
        bits = int(ds.get("BitsStored") or 8)
        return _stretch(arr, 0, float((1 << bits) - 1))
    raise NotRenderable(
        f"photometric interpretation {photometric or '(none)'} with {samples} samples per pixel"
        " is not supported"
    )


def fit(size: tuple[int, int], viewport: tuple[int, int]) -> tuple[int, int]:
    """The largest (columns, rows) with ``size``'s aspect ratio inside ``viewport`` (a 0 side
    follows from the other)."""
    cols, rows = size
    vw, vh = viewport
    scales = [s for s in (vw / cols if vw else 0.0, vh / rows if vh else 0.0) if s > 0]
    scale = min(scales)
    return (max(1, round(cols * scale)), max(1, round(rows * scale)))


def encode_image(pixels: NDArray[np.uint8], options: RenderOptions) -> bytes:
    """8-bit display values → JPEG or PNG bytes, scaled to fit the viewport."""
    img = Image.fromarray(pixels, mode=None)
    if options.viewport is not None:
        target = fit(img.size, options.viewport)
        if target != img.size:
            img = img.resize(target, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if options.media_type == PNG:
        img.save(out, format="PNG", optimize=False, compress_level=6)
    elif options.media_type == JPEG:
        img.save(out, format="JPEG", quality=options.quality)
    else:
        raise NotRenderable(f"rendered images are {' or '.join(MEDIA_TYPES)} only")
    return out.getvalue()


def render(p10: bytes | Dataset, options: RenderOptions | None = None) -> bytes:
    """One frame of a Part 10 file (or a dataset read from one) as encoded image bytes."""
    options = options or RenderOptions()
    ds = p10 if isinstance(p10, Dataset) else read_dataset(p10)
    arr = decode_frame(ds, options.frame)
    try:
        return encode_image(to_display(ds, arr, options), options)
    except HieError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError) as exc:
        # attributes that contradict the pixels (a LUT descriptor, a sample count): say so
        raise NotRenderable(f"the image cannot be rendered: {type(exc).__name__}") from None


def thumbnail_options(
    media_type: str = JPEG, viewport: tuple[int, int] | None = None, quality: int | None = None
) -> RenderOptions:
    """A thumbnail's options (PS3.18 10.4.1.1.4): the first frame, the dataset's window,
    :data:`THUMBNAIL_SIZE` on the longer side unless a viewport is given."""
    return RenderOptions(
        frame=1,
        viewport=viewport or (THUMBNAIL_SIZE, THUMBNAIL_SIZE),
        media_type=media_type,
        quality=quality or 80,
    )
