"""Critical-result detection (pure): the lab's flags, the reference data's rules with units,
and what must raise nothing — normal and merely high values, missing values, withdrawn
results."""

from __future__ import annotations

from typing import Any

import pytest

from hie.fhir import model
from hie.lab_exchange.alerts import (
    INTERPRETATION_SYSTEM,
    V2_ABNORMAL_FLAGS,
    RuleSet,
    alert_id,
    builtin_limits,
    convert,
    critical_findings,
    critical_flag,
    parse_unit,
)

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
REPORT: dict[str, Any] = {"resourceType": "DiagnosticReport", "id": "r1", "status": "final"}
BUILTIN = RuleSet.from_definitions(builtin_limits())


def obs(
    code: str,
    value: float | None = None,
    unit: str | None = None,
    *,
    flags: list[dict[str, Any]] | None = None,
    oid: str = "o1",
    status: str = "final",
    comparator: str | None = None,
    text: str | None = None,
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": status,
        "code": {"coding": [{"system": LOINC, "code": code, "display": f"LOINC {code}"}]},
        "effectiveDateTime": "2026-03-05T08:00:00+03:00",
    }
    if text:
        res["code"]["text"] = text
    if value is not None:
        q: dict[str, Any] = {"value": value}
        if unit is not None:
            q.update({"unit": unit, "system": UCUM, "code": unit})
        if comparator:
            q["comparator"] = comparator
        res["valueQuantity"] = q
    if flags is not None:
        res["interpretation"] = flags
    return res


def flag(code: str, system: str | None = INTERPRETATION_SYSTEM) -> dict[str, Any]:
    coding: dict[str, Any] = {"code": code}
    if system:
        coding["system"] = system
    return {"coding": [coding]}


def findings(*observations: dict[str, Any], rules: RuleSet = BUILTIN, **kw: Any) -> list[Any]:
    return critical_findings(REPORT, list(observations), rules, **kw)


# --- the lab's flags (OBX-8) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interpretation", "expected"),
    [
        ([flag("HH")], "HH"),
        ([flag("LL", V2_ABNORMAL_FLAGS)], "LL"),
        ([flag("AA", None)], "AA"),  # no system: table 0078 codes as sent
        ([flag("hh")], "HH"),
        ([flag("H"), flag("HH")], "HH"),
        ([{"text": "Critical value, phoned"}], "AA"),
        ([{"text": "Критически низкое значение"}], "LL"),
        ([{"coding": [{"system": "urn:local", "code": "P", "display": "Panic high"}]}], "HH"),
        ([{"coding": [{"system": "urn:local", "code": "X", "display": "Паническое"}]}], "AA"),
    ],
)
def test_critical_flags(interpretation: list[dict[str, Any]], expected: str) -> None:
    assert critical_flag(interpretation) == expected


@pytest.mark.parametrize(
    "interpretation",
    [
        [flag("H")],
        [flag("L")],
        [flag("A")],
        [flag("HU")],  # significantly high: not critical by itself
        [flag(">")],  # off scale
        [flag("N")],
        [flag("HH", "urn:some-local-system")],  # a local code HH may mean anything
        [{"text": "non-critical"}],
        [{"text": "Некритичное отклонение"}],
        [{"text": "Not critical"}],
        [],
        "HH",  # not a list of CodeableConcepts
    ],
)
def test_what_is_not_a_critical_flag(interpretation: Any) -> None:
    assert critical_flag(interpretation) is None


def test_a_flagged_result_is_critical_with_or_without_a_value() -> None:
    (f,) = findings(obs("2823-3", 7.1, "mmol/L", flags=[flag("HH")], text="Калий"))
    assert (f.flag, f.reason, f.value, f.unit, f.observation) == (
        "HH",
        "flag",
        7.1,
        "mmol/L",
        "Observation/o1",
    )
    assert f.name_ru == "Калий" and f.name_en == "LOINC 2823-3"
    assert f.text_ru() == "Калий 7.1 mmol/L — критически высокое (HH)"
    assert f.text_en() == "LOINC 2823-3 7.1 mmol/L — critically high (HH)"
    # a coded result (a positive blood culture) has no value, only the lab's word
    (g,) = findings(obs("600-7", flags=[flag("AA")]))
    assert g.value is None and g.text_en() == "LOINC 600-7 — critically abnormal (AA)"


def test_withdrawn_results_and_reports_raise_nothing() -> None:
    hh = [flag("HH")]
    assert findings(obs("2823-3", 7.1, "mmol/L", flags=hh, status="entered-in-error")) == []
    assert findings(obs("2823-3", 7.1, "mmol/L", flags=hh, status="cancelled")) == []
    for status in ("cancelled", "entered-in-error"):
        report = {**REPORT, "status": status}
        assert critical_findings(report, [obs("2823-3", 7.1, "mmol/L", flags=hh)], BUILTIN) == []
    # a preliminary report is acted on: critical values are phoned before the final one
    prelim = {**REPORT, "status": "preliminary"}
    assert len(critical_findings(prelim, [obs("2823-3", 7.1, "mmol/L", flags=hh)], BUILTIN)) == 1


# --- rules of the reference data ------------------------------------------------------------------


def test_the_builtin_limits_are_valid_fhir_and_cover_the_usual_tests() -> None:
    defs = builtin_limits()
    for res in defs:
        model.validate(dict(res))
        assert res["text"]["div"].count("Источник / source") == 1  # each names its source
    assert len(BUILTIN) == len(defs) == 12
    for loinc in ("2823-3", "2951-2", "14749-6", "2345-7", "718-7", "777-3", "6690-2", "6301-6"):
        assert BUILTIN.for_code({"coding": [{"system": LOINC, "code": loinc}]}), loinc
    assert not BUILTIN.needs_patient  # adult limits: no gender or age in them


@pytest.mark.parametrize(
    ("code", "value", "unit", "expected"),
    [
        ("2823-3", 6.2, "mmol/L", "HH"),  # bounds are inclusive (FHIR Range)
        ("2823-3", 2.8, "mmol/L", "LL"),
        ("2823-3", 7.0, "meq/L", "HH"),  # the customary unit (factor 1)
        ("2823-3", 7.0, "mEq/L", "HH"),
        ("2951-2", 118, "mmol/L", "LL"),
        ("14749-6", 1.9, "mmol/L", "LL"),
        ("2345-7", 30.0, "mmol/L", "HH"),  # mass code sent in moles: the unit decides
        ("2345-7", 540, "mg/dL", "HH"),  # 540 mg/dL = 30.0 mmol/L
        ("2339-0", 40, "mg/dL", "LL"),  # 40 mg/dL = 2.2 mmol/L
        ("718-7", 6.0, "g/dL", "LL"),  # 60 g/L ≤ 66
        ("718-7", 210, "g/L", "HH"),
        ("777-3", 20, "10*9/L", "LL"),
        ("777-3", 20, "10*3/uL", "LL"),  # the same count per microlitre
        ("777-3", 1200, "/nL", "HH"),
        ("6690-2", 1.5, "10*9/L", "LL"),
        ("6301-6", 6.5, "{INR}", "HH"),
        ("6301-6", 6.5, None, "HH"),  # INR sent without a unit
        ("6301-6", 6.5, "1", "HH"),
        ("17861-6", 14.0, "mg/dL", "HH"),  # calcium 14 mg/dL = 3.49 mmol/L
        ("14682-9", 700, "umol/L", "HH"),
        ("2160-0", 8.0, "mg/dL", "HH"),  # creatinine 8 mg/dL = 707 µmol/L
    ],
)
def test_rules_compare_in_the_definitions_unit(
    code: str, value: float, unit: str | None, expected: str
) -> None:
    (f,) = findings(obs(code, value, unit, flags=[flag("H")]))
    assert (f.flag, f.reason) == (expected, "rule")
    assert f.rule and f.rule.startswith("critical-") and f.limit


@pytest.mark.parametrize(
    ("code", "value", "unit"),
    [
        ("2823-3", 6.1, "mmol/L"),  # high, not critical
        ("2823-3", 3.0, "mmol/L"),
        ("2823-3", 4.3, "mmol/L"),
        ("2951-2", 150, "mmol/L"),
        ("14749-6", 11.0, "mmol/L"),
        ("2345-7", 200, "mg/dL"),  # 11.1 mmol/L
        ("718-7", 9.0, "g/dL"),  # 90 g/L: anaemia, not critical
        ("718-7", 90, "g/L"),
        ("777-3", 100, "10*9/L"),
        ("6301-6", 3.0, "{INR}"),
        ("2823-3", 7.1, "mg/dL"),  # a unit that cannot be converted: no guessing
        ("2823-3", 7.1, "furlongs"),
        ("718-7", 60, None),  # a concentration without a unit: no guessing
        ("1742-6", 5000, "U/L"),  # ALT: no rule for it
    ],
)
def test_no_alert_for_normal_or_merely_abnormal_values(
    code: str, value: float, unit: str | None
) -> None:
    assert findings(obs(code, value, unit, flags=[flag("H")])) == []
    assert findings(obs(code, value, unit)) == []


def test_missing_values_raise_nothing_without_a_flag() -> None:
    assert findings(obs("2823-3")) == []
    absent = obs("2823-3")
    absent["dataAbsentReason"] = {"coding": [{"code": "error"}]}
    assert findings(absent) == []
    assert findings(obs("2823-3", value=None, unit="mmol/L", flags=[flag("N")])) == []
    text_value = obs("2823-3")
    text_value["valueString"] = "гемолиз"
    assert findings(text_value) == []


def test_comparators_count_only_when_every_value_they_allow_is_critical() -> None:
    assert findings(obs("2823-3", 2.0, "mmol/L", comparator="<"))[0].flag == "LL"
    assert findings(obs("14749-6", 30, "mmol/L", comparator=">"))[0].flag == "HH"
    assert findings(obs("2823-3", 7.0, "mmol/L", comparator="<")) == []  # could be normal
    assert findings(obs("2823-3", 2.0, "mmol/L", comparator=">")) == []


def test_findings_follow_the_report_order_and_panels_components() -> None:
    report = {**REPORT, "result": [{"reference": "Observation/b"}, {"reference": "Observation/a"}]}
    a = obs("2823-3", 7.1, "mmol/L", oid="a")
    b = obs("2951-2", 110, "mmol/L", oid="b")
    assert [f.observation for f in critical_findings(report, [a, b], BUILTIN)] == [
        "Observation/b",
        "Observation/a",
    ]
    gas = obs("24336-0", oid="gas")
    gas["component"] = [
        {
            "code": {"coding": [{"system": LOINC, "code": "2823-3"}]},
            "valueQuantity": {"value": 2.1, "system": UCUM, "code": "mmol/L"},
        },
        {
            "code": {"coding": [{"system": LOINC, "code": "2951-2"}]},
            "valueQuantity": {"value": 140, "system": UCUM, "code": "mmol/L"},
        },
    ]
    (f,) = findings(gas)
    assert f.observation == "Observation/gas" and f.flag == "LL" and f.code == (LOINC, "2823-3")


def definition(
    intervals: list[dict[str, Any]], unit: str = "mmol/L", **extra: Any
) -> dict[str, Any]:
    return {
        "resourceType": "ObservationDefinition",
        "id": "custom",
        "code": {"coding": [{"system": "urn:lab:local", "code": "K"}]},
        "quantitativeDetails": {"unit": {"coding": [{"system": UCUM, "code": unit}]}, **extra},
        "qualifiedInterval": intervals,
    }


def local_k(value: float, unit: str = "mmol/L") -> dict[str, Any]:
    res = obs("x", value, unit)
    res["code"] = {"coding": [{"system": "urn:lab:local", "code": "K"}], "text": "K+"}
    return res


def test_local_codes_and_gender_or_age_limited_intervals() -> None:
    rules = RuleSet.from_definitions(
        [
            definition(
                [
                    {"category": "critical", "range": {"low": {"value": 6.0}}, "gender": "male"},
                    {
                        "category": "critical",
                        "range": {"low": {"value": 5.5}},
                        "age": {"high": {"value": 1, "unit": "a", "code": "a"}},
                    },
                    {
                        "category": "reference",
                        "range": {"low": {"value": 3.5}, "high": {"value": 5.1}},
                    },
                ]
            )
        ]
    )
    assert rules.needs_patient
    man = {"resourceType": "Patient", "gender": "male", "birthDate": "1970-01-01"}
    woman = {"resourceType": "Patient", "gender": "female", "birthDate": "1970-01-01"}
    baby = {"resourceType": "Patient", "gender": "female", "birthDate": "2025-12-01"}
    assert findings(local_k(6.1), rules=rules, patient=man)[0].flag == "HH"
    assert findings(local_k(6.1), rules=rules, patient=woman) == []
    assert findings(local_k(5.7), rules=rules, patient=baby)[0].rule == "custom"
    assert findings(local_k(5.7), rules=rules, patient=man) == []
    assert findings(local_k(6.1), rules=rules) == []  # who it is about is unknown: no guess


def test_intervals_the_hub_cannot_judge_are_skipped() -> None:
    rules = RuleSet.from_definitions(
        [
            definition(
                [
                    {
                        "category": "critical",
                        "range": {"low": {"value": 5.0}},
                        "condition": "on dialysis",
                    },
                    {
                        "category": "critical",
                        "range": {"low": {"value": 5.0}},
                        "appliesTo": [{"text": "pregnant"}],
                    },
                    {"category": "critical", "range": {}},
                ]
            )
        ]
    )
    assert findings(local_k(9.0), rules=rules) == []


def test_a_bound_written_in_another_unit_is_converted() -> None:
    rules = RuleSet.from_definitions(
        [
            definition(
                [
                    {
                        "category": "critical",
                        "range": {"high": {"value": 60, "system": UCUM, "code": "g/L"}},
                    }
                ],
                unit="g/dL",
            )
        ]
    )
    (rule,) = rules.for_code({"coding": [{"system": "urn:lab:local", "code": "K"}]})
    assert rule.high == pytest.approx(6.0) and rule.flag == "LL"
    assert rule.limit_text() == "≤ 6 g/dL"


def test_alert_ids_are_deterministic_and_follow_the_findings() -> None:
    k = obs("2823-3", 7.1, "mmol/L", oid="a", flags=[flag("HH")])
    na = obs("2951-2", 110, "mmol/L", oid="b")
    both = findings(k, na)
    assert alert_id("r1", both) == alert_id("r1", list(reversed(both)))
    assert alert_id("r1", both) != alert_id("r2", both)
    # a re-sent result under a new Observation id is the same finding
    k2 = {**k, "id": "other"}
    assert alert_id("r1", findings(k2, na)) == alert_id("r1", both)
    # a corrected value is another
    k3 = obs("2823-3", 7.4, "mmol/L", oid="a", flags=[flag("HH")])
    assert alert_id("r1", findings(k3, na)) != alert_id("r1", both)


@pytest.mark.parametrize(
    ("a", "b", "factor"),
    [
        ("g/dL", "g/L", 10),
        ("mg/dL", "g/L", 0.01),
        ("10*3/uL", "10*9/L", 1),
        ("/nL", "10*9/L", 1),
        ("10^9/L", "10*9/L", 1),
        ("×10⁹/л", "10*9/L", 1),
        ("ммоль/л", "mmol/L", 1),
        ("мкмоль/л", "mmol/L", 0.001),
        ("µmol/L", "umol/L", 1),
        ("%", "L/L", 0.01),
        ("{INR}", "1", 1),
        ("mIU/L", "[iU]/L", 0.001),
        ("U/L", "mU/mL", 1),
    ],
)
def test_units_convert_by_scale(a: str, b: str, factor: float) -> None:
    assert convert(1.0, a, b) == pytest.approx(factor)


@pytest.mark.parametrize(
    ("a", "b"), [("mmol/L", "mg/dL"), ("g/L", "10*9/L"), ("mmol/L", "%"), ("kg/m2/s", "g/L")]
)
def test_units_of_different_kinds_do_not_convert(a: str, b: str) -> None:
    assert convert(1.0, a, b) is None


def test_unparsable_units() -> None:
    for text in (None, "furlongs", "mmol/L/s", "cells"):
        assert parse_unit(text) is None
