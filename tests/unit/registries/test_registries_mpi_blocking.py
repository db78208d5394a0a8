"""Blocking keys and the in-memory candidate index (hie.registries.mpi)."""

from __future__ import annotations

import random
from datetime import date
from typing import Any

import pytest

from hie.demo import Generator, swap_day_month, transliterate_variant, typo_variant
from hie.hub.store.port import MAX_KEY_MEMBERS
from hie.registries.identifiers import SNILS_SYSTEM
from hie.registries.mpi import (
    CandidateIndex,
    blocking_keys,
    person_features,
    swap_invariant_date,
)

TODAY = date(2025, 11, 1)


def keys_of(p: dict[str, Any]) -> set[str]:
    return set(blocking_keys(person_features(p, today=TODAY)))


def test_swap_invariant_date() -> None:
    assert swap_invariant_date(date(1985, 3, 7)) == "19850307"
    assert swap_invariant_date(date(1985, 7, 3)) == "19850307"
    assert swap_invariant_date(date(1985, 12, 31)) == "19851231"


def test_keys_of_a_demo_patient() -> None:
    p = Generator(1).patient()
    keys = blocking_keys(person_features(p, today=TODAY))
    prefixes = {k.split(":", 1)[0] for k in keys}
    assert {"s", "o", "t", "fd", "gd", "fg"} <= prefixes
    assert len(keys) == len(set(keys))
    assert all(k.isascii() and len(k) <= 40 for k in keys)


def test_no_name_or_date_keys_without_them() -> None:
    keys = keys_of({"resourceType": "Patient", "name": [{"family": "Иванова"}]})
    assert keys == set()
    keys = keys_of(
        {
            "resourceType": "Patient",
            "identifier": [{"system": SNILS_SYSTEM, "value": "112-233-445 95"}],
            "birthDate": "1985",
            "name": [{"family": "Иванова", "given": ["Анна"]}],
        }
    )
    assert keys == {"s:11223344595", "fg:ivnv:an:1985"}


def _without_contacts_and_ids(p: dict[str, Any]) -> dict[str, Any]:
    p = dict(p)
    p["identifier"] = []
    p.pop("telecom", None)
    return p


@pytest.mark.parametrize("seed", range(5))
def test_variants_share_a_name_key_with_the_true_record(seed: int) -> None:
    # Without identifiers and phone, the name-and-date keys alone must still meet.
    rng = random.Random(seed)
    for p in Generator(seed).patients(300):
        base = keys_of(_without_contacts_and_ids(p))
        typo, _ = typo_variant(p, rng)
        assert base & keys_of(_without_contacts_and_ids(typo)), typo["name"]
        for scheme in ("icao", "gost"):
            latin, _ = transliterate_variant(p, scheme)
            assert base & keys_of(_without_contacts_and_ids(latin))
        swapped, _ = swap_day_month(p)
        if date.fromisoformat(swapped["birthDate"]) > TODAY:
            continue  # a baby whose swapped birthday is in the future: flagged, not matched
        assert base & keys_of(_without_contacts_and_ids(swapped))
        both, _ = swap_day_month(typo_variant(transliterate_variant(p)[0], rng)[0])
        assert base & keys_of(_without_contacts_and_ids(both))


def test_typo_in_family_keeps_the_given_key() -> None:
    p = Generator(2).patient()
    q = dict(p, name=[dict(p["name"][0], family="Zzzzz")])
    shared = keys_of(p) & keys_of(q)
    assert any(k.startswith("gd:") for k in shared)


# --- CandidateIndex ----------------------------------------------------------------------


def test_index_add_candidates_and_ranking() -> None:
    idx = CandidateIndex()
    idx.add("a", ["k1", "k2", "k3"])
    idx.add("b", ["k2", "k3"])
    idx.add("c", ["k3"])
    assert len(idx) == 3 and "a" in idx and "z" not in idx
    assert idx.candidates(["k1", "k2", "k3"]) == ["a", "b", "c"]
    assert idx.candidates(["k3"]) == ["a", "b", "c"]  # ties by id
    assert idx.candidates(["k3"], limit=2) == ["a", "b"]
    assert idx.candidates(["k2", "k2"]) == ["a", "b"]  # a repeated key counts once
    assert idx.candidates(["nope"]) == []
    assert idx.candidates(["k1"]) == ["a"]
    assert idx.block_size("k3") == 3 and idx.block_size("k1") == 1 and idx.block_size("x") == 0
    assert dict(idx.blocks()) == {"k1": 1, "k2": 2, "k3": 3}


def test_a_key_shared_by_too_many_people_is_left_out() -> None:
    # a clinic's phone entered for each of its patients: it must neither flood the candidate
    # set nor push out the person who shares a selective key
    idx = CandidateIndex()
    for n in range(MAX_KEY_MEMBERS + 1):
        idx.add(f"p{n:03d}", ["t:9211234567", f"fd:X:{n}"])
    idx.add("zz", ["fd:IVN:19850307"])
    assert idx.candidates(["t:9211234567", "fd:IVN:19850307"]) == ["zz"]
    assert idx.candidates(["t:9211234567", "fd:X:7"]) == ["p007"]


def test_index_remove_and_readd() -> None:
    idx = CandidateIndex()
    idx.add("a", ["k1", "k2"])
    idx.add("b", ["k2"])
    idx.add("c", ["k2"])
    idx.remove("b")
    assert idx.candidates(["k2"]) == ["a", "c"]
    idx.remove("c")
    assert idx.candidates(["k2"]) == ["a"] and idx.block_size("k2") == 1
    idx.remove("a")
    assert idx.candidates(["k1", "k2"]) == [] and len(idx) == 0
    assert dict(idx.blocks()) == {}
    idx.remove("never-there")  # ignored
    # Adding again replaces the keys a person was filed under.
    idx.add("a", ["k1"])
    idx.add("a", ["k9"])
    assert idx.candidates(["k1"]) == [] and idx.candidates(["k9"]) == ["a"]
    idx.add("a", ["k9", "k9"])
    assert idx.block_size("k9") == 1


def test_index_finds_demo_variants() -> None:
    gen = Generator(5)
    idx = CandidateIndex()
    people = list(gen.patients(500))
    for i, p in enumerate(people):
        idx.add(f"p{i}", blocking_keys(person_features(p, today=TODAY)))
    rng = random.Random(1)
    for i in rng.sample(range(500), 50):
        typo, _ = typo_variant(people[i], rng)
        swapped, _ = swap_day_month(typo)
        found = idx.candidates(blocking_keys(person_features(swapped, today=TODAY)))
        assert f"p{i}" in found
        assert len(found) <= 5
