"""The transactional outbox and its worker, on SQLite and PostgreSQL (real engines).

Proves: events reach every consumer in commit order; a failing consumer is retried from the
event that failed while the others carry on; an event handled but not acknowledged (a crash in
between) is delivered again; a new worker over a reopened store resumes at the acknowledged
offset; ``drain()``; and on PostgreSQL, where sequence numbers are taken before commit, a
transaction that took a lower number and commits last is never skipped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from hie.hub.errors import Busy
from hie.hub.outbox import LagGate, OutboxWorker
from hie.hub.store import open_resource_store
from hie.hub.store.port import IndexRows, NewVersion, OutboxEvent
from hie.hub.store.sql import now_us

Key = tuple[str, str, int, str]


class Recorder:
    """A consumer that remembers every batch it was handed (in order)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.batches: list[list[OutboxEvent]] = []

    def handle(self, events: Sequence[OutboxEvent]) -> None:
        self.batches.append(list(events))

    @property
    def seqs(self) -> list[int]:
        return [e.seq for b in self.batches for e in b]

    @property
    def keys(self) -> list[Key]:
        return [(e.resource_type, e.id, e.version, e.op) for b in self.batches for e in b]


class Flaky(Recorder):
    """Fails its first ``failures`` calls (after recording what it was offered)."""

    def __init__(self, name: str, failures: int) -> None:
        super().__init__(name)
        self.failures = failures
        self.offered: list[list[int]] = []

    def handle(self, events: Sequence[OutboxEvent]) -> None:
        self.offered.append([e.seq for e in events])
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("consumer down")
        super().handle(events)


class ProcessDied(BaseException):
    """Stands for the process dying: not an ``Exception``, so the worker cannot catch it."""


class DiesBeforeAck(Recorder):
    """Handles a batch durably (records it), then the process dies before the ack."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.die = True

    def handle(self, events: Sequence[OutboxEvent]) -> None:
        super().handle(events)
        if self.die:
            raise ProcessDied


def write(store: Any, rtype: str, id: str, version: int, *, deleted: bool = False) -> None:
    """Commit one version of a resource (with its outbox row) in its own transaction."""
    content = None if deleted else b'{"resourceType": "%s"}' % rtype.encode()
    method = "DELETE" if deleted else ("POST" if version == 1 else "PUT")
    with store.transaction() as tx:
        tx.write(NewVersion(rtype, id, content, IndexRows(), method), version, now_us())


def history_script(store: Any) -> list[Key]:
    """Write a mixed sequence of creates, updates and deletes; the keys in commit order."""
    expected: list[Key] = []
    for i in range(12):
        version = 1
        write(store, "Patient", f"p{i}", version)
        expected.append(("Patient", f"p{i}", version, "create"))
        if i % 3 == 0:
            version += 1
            write(store, "Patient", f"p{i}", version)
            expected.append(("Patient", f"p{i}", version, "update"))
        if i % 4 == 1:
            version += 1
            write(store, "Patient", f"p{i}", version, deleted=True)
            expected.append(("Patient", f"p{i}", version, "delete"))
        write(store, "Observation", f"o{i}", 1)
        expected.append(("Observation", f"o{i}", 1, "create"))
    return expected


def test_events_reach_each_consumer_in_commit_order(store: Any) -> None:
    expected = history_script(store)
    a, b = Recorder("a"), Recorder("b")
    worker = OutboxWorker(store, [a, b], batch=7)
    worker.drain(timeout=30)
    assert a.keys == expected
    assert b.keys == expected
    assert a.seqs == sorted(set(a.seqs))  # strictly increasing: no repeats, no reordering
    assert all(len(batch) <= 7 for batch in a.batches)
    newest = a.seqs[-1]
    assert store.outbox_position("a") == (newest, newest)
    assert store.outbox_position("b") == (newest, newest)
    # nothing new: nothing delivered
    assert worker.run_once() == 0
    write(store, "Patient", "late", 1)
    assert worker.run_once() == 2  # one event, to each of the two consumers
    assert a.keys[-1] == b.keys[-1] == ("Patient", "late", 1, "create")


def test_failing_consumer_is_retried_and_nothing_is_skipped(store: Any) -> None:
    expected = history_script(store)
    healthy, flaky = Recorder("healthy"), Flaky("flaky", failures=2)
    worker = OutboxWorker(store, [flaky, healthy], batch=10)
    worker.run_once()
    # the healthy consumer went on although the flaky one (called first) failed
    assert healthy.keys == expected[:10]
    assert flaky.batches == []
    assert store.outbox_position("flaky")[0] == 0
    worker.drain(timeout=30)
    assert healthy.keys == expected
    assert flaky.keys == expected
    # every retry started at the event that failed: the failed batch was offered again whole
    first = flaky.offered[0]
    assert flaky.offered[1] == first
    assert flaky.offered[2] == first
    assert flaky.seqs == sorted(set(flaky.seqs))


def test_crash_between_handling_and_ack_redelivers(store: Any, store_url: str) -> None:
    expected = history_script(store)
    dying = DiesBeforeAck("idem")
    worker = OutboxWorker(store, [dying], batch=5)
    with pytest.raises(ProcessDied):
        worker.run_once()
    handled_before_crash = dying.seqs
    assert len(handled_before_crash) == 5
    assert store.outbox_position("idem")[0] == 0  # handled, never acknowledged
    store.close()

    reopened = open_resource_store(store_url)
    try:
        again = DiesBeforeAck("idem")
        again.die = False
        OutboxWorker(reopened, [again], batch=5).drain(timeout=30)
        # the batch handled before the crash is handed over again, same sequence numbers
        assert again.seqs[:5] == handled_before_crash
        assert again.keys == expected
        # an idempotent consumer (state keyed by seq) ends in the same state either way
        state = {e.seq: e for b in dying.batches + again.batches for e in b}
        assert sorted(state) == again.seqs
    finally:
        reopened.close()


def test_new_worker_resumes_from_acked_offset(store: Any, store_url: str) -> None:
    first = history_script(store)
    c1 = Recorder("resume")
    OutboxWorker(store, [c1]).drain(timeout=30)
    assert c1.keys == first
    acked = store.outbox_position("resume")[0]
    store.close()

    reopened = open_resource_store(store_url)
    try:
        for i in range(5):
            write(reopened, "Condition", f"c{i}", 1)
        c2 = Recorder("resume")  # same consumer name, fresh process state
        OutboxWorker(reopened, [c2]).drain(timeout=30)
        assert c2.keys == [("Condition", f"c{i}", 1, "create") for i in range(5)]
        assert min(c2.seqs) > acked
        # a consumer that never ran starts at the beginning
        c3 = Recorder("newcomer")
        OutboxWorker(reopened, [c3]).drain(timeout=30)
        assert c3.keys == first + c2.keys
    finally:
        reopened.close()


def test_drain(store: Any) -> None:
    worker = OutboxWorker(store, [Recorder("idle")])
    worker.drain(timeout=5)  # an empty outbox drains at once
    history_script(store)
    rec = Recorder("r")
    worker = OutboxWorker(store, [rec], batch=3)
    worker.drain(timeout=30)
    acked, newest = store.outbox_position("r")
    assert acked == newest > 0
    assert len(rec.seqs) == newest  # one store, no gaps: every seq 1..newest handled
    # a consumer that never recovers makes drain() give up rather than spin forever
    broken = Flaky("broken", failures=10**6)
    with pytest.raises(TimeoutError):
        OutboxWorker(store, [broken]).drain(timeout=1.5)
    assert store.outbox_position("broken")[0] == 0


# --- PostgreSQL: sequence numbers are taken before commit ----------------------------------


@pytest.fixture
def pg_store(pg_server: Any) -> Iterator[Any]:
    st = open_resource_store(pg_server.new_database())
    st.migrate()
    yield st
    st.close()


def test_pg_lower_seq_committing_last_is_not_skipped(pg_store: Any) -> None:
    store = pg_store
    write(store, "Patient", "before", 1)
    rec = Recorder("gap")
    worker = OutboxWorker(store, [rec])
    worker.drain(timeout=30)
    assert rec.keys == [("Patient", "before", 1, "create")]

    written, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow_writer() -> None:
        try:
            with store.transaction() as tx:
                tx.write(NewVersion("Patient", "slow", b"{}", IndexRows(), "POST"), 1, now_us())
                written.set()  # its outbox row holds a sequence number now, uncommitted
                assert release.wait(30)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)
            written.set()

    t = threading.Thread(target=slow_writer)
    t.start()
    try:
        assert written.wait(30)
        write(store, "Patient", "fast", 1)  # a higher number, committed first
        _, newest = store.outbox_position("gap")
        for _ in range(3):
            worker.run_once()
        # the later number is visible but must wait for the earlier one
        assert rec.keys == [("Patient", "before", 1, "create")]
        assert store.outbox_position("gap")[0] < newest
    finally:
        release.set()
        t.join(30)
    assert not errors
    worker.drain(timeout=30)
    assert rec.keys == [
        ("Patient", "before", 1, "create"),
        ("Patient", "slow", 1, "create"),
        ("Patient", "fast", 1, "create"),
    ]
    assert rec.seqs == sorted(rec.seqs)


class Boom(Exception):
    pass


def rolled_back_write(store: Any) -> None:
    """A transaction that takes a sequence number for its outbox row, then rolls back."""
    with pytest.raises(Boom), store.transaction() as tx:
        tx.write(NewVersion("Patient", "rolled", b"{}", IndexRows(), "POST"), 1, now_us())
        raise Boom


def test_pg_young_gap_holds_the_consumer_back(pg_store: Any) -> None:
    """When the reader first meets a gap, the missing number may still commit, so the
    consumer waits (the next pass checks whether its transaction has ended)."""
    rolled_back_write(pg_store)
    write(pg_store, "Patient", "young", 1)
    rec = Recorder("rb")
    worker = OutboxWorker(pg_store, [rec])
    assert worker.run_once() == 0
    assert rec.keys == []
    assert pg_store.read("Patient", "rolled") is None


def test_pg_rolled_back_seq_is_skipped_once_its_transaction_ended(pg_store: Any) -> None:
    """A number taken by a transaction that rolled back never commits: once every transaction
    that was running when the gap was seen has ended, the consumer goes on, losing nothing."""
    rolled_back_write(pg_store)
    with pg_store.transaction() as tx:
        tx.write(NewVersion("Patient", "aged", b"{}", IndexRows(), "POST"), 1, now_us())
    write(pg_store, "Patient", "next", 1)
    rec = Recorder("rb")
    OutboxWorker(pg_store, [rec]).drain(timeout=30)
    assert rec.keys == [("Patient", "aged", 1, "create"), ("Patient", "next", 1, "create")]
    assert rec.seqs[1] == rec.seqs[0] + 1


# --- how far behind a consumer is, and writers that wait for it -------------------------------


def write_at(store: Any, id: str, when: int) -> None:
    with store.transaction() as tx:
        tx.write(
            NewVersion("Patient", id, b'{"resourceType": "Patient"}', IndexRows(), "POST"), 1, when
        )


def test_outbox_behind_gives_the_time_of_the_oldest_unacknowledged_event(store: Any) -> None:
    t0 = now_us() - 30_000_000
    for n in range(3):
        write_at(store, f"b{n}", t0 + n * 1_000_000)
    seqs = [e.seq for e in store.outbox_read("c", 10)]
    assert store.outbox_behind("c") == (0, t0)
    store.outbox_ack("c", seqs[0])
    assert store.outbox_behind("c") == (seqs[0], t0 + 1_000_000)
    store.outbox_ack("c", seqs[-1])
    assert store.outbox_behind("c") == (seqs[-1], None)


def gate(store: Any, **kw: float) -> LagGate:
    settings = {"max_lag": 1.0, "max_wait": 10.0, "stall": 5.0, "poll": 0.02, **kw}
    return LagGate(
        store,
        "c",
        settings["max_lag"],
        settings["max_wait"],
        max_waiters=int(settings.get("max_waiters", 8)),
        stall=settings["stall"],
        poll=settings["poll"],
    )


def ack_later(store: Any, seqs: list[int], every: float) -> threading.Thread:
    """Acknowledge ``seqs`` one by one, ``every`` seconds apart, in a thread."""

    def run() -> None:
        for seq in seqs:
            time.sleep(every)
            store.outbox_ack("c", seq)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_lag_gate_lets_writes_through_while_the_consumer_keeps_up(store: Any) -> None:
    write_at(store, "fresh", now_us())
    assert gate(store).admit() == 0.0  # behind by less than max_lag
    write_at(store, "old", now_us() - 60_000_000)
    assert gate(store, max_lag=0.0).admit() == 0.0  # the gate is off


def test_lag_gate_holds_writes_until_the_consumer_catches_up(store: Any) -> None:
    write_at(store, "old", now_us() - 60_000_000)
    (seq,) = [e.seq for e in store.outbox_read("c", 10)]
    acker = ack_later(store, [seq], 0.4)
    waited = gate(store).admit()
    acker.join()
    assert 0.3 <= waited < 3.0
    assert store.outbox_behind("c") == (seq, None)


def test_lag_gate_waits_no_longer_than_max_wait(store: Any) -> None:
    # the consumer moves (not stalled) but stays far behind
    for n in range(40):
        write_at(store, f"old{n}", now_us() - 60_000_000)
    seqs = [e.seq for e in store.outbox_read("c", 100)]
    acker = ack_later(store, seqs[:20], 0.05)
    waited = gate(store, max_wait=0.6).admit()
    acker.join()
    assert 0.55 <= waited < 2.0


def test_lag_gate_stops_waiting_for_a_stalled_consumer(store: Any) -> None:
    write_at(store, "old", now_us() - 60_000_000)
    g = gate(store, stall=0.4)
    waited = g.admit()
    assert 0.35 <= waited < 2.0
    # still stalled: the next writer is not held at all
    assert g.admit() < 0.1


def test_lag_gate_turns_writers_away_once_enough_of_them_wait(store: Any) -> None:
    write_at(store, "old", now_us() - 60_000_000)
    (seq,) = [e.seq for e in store.outbox_read("c", 10)]
    g = gate(store, max_waiters=1)
    first = threading.Thread(target=g.admit)
    first.start()
    deadline = time.monotonic() + 5
    while g._waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(Busy) as refused:
        g.admit()  # a second writer is not held: it is told to come back
    assert refused.value.status == 503
    assert refused.value.headers == {"Retry-After": "10"}  # no longer than the longest wait
    store.outbox_ack("c", seq)
    first.join(5)
    assert not first.is_alive()
    assert g.admit() == 0.0
