"""Scoring, decisions and their explanations (hie.registries.mpi.scoring)."""

from __future__ import annotations

import copy
import random
from datetime import date
from typing import Any

import pytest

from hie.demo import Generator, swap_day_month, transliterate_variant, typo_variant
from hie.registries.identifiers import OMS_SYSTEM, PASSPORT_SYSTEM, SNILS_SYSTEM
from hie.registries.mpi import (
    DEFAULT_THRESHOLDS,
    WEIGHTS,
    MatchScore,
    PersonFeatures,
    Thresholds,
    best_match,
    decide,
    person_features,
    score,
)

TODAY = date(2025, 11, 1)
MRN_A = "urn:oid:1.2.643.5.1.13.13.12.2.78.8111.100"
MRN_B = "urn:oid:1.2.643.5.1.13.13.12.2.78.8122.100"


def patient(
    family: str = "Иванова",
    given: str = "Анна",
    middle: str | None = "Сергеевна",
    birth: str | None = "1985-03-07",
    gender: str | None = "female",
    snils: str | None = None,
    oms: str | None = None,
    passport: str | None = None,
    phone: str | None = "+79211234567",
    street: str | None = "ул. Декабристов, д. 5, кв. 10",
    mrn: tuple[str, str] | None = None,
) -> dict[str, Any]:
    idents: list[dict[str, str]] = []
    if snils:
        idents.append({"system": SNILS_SYSTEM, "value": snils})
    if oms:
        idents.append({"system": OMS_SYSTEM, "value": oms})
    if passport:
        idents.append({"system": PASSPORT_SYSTEM, "value": passport})
    if mrn:
        idents.append({"system": mrn[0], "value": mrn[1]})
    p: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": idents,
        "name": [{"family": family, "given": [given] + ([middle] if middle else [])}],
    }
    if birth:
        p["birthDate"] = birth
    if gender:
        p["gender"] = gender
    if phone:
        p["telecom"] = [{"system": "phone", "value": phone}]
    if street:
        p["address"] = [{"use": "home", "line": [street], "postalCode": "190121"}]
    return p


def feats(p: dict[str, Any]) -> PersonFeatures:
    return person_features(p, today=TODAY)


def match(a: dict[str, Any], b: dict[str, Any]) -> MatchScore:
    return score(feats(a), feats(b))


# --- explainability ----------------------------------------------------------------------


def test_details_sum_to_the_score_and_name_the_levels() -> None:
    m = match(patient(), patient(birth="1985-07-03", given="Анан"))
    assert m.score == pytest.approx(sum(m.details.values()))
    assert m.details["birth-date:swapped-day-month"] == WEIGHTS["birth-date:swapped-day-month"]
    assert m.details["given:close"] == WEIGHTS["given:close"]
    assert "family:exact" in m.details and "phone:same" in m.details
    text = m.explain()
    assert text.splitlines()[0].startswith(m.rule)
    assert "birth-date:swapped-day-month" in text
    assert m.as_dict() == {"score": m.score, "rule": m.rule, "details": m.details}


@pytest.mark.parametrize("seed", range(3))
def test_details_always_sum_to_the_score(seed: int) -> None:
    gen = Generator(seed)
    people = [feats(p) for p in gen.patients(60)]
    for a in people[:30]:
        for b in people[30:]:
            m = score(a, b)
            assert m.score == pytest.approx(sum(m.details.values()))
            assert all(key in WEIGHTS for key in m.details)


def test_missing_fields_contribute_nothing() -> None:
    m = match(patient(phone=None, street=None, gender=None), patient())
    assert not any(k.startswith(("phone", "address", "gender")) for k in m.details)


# --- the deterministic rule --------------------------------------------------------------


def test_same_snils_is_a_certain_match() -> None:
    a = patient(snils="112-233-445 95")
    b = patient(snils="11223344595", family="Петрова", phone=None, street=None)  # married
    m = match(a, b)
    assert m.rule == "national-id"
    assert decide(m) == "auto-link"
    assert m.details["snils:same"] == WEIGHTS["snils:same"]


@pytest.mark.parametrize(
    ("system_kw", "value"), [("oms", "4111111111111111"), ("passport", "4012 345678")]
)
def test_same_oms_or_passport_is_a_certain_match(system_kw: str, value: str) -> None:
    a = patient(**{system_kw: value})
    b = patient(**{system_kw: value}, birth="1985-07-03")
    assert decide(match(a, b)) == "auto-link"
    assert match(a, b).rule == "national-id"


def test_same_policy_on_a_newborn_record_is_contradicted() -> None:
    # A newborn is treated on the mother's OMS policy until its own is issued.
    mother = patient(oms="4111111111111111")
    baby = patient(oms="4111111111111111", given="Мария", middle=None, birth="2025-10-20")
    m = match(mother, baby)
    assert m.rule == "national-id-contradicted"
    assert decide(m) == "review"


def test_twin_snils_typed_on_the_other_twin_is_contradicted() -> None:
    a = patient(snils="112-233-445 95", given="Анна")
    b = patient(snils="112-233-445 95", given="Ольга")
    assert match(a, b).rule == "national-id-contradicted"
    assert decide(match(a, b)) == "review"


def test_same_snils_with_a_wrong_birth_date_but_same_names_links() -> None:
    a = patient(snils="112-233-445 95")
    b = patient(snils="112-233-445 95", birth="1958-11-21")
    assert match(a, b).rule == "national-id"


def test_conflicting_snils_is_a_strong_non_match() -> None:
    # Same name and birth date, different valid SNILS: two people.
    a = patient(snils="112-233-445 95", phone=None, street=None)
    b = patient(snils="123-456-789 64", phone="+79990000000", street="пр. Науки, д. 1")
    m = match(a, b)
    assert m.rule == "national-id-conflict"
    assert m.details["snils:different"] == WEIGHTS["snils:different"]
    assert decide(m) == "new"


def test_conflicting_snils_never_auto_links_even_when_all_else_agrees() -> None:
    a = patient(snils="112-233-445 95")
    b = patient(snils="123-456-789 64")
    m = match(a, b)
    assert m.rule == "national-id-conflict"
    assert decide(m, Thresholds(auto=0.0, review=0.0)) == "review"


def test_conflicting_oms_without_other_ids_is_a_conflict() -> None:
    a = patient(oms="4111111111111111")
    b = patient(oms="7800000000000006"[:15] + "0")
    fb = feats(b)
    if OMS_SYSTEM not in fb.national:  # make a valid second number
        from hie.registries.identifiers import oms_check_digit

        first = "780000000000000"
        b = patient(oms=first + oms_check_digit(first))
    m = match(a, b)
    assert m.rule == "national-id-conflict"
    assert decide(m) != "auto-link"


def test_different_passports_are_only_weak_evidence() -> None:
    a = patient(passport="4012 345678")
    b = patient(passport="4020 111111")
    m = match(a, b)
    assert m.rule == "probabilistic"
    assert m.details["passport:different"] == WEIGHTS["passport:different"]
    assert decide(m) == "auto-link"


def test_local_ids_count_within_one_system_only() -> None:
    same = match(patient(mrn=(MRN_A, "1")), patient(mrn=(MRN_A, "1")))
    assert same.details["local-id:same"] == WEIGHTS["local-id:same"]
    other = match(patient(mrn=(MRN_A, "1")), patient(mrn=(MRN_A, "2")))
    assert other.details["local-id:different"] == WEIGHTS["local-id:different"]
    unrelated = match(patient(mrn=(MRN_A, "1")), patient(mrn=(MRN_B, "2")))
    assert not any(k.startswith("local-id") for k in unrelated.details)


# --- probabilistic -----------------------------------------------------------------------


def test_exact_copy_without_ids_auto_links() -> None:
    m = match(patient(), patient())
    assert m.rule == "probabilistic"
    assert m.score >= DEFAULT_THRESHOLDS.auto
    assert decide(m) == "auto-link"


def test_swapped_day_and_month() -> None:
    m = match(patient(), patient(birth="1985-07-03"))
    assert "birth-date:swapped-day-month" in m.details
    assert decide(m) == "auto-link"


@pytest.mark.parametrize(
    ("other", "level"),
    [("1985-03-08", "one-digit"), ("1958-03-07", "one-digit"), ("1985-05-21", "year")],
)
def test_birth_date_levels(other: str, level: str) -> None:
    m = match(patient(), patient(birth=other))
    assert f"birth-date:{level}" in m.details


def test_partial_birth_date_matches_on_year_but_never_auto_links() -> None:
    m = match(patient(), patient(birth="1985"))
    assert "birth-date:year" in m.details
    assert m.rule == "missing-birth-date"
    assert decide(m) != "auto-link"
    m = match(patient(), patient(birth=None))
    assert m.rule == "missing-birth-date" and decide(m) != "auto-link"


@pytest.mark.parametrize(
    "variant",
    [
        {"family": "Ивнаова"},  # transposition
        {"family": "Иванва"},  # deletion
        {"given": "Аана"},  # keyboard-ish
        {"middle": "Сергевна"},
        {"family": "Иваннова"},  # duplicate
    ],
)
def test_one_typo_is_tolerated(variant: dict[str, str]) -> None:
    m = match(patient(), patient(**variant))
    assert not any(k.endswith(":different") for k in m.details), m.explain()
    assert decide(m) == "auto-link", m.explain()


@pytest.mark.parametrize("scheme", ["icao", "gost"])
def test_transliterated_record_matches(scheme: str) -> None:
    from hie.registries.translit import transliterate

    latin = patient(
        family=transliterate("Иванова", scheme),  # type: ignore[arg-type]
        given=transliterate("Анна", scheme),  # type: ignore[arg-type]
        middle=transliterate("Сергеевна", scheme),  # type: ignore[arg-type]
    )
    m = match(patient(), latin)
    assert {"family:exact", "given:exact", "middle:exact"} <= set(m.details)
    assert decide(m) == "auto-link"


def test_informal_romanisation_matches() -> None:
    a = patient(family="Соловьёв", given="Юрий", middle="Александрович", gender="male")
    b = patient(family="Solovyov", given="Yuriy", middle="Alexandrovich", gender="male")
    m = match(a, b)
    assert {"family:exact", "given:exact", "middle:exact"} <= set(m.details)


def test_namesake_with_another_birth_date_is_not_auto_linked() -> None:
    m = match(patient(), patient(birth="1990-11-21", phone=None, street=None))
    assert m.rule == "core-conflict"
    assert "birth-date:different" in m.details
    assert decide(m) == "new"


def test_namesake_at_the_same_address_is_not_auto_linked() -> None:
    # Same name, same flat and phone, another generation: never linked automatically.
    m = match(patient(), patient(birth="1960-11-21"))
    assert decide(m) != "auto-link"
    assert decide(m, Thresholds(auto=-100.0, review=100.0)) == "new"


def test_twins_are_not_auto_linked() -> None:
    a = patient(given="Анна")
    for other in ("Ольга", "Алла", "Инна", "Анастасия", "А."):
        m = match(a, patient(given=other))
        assert decide(m) != "auto-link", (other, m.explain())


def test_gender_conflict_is_not_auto_linked() -> None:
    m = match(patient(), patient(gender="male"))
    assert m.rule == "core-conflict" and decide(m) != "auto-link"


def test_marriage_goes_to_review() -> None:
    m = match(patient(), patient(family="Петрова"))
    assert m.rule == "core-conflict"
    assert decide(m) == "review"


def test_initials_agree_weakly() -> None:
    m = match(patient(), patient(given="А.", middle="С."))
    assert "given:initial" in m.details and "middle:initial" in m.details
    assert decide(m) != "auto-link"


def test_nothing_in_common_is_new() -> None:
    other = patient(
        family="Кузнецов", given="Пётр", middle="Ильич", birth="1940-01-02", gender="male",
        phone="+79990000000", street="пр. Науки, д. 1",
    )  # fmt: skip
    m = match(patient(), other)
    assert decide(m) == "new"
    assert m.score < 0


def test_decide_thresholds() -> None:
    m = MatchScore(score=20.0, rule="probabilistic", details={"x": 20.0})
    assert decide(m, Thresholds(auto=15, review=5)) == "auto-link"
    assert decide(m, Thresholds(auto=25, review=15)) == "review"
    assert decide(m, Thresholds(auto=30, review=25)) == "new"
    conflict = MatchScore(score=50.0, rule="core-conflict", details={"x": 50.0})
    assert decide(conflict, Thresholds(auto=15, review=5)) == "review"


# --- demo variants -----------------------------------------------------------------------


def test_demo_variants_auto_link() -> None:
    rng = random.Random(9)
    misses = 0
    total = 0
    for p in Generator(9).patients(150):
        base = copy.deepcopy(p)
        base["identifier"] = []  # probabilistic only
        fa = feats(base)
        for variant in (
            typo_variant(base, rng)[0],
            transliterate_variant(base, "icao")[0],
            transliterate_variant(base, "gost")[0],
            swap_day_month(base)[0],
            swap_day_month(typo_variant(base, rng)[0])[0],
        ):
            total += 1
            if decide(score(fa, feats(variant))) != "auto-link":
                misses += 1
    assert misses / total < 0.02


# --- best_match --------------------------------------------------------------------------


def test_best_match_picks_the_right_candidate() -> None:
    incoming = feats(patient(given="Анан"))
    cands = [
        ("twin", feats(patient(given="Ольга"))),
        ("right", feats(patient())),
        ("stranger", feats(patient(family="Кузнецова", birth="1940-01-02"))),
    ]
    result = best_match(incoming, cands)
    assert result.decision == "auto-link"
    assert result.person_id == "right"
    assert result.match is not None and result.match.rule == "probabilistic"
    assert [pid for pid, _ in result.ranked][0] == "right"
    assert len(result.ranked) == 3 and not result.ambiguous


def test_best_match_without_candidates_is_new() -> None:
    result = best_match(feats(patient()), [])
    assert result.decision == "new" and result.person_id is None and result.match is None


def test_two_auto_links_are_ambiguous_and_go_to_review() -> None:
    # Two golden records of one person (a duplicate to merge): an operator decides.
    result = best_match(feats(patient()), [("g1", feats(patient())), ("g2", feats(patient()))])
    assert result.decision == "review"
    assert result.ambiguous
    assert result.person_id in ("g1", "g2")


def test_national_id_ranks_above_a_higher_probabilistic_score() -> None:
    incoming = feats(patient(snils="112-233-445 95", phone=None, street=None))
    by_id = feats(patient(snils="112-233-445 95", family="Петрова", phone=None, street=None))
    result = best_match(incoming, [("by-id", by_id)])
    assert result.decision == "auto-link" and result.person_id == "by-id"


def test_a_persons_other_snils_outweighs_its_record_without_one() -> None:
    # Same full name and birth date, another SNILS: a namesake, even though one of the
    # person's records (from an MO that did not record the SNILS) looks exactly like it.
    incoming = feats(patient(snils="123-456-789 64"))
    person = [("p", feats(patient(snils="112-233-445 95"))), ("p", feats(patient()))]
    result = best_match(incoming, person)
    assert result.decision != "auto-link"
    assert result.match is not None and result.match.rule == "national-id-conflict"
    assert result.match.details["snils:different"] < 0
    # the same records without the conflicting one would link
    assert best_match(incoming, person[1:]).decision == "auto-link"


def test_a_shared_snils_keeps_a_person_linkable_despite_an_old_other_one() -> None:
    incoming = feats(patient(snils="123-456-789 64"))
    person = [
        ("p", feats(patient(snils="112-233-445 95"))),
        ("p", feats(patient(snils="123-456-789 64"))),
    ]
    result = best_match(incoming, person)
    assert result.decision == "auto-link" and result.match is not None
    assert result.match.rule == "national-id"


@pytest.mark.parametrize(
    ("a", "b", "level"),
    [
        ("Иванова", "Иванова", "exact"),
        ("Иванова", "Ivanova", "exact"),
        ("Юрий", "Yuriy", "exact"),
        ("Иванова", "Ивнаова", "close"),  # transposition, same script
        ("Людмила", "Лбдмила", "close"),  # one key, as written (ю is two letters in the key)
        ("Фаина", "Fiana", "close"),  # a Latin typo against Cyrillic: on the keys
        ("Ivanovа", "Иванва", "close"),  # a look-alike letter does not change the script
        ("Алла", "Анна", "different"),  # one apart once double letters fold, two as written
        ("Алина", "Галина", "similar"),  # first letter differs: never "close"
        ("Анна", "А.", "initial"),
        ("Анна", "", None),
    ],
)
def test_name_levels(a: str, b: str, level: str | None) -> None:
    from hie.registries.mpi.scoring import _names
    from hie.registries.translit import matching_key

    assert _names(matching_key(a), matching_key(b), a, b) == level
