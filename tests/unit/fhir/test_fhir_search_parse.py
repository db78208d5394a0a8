"""Parsing FHIR search URLs into store queries (hie.fhir.search)."""

from __future__ import annotations

import base64

import pytest

from hie.fhir.dates import parse_range
from hie.fhir.search import (
    Include,
    SearchRequest,
    canonical_items,
    decode_cursor,
    describe,
    encode_cursor,
    param_cond,
    parse_search,
    split_values,
)
from hie.hub.errors import InvalidRequest, UnknownSearchParameter
from hie.hub.store.port import (
    AnyOf,
    ChainCond,
    Condition,
    DateCond,
    IdCond,
    LastUpdatedCond,
    MissingCond,
    NumberCond,
    ReferenceCond,
    SortKey,
    StringCond,
    TokenCond,
    TypeCond,
    UriCond,
)


def search(
    resource_type: str | None, *items: tuple[str, str], lenient: bool = False
) -> SearchRequest:
    return parse_search(
        resource_type, list(items), default_count=50, max_count=1000, lenient=lenient
    )


def conds(resource_type: str | None, *items: tuple[str, str]) -> list[Condition]:
    return search(resource_type, *items).query.conds


def one(resource_type: str, key: str, value: str) -> Condition:
    found = conds(resource_type, (key, value))
    assert len(found) == 1
    return found[0]


def rng(value: str) -> tuple[int, int]:
    r = parse_range(value)
    assert r is not None
    return r


# --- split_values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "values"),
    [
        ("a", ["a"]),
        ("a,b,c", ["a", "b", "c"]),
        ("", [""]),
        ("a,", ["a", ""]),
        (",a", ["", "a"]),
        (r"a\,b", ["a,b"]),
        (r"a\,b,c", ["a,b", "c"]),
        (r"a\|b", ["a|b"]),
        (r"a\$b", ["a$b"]),
        (r"a\\", ["a\\"]),
        (r"a\\,b", ["a\\", "b"]),
        (r"a\\\,b", ["a\\,b"]),
        # a lone trailing backslash escapes nothing and is dropped
        ("a\\", ["a"]),
        ("Иванов,Петров", ["Иванов", "Петров"]),
    ],
)
def test_split_values(raw: str, values: list[str]) -> None:
    assert split_values(raw) == values


# --- tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "system", "code"),
    [
        ("male", None, "male"),
        ("http://loinc.org|718-7", "http://loinc.org", "718-7"),
        ("|718-7", "", "718-7"),  # explicitly no system
        ("http://loinc.org|", "http://loinc.org", None),  # any code in the system
        ("a|b|c", "a", "b|c"),
        # an escaped bar belongs to the system or the code, it does not split them
        (r"urn:x\|y|123", "urn:x|y", "123"),
        (r"urn:x|12\|3", "urn:x", "12|3"),
        (r"\|x", None, "|x"),
        (r"a\\|b", "a\\", "b"),
        (r"a\,b", None, "a,b"),
    ],
)
def test_token_forms(value: str, system: str | None, code: str | None) -> None:
    assert one("Patient", "identifier", value) == TokenCond("identifier", system, code)


def test_token_or_values() -> None:
    assert one("Patient", "gender", "male,female") == AnyOf(
        (TokenCond("gender", None, "male"), TokenCond("gender", None, "female"))
    )


@pytest.mark.parametrize("value", ["ge", "gex", "lt", "ne", "eq", "ap", "sa", "eb", "le", "gt"])
def test_token_values_are_never_prefixes(value: str) -> None:
    assert one("Patient", "gender", value) == TokenCond("gender", None, value)


def test_token_not_is_an_and_of_negations() -> None:
    assert conds("Patient", ("gender:not", "male,female")) == [
        TokenCond("gender", None, "male", negate=True),
        TokenCond("gender", None, "female", negate=True),
    ]


def test_boolean_token() -> None:
    assert one("Patient", "active", "true") == TokenCond("active", None, "true")


# --- prefixes on dates and numbers -----------------------------------------------------------


@pytest.mark.parametrize("prefix", ["eq", "ne", "lt", "le", "gt", "ge", "sa", "eb", "ap"])
def test_date_prefixes(prefix: str) -> None:
    lo, hi = rng("2024-03")
    assert one("Patient", "birthdate", f"{prefix}2024-03") == DateCond("birthdate", prefix, lo, hi)  # type: ignore[arg-type]


def test_date_without_prefix_is_eq() -> None:
    lo, hi = rng("1980-05-17")
    assert one("Patient", "birthdate", "1980-05-17") == DateCond("birthdate", "eq", lo, hi)


def test_date_with_time_zone() -> None:
    cond = one("Observation", "date", "ge2024-03-05T10:00:00+03:00")
    assert cond == DateCond("date", "ge", *rng("2024-03-05T07:00:00Z"))


@pytest.mark.parametrize(
    "value", ["xx2024", "ge", "2024-02-30", "ge-2024", "yesterday", "gt2024-13"]
)
def test_invalid_dates_are_400(value: str) -> None:
    with pytest.raises(InvalidRequest, match="birthdate"):
        conds("Patient", ("birthdate", value))


def test_date_and_is_repeated_parameters() -> None:
    found = conds("Patient", ("birthdate", "ge1980"), ("birthdate", "lt1990"))
    assert found == [
        DateCond("birthdate", "ge", *rng("1980")),
        DateCond("birthdate", "lt", *rng("1990")),
    ]


def test_last_updated() -> None:
    assert one("Patient", "_lastUpdated", "gt2024-01-01,lt2020") == AnyOf(
        (
            LastUpdatedCond("gt", *rng("2024-01-01")),
            LastUpdatedCond("lt", *rng("2020")),
        )
    )
    with pytest.raises(InvalidRequest, match="_lastUpdated"):
        conds("Patient", ("_lastUpdated", "soon"))


@pytest.mark.parametrize(
    ("value", "prefix", "number", "lo", "hi"),
    [
        ("100", "eq", 100.0, 99.5, 100.5),
        ("100.00", "eq", 100.0, 99.995, 100.005),
        ("0.5", "eq", 0.5, 0.45, 0.55),
        ("-3", "eq", -3.0, -3.5, -2.5),
        # 1e2 has one significant figure: ±0.5e2
        ("1e2", "eq", 100.0, 50.0, 150.0),
        ("1.0e2", "eq", 100.0, 95.0, 105.0),
        ("gt100", "gt", 100.0, 99.5, 100.5),
        ("le5.4", "le", 5.4, 5.35, 5.45),
        ("ap10", "ap", 10.0, 9.5, 10.5),
        ("ne-1", "ne", -1.0, -1.5, -0.5),
    ],
)
def test_number_precision_ranges(
    value: str, prefix: str, number: float, lo: float, hi: float
) -> None:
    cond = one("Observation", "value-quantity", value)
    assert isinstance(cond, NumberCond)
    assert (cond.prefix, cond.value) == (prefix, number)
    assert cond.lo == pytest.approx(lo)
    assert cond.hi == pytest.approx(hi)
    assert (cond.system, cond.code) == (None, None)


def test_quantity_with_system_and_code() -> None:
    cond = one("Observation", "value-quantity", "ge5.4|http://unitsofmeasure.org|mmol/L")
    assert isinstance(cond, NumberCond)
    assert (cond.prefix, cond.value, cond.system, cond.code) == (
        "ge",
        5.4,
        "http://unitsofmeasure.org",
        "mmol/L",
    )
    cond = one("Observation", "value-quantity", "5.4||mmol/L")
    assert isinstance(cond, NumberCond)
    assert (cond.system, cond.code) == (None, "mmol/L")


@pytest.mark.parametrize(
    "value",
    [
        "abc",
        "ge",
        "gtx",
        "NaN",
        "sNaN",
        "Infinity",
        "-inf",
        "1e400",
        "9999999999999999999999999999e999972",
        "1e-999999999",
        "",
    ],
)
def test_invalid_numbers_are_400(value: str) -> None:
    with pytest.raises(InvalidRequest):
        conds("Observation", ("value-quantity", value))


# --- strings, uris, references --------------------------------------------------------------


def test_string_modes() -> None:
    assert one("Patient", "name", "Ёлкин") == StringCond("name", "елкин", "prefix")
    assert one("Patient", "name:contains", "ЁЛК") == StringCond("name", "елк", "contains")
    # :exact compares the value as written
    assert one("Patient", "name:exact", "Ёлкин") == StringCond("name", "Ёлкин", "exact")


def test_uri_modes() -> None:
    url = "http://example.org/fhir/StructureDefinition/x"
    assert one("Patient", "_profile", url) == UriCond("_profile", url, "exact")
    assert one("Patient", "_profile:below", url) == UriCond("_profile", url, "below")
    assert one("Patient", "_profile:above", url) == UriCond("_profile", url, "above")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        # a single-target parameter knows the type of a bare id; a patient reference sees
        # through the person's identity group (expand)
        ("patient", "p1", ReferenceCond("patient", "Patient", "p1", expand=True)),
        # a multi-target parameter with a bare id matches any type
        ("subject", "p1", ReferenceCond("subject", None, "p1")),
        ("subject", "Patient/p1", ReferenceCond("subject", "Patient", "p1", expand=True)),
        ("subject:Patient", "p1", ReferenceCond("subject", "Patient", "p1", expand=True)),
        ("subject:Group", "g1", ReferenceCond("subject", "Group", "g1")),
        ("subject", "Patient/p1/_history/3", ReferenceCond("subject", "Patient", "p1", True)),
        (
            "subject",
            "http://other.example/fhir/Patient/p1",
            ReferenceCond("subject", "Patient", "p1", expand=True),
        ),
        ("subject", "urn:uuid:1/2", ReferenceCond("subject", "", "urn:uuid:1/2")),
    ],
)
def test_reference_forms(key: str, value: str, expected: Condition) -> None:
    assert one("Observation", key, value) == expected


def test_patient_link_names_records_not_people() -> None:
    assert one("Patient", "link", "Patient/p1") == ReferenceCond("link", "Patient", "p1")


def test_reference_identifier_modifier() -> None:
    cond = one("Observation", "patient:identifier", "urn:oid:1.2.643|1234")
    ident = (TokenCond("identifier", "urn:oid:1.2.643", "1234"),)
    assert cond == ChainCond("patient", "Patient", ident)
    # without declared targets, the usual owners of identifiers are tried
    cond = one("Observation", "performer:identifier", "s|v")
    assert isinstance(cond, AnyOf)
    assert {c.target_type for c in cond.conds if isinstance(c, ChainCond)} == {
        "Patient",
        "Practitioner",
        "Organization",
    }


# --- modifiers accepted and rejected per type ------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("gender:not", "male"),
        ("name:exact", "x"),
        ("name:contains", "x"),
        ("_profile:below", "http://x"),
        ("_profile:above", "http://x"),
        ("general-practitioner:Practitioner", "1"),
        ("general-practitioner:identifier", "s|v"),
        ("gender:missing", "true"),
        ("birthdate:missing", "false"),
        ("name:missing", "true"),
        ("organization:missing", "true"),
        ("_id:not", "a"),
    ],
)
def test_modifiers_accepted(key: str, value: str) -> None:
    assert conds("Patient", (key, value))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("gender:text", "x"),
        ("gender:exact", "male"),
        ("gender:contains", "m"),
        ("gender:in", "http://vs"),
        ("gender:below", "x"),
        ("name:not", "x"),
        ("name:text", "x"),
        ("name:below", "x"),
        ("_profile:exact", "http://x"),
        ("_profile:not", "http://x"),
        ("general-practitioner:exact", "1"),
        ("general-practitioner:not", "1"),
        ("general-practitioner:missing", "maybe"),
        ("birthdate:exact", "2024"),
        ("birthdate:not", "2024"),
        ("birthdate:below", "2024"),
        ("active:missing", ""),
    ],
)
def test_modifiers_rejected(key: str, value: str) -> None:
    with pytest.raises(InvalidRequest):
        conds("Patient", (key, value))


@pytest.mark.parametrize("key", ["value-quantity:exact", "value-quantity:not", "date:contains"])
def test_modifiers_rejected_on_numbers_and_dates(key: str) -> None:
    with pytest.raises(InvalidRequest):
        conds("Observation", (key, "5"))


def test_missing() -> None:
    assert one("Patient", "birthdate:missing", "true") == MissingCond("birthdate", "date", True)
    assert one("Observation", "value-quantity:missing", "false") == MissingCond(
        "value-quantity", "quantity", False
    )


@pytest.mark.parametrize("key", ["_id:exact", "_lastUpdated:missing", "nope:missing", "nope.name"])
def test_unknown_modified_parameters(key: str) -> None:
    with pytest.raises(UnknownSearchParameter):
        conds("Patient", (key, "true"))


# --- ids ------------------------------------------------------------------------------------


def test_ids() -> None:
    assert one("Patient", "_id", "a,b-1.2") == IdCond(("a", "b-1.2"))
    assert one("Patient", "_id:not", "a") == IdCond(("a",), negate=True)
    for bad in ("a b", "", "a/b", "x" * 65, "a,"):
        with pytest.raises(InvalidRequest, match="_id"):
            conds("Patient", ("_id", bad))


@pytest.mark.parametrize("value", ["", ",", ",,"])
def test_empty_values_are_400(value: str) -> None:
    with pytest.raises(InvalidRequest, match="empty"):
        conds("Patient", ("name", value))


# --- chains ---------------------------------------------------------------------------------


def test_chain_with_type() -> None:
    assert one("Observation", "subject:Patient.identifier", "urn:oid:1|42") == ChainCond(
        "subject", "Patient", (TokenCond("identifier", "urn:oid:1", "42"),)
    )


def test_chain_single_target_needs_no_type() -> None:
    assert one("Observation", "patient.name", "иван") == ChainCond(
        "patient", "Patient", (StringCond("name", "иван"),)
    )


def test_chain_across_candidate_types() -> None:
    cond = one("Observation", "subject.name", "иван")
    assert isinstance(cond, AnyOf)
    targets = [c.target_type for c in cond.conds if isinstance(c, ChainCond)]
    # every default target type that knows `name`, and only those (Encounter has no `name`)
    assert targets == ["Patient", "Practitioner", "Organization", "Location"]
    assert all(c.conds == (StringCond("name", "иван"),) for c in cond.conds)  # type: ignore[union-attr]


def test_chain_restricted_to_types_that_know_the_parameter() -> None:
    cond = one("Observation", "subject.birthdate", "1980")
    assert cond == ChainCond("subject", "Patient", (DateCond("birthdate", "eq", *rng("1980")),))


def test_chain_on_underscore_parameter() -> None:
    cond = one("Observation", "patient._id", "p1")
    assert cond == ChainCond("patient", "Patient", (IdCond(("p1",)),))


def test_chain_with_inner_modifier() -> None:
    cond = one("Observation", "patient.name:exact", "Ёлкин")
    assert cond == ChainCond("patient", "Patient", (StringCond("name", "Ёлкин", "exact"),))


def test_two_link_chain() -> None:
    cond = one("Observation", "subject:Patient.organization.name", "поликлиника")
    assert cond == ChainCond(
        "subject",
        "Patient",
        (ChainCond("organization", "Organization", (StringCond("name", "поликлиника"),)),),
    )


@pytest.mark.parametrize(
    "key",
    [
        "subject:Patient.organization.partof.name",
        "patient.organization.partof.partof.name",
        "subject.organization.partof._id",
    ],
)
def test_too_deep_chains_are_rejected(key: str) -> None:
    # at most three dotted parts: two reference hops and the parameter at the end
    with pytest.raises(InvalidRequest, match="deeper"):
        conds("Observation", (key, "x"))


@pytest.mark.parametrize(
    ("key", "error"),
    [
        ("code.name", InvalidRequest),  # not a reference
        ("subject.nope", UnknownSearchParameter),
        ("subject:Nope.name", UnknownSearchParameter),
        ("patient.code", UnknownSearchParameter),
    ],
)
def test_bad_chains(key: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        conds("Observation", (key, "x"))


def test_param_cond_unknown_is_none() -> None:
    assert param_cond("Patient", "nope", "x") is None
    assert param_cond("Patient", "name", "x") == [StringCond("name", "x")]


# --- _sort ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "keys"),
    [
        ("_id", [SortKey("_id", "id")]),
        ("-_lastUpdated", [SortKey("_lastUpdated", "lastUpdated", True)]),
        ("-date", [SortKey("date", "date", True)]),
        ("code,-date", [SortKey("code", "token"), SortKey("date", "date", True)]),
        ("value-quantity", [SortKey("value-quantity", "quantity")]),
        ("value-string", [SortKey("value-string", "string")]),
        ("_profile", [SortKey("_profile", "uri")]),
    ],
)
def test_sort_forms(raw: str, keys: list[SortKey]) -> None:
    assert search("Observation", ("_sort", raw)).query.sort == keys


@pytest.mark.parametrize("raw", ["subject", "nope", "", "-", "date,", "+date"])
def test_sort_rejected(raw: str) -> None:
    with pytest.raises(InvalidRequest, match="sort"):
        search("Observation", ("_sort", raw))


def test_system_level_sort_only_on_common_keys() -> None:
    assert search(None, ("_sort", "-_lastUpdated")).query.sort == [
        SortKey("_lastUpdated", "lastUpdated", True)
    ]
    with pytest.raises(InvalidRequest):
        search(None, ("_sort", "date"))


# --- _include / _revinclude -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "include"),
    [
        ("Observation:subject", Include("Observation", "subject")),
        ("Observation:subject:Patient", Include("Observation", "subject", "Patient")),
        ("Observation:subject:iterate", Include("Observation", "subject")),
        ("Observation:subject:Patient:iterate", Include("Observation", "subject", "Patient")),
        ("Observation:*", Include("Observation", "*")),
    ],
)
def test_include_forms(raw: str, include: Include) -> None:
    assert search("Observation", ("_include", raw)).includes == [include]
    assert search("Patient", ("_revinclude", raw)).revincludes == [include]


def test_include_list() -> None:
    req = search("Observation", ("_include", "Observation:subject,Observation:performer"))
    assert [i.param for i in req.includes] == ["subject", "performer"]
    req = search("Observation", ("_include:iterate", "Observation:subject"))
    assert req.includes == [Include("Observation", "subject")]


@pytest.mark.parametrize(
    "raw",
    ["Observation", "Observation:code", "Observation:nope", "Nope:subject", "", ":subject"],
)
def test_include_rejected(raw: str) -> None:
    with pytest.raises(InvalidRequest, match="include|reference"):
        search("Observation", ("_include", raw))
    with pytest.raises(InvalidRequest, match="include|reference"):
        search("Patient", ("_revinclude", raw))


# --- result parameters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "count"),
    [("10", 10), ("0", 0), ("1000", 1000), ("1001", 1000), ("99999999999", 1000), ("-5", 0)],
)
def test_count_clamping(raw: str, count: int) -> None:
    assert search("Patient", ("_count", raw)).query.count == count


def test_count_default_and_invalid() -> None:
    assert search("Patient").query.count == 50
    for bad in ("x", "1.5", "", "9" * 5000):
        with pytest.raises(InvalidRequest, match="_count"):
            search("Patient", ("_count", bad))


def test_total_summary_elements() -> None:
    assert search("Patient", ("_total", "accurate")).query.total
    assert not search("Patient", ("_total", "none")).query.total
    req = search("Patient", ("_summary", "count"))
    assert req.summary == "count" and req.query.total
    assert search("Patient", ("_summary", "false")).summary is None
    assert search("Patient", ("_elements", "name, gender,,")).elements == ["name", "gender"]
    with pytest.raises(InvalidRequest, match="_total"):
        search("Patient", ("_total", "exact"))
    with pytest.raises(InvalidRequest, match="_summary"):
        search("Patient", ("_summary", "yes"))


def test_ignored_result_parameters_and_content() -> None:
    req = search("DocumentReference", ("_format", "json"), ("_pretty", "true"), ("_text", "рак"))
    assert req.query.conds == [] and req.content == "рак"


def test_system_level_type_and_id() -> None:
    assert conds(None, ("_type", "Patient,Observation"), ("_id", "a")) == [
        TypeCond(("Patient", "Observation")),
        IdCond(("a",)),
    ]


# --- cursors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [[], [1], [1_700_000_000_000_000, 42], ["елкин", 7], [1.5, "x", -3], ["\U0010ffff", 0]],
)
def test_cursor_round_trip(values: list[object]) -> None:
    raw = encode_cursor(values)
    assert "=" not in raw and "+" not in raw and "/" not in raw
    assert decode_cursor(raw) == values
    assert search("Patient", ("_cursor", raw)).query.after == values


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "!!!",
        "курсор",
        "a",
        b64(b"not json"),
        b64(b'{"a": 1}'),
        b64(b"1"),
        b64(b"[true]"),
        b64(b"[null]"),
        b64(b"[[1]]"),
        b64(b'[{"a": 1}]'),
        b64(b"\xff\xfe"),
    ],
)
def test_malformed_cursors(raw: str) -> None:
    with pytest.raises(InvalidRequest, match="cursor"):
        decode_cursor(raw)
    with pytest.raises(InvalidRequest, match="cursor"):
        search("Patient", ("_cursor", raw))


def test_canonical_items_drop_the_cursor() -> None:
    items = [("name", "x"), ("_cursor", "abc"), ("_count", "5")]
    assert canonical_items(items) == [("name", "x"), ("_count", "5")]


# --- strict and lenient handling of unknown parameters ---------------------------------------


def test_unknown_parameter_strict() -> None:
    with pytest.raises(UnknownSearchParameter, match="foo") as err:
        search("Patient", ("foo", "1"))
    assert err.value.status == 400
    assert err.value.code == "HIE-1010"


def test_unknown_parameter_lenient() -> None:
    req = search("Patient", ("foo", "1"), ("name", "x"), ("bar:exact", "2"), lenient=True)
    assert req.ignored == ["foo", "bar:exact"]
    assert req.query.conds == [StringCond("name", "x")]


def test_lenient_still_rejects_bad_values_of_known_parameters() -> None:
    with pytest.raises(InvalidRequest):
        search("Patient", ("birthdate", "soon"), lenient=True)


def test_system_level_unknown_parameters() -> None:
    with pytest.raises(UnknownSearchParameter):
        search(None, ("name", "x"))
    assert search(None, ("name", "x"), lenient=True).ignored == ["name"]


def test_unsupported_type() -> None:
    with pytest.raises(UnknownSearchParameter, match="Nope"):
        search("Nope")


def test_describe_lists_common_and_type_parameters() -> None:
    names = {(p["name"], p["type"]) for p in describe("Patient")}
    assert {("_id", "token"), ("_lastUpdated", "date"), ("name", "string")} <= names
    assert ("birthdate", "date") in names and ("organization", "reference") in names
