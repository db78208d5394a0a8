"""HL7 v2 reading and acknowledging (hie.adapters.hl7v2): character sets, the message's own
delimiters, escapes, header checks, dates, and ACK bytes for every version and mode."""

from __future__ import annotations

import pickle
from datetime import datetime, timedelta, timezone

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from hie.adapters.hl7v2 import (
    SUPPORTED_VERSIONS,
    Delimiters,
    Hl7Problem,
    MessageHeader,
    ack_code_for,
    ack_for_unreadable,
    build_ack,
    check_header,
    decode_message,
    fhir_datetime,
    fhir_instant,
    new_control_id,
    parse,
    read_header,
    read_sender,
    wants_application_ack,
    wants_commit_ack,
)
from tests.fixtures.hl7v2 import LAB_FACILITY, Raw, hl7_message, oru_message

NOW = datetime(2025, 3, 1, 12, 0, 5, tzinfo=timezone(timedelta(hours=3)))
HUB = "HIE|SPB^1.2.643.5.1.13.13.12.2.78^ISO"
LAB = "LIS|LAB7001^1.2.643.5.1.13.13.12.2.78.7001^ISO"
NM_ERROR = Hl7Problem("102", "OBX-5 (numeric result) is not a number", "OBX", 3, 5)
UNIT_WARNING = Hl7Problem("103", "OBX-6 (units) is unknown", "OBX", 4, 6, component=1)


def header(raw: bytes) -> MessageHeader:
    return parse(raw).header


# --- bytes → text ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("charset", "encode_as"),
    [
        ("UNICODE UTF-8", None),
        ("WINDOWS-1251", None),
        ("cp1251", None),
        ("8859/5", None),
        ("", "cp1251"),  # undeclared Windows-1251: what Russian feeds send
        ("", None),  # undeclared UTF-8
    ],
)
def test_cyrillic_decodes_in_every_charset(charset: str, encode_as: str | None) -> None:
    raw = oru_message(charset=charset, encode_as=encode_as)
    text = decode_message(raw)
    assert "Иванова^Анна^Сергеевна" in text
    assert "Гемоглобин" in text
    msg = parse(raw)
    assert msg.header.charset == charset
    assert (
        msg.header.codec
        == {
            "UNICODE UTF-8": "utf-8",
            "WINDOWS-1251": "cp1251",
            "cp1251": "cp1251",
            "8859/5": "iso8859-5",
            "": encode_as or "utf-8",
        }[charset]
    )


def test_declared_utf8_with_cp1251_bytes_is_rejected() -> None:
    raw = oru_message(charset="UNICODE UTF-8", encode_as="cp1251")
    with pytest.raises(Hl7Problem) as info:
        parse(raw)
    assert (info.value.code, info.value.field, info.value.reject) == ("102", 18, True)


def test_unknown_charset_is_rejected() -> None:
    with pytest.raises(Hl7Problem) as info:
        parse(oru_message(charset="EBCDIC", encode_as="utf-8"))
    assert (info.value.code, info.value.field, info.value.reject) == ("103", 18, True)


def test_framing_bom_and_line_ends_are_dropped() -> None:
    raw = oru_message(terminator="\r\n")
    assert parse(b"\x0b\xef\xbb\xbf" + raw + b"\x1c\r").segments[-1].name == "SPM"
    assert len(parse(raw.replace(b"\r\n", b"\n")).segments) == len(parse(raw).segments)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "100"),
        (b"PID|1||x\r", "100"),
        (b"MSH", "101"),
        (b"MSHA^~\\&|x", "102"),
        (b"MSH|^~|x", "102"),
    ],
)
def test_what_is_not_hl7_is_rejected(raw: bytes, code: str) -> None:
    with pytest.raises(Hl7Problem) as info:
        parse(raw)
    assert (info.value.code, info.value.reject) == (code, True)


def test_bad_segment_id_and_second_msh_are_rejected() -> None:
    with pytest.raises(Hl7Problem) as info:
        parse(oru_message() + b"obx|1\r")
    assert (info.value.code, info.value.reject) == ("100", True)
    with pytest.raises(Hl7Problem) as info:
        parse(oru_message() + oru_message())
    assert (info.value.code, info.value.segment, info.value.sequence) == ("100", "MSH", 2)


# --- delimiters, splitting, escapes --------------------------------------------------------------


@pytest.mark.parametrize(("field_sep", "encoding_chars"), [("|", "^~\\&"), ("#", "$*/%")])
def test_the_messages_own_delimiters_are_used(field_sep: str, encoding_chars: str) -> None:
    raw = oru_message(field_sep=field_sep, encoding_chars=encoding_chars)
    msg = parse(raw)
    d = msg.header.delimiters
    assert (d.field, d.encoding_characters) == (field_sep, encoding_chars)
    r = msg.reader
    obx = msg.all("OBX")[6]
    assert obx.sequence == 7
    assert r.comps(obx.get(3)) == ["6690-2", "Лейкоциты", "LN"]
    assert r.comp(obx.get(6), 2) == "10^9/л"  # the component separator, escaped as \S\
    pid = msg.first("PID")
    assert pid is not None
    assert [r.comp(rep, 1) for rep in r.reps(pid.get(3))] == ["7000123", "11223344595"]
    assert r.comp(r.reps(pid.get(3))[1], 4, 2) == "1.2.643.100.3"  # CX.4 HD.2 subcomponent
    assert msg.header.sending_facility == LAB_FACILITY


def test_escape_sequences_are_decoded() -> None:
    value = Raw(r"a\F\b\S\c\T\d\R\e\E\f \H\bold\N\ \X41D0B0\ \Zlocal\ \Cxxyy\end")
    raw = oru_message(obx={1: {2: "ST", 5: value}})
    msg = parse(raw)
    obx = msg.all("OBX")[0]
    assert (
        msg.reader.text(obx.get(5)) == "a|b^c&d~e\\f bold Aа  end"
    )  # local and charset escapes give no text


def test_formatted_text_keeps_its_line_breaks() -> None:
    raw = oru_message(obx={1: {2: "FT", 5: Raw(r"первая строка\.br\вторая\.sp\ строка")}})
    msg = parse(raw)
    assert msg.reader.lines(msg.all("OBX")[0].get(5)) == "первая строка\nвторая строка"


def test_unterminated_or_malformed_escapes_are_kept_as_sent() -> None:
    raw = oru_message(obx={1: {2: "ST", 5: Raw(r"a\XZZ\b \Fc")}})
    msg = parse(raw)
    assert msg.reader.text(msg.all("OBX")[0].get(5)) == r"a\XZZ\b \Fc"


def test_hex_escape_uses_the_message_charset() -> None:
    raw = oru_message(charset="WINDOWS-1251", obx={1: {2: "ST", 5: Raw("\\XC0\\")}})
    msg = parse(raw)
    assert msg.reader.text(msg.all("OBX")[0].get(5)) == "А"


@pytest.mark.parametrize("d", [Delimiters(), Delimiters("#", "$", "*", "/", "%")])
def test_escape_text_round_trips(d: Delimiters) -> None:
    text = "a|b^c&d~e\\f#g$h*i/j%k"
    raw = hl7_message(
        "ORU",
        "R01",
        "ORU_R01",
        [("NTE", {1: "1", 3: Raw(d.escape_text(text + "\r\nnext"))})],
        field_sep=d.field,
        encoding_chars=d.encoding_characters,
    )
    msg = parse(raw)
    nte = msg.first("NTE")
    assert nte is not None
    assert msg.reader.text(nte.get(3)) == text + "  next"


def test_null_and_control_characters() -> None:
    msg = parse(oru_message(obx={1: {2: "ST", 5: Raw('""')}, 2: {2: "ST", 5: Raw("a\x00b\tc")}}))
    r = msg.reader
    assert r.text(msg.all("OBX")[0].get(5)) == ""
    assert r.text(msg.all("OBX")[1].get(5)) == "ab c"


# --- the header ---------------------------------------------------------------------------------


def test_header_fields() -> None:
    raw = oru_message(control_id="CTRL-77", accept_ack="AL", application_ack="NE")
    h = header(raw)
    assert (h.sending_application, h.sending_facility) == ("LIS", LAB_FACILITY)
    assert (h.receiving_application, h.receiving_facility) == ("HIE", "SPB")
    assert (h.message_code, h.trigger_event, h.message_structure) == ("ORU", "R01", "ORU_R01")
    assert (h.control_id, h.processing_id, h.version) == ("CTRL-77", "P", "2.5.1")
    assert (h.accept_ack_type, h.application_ack_type) == ("AL", "NE")
    assert h.enhanced_mode
    assert h.utc_offset == "+03:00"
    assert h.timestamp == "20250301120000+0300"
    assert h.fields[10] == "CTRL-77"
    assert read_header(raw) == h
    assert read_sender(raw) == ("LIS", LAB_FACILITY)


def test_facility_without_namespace_gives_its_oid() -> None:
    raw = oru_message(sending_facility=("", "1.2.643.5.1.13.13.12.2.78.7001", "ISO"))
    assert read_sender(raw) == ("LIS", "1.2.643.5.1.13.13.12.2.78.7001")


def test_trigger_from_evn_for_v2_3_senders() -> None:
    raw = hl7_message("ADT", "", "", [("EVN", {1: "A04"})], version="2.3")
    assert header(raw).trigger_event == "A04"


@pytest.mark.parametrize(
    ("kw", "code", "field", "component"),
    [
        ({"message_type": ""}, "101", 9, None),
        ({"message_type": "ADT"}, "200", 9, 1),
        ({"trigger": ""}, "101", 9, 2),
        ({"trigger": "R30"}, "201", 9, 2),
        ({"version": ""}, "101", 12, None),
        ({"version": "2.6"}, "203", 12, None),
        ({"processing_id": "X"}, "202", 11, None),
        ({"control_id": ""}, "101", 10, None),
    ],
)
def test_header_checks(kw: dict[str, str], code: str, field: int, component: int | None) -> None:
    args = {"message_type": "ORU", "trigger": "R01"} | kw
    version = kw.get("version", "2.5.1")
    other = {k: v for k, v in kw.items() if k in ("processing_id", "control_id")}
    raw = hl7_message(
        args["message_type"], args["trigger"], "ORU_R01", [], version=version, **other
    )
    with pytest.raises(Hl7Problem) as info:
        check_header(header(raw), {"ORU": ("R01",)})
    p = info.value
    assert (p.code, p.segment, p.field, p.component, p.reject) == (
        code,
        "MSH",
        field,
        component,
        True,
    )


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_supported_versions_pass(version: str) -> None:
    check_header(header(oru_message(version=version)), {"ORU": ("R01",)})


# --- problems -----------------------------------------------------------------------------------


def test_problem_is_picklable_and_printable() -> None:
    p = Hl7Problem("102", "OBX-5 is bad", "OBX", 3, 5, 1, False, 2, 1)
    assert pickle.loads(pickle.dumps(p)) == p
    assert str(p) == "HL7 error 102 at OBX[3]-5(2).1.1: OBX-5 is bad"
    assert ack_code_for([]) == "AA"
    assert ack_code_for([p]) == "AE"
    assert ack_code_for([p, Hl7Problem("200", "x", reject=True)]) == "AR"


# --- dates --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025", "2025"),
        ("202503", "2025-03"),
        ("20250301", "2025-03-01"),
        ("2025030108", "2025-03-01T08:00:00+03:00"),
        ("202503010830", "2025-03-01T08:30:00+03:00"),
        ("20250301083015.25", "2025-03-01T08:30:15.25+03:00"),
        ("20250301083015+0500", "2025-03-01T08:30:15+05:00"),
        ("20250301083015-0330", "2025-03-01T08:30:15-03:30"),
    ],
)
def test_fhir_datetime(value: str, expected: str) -> None:
    assert fhir_datetime(value) == expected


@pytest.mark.parametrize(
    "value",
    ["2025-03-01", "20251301", "20250230", "2025030125", "20250301086000", "2025030108+2500"],
)
def test_impossible_dates_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        fhir_datetime(value)


def test_instants_need_a_time_and_use_the_given_zone() -> None:
    assert fhir_instant("202503010830", "+00:00") == "2025-03-01T08:30:00+00:00"
    with pytest.raises(ValueError):
        fhir_instant("20250301")


# --- acknowledgements ---------------------------------------------------------------------------


def ack(raw: bytes, code: str = "AA", errors=(), warnings=(), **kw: object) -> bytes:  # type: ignore[no-untyped-def]
    return build_ack(header(raw), code, errors, warnings, control_id="ACK-1", now=NOW, **kw)  # type: ignore[arg-type]


def test_ack_v2_5_1_original_mode_byte_exact() -> None:
    raw = oru_message(control_id="CTRL-1")
    assert (
        ack(raw)
        == (
            f"MSH|^~\\&|{HUB}|{LAB}|20250301120005+0300||ACK^R01^ACK|ACK-1|P|2.5.1|||||RUS|"
            "UNICODE UTF-8\rMSA|AA|CTRL-1\r"
        ).encode()
    )
    assert (
        ack(raw, "AE", [NM_ERROR], [UNIT_WARNING])
        == (
            f"MSH|^~\\&|{HUB}|{LAB}|20250301120005+0300||ACK^R01^ACK|ACK-1|P|2.5.1|||||RUS|"
            "UNICODE UTF-8\r"
            "MSA|AE|CTRL-1\r"
            "ERR||OBX^3^5^1|102^Data type error^HL70357|E||||OBX-5 (numeric result) is not a number\r"
            "ERR||OBX^4^6^1^1|103^Table value not found^HL70357|W||||OBX-6 (units) is unknown\r"
        ).encode()
    )


def test_ack_v2_3_uses_err_1_repetitions_byte_exact() -> None:
    raw = oru_message(version="2.3", control_id="CTRL-1")
    no_segment = Hl7Problem("207", "internal error")
    assert (
        ack(raw, "AE", [NM_ERROR, no_segment], [UNIT_WARNING])
        == (
            f"MSH|^~\\&|{HUB}|{LAB}|20250301120005+0300||ACK^R01|ACK-1|P|2.3|||||RUS|"
            "UNICODE UTF-8\r"
            "MSA|AE|CTRL-1|OBX-5 (numeric result) is not a number\r"
            "ERR|OBX^3^5^102&OBX-5 (numeric result) is not a number&HL70357"
            "~^^^207&internal error&HL70357"
            "~OBX^4^6^103&warning: OBX-6 (units) is unknown&HL70357\r"
        ).encode()
    )


@pytest.mark.parametrize("version", ["2.3.1", "2.4", "2.5", "2.5.1"])
def test_acks_pass_hl7apy_strict_validation(version: str) -> None:
    # hl7apy is not our parser: its strict message structures check the ACK independently
    # (its v2.3 library cannot read an ACK at all, so v2.3 is checked byte for byte above).
    raw = oru_message(version=version, control_id="CTRL-1")
    out = ack(raw, "AE", [NM_ERROR], [UNIT_WARNING], text="see ERR")
    msg = parse_message(out.decode(), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    msg.validate()
    assert msg.msa.msa_1.value == "AE"
    assert msg.msa.msa_2.value == "CTRL-1"


def test_err_text_is_escaped_with_the_messages_delimiters() -> None:
    raw = oru_message(control_id="C|1", field_sep="#", encoding_chars="$*/%")
    p = Hl7Problem("102", "value a#b$c*d/e%f\rnext", "OBX", 1, 5)
    out = ack(raw, "AE", [p]).decode()
    lines = out.split("\r")
    assert lines[0].startswith("MSH#$*/%#HIE#SPB$")
    assert lines[1] == "MSA#AE#C|1"
    assert (
        lines[2]
        == "ERR##OBX$1$5$1#102$Data type error$HL70357#E####value a/F/b/S/c/R/d/E/e/T/f next"
    )
    msg = parse(out.encode())
    err = msg.first("ERR")
    assert err is not None
    assert msg.reader.text(err.get(8)) == "value a#b$c*d/e%f next"


def test_ack_keeps_the_incoming_encoding_and_delimiters() -> None:
    raw = oru_message(
        charset="WINDOWS-1251",
        sending_application="ЛИС",
        field_sep="#",
        encoding_chars="$~\\&",
        control_id="КОНТРОЛЬ-1",
    )
    out = ack(raw, "AE", [Hl7Problem("102", "Ошибка в OBX-5", "OBX", 1, 5)])
    with pytest.raises(UnicodeDecodeError):
        out.decode("utf-8")
    text = out.decode("cp1251")
    assert text.startswith("MSH#$~\\&#HIE#SPB$1.2.643.5.1.13.13.12.2.78$ISO#ЛИС#")
    assert "#ACK$R01$ACK#ACK-1#P#2.5.1#####RUS#WINDOWS-1251\r" in text
    assert "\rMSA#AE#КОНТРОЛЬ-1\r" in text
    assert text.endswith("#E####Ошибка в OBX-5\r")
    assert parse(out).header.codec == "cp1251"


def test_undeclared_cp1251_is_answered_in_cp1251() -> None:
    raw = oru_message(charset="", encode_as="cp1251", sending_application="ЛИС")
    out = ack(raw)
    assert "|ЛИС|" in out.decode("cp1251")


def test_enhanced_mode_commit_then_application_ack() -> None:
    raw = oru_message(control_id="CTRL-9", accept_ack="AL", application_ack="AL")
    h = header(raw)
    assert h.enhanced_mode
    assert wants_commit_ack(h, accepted=True) and wants_application_ack(h, accepted=True)
    commit = build_ack(h, "CA", control_id="ACK-1", now=NOW)
    application = build_ack(h, "AA", control_id="ACK-2", now=NOW)
    assert commit.split(b"\r")[1] == b"MSA|CA|CTRL-9"
    assert application.split(b"\r")[1] == b"MSA|AA|CTRL-9"
    for out in (commit, application):
        first = out.split(b"\r")[0].split(b"|")
        # the ACK asks for no acknowledgement of its own: MSH-15 and MSH-16 are empty
        assert first[14:16] == [b"", b""]
        assert first[8] == b"ACK^R01^ACK"


@pytest.mark.parametrize(
    ("accept", "application", "commit_ok", "commit_err", "app_ok", "app_err"),
    [
        ("", "", False, False, True, True),  # original mode: one ACK, always
        ("AL", "NE", True, True, False, False),
        ("NE", "AL", False, False, True, True),
        ("ER", "SU", False, True, True, False),
        ("SU", "ER", True, False, False, True),
        ("", "AL", True, True, True, True),  # only MSH-16: an empty MSH-15 is AL
    ],
)
def test_which_acks_enhanced_mode_wants(
    accept: str,
    application: str,
    commit_ok: bool,
    commit_err: bool,
    app_ok: bool,
    app_err: bool,
) -> None:
    h = header(oru_message(accept_ack=accept, application_ack=application))
    assert wants_commit_ack(h, accepted=True) is commit_ok
    assert wants_commit_ack(h, accepted=False) is commit_err
    assert wants_application_ack(h, accepted=True) is app_ok
    assert wants_application_ack(h, accepted=False) is app_err


def test_ack_code_must_be_from_table_0008() -> None:
    with pytest.raises(ValueError):
        build_ack(header(oru_message()), "OK")  # type: ignore[arg-type]


def test_control_ids_are_fresh_and_short() -> None:
    ids = {new_control_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert {len(i) for i in ids} == {20}
    out = build_ack(header(oru_message()), "AA")
    assert (
        out.split(b"\r")[0].split(b"|")[9]
        != build_ack(header(oru_message()), "AA").split(b"\r")[0].split(b"|")[9]
    )


# --- unreadable input ---------------------------------------------------------------------------


def test_ack_for_garbage_uses_defaults() -> None:
    out = ack_for_unreadable(b"\x00\xffgarbage", "100", "not HL7", control_id="A1", now=NOW)
    assert out == (
        b"MSH|^~\\&|||||20250301120005+0300||ACK|A1|P|2.5\r"
        b"MSA|AR\r"
        b"ERR|||100^Segment sequence error^HL70357|E||||not HL7\r"
    )


def test_ack_for_a_truncated_head_reads_what_it_can() -> None:
    raw = oru_message(control_id="CTRL-5", charset="WINDOWS-1251", field_sep="#",
                      encoding_chars="$~\\&", sending_application="ЛИС")  # fmt: skip
    out = ack_for_unreadable(raw[:400], "207", "message too large", control_id="A2", now=NOW)
    text = out.decode("cp1251")
    assert text == (
        "MSH#$~\\&#HIE#SPB$1.2.643.5.1.13.13.12.2.78$ISO#ЛИС#"
        "LAB7001$1.2.643.5.1.13.13.12.2.78.7001$ISO#20250301120005+0300##ACK$R01$ACK#A2#P#"
        "2.5.1#####RUS#WINDOWS-1251\r"
        "MSA#AR#CTRL-5\r"
        "ERR###207$Application internal error$HL70357#E####message too large\r"
    )


def test_ack_for_a_head_cut_inside_msh_drops_the_cut_field() -> None:
    raw = oru_message(control_id="CTRL-5")
    cut = raw.index(b"CTRL-5") + 3  # inside MSH-10
    out = ack_for_unreadable(raw[:cut], ack_code="CR", control_id="A3", now=NOW)
    assert out.split(b"\r")[:2] == [
        f"MSH|^~\\&|{HUB}|{LAB}|20250301120005+0300||ACK^R01^ACK|A3|P|2.5".encode(),
        b"MSA|CR",
    ]


def test_ack_for_unreadable_does_not_claim_an_unknown_charset_or_version() -> None:
    head = b"\x0bMSH|^~\\&|A|B|C|D|2025||ORU^R01|X1|T|2.9|||||RUS|EBCDIC\r"
    out = ack_for_unreadable(head, "203", "bad", control_id="A4", now=NOW)
    assert out.split(b"\r")[:2] == [
        b"MSH|^~\\&|C|D|A|B|20250301120005+0300||ACK^R01^ACK|A4|T|2.5|||||RUS",
        b"MSA|AR|X1",
    ]


def test_ack_for_a_whole_msh_keeps_its_last_field() -> None:
    for end in (b"\r", b"\x1c"):
        head = b"MSH|^~\\&|A|B|C|D|2025||ORU^R01|X1|P|2.3.1" + end
        out = ack_for_unreadable(head, "100", "no segments", control_id="A5", now=NOW)
        assert (
            out.split(b"\r")[0] == b"MSH|^~\\&|C|D|A|B|20250301120005+0300||ACK^R01^ACK|A5|P|2.3.1"
        )
