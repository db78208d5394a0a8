"""Reading stored instances for WADO-RS: headers, bulk data and frames, straight from the
blob store without loading a file whole.

A stored instance is a Part 10 file in the blob store (:mod:`hie.pacs.storage`).
:class:`BlobFile` makes one a seekable, buffered file over the store's ranged reads, so
pydicom reads the header up to the pixel data (``stop_before_pixels``) and stops there, and
the pixel data is reached by offset:

- native (uncompressed) pixel data: frame *n* is the byte range
  ``[start + (n-1)·size, start + n·size)`` of the value, with ``size = Rows · Columns ·
  Samples per Pixel · Bits Allocated / 8`` (PS3.5 8.1.1, PS3.3 C.7.6.3);
- encapsulated (compressed) pixel data (PS3.5 A.4): the items are walked by their headers
  only, and frame *n* is the fragments the Extended or Basic Offset Table assigns it — or,
  without a table, one fragment per frame when the counts agree, else the fragments from
  one start-of-image marker to the next (JPEG SOI, JPEG 2000 SOC).

A deflated dataset (1.2.840.10008.1.2.1.99) cannot be entered by offset: it is inflated
whole by pydicom (deflate is rare, and only for small non-image objects in practice).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from hie.hub.blobs.port import BlobStore
from hie.hub.errors import InvalidRequest, NotFound, StorageError
from hie.pacs.dicomweb import NotAcceptable

_READ_AHEAD = 256 << 10  # bytes fetched per ranged read (a header is usually one fetch)
_PIXEL_DATA = 0x7FE00010
_ITEM = 0xFFFEE000
_SEQUENCE_END = 0xFFFEE0DD
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN"})
_LONG_VRS |= {b"UR", b"UT", b"UV"}

# PS3.18 Table 8.7.3-5 (and 8.7.4): the media type of a frame in each transfer syntax
NATIVE = frozenset(
    {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
    }
)
EXPLICIT_LE = "1.2.840.10008.1.2.1"
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.100": "video/mpeg2",
    "1.2.840.10008.1.2.4.101": "video/mpeg2",
    "1.2.840.10008.1.2.4.102": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
}


def frame_media_type(transfer_syntax: str) -> tuple[str, str]:
    """``(media type, transfer syntax)`` of the frames of an instance stored in
    ``transfer_syntax``: native pixel data is served as little endian octets (PS3.18 8.7.3.3.2)."""
    if transfer_syntax in NATIVE:
        return "application/octet-stream", EXPLICIT_LE
    return FRAME_MEDIA_TYPES.get(transfer_syntax, "application/octet-stream"), transfer_syntax


class BlobFile(io.RawIOBase):
    """A stored blob as a seekable binary file (ranged reads of the blob store)."""

    def __init__(self, blobs: BlobStore, key: str, size: int) -> None:
        super().__init__()
        self.blobs, self.key, self.size, self.pos = blobs, key, size, 0
        self.name = f"blob:{key}"  # pydicom names its datasets after their file

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        want = min(len(buffer), self.size - self.pos)
        if want <= 0:
            return 0
        got = 0
        for chunk in self.blobs.open(self.key, self.pos, self.pos + want):
            buffer[got : got + len(chunk)] = chunk
            got += len(chunk)
        self.pos += got
        return got


def open_blob(blobs: BlobStore, key: str, size: int) -> io.BufferedReader:
    """A buffered, seekable reader over a stored blob."""
    return io.BufferedReader(BlobFile(blobs, key, size), buffer_size=_READ_AHEAD)


@dataclass(frozen=True, slots=True)
class PixelData:
    """Where an instance's Pixel Data value is in its file."""

    start: int  # first byte of the value (after the element header)
    length: int | None  # None: undefined (encapsulated)
    transfer_syntax: str


@dataclass(slots=True)
class Header:
    """An instance's dataset up to its pixel data, and where the pixel data is."""

    ds: Dataset
    transfer_syntax: str
    pixels: PixelData | None


def read_header(blobs: BlobStore, key: str, size: int) -> Header:
    """The header of the stored instance ``key`` (:class:`StorageError` if the stored file
    cannot be read: it was checked on the way in, so that is the store's fault)."""
    with open_blob(blobs, key, size) as fp:
        try:
            ds = dcmread(fp, stop_before_pixels=True)
        except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError) as exc:
            raise StorageError(f"stored instance {key} cannot be read") from exc
        ts = str(ds.file_meta.TransferSyntaxUID)
        if UID(ts).is_deflated:
            return Header(ds, ts, None)
        at = fp.tell()
        head = fp.read(12)
    return Header(ds, ts, _pixel_data(head, at, ts))


def _pixel_data(head: bytes, at: int, ts: str) -> PixelData | None:
    """The Pixel Data element whose header starts at ``at`` (None if the dataset ends, or
    something else follows: float pixel data, trailing padding)."""
    uid = UID(ts)
    little = uid.is_little_endian
    if len(head) < 8:
        return None
    group, elem = struct.unpack_from("<HH" if little else ">HH", head)
    if (group << 16 | elem) != _PIXEL_DATA:
        return None
    u32 = "<I" if little else ">I"
    if uid.is_implicit_VR:
        length, start = struct.unpack_from(u32, head, 4)[0], at + 8
    elif head[4:6] in _LONG_VRS:
        length, start = struct.unpack_from(u32, head, 8)[0], at + 12
    else:  # pragma: no cover - Pixel Data is OB or OW
        return None
    return PixelData(start, None if length == 0xFFFFFFFF else length, ts)


def read_full(blobs: BlobStore, key: str) -> Dataset:
    """The whole dataset (for what cannot be reached by offset: deflated files)."""
    data = b"".join(blobs.open(key))
    return dcmread(io.BytesIO(data))


# --- frames ------------------------------------------------------------------------------


def number_of_frames(ds: Dataset) -> int:
    """Number of Frames (0028,0008), 1 when absent."""
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def native_frame_size(ds: Dataset) -> int:
    """Bytes of one uncompressed frame (:class:`NotAcceptable` for single-bit frames, which
    are not byte-aligned: retrieve the whole pixel data instead)."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise NotFound("the instance has no image pixel description") from exc
    if bits % 8:
        raise NotAcceptable("frames of single-bit pixel data are not served one by one")
    return rows * cols * samples * bits // 8


def parse_frame_list(text: str, n_frames: int) -> list[int]:
    """``1,3,5`` (PS3.18 8.3.3.1: 1-based frame numbers) → frame numbers;
    :class:`InvalidRequest` if malformed, :class:`NotFound` if past the last frame."""
    out: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise InvalidRequest(f"frame list {text!r}: frame numbers are integers from 1")
        out.append(int(item))
    if not out:
        raise InvalidRequest("an empty frame list")
    over = [n for n in out if n > n_frames]
    if over:
        raise NotFound(f"the instance has {n_frames} frame(s); there is no frame {over[0]}")
    return out


def native_frames(
    blobs: BlobStore, key: str, hdr: Header, frames: Sequence[int]
) -> Iterator[Iterator[bytes]]:
    """Each requested frame of native pixel data as a stream of chunks (little endian)."""
    assert hdr.pixels is not None and hdr.pixels.length is not None
    size = native_frame_size(hdr.ds)
    swap = not UID(hdr.transfer_syntax).is_little_endian and int(hdr.ds.BitsAllocated) > 8
    for n in frames:
        start = hdr.pixels.start + (n - 1) * size
        end = min(start + size, hdr.pixels.start + hdr.pixels.length)
        if swap:  # explicit VR big endian (retired): served little endian
            yield iter([_byteswap(b"".join(blobs.open(key, start, end)), hdr)])
        else:
            yield blobs.open(key, start, end)


def native_value(blobs: BlobStore, key: str, hdr: Header) -> bytes:
    """The whole native Pixel Data value (little endian)."""
    assert hdr.pixels is not None and hdr.pixels.length is not None
    start = hdr.pixels.start
    data = b"".join(blobs.open(key, start, start + hdr.pixels.length))
    if not UID(hdr.transfer_syntax).is_little_endian and int(hdr.ds.BitsAllocated) > 8:
        return _byteswap(data, hdr)
    return data


def _byteswap(data: bytes, hdr: Header) -> bytes:
    import numpy as np

    width = int(hdr.ds.BitsAllocated) // 8
    arr = np.frombuffer(data[: len(data) - len(data) % width], dtype=f">u{width}")
    return bytes(arr.astype(f"<u{width}").tobytes())


@dataclass(frozen=True, slots=True)
class Fragment:
    """One item of encapsulated pixel data: where its bytes are."""

    offset: int  # of the item's tag, relative to the first fragment's (offset tables count so)
    start: int  # first byte of its value in the file
    length: int


def _items(fp: io.BufferedReader, start: int, little: bool) -> Iterator[tuple[int, int]]:
    """``(value start, length)`` of each item of an encapsulated value beginning at
    ``start`` (the Basic Offset Table first)."""
    fmt = "<HHI" if little else ">HHI"
    pos = start
    while True:
        fp.seek(pos)
        head = fp.read(8)
        if len(head) < 8:
            raise StorageError("encapsulated pixel data ends without its delimiter")
        group, elem, length = struct.unpack(fmt, head)
        tag = group << 16 | elem
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM or length == 0xFFFFFFFF:
            raise StorageError("encapsulated pixel data is malformed")
        yield pos + 8, length
        pos += 8 + length


def _offset_table(ds: Dataset, bot: bytes, little: bool) -> list[int] | None:
    """Frame offsets from the Extended Offset Table (7FE0,0001) or the Basic Offset Table."""
    eot = ds.get("ExtendedOffsetTable")
    if eot:
        n = len(eot) // 8
        return list(struct.unpack(("<" if little else ">") + f"{n}Q", bytes(eot)[: n * 8]))
    if bot:
        n = len(bot) // 4
        return list(struct.unpack(("<" if little else ">") + f"{n}I", bot[: n * 4]))
    return None


def _starts_image(head: bytes) -> bool:
    # JPEG SOI (PS3.5 A.4.1 / ITU T.81), JPEG 2000 codestream SOC+SIZ, JP2 signature box
    return head[:2] == b"\xff\xd8" or head[:4] == b"\xff\x4f\xff\x51" or head[4:8] == b"jP  "


def encapsulated_frames(
    blobs: BlobStore, key: str, size: int, hdr: Header, frames: Sequence[int]
) -> list[list[Fragment]]:
    """The fragments of each requested frame of encapsulated pixel data (module docstring)."""
    assert hdr.pixels is not None
    little = UID(hdr.transfer_syntax).is_little_endian
    n_frames = number_of_frames(hdr.ds)
    with open_blob(blobs, key, size) as fp:
        items = list(_items(fp, hdr.pixels.start, little))
        if not items:
            raise StorageError("encapsulated pixel data without a Basic Offset Table item")
        bot_start, bot_len = items[0]
        fp.seek(bot_start)
        bot = fp.read(bot_len)
        first = items[1][0] - 8 if len(items) > 1 else 0
        fragments = [Fragment(s - 8 - first, s, n) for s, n in items[1:]]
        table = _offset_table(hdr.ds, bot, little)
        if n_frames == 1:
            groups = [fragments]
        elif table is not None and len(table) >= n_frames:
            groups = [
                [f for f in fragments if lo <= f.offset < hi]
                for lo, hi in zip(table[:n_frames], [*table[1:n_frames], 1 << 62], strict=True)
            ]
        elif len(fragments) == n_frames:
            groups = [[f] for f in fragments]
        else:
            groups = []
            for f in fragments:
                fp.seek(f.start)
                if not groups or _starts_image(fp.read(8)):
                    groups.append([])
                groups[-1].append(f)
    if len(groups) < n_frames:
        raise StorageError("the frames of the encapsulated pixel data cannot be told apart")
    return [groups[n - 1] for n in frames]


def fragment_bytes(blobs: BlobStore, key: str, fragments: Sequence[Fragment]) -> Iterator[bytes]:
    """The bytes of a frame's fragments, in order."""
    for f in fragments:
        yield from blobs.open(key, f.start, f.start + f.length)


def bulk_value(ds: Dataset, path: Sequence[str]) -> bytes:
    """The value of the binary element ``path`` names in a header (tags and item indexes,
    as :func:`hie.pacs.dicom_json.dataset` built it); :class:`NotFound` if there is none."""
    node: Dataset = ds
    steps = list(path)
    try:
        while steps:
            tag = int(steps.pop(0), 16)
            if tag not in node:
                raise NotFound("no such bulk data in the instance")
            elem = node[tag]
            if not steps:
                value = elem.value
                if not isinstance(value, bytes | bytearray):
                    raise NotFound("the element is not bulk data")
                return bytes(value)
            node = elem.value[int(steps.pop(0))]
    except (ValueError, IndexError, TypeError) as exc:
        raise NotFound("no such bulk data in the instance") from exc
    raise NotFound("no such bulk data in the instance")
