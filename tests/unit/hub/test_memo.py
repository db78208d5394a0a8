"""IdentityMemo: a value is found again only for the very objects it was put for."""

from __future__ import annotations

import gc
import weakref

from hie.hub.memo import IdentityMemo


def test_the_same_objects_find_their_value() -> None:
    memo: IdentityMemo[str] = IdentityMemo()
    conds = (("a", 1), ("b", 2))
    memo.put("stmt", "Observation", conds)
    assert memo.get("Observation", conds) == "stmt"
    assert memo.get("Patient", conds) is None  # the plain part of the key counts too


def test_an_equal_but_other_object_is_a_miss() -> None:
    memo: IdentityMemo[str] = IdentityMemo()
    first = [1, 2, 3]
    memo.put("x", "k", first)
    assert memo.get("k", [1, 2, 3]) is None  # equal by value, another object


def test_an_entry_whose_objects_are_others_is_a_miss() -> None:
    # a probe by id alone would answer for another object that had the same id
    memo: IdentityMemo[str] = IdentityMemo()
    kept, other = object(), object()
    memo.put("kept", "k", kept)
    memo._memo[("k", id(other))] = ((kept,), "forged")  # the same id, another object
    assert memo.get("k", other) is None
    assert memo.get("k", kept) == "kept"


def test_it_keeps_its_objects_alive_so_their_ids_are_not_reused() -> None:
    memo: IdentityMemo[str] = IdentityMemo()

    class Conds:
        pass

    conds = Conds()
    ref = weakref.ref(conds)
    memo.put("stmt", "k", conds)
    del conds
    gc.collect()
    assert ref() is not None


def test_it_stays_bounded() -> None:
    memo: IdentityMemo[int] = IdentityMemo(maxsize=10)
    objs = [object() for _ in range(25)]
    for n, o in enumerate(objs):
        memo.put(n, "k", o)
    assert len(memo._memo) <= 10
    assert memo.get("k", objs[-1]) == 24
