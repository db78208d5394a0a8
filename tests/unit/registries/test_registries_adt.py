"""HL7 v2 ADT → FHIR Patient mapping for the master patient index (hie.registries.adt)."""

from __future__ import annotations

import pickle
from datetime import date
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hie.adapters.hl7v2 import Hl7Problem, decode_message
from hie.fhir.model import validate
from hie.registries.adt import ADT_EVENTS, AdtMessage, parse_adt
from hie.registries.identifiers import (
    IDENTIFIER_TYPE_SYSTEM,
    OMS_SYSTEM,
    PASSPORT_SYSTEM,
    SNILS_SYSTEM,
)
from hie.registries.mpi import validate_demographics
from tests.fixtures.hl7v2 import (
    MO_NAMESPACE,
    MO_OID,
    MO_SYSTEM,
    MRN_1,
    MRN_OLD,
    OMS_1,
    PASSPORT_1,
    SNILS_1,
    SNILS_2,
    SNILS_OID,
    Raw,
    adt_message,
    bad_snils,
    default_mrg,
    default_pid,
    mutated,
    oms,
)

TODAY = date(2025, 11, 1)
MR_TYPE = {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "MR"}]}
MRN_IDENT = {"system": MO_SYSTEM, "value": MRN_1, "type": MR_TYPE}
SNILS_IDENT = {"system": SNILS_SYSTEM, "value": SNILS_1}
NAME = {
    "use": "official",
    "text": "Иванова Анна Сергеевна",
    "family": "Иванова",
    "given": ["Анна", "Сергеевна"],
}
EXPECTED_PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "identifier": [MRN_IDENT, SNILS_IDENT],
    "name": [NAME],
    "telecom": [{"system": "phone", "value": "+7 921 1234567", "use": "mobile"}],
    "gender": "female",
    "birthDate": "1985-03-07",
    "address": [
        {
            "use": "home",
            "text": "190121, Санкт-Петербург, ул. Декабристов, д. 5, кв. 10",
            "line": ["ул. Декабристов, д. 5", "кв. 10"],
            "city": "Санкт-Петербург",
            "postalCode": "190121",
            "country": "RUS",
        }
    ],
}


def parse(raw: bytes | str, **kw: Any) -> AdtMessage:
    kw.setdefault("default_system", MO_SYSTEM)
    kw.setdefault("today", TODAY)
    return parse_adt(raw, **kw)


def one(raw: bytes | str, **kw: Any) -> dict[str, Any]:
    """The only patient of a message, checked to be valid FHIR with usable demographics."""
    msg = parse(raw, **kw)
    assert len(msg.patients) == 1
    patient = msg.patients[0].patient
    validate(patient)
    return patient


def problem(raw: bytes | str, **kw: Any) -> Hl7Problem:
    with pytest.raises(Hl7Problem) as info:
        parse(raw, **kw)
    return info.value


def assert_no_phi(p: Hl7Problem) -> None:
    text = str(p) + p.message
    for secret in ("Иванова", "Анна", "Сергеевна", SNILS_1, SNILS_1[:9], MRN_1, OMS_1):
        assert secret not in text


# --- events --------------------------------------------------------------------------------


@pytest.mark.parametrize("event", ["A01", "A04", "A08", "A28", "A31"])
def test_each_single_patient_event_maps_the_pid(event: str) -> None:
    msg = parse(adt_message(event, control_id=f"CTRL-{event}"))
    assert msg.event == event
    assert msg.control_id == f"CTRL-{event}"
    assert msg.sending_application == "MIS"
    assert msg.sending_facility == MO_NAMESPACE
    assert msg.version == "2.5.1"
    assert msg.charset == "UNICODE UTF-8"
    assert msg.warnings == []
    assert [p.patient for p in msg.patients] == [EXPECTED_PATIENT]
    assert msg.patients[0].prior_identifiers == []
    validate(msg.patients[0].patient)
    assert validate_demographics(msg.patients[0].patient, today=TODAY) == []


def test_every_declared_event_is_tested() -> None:
    assert ADT_EVENTS == ("A01", "A04", "A08", "A28", "A31", "A40")


def test_a40_merge_pairs_each_mrg_with_the_pid_before_it() -> None:
    second = default_pid(
        pid_3=[(SNILS_2, "", "", "SNILS")],
        pid_5=("Петров", "Игорь", "Николаевич", "", "", "", "L"),
        pid_7="19700115",
        pid_8="M",
    )
    raw = adt_message(
        "A40",
        groups=[
            (default_pid(), default_mrg()),
            (second, default_mrg(("8000777", "", "", ("", f"{MO_OID}.100", "ISO"), "MR"))),
        ],
    )
    msg = parse(raw)
    assert msg.event == "A40"
    assert [p.prior_identifiers for p in msg.patients] == [
        [{"system": MO_SYSTEM, "value": MRN_OLD}],
        [{"system": MO_SYSTEM, "value": "8000777"}],
    ]
    assert msg.patients[0].patient == EXPECTED_PATIENT
    p2 = msg.patients[1].patient
    assert p2["identifier"] == [{"system": SNILS_SYSTEM, "value": SNILS_2}]
    assert p2["name"][0]["given"] == ["Игорь", "Николаевич"]
    assert p2["gender"] == "male"
    assert p2["birthDate"] == "1970-01-15"
    for p in msg.patients:
        validate(p.patient)


def test_a40_prior_identifier_systems_resolve_like_pid_3() -> None:
    raw = adt_message(
        "A40",
        mrg=default_mrg(
            (MRN_OLD, "", "", ("OLDMIS", "", ""), "MR"),
            (SNILS_1, "", "", "", "SNILS"),
        ),
    )
    msg = parse(raw, system_for_authority={"OLDMIS": "urn:oid:1.2.3.4"}.get)
    assert msg.patients[0].prior_identifiers == [
        {"system": "urn:oid:1.2.3.4", "value": MRN_OLD},
        {"system": SNILS_SYSTEM, "value": SNILS_1},
    ]


def test_a40_without_mrg_is_rejected() -> None:
    p = problem(adt_message("A40", mrg=None))
    assert (p.code, p.segment, p.reject) == ("100", "MRG", True)


def test_a40_second_pair_without_mrg_is_rejected() -> None:
    raw = adt_message("A40", groups=[(default_pid(), default_mrg()), (default_pid(), None)])
    p = problem(raw)
    assert (p.code, p.segment, p.sequence, p.reject) == ("100", "MRG", 2, True)


def test_a40_mrg_before_any_pid_is_rejected() -> None:
    p = problem(adt_message("A40", pid=None, mrg=default_mrg()))
    assert (p.code, p.segment, p.reject) == ("100", "MRG", True)


def test_a40_with_empty_mrg_1_is_rejected() -> None:
    p = problem(adt_message("A40", mrg={1: "", 7: "x"}))
    assert (p.code, p.segment, p.field, p.reject) == ("101", "MRG", 1, True)


# --- character sets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("charset", "encode_as"),
    [
        ("UNICODE UTF-8", None),
        ("WINDOWS-1251", None),
        ("cp1251", None),
        ("8859/5", None),
        ("", "cp1251"),  # undeclared Windows-1251, as Russian feeds send it
        ("", "utf-8"),
    ],
)
def test_cyrillic_in_every_charset(charset: str, encode_as: str | None) -> None:
    pid = default_pid(pid_5=("Ёлкина", "Фёкла", "Юрьевна", "", "", "", "L"))
    raw = adt_message(pid=pid, charset=charset, encode_as=encode_as)
    if encode_as == "cp1251":
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")
    msg = parse(raw)
    assert msg.charset == charset
    assert msg.patients[0].patient["name"][0]["family"] == "Ёлкина"
    assert msg.patients[0].patient["name"][0]["given"] == ["Фёкла", "Юрьевна"]
    assert "Ёлкина^Фёкла^Юрьевна" in decode_message(raw)


def test_declared_utf8_with_cp1251_bytes_is_rejected() -> None:
    raw = adt_message(charset="UNICODE UTF-8", encode_as="cp1251")
    p = problem(raw)
    assert (p.code, p.segment, p.field, p.reject) == ("102", "MSH", 18, True)


def test_unknown_charset_is_rejected() -> None:
    p = problem(adt_message(charset="ISO IR87", encode_as="utf-8"))
    assert (p.code, p.segment, p.field, p.reject) == ("103", "MSH", 18, True)


@pytest.mark.parametrize("terminator", ["\r", "\n", "\r\n"])
def test_segment_terminators_are_normalised(terminator: str) -> None:
    raw = adt_message(terminator=terminator)
    text = decode_message(raw)
    assert "\n" not in text
    assert text.split("\r")[2].startswith("PID|")
    assert one(raw) == EXPECTED_PATIENT


def test_mllp_framing_and_bom_are_dropped() -> None:
    raw = b"\x0b\xef\xbb\xbf" + adt_message(charset="") + b"\x1c\r"
    assert one(raw) == EXPECTED_PATIENT


def test_str_input_is_accepted() -> None:
    raw = adt_message().decode("utf-8").replace("\r", "\n")
    assert one(raw) == EXPECTED_PATIENT


# --- versions and delimiters ---------------------------------------------------------------


def test_v2_3_with_the_event_only_in_evn() -> None:
    raw = adt_message("A08", version="2.3", trigger="")
    msg = parse(raw)
    assert (msg.event, msg.version) == ("A08", "2.3")
    assert msg.patients[0].patient == EXPECTED_PATIENT


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5", "2.5.1"])
def test_supported_versions(version: str) -> None:
    assert parse(adt_message(version=version)).version == version


@pytest.mark.parametrize("version", ["2.2", "2.6", "2.7", "3.0"])
def test_unsupported_version_is_rejected(version: str) -> None:
    p = problem(adt_message(version=version))
    assert (p.code, p.segment, p.field, p.reject) == ("203", "MSH", 12, True)


@pytest.mark.parametrize(
    ("field_sep", "encoding_chars"),
    [("|", "$~\\&"), ("#", "^~\\&"), ("#", "$!/*"), ("|", "^~\\&")],
)
def test_the_messages_own_delimiters_are_used(field_sep: str, encoding_chars: str) -> None:
    # Every delimiter of the default set appears in the data and must survive as text.
    pid = default_pid(
        pid_5=("Римская|Корсакова", "Анна^Мария", "Сергеевна", "", "", "", "L"),
        pid_11=("Невский пр., д. 1 & 2 ~ лит. А \\ 3 # $ ! / *", "", "Санкт-Петербург"),
    )
    raw = adt_message(pid=pid, field_sep=field_sep, encoding_chars=encoding_chars)
    assert raw.startswith(f"MSH{field_sep}{encoding_chars}{field_sep}".encode())
    patient = one(raw)
    assert patient["name"][0]["family"] == "Римская|Корсакова"
    assert patient["name"][0]["given"] == ["Анна^Мария", "Сергеевна"]
    assert patient["address"][0]["line"] == ["Невский пр., д. 1 & 2 ~ лит. А \\ 3 # $ ! / *"]
    assert patient["identifier"] == [MRN_IDENT, SNILS_IDENT]


def test_escape_sequences_are_decoded() -> None:
    pid = default_pid(
        pid_5=(
            Raw("Ива\\F\\нова\\S\\\\T\\\\R\\\\E\\"),
            Raw("\\H\\Анна\\N\\"),
            Raw("Серге\\XD0B5\\вна\\.br\\"),
        ),
        pid_11=(Raw("ул. \\Q\\ Садовая"), "", "Санкт-Петербург"),
    )
    patient = one(adt_message(pid=pid))
    assert patient["name"][0]["family"] == "Ива|нова^&~\\"
    assert patient["name"][0]["given"] == ["Анна", "Сергеевна"]
    # An escape the standard does not define is kept as sent.
    assert patient["address"][0]["line"] == ["ул. \\Q\\ Садовая"]


def test_malformed_hex_escape_is_kept_as_sent() -> None:
    pid = default_pid(pid_5=(Raw("Ива\\XZZ\\нова"), "Анна"))
    assert one(adt_message(pid=pid))["name"][0]["family"] == "Ива\\XZZ\\нова"


def test_hex_escape_uses_the_message_charset() -> None:
    # "е" is 0xE5 in Windows-1251.
    pid = default_pid(pid_5=(Raw("Ива\\XED\\ова"), "Анна"))
    raw = adt_message(pid=pid, charset="WINDOWS-1251")
    assert one(raw)["name"][0]["family"] == "Иванова"


@pytest.mark.parametrize(
    "msh_2",
    ["^~\\", "^^\\&", "^~\\&#", "a~\\&", "^~ &"],
)
def test_broken_encoding_characters_are_rejected(msh_2: str) -> None:
    raw = adt_message().replace(b"MSH|^~\\&|", f"MSH|{msh_2}|".encode(), 1)
    p = problem(raw)
    assert (p.code, p.segment, p.field, p.reject) == ("102", "MSH", 2, True)


def test_alphanumeric_field_separator_is_rejected() -> None:
    raw = b"MSHA^~\\&AMISAHIE"
    p = problem(raw)
    assert (p.code, p.field, p.reject) == ("102", 1, True)


# --- identifiers ---------------------------------------------------------------------------


def idents(*reps: Any, **kw: Any) -> list[dict[str, Any]]:
    patient = one(adt_message(pid=default_pid(pid_3=list(reps))), **kw)
    return list(patient["identifier"])


def test_snils_by_oid() -> None:
    assert idents(("112-233-445 95", "", "", ("", SNILS_OID, "ISO"))) == [SNILS_IDENT]


def test_snils_by_oid_in_the_namespace() -> None:
    assert idents(("11223344595", "", "", SNILS_OID)) == [SNILS_IDENT]


@pytest.mark.parametrize(
    "rep",
    [
        ("11223344595", "", "", "", "SNILS"),
        ("11223344595", "", "", "SNILS"),
        ("112 233 445 95", "", "", "СНИЛС", ""),
        ("11223344595", "", "", "пфр", "снилс"),
    ],
)
def test_snils_by_type_code_or_namespace(rep: tuple[str, ...]) -> None:
    assert idents(rep) == [SNILS_IDENT]


def test_snils_in_pid_19() -> None:
    pid = default_pid(pid_3=[(MRN_1, "", "", "", "MR")], pid_19="112-233-445 95")
    msg = parse(adt_message(pid=pid))
    assert msg.patients[0].patient["identifier"] == [MRN_IDENT, SNILS_IDENT]
    assert msg.warnings == []


def test_snils_in_pid_19_equal_to_pid_3_is_not_repeated() -> None:
    msg = parse(adt_message(pid=default_pid(pid_19=SNILS_1)))
    assert msg.patients[0].patient["identifier"] == [MRN_IDENT, SNILS_IDENT]
    assert msg.warnings == []


def test_a_different_snils_in_pid_19_is_a_warning() -> None:
    msg = parse(adt_message(pid=default_pid(pid_19=SNILS_2)))
    assert msg.patients[0].patient["identifier"] == [MRN_IDENT, SNILS_IDENT]
    assert [(w.code, w.field, w.reject) for w in msg.warnings] == [("102", 19, False)]
    assert SNILS_2 not in msg.warnings[0].message


def test_pid_19_that_is_not_a_snils_is_a_warning() -> None:
    msg = parse(adt_message(pid=default_pid(pid_19="123-45-6789")))
    assert msg.patients[0].patient["identifier"] == [MRN_IDENT, SNILS_IDENT]
    assert [(w.code, w.segment, w.field) for w in msg.warnings] == [("102", "PID", 19)]


def test_invalid_snils_in_pid_19_is_an_application_error() -> None:
    p = problem(adt_message(pid=default_pid(pid_3=MRN_1, pid_19=bad_snils("112233445"))))
    assert (p.code, p.field, p.reject) == ("102", 19, False)
    assert "invalid-snils-checksum" in p.message


@pytest.mark.parametrize(
    "rep",
    [
        ("4111 1111 1111 1111", "", "", "", "ENP"),
        ("4111111111111111", "", "", "ОМС"),
        ("4111111111111111", "", "", ("", OMS_SYSTEM, "URI")),
        ("4111111111111111", "", "", "OMS", "NI"),
    ],
)
def test_oms_policy(rep: tuple[Any, ...]) -> None:
    assert idents(rep) == [{"system": OMS_SYSTEM, "value": "4111111111111111"}]


def test_generated_oms_policy() -> None:
    assert idents((OMS_1, "", "", "", "ENP")) == [{"system": OMS_SYSTEM, "value": OMS_1}]


@pytest.mark.parametrize(
    "rep",
    [("4012 345678", "", "", "", "PPN"), ("40 12 345678", "", "", "ПАСПОРТ")],
)
def test_passport(rep: tuple[str, ...]) -> None:
    assert idents(rep) == [
        {
            "system": PASSPORT_SYSTEM,
            "value": PASSPORT_1,
            "type": {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "PPN"}]},
        }
    ]


def test_local_record_number_with_default_system() -> None:
    assert idents((MRN_1, "", "", MO_NAMESPACE, "MR"), (MRN_1, "", "", "", "")) == [MRN_IDENT]


def test_local_patient_internal_id_keeps_its_type() -> None:
    assert idents(("P-42", "", "", "", "PI")) == [
        {
            "system": MO_SYSTEM,
            "value": "P-42",
            "type": {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "PI"}]},
        }
    ]


def test_local_record_number_with_system_for_authority() -> None:
    registry = {"LABMIS": "urn:oid:1.2.643.5.1.13.13.12.2.78.9001.200"}
    got = idents(
        (MRN_1, "", "", MO_NAMESPACE, "MR"),
        ("L-5", "", "", "LABMIS", "MR"),
        default_system=None,
        system_for_authority=lambda ns: (
            registry.get(ns) or (MO_SYSTEM if ns == MO_NAMESPACE else None)
        ),
    )
    assert got == [
        MRN_IDENT,
        {"system": registry["LABMIS"], "value": "L-5", "type": MR_TYPE},
    ]


def test_authority_oid_wins() -> None:
    got = idents((MRN_1, "", "", (MO_NAMESPACE, f"{MO_OID}.100", "ISO"), "MR"), default_system=None)
    assert got == [MRN_IDENT]


def test_authority_uri_in_the_namespace() -> None:
    got = idents((MRN_1, "", "", "https://mis.example.ru/patients", "MR"), default_system=None)
    assert got == [{"system": "https://mis.example.ru/patients", "value": MRN_1, "type": MR_TYPE}]


def test_local_number_with_another_known_type() -> None:
    got = idents(("A-1", "", "", ("", "urn:oid:1.2.3", "URI"), "AN"))
    assert got == [{"system": "urn:oid:1.2.3", "value": "A-1", "type": {"text": "AN"}}]


@pytest.mark.parametrize(
    ("reps", "kw"),
    [
        ([(MRN_1, "", "", MO_NAMESPACE, "MR")], {"default_system": None}),
        ([(MRN_1, "", "", "", "MR"), ("777", "", "", "LAB", "AN")], {}),
    ],
)
def test_unresolvable_system_is_an_application_error(
    reps: list[tuple[str, ...]], kw: dict[str, Any]
) -> None:
    p = problem(adt_message(pid=default_pid(pid_3=reps)), **kw)
    assert (p.code, p.segment, p.field, p.reject) == ("103", "PID", 3, False)
    assert p.repetition == len(reps)
    assert f"PID-3 repetition {len(reps)}" in p.message
    assert_no_phi(p)


def test_invalid_snils_checksum_is_an_application_error() -> None:
    wrong = bad_snils("112233445")
    p = problem(adt_message(pid=default_pid(pid_3=[(MRN_1,), (wrong, "", "", "", "SNILS")])))
    assert (p.code, p.segment, p.field, p.repetition, p.reject) == ("102", "PID", 3, 2, False)
    assert "invalid-snils-checksum" in p.message
    assert wrong not in str(p) and wrong[9:] not in p.message
    assert_no_phi(p)


@pytest.mark.parametrize(
    ("rep", "reason"),
    [
        (("1122334459", "", "", "", "SNILS"), "malformed-snils"),
        ((oms("411111111111111")[:-1] + "0", "", "", "", "ENP"), "invalid-oms-check-digit"),
        (("12345", "", "", "", "ENP"), "malformed-oms"),
        (("AB123456", "", "", "", "PPN"), "malformed-passport"),
    ],
)
def test_malformed_national_identifiers(rep: tuple[str, ...], reason: str) -> None:
    p = problem(adt_message(pid=default_pid(pid_3=[rep])))
    assert (p.code, p.field, p.reject) == ("102", 3, False)
    assert reason in p.message
    assert rep[0] not in p.message


def test_repetition_without_id_is_a_warning() -> None:
    msg = parse(adt_message(pid=default_pid(pid_3=[(MRN_1,), ("", "", "", "LAB", "MR"), ""])))
    assert msg.patients[0].patient["identifier"] == [MRN_IDENT]
    assert [(w.code, w.field, w.repetition) for w in msg.warnings] == [("101", 3, 2)]


# --- demographics --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1985", "1985"),
        ("198503", "1985-03"),
        ("19850307", "1985-03-07"),
        ("198503071230", "1985-03-07"),
        ("19850307123015.25+0300", "1985-03-07"),
        (("19850307", "D"), "1985-03-07"),
    ],
)
def test_birth_date_precisions(value: Any, expected: str) -> None:
    assert one(adt_message(pid=default_pid(pid_7=value)))["birthDate"] == expected


@pytest.mark.parametrize(
    "value", ["20230230", "19851301", "18790101", "20251102", "1985-03-07", "85", "198503a"]
)
def test_impossible_birth_date_is_an_application_error(value: str) -> None:
    p = problem(adt_message(pid=default_pid(pid_7=value)))
    assert (p.code, p.segment, p.field, p.reject) == ("102", "PID", 7, False)
    assert value not in p.message


def test_birth_date_bound_defaults_to_the_real_date() -> None:
    with pytest.raises(Hl7Problem) as info:
        parse_adt(adt_message(pid=default_pid(pid_7="29990101")), default_system=MO_SYSTEM)
    assert (info.value.code, info.value.field) == ("102", 7)
    today = date.today().strftime("%Y%m%d")
    raw = adt_message(pid=default_pid(pid_7=today))
    assert parse_adt(raw, default_system=MO_SYSTEM).patients[0].patient["birthDate"] == (
        f"{today[:4]}-{today[4:6]}-{today[6:]}"
    )


def test_birth_date_today_is_possible() -> None:
    assert one(adt_message(pid=default_pid(pid_7="20251101")))["birthDate"] == "2025-11-01"


@pytest.mark.parametrize("name", ["", '""', ("", "", "", "", "Dr."), [("", ""), '""'], ("  ", " ")])
def test_empty_name_is_an_application_error(name: Any) -> None:
    p = problem(adt_message(pid=default_pid(pid_5=name)))
    assert (p.code, p.segment, p.field, p.reject) == ("101", "PID", 5, False)


def test_name_types_and_repetitions() -> None:
    pid = default_pid(
        pid_5=[
            ("Иванова", "Анна", "Сергеевна", "", "", "", "L"),
            ("Смирнова", "Анна", "Сергеевна", "", "", "", "M"),
            ("", "Аня", "", "", "", "", "N"),
            ("Ivanova", "Anna", "", "", "", "", "D"),
            ("Иванова", "", "Сергеевна"),
            (("Кузнецова", "фон"), "Мария", "", "мл.", "г-жа", "к.м.н."),
        ]
    )
    names = one(adt_message(pid=pid))["name"]
    assert names == [
        NAME,
        {
            "use": "maiden",
            "text": "Смирнова Анна Сергеевна",
            "family": "Смирнова",
            "given": ["Анна", "Сергеевна"],
        },
        {"use": "nickname", "text": "Аня", "given": ["Аня"]},
        {"use": "usual", "text": "Ivanova Anna", "family": "Ivanova", "given": ["Anna"]},
        {
            "text": "Иванова Сергеевна",
            "family": "Иванова",
            "given": ["Сергеевна"],
            "_given": [
                {
                    "extension": [
                        {
                            "url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-qualifier",
                            "valueCode": "MID",
                        }
                    ]
                }
            ],
        },
        {
            "text": "Кузнецова Мария",
            "family": "Кузнецова",
            "given": ["Мария"],
            "prefix": ["г-жа"],
            "suffix": ["мл.", "к.м.н."],
        },
    ]


@pytest.mark.parametrize(
    ("sex", "gender"),
    [
        ("M", "male"),
        ("F", "female"),
        ("O", "other"),
        ("A", "other"),
        ("U", "unknown"),
        ("N", "unknown"),
        ("f", "female"),
        ("Ж", "female"),
    ],
)
def test_gender(sex: str, gender: str) -> None:
    assert one(adt_message(pid=default_pid(pid_8=sex)))["gender"] == gender


def test_unknown_sex_code_is_a_warning() -> None:
    msg = parse(adt_message(pid=default_pid(pid_8="X")))
    assert "gender" not in msg.patients[0].patient
    assert [(w.code, w.field) for w in msg.warnings] == [("103", 8)]


def test_addresses() -> None:
    pid = default_pid(
        pid_11=[
            ("ул. Декабристов, д. 5", "кв. 10", "Санкт-Петербург", "", "190121", "RUS", "H"),
            ("Невский пр., д. 1", "", "Санкт-Петербург", "", "191186", "RUS", "B"),
            (("", "ул. Ленина", "д. 3"), "", "Всеволожск", "Ленинградская обл.", "188640", "", "M"),
            ("", "", "Москва", "", "", "", "BA"),
            ("", "", "", "", "", "", "H"),
        ]
    )
    assert one(adt_message(pid=pid))["address"] == [
        EXPECTED_PATIENT["address"][0],
        {
            "use": "work",
            "text": "191186, Санкт-Петербург, Невский пр., д. 1",
            "line": ["Невский пр., д. 1"],
            "city": "Санкт-Петербург",
            "postalCode": "191186",
            "country": "RUS",
        },
        {
            "type": "postal",
            "text": "188640, Ленинградская обл., Всеволожск, ул. Ленина д. 3",
            "line": ["ул. Ленина д. 3"],
            "city": "Всеволожск",
            "state": "Ленинградская обл.",
            "postalCode": "188640",
        },
        {"use": "old", "text": "Москва", "city": "Москва"},
    ]


def test_telecoms() -> None:
    pid = default_pid(
        pid_13=[
            ("8 (812) 555-12-34", "PRN", "PH"),
            ("", "PRN", "CP", "", "", "", "", "", "", "", "", "+79211234567"),
            ("", "NET", "Internet", "anna.test@example.org"),
            ("", "PRN", "FX", "", "7", "812", "5551235", "12"),
        ],
        pid_14=[
            ("+7 812 555-00-00 доб. 123", "WPN", "PH"),
            ("", "WPN", "CP", "", "7", "921", "7654321"),
        ],
    )
    assert one(adt_message(pid=pid))["telecom"] == [
        {"system": "phone", "value": "8 (812) 555-12-34", "use": "home"},
        {"system": "phone", "value": "+79211234567", "use": "mobile"},
        {"system": "email", "value": "anna.test@example.org", "use": "home"},
        {"system": "fax", "value": "+7 812 5551235 ext. 12", "use": "home"},
        {"system": "phone", "value": "+7 812 555-00-00 доб. 123", "use": "work"},
        {"system": "phone", "value": "+7 921 7654321", "use": "mobile"},
    ]


def test_unparseable_telecoms_are_warnings() -> None:
    pid = default_pid(
        pid_13=[("нет телефона", "PRN", "PH"), ("12", "PRN", "PH"), ("+7 921 1234567",)],
        pid_14=("", "NET", "Internet", "not-an-email"),
    )
    msg = parse(adt_message(pid=pid))
    assert msg.patients[0].patient["telecom"] == [
        {"system": "phone", "value": "+7 921 1234567", "use": "home"}
    ]
    assert [(w.code, w.field, w.repetition, w.reject) for w in msg.warnings] == [
        ("102", 13, 1, False),
        ("102", 13, 2, False),
        ("102", 14, 1, False),
    ]
    assert all("нет" not in w.message and "not-an-email" not in w.message for w in msg.warnings)


@pytest.mark.parametrize(
    ("pid_29", "pid_30", "expected"),
    [
        ("20240105143000", "Y", {"deceasedDateTime": "2024-01-05T14:30:00+03:00"}),
        ("202401051430+0500", "", {"deceasedDateTime": "2024-01-05T14:30:00+05:00"}),
        ("20240105143015.5", "Y", {"deceasedDateTime": "2024-01-05T14:30:15.5+03:00"}),
        ("20240105", "Y", {"deceasedDateTime": "2024-01-05"}),
        ("", "Y", {"deceasedBoolean": True}),
        ("", "N", {"deceasedBoolean": False}),
        ("", "", {}),
    ],
)
def test_death(pid_29: str, pid_30: str, expected: dict[str, Any]) -> None:
    patient = one(adt_message(pid=default_pid(pid_29=pid_29, pid_30=pid_30)))
    assert {k: v for k, v in patient.items() if k.startswith("deceased")} == expected


def test_death_indicator_n_with_a_date_keeps_the_date_and_warns() -> None:
    msg = parse(adt_message(pid=default_pid(pid_29="20240105", pid_30="N")))
    assert msg.patients[0].patient["deceasedDateTime"] == "2024-01-05"
    assert [(w.code, w.field) for w in msg.warnings] == [("102", 30)]


def test_unknown_death_indicator_is_a_warning() -> None:
    msg = parse(adt_message(pid=default_pid(pid_30="maybe")))
    assert not any(k.startswith("deceased") for k in msg.patients[0].patient)
    assert [(w.code, w.field) for w in msg.warnings] == [("103", 30)]


def test_death_time_without_any_offset_is_moscow_time() -> None:
    raw = adt_message(pid=default_pid(pid_29="202401051430"), timestamp="20250301120000")
    assert one(raw)["deceasedDateTime"] == "2024-01-05T14:30:00+03:00"


@pytest.mark.parametrize(
    "pid_29", ["20240230", "20240105250000", "20990101", "202401051430+1900", "2024010514+0300x"]
)
def test_impossible_death_date_is_an_application_error(pid_29: str) -> None:
    p = problem(adt_message(pid=default_pid(pid_29=pid_29)))
    assert (p.code, p.field, p.reject) == ("102", 29, False)


# --- rejected messages ---------------------------------------------------------------------


def test_oru_is_rejected_as_unsupported_message_type() -> None:
    p = problem(adt_message(message_type="ORU", trigger="R01"))
    assert (p.code, p.segment, p.field, p.reject) == ("200", "MSH", 9, True)


def test_unknown_event_is_rejected() -> None:
    p = problem(adt_message("A99"))
    assert (p.code, p.segment, p.field, p.component, p.reject) == ("201", "MSH", 9, 2, True)


def test_missing_trigger_everywhere_is_rejected() -> None:
    p = problem(adt_message(trigger="", evn=False))
    assert (p.code, p.field, p.reject) == ("101", 9, True)


def test_unsupported_processing_id_is_rejected() -> None:
    p = problem(adt_message(processing_id="X"))
    assert (p.code, p.field, p.reject) == ("202", 11, True)


def test_missing_control_id_is_rejected() -> None:
    p = problem(adt_message(control_id=""))
    assert (p.code, p.field, p.reject) == ("101", 10, True)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\xff\xfe garbage",
        b"PID|1||123\r",
        b"hello world, this is not HL7",
        b"MSH",
        "Пациент Иванова".encode(),
    ],
)
def test_garbage_is_rejected(raw: bytes) -> None:
    p = problem(raw)
    assert p.reject
    assert p.code in ("100", "101", "102")


def test_missing_pid_is_rejected() -> None:
    p = problem(adt_message(pid=None))
    assert (p.code, p.segment, p.reject) == ("100", "PID", True)


def test_two_pids_outside_a40_are_rejected() -> None:
    raw = adt_message(extra_segments=[("PID", default_pid())])
    p = problem(raw)
    assert (p.code, p.segment, p.sequence, p.reject) == ("100", "PID", 2, True)


def test_second_msh_is_rejected() -> None:
    p = problem(adt_message() + adt_message())
    assert (p.code, p.segment, p.sequence, p.reject) == ("100", "MSH", 2, True)


def test_a_failing_registry_lookup_is_an_internal_error() -> None:
    def broken(_namespace: str) -> str | None:
        raise RuntimeError("registry down")

    p = problem(adt_message(), system_for_authority=broken)
    assert (p.code, p.reject) == ("207", False)
    assert isinstance(p.__cause__, RuntimeError)


def test_invalid_segment_id_is_rejected() -> None:
    raw = adt_message() + b"pv2|x\r"
    p = problem(raw)
    assert (p.code, p.reject) == ("100", True)


def test_z_segments_and_mrg_outside_a40_are_ignored() -> None:
    raw = adt_message("A08", extra_segments=[("ZPI", {1: "x"}), ("MRG", default_mrg())])
    msg = parse(raw)
    assert msg.patients[0].prior_identifiers == []
    assert msg.patients[0].patient == EXPECTED_PATIENT


def test_huge_field_values_do_not_crash() -> None:
    family = "Щ" * 1_000_000
    pid = default_pid(pid_5=(family, "Анна"), pid_13=("7" * 200_000,))
    raw = adt_message(pid=pid, extra_segments=[("ZXX", {1: "x" * 5_000_000})])
    msg = parse(raw)
    patient = msg.patients[0].patient
    assert patient["name"][0]["family"] == family
    assert patient["telecom"] == [{"system": "phone", "value": "7" * 200_000, "use": "home"}]


def test_problem_is_picklable_and_printable() -> None:
    p = Hl7Problem("102", "PID-7 is bad", "PID", 2, 7, 1, False, 3)
    assert pickle.loads(pickle.dumps(p)) == p
    assert len({p, Hl7Problem("102", "PID-7 is bad", "PID", 2, 7, 1, False, 3)}) == 1
    assert p != Hl7Problem("102", "PID-7 is bad", "PID")
    assert str(p) == "HL7 error 102 at PID[2]-7(3).1: PID-7 is bad"
    assert p.location == "PID[2]-7(3).1"


# --- fuzzing -------------------------------------------------------------------------------


def _check(raw: bytes | str) -> None:
    """Parsing either yields valid Patients or raises an Hl7Problem that is not internal."""
    try:
        msg = parse(raw, system_for_authority=lambda ns: "urn:oid:1.2.3" if ns == "X" else None)
    except Hl7Problem as exc:
        assert exc.code != "207", exc.__cause__
        assert exc.code in ("100", "101", "102", "103", "200", "201", "202", "203")
        return
    for p in msg.patients:
        validate(p.patient)
    assert all(not w.reject for w in msg.warnings)


VALID = [
    adt_message(),
    adt_message("A40", groups=[(default_pid(), default_mrg()), (default_pid(), default_mrg())]),
    adt_message(
        "A31",
        pid=default_pid(
            pid_19=SNILS_1, pid_29="20240105143000", pid_14=("", "NET", "Internet", "a@b.ru")
        ),
        charset="WINDOWS-1251",
        version="2.3",
        field_sep="#",
        encoding_chars="$~\\&",
    ),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    _check(raw)
    _check(b"MSH|^~\\&|" + raw)


@settings(max_examples=400, deadline=None)
@given(mutated(VALID))
def test_fuzz_mutated_messages(data: bytes) -> None:
    _check(data)


FIELD_TEXT = st.text(
    alphabet=st.sampled_from(list("|^~\\&#$ XEFSTRH.01239+-@АяЁё \x00\x1c\t"))
    | st.characters(exclude_categories=("Cs",)),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([3, 5, 7, 8, 11, 13, 14, 19, 29, 30]), FIELD_TEXT, st.sampled_from(ADT_EVENTS)
)
def test_fuzz_field_contents(field_no: int, text: str, event: str) -> None:
    pid = default_pid(**{f"pid_{field_no}": Raw(text)})
    raw = adt_message(event, pid=pid)
    _check(raw)
    _check(raw.decode("utf-8"))


def test_non_ascii_digits_are_not_dates_or_phones() -> None:
    p = problem(adt_message(pid=default_pid(pid_7="١٩٨٥٠٣٠٧")))
    assert (p.code, p.field) == ("102", 7)
    msg = parse(adt_message(pid=default_pid(pid_13="٨٩٢١١٢٣٤٥٦٧")))
    assert "telecom" not in msg.patients[0].patient
    assert [(w.code, w.field) for w in msg.warnings] == [("102", 13)]
