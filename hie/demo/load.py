"""Load a synthetic city into a running hub's store (``hie demo``; ``make run``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hie.demo.generator import Generator, as_transaction


def load_demo(
    transaction: Callable[[dict[str, Any]], object],
    *,
    patients: int = 50,
    resources_per_patient: int = 40,
    documents_per_patient: int = 4,
    seed: int = 2026,
    progress: Callable[[int], None] | None = None,
) -> int:
    """PUT the demo city and ``patients`` patients with their records through ``transaction``
    (a callable that runs a FHIR transaction Bundle). Deterministic by seed, and idempotent:
    running it twice updates the same resources. Returns the number of resources sent.

    Each patient also gets 2 to ``documents_per_patient`` clinical documents of their record
    (:meth:`Generator.patient_documents`; 0: none), each sent as an MO's system publishes one
    (an IHE MHD ITI-65 submission: List, DocumentReference and Binary with its ``data``), but
    PUT at fixed ids so that a second run updates them. With a blob store behind
    ``transaction`` the bodies go there and the outbox worker indexes their text."""
    gen = Generator(seed)
    city = list(gen.city().resources())
    transaction(as_transaction(city))
    sent = len(city)
    for _ in range(patients):
        record = gen.patient_with_record(resources_per_patient)
        submissions = gen.patient_documents(record, documents_per_patient)
        transaction(as_transaction(record))
        sent += len(record)
        # ITI-65 carries one submission set a bundle: one transaction per document
        for submission in submissions:
            transaction(as_transaction(submission))
            sent += len(submission)
        if progress:
            progress(1)
    return sent
