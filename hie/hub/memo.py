"""A memo looked up by the identity of immutable objects that recur from request to request.

A cached grant hands every request of its principal the same tuple of conditions, and the
token cache the same :class:`~hie.hub.auth.Principal`. Looking those up in a dict by value
hashes their whole tree each time (a care relationship's conditions are a few dozen nested
dataclasses: 13 µs a read). Looked up by identity first, a repeat costs one dict probe; the
memo holds the objects, so their ids cannot be reused while it knows them.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class IdentityMemo(Generic[V]):
    """Values keyed by a plain hashable part and the identity of some objects."""

    def __init__(self, maxsize: int = 1024) -> None:
        self.maxsize = maxsize
        self._memo: dict[tuple[Hashable, ...], tuple[tuple[object, ...], V]] = {}

    def get(self, key: Hashable, *objects: object) -> V | None:
        """The value put for ``key`` and these very ``objects``, or None."""
        hit = self._memo.get((key, *map(id, objects)))
        if hit is None or any(a is not b for a, b in zip(hit[0], objects, strict=True)):
            return None
        return hit[1]

    def put(self, value: V, key: Hashable, *objects: object) -> V:
        """Remember ``value`` for ``key`` and ``objects``; returns it."""
        if len(self._memo) >= self.maxsize:  # bounded; a clear is rare and only costs rebuilds
            self._memo.clear()
        self._memo[(key, *map(id, objects))] = (objects, value)
        return value
