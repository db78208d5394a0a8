"""Contract suite for the resource store port, run against SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import orjson
import pytest

from hie.hub.errors import VersionConflict
from hie.hub.store.port import (
    AllOf,
    AnyOf,
    ChainCond,
    CompartmentCond,
    Condition,
    DateCond,
    DateRow,
    IdCond,
    IndexRows,
    MissingCond,
    NewVersion,
    NumberCond,
    OwnerCond,
    QuantityRow,
    Query,
    ReferenceCond,
    ReferenceRow,
    RelatedCond,
    ResourceStore,
    SortKey,
    StringCond,
    StringRow,
    TokenCond,
    TokenRow,
    TypeCond,
    Via,
)
from hie.hub.store.sql import now_us

DAY = 86_400_000_000


def _new(
    rtype: str, rid: str, rows: list[object] | None = None, method: str = "POST"
) -> NewVersion:
    body = orjson.dumps({"resourceType": rtype, "id": rid})
    return NewVersion(rtype, rid, body, IndexRows(list(rows or [])), method)  # type: ignore[arg-type]


def _put(store: ResourceStore, rtype: str, rid: str, rows: list[object] | None = None) -> None:
    with store.transaction() as tx:
        cur = tx.current(rtype, rid)
        tx.write(_new(rtype, rid, rows, "PUT"), (cur.version + 1) if cur else 1, now_us())


def _ids(page: object) -> list[str]:
    return [r.id for r in page.items]  # type: ignore[attr-defined]


def test_create_read_update_history(store: ResourceStore) -> None:
    _put(store, "Patient", "p1")
    _put(store, "Patient", "p1")
    cur = store.read("Patient", "p1")
    assert cur is not None and cur.version == 2 and not cur.deleted
    assert orjson.loads(cur.content or b"")["id"] == "p1"
    v1 = store.vread("Patient", "p1", 1)
    assert v1 is not None and v1.version == 1
    assert store.vread("Patient", "p1", 3) is None
    assert store.read("Patient", "nope") is None
    items, more = store.history("Patient", "p1", since=None, count=10, before_seq=None)
    assert [i.version for i in items] == [2, 1] and more is None


def test_delete_is_a_versioned_tombstone(store: ResourceStore) -> None:
    _put(store, "Patient", "p1", [StringRow("name", "ivanova", "Ivanova")])
    with store.transaction() as tx:
        cur = tx.current("Patient", "p1")
        assert cur is not None
        tx.write(
            NewVersion("Patient", "p1", None, IndexRows(), "DELETE"), cur.version + 1, now_us()
        )
    cur = store.read("Patient", "p1")
    assert cur is not None and cur.deleted and cur.version == 2
    assert store.vread("Patient", "p1", 1) is not None
    page = store.search(Query("Patient", [StringCond("name", "ivan")]))
    assert page.items == []


def test_optimistic_lock_conflict(store: ResourceStore) -> None:
    _put(store, "Patient", "p1")
    with pytest.raises(VersionConflict), store.transaction() as tx:
        tx.write(_new("Patient", "p1", method="PUT"), 5, now_us())
    assert store.read("Patient", "p1").version == 1  # type: ignore[union-attr]


def test_failed_transaction_leaves_no_trace(store: ResourceStore) -> None:
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.write(_new("Patient", "a"), 1, now_us())
        raise RuntimeError("boom")
    assert store.read("Patient", "a") is None
    assert store.outbox_read("c", 10) == []


def test_duplicate_create_conflicts(store: ResourceStore) -> None:
    _put(store, "Patient", "p1")
    with pytest.raises(VersionConflict), store.transaction() as tx:
        tx.write_many([(_new("Patient", "p1"), 1)], now_us())


def _seed(store: ResourceStore) -> None:
    t0 = 1_700_000_000_000_000
    with store.transaction() as tx:
        tx.write_many(
            [
                (
                    _new(
                        "Patient",
                        "p1",
                        [
                            StringRow("name", "иванова", "Иванова"),
                            TokenRow("identifier", "urn:oid:1.2.643.100.3", "112-233-445 95"),
                            TokenRow("gender", None, "female"),
                        ],
                    ),
                    1,
                ),
                (
                    _new(
                        "Patient",
                        "p2",
                        [StringRow("name", "петров", "Петров"), TokenRow("gender", None, "male")],
                    ),
                    1,
                ),
            ]
            + [
                (
                    _new(
                        "Observation",
                        f"o{i}",
                        [
                            ReferenceRow("subject", "Patient", "p1" if i % 2 == 0 else "p2"),
                            TokenRow("code", "http://loinc.org", "718-7" if i % 3 else "2345-7"),
                            DateRow("date", t0 + i * DAY, t0 + i * DAY),
                            QuantityRow(
                                "value-quantity", float(100 + i), "http://unitsofmeasure.org", "g/L"
                            ),
                        ],
                    ),
                    1,
                )
                for i in range(20)
            ],
            now_us(),
        )


def test_search_conditions(store: ResourceStore) -> None:
    _seed(store)
    t0 = 1_700_000_000_000_000
    q = lambda *c, **kw: store.search(Query("Observation", list(c), **kw))  # noqa: E731
    subj = ReferenceCond("subject", "Patient", "p1")
    assert len(q(subj).items) == 10
    assert len(q(subj, TokenCond("code", "http://loinc.org", "2345-7")).items) == 4  # 0,6,12,18
    assert len(q(TokenCond("code", None, "2345-7")).items) == 7
    assert len(q(TokenCond("code", "", "2345-7")).items) == 0
    assert len(q(TokenCond("code", "http://loinc.org", "2345-7", negate=True)).items) == 13
    ge = DateCond("date", "ge", t0 + 10 * DAY, t0 + 11 * DAY - 1)
    assert len(q(ge).items) == 10
    assert len(q(DateCond("date", "lt", t0 + 2 * DAY, t0 + 3 * DAY - 1)).items) == 2
    assert len(q(DateCond("date", "eq", t0 + 5 * DAY, t0 + 6 * DAY - 1)).items) == 1
    assert len(q(DateCond("date", "ne", t0 + 5 * DAY, t0 + 6 * DAY - 1)).items) == 19
    assert len(q(NumberCond("value-quantity", "gt", 115, 115, 115)).items) == 4
    assert len(q(NumberCond("value-quantity", "eq", 105, 104.5, 105.5, code="g/L")).items) == 1
    assert len(q(MissingCond("value-quantity", "quantity", True)).items) == 0
    assert len(q(IdCond(("o1", "o2"))).items) == 2
    assert len(q(AnyOf((IdCond(("o1",)), IdCond(("o3",))))).items) == 2
    chain = ChainCond("subject", "Patient", (TokenCond("identifier", None, "112-233-445 95"),))
    assert len(q(chain).items) == 10
    assert len(q(chain, ge).items) == 5
    pq = store.search(Query("Patient", [StringCond("name", "иван")]))
    assert _ids(pq) == ["p1"]
    assert _ids(store.search(Query("Patient", [StringCond("name", "ван", "contains")]))) == ["p1"]
    assert _ids(store.search(Query("Patient", [StringCond("name", "иван", "exact")]))) == []
    assert _ids(store.search(Query("Patient", [StringCond("name", "Иванова", "exact")]))) == ["p1"]


def test_any_of_several_systems_of_one_token(store: ResourceStore) -> None:
    # identifier=placer|P1,filler|F2: one probe of the token index (it drives the search)
    rows = {
        "s1": [
            TokenRow("identifier", "urn:placer", "P1"),
            TokenRow("identifier", "urn:filler", "F1"),
        ],
        "s2": [
            TokenRow("identifier", "urn:placer", "P2"),
            TokenRow("identifier", "urn:filler", "F2"),
        ],
        "s3": [TokenRow("identifier", None, "F2"), TokenRow("status", None, "active")],
        "s4": [TokenRow("identifier", "urn:other", "P1"), TokenRow("status", None, "active")],
    }
    for rid, r in rows.items():
        _put(store, "ServiceRequest", rid, r)  # type: ignore[arg-type]

    def q(*conds: Condition) -> list[str]:
        return sorted(_ids(store.search(Query("ServiceRequest", list(conds)))))

    def tok(system: str | None, code: str) -> TokenCond:
        return TokenCond("identifier", system, code)

    assert q(AnyOf((tok("urn:placer", "P1"), tok("urn:filler", "F2")))) == ["s1", "s2"]
    assert q(AnyOf((tok("", "F2"), tok("urn:placer", "P1")))) == ["s1", "s3"]  # no system
    assert q(AnyOf((tok(None, "F2"), tok("urn:other", "P1")))) == ["s2", "s3", "s4"]  # any
    active = TokenCond("status", None, "active")
    assert q(AnyOf((tok("urn:placer", "P1"), tok("urn:other", "P1"))), active) == ["s4"]
    assert q(AnyOf((tok("urn:placer", "P9"), tok("urn:filler", "F9")))) == []


def test_ids_by_token_inside_and_outside_a_transaction(store: ResourceStore) -> None:
    # an order by its placer or filler number, a result's target by its identifier: exact
    # (system, code) pairs, each answered on its own, with the caller's conditions applied
    rows = {
        "o1": [TokenRow("identifier", "urn:placer", "P1"), TokenRow("status", None, "active")],
        "o2": [TokenRow("identifier", "urn:filler", "P1")],  # same code, another system
        "o3": [TokenRow("identifier", "urn:placer", "P3"), TokenRow("status", None, "active")],
    }
    for rid, r in rows.items():
        _put(store, "ServiceRequest", rid, r)  # type: ignore[arg-type]
    with store.transaction() as tx:  # a deleted order is never found
        tx.current("ServiceRequest", "o3")
        tx.write(NewVersion("ServiceRequest", "o3", None, IndexRows(), "DELETE"), 2, now_us())
    wanted = [("urn:placer", "P1"), ("urn:filler", "P1"), ("urn:placer", "P3"), ("x", "P9")]
    expect = {wanted[0]: ["o1"], wanted[1]: ["o2"], wanted[2]: [], wanted[3]: []}
    assert store.ids_by_token("ServiceRequest", "identifier", wanted) == expect
    with store.transaction() as tx:  # the same lookup sees the transaction's own writes
        tx.write(_new("ServiceRequest", "o4", [TokenRow("identifier", "x", "P9")]), 1, now_us())
        inside = tx.ids_by_token("ServiceRequest", "identifier", wanted)
        assert inside == {**expect, wanted[3]: ["o4"]}
    active = [TokenCond("status", None, "active")]
    assert store.ids_by_token("ServiceRequest", "identifier", wanted[:2], active) == {
        wanted[0]: ["o1"],
        wanted[1]: [],
    }
    assert store.ids_by_token("Patient", "identifier", wanted[:1]) == {wanted[0]: []}
    assert store.ids_by_token("ServiceRequest", "identifier", []) == {}


def test_keyset_paging_sort_and_total(store: ResourceStore) -> None:
    _seed(store)
    seen: list[str] = []
    after = None
    while True:
        page = store.search(
            Query(
                "Observation", [], [SortKey("date", "date", True)], count=6, after=after, total=True
            )
        )
        assert page.total == 20
        seen.extend(_ids(page))
        after = page.next_after
        if after is None:
            break
    assert seen == [f"o{i}" for i in range(19, -1, -1)]
    # paging stays correct while data changes: a new row sorting before the cursor is not
    # returned twice, rows after it are not skipped
    p1 = store.search(Query("Observation", [], count=5))
    _put(store, "Observation", "new")
    p2 = store.search(Query("Observation", [], count=100, after=p1.next_after))
    assert not set(_ids(p1)) & set(_ids(p2))
    assert len(_ids(p1)) + len(_ids(p2)) == 21


def test_compartment_and_references(store: ResourceStore) -> None:
    _seed(store)
    links = (("Observation", "subject"),)
    page = store.search(Query(None, [CompartmentCond("Patient", ("p1",), links)], count=100))
    assert sorted(_ids(page)) == sorted(["p1"] + [f"o{i}" for i in range(0, 20, 2)])
    page = store.search(
        Query(None, [CompartmentCond("Patient", ("p1",), links), TypeCond(("Patient",))])
    )
    assert _ids(page) == ["p1"]
    obs = store.search(Query("Observation", [IdCond(("o0",))])).items
    assert store.references_from([obs[0].rid], [("Observation", "subject")]) == [("Patient", "p1")]
    rev = store.referencing([("Patient", "p2")], "Observation", "subject", 100)
    assert len(rev) == 10


def test_compartment_can_be_excluded(store: ResourceStore) -> None:
    _seed(store)
    links = (("Observation", "subject"),)
    outside = CompartmentCond("Patient", ("p1",), links, negate=True)
    page = store.search(Query("Observation", [outside], count=100, total=True))
    assert page.total == 10 and not set(_ids(page)) & {f"o{i}" for i in range(0, 20, 2)}
    assert _ids(store.search(Query("Patient", [outside], count=100))) == ["p2"]


def _owned(
    store: ResourceStore, rtype: str, rid: str, owner: str | None, rows: list[object]
) -> None:
    with store.transaction() as tx:
        cur = tx.current(rtype, rid)
        new = NewVersion(
            rtype,
            rid,
            b"{}",
            IndexRows(list(rows)),
            "PUT",
            owner=owner,  # type: ignore[arg-type]
        )
        tx.write(new, (cur.version + 1) if cur else 1, now_us())


def test_owner_is_kept_from_the_first_version(store: ResourceStore) -> None:
    _owned(store, "Observation", "a", "mo1", [])
    _owned(store, "Observation", "b", "mo2", [])
    _owned(store, "Observation", "a", "mo2", [])  # a later writer does not take it over
    _owned(store, "Observation", "c", None, [])
    mine = Query("Observation", [OwnerCond("mo1")], count=10)
    assert _ids(store.search(mine)) == ["a"]
    assert sorted(_ids(store.search(Query(None, [OwnerCond("mo2")], count=10)))) == ["b"]


def test_related_condition_follows_relationships_and_identity_groups(store: ResourceStore) -> None:
    """Records of patients with an open Encounter at mo1 (through any member of their identity
    group); the encounter's own conditions are applied; AllOf/AnyOf compose."""
    subj = "subject"
    for p in ("p1", "p2", "p3", "p1b"):
        _put(store, "Patient", p)
    for i, p in enumerate(("p1", "p2", "p3", "p1b", "p1b")):
        _put(store, "Observation", f"o{i}", [ReferenceRow(subj, "Patient", p)])
    with store.transaction() as tx:  # p1 and p1b are one person
        tx.identity.put("Patient", "p1", "g1")
        tx.identity.put("Patient", "p1b", "g1")
    enc = [
        ("e1", "p1", "mo1", "in-progress"),
        ("e2", "p2", "mo1", "finished"),  # closed: no relationship
        ("e3", "p3", "mo2", "in-progress"),  # another MO
    ]
    for eid, p, org, status in enc:
        _put(
            store,
            "Encounter",
            eid,
            [
                ReferenceRow(subj, "Patient", p),
                ReferenceRow("service-provider", "Organization", org),
                TokenRow("status", None, status),
            ],
        )
    open_at_mo1 = Via(
        "Encounter",
        subj,
        (
            ReferenceCond("service-provider", "Organization", "mo1"),
            AnyOf((TokenCond("status", None, "in-progress"), TokenCond("status", None, "arrived"))),
        ),
    )
    links = (("Observation", "subject"), ("Encounter", "subject"))
    care = RelatedCond("Patient", links, (open_at_mo1,))
    obs = store.search(Query("Observation", [care], count=10, total=True))
    assert sorted(_ids(obs)) == ["o0", "o3", "o4"] and obs.total == 3
    assert sorted(_ids(store.search(Query("Patient", [care], count=10)))) == ["p1", "p1b"]
    everywhere = store.search(Query(None, [care, TypeCond(("Patient", "Observation"))], count=20))
    assert sorted(_ids(everywhere)) == ["o0", "o3", "o4", "p1", "p1b"]
    # mine OR (related AND NOT p1b's compartment)
    _owned(store, "Observation", "o9", "mo1", [ReferenceRow(subj, "Patient", "p3")])
    not_p1b = CompartmentCond("Patient", ("p1b",), links, negate=True)
    rule = AnyOf((OwnerCond("mo1"), AllOf((care, not_p1b))))
    assert sorted(_ids(store.search(Query("Observation", [rule], count=10)))) == ["o0", "o9"]

    # searches limited to one patient: the same rows as the whole store would give them
    mine_or_care = AnyOf((OwnerCond("mo1"), care))

    def scoped(pid: str, expand: bool, grant: object = mine_or_care) -> list[str]:
        about = ReferenceCond(subj, "Patient", pid, expand=expand)
        page = store.search(Query("Observation", [about, grant], count=10, total=True))  # type: ignore[list-item]
        assert page.total == len(page.items)
        return sorted(_ids(page))

    assert scoped("p1", True) == ["o0", "o3", "o4"]  # in care: the whole identity group
    assert scoped("p1b", False) == ["o3", "o4"]  # in care through its group
    assert scoped("p2", True) == []  # the visit is over
    assert scoped("p3", True) == ["o9"]  # another MO's patient: only what mo1 wrote
    assert scoped("p1", True, rule) == ["o0"]  # the other conditions still apply
    _put(  # p1's visit ends: the next search sees it at once
        store,
        "Encounter",
        "e1",
        [
            ReferenceRow(subj, "Patient", "p1"),
            ReferenceRow("service-provider", "Organization", "mo1"),
            TokenRow("status", None, "finished"),
        ],
    )
    assert scoped("p1", True) == []
    assert scoped("p1b", False) == []


def test_change_marker_moves_on_every_change_of_its_type(store: ResourceStore) -> None:
    empty = store.change_marker("Consent")
    assert empty == (0, 0)
    _put(store, "Consent", "c1")
    created = store.change_marker("Consent")
    assert created != empty
    _put(store, "Patient", "p1")
    assert store.change_marker("Consent") == created  # other types do not move it
    _put(store, "Consent", "c1")
    updated = store.change_marker("Consent")
    assert updated != created
    with store.transaction() as tx:
        cur = tx.current("Consent", "c1")
        assert cur is not None
        tx.write(
            NewVersion("Consent", "c1", None, IndexRows(), "DELETE"), cur.version + 1, now_us()
        )
    assert store.change_marker("Consent") != updated


def test_outbox_in_order_and_acknowledged(store: ResourceStore) -> None:
    _seed(store)
    events = store.outbox_read("idx", 5)
    assert [e.seq for e in events] == sorted(e.seq for e in events) and len(events) == 5
    store.outbox_ack("idx", events[-1].seq)
    rest = store.outbox_read("idx", 100)
    assert len(rest) == 17 and rest[0].seq == events[-1].seq + 1
    store.outbox_ack("idx", events[0].seq)  # never moves backwards
    assert store.outbox_position("idx")[0] == events[-1].seq
    assert store.outbox_read("other", 100)[0].seq == events[0].seq


def test_concurrent_writers_do_not_lose_updates(store: ResourceStore) -> None:
    _put(store, "Patient", "counter")
    errors: list[Exception] = []

    def bump() -> None:
        for _ in range(10):
            while True:
                try:
                    _put(store, "Patient", "counter")
                    break
                except VersionConflict:
                    continue
                except Exception as exc:  # pragma: no cover - reported below
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.read("Patient", "counter").version == 41  # type: ignore[union-attr]
