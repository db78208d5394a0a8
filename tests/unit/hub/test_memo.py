"""IdentityMemo: a value is found again only for the very objects it was put for."""

from __future__ import annotations

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


def test_a_reused_id_is_never_taken_for_the_old_object() -> None:
    memo: IdentityMemo[str] = IdentityMemo()
    kept = object()
    memo.put("kept", "k", kept)
    # the memo holds ``kept``, so no new object can have its id while the entry lives
    others = [object() for _ in range(1000)]
    assert all(memo.get("k", o) is None for o in others)
    assert memo.get("k", kept) == "kept"


def test_it_stays_bounded() -> None:
    memo: IdentityMemo[int] = IdentityMemo(maxsize=10)
    objs = [object() for _ in range(25)]
    for n, o in enumerate(objs):
        memo.put(n, "k", o)
    assert len(memo._memo) <= 10
    assert memo.get("k", objs[-1]) == 24
