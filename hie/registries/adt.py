"""HL7 v2 ADT → FHIR R4 Patient for the master patient index (pure functions, no I/O).

:func:`parse_adt` reads one ADT message (A01, A04, A08, A28, A31, A40), splits it with the
message's own delimiters (MSH-1, MSH-2) and maps each PID to a FHIR Patient dict — the source
record as the sending MO knows the person — and, for A40, MRG-1 to the prior identifiers.
:func:`decode_message` turns the raw bytes into text using MSH-18.

Everything wrong is an :class:`Hl7Problem` carrying an HL7 table 0357 code and the ERR
location; ``reject`` says whether the edge answers AR (malformed, unsupported) or AE
(application error). Problems never quote names or identifier values.

The message is split here with its declared separators rather than by hl7apy: hl7apy's
``parse_message`` alone took about 7 ms per ADT message (140 messages/s), this module about
0.1 ms for splitting and mapping together (7,000–12,000 messages/s on one core).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

from hie.registries.identifiers import (
    IDENTIFIER_TYPE_SYSTEM,
    NATIONAL_SYSTEMS,
    OMS_SYSTEM,
    PASSPORT_SYSTEM,
    SNILS_SYSTEM,
    IdentifierError,
    normalise_identifier,
    normalise_system,
)
from hie.registries.mpi.features import EARLIEST_BIRTH_YEAR

ADT_EVENTS = ("A01", "A04", "A08", "A28", "A31", "A40")
SUPPORTED_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")

# HL7 table 0357 (message error condition codes) used here.
SEGMENT_SEQUENCE_ERROR: Final = "100"
REQUIRED_FIELD_MISSING: Final = "101"
DATA_TYPE_ERROR: Final = "102"
TABLE_VALUE_NOT_FOUND: Final = "103"
UNSUPPORTED_MESSAGE_TYPE: Final = "200"
UNSUPPORTED_EVENT_CODE: Final = "201"
UNSUPPORTED_PROCESSING_ID: Final = "202"
UNSUPPORTED_VERSION_ID: Final = "203"
APPLICATION_INTERNAL_ERROR: Final = "207"

# The hub's region keeps Moscow time; a time sent without an offset, in a message whose MSH-7
# has none either, is taken to be local time there (HL7 v2.5.1 ch. 2A, TS: the sender's zone).
DEFAULT_UTC_OFFSET = "+03:00"

EN_QUALIFIER_URL = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-qualifier"


class Hl7Problem(Exception):
    """A problem with an HL7 v2 message, located the way the ACK's ERR segment needs it.

    ``code`` is from HL7 table 0357 (``"101"`` required field missing, ``"201"`` unsupported
    event code, …); ``segment``, ``sequence`` (which occurrence of the segment, 1-based),
    ``field``, ``repetition`` and ``component`` locate it (ERR-2, ERL). ``reject`` is True
    when the message must be answered AR, False for AE. ``message`` is English, names the
    field and the reason, and never contains a name or an identifier value.
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
    ) -> None:
        # All of them in ``args``, so the exception pickles and compares by value.
        super().__init__(code, message, segment, sequence, field, component, reject, repetition)
        self.code = code
        self.message = message
        self.segment = segment
        self.sequence = sequence
        self.field = field
        self.component = component
        self.reject = reject
        self.repetition = repetition

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
        return out


@dataclass(frozen=True, slots=True)
class AdtPatient:
    """One PID mapped: the Patient as the MO knows the person, and (A40) the merged-away ids."""

    patient: dict[str, Any]
    prior_identifiers: list[dict[str, str]]


@dataclass(frozen=True, slots=True)
class AdtMessage:
    """A parsed ADT message: the header facts the ACK and routing need, and the patients."""

    event: str
    control_id: str
    sending_application: str
    sending_facility: str
    version: str
    charset: str
    patients: list[AdtPatient]
    warnings: list[Hl7Problem]


# --- bytes → text ------------------------------------------------------------------------

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


def _codec_for(charset: str) -> str | None:
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


def _msh_fields(header: str) -> tuple[str, str, list[str]]:
    """Field separator, encoding characters and the split MSH line (checked, HL7 §2.5.4)."""
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
    return sep, enc, fields


def _is_delimiter(ch: str) -> bool:
    return ch.isascii() and ch.isprintable() and not ch.isalnum() and ch != " "


def _declared_charset(msh: list[str], enc: str) -> str:
    """MSH-18's first repetition, as sent (the message's default character set)."""
    raw = msh[17] if len(msh) > 17 else ""
    return raw.split(enc[1], 1)[0].strip()


def _decode(raw: bytes) -> tuple[str, str]:
    """The message text with \\r segment terminators, and the codec that decoded it."""
    data = raw.strip(b"\x0b\x1c\r\n\t ")
    bom = data.startswith(_UTF8_BOM)
    if bom:
        data = data[len(_UTF8_BOM) :]
    end = len(data)
    for terminator in (b"\r", b"\n"):
        pos = data.find(terminator)
        if pos >= 0:
            end = min(end, pos)
    # The header is ASCII by rule; latin-1 maps every byte, so a bad byte cannot stop us here.
    _sep, enc, msh = _msh_fields(data[:end].decode("latin-1"))
    charset = _declared_charset(msh, enc)
    codec = _codec_for(charset)
    if codec is None:
        candidates = ("utf-8",) if bom else ("utf-8", "cp1251")
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
    return text.replace("\r\n", "\r").replace("\n", "\r").strip(_FRAMING)


def decode_message(raw: bytes) -> str:
    """Decode raw message bytes using MSH-18 and normalise segment terminators to ``\\r``.

    ``UNICODE UTF-8`` → UTF-8, ``8859/5`` → ISO 8859-5, ``WINDOWS-1251``/``CP1251`` (any
    case) → Windows-1251; empty (or ASCII) → UTF-8, falling back to Windows-1251, which
    Russian feeds send without declaring it. MLLP framing bytes and a UTF-8 BOM are dropped.
    Raises :class:`Hl7Problem` (reject) when there is no MSH, its delimiters are broken, the
    character set is unknown or the bytes are not valid in it.
    """
    return _decode(raw)[0]


def read_sender(raw: bytes) -> tuple[str, str]:
    """MSH-3 and MSH-4 of a message, as :func:`parse_adt` reports them (namespace id; for
    MSH-4 the universal id when the namespace is empty), read before the rest is mapped: the
    sender decides which identifier systems the message's numbers belong to. Raises
    :class:`Hl7Problem` (reject) like :func:`decode_message`."""
    text = decode_message(raw)
    sep, enc, msh = _msh_fields(text.split("\r", 1)[0])
    del sep

    def hd(n: int, comp: int) -> str:
        value = msh[n - 1] if len(msh) >= n else ""
        parts = value.split(enc[0])
        return parts[comp - 1].strip() if len(parts) >= comp else ""

    # msh[0] is "MSH", msh[1] MSH-2, so MSH-n is msh[n - 1]
    return hd(3, 1), hd(4, 1) or hd(4, 2)


# --- splitting and escapes -----------------------------------------------------------------

_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
# C0 controls (but tab, LF, CR) and DEL are dropped; PostgreSQL's jsonb refuses NUL outright.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")
_WHITESPACE = re.compile(r"[\t\n\r\x85\u2028\u2029]")


@dataclass(frozen=True, slots=True)
class _Segment:
    """One segment: ``fields[n]`` is field n as sent (for MSH, ``fields[1]`` is MSH-1)."""

    name: str
    sequence: int
    fields: list[str]

    def get(self, n: int) -> str:
        return self.fields[n] if n < len(self.fields) else ""


class _Reader:
    """Splits and unescapes values with one message's delimiters (HL7 v2.5.1 §2.5.4, §2.7)."""

    def __init__(self, sep: str, enc: str, codec: str) -> None:
        self.field_sep = sep
        self.component = enc[0]
        self.repetition = enc[1]
        self.escape = enc[2]
        self.subcomponent = enc[3]
        self.codec = codec

    def reps(self, raw: str) -> list[str]:
        """The repetitions of a field, empty ones included (their position counts)."""
        return raw.split(self.repetition) if raw else []

    def comp(self, raw: str, n: int, sub: int = 1) -> str:
        """Text of component ``n``, subcomponent ``sub`` (1-based) of one repetition."""
        comps = raw.split(self.component)
        if n > len(comps):
            return ""
        subs = comps[n - 1].split(self.subcomponent)
        return self.text(subs[sub - 1]) if sub <= len(subs) else ""

    def text(self, raw: str) -> str:
        """Unescaped, cleaned text of an elementary value; the HL7 null ``""`` is empty."""
        if raw == '""':
            return ""
        value = self._unescape(raw) if self.escape in raw else raw
        value = _WHITESPACE.sub(" ", _CONTROL.sub("", value))
        return value.strip()

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
        simple = {
            "F": self.field_sep,
            "S": self.component,
            "T": self.subcomponent,
            "R": self.repetition,
            "E": self.escape,
        }
        if seq in simple:
            return simple[seq]
        if seq in ("H", "N") or seq.startswith((".", "C", "M", "Z")):
            return ""  # highlighting, formatting, character-set switches, local: no text
        if seq.startswith("X") and len(seq) > 1:
            try:
                return bytes.fromhex(seq[1:]).decode(self.codec, errors="replace")
            except ValueError:
                return as_sent
        return as_sent


def _segments(text: str) -> tuple[_Reader, list[_Segment], str]:
    """Split ``text`` into segments with the delimiters MSH-1/MSH-2 declare."""
    lines = [line for line in text.split("\r") if line.strip()]
    header = lines[0] if lines else ""
    sep, enc, msh_fields = _msh_fields(header)
    charset = _declared_charset(msh_fields, enc)
    codec = _codec_for(charset) or "utf-8"
    counts: dict[str, int] = {}
    segments: list[_Segment] = []
    for index, line in enumerate(lines):
        fields = line.split(sep)
        name = fields[0]
        if index == 0:
            fields.insert(1, sep)  # MSH-1 is the separator itself
        elif not _SEGMENT_ID.fullmatch(name):
            raise Hl7Problem(
                SEGMENT_SEQUENCE_ERROR,
                f"segment {index + 1} of the message has no valid segment ID",
                reject=True,
            )
        elif name == "MSH":
            raise Hl7Problem(
                SEGMENT_SEQUENCE_ERROR,
                "a second MSH segment: send one message at a time (batches are not read)",
                "MSH",
                sequence=2,
                reject=True,
            )
        counts[name] = counts.get(name, 0) + 1
        segments.append(_Segment(name, counts[name], fields))
    return _Reader(sep, enc, codec), segments, charset


# --- dates -------------------------------------------------------------------------------

# HL7 TS/DTM: YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ] (HL7 v2.5.1 ch. 2A, DTM and TS).
_DTM = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(\.\d{1,4})?)?)?)?)?)?"
    r"([+-]\d{4})?",
    re.ASCII,
)


def _latest_today() -> date:
    """Today's date somewhere on Earth (UTC+14): a birth or death on it is not in the future."""
    return (datetime.now(UTC) + timedelta(hours=14)).date()


def _dtm_date(
    value: str, where: str, seg: _Segment, field_no: int, what: str, today: date
) -> tuple[re.Match[str], str]:
    """Check the date part of a DTM; return the match and the FHIR date (YYYY[-MM[-DD]])."""

    def bad(reason: str) -> Hl7Problem:
        return Hl7Problem(
            DATA_TYPE_ERROR,
            f"{where} ({what}) {reason}",
            seg.name,
            seg.sequence,
            field_no,
            component=1,
        )

    m = _DTM.fullmatch(value)
    if m is None:
        raise bad("is not an HL7 date/time (YYYY[MM[DD[HHMM[SS]]]][+ZZZZ])")
    year, month, day = int(m[1]), m[2], m[3]
    if month is not None and not 1 <= int(month) <= 12:
        raise bad("has a month that does not exist")
    if day is not None:
        try:
            date(year, int(month or 1), int(day))
        except ValueError:
            raise bad("is not a calendar date") from None
    if year < EARLIEST_BIRTH_YEAR:
        raise bad(f"is before {EARLIEST_BIRTH_YEAR}")
    if date(year, int(month or 1), int(day or 1)) > today:
        raise bad("is in the future")
    fhir = m[1] + (f"-{month}" if month else "") + (f"-{day}" if day else "")
    return m, fhir


def _offset(m: re.Match[str] | None) -> str | None:
    if m is None or not m[8]:
        return None
    hours, minutes = int(m[8][1:3]), int(m[8][3:5])
    if hours > 14 or minutes > 59:
        return None
    return f"{m[8][0]}{m[8][1:3]}:{m[8][3:5]}"


# --- identifiers ---------------------------------------------------------------------------

_OID = re.compile(r"[0-2](?:\.(?:0|[1-9]\d*))+", re.ASCII)
_URI = re.compile(r"(?:https?://|urn:)\S+", re.IGNORECASE)
_SNILS_NAMES = frozenset({"SNILS", "СНИЛС"})
_OMS_NAMES = frozenset({"ENP", "OMS", "ОМС", "ЕНП"})
_PASSPORT_NAMES = frozenset({"PASSPORT", "ПАСПОРТ"})
# Table 0203 types that mean "the MO's own number for the patient".
_LOCAL_TYPES = frozenset({"", "MR", "PI", "PN"})
_REASONS: Final = {
    "malformed-snils": "a SNILS has 11 digits",
    "invalid-snils-checksum": "the SNILS check number does not match its first nine digits",
    "malformed-oms": "an OMS policy number (ENP) has 16 digits",
    "invalid-oms-check-digit": "the OMS policy check digit does not match the number",
    "malformed-passport": "a passport is a 4-digit series and a 6-digit number",
}
_TITLES: Final = {SNILS_SYSTEM: "SNILS", OMS_SYSTEM: "OMS policy", PASSPORT_SYSTEM: "passport"}
_SSN_NOISE = re.compile(r"[\s\-.]")


@dataclass(slots=True)
class _Context:
    reader: _Reader
    default_system: str | None
    system_for_authority: Callable[[str], str | None]
    today: date
    sender_offset: str | None
    warnings: list[Hl7Problem]

    def warn(self, code: str, message: str, seg: _Segment, field_no: int, **kw: Any) -> None:
        self.warnings.append(Hl7Problem(code, message, seg.name, seg.sequence, field_no, **kw))


def _where(seg: _Segment, field_no: int, rep: int | None = None) -> str:
    out = f"{seg.name}-{field_no}"
    if rep is not None:
        out += f" repetition {rep}"
    if seg.sequence > 1:
        out += f" (segment {seg.name} number {seg.sequence})"
    return out


def _resolve_system(ctx: _Context, namespace: str, universal: str, type_code: str) -> str | None:
    """The identifier system of a CX, from its assigning authority (CX.4) and type (CX.5)."""
    # HD.2 universal ID; some senders put the OID or URI in HD.1 instead.
    authority = universal or (namespace if _OID.fullmatch(namespace) else "")
    if not authority and _URI.fullmatch(namespace):
        authority = namespace
    if _OID.fullmatch(authority):
        return normalise_system(authority)  # the SNILS OID gives SNILS_SYSTEM itself
    if _URI.fullmatch(authority):
        return authority
    ns = namespace.upper()
    if type_code in _SNILS_NAMES or ns in _SNILS_NAMES:
        return SNILS_SYSTEM
    if type_code in _OMS_NAMES or ns in _OMS_NAMES:
        return OMS_SYSTEM
    if type_code == "PPN" or ns in _PASSPORT_NAMES:
        return PASSPORT_SYSTEM
    if namespace:
        found = ctx.system_for_authority(namespace)
        if found and normalise_system(found):
            return normalise_system(found)
    if type_code in _LOCAL_TYPES and ctx.default_system:
        return normalise_system(ctx.default_system) or None
    return None


def _checked_value(system: str, value: str, seg: _Segment, field_no: int, rep: int | None) -> str:
    try:
        return normalise_identifier(system, value)
    except IdentifierError as exc:
        title = _TITLES.get(system, "identifier")
        reason = _REASONS.get(exc.reason, "the value is not valid")
        # ``from None``: the IdentifierError's own text quotes check digits.
        raise Hl7Problem(
            DATA_TYPE_ERROR,
            f"{_where(seg, field_no, rep)} ({title}): {exc.reason}: {reason}",
            seg.name,
            seg.sequence,
            field_no,
            component=1,
            repetition=rep,
        ) from None


def _cx_identifiers(ctx: _Context, seg: _Segment, field_no: int) -> list[dict[str, Any]]:
    """A repeating CX field (PID-3, MRG-1) as FHIR Identifiers (HL7 v2.5.1 ch. 2A, CX)."""
    r = ctx.reader
    out: list[dict[str, Any]] = []
    for rep_no, rep in enumerate(r.reps(seg.get(field_no)), 1):
        value = r.comp(rep, 1)  # CX.1 ID number
        if not value:
            if r.text(rep.replace(r.component, "").replace(r.subcomponent, "")):
                ctx.warn(
                    REQUIRED_FIELD_MISSING,
                    f"{_where(seg, field_no, rep_no)} has no ID number (CX.1); ignored",
                    seg,
                    field_no,
                    component=1,
                    repetition=rep_no,
                )
            continue
        namespace = r.comp(rep, 4, 1)  # CX.4 assigning authority: HD.1 namespace ID
        universal = r.comp(rep, 4, 2)  # HD.2 universal ID (an OID when HD.3 is ISO)
        type_code = r.comp(rep, 5).upper()  # CX.5 identifier type code (table 0203)
        system = _resolve_system(ctx, namespace, universal, type_code)
        if system is None:
            raise Hl7Problem(
                TABLE_VALUE_NOT_FOUND,
                f"{_where(seg, field_no, rep_no)}: the identifier system cannot be resolved — "
                "its assigning authority (CX.4) and type (CX.5) match no national system and "
                "no system registered for the sender, and no default system applies",
                seg.name,
                seg.sequence,
                field_no,
                component=4,
                repetition=rep_no,
            )
        ident: dict[str, Any] = {
            "system": system,
            "value": _checked_value(system, value, seg, field_no, rep_no),
        }
        if system == PASSPORT_SYSTEM:
            ident["type"] = {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "PPN"}]}
        elif system not in NATIONAL_SYSTEMS:
            if type_code in _LOCAL_TYPES:
                code = type_code or "MR"  # an untyped local number is the record number
                ident["type"] = {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": code}]}
            else:
                ident["type"] = {"text": type_code}
        if not any(o["system"] == ident["system"] and o["value"] == ident["value"] for o in out):
            out.append(ident)
    return out


def _ssn_snils(ctx: _Context, seg: _Segment, identifiers: list[dict[str, Any]]) -> None:
    """PID-19 (SSN number) holding 11 digits is a SNILS in Russian feeds (§3.4.2.19)."""
    value = ctx.reader.text(seg.get(19))
    if not value:
        return
    digits = _SSN_NOISE.sub("", value)
    if len(digits) != 11 or not digits.isascii() or not digits.isdigit():
        ctx.warn(DATA_TYPE_ERROR, "PID-19 (SSN) is not an 11-digit SNILS; ignored", seg, 19)
        return
    snils = _checked_value(SNILS_SYSTEM, digits, seg, 19, None)
    known = [i["value"] for i in identifiers if i["system"] == SNILS_SYSTEM]
    if snils in known:
        return
    if known:
        ctx.warn(
            DATA_TYPE_ERROR,
            "PID-19 (SSN) holds a SNILS different from the one in PID-3; PID-19 ignored",
            seg,
            19,
        )
        return
    identifiers.append({"system": SNILS_SYSTEM, "value": snils})


# --- names, addresses, telecom -------------------------------------------------------------

# XPN.7 name type (table 0200) → HumanName.use; U (unspecified) and empty give no use.
_NAME_USE: Final = {"L": "official", "M": "maiden", "N": "nickname", "S": "anonymous", "U": None}


def _names(ctx: _Context, seg: _Segment) -> list[dict[str, Any]]:
    """PID-5 patient name (XPN, repeating) → Patient.name (HL7 v2.5.1 §3.4.2.5)."""
    r = ctx.reader
    out: list[dict[str, Any]] = []
    for rep in r.reps(seg.get(5)):
        family = r.comp(rep, 1, 1)  # XPN.1 family name, FN.1 surname
        given = r.comp(rep, 2)  # XPN.2 given name
        patronymic = r.comp(rep, 3)  # XPN.3 second and further given names: the отчество
        if not (family or given or patronymic):
            continue
        name: dict[str, Any] = {}
        type_code = r.comp(rep, 7).upper()  # XPN.7 name type code
        use = _NAME_USE.get(type_code, "usual") if type_code else None
        if use:
            name["use"] = use
        name["text"] = " ".join(p for p in (family, given, patronymic) if p)
        if family:
            name["family"] = family
        if given:
            name["given"] = [given, patronymic] if patronymic else [given]
        elif patronymic:
            # Alone, the patronymic would read as the first name: mark it ISO 21090 MID.
            name["given"] = [patronymic]
            name["_given"] = [{"extension": [{"url": EN_QUALIFIER_URL, "valueCode": "MID"}]}]
        suffixes = [s for s in (r.comp(rep, 4), r.comp(rep, 6)) if s]  # XPN.4, XPN.6 degree
        prefix = r.comp(rep, 5)  # XPN.5 prefix
        if prefix:
            name["prefix"] = [prefix]
        if suffixes:
            name["suffix"] = suffixes
        out.append(name)
    return out


# XAD.7 address type (table 0190) → Address.use / Address.type.
_ADDRESS_USE: Final[dict[str, tuple[str | None, str | None]]] = {
    "H": ("home", None),
    "P": ("home", None),
    "B": ("work", None),
    "O": ("work", None),
    "C": ("temp", None),
    "BA": ("old", None),
    "M": (None, "postal"),
}


def _addresses(ctx: _Context, seg: _Segment) -> list[dict[str, Any]]:
    """PID-11 patient address (XAD, repeating) → Patient.address (HL7 v2.5.1 §3.4.2.11)."""
    r = ctx.reader
    out: list[dict[str, Any]] = []
    for rep in r.reps(seg.get(11)):
        # XAD.1 SAD: street or mailing address, else street name + dwelling number.
        street = r.comp(rep, 1, 1) or " ".join(
            p for p in (r.comp(rep, 1, 2), r.comp(rep, 1, 3)) if p
        )
        other = r.comp(rep, 2)  # XAD.2 other designation (flat, building)
        city = r.comp(rep, 3)  # XAD.3
        state = r.comp(rep, 4)  # XAD.4 state or province (субъект РФ)
        postal = r.comp(rep, 5)  # XAD.5 zip or postal code
        country = r.comp(rep, 6)  # XAD.6 country (ISO 3166)
        kind = r.comp(rep, 7).upper()  # XAD.7 address type
        lines = [p for p in (street, other) if p]
        if not (lines or city or state or postal or country):
            continue
        addr: dict[str, Any] = {}
        use, type_ = _ADDRESS_USE.get(kind, (None, None))
        if use:
            addr["use"] = use
        if type_:
            addr["type"] = type_
        # Postcode first, then region, city and street: the order Russian records use.
        parts: list[str] = []
        for p in (postal, state, city, *lines):
            if p and p not in parts:
                parts.append(p)
        addr["text"] = ", ".join(parts)
        if lines:
            addr["line"] = lines
        for key, value in (
            ("city", city),
            ("state", state),
            ("postalCode", postal),
            ("country", country),
        ):
            if value:
                addr[key] = value
        out.append(addr)
    return out


# XTN.1 digits and the usual punctuation, with an optional extension (X123, ext. 123, доб. 123).
_PHONE = re.compile(r"\+?[\d\s().\-]+(?:\s*(?:[xX]|ext\.?|доб\.?)\s*\d+)?", re.ASCII)
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_MIN_PHONE_DIGITS = 5


def _telecoms(ctx: _Context, seg: _Segment, field_no: int) -> list[dict[str, Any]]:
    """PID-13 home / PID-14 business phone (XTN) → Patient.telecom (§3.4.2.13, §3.4.2.14)."""
    r = ctx.reader
    base_use = "home" if field_no == 13 else "work"
    out: list[dict[str, Any]] = []
    for rep_no, rep in enumerate(r.reps(seg.get(field_no)), 1):
        use_code = r.comp(rep, 2).upper()  # XTN.2 telecommunication use code (table 0201)
        equipment = r.comp(rep, 3).upper()  # XTN.3 telecommunication equipment type (0202)
        email = r.comp(rep, 4)  # XTN.4 communication address
        formatted = r.comp(rep, 1)  # XTN.1 [NNN] [(999)]999-9999 [X99999] [C any text]
        unformatted = r.comp(rep, 12)  # XTN.12 unformatted telephone number
        country, area, local = r.comp(rep, 5), r.comp(rep, 6), r.comp(rep, 7)
        extension = r.comp(rep, 8)  # XTN.8
        if not (formatted or email or unformatted or local):
            continue
        use = {"WPN": "work", "PRN": "home", "ORN": "home", "VHN": "temp"}.get(use_code, base_use)
        entry: dict[str, Any]
        if equipment in ("INTERNET", "X.400") or use_code == "NET":
            address = email or formatted
            if equipment == "X.400" or not _EMAIL.fullmatch(address):
                ctx.warn(
                    DATA_TYPE_ERROR,
                    f"{_where(seg, field_no, rep_no)} is not an e-mail address; dropped",
                    seg,
                    field_no,
                    component=4,
                    repetition=rep_no,
                )
                continue
            entry = {"system": "email", "value": address, "use": use}
        else:
            if local:
                number = " ".join(
                    p for p in (f"+{country.lstrip('+')}" if country else "", area, local) if p
                )
                if extension:
                    number += f" ext. {extension}"
            else:
                number = unformatted or formatted
            digits = sum(ch.isdigit() for ch in number)
            if not _PHONE.fullmatch(number) or digits < _MIN_PHONE_DIGITS:
                ctx.warn(
                    DATA_TYPE_ERROR,
                    f"{_where(seg, field_no, rep_no)} is not a telephone number; dropped",
                    seg,
                    field_no,
                    component=1,
                    repetition=rep_no,
                )
                continue
            system = {"FX": "fax", "BP": "pager"}.get(equipment, "phone")
            entry = {"system": system, "value": number, "use": use}
            if equipment == "CP":
                entry["use"] = "mobile"
        out.append(entry)
    return out


# --- the patient ---------------------------------------------------------------------------

# PID-8 administrative sex (table 0001) → Patient.gender; М/Ж are what Russian MIS type.
_GENDER: Final = {
    "M": "male",
    "F": "female",
    "O": "other",
    "A": "other",
    "U": "unknown",
    "N": "unknown",
    "М": "male",
    "Ж": "female",
}


def _birth_date(ctx: _Context, seg: _Segment) -> str | None:
    """PID-7 date/time of birth (TS) → Patient.birthDate; the time is dropped (§3.4.2.7)."""
    value = ctx.reader.comp(seg.get(7), 1)  # TS.1
    if not value:
        return None
    _m, fhir = _dtm_date(value, _where(seg, 7), seg, 7, "date of birth", ctx.today)
    return fhir


def _deceased(ctx: _Context, seg: _Segment, patient: dict[str, Any]) -> None:
    """PID-29 death date and time → deceasedDateTime, else PID-30 death indicator → Boolean."""
    r = ctx.reader
    when = r.comp(seg.get(29), 1)  # PID-29 patient death date and time (TS.1)
    indicator = r.text(seg.get(30)).upper()  # PID-30 patient death indicator (Y/N)
    if indicator not in ("", "Y", "N"):
        ctx.warn(TABLE_VALUE_NOT_FOUND, "PID-30 (death indicator) is not Y or N; ignored", seg, 30)
        indicator = ""
    if when:
        m, fhir = _dtm_date(when, _where(seg, 29), seg, 29, "date of death", ctx.today)
        if m[4] is not None:
            hour, minute, second = int(m[4]), int(m[5] or 0), int(m[6] or 0)
            if hour > 23 or minute > 59 or second > 59:
                raise Hl7Problem(
                    DATA_TYPE_ERROR,
                    f"{_where(seg, 29)} (date of death) has a time that does not exist",
                    seg.name,
                    seg.sequence,
                    29,
                    component=1,
                )
            if m[8] and _offset(m) is None:
                raise Hl7Problem(
                    DATA_TYPE_ERROR,
                    f"{_where(seg, 29)} (date of death) has a time zone offset that does not exist",
                    seg.name,
                    seg.sequence,
                    29,
                    component=1,
                )
            # FHIR dateTime with a time needs seconds and a zone.
            offset = _offset(m) or ctx.sender_offset or DEFAULT_UTC_OFFSET
            fhir += f"T{hour:02d}:{minute:02d}:{second:02d}{m[7] or ''}{offset}"
        if indicator == "N":
            ctx.warn(
                DATA_TYPE_ERROR,
                "PID-30 (death indicator) is N but PID-29 has a death date; the date is kept",
                seg,
                30,
            )
        patient["deceasedDateTime"] = fhir
    elif indicator:
        patient["deceasedBoolean"] = indicator == "Y"


def _patient(ctx: _Context, seg: _Segment) -> dict[str, Any]:
    """One PID segment as a FHIR R4 Patient dict (HL7 v2.5.1 §3.4.2)."""
    r = ctx.reader
    patient: dict[str, Any] = {"resourceType": "Patient"}
    identifiers = _cx_identifiers(ctx, seg, 3)  # PID-3 → Patient.identifier (§3.4.2.3)
    _ssn_snils(ctx, seg, identifiers)  # PID-19 SSN number → SNILS (§3.4.2.19)
    if identifiers:
        patient["identifier"] = identifiers
    names = _names(ctx, seg)  # PID-5 → Patient.name (§3.4.2.5)
    if not names:
        raise Hl7Problem(
            REQUIRED_FIELD_MISSING,
            f"{_where(seg, 5)} (patient name) has no family, given or second name",
            seg.name,
            seg.sequence,
            5,
        )
    patient["name"] = names
    # PID-13 home, PID-14 business phone → Patient.telecom (§3.4.2.13, §3.4.2.14)
    telecom = _telecoms(ctx, seg, 13) + _telecoms(ctx, seg, 14)
    unique = [t for i, t in enumerate(telecom) if t not in telecom[:i]]
    if unique:
        patient["telecom"] = unique
    sex = r.text(seg.get(8)).upper()  # PID-8 → Patient.gender (§3.4.2.8)
    if sex in _GENDER:
        patient["gender"] = _GENDER[sex]
    elif sex:
        ctx.warn(TABLE_VALUE_NOT_FOUND, "PID-8 (administrative sex) is not in table 0001", seg, 8)
    born = _birth_date(ctx, seg)  # PID-7 → Patient.birthDate (§3.4.2.7)
    if born:
        patient["birthDate"] = born
    _deceased(ctx, seg, patient)  # PID-29, PID-30 → Patient.deceased[x] (§3.4.2.29, §3.4.2.30)
    addresses = _addresses(ctx, seg)  # PID-11 → Patient.address (§3.4.2.11)
    if addresses:
        patient["address"] = addresses
    return patient


def _prior_identifiers(ctx: _Context, mrg: _Segment) -> list[dict[str, str]]:
    """MRG-1 prior patient identifier list (CX) → ``{system, value}`` (HL7 v2.5.1 ch. 3)."""
    prior = [{"system": i["system"], "value": i["value"]} for i in _cx_identifiers(ctx, mrg, 1)]
    if not prior:
        raise Hl7Problem(
            REQUIRED_FIELD_MISSING,
            f"{_where(mrg, 1)} (prior patient identifier list) is empty",
            mrg.name,
            mrg.sequence,
            1,
            reject=True,
        )
    return prior


# --- the message ---------------------------------------------------------------------------


def _header_checks(r: _Reader, msh: _Segment, segments: list[_Segment]) -> tuple[str, str]:
    """MSH-9 message type, MSH-12 version, MSH-11 processing ID; returns (event, version)."""
    msh_9 = msh.get(9)
    message_code = r.comp(msh_9, 1)  # MSG.1 message code
    if not message_code:
        raise Hl7Problem(
            REQUIRED_FIELD_MISSING, "MSH-9 (message type) is empty", "MSH", field=9, reject=True
        )
    if message_code != "ADT":
        raise Hl7Problem(
            UNSUPPORTED_MESSAGE_TYPE,
            "MSH-9.1 (message code) is not ADT; this interface takes ADT messages only",
            "MSH",
            field=9,
            component=1,
            reject=True,
        )
    event = r.comp(msh_9, 2)  # MSG.2 trigger event
    if not event:
        evn = next((s for s in segments if s.name == "EVN"), None)
        event = r.text(evn.get(1)) if evn else ""  # EVN-1 event type code (v2.3 senders)
    if not event:
        raise Hl7Problem(
            REQUIRED_FIELD_MISSING,
            "MSH-9.2 (trigger event) is empty and there is no EVN-1",
            "MSH",
            field=9,
            component=2,
            reject=True,
        )
    if event not in ADT_EVENTS:
        raise Hl7Problem(
            UNSUPPORTED_EVENT_CODE,
            f"trigger event {event[:8]} is not one of {', '.join(ADT_EVENTS)}",
            "MSH",
            field=9,
            component=2,
            reject=True,
        )
    version = r.comp(msh.get(12), 1)  # VID.1 version ID
    if not version:
        raise Hl7Problem(
            REQUIRED_FIELD_MISSING, "MSH-12 (version ID) is empty", "MSH", field=12, reject=True
        )
    if version not in SUPPORTED_VERSIONS:
        raise Hl7Problem(
            UNSUPPORTED_VERSION_ID,
            f"MSH-12 version is not one of {', '.join(SUPPORTED_VERSIONS)}",
            "MSH",
            field=12,
            reject=True,
        )
    processing = r.comp(msh.get(11), 1)  # PT.1 processing ID (table 0103)
    if processing and processing not in ("P", "D", "T"):
        raise Hl7Problem(
            UNSUPPORTED_PROCESSING_ID,
            "MSH-11 (processing ID) is not P, D or T",
            "MSH",
            field=11,
            reject=True,
        )
    return event, version


def _patient_groups(event: str, segments: list[_Segment]) -> list[tuple[_Segment, _Segment | None]]:
    """PID segments, each with its MRG for A40 (PATIENT group: PID [PD1] MRG [PV1])."""
    groups: list[tuple[_Segment, _Segment | None]] = []
    for seg in segments:
        if seg.name == "PID":
            if event != "A40" and groups:
                raise Hl7Problem(
                    SEGMENT_SEQUENCE_ERROR,
                    f"ADT^{event} carries one PID segment; this one is extra",
                    "PID",
                    seg.sequence,
                    reject=True,
                )
            groups.append((seg, None))
        elif seg.name == "MRG" and event == "A40":
            if not groups or groups[-1][1] is not None:
                raise Hl7Problem(
                    SEGMENT_SEQUENCE_ERROR,
                    "an MRG segment must follow the PID of the patient it merges into",
                    "MRG",
                    seg.sequence,
                    reject=True,
                )
            groups[-1] = (groups[-1][0], seg)
    if not groups:
        raise Hl7Problem(
            SEGMENT_SEQUENCE_ERROR, "the message has no PID segment", "PID", reject=True
        )
    if event == "A40":
        for pid, mrg in groups:
            if mrg is None:
                raise Hl7Problem(
                    SEGMENT_SEQUENCE_ERROR,
                    f"ADT^A40 PID segment {pid.sequence} is not followed by its MRG segment",
                    "MRG",
                    pid.sequence,
                    reject=True,
                )
    return groups


def _parse(
    text: str,
    default_system: str | None,
    system_for_authority: Callable[[str], str | None],
    today: date,
) -> AdtMessage:
    r, segments, charset = _segments(text)
    msh = segments[0]
    event, version = _header_checks(r, msh, segments)
    control_id = r.text(msh.get(10))  # MSH-10 message control ID
    if not control_id:
        raise Hl7Problem(
            REQUIRED_FIELD_MISSING,
            "MSH-10 (message control ID) is empty",
            "MSH",
            field=10,
            reject=True,
        )
    msh_7 = _DTM.fullmatch(r.comp(msh.get(7), 1))  # MSH-7 date/time of message
    ctx = _Context(r, default_system, system_for_authority, today, _offset(msh_7), [])
    patients: list[AdtPatient] = []
    for pid, mrg in _patient_groups(event, segments):
        patient = _patient(ctx, pid)
        prior = _prior_identifiers(ctx, mrg) if mrg is not None else []
        patients.append(AdtPatient(patient, prior))
    return AdtMessage(
        event=event,
        control_id=control_id,
        sending_application=r.comp(msh.get(3), 1),  # MSH-3 HD.1 namespace ID
        # MSH-4 HD.1 namespace ID, else HD.2 universal ID (the MO's OID).
        sending_facility=r.comp(msh.get(4), 1) or r.comp(msh.get(4), 2),
        version=version,
        charset=charset,
        patients=patients,
        warnings=ctx.warnings,
    )


def parse_adt(
    raw: bytes | str,
    *,
    default_system: str | None,
    system_for_authority: Callable[[str], str | None] = lambda _a: None,
    today: date | None = None,
) -> AdtMessage:
    """Parse one ADT message (A01, A04, A08, A28, A31, A40) and map it for the index.

    ``default_system`` is the sending MO's registered patient-id system, used for PID-3
    numbers typed MR/PI/PN (or untyped) whose authority is not otherwise resolved;
    ``system_for_authority`` maps a CX.4 namespace ID to a system (the facility registry).
    ``today`` bounds plausible dates (default: the latest date on Earth, UTC+14).

    Raises :class:`Hl7Problem` with ``reject=True`` (answer AR) when the message is not HL7 or
    has no MSH, its delimiters are broken, it is not ADT (200), the event is not one of
    :data:`ADT_EVENTS` (201), the version is not 2.3–2.5.1 (203), the processing ID is not
    P/D/T (202), PID is missing or an A40 PID has no MRG (100/101); with ``reject=False``
    (answer AE) for what the application cannot accept: a PID-3 system that cannot be
    resolved (103), a SNILS/OMS/passport that fails its check or an impossible date (102), no
    name (101). Anything unexpected becomes code 207, never another exception.
    """
    try:
        if isinstance(raw, str):
            text = _normalise_terminators(raw)
        else:
            text = decode_message(bytes(raw))
        return _parse(text, default_system, system_for_authority, today or _latest_today())
    except Hl7Problem:
        raise
    except Exception as exc:  # the edge must always be able to answer; 207 is "internal"
        raise Hl7Problem(
            APPLICATION_INTERNAL_ERROR,
            f"internal error while mapping the message ({type(exc).__name__})",
        ) from exc
