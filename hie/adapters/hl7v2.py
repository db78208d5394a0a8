"""HL7 v2 messages read and acknowledged: bytes → segments, and ACK bytes back (no I/O).

:func:`parse` decodes one message by MSH-18, splits it with the message's own delimiters (MSH-1,
MSH-2) and returns a :class:`Message`: its :class:`MessageHeader` (what routing and the ACK need)
and its :class:`Segment` list, read through a :class:`Reader` that knows the delimiters and
escape sequences (HL7 v2.5.1 §2.5.4, §2.7). :func:`check_header` refuses what an interface does
not take (message type, trigger event, version, processing ID). :func:`build_ack` writes the
ACK for a parsed header — original mode (MSA-1 AA/AE/AR) or enhanced mode (commit CA/CE/CR, then
the application AA/AE/AR) — with the incoming delimiters and byte encoding;
:func:`ack_for_unreadable` answers something whose MSH cannot be read.

Everything wrong is an :class:`Hl7Problem`: an HL7 table 0357 code, the ERR location, and
``reject`` (AR rather than AE). Problems never quote names or identifier values.

The message is split here rather than by hl7apy: hl7apy's ``parse_message`` alone took about
7 ms per message; this module splits an ORU with ten OBX in a few tens of microseconds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Final, Literal

# HL7 table 0357 (message error condition codes).
SEGMENT_SEQUENCE_ERROR: Final = "100"
REQUIRED_FIELD_MISSING: Final = "101"
DATA_TYPE_ERROR: Final = "102"
TABLE_VALUE_NOT_FOUND: Final = "103"
UNSUPPORTED_MESSAGE_TYPE: Final = "200"
UNSUPPORTED_EVENT_CODE: Final = "201"
UNSUPPORTED_PROCESSING_ID: Final = "202"
UNSUPPORTED_VERSION_ID: Final = "203"
UNKNOWN_KEY_IDENTIFIER: Final = "204"
DUPLICATE_KEY_IDENTIFIER: Final = "205"
APPLICATION_RECORD_LOCKED: Final = "206"
APPLICATION_INTERNAL_ERROR: Final = "207"

# Table 0357 descriptions, for ERR-3.2 (CWE text) and ERR-1.4.2 (CE text).
ERROR_CONDITIONS: Final[dict[str, str]] = {
    "0": "Message accepted",
    SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    REQUIRED_FIELD_MISSING: "Required field missing",
    DATA_TYPE_ERROR: "Data type error",
    TABLE_VALUE_NOT_FOUND: "Table value not found",
    UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    UNSUPPORTED_VERSION_ID: "Unsupported version id",
    UNKNOWN_KEY_IDENTIFIER: "Unknown key identifier",
    DUPLICATE_KEY_IDENTIFIER: "Duplicate key identifier",
    APPLICATION_RECORD_LOCKED: "Application record locked",
    APPLICATION_INTERNAL_ERROR: "Application internal error",
}

SUPPORTED_VERSIONS: Final = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")
# MSH-11 processing ID (table 0103): production, debugging, training.
PROCESSING_IDS: Final = ("P", "D", "T")

# The hub's region keeps Moscow time; a time sent without an offset, in a message whose MSH-7
# has none either, is taken to be local time there (HL7 v2.5.1 ch. 2A, TS: the sender's zone).
DEFAULT_UTC_OFFSET: Final = "+03:00"
_HUB_ZONE = timezone(timedelta(hours=3), "MSK")

AckCode = Literal["AA", "AE", "AR", "CA", "CE", "CR"]
_ACK_CODES: Final = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})


class Hl7Problem(Exception):
    """A problem with an HL7 v2 message, located the way the ACK's ERR segment needs it.

    ``code`` is from HL7 table 0357 (``"101"`` required field missing, ``"201"`` unsupported
    event code, …); ``segment``, ``sequence`` (which occurrence of the segment in the message,
    1-based), ``field``, ``repetition``, ``component`` and ``subcomponent`` locate it (ERR-2,
    ERL). ``reject`` is True when the message must be answered AR, False for AE. ``message``
    is English, names the field and the reason, and never contains a name or an identifier
    value.
    """

    def __init__(
        self,
        code: str,
        message: str,
        segment: str = "",
        sequence: int = 1,
        field: int | None = None,
        component: int | None = None,
        reject: bool = False,
        repetition: int | None = None,
        subcomponent: int | None = None,
    ) -> None:
        # All of them in ``args``, so the exception pickles and compares by value.
        super().__init__(
            code, message, segment, sequence, field, component, reject, repetition, subcomponent
        )
        self.code = code
        self.message = message
        self.segment = segment
        self.sequence = sequence
        self.field = field
        self.component = component
        self.reject = reject
        self.repetition = repetition
        self.subcomponent = subcomponent

    def __str__(self) -> str:
        where = f" at {self.location}" if self.segment else ""
        return f"HL7 error {self.code}{where}: {self.message}"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Hl7Problem) and type(other) is type(self) and self.args == other.args
        )

    def __hash__(self) -> int:
        return hash(self.args)

    @property
    def location(self) -> str:
        """``PID-3``, ``PID[2]-3(1).4`` style: segment[occurrence]-field(repetition).component."""
        out = self.segment
        if self.sequence != 1:
            out += f"[{self.sequence}]"
        if self.field is not None:
            out += f"-{self.field}"
            if self.repetition is not None:
                out += f"({self.repetition})"
            if self.component is not None:
                out += f".{self.component}"
                if self.subcomponent is not None:
                    out += f".{self.subcomponent}"
        return out


def ack_code_for(errors: Iterable[Hl7Problem]) -> Literal["AA", "AE", "AR"]:
    """MSA-1 for these problems in original mode: AR if one rejects, AE if any, else AA."""
    code: Literal["AA", "AE", "AR"] = "AA"
    for problem in errors:
        if problem.reject:
            return "AR"
        code = "AE"
    return code


# --- delimiters and reading values --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delimiters:
    """A message's separators: MSH-1 and the four MSH-2 encoding characters (§2.5.4)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def encoding_characters(self) -> str:
        """MSH-2 as written: component, repetition, escape, subcomponent."""
        return self.component + self.repetition + self.escape + self.subcomponent

    def escape_text(self, text: str) -> str:
        """``text`` as a value of this message: delimiters escaped (§2.7.1), line breaks and
        other control characters turned into spaces (a CR would end the segment)."""
        esc = self.escape
        if esc in text:
            text = text.replace(esc, f"{esc}E{esc}")
        for char, code in (
            (self.field, "F"),
            (self.component, "S"),
            (self.subcomponent, "T"),
            (self.repetition, "R"),
        ):
            if char in text:
                text = text.replace(char, f"{esc}{code}{esc}")
        return _CONTROL_OR_BREAK.sub(" ", text)


DEFAULT_DELIMITERS: Final = Delimiters()

# C0 controls (but tab, LF, CR) and DEL are dropped; PostgreSQL's jsonb refuses NUL outright.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")
_WHITESPACE = re.compile(r"[\t\n\r\x85\u2028\u2029]")
_CONTROL_OR_BREAK = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029\ud800-\udfff]")


@dataclass(slots=True)
class Segment:
    """One segment: ``fields[n]`` is field n as sent, escaped (for MSH, ``fields[1]`` is MSH-1).

    ``sequence`` is the occurrence of this segment ID in the whole message, 1-based — what
    ERR-2 (ERL.2) and :class:`Hl7Problem` call the segment sequence.
    """

    name: str
    sequence: int
    fields: list[str]

    def get(self, n: int) -> str:
        """Field ``n`` as sent (escaped, with its repetitions and components), or ``""``."""
        return self.fields[n] if n < len(self.fields) else ""


class Reader:
    """Splits and unescapes values with one message's delimiters (HL7 v2.5.1 §2.5.4, §2.7)."""

    __slots__ = ("field_sep", "component", "repetition", "escape", "subcomponent", "codec")

    def __init__(self, delimiters: Delimiters, codec: str) -> None:
        self.field_sep = delimiters.field
        self.component = delimiters.component
        self.repetition = delimiters.repetition
        self.escape = delimiters.escape
        self.subcomponent = delimiters.subcomponent
        self.codec = codec

    def reps(self, raw: str) -> list[str]:
        """The repetitions of a field, empty ones included (their position counts)."""
        return raw.split(self.repetition) if raw else []

    def comp(self, raw: str, n: int, sub: int = 1) -> str:
        """Text of component ``n``, subcomponent ``sub`` (1-based) of one repetition."""
        if not raw:
            return ""
        comps = raw.split(self.component, n)  # no need to split past component n
        if n > len(comps):
            return ""
        value = comps[n - 1]
        if self.subcomponent in value:
            subs = value.split(self.subcomponent)
            value = subs[sub - 1] if sub <= len(subs) else ""
        elif sub > 1:
            return ""
        return self.text(value)

    def comps(self, raw: str) -> list[str]:
        """Text of every component of one repetition (each one's first subcomponent)."""
        sub = self.subcomponent
        parts = raw.split(self.component)
        if self.escape not in raw and '""' not in raw and raw.isprintable():
            # nothing to unescape or clean (the common case): split and strip only
            return [(p.split(sub, 1)[0] if sub in p else p).strip() for p in parts]
        text = self.text
        return [text(p.split(sub, 1)[0] if sub in p else p) for p in parts]

    def text(self, raw: str) -> str:
        """Unescaped, cleaned text of an elementary value; the HL7 null ``""`` is empty."""
        if not raw or raw == '""':
            return ""
        if self.escape in raw:
            raw = self._unescape(raw)
        if not raw.isprintable():
            raw = _WHITESPACE.sub(" ", _CONTROL.sub("", raw))
        return raw.strip()

    def lines(self, raw: str) -> str:
        """Text of a TX/FT value with its line breaks: ``\\.br\\`` (§2.7.6) becomes a newline."""
        parts = raw.split(f"{self.escape}.br{self.escape}")
        return "\n".join(self.text(p) for p in parts).strip()

    def _unescape(self, raw: str) -> str:
        esc = self.escape
        out: list[str] = []
        i = 0
        while True:
            start = raw.find(esc, i)
            if start < 0:
                out.append(raw[i:])
                break
            end = raw.find(esc, start + 1)
            if end < 0:  # an unterminated escape is kept as sent
                out.append(raw[i:])
                break
            out.append(raw[i:start])
            out.append(self._escape_sequence(raw[start + 1 : end], raw[start : end + 1]))
            i = end + 1
        return "".join(out)

    def _escape_sequence(self, seq: str, as_sent: str) -> str:
        # HL7 v2.5.1 §2.7: delimiters, highlighting, formatting, hex data, character sets.
        if seq == "F":
            return self.field_sep
        if seq == "S":
            return self.component
        if seq == "T":
            return self.subcomponent
        if seq == "R":
            return self.repetition
        if seq == "E":
            return self.escape
        if seq == ".br":
            return " "  # a line break (§2.7.6) read as plain text still parts the words
        if seq in ("H", "N") or seq.startswith((".", "C", "M", "Z")):
            return ""  # highlighting, formatting, character-set switches, local: no text
        if seq.startswith("X") and len(seq) > 1:
            try:
                return bytes.fromhex(seq[1:]).decode(self.codec, errors="replace")
            except ValueError:
                return as_sent
        return as_sent


# --- bytes → text ------------------------------------------------------------------------------

# MSH-18 (HL7 table 0211), keyed without blanks, hyphens, underscores and slashes.
# None: not declared (or ASCII, the default) — try UTF-8, then Windows-1251.
_CHARSETS: Final[dict[str, str | None]] = {
    "": None,
    "ASCII": None,
    "UNICODEUTF8": "utf-8",
    "UTF8": "utf-8",
    **{f"8859{n}": f"iso8859-{n}" for n in range(1, 10)},
    "885915": "iso8859-15",
    # Not in table 0211, but what Russian MIS send.
    "WINDOWS1251": "cp1251",
    "CP1251": "cp1251",
    "WIN1251": "cp1251",
    "KOI8R": "koi8_r",
}
_CHARSET_NOISE = re.compile(r"[\s\-_/]")
_UTF8_BOM = b"\xef\xbb\xbf"
# MLLP framing (start block 0x0B, end block 0x1C) and blank lines around the message.
_FRAMING = "\x0b\x1c\r\n\t \ufeff"
_FRAMING_BYTES = b"\x0b\x1c\r\n\t "


def codec_for(charset: str) -> str | None:
    """The Python codec for an MSH-18 value; None when undeclared (or ASCII). Raises
    :class:`Hl7Problem` (103, reject) for a character set the hub does not read."""
    key = _CHARSET_NOISE.sub("", charset.upper())
    if key not in _CHARSETS:
        raise Hl7Problem(
            TABLE_VALUE_NOT_FOUND,
            "MSH-18 names a character set this hub does not read "
            "(use UNICODE UTF-8, 8859/5 or WINDOWS-1251)",
            "MSH",
            field=18,
            reject=True,
        )
    return _CHARSETS[key]


def _is_delimiter(ch: str) -> bool:
    return ch.isascii() and ch.isprintable() and not ch.isalnum() and ch != " "


def _msh_fields(header: str) -> tuple[Delimiters, list[str]]:
    """The delimiters and the split MSH line, checked (HL7 v2.5.1 §2.5.4, MSH-1 and MSH-2)."""
    if not header.startswith("MSH"):
        raise Hl7Problem(
            SEGMENT_SEQUENCE_ERROR,
            "not an HL7 v2 message: it does not begin with an MSH segment",
            reject=True,
        )
    if len(header) < 4:
        raise Hl7Problem(
            REQUIRED_FIELD_MISSING,
            "MSH-1 (field separator) is missing",
            "MSH",
            field=1,
            reject=True,
        )
    sep = header[3]
    if not _is_delimiter(sep):
        raise Hl7Problem(
            DATA_TYPE_ERROR,
            "MSH-1 (field separator) must be a punctuation character",
            "MSH",
            field=1,
            reject=True,
        )
    fields = header.split(sep)
    enc = fields[1]
    # MSH-2: component, repetition, escape and subcomponent characters, in that order.
    if len(enc) != 4 or not all(_is_delimiter(c) for c in enc) or len({sep, *enc}) != 5:
        raise Hl7Problem(
            DATA_TYPE_ERROR,
            "MSH-2 (encoding characters) must be four distinct punctuation characters, "
            "other than the field separator (component, repetition, escape, subcomponent)",
            "MSH",
            field=2,
            reject=True,
        )
    fields.insert(1, sep)  # MSH-1 is the separator itself, so MSH-n is fields[n]
    return Delimiters(sep, enc[0], enc[1], enc[2], enc[3]), fields


def _declared_charset(msh: list[str], delims: Delimiters) -> str:
    """MSH-18's first repetition, as sent (the message's default character set)."""
    raw = msh[18] if len(msh) > 18 else ""
    return raw.split(delims.repetition, 1)[0].strip()


def _first_line(data: bytes) -> bytes:
    end = len(data)
    for terminator in (b"\r", b"\n"):
        pos = data.find(terminator, 0, end)
        if pos >= 0:
            end = pos
    return data[:end]


def _decode(raw: bytes) -> tuple[str, str]:
    """The message text with \\r segment terminators, and the codec that decoded it."""
    data = raw.strip(_FRAMING_BYTES)
    bom = data.startswith(_UTF8_BOM)
    if bom:
        data = data[len(_UTF8_BOM) :]
    # The header is ASCII by rule; latin-1 maps every byte, so a bad byte cannot stop us here.
    delims, msh = _msh_fields(_first_line(data).decode("latin-1"))
    codec = codec_for(_declared_charset(msh, delims))
    if codec is None:
        candidates: tuple[str, ...] = ("utf-8",) if bom else ("utf-8", "cp1251")
    else:
        candidates = (codec,)
    for candidate in candidates:
        try:
            text = data.decode(candidate)
        except UnicodeDecodeError:
            continue
        return _normalise_terminators(text), candidate
    raise Hl7Problem(
        DATA_TYPE_ERROR,
        "the message bytes are not valid in the character set declared in MSH-18"
        if codec
        else "the message bytes are neither UTF-8 nor Windows-1251; declare MSH-18",
        "MSH",
        field=18,
        reject=True,
    )


def _normalise_terminators(text: str) -> str:
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    return text.strip(_FRAMING)


def decode_message(raw: bytes) -> str:
    """Decode raw message bytes using MSH-18 and normalise segment terminators to ``\\r``.

    ``UNICODE UTF-8`` → UTF-8, ``8859/5`` → ISO 8859-5, ``WINDOWS-1251``/``CP1251`` (any
    case) → Windows-1251; empty (or ASCII) → UTF-8, falling back to Windows-1251, which
    Russian feeds send without declaring it. MLLP framing bytes and a UTF-8 BOM are dropped.
    Raises :class:`Hl7Problem` (reject) when there is no MSH, its delimiters are broken, the
    character set is unknown or the bytes are not valid in it.
    """
    return _decode(raw)[0]


# --- the header --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageHeader:
    """What MSH says, as the ACK and routing need it (HL7 v2.5.1 §2.15.9; values unescaped).

    Applications and facilities are HD.1 (namespace ID); a facility without one gives its
    HD.2 (universal ID, the MO's OID). ``trigger_event`` is MSH-9.2, or EVN-1 for v2.3
    senders that leave MSH-9.2 empty. ``fields`` keeps MSH as sent (``fields[n]`` is MSH-n,
    escaped) so the ACK can return the sender's HD values component for component. ``codec``
    is the Python codec that decoded the bytes (the ACK is encoded with it).
    """

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    timestamp: str  # MSH-7 (TS.1) as sent
    message_code: str  # MSH-9.1
    trigger_event: str  # MSH-9.2 (or EVN-1)
    message_structure: str  # MSH-9.3 (from v2.3.1)
    control_id: str  # MSH-10
    processing_id: str  # MSH-11.1
    version: str  # MSH-12.1
    accept_ack_type: str  # MSH-15 (table 0155)
    application_ack_type: str  # MSH-16 (table 0155)
    charset: str  # MSH-18, first repetition, as sent
    codec: str
    delimiters: Delimiters
    fields: tuple[str, ...]

    @property
    def enhanced_mode(self) -> bool:
        """True when MSH-15 or MSH-16 is valued: enhanced acknowledgment (§2.9.3); else the
        original mode rules apply (§2.9.2)."""
        return bool(self.accept_ack_type or self.application_ack_type)

    @property
    def utc_offset(self) -> str | None:
        """MSH-7's UTC offset as ``+HH:MM``, if it has a valid one (the sender's zone)."""
        return dtm_offset(DTM.fullmatch(self.timestamp))


def _header(r: Reader, msh: Segment, evn: Segment | None, delims: Delimiters) -> MessageHeader:
    def hd(n: int) -> str:
        value = msh.get(n)
        return r.comp(value, 1) or r.comp(value, 2)  # HD.1 namespace ID, else HD.2 universal ID

    msh_9 = msh.get(9)
    trigger = r.comp(msh_9, 2)  # MSG.2 trigger event
    if not trigger and evn is not None:
        trigger = r.text(evn.get(1))  # EVN-1 event type code (v2.3 senders)
    charset = _declared_charset(msh.fields, delims)
    return MessageHeader(
        sending_application=r.comp(msh.get(3), 1),  # MSH-3 HD.1
        sending_facility=hd(4),  # MSH-4 HD.1, else HD.2 (the MO's OID)
        receiving_application=r.comp(msh.get(5), 1),
        receiving_facility=hd(6),
        timestamp=r.comp(msh.get(7), 1),  # MSH-7 TS.1 (DTM)
        message_code=r.comp(msh_9, 1),  # MSG.1 message code
        trigger_event=trigger,
        message_structure=r.comp(msh_9, 3),  # MSG.3 message structure
        control_id=r.text(msh.get(10)),  # MSH-10 message control ID
        processing_id=r.comp(msh.get(11), 1),  # PT.1 processing ID (table 0103)
        version=r.comp(msh.get(12), 1),  # VID.1 version ID
        accept_ack_type=r.text(msh.get(15)).upper(),  # MSH-15 accept ack type (table 0155)
        application_ack_type=r.text(msh.get(16)).upper(),  # MSH-16 application ack type
        charset=charset,
        codec=r.codec,
        delimiters=delims,
        fields=tuple(msh.fields),
    )


def read_header(raw: bytes) -> MessageHeader:
    """The header of a message, read from its first segment only (cheap; for routing before
    the whole message is parsed). Raises :class:`Hl7Problem` (reject) like
    :func:`decode_message`. The trigger event comes from MSH-9.2 only (EVN is not read)."""
    text = decode_message(raw)
    line = text.split("\r", 1)[0]
    delims, fields = _msh_fields(line)
    codec = codec_for(_declared_charset(fields, delims)) or "utf-8"
    r = Reader(delims, codec)
    return _header(r, Segment("MSH", 1, fields), None, delims)


def read_sender(raw: bytes) -> tuple[str, str]:
    """MSH-3 and MSH-4 of a message (namespace id; for MSH-4 the universal id when the
    namespace is empty), read before the rest is mapped: the sender decides which identifier
    systems the message's numbers belong to. Raises :class:`Hl7Problem` (reject) like
    :func:`decode_message`."""
    header = read_header(raw)
    return header.sending_application, header.sending_facility


# --- splitting ---------------------------------------------------------------------------------

_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")


@dataclass(frozen=True, slots=True)
class Message:
    """One parsed message: the header, the segments in order (``segments[0]`` is MSH) and the
    reader that splits and unescapes their values."""

    header: MessageHeader
    segments: list[Segment]
    reader: Reader

    def first(self, name: str) -> Segment | None:
        """The first segment called ``name``, if any."""
        for seg in self.segments:
            if seg.name == name:
                return seg
        return None

    def all(self, name: str) -> list[Segment]:
        """Every segment called ``name``, in order."""
        return [seg for seg in self.segments if seg.name == name]


def parse(raw: bytes | str) -> Message:
    """Decode (bytes, by MSH-18) and split one HL7 v2 message with its own delimiters.

    Nothing about the message type is checked here (see :func:`check_header`), so a header
    is available to acknowledge whatever arrives. Raises :class:`Hl7Problem` with ``reject``
    when the bytes are not one HL7 v2 message: no MSH first, broken MSH-1/MSH-2, an unknown
    or wrong character set, a segment without a valid segment ID, or a second MSH (batches
    are not read).
    """
    if isinstance(raw, str):
        text = _normalise_terminators(raw)
        codec = ""
    else:
        text, codec = _decode(bytes(raw))
    lines = [line for line in text.split("\r") if line and not line.isspace()]
    delims, msh_fields = _msh_fields(lines[0] if lines else "")
    if not codec:  # str input: hex escapes (\X..\) still decode with the declared set
        codec = codec_for(_declared_charset(msh_fields, delims)) or "utf-8"
    sep = delims.field
    counts: dict[str, int] = {}
    segments = [Segment("MSH", 1, msh_fields)]
    evn: Segment | None = None
    fullmatch = _SEGMENT_ID.fullmatch
    for index in range(1, len(lines)):
        fields = lines[index].split(sep)
        name = fields[0]
        if not fullmatch(name):
            raise Hl7Problem(
                SEGMENT_SEQUENCE_ERROR,
                f"segment {index + 1} of the message has no valid segment ID",
                reject=True,
            )
        if name == "MSH":
            raise Hl7Problem(
                SEGMENT_SEQUENCE_ERROR,
                "a second MSH segment: send one message at a time (batches are not read)",
                "MSH",
                sequence=2,
                reject=True,
            )
        seq = counts[name] = counts.get(name, 0) + 1
        seg = Segment(name, seq, fields)
        if evn is None and name == "EVN":
            evn = seg
        segments.append(seg)
    reader = Reader(delims, codec)
    return Message(_header(reader, segments[0], evn, delims), segments, reader)


def check_header(
    header: MessageHeader,
    accepts: Mapping[str, Collection[str]],
    *,
    versions: Collection[str] = SUPPORTED_VERSIONS,
    processing_ids: Collection[str] = PROCESSING_IDS,
) -> None:
    """Refuse (``reject``: AR, §2.9.2) a message this interface does not take.

    ``accepts`` maps MSH-9.1 message codes to their trigger events (``{"ORU": ("R01",)}``).
    In this order: MSH-9.1 empty (101) or not accepted (200); trigger event empty (101) or not
    accepted (201); MSH-12 empty (101) or not in ``versions`` (203); MSH-11 valued but not in
    ``processing_ids`` (202); MSH-10 empty (101).
    """
    code = header.message_code
    if not code:
        raise Hl7Problem(
            REQUIRED_FIELD_MISSING, "MSH-9 (message type) is empty", "MSH", field=9, reject=True
        )
    if code not in accepts:
        names = " or ".join(accepts)
        raise Hl7Problem(
            UNSUPPORTED_MESSAGE_TYPE,
            f"MSH-9.1 (message code) is not {names}; this interface takes {names} messages only",
            "MSH",
            field=9,
            component=1,
            reject=True,
        )
    event = header.trigger_event
    if not event:
        raise Hl7Problem(
            REQUIRED_FIELD_MISSING,
            "MSH-9.2 (trigger event) is empty and there is no EVN-1",
            "MSH",
            field=9,
            component=2,
            reject=True,
        )
    if event not in accepts[code]:
        raise Hl7Problem(
            UNSUPPORTED_EVENT_CODE,
            f"trigger event {event[:8]} is not one of {', '.join(accepts[code])}",
            "MSH",
            field=9,
            component=2,
            reject=True,
        )
    if not header.version:
        raise Hl7Problem(
            REQUIRED_FIELD_MISSING, "MSH-12 (version ID) is empty", "MSH", field=12, reject=True
        )
    if header.version not in versions:
        raise Hl7Problem(
            UNSUPPORTED_VERSION_ID,
            f"MSH-12 version is not one of {', '.join(versions)}",
            "MSH",
            field=12,
            reject=True,
        )
    if header.processing_id and header.processing_id not in processing_ids:
        raise Hl7Problem(
            UNSUPPORTED_PROCESSING_ID,
            f"MSH-11 (processing ID) is not {', '.join(processing_ids)}",
            "MSH",
            field=11,
            reject=True,
        )
    if not header.control_id:
        raise Hl7Problem(
            REQUIRED_FIELD_MISSING,
            "MSH-10 (message control ID) is empty",
            "MSH",
            field=10,
            reject=True,
        )


# --- dates and times ---------------------------------------------------------------------------

# HL7 TS/DTM: YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ] (HL7 v2.5.1 ch. 2A, DTM and TS).
DTM: Final = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(\.\d{1,4})?)?)?)?)?)?"
    r"([+-]\d{4})?",
    re.ASCII,
)


def latest_today() -> date:
    """Today's date somewhere on Earth (UTC+14): a birth or death on it is not in the future."""
    return (datetime.now(UTC) + timedelta(hours=14)).date()


def dtm_offset(m: re.Match[str] | None) -> str | None:
    """The UTC offset of a :data:`DTM` match as ``+HH:MM``; None if absent or impossible."""
    if m is None or not m[8]:
        return None
    hours, minutes = int(m[8][1:3]), int(m[8][3:5])
    if hours > 14 or minutes > 59:
        return None
    return f"{m[8][0]}{m[8][1:3]}:{m[8][3:5]}"


def fhir_datetime(value: str, default_offset: str = DEFAULT_UTC_OFFSET) -> str:
    """An HL7 DTM/TS value (TS.1) as a FHIR ``dateTime`` at the precision it was sent.

    A date alone gives ``YYYY[-MM[-DD]]``; with a time, FHIR wants seconds and a zone, so
    missing minutes and seconds are zero and a time without an offset is in
    ``default_offset`` (the message's MSH-7 zone, else Moscow). Raises :class:`ValueError`
    with the reason (for the caller's :class:`Hl7Problem`) when the value is not a DTM or
    names a date, time or offset that does not exist.
    """
    m = DTM.fullmatch(value)
    if m is None:
        raise ValueError("is not an HL7 date/time (YYYY[MM[DD[HHMM[SS]]]][+ZZZZ])")
    year, month, day = m[1], m[2], m[3]
    if month is not None and not 1 <= int(month) <= 12:
        raise ValueError("has a month that does not exist")
    if day is not None:
        try:
            date(int(year), int(month or 1), int(day))
        except ValueError:
            raise ValueError("is not a calendar date") from None
    if m[4] is None:
        return year + (f"-{month}" if month else "") + (f"-{day}" if day else "")
    hour, minute, second = m[4], m[5] or "00", m[6] or "00"
    if int(hour) > 23 or int(minute) > 59 or int(second) > 59:
        raise ValueError("has a time that does not exist")
    offset = dtm_offset(m)
    if m[8] and offset is None:
        raise ValueError("has a time zone offset that does not exist")
    return f"{year}-{month}-{day}T{hour}:{minute}:{second}{m[7] or ''}{offset or default_offset}"


def fhir_instant(value: str, default_offset: str = DEFAULT_UTC_OFFSET) -> str:
    """An HL7 DTM/TS value as a FHIR ``instant`` (which needs at least the hour); raises
    :class:`ValueError` like :func:`fhir_datetime`, and for a value without a time."""
    out = fhir_datetime(value, default_offset)
    if "T" not in out:
        raise ValueError("has no time of day (an instant needs one)")
    return out


# --- acknowledgements --------------------------------------------------------------------------


def _hl7_now(now: datetime | None) -> str:
    """MSH-7 as DTM with seconds and offset; a naive ``now`` is taken as Moscow time."""
    when = now if now is not None else datetime.now(_HUB_ZONE)
    if when.tzinfo is None:
        when = when.replace(tzinfo=_HUB_ZONE)
    return when.strftime("%Y%m%d%H%M%S%z")


def new_control_id() -> str:
    """A fresh MSH-10: 20 hex digits (the ST length MSH-10 has up to v2.5.1), 80 random bits —
    unique without coordination between processes."""
    return os.urandom(10).hex().upper()


def wants_commit_ack(header: MessageHeader, accepted: bool) -> bool:
    """Enhanced mode: whether MSH-15 asks for a commit ACK (CA/CE/CR) for this outcome.

    Table 0155: AL always, NE never, ER only on error or reject, SU only on success. When
    only MSH-16 is valued, an empty MSH-15 is taken as AL (the sender is waiting for
    something on this connection). False in original mode.
    """
    return header.enhanced_mode and _ack_wanted(header.accept_ack_type or "AL", accepted)


def wants_application_ack(header: MessageHeader, accepted: bool) -> bool:
    """Whether an application ACK (AA/AE/AR) is to be sent for this outcome: always in
    original mode; in enhanced mode as MSH-16 says (table 0155, empty taken as AL)."""
    if not header.enhanced_mode:
        return True
    return _ack_wanted(header.application_ack_type or "AL", accepted)


def _ack_wanted(kind: str, accepted: bool) -> bool:
    if kind == "NE":
        return False
    if kind == "ER":
        return not accepted
    if kind == "SU":
        return accepted
    return True  # AL, and anything unknown: answering is the safe side


def _trimmed(parts: list[str], sep: str) -> str:
    while parts and not parts[-1]:
        parts.pop()
    return sep.join(parts)


def _err_location(p: Hl7Problem, d: Delimiters) -> str:
    """ERR-2 (ERL): segment ID^sequence^field^repetition^component^subcomponent (v2.5+)."""
    if not p.segment:
        return ""
    parts = [p.segment, str(p.sequence)]
    if p.field is not None:
        # ERL.4: a field position without a repetition means the first (§2.15.5.2).
        parts += [str(p.field), str(p.repetition or 1)]
        if p.component is not None:
            parts.append(str(p.component))
            if p.subcomponent is not None:
                parts.append(str(p.subcomponent))
    return d.component.join(parts)


def _err_segments_v25(
    errors: Iterable[Hl7Problem], warnings: Iterable[Hl7Problem], d: Delimiters
) -> list[str]:
    """One ERR per problem (HL7 v2.5.1 §2.15.5): ERR-2 location, ERR-3 code, ERR-4 severity,
    ERR-8 user message; ERR-1 (ELD) is kept for backward compatibility only, so left empty."""
    out: list[str] = []
    for severity, problems in (("E", errors), ("W", warnings)):
        for p in problems:
            code = d.component.join(
                # ERR-3 HL7 error code (CWE): code^text^HL70357
                (p.code, d.escape_text(ERROR_CONDITIONS.get(p.code, "")), "HL70357")
            )
            fields = ["ERR", "", _err_location(p, d), code, severity, "", "", ""]
            fields.append(d.escape_text(p.message))  # ERR-8 user message (TX)
            out.append(d.field.join(fields))
    return out


def _err_segment_v23(
    errors: Iterable[Hl7Problem], warnings: Iterable[Hl7Problem], d: Delimiters
) -> list[str]:
    """v2.3–2.4: one ERR whose ERR-1 (ELD, repeating) lists every problem (HL7 v2.3 §2.24.3;
    the same ELD in v2.3.1 and v2.4): segment ID^sequence^field position^code&text&HL70357.
    ELD has no severity, so a warning's text says so."""
    reps: list[str] = []
    for prefix, problems in (("", errors), ("warning: ", warnings)):
        for p in problems:
            # ELD.4 code identifying error (CE) in subcomponents: identifier&text&coding system
            ce = d.subcomponent.join((p.code, d.escape_text(prefix + p.message), "HL70357"))
            field = "" if p.field is None else str(p.field)
            seq = str(p.sequence) if p.segment else ""
            reps.append(d.component.join((p.segment, seq, field, ce)))
    return [f"ERR{d.field}{d.repetition.join(reps)}"] if reps else []


def _ack_bytes(
    d: Delimiters,
    codec: str,
    msh_3_6: tuple[str, str, str, str],
    trigger: str,
    msh_tail: dict[int, str],
    version: str,
    code: str,
    ack_control_id: str,
    errors: Iterable[Hl7Problem],
    warnings: Iterable[Hl7Problem],
    text: str | None,
    now: datetime | None,
) -> bytes:
    f = d.field
    # MSH-9 ACK^<trigger>^ACK; MSG.3 (message structure) exists from v2.3.1 on.
    if not trigger:
        msg_type = ["ACK"]  # nothing to echo (an unreadable message): the bare message code
    elif version == "2.3":
        msg_type = ["ACK", trigger]
    else:
        msg_type = ["ACK", trigger, "ACK"]
    msh = ["MSH", d.encoding_characters, *msh_3_6, _hl7_now(now), ""]
    msh += [_trimmed(msg_type, d.component), d.escape_text(ack_control_id)]
    last = max(msh_tail, default=10)
    msh += [msh_tail.get(n, "") for n in range(11, last + 1)]
    segments = [_trimmed(msh, f)]
    msa = ["MSA", code, msh_tail.get(0, "")]
    errors, warnings = list(errors), list(warnings)
    old = version in ("2.3", "2.3.1", "2.4")
    if text is None and old and errors:
        text = errors[0].message[:80]  # MSA-3 text message (ST 80): what v2.3 screens show
    if text:
        msa.append(d.escape_text(text))
    segments.append(_trimmed(msa, f))
    if old:
        segments += _err_segment_v23(errors, warnings, d)
    else:
        segments += _err_segments_v25(errors, warnings, d)
    return ("\r".join(segments) + "\r").encode(codec, errors="replace")


def build_ack(
    header: MessageHeader,
    code: AckCode,
    errors: Iterable[Hl7Problem] = (),
    warnings: Iterable[Hl7Problem] = (),
    *,
    text: str | None = None,
    control_id: str | None = None,
    now: datetime | None = None,
) -> bytes:
    """The ACK for a message with ``header``, as bytes in the message's own encoding.

    ``code`` is MSA-1: AA/AE/AR for original mode and for the enhanced-mode application ACK,
    CA/CE/CR for the enhanced-mode commit ACK (HL7 v2.5.1 §2.9.2, §2.9.3; table 0008). The
    MSH swaps sender and receiver (MSH-3/4 ← MSH-5/6 and back, as sent), MSH-7 is ``now``
    (default: the current time, Moscow), MSH-9 is ``ACK^<trigger>^ACK`` (``ACK^<trigger>`` in
    v2.3, which has no MSG.3), MSH-10 is ``control_id`` (default: a fresh unique one), MSH-11,
    MSH-12, MSH-17 and MSH-18 are copied, and the delimiters and byte encoding are the
    incoming message's. MSA-2 is the incoming MSH-10; MSA-3 is ``text`` (v2.3–2.4: the first
    error's message when not given). Errors and warnings become ERR segments: from v2.5 one
    per problem with ERR-2 location, ERR-3 code, ERR-4 severity (E/W) and ERR-8 message; in
    v2.3–2.4 one ERR with a repetition of ERR-1 per problem.
    """
    if code not in _ACK_CODES:
        raise ValueError(f"MSA-1 must be one of {sorted(_ACK_CODES)}")
    fields = header.fields

    def raw(n: int) -> str:
        return fields[n] if n < len(fields) else ""

    tail = {n: raw(n) for n in (11, 12, 17, 18) if raw(n)}
    tail[0] = raw(10)  # MSA-2: the incoming MSH-10 as sent (same delimiters, same escapes)
    return _ack_bytes(
        header.delimiters,
        header.codec,
        (raw(5), raw(6), raw(3), raw(4)),
        header.delimiters.escape_text(header.trigger_event),
        tail,
        header.version,
        code,
        control_id or new_control_id(),
        errors,
        warnings,
        text,
        now,
    )


def ack_for_unreadable(
    head: bytes,
    code: str = SEGMENT_SEQUENCE_ERROR,
    reason: str = "the message could not be read",
    *,
    ack_code: Literal["AR", "CR"] = "AR",
    control_id: str | None = None,
    now: datetime | None = None,
) -> bytes:
    """An AR (or, for a sender in enhanced mode, ``ack_code="CR"``) for input whose MSH cannot
    be read — garbage, a message too large to keep, a truncated frame.

    ``head`` is the first bytes received; ``code`` the table 0357 code and ``reason`` the
    English ERR text. As much as can be read from the head is used: the delimiters, MSH-10
    (for MSA-2), sender and receiver, the trigger event, MSH-11, a supported MSH-12 and a
    known MSH-18; otherwise ``|^~\\&``, no MSA-2, v2.5 and UTF-8 (no MSH-18).
    """
    problem = Hl7Problem(code, reason, reject=True)
    data = head.lstrip(_FRAMING_BYTES)
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    line = _first_line(data)
    complete = len(line) < len(data)  # a segment terminator follows: MSH came whole
    if line.endswith(b"\x1c"):  # the MLLP end block right after MSH: whole too
        line, complete = line.rstrip(b"\x1c"), True
    try:
        d, fields = _msh_fields(line.decode("latin-1"))
    except Hl7Problem:
        d, fields = DEFAULT_DELIMITERS, []
    try:
        codec = codec_for(_declared_charset(fields, d)) if fields else None
        known_charset = True
    except Hl7Problem:
        codec, known_charset = None, False  # a character set we cannot write: do not claim it
    if codec is None:
        try:
            line.decode("utf-8")
            codec = "utf-8"
        except UnicodeDecodeError:
            codec = "cp1251"
    if fields:
        text_fields = line.decode(codec, errors="replace").split(d.field)
        text_fields.insert(1, d.field)
        if not complete:
            text_fields.pop()  # the head ends inside this field: what is left of it is wrong
    else:
        text_fields = []

    def raw(n: int) -> str:
        return text_fields[n] if n < len(text_fields) else ""

    r = Reader(d, codec)
    version = r.comp(raw(12), 1)
    if version not in SUPPORTED_VERSIONS:
        version = "2.5"
    tail = {n: raw(n) for n in (17, 18) if raw(n) and (n == 17 or known_charset)}
    tail[11] = raw(11) or "P"
    tail[12] = version
    tail[0] = raw(10)
    return _ack_bytes(
        d,
        codec,
        (raw(5), raw(6), raw(3), raw(4)),
        d.escape_text(r.comp(raw(9), 2)),
        tail,
        version,
        ack_code,
        control_id or new_control_id(),
        [problem],
        (),
        None,
        now,
    )
