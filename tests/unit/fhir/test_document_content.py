"""Document bodies: sniffing, declared-type checks and text extraction (synthetic documents)."""

from __future__ import annotations

import time

import pytest

from hie.fhir.document_content import (
    CDA_MEDIA_TYPE,
    MAX_TEXT_CHARS,
    UnsafeXml,
    check_declared,
    dicom_sop_class_uid,
    extract_text,
    parse_media_type,
    parse_xml,
    sniff,
)
from tests.fixtures.documents import (
    BILLION_LAUGHS,
    CDA_SECTIONS,
    DICOM_BYTES,
    HTML_PAGE,
    KOS_SOP_CLASS,
    XXE,
    make_cda,
    make_dicom_meta,
    make_pdf,
)

# --- sniff ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (make_pdf("Hello"), "application/pdf"),
        (DICOM_BYTES, "application/dicom"),
        (make_cda(*CDA_SECTIONS), CDA_MEDIA_TYPE),
        (make_cda(*CDA_SECTIONS, prefix="hl7"), CDA_MEDIA_TYPE),
        (make_cda(*CDA_SECTIONS, encoding="windows-1251"), CDA_MEDIA_TYPE),
        (make_cda(*CDA_SECTIONS, encoding="UTF-16"), CDA_MEDIA_TYPE),
        (b'<?xml version="1.0"?><ClinicalDocument><title/></ClinicalDocument>', "application/xml"),
        (b"<Bundle xmlns='http://hl7.org/fhir'/>", "application/xml"),
        (BILLION_LAUGHS, "application/xml"),
        (HTML_PAGE.encode(), "text/html"),
        (b"  <HTML><body>x</body></HTML>", "text/html"),
        (b'<html xmlns="http://www.w3.org/1999/xhtml"><body/></html>', "text/html"),
        ("Жалобы на кашель".encode(), "text/plain"),
        ("Жалобы на кашель".encode("cp1251"), "text/plain"),
        ("\ufeffЖалобы".encode(), "text/plain"),
        (b"", "text/plain"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", None),
        (bytes(range(256)), None),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_sniff(data: bytes, expected: str | None) -> None:
    assert sniff(data) == expected


def test_sniff_looks_only_at_the_head_of_large_text() -> None:
    # A multi-byte character cut at the 64 KiB boundary must not turn text into "binary".
    data = ("я" * 70_000).encode()
    assert sniff(data) == "text/plain"


# --- check_declared ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("declared", "data"),
    [
        ("application/pdf", make_pdf("Hello")),
        ("Application/PDF", make_pdf("Hello")),
        ("application/dicom", DICOM_BYTES),
        (CDA_MEDIA_TYPE, make_cda(*CDA_SECTIONS)),
        ("text/xml", make_cda(*CDA_SECTIONS)),
        ("application/xml; charset=utf-8", make_cda(*CDA_SECTIONS)),
        ("text/xml", b"<Bundle xmlns='http://hl7.org/fhir'/>"),
        ("text/plain", "Жалобы на кашель".encode()),
        ("text/plain; charset=windows-1251", "Жалобы на кашель".encode("cp1251")),
        ("text/plain", "Жалобы на кашель".encode("cp1251")),
        ("text/plain", make_cda(*CDA_SECTIONS)),
        ("text/html; charset=UTF-8", HTML_PAGE.encode()),
        ("application/octet-stream", bytes(range(256))),
        ("image/jpeg", b"\xff\xd8\xff\xe0"),
    ],
)
def test_check_declared_accepts(declared: str, data: bytes) -> None:
    assert check_declared(declared, data) is None


@pytest.mark.parametrize(
    ("declared", "data", "cda", "fragment"),
    [
        ("application/pdf", "Жалобы".encode(), False, "does not start with %PDF-"),
        ("application/pdf", HTML_PAGE.encode(), False, "does not start with %PDF-"),
        ("application/dicom", make_pdf("x"), False, "no DICM marker"),
        (CDA_MEDIA_TYPE, b"<Bundle xmlns='http://hl7.org/fhir'/>", False, "not ClinicalDocument"),
        (CDA_MEDIA_TYPE, b"<ClinicalDocument/>", False, "not ClinicalDocument"),
        ("text/xml", b"<Bundle xmlns='http://hl7.org/fhir'/>", True, "not ClinicalDocument"),
        (CDA_MEDIA_TYPE, make_pdf("x"), False, "not well-formed XML"),
        ("text/xml", b"<a><b></a>", False, "not well-formed XML"),
        ("text/xml", BILLION_LAUGHS, False, "refused"),
        (CDA_MEDIA_TYPE, XXE, False, "refused"),
        ("text/plain", bytes(range(256)), False, "binary"),
        ("text/plain", make_pdf("x"), False, "application/pdf"),
        ("text/html", DICOM_BYTES, False, "application/dicom"),
        ("text/plain; charset=utf-8", "Жалобы".encode("cp1251"), False, "not valid utf-8"),
        ("text/plain; charset=klingon", b"abc", False, "unknown charset"),
        ("image/png", make_pdf("x"), False, "application/pdf"),
        ("not a type", b"abc", False, "not a media type"),
        ("", b"abc", False, "not a media type"),
    ],
)
def test_check_declared_refuses(declared: str, data: bytes, cda: bool, fragment: str) -> None:
    reason = check_declared(declared, data, cda=cda)
    assert reason is not None
    assert fragment in reason


def test_dicom_sop_class_uid_tells_kos_and_sr_apart() -> None:
    assert dicom_sop_class_uid(DICOM_BYTES) == KOS_SOP_CLASS
    sr = "1.2.840.10008.5.1.4.1.1.88.33"
    assert dicom_sop_class_uid(make_dicom_meta(sr)) == sr
    assert dicom_sop_class_uid(make_pdf("x")) is None
    assert dicom_sop_class_uid(DICOM_BYTES[:140]) is None  # truncated meta group
    assert dicom_sop_class_uid(b"\x00" * 128 + b"DICM") is None


def test_parse_media_type() -> None:
    assert parse_media_type('Text/Plain; Charset="windows-1251"') == (
        "text/plain",
        {"charset": "windows-1251"},
    )
    assert parse_media_type("nonsense")[0] == ""


# --- PDF -----------------------------------------------------------------------------------


def test_pdf_text_layer_of_every_page_in_russian_and_english() -> None:
    data = make_pdf("Выписка пациента (копия)", "Page two: Hello", title="Выписка")
    got = extract_text(data, "application/pdf")
    assert got.indexable
    assert got.reason is None
    assert got.pages == 2
    assert got.title == "Выписка"
    assert "Выписка пациента (копия)" in got.text
    assert "Page two: Hello" in got.text


def test_pdf_with_a_user_password_is_flagged_encrypted() -> None:
    data = make_pdf("Секрет", user_password="s3cret", owner_password="owner")
    assert sniff(data) == "application/pdf"
    assert check_declared("application/pdf", data) is None
    got = extract_text(data, "application/pdf")
    assert (got.indexable, got.reason, got.text) == (False, "encrypted", "")


def test_pdf_with_only_an_owner_password_is_indexed() -> None:
    # An empty user password means anyone may open it: only printing/copying is restricted.
    data = make_pdf("Открытый текст", user_password="", owner_password="owner")
    got = extract_text(data, "application/pdf")
    assert got.indexable
    assert "Открытый текст" in got.text


@pytest.mark.parametrize(
    "data",
    [
        b"%PDF-1.7\n" + b"\x00garbage\xff" * 50,
        b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << /Root 1 0 R >>",
        b"%PDF-",
    ],
    ids=["garbage", "dangling-reference", "header-only"],
)
def test_corrupt_pdf_is_not_indexable_and_does_not_raise(data: bytes) -> None:
    got = extract_text(data, "application/pdf")
    assert not got.indexable
    assert got.reason is not None
    assert got.reason.startswith("unreadable PDF")


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_pdf_never_raises(keep: float) -> None:
    data = make_pdf("Обрезанный документ", "second page")
    got = extract_text(data[: int(len(data) * keep)], "application/pdf")
    # pypdf may rebuild a damaged xref and recover the text; either outcome is fine, a crash is not.
    assert got.indexable or got.reason


# --- CDA and other XML ---------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["UTF-8", "windows-1251", "UTF-16"])
@pytest.mark.parametrize("prefix", ["", "hl7"])
def test_cda_narrative_with_russian_preserved(encoding: str, prefix: str) -> None:
    data = make_cda(*CDA_SECTIONS, encoding=encoding, prefix=prefix)
    got = extract_text(data, "text/xml")
    assert got.indexable
    assert got.title == "Выписной эпикриз"
    lines = got.text.splitlines()
    assert lines[0] == "Выписной эпикриз"
    assert "Диагноз" in lines
    assert "Пневмония внебольничная, J18.9" in lines
    assert "Тест Результат" in lines  # cells separated, rows on their own lines
    assert "Гемоглобин 128 г/л" in lines
    assert "СОЭ 12 мм/ч" in lines
    assert "Lymphocytes 30%" in lines
    # Coded header parts are not narrative.
    assert "POCD_HD000040" not in got.text


def test_cda_nested_sections_are_all_read() -> None:
    inner = (
        "<paragraph>Внешний</paragraph></text><component><section><title>Вложенный</title>"
        "<text>Внутренний текст</text></section></component><text>"
    )
    got = extract_text(make_cda(("Раздел", inner)), CDA_MEDIA_TYPE)
    assert "Внешний" in got.text
    assert "Вложенный" in got.text
    assert "Внутренний текст" in got.text


def test_other_xml_gives_its_text_nodes() -> None:
    got = extract_text(b"<root><a>one</a><b>two <i>three</i></b></root>", "application/xml")
    assert got.indexable
    assert got.text.split() == ["one", "two", "three"]


@pytest.mark.parametrize("data", [BILLION_LAUGHS, XXE], ids=["billion-laughs", "xxe"])
def test_entity_declarations_are_refused_fast(data: bytes) -> None:
    started = time.perf_counter()
    got = extract_text(data, "text/xml")
    assert time.perf_counter() - started < 1.0
    assert not got.indexable
    assert got.reason is not None
    assert "ENTITY" in got.reason
    assert "root:" not in got.text
    with pytest.raises(UnsafeXml):
        parse_xml(data)


def test_doctype_without_entities_is_parsed_and_no_external_dtd_is_loaded() -> None:
    data = (
        b'<!DOCTYPE ClinicalDocument SYSTEM "http://invalid.example/cda.dtd">'
        b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>Ok</title></ClinicalDocument>'
    )
    assert extract_text(data, "text/xml").text == "Ok"


def test_malformed_xml_is_not_indexable() -> None:
    got = extract_text(b"<ClinicalDocument><title>x</ClinicalDocument>", "text/xml")
    assert not got.indexable
    assert got.reason is not None
    assert "not well-formed" in got.reason


# --- plain text and HTML -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        ("Жалобы на кашель.\r\nT 37,8".encode(), "text/plain"),
        ("Жалобы на кашель.\r\nT 37,8".encode("cp1251"), "text/plain"),
        ("Жалобы на кашель.\r\nT 37,8".encode("cp1251"), "text/plain; charset=windows-1251"),
        ("\ufeffЖалобы на кашель.\nT 37,8".encode(), "text/plain"),
        ("Жалобы на кашель.\nT 37,8".encode("utf-16"), "text/plain"),
        ("Жалобы на кашель.\nT 37,8".encode(), "application/octet-stream"),
    ],
    ids=["utf8-crlf", "cp1251-guessed", "cp1251-declared", "utf8-bom", "utf16", "octet-stream"],
)
def test_plain_text_in_utf8_and_windows_1251(data: bytes, content_type: str) -> None:
    got = extract_text(data, content_type)
    assert got.indexable
    assert got.text == "Жалобы на кашель.\nT 37,8"


def test_binary_declared_as_text_is_not_indexable() -> None:
    got = extract_text(bytes(range(256)), "text/plain")
    assert (got.indexable, got.reason) == (False, "not decodable as text")


def test_html_visible_text_without_scripts_or_styles() -> None:
    got = extract_text(HTML_PAGE.encode(), "text/html")
    assert got.indexable
    assert got.title == "Заключение"
    lines = [line for line in got.text.splitlines() if line]
    assert lines == ["Рентгенография", "Очаговых теней нет & норма."]
    for hidden in ("secret", "alert", "color"):
        assert hidden not in got.text


def test_html_meta_charset_windows_1251() -> None:
    page = '<html><head><meta charset="windows-1251"></head><body><p>Норма</p></body></html>'
    assert extract_text(page.encode("cp1251"), "text/html").text == "Норма"


# --- other types and the size cap ----------------------------------------------------------


def test_dicom_and_unknown_types_are_not_indexed() -> None:
    assert extract_text(DICOM_BYTES, "application/dicom").reason == (
        "DICOM objects are not indexed as text"
    )
    assert extract_text(DICOM_BYTES, "application/octet-stream").indexable is False
    got = extract_text(b"\xff\xd8\xff\xe0", "image/jpeg")
    assert (got.indexable, got.reason) == (False, "no text extractor for image/jpeg")


def test_text_is_capped_and_says_so() -> None:
    data = ("слово " * 200_000).encode()
    got = extract_text(data, "text/plain")
    assert got.indexable
    assert got.truncated
    assert len(got.text) == MAX_TEXT_CHARS
    assert not extract_text(b"short", "text/plain").truncated
