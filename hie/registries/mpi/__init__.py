"""Master patient index: the matching engine (pure functions, no storage, no FHIR library).

How one incoming Patient is matched, in four steps, each a module:

1. :mod:`.features` — :func:`person_features` reads the FHIR Patient dict into
   :class:`PersonFeatures` (normalised identifiers, transliteration-proof name keys, birth
   date, gender, phones, address) and lists bad input as :class:`Problem`;
   :func:`validate_demographics` returns only the problems.
2. :mod:`.blocking` — :func:`blocking_keys` gives the short keys a person is filed under, so
   that a lookup at 10 M people touches a handful of candidates.
3. :mod:`.scoring` — :func:`score` compares two records (deterministic on national
   identifiers, else Fellegi–Sunter weights with Jaro-Winkler on names) into an explainable
   :class:`MatchScore`; :func:`decide` turns it into ``auto-link`` / ``review`` / ``new`` with
   :class:`Thresholds`; :func:`best_match` does it for a list of candidates.
4. :class:`CandidateIndex` — the in-memory ``key → person ids`` index used by the benchmark
   and tests; the hub's SQL table implements the same three methods.

The identifier systems and checks are in :mod:`hie.registries.identifiers`; the transliteration
tables and name keys in :mod:`hie.registries.translit`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from hie.hub.store.port import MAX_KEY_MEMBERS
from hie.registries.mpi.blocking import blocking_keys, swap_invariant_date
from hie.registries.mpi.features import (
    PersonFeatures,
    Problem,
    normalise_phone,
    person_features,
    validate_demographics,
)
from hie.registries.mpi.scoring import (
    DEFAULT_THRESHOLDS,
    WEIGHTS,
    Decision,
    MatchResult,
    MatchScore,
    Rule,
    Thresholds,
    best_match,
    decide,
    rank_people,
    score,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "WEIGHTS",
    "CandidateIndex",
    "Decision",
    "MatchResult",
    "MatchScore",
    "PersonFeatures",
    "Problem",
    "Rule",
    "Thresholds",
    "best_match",
    "rank_people",
    "blocking_keys",
    "decide",
    "normalise_phone",
    "person_features",
    "score",
    "swap_invariant_date",
    "validate_demographics",
]


class CandidateIndex:
    """In-memory blocking index: blocking key → the person ids filed under it.

    The interface the SQL implementation keeps: a table ``(key, person_id)`` with an index on
    ``key``; :meth:`candidates` is ``SELECT person_id, count(*) … WHERE key IN (…) GROUP BY
    person_id ORDER BY count(*) DESC, person_id LIMIT :limit``.

    A key held by one person stores the id itself rather than a one-element set: most keys are
    held by one person, and this keeps a million people in about a gigabyte.
    """

    def __init__(self) -> None:
        self._blocks: dict[str, str | set[str]] = {}
        self._keys: dict[str, tuple[str, ...]] = {}

    def __len__(self) -> int:
        """Number of people indexed."""
        return len(self._keys)

    def __contains__(self, person_id: object) -> bool:
        return person_id in self._keys

    def add(self, person_id: str, keys: Iterable[str]) -> None:
        """File ``person_id`` under ``keys``, replacing the keys it was filed under before."""
        if person_id in self._keys:
            self.remove(person_id)
        own = tuple(dict.fromkeys(keys))
        self._keys[person_id] = own
        blocks = self._blocks
        for key in own:
            held = blocks.get(key)
            if held is None:
                blocks[key] = person_id
            elif isinstance(held, str):
                if held != person_id:
                    blocks[key] = {held, person_id}
            else:
                held.add(person_id)

    def remove(self, person_id: str) -> None:
        """Forget ``person_id`` (a merged-away golden record); unknown ids are ignored."""
        blocks = self._blocks
        for key in self._keys.pop(person_id, ()):
            held = blocks.get(key)
            if isinstance(held, str):
                if held == person_id:
                    del blocks[key]
            elif held is not None:
                held.discard(person_id)
                if len(held) == 1:
                    blocks[key] = next(iter(held))
                elif not held:
                    del blocks[key]

    def candidates(self, keys: Iterable[str], limit: int = 50) -> list[str]:
        """Ids of the people sharing a key with ``keys``: most shared keys first, at most
        ``limit`` (ties by id, so the answer is deterministic). A key of more than
        :data:`~hie.hub.store.port.MAX_KEY_MEMBERS` people is too common to count."""
        counts: dict[str, int] = {}
        blocks = self._blocks
        for key in dict.fromkeys(keys):
            held = blocks.get(key)
            if held is None:
                continue
            if isinstance(held, str):
                counts[held] = counts.get(held, 0) + 1
            elif len(held) <= MAX_KEY_MEMBERS:
                for pid in held:
                    counts[pid] = counts.get(pid, 0) + 1
        if len(counts) <= 1:
            return list(counts)[:limit]
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return [pid for pid, _ in ranked[:limit]]

    def block_size(self, key: str) -> int:
        """How many people are filed under ``key``."""
        held = self._blocks.get(key)
        if held is None:
            return 0
        return 1 if isinstance(held, str) else len(held)

    def blocks(self) -> Iterator[tuple[str, int]]:
        """Every key with the number of people under it (for statistics)."""
        for key, held in self._blocks.items():
            yield key, 1 if isinstance(held, str) else len(held)
