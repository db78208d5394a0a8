"""The running hub: settings plus the opened storage ports and the outbox worker.

Built once by :func:`open_hub` and passed to the HTTP app, the listeners and the CLI. Engines
are opened lazily so a command that needs only the database does not start a search index.
"""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Sequence
from functools import cached_property
from typing import Protocol

from hie.hub.audit import SqlAuditLog, open_audit_log
from hie.hub.audit_export import AuditExporter, exporter_from_settings
from hie.hub.blobs.port import BlobStore, open_blob_store
from hie.hub.outbox import Consumer, OutboxWorker
from hie.hub.rejected import RejectedStore, open_rejected_store
from hie.hub.search.port import SearchIndex, open_search_index
from hie.hub.settings import Settings
from hie.hub.store import ResourceStore, open_resource_store

# How long a thread may keep the GIL while another waits for it (CPython's default is 5 ms).
# A hub process runs its event loop beside thread-pool threads that run the service code, and
# every SQLite call or socket write gives the GIL away: the loop then waited up to 5 ms to get
# it back before answering. 1 ms bounds that wait (one paired run of concurrent searches:
# p95 -12 % and throughput +5 % without security, p95 -8 % with it).
SWITCH_INTERVAL = 0.001


def settle_process() -> None:
    """Tune this interpreter for serving, once its start-up is done.

    ``gc.freeze()`` moves every object alive now (modules, settings, compiled SQL: ~150,000 in
    an HTTP worker) out of the collector's sight, so a full collection no longer walks them:
    130 ms -> 6 ms per full collection in a worker, a pause that used to land on whichever
    requests were in flight. Everything created later is collected as before."""
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL)


class Job(Protocol):
    """A background job the worker process runs beside the outbox worker (alert escalation)."""

    def start(self) -> None:
        """Start its thread."""

    def stop(self) -> None:
        """Stop it (after the step in hand)."""


class Hub:
    """Holds the hub's ports; close it to release them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.consumers: list[Consumer] = []
        self.jobs: list[Job] = []
        self._lock = threading.Lock()
        self._worker: OutboxWorker | None = None
        self._exporter: AuditExporter | None = None

    @cached_property
    def store(self) -> ResourceStore:
        """The resource store named by ``HIE_DATABASE_URL``."""
        return open_resource_store(
            self.settings.database_url, sqlite_synchronous=self.settings.sqlite_synchronous
        )

    @cached_property
    def audit(self) -> SqlAuditLog:
        """The audit trail (its tables are created on first use)."""
        s = self.settings
        trail = open_audit_log(
            s.database_url,
            s.audit_url,
            chain=s.audit_chain,
            # records of writes are synced as the writes are (not when SQLite's are not)
            sync_writes=not (
                s.database_url.startswith("sqlite") and s.sqlite_synchronous == "NORMAL"
            ),
        )
        trail.migrate()
        return trail

    @cached_property
    def rejected(self) -> RejectedStore:
        """The rejected-message store: what listeners refused, kept for replay."""
        store = open_rejected_store(self.settings.database_url)
        store.migrate()
        return store

    @cached_property
    def blobs(self) -> BlobStore:
        """The blob store named by ``HIE_BLOB_URL``."""
        return open_blob_store(self.settings)

    @cached_property
    def search_index(self) -> SearchIndex:
        """The full-text index named by ``HIE_SEARCH_URL``."""
        return open_search_index(self.settings)

    def add_consumers(self, consumers: Sequence[Consumer]) -> None:
        """Register outbox consumers (before :meth:`start_worker`)."""
        self.consumers.extend(consumers)

    def add_jobs(self, jobs: Sequence[Job]) -> None:
        """Register background jobs started with the worker (before :meth:`start_worker`)."""
        self.jobs.extend(jobs)

    @property
    def worker(self) -> OutboxWorker:
        """The outbox worker over the registered consumers."""
        with self._lock:
            if self._worker is None:
                self._worker = OutboxWorker(
                    self.store, self.consumers, poll_seconds=self.settings.worker_poll_seconds
                )
            return self._worker

    def start_worker(self) -> None:
        """Run the outbox worker in a background thread, the registered jobs, and the audit
        export to a syslog/ATNA collector when ``HIE_AUDIT_SYSLOG_URL`` asks for it (one
        process does all of it, so one exporter sends each record)."""
        self.worker.start()
        with self._lock:
            for job in self.jobs:
                job.start()
            if self._exporter is None:
                self._exporter = exporter_from_settings(self.settings, self.audit)
                if self._exporter is not None:
                    self._exporter.start()

    def close(self) -> None:
        """Stop the worker and the audit export, and release every opened engine."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
            for job in self.jobs:
                job.stop()
        for consumer in self.consumers:  # threads or processes of their own, if any
            close = getattr(consumer, "close", None)
            if close is not None:
                close()
        if self._exporter is not None:
            self._exporter.stop()
            self._exporter = None
        for name in ("search_index", "blobs", "rejected", "audit", "store"):
            opened = self.__dict__.pop(name, None)  # closed once, however often close() runs
            if opened is not None:
                opened.close()


def open_hub(settings: Settings) -> Hub:
    """Create the data directory and the hub (ports open on first use)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Hub(settings)
