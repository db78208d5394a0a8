"""HL7 v2 ORU^R01 → DiagnosticReport, Observation, Specimen (hie.lab_exchange.oru): golden
files, generated panels in every style, each value type, each error, identity and criticality."""

from __future__ import annotations

import uuid
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hie.adapters.hl7v2 import Hl7Problem, build_ack, parse
from hie.fhir.model import validate
from hie.lab_exchange.oru import (
    ENTITY_ID_BASE,
    INTERPRETATION_SYSTEM,
    LAB_NAMESPACE,
    LOINC,
    UCUM,
    OruMessage,
    full_url,
    map_oru,
    ucum_code,
)
from hie.registries.identifiers import SNILS_SYSTEM
from tests.fixtures.hl7v2 import (
    BIOCHEM,
    CBC,
    FILLER_1,
    GOLDEN_DIR,
    LAB_CODES,
    LAB_FACILITY,
    MO_NAMESPACE,
    MO_SYSTEM,
    MRN_1,
    PLACER_1,
    SPECIMEN_1,
    Raw,
    check_golden,
    lab_snapshot,
    mutated,
    oru_message,
)

TODAY = date(2025, 11, 1)
MO_REF = "Organization/mo-7001"
FILLER_SYSTEM = ENTITY_ID_BASE + LAB_FACILITY
PLACER_SYSTEM = ENTITY_ID_BASE + MO_NAMESPACE


def oru(raw: bytes, **kw: Any) -> OruMessage:
    kw.setdefault("local_code_system", LAB_CODES)
    kw.setdefault("default_system", MO_SYSTEM)
    kw.setdefault("organization", MO_REF)
    kw.setdefault("today", TODAY)
    return map_oru(parse(raw), **kw)


def clean(raw: bytes, **kw: Any) -> OruMessage:
    """Mapped with neither errors nor warnings, every resource valid FHIR R4."""
    res = oru(raw, **kw)
    assert res.errors == [] and res.warnings == [], (res.errors, res.warnings)
    for entry in res.entries():
        validate(entry.resource)
    return res


def observations(res: OruMessage) -> list[dict[str, Any]]:
    return [o.resource for p in res.patients for r in p.reports for o in r.observations]


def one_obs(res: OruMessage, n: int = 1) -> dict[str, Any]:
    return observations(res)[n - 1]


def problems(items: list[Hl7Problem]) -> list[tuple[str, str]]:
    return [(p.code, p.location) for p in items]


# --- golden files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    sorted(p.stem for p in GOLDEN_DIR.glob("oru_*.hl7")),
)
def test_golden(name: str) -> None:
    res = oru((GOLDEN_DIR / f"{name}.hl7").read_bytes())
    for entry in res.entries():
        validate(entry.resource)
    check_golden(name, lab_snapshot(res))


def test_golden_files_are_all_used() -> None:
    stems = {p.stem for p in GOLDEN_DIR.glob("*.hl7")}
    expected = {p.name.removesuffix(".expected.json") for p in GOLDEN_DIR.glob("*.expected.json")}
    assert stems == expected


# --- generated panels --------------------------------------------------------------------------


@pytest.mark.parametrize("panel", ["cbc", "biochem"])
@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5", "2.5.1"])
@pytest.mark.parametrize("charset", ["UNICODE UTF-8", "WINDOWS-1251"])
def test_generated_panels_map_cleanly(panel: str, version: str, charset: str) -> None:
    res = clean(oru_message(panel, version=version, charset=charset))
    [patient] = res.patients
    assert patient.patient.identifier == {"system": MO_SYSTEM, "value": MRN_1}
    [report] = patient.reports
    rows = CBC if panel == "cbc" else BIOCHEM
    assert len(report.observations) == 10
    for obs, (loinc, name, unit, _ref, value, flag) in zip(observations(res), rows, strict=True):
        assert obs["code"] == {"coding": [{"system": LOINC, "code": loinc}], "text": name}
        q = obs["valueQuantity"]
        assert str(q["value"]) == value
        assert q["unit"] == unit
        assert q["system"] == UCUM and q["code"]  # every unit of both panels is in the table
        assert obs["interpretation"][0]["coding"][0]["code"] == flag
        assert obs["subject"] == {"reference": patient.patient.full_url}
        assert obs["status"] == "final"
        assert obs["effectiveDateTime"] == "2025-03-01T08:30:00+03:00"
        assert obs["specimen"] == {"reference": report.specimens[0].full_url}
    dr = report.report.resource
    assert dr["status"] == "final"
    assert dr["code"]["coding"][0]["code"] == ("58410-2" if panel == "cbc" else "24323-8")
    assert dr["result"] == [{"reference": o.full_url} for o in report.observations]
    assert report.filler == {
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                             "code": "FILL"}]},
        "system": FILLER_SYSTEM,
        "value": FILLER_1,
    }  # fmt: skip
    assert report.report.identifier == {"system": FILLER_SYSTEM, "value": FILLER_1}
    critical = [c.resource["code"]["text"] for c in report.critical]
    assert critical == ([] if panel == "cbc" else ["Калий"])


def test_utf8_and_cp1251_give_the_same_resources() -> None:
    utf8 = lab_snapshot(clean(oru_message("biochem")))
    cp1251 = lab_snapshot(clean(oru_message("biochem", charset="WINDOWS-1251")))
    assert utf8 == cp1251


def test_v2_3_specimen_comes_from_obr_15_and_v2_5_from_spm() -> None:
    old = clean(oru_message(version="2.3")).patients[0].reports[0].specimens
    new = clean(oru_message(version="2.5.1")).patients[0].reports[0].specimens
    assert old[0].resource["type"] == {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0070", "code": "BLD"}],
        "text": "Кровь",
    }
    assert old[0].identifier == {"system": FILLER_SYSTEM, "value": f"{FILLER_1}/specimen/1"}
    assert old[0].resource["receivedTime"] == "2025-03-01T09:10:00+03:00"  # OBR-14
    assert new[0].resource["type"]["coding"][0]["system"] == (
        "http://terminology.hl7.org/CodeSystem/v2-0487"
    )
    assert new[0].identifier == {"system": FILLER_SYSTEM, "value": SPECIMEN_1}
    assert new[0].resource["collection"] == {"collectedDateTime": "2025-03-01T08:30:00+03:00"}


def test_performing_organization_and_ordering_links() -> None:
    res = clean(oru_message())
    obs = one_obs(res)
    assert obs["performer"] == [{"type": "Organization", "display": "Лаборатория ЛабСервис"}]
    assert obs["basedOn"] == [
        {
            "type": "ServiceRequest",
            "identifier": {
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                     "code": "PLAC"}]},
                "system": PLACER_SYSTEM,
                "value": PLACER_1,
            },
        }
    ]  # fmt: skip
    v23 = one_obs(clean(oru_message(version="2.3")))
    assert v23["performer"] == [{"reference": MO_REF}]  # no OBX-23 before v2.5


def test_placer_only_result_is_filed_by_the_placer_number() -> None:
    res = oru(oru_message(orc=False, obr={3: ""}))
    assert problems(res.errors) == []
    assert problems(res.warnings) == [("101", "OBR-3.1")]
    report = res.patients[0].reports[0]
    assert report.report.identifier == {"system": PLACER_SYSTEM, "value": PLACER_1}
    assert report.filler is None


# --- identity ----------------------------------------------------------------------------------


def test_full_urls_are_rfc_4122_uuid5() -> None:
    expected = uuid.uuid5(LAB_NAMESPACE, "Observation|sys|val")
    assert full_url("Observation", "sys", "val") == f"urn:uuid:{expected}"
    assert full_url("Observation", "sys", "val") != full_url("Observation", "sys", "val2")


def test_resending_gives_the_same_resources() -> None:
    a = lab_snapshot(clean(oru_message(control_id="A")))
    b = lab_snapshot(clean(oru_message(control_id="B")))
    assert a == b


def test_observation_identity_does_not_depend_on_obx_1() -> None:
    res = clean(oru_message())
    reordered = oru_message(obx={n: {1: str(11 - n)} for n in range(1, 11)})
    again = clean(reordered)
    assert [o.full_url for o in res.patients[0].reports[0].observations] == [
        o.full_url for o in again.patients[0].reports[0].observations
    ]
    assert one_obs(res)["identifier"] == [{"system": FILLER_SYSTEM, "value": f"{FILLER_1}/718-7"}]


def test_sub_id_and_repeated_codes() -> None:
    with_sub = oru(oru_message(obx={2: {3: ("718-7", "Гемоглобин", "LN"), 4: "2"}}))
    assert with_sub.warnings == []
    ids = [o["identifier"][0]["value"] for o in observations(with_sub)][:2]
    assert ids == [f"{FILLER_1}/718-7", f"{FILLER_1}/718-7/2"]
    repeated = oru(oru_message(obx={2: {3: ("718-7", "Гемоглобин", "LN")}}))
    assert problems(repeated.warnings) == [("205", "OBX[2]-4")]
    ids = [o["identifier"][0]["value"] for o in observations(repeated)][:2]
    assert ids == [f"{FILLER_1}/718-7", f"{FILLER_1}/718-7#2"]


def test_correction_updates_the_same_resources() -> None:
    final = clean(oru_message("biochem"))
    corrected = clean(
        oru_message("biochem", result_status="C", obx={9: {5: "5.0", 8: "N", 11: "C"}})
    )
    assert [e.full_url for e in final.entries()] == [e.full_url for e in corrected.entries()]
    assert [e.identifier for e in final.entries()] == [e.identifier for e in corrected.entries()]
    report = corrected.patients[0].reports[0]
    assert report.report.resource["status"] == "corrected"
    potassium = report.observations[8].resource
    assert potassium["status"] == "corrected"
    assert potassium["valueQuantity"]["value"] == 5.0
    assert report.critical == []  # the corrected value is no longer critical


# --- value types -------------------------------------------------------------------------------


def value_of(obx: dict[int, Any]) -> tuple[dict[str, Any], OruMessage]:
    res = oru(oru_message(obx={1: obx}))
    obs = one_obs(res)
    validate(obs)
    return {k: v for k, v in obs.items() if k.startswith("value") or k == "dataAbsentReason"}, res


def test_nm_with_a_unit() -> None:
    value, res = value_of({2: "NM", 5: "-0.75", 6: ("mmol/L", "ммоль/л", "L")})
    assert value == {
        "valueQuantity": {"value": -0.75, "unit": "ммоль/л", "system": UCUM, "code": "mmol/L"}
    }
    assert res.warnings == []


def test_nm_with_a_ucum_coded_unit() -> None:
    value, _ = value_of({2: "NM", 5: "12", 6: ("mg/mmol", "мг/ммоль", "UCUM")})
    assert value == {
        "valueQuantity": {"value": 12, "unit": "мг/ммоль", "system": UCUM, "code": "mg/mmol"}
    }


def test_unit_not_in_the_table_keeps_its_text() -> None:
    value, res = value_of({2: "NM", 5: "7", 6: ("", "усл. ед.", "L"), 7: "5-10"})
    assert value == {"valueQuantity": {"value": 7, "unit": "усл. ед."}}
    assert problems(res.warnings) == [("103", "OBX-6.1")]
    assert res.errors == []
    assert one_obs(res)["referenceRange"] == [
        {"low": {"value": 5, "unit": "усл. ед."}, "high": {"value": 10, "unit": "усл. ед."}}
    ]


def test_nm_that_is_not_a_number_is_an_error_at_obx_5() -> None:
    res = oru(oru_message(obx={3: {5: "отрицательно"}}))
    assert problems(res.errors) == [("102", "OBX[3]-5")]
    assert res.errors[0].reject is False
    assert res.ack_code == "AE"
    assert "valueQuantity" not in one_obs(res, 3)
    comparator = oru(oru_message(obx={3: {5: "<5"}}))
    assert "send a comparator or range as SN" in comparator.errors[0].message


def test_nm_with_a_decimal_comma_is_read_with_a_warning() -> None:
    value, res = value_of({2: "NM", 5: "5,3", 6: "г/л"})
    assert value["valueQuantity"]["value"] == 5.3
    assert problems(res.warnings) == [("102", "OBX-5")]


@pytest.mark.parametrize("value_type", ["ST", "TX", "FT"])
def test_text_values(value_type: str) -> None:
    text = Raw("Анизоцитоз\\.br\\умеренный~Пойкилоцитоз")
    value, res = value_of({2: value_type, 5: text, 6: ""})
    expected = "Анизоцитоз умеренный\nПойкилоцитоз"
    if value_type != "ST":
        expected = "Анизоцитоз\nумеренный\nПойкилоцитоз"
    assert value == {"valueString": expected}
    assert res.warnings == []


@pytest.mark.parametrize("value_type", ["CE", "CWE"])
def test_coded_values(value_type: str) -> None:
    obx = {2: value_type, 5: ("260385009", "Отрицательно", "SCT", "NEG", "отр.", "L"), 6: ""}
    value, _ = value_of(obx)
    assert value == {
        "valueCodeableConcept": {
            "coding": [
                {"system": "http://snomed.info/sct", "code": "260385009"},
                {"system": LAB_CODES, "code": "NEG", "display": "отр."},
            ],
            "text": "Отрицательно",
        }
    }


@pytest.mark.parametrize(
    ("sn", "expected"),
    [
        (("<", "0.6"), {"valueQuantity": {"value": 0.6, "comparator": "<"}}),
        ((">=", "10"), {"valueQuantity": {"value": 10, "comparator": ">="}}),
        (("", "7.5"), {"valueQuantity": {"value": 7.5}}),
        (("=", "7"), {"valueQuantity": {"value": 7}}),
        (("", "1", "-", "5"), {"valueRange": {"low": {"value": 1}, "high": {"value": 5}}}),
        (("", "1", ":", "64"), {"valueRatio": {"numerator": {"value": 1},
                                               "denominator": {"value": 64}}}),
        (("", "2", "+"), {"valueString": "2+"}),
    ],
)  # fmt: skip
def test_structured_numeric(sn: tuple[str, ...], expected: dict[str, Any]) -> None:
    value, res = value_of({2: "SN", 5: sn, 6: ""})
    assert value == expected
    assert res.errors == [] and res.warnings == []


def test_structured_numeric_with_units_and_bad_parts() -> None:
    value, _ = value_of({2: "SN", 5: ("<", "5"), 6: ("", "мг/л", "L")})
    assert value == {
        "valueQuantity": {
            "value": 5,
            "comparator": "<",
            "unit": "мг/л",
            "system": UCUM,
            "code": "mg/L",
        }
    }
    _, res = value_of({2: "SN", 5: ("<", "пять"), 6: ""})
    assert problems(res.errors) == [("102", "OBX-5")]
    value, res = value_of({2: "SN", 5: ("<>", "5"), 6: ""})
    assert value == {"valueString": "<>5"}
    assert problems(res.warnings) == [("102", "OBX-5.1")]


def test_date_and_time_values() -> None:
    value, _ = value_of({2: "DT", 5: "20250301", 6: ""})
    assert value == {"valueDateTime": "2025-03-01"}
    value, _ = value_of({2: "TS", 5: "202503010830", 6: ""})
    assert value == {"valueDateTime": "2025-03-01T08:30:00+03:00"}
    value, _ = value_of({2: "TM", 5: "0830", 6: ""})
    assert value == {"valueTime": "08:30:00"}
    _, res = value_of({2: "DT", 5: "20250231", 6: ""})
    assert problems(res.errors) == [("102", "OBX-5")]


def test_unknown_value_type_is_a_warning_and_the_value_is_kept_as_text() -> None:
    value, res = value_of({2: "ZZ", 5: "что-то", 6: ""})
    assert value == {"valueString": "что-то"}
    assert problems(res.warnings) == [("103", "OBX-2")]
    assert res.errors == []


def test_known_value_type_the_hub_does_not_keep() -> None:
    value, res = value_of({2: "ED", 5: ("LAB", "application", "pdf", "Base64", "JVBERi0="), 6: ""})
    assert value == {
        "dataAbsentReason": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                    "code": "unsupported",
                }
            ]
        }
    }
    assert problems(res.warnings) == [("103", "OBX-2")]


def test_missing_value_type_reads_the_value_as_text() -> None:
    value, res = value_of({2: "", 5: "см. заключение", 6: ""})
    assert value == {"valueString": "см. заключение"}
    assert problems(res.warnings) == [("101", "OBX-2")]


def test_repeated_numeric_value_keeps_the_first() -> None:
    value, res = value_of({2: "NM", 5: ["5", "6"], 6: ""})
    assert value == {"valueQuantity": {"value": 5}}
    assert problems(res.warnings) == [("102", "OBX-5(2)")]


def test_empty_value_gives_no_value() -> None:
    value, res = value_of({2: "NM", 5: "", 11: "X"})
    assert value == {}
    assert one_obs(res)["status"] == "cancelled"


# --- reference range, interpretation, status ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3.5-5.0", {"low": {"value": 3.5}, "high": {"value": 5.0}}),
        ("3,5 – 5,0", {"low": {"value": 3.5}, "high": {"value": 5.0}}),
        ("-2-2", {"low": {"value": -2}, "high": {"value": 2}}),
        ("<5", {"high": {"value": 5}, "text": "<5"}),
        ("<= 5", {"high": {"value": 5}, "text": "<= 5"}),
        (">=10", {"low": {"value": 10}, "text": ">=10"}),
        ("отрицательно", {"text": "отрицательно"}),
    ],
)
def test_reference_ranges(text: str, expected: dict[str, Any]) -> None:
    res = oru(oru_message(obx={1: {6: "", 7: text}}))
    assert one_obs(res)["referenceRange"] == [expected]


@pytest.mark.parametrize(
    ("flags", "codes", "critical"),
    [
        ("HH", ["HH"], True),
        ("LL", ["LL"], True),
        ("AA", ["AA"], True),
        (["H", "AA"], ["H", "AA"], True),
        ("H", ["H"], False),
        ("HU", ["HU"], False),
        ("<", ["<"], False),
        (">", [">"], False),
        ("N", ["N"], False),
        ("", [], False),
    ],
)
def test_interpretation_and_criticality(flags: Any, codes: list[str], critical: bool) -> None:
    res = clean(oru_message(obx={1: {8: flags}}))
    obs = one_obs(res)
    got = [i["coding"][0] for i in obs.get("interpretation", [])]
    assert [c["code"] for c in got] == codes
    assert all(c["system"] == INTERPRETATION_SYSTEM for c in got)
    report = res.patients[0].reports[0]
    assert (report.critical == [report.observations[0]]) is critical


def test_cancelled_or_wrong_results_are_not_critical() -> None:
    for status in ("X", "D", "W"):
        res = oru(oru_message(obx={1: {8: "HH", 11: status}}))
        assert res.patients[0].reports[0].critical == []


def test_unknown_flag_is_a_warning() -> None:
    res = oru(oru_message(obx={1: {8: "↑"}}))
    assert one_obs(res)["interpretation"] == [{"text": "↑"}]
    assert problems(res.warnings) == [("103", "OBX-8(1)")]


@pytest.mark.parametrize(
    ("obx_11", "status"),
    [
        ("F", "final"),
        ("C", "corrected"),
        ("P", "preliminary"),
        ("R", "preliminary"),
        ("I", "registered"),
        ("X", "cancelled"),
        ("D", "entered-in-error"),
        ("W", "entered-in-error"),
    ],
)
def test_observation_status(obx_11: str, status: str) -> None:
    assert one_obs(oru(oru_message(obx={1: {11: obx_11}})))["status"] == status


@pytest.mark.parametrize(
    ("obr_25", "status"),
    [
        ("F", "final"),
        ("C", "corrected"),
        ("P", "preliminary"),
        ("A", "partial"),
        ("R", "partial"),
        ("I", "registered"),
        ("O", "registered"),
        ("X", "cancelled"),
    ],
)
def test_report_status(obr_25: str, status: str) -> None:
    res = oru(oru_message(result_status=obr_25))
    assert res.patients[0].reports[0].report.resource["status"] == status


def test_missing_statuses_are_warnings_and_fall_back() -> None:
    res = oru(oru_message(result_status="", obx={1: {11: ""}}))
    assert problems(res.warnings) == [("101", "OBR-25"), ("101", "OBX-11")]
    assert res.patients[0].reports[0].report.resource["status"] == "unknown"
    assert one_obs(res)["status"] == "unknown"
    res = oru(oru_message(result_status="P", obx={1: {11: "?"}}))
    assert one_obs(res)["status"] == "preliminary"
    assert problems(res.warnings) == [("103", "OBX-11")]


# --- errors ------------------------------------------------------------------------------------


def test_missing_obr_4_is_an_error() -> None:
    res = oru(oru_message(obr={4: ""}))
    assert problems(res.errors) == [("101", "OBR-4.1")]
    assert res.ack_code == "AE"


def test_missing_pid_is_an_error() -> None:
    res = oru(oru_message(pid=None))
    assert problems(res.errors) == [("100", "PID")]
    assert res.patients == []


def test_invalid_pid_is_an_error() -> None:
    from tests.fixtures.hl7v2 import bad_snils, lab_pid

    res = oru(oru_message(pid=lab_pid(pid_3=[(bad_snils("112233445"), "", "", "", "SNILS")])))
    assert problems(res.errors) == [("102", "PID-3(1).1")]
    assert "11223344" not in str(res.errors[0])


def test_missing_obx_3_is_an_error() -> None:
    res = oru(oru_message(obx={4: {3: ""}}))
    assert problems(res.errors) == [("101", "OBX[4]-3.1")]
    assert len(observations(res)) == 9


def test_obx_before_obr_is_an_error() -> None:
    raw = oru_message(extra_segments=[])
    text = raw.decode()
    first_obx = text.index("OBX|1|")
    obr_start = text.index("OBR|")
    moved = text[:obr_start] + text[first_obx : text.index("\r", first_obx) + 1] + text[obr_start:]
    res = oru(moved.encode())
    assert ("100", "OBX") in problems(res.errors)


def test_no_order_number_is_an_error() -> None:
    res = oru(oru_message(orc=False, obr={2: "", 3: ""}))
    assert problems(res.errors) == [("101", "OBR-3.1")]
    assert res.patients[0].reports == []


def test_no_obr_at_all_is_an_error() -> None:
    res = oru(oru_message(orc=False, obr={0: ""}, observations=[]).replace(b"OBR|", b"ZBR|"))
    assert ("100", "OBR") in problems(res.errors)


def test_impossible_dates_are_errors() -> None:
    res = oru(oru_message(obr={7: "20250231"}, obx={1: {14: "2025030125"}}))
    assert problems(res.errors) == [("102", "OBR-7.1"), ("102", "OBX-14.1")]


def test_header_problems_raise_for_ar() -> None:
    with pytest.raises(Hl7Problem) as info:
        oru(oru_message().replace(b"ORU^R01^ORU_R01", b"ADT^A01^ADT_A01"))
    assert (info.value.code, info.value.reject) == ("200", True)


def test_the_ack_carries_the_mapping_problems() -> None:
    res = oru(oru_message(obx={3: {5: "много"}, 4: {6: ("", "попугаев", "L")}}))
    ack = build_ack(res.header, res.ack_code, res.errors, res.warnings).decode()
    lines = ack.split("\r")
    assert lines[1] == "MSA|AE|MSG00001"
    assert lines[2].startswith("ERR||OBX^3^5^1|102^Data type error^HL70357|E|")
    assert lines[3].startswith("ERR||OBX^4^6^1^1|103^Table value not found^HL70357|W|")


# --- units -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "code"),
    [
        ("ммоль/л", "mmol/L"),
        ("г/л", "g/L"),
        ("мкмоль/л", "umol/L"),
        ("Ед/л", "U/L"),
        ("ЕД/Л", "U/L"),
        ("%", "%"),
        ("10^9/л", "10*9/L"),
        ("10*9/л", "10*9/L"),
        ("×10⁹/л", "10*9/L"),
        ("×10*12/л", "10*12/L"),
        ("x10^12/л", "10*12/L"),
        ("фл", "fL"),
        ("пг", "pg"),
        ("мм/ч", "mm/h"),
        ("мМЕ/л", "m[IU]/L"),
        ("мкг/л", "ug/L"),
        ("µmol/L", "umol/L"),
        ("10E9/L", "10*9/L"),
        ("парсеков", None),
        ("", None),
    ],
)
def test_ucum_table(unit: str, code: str | None) -> None:
    assert ucum_code(unit) == code


# --- multiple groups ---------------------------------------------------------------------------


def test_two_orders_and_a_second_patient() -> None:
    from tests.fixtures.hl7v2 import SNILS_2, lab_pid, obx_segments

    second_obr: dict[int, Any] = {
        1: "2",
        3: ("L-250301-0043", LAB_FACILITY),
        4: ("24323-8", "Биохимия", "LN"),
        7: "20250301083000",
        25: "F",
    }
    other = lab_pid(pid_3=[("7000999", "", "", (MO_NAMESPACE, "", ""), "MR"),
                           (SNILS_2, "", "", "", "SNILS")])  # fmt: skip
    extra = [
        ("OBR", second_obr),
        *obx_segments("biochem")[:2],
        ("PID", other),
        ("OBR", {**second_obr, 3: ("L-250301-0044", LAB_FACILITY)}),
        *obx_segments("biochem")[2:3],
    ]
    res = clean(oru_message(spm=None, extra_segments=extra))
    assert [len(p.reports) for p in res.patients] == [2, 1]
    assert [len(r.observations) for p in res.patients for r in p.reports] == [10, 2, 1]
    second = res.patients[1]
    assert second.patient.identifier == {"system": MO_SYSTEM, "value": "7000999"}
    assert second.reports[0].observations[0].resource["subject"] == {
        "reference": second.patient.full_url
    }
    assert second.patient.resource["identifier"][1]["system"] == SNILS_SYSTEM


# --- robustness --------------------------------------------------------------------------------

FIELD_TEXT = st.text(
    alphabet=st.sampled_from(list("|^~\\&<>=-+:/.,0123456789 XEFSTRH.br АяЁё\x00\t"))
    | st.characters(exclude_categories=("Cs",)),
    max_size=30,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([2, 3, 4, 5, 6, 7, 8, 11, 14, 15, 16, 23]),
    FIELD_TEXT,
    st.sampled_from(["NM", "SN", "CWE", "ST", "TX", "DT", "TM", "ZZ"]),
)
def test_fuzz_obx_fields(field_no: int, text: str, value_type: str) -> None:
    raw = oru_message(obx={1: {2: value_type, field_no: Raw(text)}})
    try:
        res = oru(raw)
    except Hl7Problem as problem:
        assert problem.reject and problem.code in ("100", "102"), problem
        return
    if not res.errors:
        for entry in res.entries():
            validate(entry.resource)
    assert all(not p.reject for p in res.errors + res.warnings)


def test_golden_dir_exists() -> None:
    assert Path(GOLDEN_DIR).is_dir()


VALID = [
    oru_message(),
    oru_message("biochem", version="2.3", charset="WINDOWS-1251"),
    (GOLDEN_DIR / "oru_r01_v251_critical.hl7").read_bytes(),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(VALID))
def test_fuzz_mutated_messages(data: bytes) -> None:
    try:
        res = oru(data)
    except Hl7Problem as problem:
        assert problem.code != "207", problem.__cause__
        return
    if not res.errors:
        for entry in res.entries():
            validate(entry.resource)
