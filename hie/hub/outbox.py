"""The outbox worker: drains committed changes, in order, to registered consumers.

Each consumer has its own durable offset in the store, so a restart resumes where it stopped;
consumers must be idempotent (an event may be delivered again after a crash between handling
and acknowledging). Embedded mode runs the worker as a thread of ``hie serve``; at scale
``hie worker`` runs it on its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Protocol

from prometheus_client import Counter, Gauge

from hie.hub.errors import Busy
from hie.hub.logging import get_logger
from hie.hub.store.port import OutboxEvent, ResourceStore

log = get_logger("hie.outbox")

EVENTS = Counter("hie_outbox_events_total", "Outbox events handled", ["consumer"])
FAILURES = Counter("hie_outbox_failures_total", "Outbox consumer failures", ["consumer"])
LAG = Gauge("hie_outbox_lag_events", "Committed events not yet handled", ["consumer"])


class Consumer(Protocol):
    """Something that reacts to committed changes (search indexing, notifications, …)."""

    name: str

    def handle(self, events: Sequence[OutboxEvent]) -> None:
        """Handle a batch in order; must be idempotent. Raise to have it retried."""


class Poller:
    """A background thread that runs :meth:`tick` until stopped, resting ``poll_seconds``
    whenever a pass finds nothing more to do at once (the outbox worker, the alert
    escalator). A failed pass is logged and the thread goes on."""

    thread_name = "hie-poller"

    def __init__(self, poll_seconds: float) -> None:
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> bool:
        """One pass; True when there may be more to do right away."""
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.tick()
            except Exception:
                log.exception("background pass failed", thread=self.thread_name)
                busy = False
            if not busy:
                self._stop.wait(self.poll_seconds)

    def start(self) -> None:
        """Start the background thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread after its current pass."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


class OutboxWorker(Poller):
    """Polls the outbox and feeds each consumer; one thread, consumers in turn."""

    thread_name = "hie-outbox"

    def __init__(
        self,
        store: ResourceStore,
        consumers: Sequence[Consumer],
        *,
        poll_seconds: float = 0.2,
        batch: int = 2000,
    ) -> None:
        super().__init__(poll_seconds)
        self.store = store
        self.consumers = list(consumers)
        self.batch = batch
        self._backoff: dict[str, float] = {}
        self._last_lag = 0.0

    def run_once(self) -> int:
        """One pass over every consumer; returns how many events were handled."""
        done = 0
        for c in self.consumers:
            if self._backoff.get(c.name, 0.0) > time.monotonic():
                continue
            events = self.store.outbox_read(c.name, self.batch)
            if not events:
                continue
            try:
                c.handle(events)
            except Exception:
                FAILURES.labels(c.name).inc()
                delay = 1.0
                self._backoff[c.name] = time.monotonic() + delay
                log.exception(
                    "outbox consumer failed; will retry", consumer=c.name, first_seq=events[0].seq
                )
                continue
            self.store.outbox_ack(c.name, events[-1].seq)
            EVENTS.labels(c.name).inc(len(events))
            done += len(events)
        return done

    def drain(self, timeout: float = 30.0) -> None:
        """Run until no consumer has pending events (tests, benchmarks, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run_once() == 0 and all(
                self.store.outbox_position(c.name)[0] >= self.store.outbox_position(c.name)[1]
                for c in self.consumers
            ):
                return
            time.sleep(0.01)
        raise TimeoutError("outbox did not drain in time")

    def update_lag(self) -> None:
        """Refresh the lag gauges."""
        for c in self.consumers:
            acked, newest = self.store.outbox_position(c.name)
            LAG.labels(c.name).set(max(0, newest - acked))

    def tick(self) -> bool:
        """One pass; the lag gauges are refreshed every few seconds."""
        handled = self.run_once()
        if time.monotonic() - self._last_lag > 5:
            self.update_lag()
            self._last_lag = time.monotonic()
        return handled > 0


LAG_WAIT = Counter(
    "hie_outbox_lag_wait_seconds_total",
    "Time writes were held back because a consumer trailed the outbox",
    ["consumer"],
)


class LagGate:
    """Holds writes back while ``consumer`` trails the outbox by more than ``max_lag``
    seconds (the age of the oldest event it has not acknowledged), so that what the hub
    acknowledges reaches that consumer within about that time: the full-text index, whose
    freshness a clinician relies on when looking for a document just sent. Senders are slowed
    instead of the lag growing without bound; the write itself has not started, so a sender
    that gives up has nothing half-done.

    A writer waits at most ``max_wait`` seconds, and not at all while the consumer has
    been behind for ``stall`` seconds without acknowledging anything (stopped, or failing):
    then writes go ahead and a warning is logged, because storing a document matters more
    than finding it at once. A waiting writer holds a request thread, so at most
    ``max_waiters`` wait at a time; the next is told :class:`Busy` (HTTP 503 with
    ``Retry-After``) at once, before anything is stored. ``max_lag`` 0 turns the gate off.
    One reading of the position serves every waiting thread for ``poll`` seconds.
    """

    def __init__(
        self,
        store: ResourceStore,
        consumer: str,
        max_lag: float,
        max_wait: float,
        *,
        max_waiters: int = 8,
        stall: float = 10.0,
        poll: float = 0.05,
    ) -> None:
        self.store = store
        self.consumer = consumer
        self.max_lag = max_lag
        self.max_wait = max_wait
        self.max_waiters = max_waiters
        self.stall = stall
        self.poll = poll
        self._waiting = 0
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._age = 0.0
        self._acked = -1
        self._progress_at = time.monotonic()  # last time the position moved, or lag began
        self._warned = False

    def admit(self) -> float:
        """Return once a write may go ahead; the seconds it waited."""
        if self.max_lag <= 0:
            return 0.0
        age, stalled = self._observe()
        if age <= self.max_lag or stalled:
            return self._admitted(age, stalled, 0.0)
        with self._lock:
            full = self._waiting >= self.max_waiters
            if not full:
                self._waiting += 1
        if full:
            raise Busy(
                f"the full-text index is {age:.0f} s behind and {self.max_waiters} writes "
                "already wait for it: nothing was stored; send this again shortly",
                retry_after=min(int(age) + 1, int(self.max_wait)),
            )
        started = time.monotonic()
        waited = 0.0
        try:
            while age > self.max_lag and not stalled and waited < self.max_wait:
                time.sleep(self.poll)
                waited = time.monotonic() - started
                age, stalled = self._observe()
        finally:
            with self._lock:
                self._waiting -= 1
        LAG_WAIT.labels(self.consumer).inc(waited)
        return self._admitted(age, stalled, waited)

    def _admitted(self, age: float, stalled: bool, waited: float) -> float:
        """A write goes ahead; said once in the log if the consumer is still behind."""
        if age > self.max_lag and not self._warned:
            self._warned = True
            log.warning(
                "outbox.lag.admitted",
                consumer=self.consumer,
                lag_seconds=round(age, 1),
                reason="stalled" if stalled else "waited too long",
            )
        return waited

    def _observe(self) -> tuple[float, bool]:
        """(seconds the consumer is behind, whether it has stopped moving), re-read at most
        every ``poll`` seconds."""
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= self.poll:
                acked, oldest = self.store.outbox_behind(self.consumer)
                age = 0.0 if oldest is None else max(0.0, time.time() - oldest / 1e6)
                if acked != self._acked or (self._age <= self.max_lag < age):
                    self._progress_at = now  # it moved, or it just fell behind
                if age <= self.max_lag:
                    self._warned = False
                self._acked, self._age, self._read_at = acked, age, now
            return self._age, now - self._progress_at >= self.stall
