"""What a document body really is, whether it matches its declared type, and its text.

Pure functions over the bytes given (no I/O), used when a document is published (IHE MHD
ITI-65: ``DocumentReference.content.attachment.contentType`` is checked against the body) and by
the outbox worker that extracts text for full-text search.

* :func:`sniff` names the media type the bytes are.
* :func:`check_declared` says why a declared ``contentType`` does not fit the bytes, or ``None``.
* :func:`extract_text` returns the searchable text as an :class:`Extracted`; it never raises on
  bad input, a body that cannot be read is reported as not indexable with a reason.

CDA R2 documents are reported as :data:`CDA_MEDIA_TYPE` (``application/hl7-cda+xml``, the type
HL7 uses for CDA); ``text/xml`` and ``application/xml`` are accepted as declarations of a CDA too,
since IHE XDS/MHD publishers commonly send CDA as ``text/xml`` and say "CDA" in ``formatCode``.

XML safety: XML is parsed with expat directly. Any ``<!ENTITY`` declaration (internal or
external, general or parameter) is refused before it is used, so neither entity expansion
("billion laughs") nor external entities (XXE) can happen; parameter entities and external DTDs
are never loaded. Clinical documents have no legitimate need for a DTD.
"""

from __future__ import annotations

import codecs
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any, Final
from xml.etree.ElementTree import Element, TreeBuilder
from xml.parsers import expat

PDF: Final = "application/pdf"
DICOM: Final = "application/dicom"
CDA_MEDIA_TYPE: Final = "application/hl7-cda+xml"
XML: Final = "application/xml"
HTML: Final = "text/html"
TEXT: Final = "text/plain"
OCTET_STREAM: Final = "application/octet-stream"

#: Extracted text is cut at this many characters (about 1 MB of mostly-ASCII text, 2 MB of
#: Cyrillic in UTF-8): enough for any clinical document, bounded for the search index.
MAX_TEXT_CHARS: Final = 1_000_000

HL7_V3_NS: Final = "urn:hl7-org:v3"
_CDA_ROOT: Final = "{urn:hl7-org:v3}ClinicalDocument"

# Declared types each family answers to. Aliases are the ones seen in the wild from MIS vendors.
_PDF_TYPES: Final = frozenset({PDF, "application/x-pdf"})
_DICOM_TYPES: Final = frozenset({DICOM})
_CDA_TYPES: Final = frozenset({CDA_MEDIA_TYPE, "application/cda+xml"})
_XML_TYPES: Final = frozenset({XML, "text/xml"})
_HTML_TYPES: Final = frozenset({HTML, "application/xhtml+xml"})

# Only the first bytes are needed to name a type; the rest is read when text is extracted.
_SNIFF_BYTES: Final = 64 * 1024
# A DICOM Part 10 file: 128-byte preamble, then "DICM" (PS3.10 §7.1).
_DICOM_MAGIC_OFFSET: Final = 128
# C0 controls other than TAB, LF, FF, CR (and DEL) do not occur in text; they mark binary data.
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_MEDIA_TYPE: Final = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
_META_CHARSET: Final = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.I)


@dataclass(frozen=True, slots=True)
class Extracted:
    """The searchable text of one document body.

    ``indexable`` is False when no text could be read (``reason`` says why: "encrypted", a parse
    failure, an unsupported type); ``truncated`` is True when ``text`` was cut at
    :data:`MAX_TEXT_CHARS`. ``pages`` is set for PDFs, ``title`` when the format carries one.
    """

    text: str
    indexable: bool
    reason: str | None = None
    pages: int | None = None
    title: str | None = None
    truncated: bool = False


class UnsafeXml(ValueError):
    """The XML declares entities, which are refused (entity expansion, XXE)."""


# --- media types ---------------------------------------------------------------------------


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a ``Content-Type`` value into its lower-cased type and its parameters.

    ``'Text/Plain; charset="windows-1251"'`` → ``("text/plain", {"charset": "windows-1251"})``.
    The type is ``""`` when ``value`` is not ``type/subtype``.
    """
    head, *rest = value.split(";")
    base = head.strip().lower()
    params: dict[str, str] = {}
    for part in rest:
        key, sep, val = part.partition("=")
        if sep:
            params[key.strip().lower()] = val.strip().strip('"').strip()
    return (base if _MEDIA_TYPE.match(base) else ""), params


def sniff(data: bytes) -> str | None:
    """Name the media type the bytes really are, or ``None`` for unrecognised binary data.

    Recognised: :data:`PDF` (``%PDF-`` header), :data:`DICOM` (``DICM`` at offset 128),
    :data:`CDA_MEDIA_TYPE` (root ``ClinicalDocument`` in ``urn:hl7-org:v3``), :data:`XML` (any
    other XML root, including XML that declares entities), :data:`HTML` (``<!DOCTYPE html``,
    ``<html``, or an XHTML root) and :data:`TEXT` (UTF-8, UTF-16 with a BOM, or Windows-1251,
    without control bytes). Only the first 64 KiB are looked at.
    """
    if data.startswith(b"%PDF-"):
        return PDF
    if data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return DICOM
    head = data[:_SNIFF_BYTES]
    text = _decode_text(head, partial=len(data) > _SNIFF_BYTES)
    if text is None:
        return None
    start = text.lstrip()[:512].lower()
    if start.startswith(("<!doctype html", "<html")):
        return HTML
    if start.startswith("<"):
        root = _xml_root(head)
        if root == _CDA_ROOT:
            return CDA_MEDIA_TYPE
        if root is not None:
            return HTML if _local(root) == "html" else XML
    return TEXT


# VRs whose explicit-VR element header has 2 reserved bytes and a 4-byte length (PS3.5 §7.1.2).
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}
)


def dicom_sop_class_uid(data: bytes) -> str | None:
    """The MediaStorageSOPClassUID (0002,0002) of a DICOM Part 10 file, or ``None``.

    Lets a publisher tell a Key Object Selection (``1.2.840.10008.5.1.4.1.1.88.59``) or a
    Structured Report from an image without a DICOM library: the File Meta Information group is
    always explicit VR little endian (PS3.10 §7.1), whatever the transfer syntax of the data set.
    """
    if data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] != b"DICM":
        return None
    pos = _DICOM_MAGIC_OFFSET + 4
    while pos + 8 <= len(data):
        group = int.from_bytes(data[pos : pos + 2], "little")
        element = int.from_bytes(data[pos + 2 : pos + 4], "little")
        vr = data[pos + 4 : pos + 6]
        if group != 0x0002:
            return None  # past the meta group without finding it
        if vr in _LONG_VRS:
            length = int.from_bytes(data[pos + 8 : pos + 12], "little")
            pos += 12
        else:
            length = int.from_bytes(data[pos + 6 : pos + 8], "little")
            pos += 8
        if pos + length > len(data):
            return None  # truncated file
        if element == 0x0002:
            value = data[pos : pos + length]
            # UI values are padded to even length with NUL (PS3.5 §6.2).
            return value.rstrip(b"\x00 ").decode("ascii", "replace") or None
        pos += length
    return None


def check_declared(declared: str, data: bytes, *, cda: bool = False) -> str | None:
    """Return ``None`` if the declared ``contentType`` fits the bytes, else the reason in English.

    ``cda=True`` says the caller knows (from ``formatCode``) that the body must be a CDA R2
    document, so a ``text/xml`` body must then have a ``ClinicalDocument`` root. Lenient where it
    costs nothing: ``application/octet-stream`` accepts anything, ``text/xml`` and
    ``application/xml`` accept a CDA, ``text/plain`` accepts XML and HTML (they are text), and
    types this module does not know are only refused for bytes that are clearly a PDF or DICOM.
    """
    base, params = parse_media_type(declared)
    if not base:
        return f"contentType {declared!r} is not a media type (type/subtype)"
    if base == OCTET_STREAM:
        return None
    actual = sniff(data)
    looks = f"the bytes look like {actual}" if actual else "the bytes are not a recognised type"
    if base in _PDF_TYPES:
        return None if actual == PDF else f"declared {base} but the body does not start with %PDF-"
    if base in _DICOM_TYPES:
        if actual == DICOM:
            return None
        return f"declared {base} but the body has no DICM marker at offset 128 ({looks})"
    if base in _CDA_TYPES or (cda and base in _XML_TYPES):
        return _check_xml(base, data, want_cda=True)
    if _is_xml_type(base):
        return _check_xml(base, data, want_cda=False)
    if base.startswith("text/") or base in _HTML_TYPES:
        return _check_text(base, params.get("charset"), data, actual)
    if actual in (PDF, DICOM):
        return f"declared {base} but {looks}"
    return None


def _is_xml_type(base: str) -> bool:
    """``text/xml``, ``application/xml`` or any ``+xml`` type other than XHTML."""
    return base in _XML_TYPES or (base.endswith("+xml") and base not in _HTML_TYPES)


def _check_xml(base: str, data: bytes, *, want_cda: bool) -> str | None:
    """Why ``data`` is not well-formed, safe XML (with a CDA root when ``want_cda``), or None."""
    try:
        root = parse_xml(data)
    except UnsafeXml as exc:
        return f"declared {base} but the XML is refused: {exc}"
    except expat.ExpatError as exc:
        return f"declared {base} but the body is not well-formed XML ({exc})"
    if want_cda and root.tag != _CDA_ROOT:
        return (
            f"declared {base} as a CDA document but the root element is {root.tag!r}, "
            f"not ClinicalDocument in namespace {HL7_V3_NS}"
        )
    return None


def _check_text(base: str, charset: str | None, data: bytes, actual: str | None) -> str | None:
    """Why ``data`` is not text (in ``charset`` when given), or None."""
    if actual in (PDF, DICOM):
        return f"declared {base} but the body is {actual}"
    if charset:
        try:
            text = codecs.decode(data, charset)
        except LookupError:
            return f"declared {base} with unknown charset {charset!r}"
        except UnicodeDecodeError as exc:
            return f"declared {base} but the body is not valid {charset} ({exc.reason})"
        if _CONTROL.search(text):
            return f"declared {base} but the body contains control bytes (binary data)"
        return None
    if _decode_text(data) is None:
        return f"declared {base} but the body is binary, not UTF-8 or Windows-1251 text"
    return None


# --- text decoding -------------------------------------------------------------------------


def _decode_text(data: bytes, *, partial: bool = False, charset: str | None = None) -> str | None:
    """Decode bytes as text, or ``None`` if they are not text.

    The order: a declared ``charset``; a BOM (UTF-8, UTF-16); strict UTF-8; Windows-1251, the
    legacy encoding of Russian MIS exports. Text with control bytes is refused: Windows-1251
    decodes almost any byte, so control bytes are what tells binary data apart. ``partial``
    tolerates a multi-byte character cut at the end of a prefix.
    """
    candidates: list[str] = []
    if charset:
        candidates.append(charset)
    if data.startswith(codecs.BOM_UTF8):
        candidates.append("utf-8-sig")
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        candidates.append("utf-16")
    candidates += ["utf-8", "cp1251"]
    for name in candidates:
        try:
            decoder = codecs.getincrementaldecoder(name)()
            text = decoder.decode(data, final=not partial)
        except (LookupError, UnicodeDecodeError):
            continue
        if not _CONTROL.search(text):
            return text
    return None


# --- XML -----------------------------------------------------------------------------------


# What _xml_root reports for XML that declares entities: XML all the same, so sniff says XML,
# and check_declared / extract_text refuse it with the reason when they parse it in full.
_UNSAFE_ROOT: Final = "{}entity-declarations"


class _StopAtRoot(Exception):
    """Raised from the expat start handler once the root element's name is known."""


def _expat_parser(on_start: Callable[[str, dict[str, str]], object]) -> expat.XMLParserType:
    """An expat parser that reports namespaced names as ``{ns}local`` and refuses entities."""
    # "}" as the separator makes expat hand over "ns}local"; prefixing "{" gives ElementTree's form.
    parser = expat.ParserCreate(namespace_separator="}")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)

    def refuse_entity(name: str, *_: object) -> None:
        raise UnsafeXml(f"entity declaration <!ENTITY {name}> is not allowed")

    def refuse_external(*_: object) -> int:
        raise UnsafeXml("external entity references are not allowed")

    def start(name: str, attrs: dict[str, str]) -> None:
        on_start(_clark(name), {_clark(k): v for k, v in attrs.items()})

    parser.EntityDeclHandler = refuse_entity
    parser.UnparsedEntityDeclHandler = refuse_entity
    parser.ExternalEntityRefHandler = refuse_external
    parser.StartElementHandler = start
    return parser


def _clark(name: str) -> str:
    """``ns}local`` (expat with separator ``}``) → ``{ns}local``."""
    return "{" + name if "}" in name else name


def _local(tag: str) -> str:
    """The local part of a ``{ns}local`` name."""
    return tag.rpartition("}")[2]


def _xml_root(head: bytes) -> str | None:
    """The ``{ns}local`` name of the root element in the first bytes, or None if not XML."""
    found: list[str] = []

    def on_start(tag: str, _attrs: dict[str, str]) -> None:
        found.append(tag)
        raise _StopAtRoot

    parser = _expat_parser(on_start)
    try:
        parser.Parse(head, False)
    except _StopAtRoot:
        return found[0]
    except UnsafeXml:
        return _UNSAFE_ROOT
    except expat.ExpatError:
        return None
    return None


def parse_xml(data: bytes) -> Element:
    """Parse XML bytes into an ElementTree element, refusing entity declarations.

    Raises :class:`UnsafeXml` for any ``<!ENTITY``, :class:`xml.parsers.expat.ExpatError` for XML
    that is not well-formed. The document's own encoding declaration is honoured (expat with
    Python codecs: UTF-8, UTF-16, Windows-1251, …). Comments and processing instructions are
    dropped.
    """
    builder = TreeBuilder()
    parser = _expat_parser(builder.start)
    parser.EndElementHandler = lambda name: builder.end(_clark(name))
    parser.CharacterDataHandler = builder.data
    parser.buffer_text = True
    parser.Parse(data, True)
    return builder.close()


# --- text extraction -----------------------------------------------------------------------


def extract_text(data: bytes, content_type: str) -> Extracted:
    """Extract the searchable text of a document body; never raises on malformed input.

    ``content_type`` picks the extractor (``application/octet-stream`` or an unparsable value
    falls back to :func:`sniff`): PDF → the text layer of every page (no OCR); CDA → the document
    ``title`` and every section's ``title`` and narrative ``text``; other XML → its text nodes;
    HTML → the visible text; text → decoded with the ``charset`` parameter, else UTF-8, else
    Windows-1251. The text is cut at :data:`MAX_TEXT_CHARS` (``truncated`` says so).
    """
    base, params = parse_media_type(content_type)
    if not base or base == OCTET_STREAM:
        base = sniff(data) or OCTET_STREAM
    if base in _PDF_TYPES:
        return _extract_pdf(data)
    if base in _CDA_TYPES or _is_xml_type(base):
        return _extract_xml(data)
    if base in _HTML_TYPES:
        return _extract_html(data, params.get("charset"))
    if base.startswith("text/"):
        text = _decode_text(data, charset=params.get("charset"))
        if text is None:
            return Extracted("", indexable=False, reason="not decodable as text")
        return _done(text)
    if base in _DICOM_TYPES:
        return Extracted("", indexable=False, reason="DICOM objects are not indexed as text")
    return Extracted("", indexable=False, reason=f"no text extractor for {base}")


def _done(
    text: str, *, pages: int | None = None, title: str | None = None, truncated: bool = False
) -> Extracted:
    """Normalise whitespace and apply the size cap."""
    lines = (" ".join(line.split()) for line in text.splitlines())
    clean = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if len(clean) > MAX_TEXT_CHARS:
        clean, truncated = clean[:MAX_TEXT_CHARS], True
    return Extracted(clean, indexable=True, pages=pages, title=title or None, truncated=truncated)


# PDFium is not thread-safe: one extraction at a time per process.
_PDFIUM = threading.Lock()


def _extract_pdf(data: bytes) -> Extracted:
    """The text layer of every page, via PDFium (pypdfium2: about 3.5 times faster than a
    pure-Python parser on clinical PDFs, which is what lets the indexer keep up).

    A PDF protected only by an owner password (empty user password) opens without one and is
    indexed; one that needs a user password is "encrypted". Every failure is caught here: the
    outbox worker must store and flag the document, never crash on it.
    """
    # Imported here: PDFium is only needed by the worker, not by every importer of this module.
    import pypdfium2 as pdfium

    with _PDFIUM:
        try:
            pdf = pdfium.PdfDocument(data)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            if "password" in str(exc).lower() or "encrypt" in str(exc).lower():
                return Extracted("", indexable=False, reason="encrypted")
            return Extracted("", indexable=False, reason=f"unreadable PDF: {_describe(exc)}")
        try:
            return _pdf_text(pdf)
        finally:
            pdf.close()


def _pdf_text(pdf: Any) -> Extracted:
    try:
        pages = len(pdf)
        title = pdf.get_metadata_dict(skip_empty=True).get("Title")
    except Exception as exc:  # noqa: BLE001 - a damaged document: flagged, not raised
        return Extracted("", indexable=False, reason=f"unreadable PDF: {_describe(exc)}")
    parts: list[str] = []
    size, failed, truncated = 0, 0, False
    for i in range(pages):
        if size > MAX_TEXT_CHARS:
            truncated = True  # stop early: the rest would be cut anyway
            break
        try:
            page = pdf[i]
            textpage = page.get_textpage()
            chunk = textpage.get_text_bounded()
            textpage.close()
            page.close()
        except Exception:  # noqa: BLE001 - one bad page must not lose the others
            failed += 1
            continue
        parts.append(chunk.replace("\r\n", "\n"))
        size += len(chunk)
    if pages and failed == pages:
        return Extracted("", indexable=False, reason="unreadable PDF: no page could be read")
    return _done("\n\n".join(parts), pages=pages, title=title, truncated=truncated)


def _describe(exc: Exception) -> str:
    """An exception as ``Type: message``, short enough for a flag on the document."""
    return f"{type(exc).__name__}: {exc}"[:300]


# Narrative block elements (CDA R2 NarrativeBlock.xsd) that end a line in the extracted text.
_CDA_BLOCKS: Final = frozenset({"paragraph", "item", "tr", "caption", "br", "list", "table"})
_CDA_CELLS: Final = frozenset({"td", "th"})


def _extract_xml(data: bytes) -> Extracted:
    """CDA narrative (titles and ``section/text``), or the text nodes of any other XML."""
    try:
        root = parse_xml(data)
    except UnsafeXml as exc:
        return Extracted("", indexable=False, reason=f"refused XML: {exc}")
    except expat.ExpatError as exc:
        return Extracted("", indexable=False, reason=f"not well-formed XML: {exc}")
    if root.tag != _CDA_ROOT:
        return _done("\n".join(t for t in root.itertext() if t.strip()))
    ns = "{" + HL7_V3_NS + "}"
    title = (root.findtext(f"{ns}title") or "").strip() or None
    parts: list[str] = [title] if title else []
    # Sections nest (section/component/section); iter() visits every one, in document order.
    for section in root.iter(f"{ns}section"):
        heading = (section.findtext(f"{ns}title") or "").strip()
        if heading:
            parts.append(heading)
        narrative = section.find(f"{ns}text")
        if narrative is not None:
            parts.append(_narrative(narrative))
    return _done("\n\n".join(p for p in parts if p.strip()), title=title)


def _narrative(el: Element) -> str:
    """A CDA NarrativeBlock as text: blocks end lines, table cells are tab-separated."""
    out: list[str] = [el.text or ""]
    for child in el:
        name = _local(child.tag)
        out.append(_narrative(child))
        if name in _CDA_BLOCKS:
            out.append("\n")
        elif name in _CDA_CELLS:
            out.append("\t")
        out.append(child.tail or "")
    return "".join(out)


class _VisibleText(HTMLParser):
    """Collects the visible text of an HTML page and its ``<title>``."""

    _HIDDEN: Final = frozenset({"script", "style", "template", "head", "noscript", "svg"})
    _BLOCKS: Final = frozenset(
        {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "section"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title_parts: list[str] = []
        self._hidden = 0
        self._in_title = False

    def handle_starttag(self, tag: str, _attrs: list[tuple[str, str | None]]) -> None:
        """Enter hidden elements and the title; start a line at block elements."""
        if tag == "title":
            self._in_title = True
        elif tag in self._HIDDEN:
            self._hidden += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append("\t")

    def handle_endtag(self, tag: str) -> None:
        """Leave hidden elements and the title; end a line at block elements."""
        if tag == "title":
            self._in_title = False
        elif tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        """Keep text that a reader would see."""
        if self._in_title:
            self.title_parts.append(data)
        elif not self._hidden:
            self.parts.append(data)


def _extract_html(data: bytes, charset: str | None) -> Extracted:
    """Visible HTML text (no tags, scripts or styles), decoded per charset, ``<meta>``, or guess."""
    if charset is None:
        meta = _META_CHARSET.search(data[:4096])
        charset = meta.group(1).decode("ascii") if meta else None
    text = _decode_text(data, charset=charset)
    if text is None:
        return Extracted("", indexable=False, reason="not decodable as text")
    parser = _VisibleText()
    try:
        parser.feed(text)
        parser.close()
    except Exception as exc:  # noqa: BLE001 - html.parser is lenient, but never crash the worker
        return Extracted("", indexable=False, reason=f"unreadable HTML: {_describe(exc)}")
    title = " ".join("".join(parser.title_parts).split()) or None
    return _done("".join(parser.parts), title=title)
