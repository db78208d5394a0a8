"""The DICOM JSON Model (PS3.18 Annex F): attributes as ``{"ggggeeee": {"vr": …, "Value":
[…]}}``, the body of QIDO-RS answers, WADO-RS metadata and STOW-RS responses.

Three sources become JSON here:

- :func:`element` — one attribute by keyword, with its VR from the data dictionary (what
  the archive writes itself: STOW-RS responses, retrieve URLs);
- :func:`attributes` — the keyword → value maps the DICOM index answers queries with
  (values as DICOM encodes them: dates ``YYYYMMDD``, multiple values backslash-separated);
- :func:`dataset` — a dataset read from a stored file, where binary values longer than a
  threshold become a ``BulkDataURI`` (PS3.18 F.2.6) that WADO-RS serves on request, so
  metadata never carries pixel data or other large blobs inline.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from hie.hub.logging import get_logger

log = get_logger("hie.pacs.dicom_json")

Json = dict[str, Any]

BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
INT_VRS = frozenset({"IS", "SL", "SS", "SV", "UL", "US", "UV"})
FLOAT_VRS = frozenset({"DS", "FL", "FD"})
SINGLE_VALUED = frozenset({"LT", "ST", "UT", "UR"})  # a backslash is text, not a separator
DEFAULT_BULK_THRESHOLD = 1024  # bytes: binary values above this are served as bulk data


def tag_hex(tag: int) -> str:
    """``ggggeeee`` in upper-case hex, as DICOM JSON names attributes."""
    return f"{tag:08X}"


def keyword_tag(keyword: str) -> int | None:
    """The tag of a keyword in the data dictionary (None if unknown)."""
    tag = tag_for_keyword(keyword)
    return int(tag) if tag is not None else None


def vr_of(tag: int) -> str:
    """The VR the dictionary gives ``tag`` (the first of ambiguous ones; ``UN`` if none)."""
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        return "UN"
    return vr.split(" or ", 1)[0]


def _number(vr: str, text: str) -> int | float | str:
    try:
        return int(text) if vr in INT_VRS else float(text)
    except ValueError:
        return text  # a malformed number is shown as sent rather than dropped


def _values(vr: str, value: Any) -> list[Any]:
    if isinstance(value, str):
        parts = [value] if vr in SINGLE_VALUED else value.split("\\")
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        parts = [value]
    out: list[Any] = []
    for v in parts:
        if vr == "SQ":
            out.append(v)
        elif vr == "PN":
            out.append({"Alphabetic": str(v)} if str(v) else {})
        elif vr in INT_VRS | FLOAT_VRS:
            out.append(v if isinstance(v, int | float) else _number(vr, str(v).strip()))
        else:
            out.append(str(v))
    return out


def element(keyword: str, value: Any) -> Json:
    """One attribute by keyword: ``{tag: {"vr": vr, "Value": [...]}}``; ``None`` or ``""``
    give the attribute with no value (zero length). Sequences take a list of JSON items."""
    tag = keyword_tag(keyword)
    if tag is None:
        raise KeyError(f"no DICOM keyword {keyword!r}")
    return {tag_hex(tag): _json_value(vr_of(tag), value)}


def _json_value(vr: str, value: Any) -> Json:
    if value is None or value == "" or value == []:
        return {"vr": vr}
    return {"vr": vr, "Value": _values(vr, value)}


def attributes(attrs: Mapping[str, Any], keep: Callable[[str], bool] | None = None) -> Json:
    """The keyword → value map of an index match as a DICOM JSON object (ordered by tag,
    PS3.18 F.2.1); unknown keywords (internal ones start with ``_``) are left out, and so are
    those ``keep`` refuses."""
    out: list[tuple[int, Json]] = []
    for keyword, value in attrs.items():
        if keyword.startswith("_") or (keep is not None and not keep(keyword)):
            continue
        tag = keyword_tag(keyword)
        if tag is None:
            continue
        out.append((tag, _json_value(vr_of(tag), value)))
    return {tag_hex(t): v for t, v in sorted(out, key=lambda x: x[0])}


def dataset(
    ds: Dataset,
    bulk_uri: Callable[[Sequence[str]], str],
    threshold: int = DEFAULT_BULK_THRESHOLD,
    path: tuple[str, ...] = (),
) -> Json:
    """``ds`` as DICOM JSON; a binary value over ``threshold`` bytes becomes a
    ``BulkDataURI`` made by ``bulk_uri`` from its path (tags and item indexes, as hex and
    decimal strings: ``("00091010",)``, ``("00400260", "0", "00091010")``)."""
    out: Json = {}
    for elem in ds:
        tag = int(elem.tag)
        if tag & 0xFFFF == 0 or tag >> 16 == 0x0002:  # group lengths, file meta
            continue
        key = tag_hex(tag)
        out[key] = _element(elem, bulk_uri, threshold, (*path, key))
    return out


def _element(
    elem: DataElement,
    bulk_uri: Callable[[Sequence[str]], str],
    threshold: int,
    path: tuple[str, ...],
) -> Json:
    vr = str(elem.VR)
    if vr == "SQ":
        items = [
            dataset(item, bulk_uri, threshold, (*path, str(i)))
            for i, item in enumerate(elem.value or [])
        ]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    if vr in BULK_VRS:
        raw = elem.value
        if raw is None or len(raw) == 0:
            return {"vr": vr}
        if len(raw) > threshold:
            return {"vr": vr, "BulkDataURI": bulk_uri(path)}
        data = raw if isinstance(raw, bytes) else bytes(raw)
        return {"vr": vr, "InlineBinary": base64.b64encode(data).decode("ascii")}
    try:
        return dict(elem.to_json_dict(None, threshold))
    except (ValueError, TypeError, AttributeError) as exc:  # an undecodable value
        log.info("dicom_json.undecodable", tag=tag_hex(int(elem.tag)), error=type(exc).__name__)
        return {"vr": vr}


def parse_tag_or_keyword(text: str) -> int | None:
    """A tag given as ``ggggeeee`` hex or as a keyword (QIDO-RS 8.3.4), or None."""
    text = text.strip()
    if len(text) == 8 and all(c in "0123456789abcdefABCDEF" for c in text):
        return int(text, 16)
    tag = keyword_tag(text)
    if tag is not None:
        return tag
    return None


def keyword_of(tag: int) -> str | None:
    """The dictionary keyword of ``tag`` (None for private or unknown tags)."""
    from pydicom.datadict import keyword_for_tag

    word = keyword_for_tag(Tag(tag))
    return word or None
