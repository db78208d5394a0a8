"""Outbox consumer that keeps the full-text search index in step with the resource store.

Only types whose text is worth searching are indexed (documents, reports, conditions, …);
high-volume coded data such as lab Observations is searched through the SQL index instead.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import orjson

from hie.hub.search.port import IndexDoc, SearchIndex
from hie.hub.store.port import OutboxEvent, ResourceStore

FULLTEXT_TYPES = frozenset(
    {
        "DocumentReference",
        "DiagnosticReport",
        "Condition",
        "AllergyIntolerance",
        "Communication",
        "Composition",
        "Procedure",
        "ServiceRequest",
        "Encounter",
    }
)
_SKIP_KEYS = {"reference", "system", "url", "id", "versionId", "lastUpdated", "data", "div"}
_TAG = re.compile(r"<[^>]+>")


def _strings(node: Any, key: str = "") -> Iterator[str]:
    if isinstance(node, str):
        if key not in _SKIP_KEYS:
            yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v, key)


def resource_text(res: dict[str, Any]) -> str:
    """Searchable text of a resource: its narrative plus every human-readable string."""
    parts = []
    div = (res.get("text") or {}).get("div")
    if isinstance(div, str):
        parts.append(html.unescape(_TAG.sub(" ", div)))
    parts.extend(_strings({k: v for k, v in res.items() if k not in ("text", "meta")}))
    return "\n".join(p for p in parts if p.strip())


def _patient_of(res: dict[str, Any]) -> str | None:
    for key in ("subject", "patient"):
        ref = (res.get(key) or {}).get("reference") if isinstance(res.get(key), dict) else None
        if isinstance(ref, str) and ref.startswith("Patient/"):
            return ref
    return None


def to_doc(res: dict[str, Any], extra_text: str = "") -> IndexDoc:
    """The index document for a resource."""
    title = ""
    for key in ("description", "title"):
        if isinstance(res.get(key), str):
            title = res[key]
            break
    if not title and isinstance(res.get("code"), dict):
        title = str(res["code"].get("text") or "")
    fields: dict[str, list[str]] = {}
    if isinstance(res.get("status"), str):
        fields["status"] = [res["status"]]
    text = resource_text(res)
    if extra_text:
        text = f"{text}\n{extra_text}"
    return IndexDoc(
        id=f"{res['resourceType']}/{res['id']}",
        resource_type=res["resourceType"],
        text=text,
        title=title,
        patient=_patient_of(res),
        fields=fields,
    )


class SearchIndexer:
    """Indexes created/updated resources and removes deleted ones (idempotent by design:
    an upsert of the current version is the same however often it runs)."""

    name = "search-index"

    def __init__(self, store: ResourceStore, index: Callable[[], SearchIndex]) -> None:
        self.store = store
        self.index = index

    def handle(self, events: Sequence[OutboxEvent]) -> None:
        """Bring the index in line with the current state of every resource in ``events``."""
        refs = list(
            dict.fromkeys(
                (e.resource_type, e.id) for e in events if e.resource_type in FULLTEXT_TYPES
            )
        )
        if not refs:
            return
        current = {(r.resource_type, r.id): r for r in self.store.read_many(refs)}
        docs, gone = [], []
        for ref in refs:
            stored = current.get(ref)
            if stored is None or stored.content is None:
                gone.append(f"{ref[0]}/{ref[1]}")
            else:
                docs.append(to_doc(orjson.loads(stored.content)))
        idx = self.index()
        if gone:
            idx.delete(gone)
        if docs:
            idx.upsert(docs)
        idx.commit()
