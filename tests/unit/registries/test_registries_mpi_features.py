"""PersonFeatures extraction and the bad-input problems (hie.registries.mpi.features)."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from hie.demo import Generator
from hie.registries.identifiers import OMS_SYSTEM, PASSPORT_SYSTEM, SNILS_SYSTEM
from hie.registries.mpi import (
    PersonFeatures,
    normalise_phone,
    person_features,
    validate_demographics,
)

TODAY = date(2025, 11, 1)
MRN = "urn:oid:1.2.643.5.1.13.13.12.2.78.8111.100"


def patient(**over: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [
            {"system": SNILS_SYSTEM, "value": "112-233-445 95"},
            {"system": OMS_SYSTEM, "value": "4111 1111 1111 1111"},
            {"system": PASSPORT_SYSTEM, "value": "4012 345678"},
            {"system": MRN, "value": "1234567"},
        ],
        "name": [{"use": "official", "family": "Иванова", "given": ["Анна", "Сергеевна"]}],
        "gender": "female",
        "birthDate": "1985-03-07",
        "telecom": [{"system": "phone", "value": "+7 (921) 123-45-67"}],
        "address": [
            {
                "use": "home",
                "line": ["ул. Декабристов, д. 5, корп. 2, кв. 10"],
                "postalCode": "190121",
            }
        ],
    }
    p.update(over)
    return p


def codes(p: dict[str, Any]) -> list[str]:
    return [problem.code for problem in validate_demographics(p, today=TODAY)]


def test_features_of_a_full_patient() -> None:
    f = person_features(patient(), today=TODAY)
    assert f.national == {
        SNILS_SYSTEM: "11223344595",
        OMS_SYSTEM: "4111111111111111",
        PASSPORT_SYSTEM: "4012345678",
    }
    assert (MRN, "1234567") in f.identifiers
    assert f.local_identifiers == ((MRN, "1234567"),)
    assert (f.family, f.given, f.middle) == ("Иванова", "Анна", "Сергеевна")
    assert (f.family_key, f.given_key, f.middle_key) == ("ivanova", "ana", "sergevna")
    assert f.family_phonetic == "ivnv"
    assert f.birth_date == date(1985, 3, 7) and f.birth_year == 1985
    assert f.gender == "female"
    assert f.phones == ("9211234567",)
    assert f.postal_code == "190121"
    assert f.street_key == "dekabristov"
    assert f.house == "5к2" and f.flat == "10"
    assert f.problems == ()


def test_features_of_demo_patients_have_no_problems() -> None:
    for p in Generator(3).patients(200):
        f = person_features(p, today=TODAY)
        assert f.problems == (), f.problems
        assert f.family_key and f.given_key and f.middle_key
        assert f.birth_date is not None and f.phones and f.street_key and f.house


def test_latin_and_cyrillic_records_share_name_keys() -> None:
    latin = patient(name=[{"family": "Ivanova", "given": ["Anna", "Sergeevna"]}])
    a, b = person_features(patient(), today=TODAY), person_features(latin, today=TODAY)
    assert (a.family_key, a.given_key, a.middle_key) == (b.family_key, b.given_key, b.middle_key)


def test_patronymic_from_extension_or_mid_qualifier() -> None:
    ext = patient(
        name=[
            {
                "family": "Петров",
                "given": ["Иван"],
                "extension": [
                    {
                        "url": "https://example.org/StructureDefinition/patronymic",
                        "valueString": "Ильич",
                    }
                ],
            }
        ]
    )
    f = person_features(ext, today=TODAY)
    assert (f.given, f.middle) == ("Иван", "Ильич")
    mid = patient(
        name=[
            {
                "family": "Петров",
                "given": ["Ильич", "Иван"],
                "_given": [
                    {
                        "extension": [
                            {
                                "url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-qualifier",
                                "valueCode": "MID",
                            }
                        ]
                    },
                    None,
                ],
            }
        ]
    )
    f = person_features(mid, today=TODAY)
    assert (f.given, f.middle) == ("Иван", "Ильич")


def test_name_from_text_in_fio_order() -> None:
    f = person_features(patient(name=[{"text": "Сидоров Пётр Ильич"}]), today=TODAY)
    assert (f.family, f.given, f.middle) == ("Сидоров", "Пётр", "Ильич")


def test_official_name_preferred_and_old_names_skipped() -> None:
    names = [
        {"use": "old", "family": "Смирнова", "given": ["Анна"]},
        {"use": "usual", "family": "Ivanova", "given": ["Anna"]},
        {"use": "official", "family": "Иванова", "given": ["Анна", "Сергеевна"]},
    ]
    assert person_features(patient(name=names), today=TODAY).family == "Иванова"
    assert person_features(patient(name=names[:2]), today=TODAY).family == "Ivanova"
    assert person_features(patient(name=names[:1]), today=TODAY).family == "Смирнова"


def test_partial_birth_date_keeps_the_year() -> None:
    f = person_features(patient(birthDate="1985"), today=TODAY)
    assert f.birth_date is None and f.birth_year == 1985
    f = person_features(patient(birthDate="1985-03"), today=TODAY)
    assert f.birth_date is None and f.birth_year == 1985
    assert person_features(patient(birthDate=None), today=TODAY).birth_year is None


def test_unknown_gender_is_none() -> None:
    assert person_features(patient(gender="unknown"), today=TODAY).gender is None
    assert person_features(patient(gender="other"), today=TODAY).gender == "other"


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("+7 (921) 123-45-67", "9211234567"),
        ("8 921 123 45 67", "9211234567"),
        ("9211234567", "9211234567"),
        ("+7 812 555-12-34", "8125551234"),
        ("555-12-34", None),
        ("", None),
    ],
)
def test_normalise_phone(raw: str, normal: str | None) -> None:
    assert normalise_phone(raw) == normal


def test_phones_deduplicated_and_emails_ignored() -> None:
    f = person_features(
        patient(
            telecom=[
                {"system": "phone", "value": "+79211234567"},
                {"system": "phone", "value": "8 (921) 123-45-67"},
                {"system": "email", "value": "anna@example.org"},
                {"system": "phone", "value": "12-34"},
            ]
        ),
        today=TODAY,
    )
    assert f.phones == ("9211234567",)


def test_address_from_text_and_street_types() -> None:
    f = person_features(
        patient(address=[{"text": "199106, Санкт-Петербург, Большой пр. В.О., дом 12, кв. 3"}]),
        today=TODAY,
    )
    assert f.postal_code == "199106"
    assert (
        f.street_key
        == person_features(
            patient(address=[{"line": ["Большой проспект В.О., д. 12"]}]), today=TODAY
        ).street_key
    )
    assert f.house == "12" and f.flat == "3"
    assert person_features(patient(address=[]), today=TODAY).street_key is None


# --- bad input ---------------------------------------------------------------------------


def test_valid_patient_has_no_problems() -> None:
    assert validate_demographics(patient(), today=TODAY) == []


def test_invalid_snils_checksum() -> None:
    p = patient(identifier=[{"system": SNILS_SYSTEM, "value": "112-233-445 96"}])
    problems = validate_demographics(p, today=TODAY)
    assert [x.code for x in problems] == ["invalid-snils-checksum"]
    assert problems[0].expression == "Patient.identifier[0].value"
    assert "check number" in problems[0].message
    # A SNILS that fails its check is never used for matching.
    assert person_features(p, today=TODAY).national == {}


def test_malformed_snils_and_oms() -> None:
    p = patient(
        identifier=[
            {"system": SNILS_SYSTEM, "value": "112-233"},
            {"system": OMS_SYSTEM, "value": "4111111111111112"},
        ]
    )
    assert codes(p) == ["malformed-snils", "invalid-oms-check-digit"]


@pytest.mark.parametrize(
    ("birth", "fragment"),
    [
        ("1985-02-30", "not a calendar date"),
        ("1985-13-01", "no month 13"),
        ("2030-01-01", "in the future"),
        ("2025-11-02", "in the future"),
        ("1850-06-01", "before 1880"),
        ("1879", "before 1880"),
    ],
)
def test_impossible_birth_dates(birth: str, fragment: str) -> None:
    problems = validate_demographics(patient(birthDate=birth), today=TODAY)
    assert [p.code for p in problems] == ["impossible-birth-date"]
    assert fragment in problems[0].message
    assert problems[0].expression == "Patient.birthDate"
    f = person_features(patient(birthDate=birth), today=TODAY)
    assert f.birth_date is None and f.birth_year is None


@pytest.mark.parametrize("birth", ["07.03.1985", "1985-3-7", "19850307", 1985])
def test_malformed_birth_date(birth: object) -> None:
    assert codes(patient(birthDate=birth)) == ["malformed-birth-date"]


def test_birth_date_today_is_fine() -> None:
    assert codes(patient(birthDate="2025-11-01")) == []


@pytest.mark.parametrize(
    "name",
    [
        [],
        [{"use": "official"}],
        [{"family": "  ", "given": [""]}],
        [{"text": ""}],
    ],
)
def test_empty_name(name: list[dict[str, Any]]) -> None:
    assert codes(patient(name=name)) == ["empty-name"]


def test_name_with_only_text_or_only_given_is_not_empty() -> None:
    assert codes(patient(name=[{"text": "Иванова Анна"}])) == []
    assert codes(patient(name=[{"given": ["Анна"]}])) == []


def test_identifier_without_system_or_value() -> None:
    p = patient(identifier=[{"value": "1234567"}, {"system": MRN}])
    problems = validate_demographics(p, today=TODAY)
    assert [x.code for x in problems] == ["identifier-without-system", "identifier-without-value"]
    assert problems[0].expression == "Patient.identifier[0].system"


def test_unknown_identifier_system_with_a_registry() -> None:
    registered = {MRN}

    def known(system: str) -> bool:
        return system in registered

    p = patient(identifier=[{"system": "urn:oid:9.9.9", "value": "1"}, *patient()["identifier"]])
    problems = validate_demographics(p, today=TODAY, is_known_system=known)
    assert [x.code for x in problems] == ["unknown-identifier-system"]
    assert "urn:oid:9.9.9" in problems[0].message
    # National systems are always known.
    assert validate_demographics(patient(), today=TODAY, is_known_system=known) == []


def test_many_problems_at_once() -> None:
    p = patient(
        identifier=[{"value": "x"}, {"system": SNILS_SYSTEM, "value": "112-233-445 96"}],
        name=[],
        birthDate="1985-02-30",
    )
    assert sorted(codes(p)) == [
        "empty-name",
        "identifier-without-system",
        "impossible-birth-date",
        "invalid-snils-checksum",
    ]


def test_garbage_never_raises() -> None:
    weird: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": ["x", None, {"system": 5, "value": []}],
        "name": ["Иванова", {"given": [None, 5]}],
        "telecom": [None, {"value": None}],
        "address": [None, {"line": [None]}],
        "birthDate": None,
        "gender": 3,
    }
    f = person_features(weird, today=TODAY)
    assert isinstance(f, PersonFeatures)
    assert "empty-name" in [p.code for p in f.problems]


def test_features_round_trip_through_json() -> None:
    import json

    for p in [patient(), *Generator(8).patients(50)]:
        f = person_features(p, today=TODAY)
        back = PersonFeatures.from_json(json.loads(json.dumps(f.to_json())))
        assert back == f
