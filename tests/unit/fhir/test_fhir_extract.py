"""Search-index rows extracted from resources (hie.fhir.extract)."""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest

from hie.fhir.dates import parse_range
from hie.fhir.extract import _tokens, extract, normalise, split_reference, values
from hie.fhir.searchparams import params_for
from hie.hub.store.port import (
    DateRow,
    IndexRow,
    QuantityRow,
    ReferenceRow,
    StringRow,
    TokenRow,
    UriRow,
)

OPEN = 2**62  # how far an open end of a Period reaches


def rows(res: dict[str, Any], param: str | None = None) -> list[IndexRow]:
    """The rows of ``res``, optionally only those of one parameter."""
    out = extract(res).rows
    return [r for r in out if param is None or r.param == param]


def rng(value: str) -> tuple[int, int]:
    r = parse_range(value)
    assert r is not None
    return r


# --- normalise ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "norm"),
    [
        ("Иванов", "иванов"),
        ("ИВАНОВ", "иванов"),
        ("Ёлкин", "елкин"),
        ("Семёнов", "семенов"),
        ("ёЁ", "ее"),
        # й is its own letter in Russian, not и with a mark
        ("Йошкар-Ола", "йошкар-ола"),
        ("Андрей", "андрей"),
        ("Müller", "muller"),
        ("Éloïse Çağlar", "eloise caglar"),
        ("Ångström", "angstrom"),
        ("São Paulo", "sao paulo"),
        ("ﬁle", "file"),  # compatibility ligature
        ("Поликлиника №5", "поликлиника no5"),  # compatibility forms fold to lower case too
        ("Ⅻ век", "xii век"),
        ("SMITH", "smith"),
        ("", ""),
        ("123-45", "123-45"),
    ],
)
def test_normalise(text: str, norm: str) -> None:
    assert normalise(text) == norm


def test_normalise_decomposed_input_matches_composed() -> None:
    # a feed may send NFD text (и + combining breve): й must still stay й, ё still fold to е
    for word in ("Йошкар", "Андрей", "Ёлкин", "Müller"):
        assert normalise(unicodedata.normalize("NFD", word)) == normalise(word)


def test_normalise_is_idempotent() -> None:
    for word in ("Ёлкин", "Йошкар", "Éloïse", "Straße"):
        assert normalise(normalise(word)) == normalise(word)


# --- tokens ---------------------------------------------------------------------------------


def test_codeable_concept_gives_every_coding() -> None:
    obs = {
        "resourceType": "Observation",
        "code": {
            "coding": [
                {"system": "http://loinc.org", "code": "718-7", "display": "Hemoglobin"},
                {"code": "HGB"},
                {"system": "http://example.org", "display": "no code"},
            ],
            "text": "Гемоглобин",
        },
    }
    assert rows(obs, "code") == [
        TokenRow("code", "http://loinc.org", "718-7"),
        TokenRow("code", None, "HGB"),
    ]
    # combo-code covers code and component.code
    assert [r.code for r in rows(obs, "combo-code")] == ["718-7", "HGB"]  # type: ignore[union-attr]


def test_codeable_concept_with_text_only_gives_nothing() -> None:
    assert rows({"resourceType": "Observation", "code": {"text": "что-то"}}, "code") == []


def test_codings_in_lists() -> None:
    obs = {
        "resourceType": "Observation",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/obs", "code": "lab"}]},
            {"coding": [{"code": "vital-signs"}]},
        ],
        "meta": {"tag": [{"system": "urn:mo", "code": "mo-17"}]},
    }
    assert rows(obs, "category") == [
        TokenRow("category", "http://terminology.hl7.org/CodeSystem/obs", "lab"),
        TokenRow("category", None, "vital-signs"),
    ]
    # meta.tag is a Coding (not a CodeableConcept)
    assert rows(obs, "_tag") == [TokenRow("_tag", "urn:mo", "mo-17")]


def test_identifier() -> None:
    pat = {
        "resourceType": "Patient",
        "identifier": [
            {"system": "urn:oid:1.2.643.100.3", "value": "112-233-445 95"},
            {"value": "no-system"},
            {"system": "urn:only-system"},
        ],
    }
    assert rows(pat, "identifier") == [
        TokenRow("identifier", "urn:oid:1.2.643.100.3", "112-233-445 95"),
        TokenRow("identifier", None, "no-system"),
    ]


def test_contact_point() -> None:
    pat = {
        "resourceType": "Patient",
        "telecom": [
            {"system": "phone", "value": "+7 812 123-45-67"},
            {"system": "email", "value": "ivan@example.org"},
        ],
    }
    assert rows(pat, "telecom") == [
        TokenRow("telecom", None, "+7 812 123-45-67"),
        TokenRow("telecom", None, "ivan@example.org"),
    ]
    # a ContactPoint read as a whole gives its system and value
    assert list(_tokens(pat["telecom"][0])) == [("phone", "+7 812 123-45-67")]


def test_boolean_and_code() -> None:
    pat = {"resourceType": "Patient", "active": False, "gender": "female"}
    assert rows(pat, "active") == [TokenRow("active", None, "false")]
    assert rows(pat, "gender") == [TokenRow("gender", None, "female")]
    pat = {"resourceType": "Patient", "active": True, "deceasedBoolean": True}
    assert rows(pat, "active") == [TokenRow("active", None, "true")]
    assert rows(pat, "deceased") == [TokenRow("deceased", None, "true")]


def test_token_from_quantity_code() -> None:
    assert list(_tokens({"value": 1, "system": "http://unitsofmeasure.org", "code": "mg"})) == [
        ("http://unitsofmeasure.org", "mg")
    ]
    assert list(_tokens(42)) == []
    assert list(_tokens(None)) == []


# --- strings --------------------------------------------------------------------------------


def test_human_name() -> None:
    pat = {
        "resourceType": "Patient",
        "name": [
            {
                "use": "official",
                "text": "Ёлкин Пётр Андреевич",
                "family": "Ёлкин",
                "given": ["Пётр", "Андреевич"],
                "prefix": ["Д-р"],
            }
        ],
    }
    assert rows(pat, "name") == [
        StringRow("name", "елкин петр андреевич", "Ёлкин Пётр Андреевич"),
        StringRow("name", "елкин", "Ёлкин"),
        StringRow("name", "петр", "Пётр"),
        StringRow("name", "андреевич", "Андреевич"),
        StringRow("name", "д-р", "Д-р"),
    ]
    assert rows(pat, "family") == [StringRow("family", "елкин", "Ёлкин")]
    assert rows(pat, "given") == [
        StringRow("given", "петр", "Пётр"),
        StringRow("given", "андреевич", "Андреевич"),
    ]
    # `use` is a code, not part of the name
    assert not any(r.exact == "official" for r in rows(pat) if isinstance(r, StringRow))


def test_address() -> None:
    pat = {
        "resourceType": "Patient",
        "address": [
            {
                "use": "home",
                "line": ["Невский проспект, 1", "кв. 5"],
                "city": "Санкт-Петербург",
                "district": "Центральный",
                "postalCode": "191186",
                "country": "RU",
            }
        ],
    }
    assert [r.exact for r in rows(pat, "address")] == [  # type: ignore[union-attr]
        "Невский проспект, 1",
        "кв. 5",
        "Санкт-Петербург",
        "Центральный",
        "191186",
        "RU",
    ]
    assert rows(pat, "address-city") == [
        StringRow("address-city", "санкт-петербург", "Санкт-Петербург")
    ]
    assert rows(pat, "address-district") == [
        StringRow("address-district", "центральный", "Центральный")
    ]
    assert rows(pat, "address-postalcode") == [StringRow("address-postalcode", "191186", "191186")]


def test_plain_strings_and_empty_ones() -> None:
    org = {"resourceType": "Organization", "name": "Поликлиника №1", "alias": ["ГП-1", ""]}
    assert rows(org, "name") == [
        StringRow("name", "поликлиника no1", "Поликлиника №1"),
        StringRow("name", "гп-1", "ГП-1"),
    ]


# --- dates ----------------------------------------------------------------------------------


def test_date_and_datetime() -> None:
    pat = {"resourceType": "Patient", "birthDate": "1980-05"}
    assert rows(pat, "birthdate") == [DateRow("birthdate", *rng("1980-05"))]
    obs = {"resourceType": "Observation", "effectiveDateTime": "2024-03-05T10:15:00+03:00"}
    assert rows(obs, "date") == [DateRow("date", *rng("2024-03-05T07:15:00Z"))]


def test_instant() -> None:
    obs = {"resourceType": "Observation", "issued": "2024-03-05T10:15:00.123+03:00"}
    assert rows(obs, "issued") == [DateRow("issued", *rng("2024-03-05T07:15:00.123Z"))]


def test_invalid_date_gives_no_row() -> None:
    assert rows({"resourceType": "Patient", "birthDate": "2024-02-30"}, "birthdate") == []


@pytest.mark.parametrize(
    ("period", "lo", "hi"),
    [
        ({"start": "2024-01-01", "end": "2024-01-31"}, rng("2024-01-01")[0], rng("2024-01-31")[1]),
        ({"start": "2024-01-01"}, rng("2024-01-01")[0], OPEN),
        ({"end": "2024-01-31"}, -OPEN, rng("2024-01-31")[1]),
        ({"start": "2024-01-01T10:00:00+03:00"}, rng("2024-01-01T07:00:00Z")[0], OPEN),
        # an unparsable end is treated as open
        ({"start": "2024-01-01", "end": "someday"}, rng("2024-01-01")[0], OPEN),
    ],
)
def test_period(period: dict[str, str], lo: int, hi: int) -> None:
    enc = {"resourceType": "Encounter", "period": period}
    assert rows(enc, "date") == [DateRow("date", lo, hi)]


def test_period_without_start_or_end_gives_nothing() -> None:
    assert rows({"resourceType": "Encounter", "period": {}}, "date") == []


# --- choice elements ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("element", "value", "expected"),
    [
        ("effectiveDateTime", "2024-03-05", rng("2024-03-05")),
        ("effectiveInstant", "2024-03-05T10:00:00Z", rng("2024-03-05T10:00:00Z")),
        (
            "effectivePeriod",
            {"start": "2024-03-05", "end": "2024-03-06"},
            (rng("2024-03-05")[0], rng("2024-03-06")[1]),
        ),
    ],
)
def test_choice_element(element: str, value: Any, expected: tuple[int, int]) -> None:
    obs = {"resourceType": "Observation", element: value}
    assert rows(obs, "date") == [DateRow("date", *expected)]


def test_choice_element_needs_a_type_suffix() -> None:
    # `effective` alone or a lower-case continuation is not effective[x]
    obs = {"resourceType": "Observation", "effective": "2024", "effectivedate": "2024"}
    assert rows(obs, "date") == []
    # a Timing has no start/end and is not a date
    obs = {"resourceType": "Observation", "effectiveTiming": {"event": ["2024-01-01"]}}
    assert rows(obs, "date") == []


def test_values_follow_choice_paths() -> None:
    p = params_for("Observation")["date"]
    obs = {"resourceType": "Observation", "effectiveDateTime": "2024"}
    assert list(values(obs, p)) == ["2024"]


# --- references -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "parsed"),
    [
        ("Patient/p1", ("Patient", "p1")),
        ("Patient/p1/_history/3", ("Patient", "p1")),
        ("http://hub.example/fhir/Patient/p1", ("Patient", "p1")),
        ("http://hub.example/fhir/Patient/p1/_history/2", ("Patient", "p1")),
        ("Patient/p1#c1", ("Patient", "p1")),
        ("#c1", None),
        ("", None),
        ("urn:uuid:0f1e2d3c-0000-4000-8000-000000000000", None),
        ("patient/p1", None),
        ("Patient", None),
    ],
)
def test_split_reference(ref: str, parsed: tuple[str, str] | None) -> None:
    assert split_reference(ref) == parsed


def test_reference_rows() -> None:
    obs = {
        "resourceType": "Observation",
        "subject": {"reference": "Patient/p1", "display": "Ёлкин"},
        "encounter": {"reference": "http://hub.example/fhir/Encounter/e1/_history/2"},
        "performer": [
            {"reference": "#pr1"},
            {"reference": "urn:uuid:1234"},
            {"display": "no reference"},
            {"reference": "Practitioner/pr2"},
        ],
        "specimen": {"reference": "Specimen/s1"},
    }
    assert rows(obs, "subject") == [ReferenceRow("subject", "Patient", "p1")]
    assert rows(obs, "patient") == [ReferenceRow("patient", "Patient", "p1")]
    assert rows(obs, "encounter") == [ReferenceRow("encounter", "Encounter", "e1")]
    assert rows(obs, "performer") == [
        ReferenceRow("performer", "", "#pr1"),  # contained: kept as written
        ReferenceRow("performer", "", "urn:uuid:1234"),
        ReferenceRow("performer", "Practitioner", "pr2"),
    ]
    assert rows(obs, "specimen") == [ReferenceRow("specimen", "Specimen", "s1")]


def test_target_type_restriction() -> None:
    # `patient` on Observation is subject.where(resolve() is Patient)
    obs = {"resourceType": "Observation", "subject": {"reference": "Group/g1"}}
    assert rows(obs, "subject") == [ReferenceRow("subject", "Group", "g1")]
    assert rows(obs, "patient") == []
    # an absolute URL is typed by its path, so the restriction applies to it too
    obs = {"resourceType": "Observation", "subject": {"reference": "http://x/fhir/Device/d1"}}
    assert rows(obs, "patient") == []
    assert rows(obs, "subject") == [ReferenceRow("subject", "Device", "d1")]


def test_untyped_references_pass_the_target_restriction() -> None:
    # a contained or urn reference cannot be typed, so it is kept as an absolute value
    obs = {"resourceType": "Observation", "subject": {"reference": "#p1"}}
    assert rows(obs, "patient") == [ReferenceRow("patient", "", "#p1")]


def test_canonical_uri() -> None:
    pat = {
        "resourceType": "Patient",
        "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/Patient"], "source": "#mis"},
    }
    assert rows(pat, "_profile") == [
        UriRow("_profile", "http://hl7.org/fhir/StructureDefinition/Patient")
    ]
    assert rows(pat, "_source") == [UriRow("_source", "#mis")]


# --- quantities -----------------------------------------------------------------------------


def test_quantity() -> None:
    obs = {
        "resourceType": "Observation",
        "valueQuantity": {
            "value": 5.4,
            "unit": "ммоль/л",
            "system": "http://unitsofmeasure.org",
            "code": "mmol/L",
        },
    }
    assert rows(obs, "value-quantity") == [
        QuantityRow("value-quantity", 5.4, "http://unitsofmeasure.org", "mmol/L")
    ]


def test_quantity_without_code_uses_unit_and_integers_become_floats() -> None:
    obs = {"resourceType": "Observation", "valueQuantity": {"value": 120, "unit": "mmHg"}}
    row = rows(obs, "value-quantity")
    assert row == [QuantityRow("value-quantity", 120.0, None, "mmHg")]
    assert isinstance(row[0].value, float)  # type: ignore[union-attr]


def test_quantity_without_value_gives_nothing() -> None:
    obs = {"resourceType": "Observation", "valueQuantity": {"unit": "mmHg"}}
    assert rows(obs, "value-quantity") == []


# --- the whole resource ---------------------------------------------------------------------


def test_rows_are_unique_and_typed() -> None:
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
        "component": [
            {"code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]}},
            {"code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]}},
        ],
        "subject": {"reference": "Patient/p1"},
    }
    out = rows(obs)
    assert len(out) == len(set(out))
    # combo-code sees 718-7 in code and in both components, but indexes it once
    assert rows(obs, "combo-code") == [TokenRow("combo-code", "http://loinc.org", "718-7")]
    assert rows(obs, "status") == [TokenRow("status", None, "final")]


def test_unsupported_type_gives_no_rows() -> None:
    assert rows({"resourceType": "Basic", "code": {"coding": [{"code": "x"}]}}) == []
    assert rows({"resourceType": "Binary", "contentType": "text/plain"}) == []


def test_phone_and_email_keep_their_contact_point_system() -> None:
    from hie.fhir.extract import extract

    rows = extract(
        {
            "resourceType": "Patient",
            "telecom": [
                {"system": "phone", "value": "+79110000000"},
                {"system": "email", "value": "anna@example.ru"},
            ],
        }
    ).rows
    got = {(r.param, getattr(r, "code", None)) for r in rows if r.param in ("phone", "email")}
    assert got == {("phone", "+79110000000"), ("email", "anna@example.ru")}
