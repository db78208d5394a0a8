"""Contract suite for the identity index (groups, blocking keys, journal) and the reference
expansion it drives in searches, run against SQLite and PostgreSQL."""

from __future__ import annotations

import orjson
import pytest

from hie.hub.errors import VersionConflict
from hie.hub.store.port import (
    MAX_KEY_MEMBERS,
    CompartmentCond,
    IndexRows,
    NewVersion,
    Query,
    ReferenceCond,
    ReferenceRow,
    ResourceStore,
)
from hie.hub.store.sql import now_us


def _obs(store: ResourceStore, oid: str, patient: str) -> None:
    body = orjson.dumps({"resourceType": "Observation", "id": oid})
    rows = IndexRows([ReferenceRow("subject", "Patient", patient)])
    with store.transaction() as tx:
        tx.write(NewVersion("Observation", oid, body, rows, "POST"), 1, now_us())


def _patient(store: ResourceStore, pid: str) -> None:
    body = orjson.dumps({"resourceType": "Patient", "id": pid})
    with store.transaction() as tx:
        tx.write(NewVersion("Patient", pid, body, IndexRows(), "POST"), 1, now_us())


def _subject(store: ResourceStore, patient: str, expand: bool = True) -> list[str]:
    q = Query("Observation", [ReferenceCond("subject", "Patient", patient, expand=expand)])
    return sorted(r.id for r in store.search(q).items)


def test_put_members_candidates_and_remove(store: ResourceStore) -> None:
    with store.transaction() as tx:
        idx = tx.identity
        idx.put("Patient", "g1", "g1")
        idx.put("Patient", "s1", "g1", b'{"f":1}', ["fd:IVN:19850307", "s:11223344595"])
        idx.put("Patient", "s2", "g1", b'{"f":2}', ["fd:IVN:19850307"])
        idx.put("Patient", "s3", "g3", b'{"f":3}', ["gd:ANN:19900101"])
    with store.identity_reader() as idx:
        assert idx.group_of("Patient", "s2") == "g1"
        assert idx.group_of("Patient", "nobody") is None
        assert [m.id for m in idx.members("Patient", "g1")] == ["g1", "s1", "s2"]
        assert idx.members("Patient", "g1")[0].features is None
        found = idx.candidates("Patient", ["fd:IVN:19850307", "s:11223344595"], 10)
        assert [(c.id, c.group_id) for c in found] == [("s1", "g1"), ("s2", "g1")]
        assert found[0].features == b'{"f":1}'
        assert idx.candidates("Patient", ["fd:IVN:19850307"], 1)[0].id == "s1"
        assert idx.candidates("Practitioner", ["fd:IVN:19850307"], 10) == []
        assert idx.candidates("Patient", [], 10) == []
    with store.transaction() as tx:
        # new keys replace the old ones; features are replaced too
        tx.identity.put("Patient", "s1", "g1", b'{"f":9}', ["t:9211234567"])
        tx.identity.remove("Patient", "s2")
    with store.identity_reader() as idx:
        assert idx.candidates("Patient", ["fd:IVN:19850307"], 10) == []
        assert [c.features for c in idx.candidates("Patient", ["t:9211234567"], 10)] == [b'{"f":9}']
        assert [m.id for m in idx.members("Patient", "g1")] == ["g1", "s1"]
        assert [r.id for r in idx.records("Patient", ["s1", "s3", "zz"])] == ["s1", "s3"]


def test_a_key_shared_by_too_many_records_is_left_out(store: ResourceStore) -> None:
    phone = "t:9211234567"  # a clinic's phone entered for every one of its patients
    with store.transaction() as tx:
        for n in range(MAX_KEY_MEMBERS + 1):
            tx.identity.put("Patient", f"p{n:03d}", f"p{n:03d}", b"{}", [phone, f"fd:X:{n}"])
        tx.identity.put("Patient", "zz", "zz", b"{}", ["fd:IVN:19850307"])
    with store.identity_reader() as idx:
        found = idx.candidates("Patient", [phone, "fd:IVN:19850307"], 10)
        assert [c.id for c in found] == ["zz"]
        assert [c.id for c in idx.candidates("Patient", [phone, "fd:X:7"], 10)] == ["p007"]
    with store.transaction() as tx:  # at the cap, the key still counts
        tx.identity.remove("Patient", "p000")
    with store.identity_reader() as idx:
        assert len(idx.candidates("Patient", [phone], 500)) == MAX_KEY_MEMBERS


def test_move_group_and_journal(store: ResourceStore) -> None:
    with store.transaction() as tx:
        for gid, ids in {"g1": ["g1", "a"], "g2": ["g2", "b", "c"]}.items():
            for i in ids:
                tx.identity.put("Patient", i, gid)
        moved = tx.identity.move_group("Patient", "g2", "g1")
        s1 = tx.identity.log("Patient", "g2", "g1", "merge", b'{"moved":3}', 10)
        s2 = tx.identity.log("Patient", "b", "g1", "match", b"{}", 11)
    assert sorted(moved) == ["b", "c", "g2"] and s2 > s1
    with store.identity_reader() as idx:
        assert [m.id for m in idx.members("Patient", "g1")] == ["a", "b", "c", "g1", "g2"]
        assert idx.members("Patient", "g2") == []
        assert [e.kind for e in idx.journal("Patient", group_id="g1")] == ["match", "merge"]
        merge = idx.journal("Patient", id="g2", kind="merge")
        assert len(merge) == 1 and merge[0].body == b'{"moved":3}' and merge[0].created == 10
        assert idx.journal("Patient", id="g2", kind="unmerge") == []


def test_rolled_back_transaction_leaves_no_links(store: ResourceStore) -> None:
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.identity.put("Patient", "s1", "g1", b"{}", ["k"])
        tx.identity.log("Patient", "s1", "g1", "match", b"{}", 1)
        raise RuntimeError("boom")
    with store.identity_reader() as idx:
        assert idx.group_of("Patient", "s1") is None
        assert idx.candidates("Patient", ["k"], 5) == []
        assert idx.journal("Patient", id="s1") == []


def test_reference_search_expands_through_the_group(store: ResourceStore) -> None:
    for p in ("g1", "s1", "s2", "lone"):
        _patient(store, p)
    _obs(store, "o1", "s1")
    _obs(store, "o2", "s2")
    _obs(store, "o3", "g1")
    _obs(store, "o4", "lone")
    # before any grouping, each patient finds only its own records
    assert _subject(store, "s1") == ["o1"]
    assert _subject(store, "lone") == ["o4"]
    with store.transaction() as tx:
        for i in ("g1", "s1", "s2"):
            tx.identity.put("Patient", i, "g1")
    assert _subject(store, "g1") == ["o1", "o2", "o3"]
    assert _subject(store, "s2") == ["o1", "o2", "o3"]
    assert _subject(store, "s2", expand=False) == ["o2"]
    assert _subject(store, "lone") == ["o4"]
    # the compartment ($everything) sees the group: every member and their records
    q = Query(None, [CompartmentCond("Patient", ("g1",), (("Observation", "subject"),), True)])
    got = sorted(f"{r.resource_type}/{r.id}" for r in store.search(q).items)
    assert got == [
        "Observation/o1",
        "Observation/o2",
        "Observation/o3",
        "Patient/g1",
        "Patient/s1",
        "Patient/s2",
    ]
    # a merge moves the group: the merged-away group's records resolve to the survivor
    with store.transaction() as tx:
        tx.identity.put("Patient", "lone", "lone")
        tx.identity.move_group("Patient", "lone", "g1")
    assert _subject(store, "g1") == ["o1", "o2", "o3", "o4"]
    assert _subject(store, "lone") == ["o1", "o2", "o3", "o4"]
    # and moving it back (an unmerge) restores the separation
    with store.transaction() as tx:
        tx.identity.put("Patient", "lone", "lone")
    assert _subject(store, "lone") == ["o4"]
    assert _subject(store, "g1") == ["o1", "o2", "o3"]


def test_duplicate_member_insert_in_parallel_transactions_conflicts(store: ResourceStore) -> None:
    # the primary key on (rtype, id) is what keeps one record in one group
    with store.transaction() as tx:
        tx.identity.put("Patient", "s1", "g1")
    with pytest.raises(VersionConflict), store.transaction() as tx:
        from hie.hub.store import schema as s

        tx.conn.execute(s.identity_links.insert().values(rtype="Patient", id="s1", group_id="g2"))  # type: ignore[attr-defined]
    with store.identity_reader() as idx:
        assert idx.group_of("Patient", "s1") == "g1"
