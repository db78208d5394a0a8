"""Generator(seed): patients, observations, records, bundles, determinism and variants."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from datetime import date, datetime
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from hie.demo import (
    MOS_BY_ID,
    REFERENCE_DATE,
    Generator,
    as_transaction,
    swap_day_month,
    transliterate_variant,
    typo_variant,
)
from hie.demo.clinical import ICD10_SYSTEM, LAB_TESTS, LAB_TESTS_BY_LOINC, interpret
from hie.demo.identifiers import OMS_SYSTEM, SNILS_SYSTEM, oms_is_valid, snils_is_valid

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def _validate(res: dict[str, Any]) -> None:
    get_fhir_model_class(res["resourceType"]).model_validate(res)


def _dump(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=False).encode()


def _session(seed: int) -> bytes:
    """A fixed sequence of calls touching every public method."""
    g = Generator(seed)
    out: list[object] = [
        list(g.patients(20)),
        g.patient(mo="mo-0003"),
        list(g.observations("Patient/p1", 50)),
        g.patient_record("Patient/p1", 120, birth_date="1960-05-04"),
        g.observation_bundle(["Patient/p1", "Patient/p2"], 30),
        g.transaction_with_patient(10),
        g.patient_with_record(40),
        g.assign_id(g.patient()),
    ]
    city = g.city()
    out.append([*city.resources()])
    rng = random.Random(seed)
    out.append([typo_variant(p, rng) for p in g.patients(10)])
    return _dump(out)


def test_same_seed_gives_byte_identical_output() -> None:
    assert _session(2024) == _session(2024)


def test_different_seeds_differ() -> None:
    assert _session(1) != _session(2)


def test_patient_shape_and_identifiers() -> None:
    g = Generator(11)
    for p in g.patients(300):
        assert "id" not in p
        name = p["name"][0]
        family, (given, patronymic) = name["family"], name["given"]
        assert name["text"] == f"{family} {given} {patronymic}"
        if p["gender"] == "female":
            assert patronymic.endswith(("вна", "чна"))
        else:
            assert patronymic.endswith(("вич", "ич"))
            assert not family.endswith(("ова", "ева", "ина", "ская"))
        born = date.fromisoformat(p["birthDate"])
        assert date(1930, 1, 1) <= born < REFERENCE_DATE
        systems = {i["system"]: i["value"] for i in p["identifier"]}
        assert oms_is_valid(systems[OMS_SYSTEM])
        if SNILS_SYSTEM in systems:
            assert re.fullmatch(r"\d{3}-\d{3}-\d{3} \d{2}", systems[SNILS_SYSTEM])
            assert snils_is_valid(systems[SNILS_SYSTEM])
        mrn = [i for i in p["identifier"] if i["type"].get("coding", [{}])[0].get("code") == "MR"]
        assert len(mrn) == 1 and mrn[0]["system"].startswith("urn:oid:1.2.643.5.1.13.13.12.2.78.")
        addr = p["address"][0]
        assert re.fullmatch(r"19\d{4}", addr["postalCode"]) and addr["district"].endswith("район")
        assert re.fullmatch(r"\+79\d{9}", p["telecom"][0]["value"])


def test_patient_population_looks_like_a_city() -> None:
    patients = list(Generator(5).patients(2000))
    genders = Counter(p["gender"] for p in patients)
    assert 0.45 < genders["female"] / len(patients) < 0.65
    years = [int(p["birthDate"][:4]) for p in patients]
    assert min(years) < 1945 and max(years) >= 2020
    assert len({p["name"][0]["family"] for p in patients}) > 250
    snils = [i["value"] for p in patients for i in p["identifier"] if i["system"] == SNILS_SYSTEM]
    assert len(set(snils)) == len(snils) > 1900


def test_patient_mrn_of_given_mo() -> None:
    mo = MOS_BY_ID["mo-0005"]
    p = Generator(1).patient(mo="mo-0005")
    assert any(i["system"] == mo.mrn_system for i in p["identifier"])


def test_observations_are_realistic() -> None:
    obs = list(Generator(3).observations("Patient/x", 5000))
    codes = Counter(o["interpretation"][0]["coding"][0]["code"] for o in obs)
    assert codes["N"] > 0.7 * len(obs)
    assert codes["H"] + codes["L"] > 0.05 * len(obs)
    assert codes["HH"] + codes["LL"] > 0
    assert len({o["code"]["coding"][0]["code"] for o in obs}) == len(LAB_TESTS) >= 25
    for o in obs[:500]:
        assert o["subject"] == {"reference": "Patient/x"}
        test = LAB_TESTS_BY_LOINC[o["code"]["coding"][0]["code"]]
        value = o["valueQuantity"]["value"]
        assert value > 0
        assert o["valueQuantity"]["code"] == test.ucum
        assert o["interpretation"][0]["coding"][0]["code"] == interpret(test, value)
        when = datetime.fromisoformat(o["effectiveDateTime"])
        assert when.utcoffset() is not None and when.date() <= REFERENCE_DATE
        assert REFERENCE_DATE.year - when.year <= 5


def test_haemoglobin_and_glucose_codes() -> None:
    hb = Generator(1).observation("Patient/x", loinc="718-7")
    assert hb["valueQuantity"]["code"] == "g/L" and 40 < hb["valueQuantity"]["value"] < 300
    glu = Generator(1).observation("Patient/x", loinc="14749-6")
    assert glu["valueQuantity"]["code"] == "mmol/L"


def test_observation_bundle() -> None:
    bundle = Generator(9).observation_bundle(["Patient/a", "Patient/b", "Patient/c"], 60)
    _validate(bundle)
    assert bundle["type"] == "transaction" and len(bundle["entry"]) == 60
    urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(urls)) == 60
    assert all(u.startswith("urn:uuid:") and UUID_RE.fullmatch(u[9:]) for u in urls)
    assert all(e["request"] == {"method": "POST", "url": "Observation"} for e in bundle["entry"])
    subjects = Counter(e["resource"]["subject"]["reference"] for e in bundle["entry"])
    assert subjects == {"Patient/a": 20, "Patient/b": 20, "Patient/c": 20}


def test_observation_bundle_needs_a_patient() -> None:
    with pytest.raises(ValueError):
        Generator(1).observation_bundle([], 3)


def test_transaction_with_patient() -> None:
    bundle = Generator(4).transaction_with_patient(25)
    _validate(bundle)
    first, *rest = bundle["entry"]
    assert first["resource"]["resourceType"] == "Patient"
    assert first["request"] == {"method": "POST", "url": "Patient"}
    assert first["fullUrl"].startswith("urn:uuid:")
    assert len(rest) == 25
    assert all(e["resource"]["subject"]["reference"] == first["fullUrl"] for e in rest)


def test_patient_record_mix_and_references() -> None:
    g = Generator(12)
    record = g.patient_record("Patient/abc", 500, birth_date="1950-03-10")
    assert len(record) == 500
    kinds = Counter(r["resourceType"] for r in record)
    for kind in ("Encounter", "Condition", "Observation", "DiagnosticReport", "MedicationRequest"):
        assert kinds[kind] > 0, kind
    assert kinds["Observation"] > kinds["Encounter"]
    ids = [f"{r['resourceType']}/{r['id']}" for r in record]
    assert len(set(ids)) == len(ids)
    seen: set[str] = set()
    for res, rid in zip(record, ids, strict=True):
        for ref in _references(res):
            assert ref == "Patient/abc" or ref in seen, f"{rid} → {ref}"
        seen.add(rid)
    for cond in (r for r in record if r["resourceType"] == "Condition"):
        assert cond["code"]["coding"][0]["system"] == ICD10_SYSTEM


def test_patient_record_respects_birth_date() -> None:
    g = Generator(8)
    record = g.patient_record("Patient/baby", 300, birth_date="2025-01-15")
    for res in record:
        for key in ("effectiveDateTime", "onsetDateTime", "occurrenceDateTime", "authoredOn"):
            if key in res:
                assert res[key][:10] >= "2025-01-15", (res["resourceType"], res[key])
    assert not any(
        r["resourceType"] == "Condition" and r["code"]["coding"][0]["code"] == "I10" for r in record
    )


def test_patient_record_sizes() -> None:
    g = Generator(2)
    assert g.patient_record("Patient/x", 0) == []
    assert len(g.patient_record("Patient/x", 1)) == 1
    assert len(g.patient_record("Patient/x", 37)) == 37


def test_patient_with_record_and_as_transaction() -> None:
    resources = Generator(6).patient_with_record(60)
    patient, *record = resources
    assert patient["resourceType"] == "Patient" and UUID_RE.fullmatch(patient["id"])
    assert len(record) == 59
    assert all(
        r.get("subject", r.get("patient")) == {"reference": f"Patient/{patient['id']}"}
        for r in record
    )
    bundle = as_transaction(resources)
    _validate(bundle)
    assert bundle["entry"][0]["request"] == {"method": "PUT", "url": f"Patient/{patient['id']}"}
    with pytest.raises(ValueError):
        as_transaction([Generator(1).patient()])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_resource_type_is_valid_fhir_r4(seed: int) -> None:
    g = Generator(seed)
    sample: dict[str, list[dict[str, Any]]] = {}
    resources = [*g.patients(30)]
    for _ in range(5):
        resources += g.patient_with_record(150)
    resources += list(g.observations("Patient/x", 100))
    for res in resources:
        sample.setdefault(res["resourceType"], []).append(res)
    expected = {
        "Patient",
        "Encounter",
        "Condition",
        "Observation",
        "DiagnosticReport",
        "MedicationRequest",
    }
    assert expected <= set(sample)
    for items in sample.values():
        for res in items[:: max(1, len(items) // 40)]:
            _validate(res)


def test_immunizations_and_allergies_are_valid() -> None:
    g = Generator(21)
    found: dict[str, list[dict[str, Any]]] = {"Immunization": [], "AllergyIntolerance": []}
    for _ in range(40):
        for res in g.patient_with_record(80):
            if res["resourceType"] in found:
                found[res["resourceType"]].append(res)
    assert found["Immunization"] and found["AllergyIntolerance"]
    for items in found.values():
        for res in items[:30]:
            _validate(res)


def test_vital_signs_are_valid() -> None:
    record = Generator(31).patient_record("Patient/v", 400, birth_date="1970-01-01")
    vitals = [
        r
        for r in record
        if r.get("category", [{}])[0].get("coding", [{}])[0].get("code") == "vital-signs"
    ]
    assert {v["code"]["coding"][0]["code"] for v in vitals} >= {"85354-9", "8867-4", "29463-7"}
    for v in vitals[:20]:
        _validate(v)


# --- variants ---------------------------------------------------------------------------


def test_typo_variant_changes_one_name_part() -> None:
    g = Generator(13)
    rng = random.Random(13)
    labels: Counter[str] = Counter()
    for p in g.patients(300):
        before = json.dumps(p, ensure_ascii=False)
        variant, label = typo_variant(p, rng)
        assert json.dumps(p, ensure_ascii=False) == before  # input untouched
        labels[label.split(":")[2]] += 1
        old, new = p["name"][0], variant["name"][0]
        parts_old = [old["family"], *old["given"]]
        parts_new = [new["family"], *new["given"]]
        changed = [i for i in range(3) if parts_old[i] != parts_new[i]]
        assert len(changed) == 1
        assert label.split(":")[1] == ("family", "given", "patronymic")[changed[0]]
        assert new["text"] == " ".join(parts_new)
        assert variant["identifier"] == p["identifier"]
    assert set(labels) == {"transpose", "delete", "duplicate", "keyboard", "phonetic"}


def test_transliterate_variant() -> None:
    p = Generator(1).patient()
    p["name"][0].update(family="Щукина", given=["Юлия", "Петровна"], text="Щукина Юлия Петровна")
    variant, label = transliterate_variant(p)
    assert label == "translit:icao"
    assert variant["name"][0]["family"] == "Shchukina"
    assert variant["name"][0]["given"] == ["Iuliia", "Petrovna"]
    assert variant["name"][0]["text"] == "Shchukina Iuliia Petrovna"
    assert p["name"][0]["family"] == "Щукина"


def test_swap_day_month() -> None:
    p = Generator(1).patient()
    p["birthDate"] = "1980-03-07"
    variant, label = swap_day_month(p)
    assert (variant["birthDate"], label) == ("1980-07-03", "dob:swap-day-month")
    assert p["birthDate"] == "1980-03-07"
    for unchanged in ("1980-03-25", "1980-05-05"):
        p["birthDate"] = unchanged
        variant, label = swap_day_month(p)
        assert (variant["birthDate"], label) == (unchanged, "dob:unchanged")


def _references(obj: object) -> list[str]:
    found: list[str] = []
    if isinstance(obj, dict):
        ref = obj.get("reference")
        if isinstance(ref, str):
            found.append(ref)
        for value in obj.values():
            found += _references(value)
    elif isinstance(obj, list):
        for item in obj:
            found += _references(item)
    return found
