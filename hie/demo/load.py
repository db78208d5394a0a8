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
    seed: int = 2026,
    progress: Callable[[int], None] | None = None,
) -> int:
    """PUT the demo city and ``patients`` patients with their records through ``transaction``
    (a callable that runs a FHIR transaction Bundle). Deterministic by seed, and idempotent:
    running it twice updates the same resources. Returns the number of resources sent."""
    gen = Generator(seed)
    city = list(gen.city().resources())
    transaction(as_transaction(city))
    sent = len(city)
    for _ in range(patients):
        record = gen.patient_with_record(resources_per_patient)
        transaction(as_transaction(record))
        sent += len(record)
        if progress:
            progress(1)
    return sent
