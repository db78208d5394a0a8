"""Reference data, the parts without a store: version order, code system indexes and filters,
concept maps, operation parameters, the CSV and JSON readers and the shipped data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from hie.fhir import model
from hie.hub.errors import InvalidRequest
from hie.registries import terminology as t
from hie.registries.terminology import (
    CodeSystemIndex,
    ConceptMapIndex,
    LoadError,
    OpParams,
    check_resources,
    flag_unknown,
    read_csv,
    read_fhir_json,
    split_canonical,
    version_key,
)

ICD = "urn:oid:1.2.643.5.1.13.13.11.1005"
LOINC = "http://loinc.org"
HUB = "https://hie.spb.ru/fhir"


def nested_cs() -> dict[str, Any]:
    """A small hierarchy: nested concepts, a parent property and a child property mixed."""
    return {
        "resourceType": "CodeSystem",
        "url": "http://example.test/cs",
        "version": "1",
        "status": "active",
        "content": "complete",
        "caseSensitive": False,
        "concept": [
            {
                "code": "J00-J99",
                "display": "Болезни органов дыхания",
                "concept": [
                    {"code": "J18.9", "display": "Пневмония неуточненная"},
                    {
                        "code": "J45",
                        "display": "Астма",
                        "concept": [{"code": "J45.9", "display": "Астма неуточненная"}],
                    },
                ],
            },
            {
                "code": "J45.0",
                "display": "Астма с преобладанием аллергического компонента",
                "property": [{"code": "parent", "valueCode": "J45"}],
            },
            {
                "code": "OLD",
                "display": "Retired code",
                "property": [
                    {"code": "status", "valueCode": "retired"},
                    {"code": "child", "valueCode": "J18.9"},
                ],
            },
            {
                "code": "ABS",
                "display": "Abstract grouper",
                "property": [{"code": "notSelectable", "valueBoolean": True}],
            },
        ],
    }


# --- versions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("2.9", "2.10"),
        ("1", "1.1"),
        ("2023-12-31", "2024-03-01"),
        ("20230101", "20240101"),
        ("hie-2026.11", "2.24"),  # the hub's subsets sort below a publisher's numbered release
        ("", "0"),
        ("1.0.0", "1.0.1"),
        ("v1", "v2"),
    ],
)
def test_version_natural_order(older: str, newer: str) -> None:
    assert version_key(older or None) < version_key(newer)


def test_split_canonical() -> None:
    assert split_canonical("http://x|2") == ("http://x", "2")
    assert split_canonical("http://x") == ("http://x", None)
    assert split_canonical("http://x|2", "3") == ("http://x", "3")
    assert split_canonical("http://x|") == ("http://x", None)


# --- code system index ------------------------------------------------------------------------


def test_hierarchy_from_nesting_and_properties() -> None:
    cs = CodeSystemIndex(nested_cs())
    assert cs.get("J45.9") is not None and cs.get("j45.9") is not None  # not case-sensitive
    assert cs.concepts["J45.9"].parents == ["J45"]
    assert cs.concepts["J45.0"].parents == ["J45"]
    assert set(cs.concepts["J18.9"].parents) == {"J00-J99", "OLD"}
    assert cs.descendants("J00-J99") == ["J18.9", "J45", "J45.9", "J45.0"]
    assert cs.ancestors("J45.9") == ["J45", "J00-J99"]
    assert cs.concepts["OLD"].inactive and cs.concepts["ABS"].abstract
    sensitive = CodeSystemIndex({**nested_cs(), "caseSensitive": True})
    assert sensitive.get("j45.9") is None


def test_hierarchy_survives_cycles() -> None:
    cs = CodeSystemIndex(
        {
            "concept": [
                {"code": "A", "property": [{"code": "parent", "valueCode": "B"}]},
                {"code": "B", "property": [{"code": "parent", "valueCode": "A"}]},
            ]
        }
    )
    assert cs.descendants("A") == ["B"] and cs.ancestors("A") == ["B"]


@pytest.mark.parametrize(
    ("prop", "op", "value", "expected"),
    [
        ("concept", "is-a", "J45", ["J45", "J45.9", "J45.0"]),
        ("concept", "descendent-of", "J45", ["J45.9", "J45.0"]),
        ("concept", "is-a", "j45", ["J45", "J45.9", "J45.0"]),
        ("concept", "is-a", "NOPE", []),
        ("concept", "is-not-a", "J00-J99", ["OLD", "ABS"]),
        ("concept", "generalizes", "J45.9", ["J45.9", "J45", "J00-J99"]),
        ("concept", "=", "J18.9", ["J18.9"]),
        ("concept", "in", "J18.9,J45", ["J18.9", "J45"]),
        ("code", "regex", r"J45\..*", ["J45.9", "J45.0"]),
        ("parent", "=", "J45", ["J45.9", "J45.0"]),
        ("status", "=", "retired", ["OLD"]),
        ("status", "exists", "true", ["OLD"]),
        ("display", "regex", "Астма.*", ["J45", "J45.9", "J45.0"]),
        ("notSelectable", "in", "true", ["ABS"]),
    ],
)
def test_filters(prop: str, op: str, value: str, expected: list[str]) -> None:
    assert CodeSystemIndex(nested_cs()).filter(prop, op, value) == expected


def test_bad_filters_are_clear_errors() -> None:
    cs = CodeSystemIndex(nested_cs())
    with pytest.raises(InvalidRequest, match="regex"):
        cs.filter("code", "regex", "(")
    with pytest.raises(InvalidRequest, match="not supported"):
        cs.filter("concept", "sounds-like", "x")


def test_display_in_language() -> None:
    c = CodeSystemIndex(
        {
            "concept": [
                {
                    "code": "718-7",
                    "display": "Hemoglobin [Mass/volume] in Blood",
                    "designation": [{"language": "ru-RU", "value": "Гемоглобин"}],
                }
            ]
        }
    ).concepts["718-7"]
    assert c.display_in("ru") == "Гемоглобин"
    assert c.display_in("de") == c.display_in(None) == "Hemoglobin [Mass/volume] in Blood"


# --- concept maps ------------------------------------------------------------------------------


def test_concept_map_index_and_unmapped() -> None:
    cm = ConceptMapIndex(
        {
            "url": "http://example.test/cm",
            "group": [
                {
                    "source": "http://a",
                    "target": "http://b",
                    "element": [
                        {"code": "1", "target": [{"code": "x", "equivalence": "wider"}]},
                        {"code": "2", "target": [{"equivalence": "unmatched"}]},
                    ],
                    "unmapped": {"mode": "fixed", "code": "other", "display": "Other"},
                }
            ],
        }
    )
    assert [m.target_code for m in cm.forward[("http://a", "1")]] == ["x"]
    assert [m.source_code for m in cm.backward[("http://b", "x")]] == ["1"]
    assert cm.systems == ({"http://a"}, {"http://b"})
    one = list(t._mappings(cm, {"system": "http://a", "code": "1"}, False))
    assert one == [("http://b", "x", None, "wider")]
    back = list(t._mappings(cm, {"system": "http://b", "code": "x"}, True))
    assert back == [("http://a", "1", None, "narrower")]
    assert list(t._mappings(cm, {"system": "http://a", "code": "2"}, False)) == []
    fixed = list(t._mappings(cm, {"system": "http://a", "code": "9"}, False))
    assert fixed == [("http://b", "other", "Other", "inexact")]


# --- operation parameters ----------------------------------------------------------------------


def test_params_from_query_and_parameters() -> None:
    q = OpParams.from_query([("system", LOINC), ("code", "718-7"), ("_format", "json")])
    assert q.codings(system_key="system") == [{"system": LOINC, "code": "718-7", "display": None}]
    assert q.integer("count", 5) == 5 and q.flag("activeOnly", False) is False
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "coding", "valueCoding": {"system": LOINC, "code": "2951-2"}},
            {"name": "count", "valueInteger": 3},
            {"name": "activeOnly", "valueBoolean": True},
            {"name": "valueSet", "resource": {"resourceType": "ValueSet"}},
            {
                "name": "codeableConcept",
                "valueCodeableConcept": {"coding": [{"system": ICD, "code": "I10"}]},
            },
        ],
    }
    p = OpParams.from_parameters(body, [("filter", "натр")])
    assert p.text("filter") == "натр" and p.integer("count", None) == 3
    assert p.flag("activeOnly", False) is True
    assert p.resource("valueSet") == {"resourceType": "ValueSet"}
    assert [c["code"] for c in p.codings(system_key="system")] == ["2951-2", "I10"]
    assert OpParams.from_query([("coding", f"{LOINC}|718-7")]).codings(system_key="system") == [
        {"system": LOINC, "code": "718-7"}
    ]


@pytest.mark.parametrize(
    ("items", "call"),
    [
        ([("count", "-1")], lambda p: p.integer("count", None)),
        ([("count", "ten")], lambda p: p.integer("count", None)),
        ([("activeOnly", "yes")], lambda p: p.flag("activeOnly", False)),
    ],
)
def test_params_reject_bad_values(items: list[tuple[str, str]], call: Any) -> None:
    with pytest.raises(InvalidRequest):
        call(OpParams.from_query(items))


def test_params_body_must_be_parameters() -> None:
    with pytest.raises(InvalidRequest, match="Parameters"):
        OpParams.from_parameters({"resourceType": "Patient"})
    with pytest.raises(InvalidRequest, match="name"):
        OpParams.from_parameters(
            {"resourceType": "Parameters", "parameter": [{"valueString": "x"}]}
        )


# --- the text filter ------------------------------------------------------------------------------


def test_text_filter_russian_case_and_yo() -> None:
    items = [
        t.Item(ICD, None, "J18.9", "Пневмония неуточненная"),
        t.Item(ICD, None, "J20.9", "Острый бронхит неуточненный"),
        t.Item(ICD, None, "E11.9", "Инсулиннезависимый сахарный диабет без осложнений"),
        t.Item(
            LOINC,
            None,
            "30341-2",
            "Erythrocyte sedimentation rate",
            designations=({"value": "СОЭ"},),
        ),
        t.Item(HUB, None, "x", "Ёлка зелёная"),
    ]
    exp = t.Expansion(items, [])
    order = list(range(len(items)))
    codes = lambda text: [items[i].code for i in t._text_match(exp, order, text)]  # noqa: E731
    assert codes("пневм") == ["J18.9"]
    assert codes("ПНЕВМ") == ["J18.9"]
    assert codes("неуточн") == ["J18.9", "J20.9"]
    assert codes("сахарный без") == ["E11.9"]
    assert codes("соэ") == ["30341-2"]
    assert codes("елка") == ["x"]  # ё = е
    assert codes("j18") == ["J18.9"]


# --- CSV --------------------------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_csv_with_header_hierarchy_and_designations(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "mkb.csv",
        "\ufeffcode,display,parent,designation_ru,designation_en\n"
        "J00-J99,Болезни органов дыхания,,Класс X,Diseases of the respiratory system\n"
        'J18.9,"Пневмония, неуточненная",J00-J99,,Pneumonia\n',
    )
    res = read_csv(p, system=ICD, name="MKB10", version="2.24")
    model.validate(res)
    assert res["url"] == ICD and res["version"] == "2.24" and res["count"] == 2
    assert res["hierarchyMeaning"] == "is-a"
    j18 = res["concept"][1]
    assert j18["display"] == "Пневмония, неуточненная"
    assert j18["property"] == [{"code": "parent", "valueCode": "J00-J99"}]
    assert j18["designation"] == [{"language": "en", "value": "Pneumonia"}]
    cs = CodeSystemIndex(res)
    assert cs.descendants("J00-J99") == ["J18.9"]


def test_csv_without_header_and_semicolons(tmp_path: Path) -> None:
    p = write(tmp_path, "x.csv", "A;Альфа\nB;Бета;A;Бета по-русски\n")
    res = read_csv(p, system="http://x.test", name="X")
    assert [c["code"] for c in res["concept"]] == ["A", "B"]
    assert res["concept"][1]["designation"] == [{"language": "ru", "value": "Бета по-русски"}]


def test_csv_reports_every_bad_row_with_its_line(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "bad.csv",
        "code,display,parent\n"
        "A,Alpha,\n"
        ",No code,\n"
        "C,,\n"
        "A,Again,\n"
        "D,Delta,Z\n"
        "E,Eps,F\n"
        "F,Phi,E\n"
        "G,Gamma,A,extra\n",
    )
    with pytest.raises(LoadError) as err:
        read_csv(p, system="http://x.test", name="X")
    got = [(pr.where, pr.message) for pr in err.value.problems]
    assert ("3", "the code is empty") in got
    assert ("4", "code 'C' has no display") in got
    assert ("5", "code 'A' repeats line 2") in got
    assert ("6", "parent 'Z' of 'D' is not in the file") in got
    assert ("7", "code 'E' is its own ancestor") in got
    assert ("9", "4 columns, expected at most 3") in got
    assert str(err.value.problems[0]).startswith(f"{p}:3: ")


def test_csv_needs_system_name_and_known_columns(tmp_path: Path) -> None:
    p = write(tmp_path, "x.csv", "code,display\nA,Alpha\n")
    with pytest.raises(LoadError) as err:
        read_csv(p, system="not a uri", name="")
    assert len(err.value.problems) == 2
    bad = write(tmp_path, "y.csv", "code,name\nA,Alpha\n")
    with pytest.raises(LoadError, match="header"):
        read_csv(bad, system="http://x.test", name="X")
    empty = write(tmp_path, "z.csv", "code,display\n")
    with pytest.raises(LoadError, match="no codes"):
        read_csv(empty, system="http://x.test", name="X")


# --- FHIR JSON and validation -------------------------------------------------------------------


def test_json_bundle_rejects_other_types_and_broken_json(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "b.json",
        '{"resourceType": "Bundle", "type": "collection", "entry": ['
        '{"resource": {"resourceType": "ValueSet", "url": "http://x.test/vs", "status": "active"}},'
        '{"resource": {"resourceType": "Patient"}}]}',
    )
    with pytest.raises(LoadError) as err:
        read_fhir_json(p)
    assert [(pr.where, "Patient" in pr.message) for pr in err.value.problems] == [
        ("entry[1]", True)
    ]
    broken = write(tmp_path, "c.json", '{\n"resourceType": \n')
    with pytest.raises(LoadError, match="not valid JSON"):
        read_fhir_json(broken)


def test_check_resources_reports_invariants_and_model_errors() -> None:
    bad_cs = {
        "resourceType": "CodeSystem",
        "id": "bad id!",
        "status": "active",
        "content": "complete",
        "concept": [{"code": "A"}, {"code": "B", "concept": [{"code": "A"}]}],
    }
    bad_vs = {
        "resourceType": "ValueSet",
        "url": "http://x.test/vs",
        "status": "active",
        "compose": {"include": [{"concept": [{"code": "A"}]}]},
    }
    bad_model = {"resourceType": "ConceptMap", "url": "http://x.test/cm", "status": 5}
    with pytest.raises(LoadError) as err:
        check_resources([bad_cs, bad_vs, bad_model], "f.json")
    messages = " | ".join(str(p) for p in err.value.problems)
    assert "not a valid id" in messages and "url" in messages and "csd-1" in messages
    assert "vsd-1" in messages and "vsd-2" in messages
    assert "ConceptMap.status" in messages


# --- the shipped data ---------------------------------------------------------------------------


def test_builtin_data_is_valid_fhir() -> None:
    resources = t.builtin_resources()
    check_resources(resources, "builtin")
    kinds = {r["resourceType"] for r in resources}
    assert kinds == {"CodeSystem", "ValueSet", "ConceptMap"}
    ids = [(r["resourceType"], r["id"]) for r in resources]
    assert len(ids) == len(set(ids))


def _builtin(url: str) -> CodeSystemIndex:
    found = [
        r for r in t.builtin_resources() if r["resourceType"] == "CodeSystem" and r["url"] == url
    ]
    assert len(found) == 1, url
    return CodeSystemIndex(found[0])


def test_builtin_icd10_has_22_chapters_and_every_demo_code() -> None:
    from hie.demo.clinical import DIAGNOSES

    icd = _builtin(ICD)
    chapters = [c for c in icd.concepts.values() if not c.parents]
    assert len(chapters) == 22
    assert icd.concepts["J00-J99"].display == "Болезни органов дыхания"
    for dx in DIAGNOSES:
        concept = icd.get(dx.code)
        assert concept is not None and concept.display == dx.display, dx.code
        (chapter,) = concept.parents
        lo, hi = chapter.split("-")
        assert lo <= dx.code[:3] <= hi, (dx.code, chapter)
    assert not icd.complete  # a fragment: a full МКБ-10 load wins as "latest"


def test_builtin_loinc_has_demo_lab_tests_with_russian_names() -> None:
    from hie.demo.clinical import LAB_PANELS, LAB_TESTS

    loinc = _builtin(LOINC)
    for test in LAB_TESTS:
        c = loinc.get(test.loinc)
        assert c is not None and c.display == test.display
        assert c.display_in("ru") == test.text
    for code, _display, text, _members in LAB_PANELS.values():
        if code:
            assert loinc.get(code) is not None and loinc.concepts[code].display_in("ru") == text
    for doc in ("18842-5", "11488-4", "34133-9", "57133-1", "18748-4", "11502-2", "60591-5"):
        assert loinc.get(doc) is not None, doc


def test_builtin_hub_code_systems_cover_the_codes_the_hub_uses() -> None:
    from hie.demo import city, clinical

    expected = {
        clinical.LAB_PANEL_SYSTEM: set(clinical.LAB_PANELS),
        clinical.VACCINE_SYSTEM: {v.code for v in clinical.VACCINES},
        clinical.ALLERGEN_SYSTEM: set(clinical.ALLERGENS),
        clinical.ENCOUNTER_TYPE_SYSTEM: set(clinical.ENCOUNTER_KINDS),
        city.MO_KIND_SYSTEM: set(city.MO_KIND_DISPLAY),
        city.HIE_ENDPOINT_CONNECTION_TYPE_SYSTEM: {"dicom-dimse"},
        f"{HUB}/CodeSystem/error": {"HIE-1001", "HIE-1003", "HIE-1500"},
    }
    for url, codes in expected.items():
        assert codes <= set(_builtin(url).concepts), url
    value_sets = {r["url"] for r in t.builtin_resources() if r["resourceType"] == "ValueSet"}
    for url in expected:
        slug = url.rsplit("/", 1)[1]
        assert f"{HUB}/ValueSet/hie-{slug}" in value_sets


# --- the unknown-code counter ---------------------------------------------------------------------


def _count(system: str) -> float:
    return REGISTRY.get_sample_value("hie_unknown_codes_total", {"system": system}) or 0.0


def test_flag_unknown_counts_by_system_with_a_bounded_label_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = _count("http://unit.test/cs")
    flag_unknown("http://unit.test/cs")
    flag_unknown("http://unit.test/cs")
    assert _count("http://unit.test/cs") == before + 2
    none_before = _count("(none)")
    flag_unknown(None)
    assert _count("(none)") == none_before + 1
    monkeypatch.setattr(t, "_system_labels", {f"s{i}" for i in range(t._MAX_SYSTEM_LABELS)})
    other = _count("(other)")
    flag_unknown("http://one-too-many.test")
    assert _count("(other)") == other + 1
    assert _count("http://one-too-many.test") == 0


def test_operations_for_the_capability_statement() -> None:
    ops = t.terminology_operations()
    assert [o["name"] for o in ops["CodeSystem"]] == ["lookup", "validate-code"]
    assert [o["name"] for o in ops["ValueSet"]] == ["expand", "validate-code"]
    assert ops["ConceptMap"] == [
        {
            "name": "translate",
            "definition": "http://hl7.org/fhir/OperationDefinition/ConceptMap-translate",
        }
    ]
