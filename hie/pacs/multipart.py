"""``multipart/related`` bodies (RFC 2387) as DICOMweb uses them (PS3.18 8.6.1.2), and the
media types and ``Accept`` ranges around them.

:class:`MultipartReader` takes a STOW-RS request body as it arrives, chunk by chunk, and
spools each part to a temporary file (memory up to :data:`SPOOL_IN_MEMORY`, disk beyond), so
a request of thousands of instances never sits in memory; the body as a whole is refused the
moment it passes the caller's limit (:class:`~hie.hub.errors.PayloadTooLarge`, 413), before
anything is stored. :func:`part_head` and :func:`closing` frame the parts of a WADO-RS
response, which the routes stream part by part.

Parsing is RFC 2046 5.1.1: a part starts after ``--boundary`` and its line break, its
headers end at the first empty line, its body ends at the line break before the next
``--boundary``; ``--boundary--`` closes the body (a preamble before the first boundary and an
epilogue after the last are ignored).
"""

from __future__ import annotations

import re
import secrets
import tempfile
from dataclasses import dataclass, field
from typing import IO

from hie.hub.errors import InvalidRequest, PayloadTooLarge

SPOOL_IN_MEMORY = 4 << 20  # a part above this goes to a temporary file
MAX_PART_HEADERS = 16 << 10  # bytes of headers one part may have
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


# --- media types -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MediaRange:
    """One media type (or ``Accept`` range) with its parameters (names lower-cased)."""

    type: str  # lower-cased ``type/subtype`` (``*/*``, ``image/*`` in ranges)
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    def matches(self, media_type: str) -> bool:
        """Whether this range admits ``media_type``."""
        if self.type in ("*/*", "*"):
            return True
        if self.type.endswith("/*"):
            return media_type.split("/", 1)[0] == self.type[:-2]
        return self.type == media_type


def _split_outside_quotes(value: str, sep: str) -> list[str]:
    out, buf, quoted, escaped = [], [], False, False
    for ch in value:
        if escaped:
            buf.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            buf.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            buf.append(ch)
        elif ch == sep and not quoted:
            out.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    out.append("".join(buf))
    return out


def parse_media_type(value: str) -> MediaRange:
    """A ``Content-Type`` (or one ``Accept`` range) value: its type and parameters, quoted
    values unquoted (``multipart/related; type="application/dicom"``)."""
    head, *rest = _split_outside_quotes(value, ";")
    params: dict[str, str] = {}
    q = 1.0
    for part in rest:
        name, sep, val = part.partition("=")
        if not sep:
            continue
        name = name.strip().lower()
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        if name == "q":
            try:
                q = max(0.0, min(1.0, float(val)))
            except ValueError:
                q = 0.0
            continue
        params[name] = val.strip()
    return MediaRange(head.strip().lower(), params, q)


def parse_accept(header: str | None) -> list[MediaRange]:
    """The ranges of an ``Accept`` header, most preferred first (none: ``*/*``)."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges = [parse_media_type(v) for v in _split_outside_quotes(header, ",") if v.strip()]
    ranges = [r for r in ranges if r.q > 0 and r.type]
    return sorted(ranges, key=lambda r: -r.q)


# --- reading -----------------------------------------------------------------------------


@dataclass(slots=True)
class Part:
    """One body part: its headers (names lower-cased) and its bytes, spooled."""

    headers: dict[str, str]
    body: IO[bytes]
    size: int = 0

    @property
    def content_type(self) -> MediaRange:
        """The part's ``Content-Type`` (``text/plain`` when it has none, RFC 2046 5.1)."""
        return parse_media_type(self.headers.get("content-type", "text/plain"))

    def read(self) -> bytes:
        """All of the part's bytes."""
        self.body.seek(0)
        return self.body.read()

    def close(self) -> None:
        """Drop its spool."""
        self.body.close()


def boundary_of(content_type: str) -> bytes:
    """The ``boundary`` of a multipart ``Content-Type`` (:class:`InvalidRequest` if none)."""
    boundary = parse_media_type(content_type).params.get("boundary", "")
    if not 0 < len(boundary) <= 70:  # RFC 2046 5.1.1
        raise InvalidRequest("the multipart body has no (valid) boundary parameter")
    return boundary.encode("latin-1", "replace")


class MultipartReader:
    """Parses a multipart body fed chunk by chunk (see the module docstring)."""

    def __init__(self, boundary: bytes, limit: int) -> None:
        self.delimiter = b"\r\n--" + boundary
        self.limit = limit
        self.received = 0
        self.parts: list[Part] = []
        # a CRLF in front lets the first boundary be found like every other one
        self._buf = bytearray(b"\r\n")
        self._state = "preamble"  # preamble → after-boundary → headers → body → … → done
        self._part: Part | None = None

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of the body."""
        self.received += len(chunk)
        if self.received > self.limit:
            self.close()
            raise PayloadTooLarge(f"the request body exceeds the limit of {self.limit} bytes")
        if self._state == "done":
            return  # the epilogue
        self._buf += chunk
        self._advance()

    def finish(self) -> list[Part]:
        """The parts, once the whole body was fed (:class:`InvalidRequest` if it ended
        before its closing boundary)."""
        if self._state != "done":
            self.close()
            raise InvalidRequest("the multipart body ends before its closing boundary")
        return self.parts

    def close(self) -> None:
        """Drop every spooled part."""
        for part in self.parts:
            part.close()
        if self._part is not None and self._part not in self.parts:
            self._part.close()

    def _advance(self) -> None:
        buf = self._buf
        while True:
            if self._state in ("preamble", "body"):
                at = buf.find(self.delimiter)
                if at < 0:
                    keep = len(self.delimiter) - 1
                    if self._state == "body" and len(buf) > keep:
                        self._write(buf[: len(buf) - keep])
                        del buf[: len(buf) - keep]
                    elif self._state == "preamble" and len(buf) > keep:
                        del buf[: len(buf) - keep]
                    return
                if self._state == "body":
                    self._write(buf[:at])
                    assert self._part is not None
                    self.parts.append(self._part)
                    self._part = None
                del buf[: at + len(self.delimiter)]
                self._state = "after-boundary"
            elif self._state == "after-boundary":
                if len(buf) < 2:
                    return
                if buf[:2] == b"--":
                    self._state = "done"
                    buf.clear()
                    return
                eol = buf.find(b"\r\n")
                if eol < 0:  # transport padding (RFC 2046 5.1.1) may precede the line break
                    if len(buf) > 1024:
                        raise InvalidRequest("a multipart boundary line is malformed")
                    return
                del buf[: eol + 2]
                self._state = "headers"
            elif self._state == "headers":
                if buf.startswith(b"\r\n"):  # a part without headers
                    head, skip = b"", 2
                else:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        if len(buf) > MAX_PART_HEADERS:
                            raise InvalidRequest("a body part's headers are too long")
                        return
                    head, skip = bytes(buf[:end]), end + 4
                del buf[:skip]
                self._part = Part(
                    _headers(head), tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
                )
                self._state = "body"
            else:  # pragma: no cover - done returns above
                return

    def _write(self, data: bytes | bytearray) -> None:
        if data and self._part is not None:
            self._part.body.write(data)
            self._part.size += len(data)


def _headers(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep and _TOKEN.fullmatch(name.strip()):
            out[name.strip().lower()] = value.strip()
    return out


# --- writing -----------------------------------------------------------------------------


def new_boundary() -> str:
    """A boundary that no DICOM file will contain by chance."""
    return f"hie-{secrets.token_hex(16)}"


def part_head(
    boundary: str, content_type: str, headers: dict[str, str] | None = None, *, first: bool
) -> bytes:
    """The delimiter and headers in front of one part's bytes (a part after the first
    starts with the line break that ends the previous one)."""
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    text = "\r\n".join(lines) + "\r\n\r\n"
    return (text if first else "\r\n" + text).encode("latin-1")


def closing(boundary: str) -> bytes:
    """The closing delimiter."""
    return f"\r\n--{boundary}--\r\n".encode("latin-1")


def multipart_type(boundary: str, part_type: str, transfer_syntax: str | None = None) -> str:
    """The ``Content-Type`` of a multipart/related response whose parts are ``part_type``."""
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value
