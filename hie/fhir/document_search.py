"""Full-text search of documents with snippets: ``DocumentReference/$search-text``.

The text index (:mod:`hie.hub.search`) finds the candidates and ranks them; the resource store
decides which of them the caller may see. The order of the work keeps access control inside the
store query, never a filter applied to a page:

1. the index gives the ids of every document matching the words (of the patient's identity
   group when ``patient`` is given), up to :data:`~hie.hub.search.port.MAX_WINDOW`;
2. one store query per chunk keeps those the caller's grant allows (``IdCond`` + the grant's
   conditions, and the patient's records when ``patient`` is given): the current versions only;
3. the index ranks and pages **only those** (filter field ``ref``), with ``<mark>`` snippets,
   so ``total``, the page and the next link count visible documents only.

Each entry carries ``search.score`` and the snippet as the extension
:data:`SNIPPET_EXTENSION` on ``entry.search`` (where FHIR puts ``match-grade`` too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson

from hie.fhir.dates import format_instant
from hie.fhir.service import FhirService, new_id
from hie.hub.audit import note_access
from hie.hub.errors import InvalidRequest, NotSupported
from hie.hub.search.port import MAX_WINDOW, parse_query
from hie.hub.store.port import (
    AnyOf,
    Condition,
    IdCond,
    Query,
    ReferenceCond,
    ResourceStore,
    StoredResource,
    TokenCond,
)
from hie.hub.store.sql import now_us

Json = dict[str, Any]
SNIPPET_EXTENSION = "https://hie.spb.ru/fhir/StructureDefinition/search-snippet"
#: Ids per store query when checking candidates against the grant.
ID_CHUNK = 500
_PARAMS = frozenset({"q", "patient", "status", "_count", "_offset", "_format", "_pretty"})


@dataclass(frozen=True, slots=True)
class TextSearch:
    """The parameters of one ``$search-text`` request."""

    q: str
    patient: str | None  # a Patient id (golden or any linked record)
    status: tuple[str, ...]
    count: int
    offset: int


def _int(value: str, what: str) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > 9:
        raise InvalidRequest(f"{what} must be a non-negative integer")
    return int(value)


def parse_params(
    items: Sequence[tuple[str, str]], default_count: int, max_count: int
) -> TextSearch:
    """Check the query parameters: ``q`` (required, some words), ``patient``, ``status``
    (comma-separated), ``_count``, ``_offset``; anything else is refused (400)."""
    values: dict[str, str] = {}
    for key, value in items:
        if key not in _PARAMS:
            raise InvalidRequest(
                f"parameter {key!r} is not supported on $search-text "
                "(use q, patient, status, _count, _offset)"
            )
        if key in values:
            raise InvalidRequest(f"parameter {key!r} is given more than once")
        values[key] = value
    q = values.get("q", "")
    if not q.strip():
        raise InvalidRequest("q is required: the words to search the documents' text for")
    if len(q) > 1000:
        raise InvalidRequest("q is too long (at most 1000 characters)")
    if parse_query(q).empty:
        raise InvalidRequest(f"q {q!r} has no words to search for (letters or digits)")
    patient = values.get("patient", "").strip().removeprefix("Patient/") or None
    if patient is not None and ("/" in patient or len(patient) > 64):
        raise InvalidRequest("patient must be a Patient id or Patient/<id>")
    count = min(_int(values.get("_count", str(default_count)), "_count"), max_count)
    offset = _int(values.get("_offset", "0"), "_offset")
    if offset >= MAX_WINDOW:
        raise InvalidRequest(f"_offset must be below {MAX_WINDOW}")
    status = tuple(s for s in values.get("status", "").split(",") if s)
    return TextSearch(q, patient, status, count, offset)


def identity_group(store: ResourceStore, patient_id: str) -> list[str]:
    """Every Patient id of the person ``patient_id`` is a record of (the golden record and
    each MO's record, linked by the master patient index); just the id when not linked."""
    with store.identity_reader() as idx:
        group = idx.group_of("Patient", patient_id)
        members = [m.id for m in idx.members("Patient", group)] if group else []
    return list(dict.fromkeys([patient_id, *members]))


def visible_documents(
    store: ResourceStore, ids: Sequence[str], conds: Sequence[Condition]
) -> dict[str, StoredResource]:
    """The current DocumentReferences among ``ids`` that match ``conds`` (the caller's grant
    and the request's own conditions), by id; queried in chunks of :data:`ID_CHUNK`."""
    out: dict[str, StoredResource] = {}
    for start in range(0, len(ids), ID_CHUNK):
        chunk = tuple(ids[start : start + ID_CHUNK])
        q = Query("DocumentReference", [IdCond(chunk), *conds], count=len(chunk))
        out.update((r.id, r) for r in store.search(q).items)
    return out


def subject_patients(items: Sequence[StoredResource]) -> list[str]:
    """The Patient ids the documents are about (``subject``), for the audit record."""
    out: dict[str, None] = {}
    for r in items:
        ref = (orjson.loads(r.content or b"{}").get("subject") or {}).get("reference")
        if isinstance(ref, str) and ref.startswith("Patient/"):
            out[ref.removeprefix("Patient/")] = None
    return list(out)


def search_text(svc: FhirService, items: Sequence[tuple[str, str]], base: str) -> bytes:
    """``DocumentReference/$search-text``: a searchset Bundle (JSON bytes), best match first."""
    params = parse_params(items, svc.settings.page_size, svc.settings.max_page_size)
    if svc.search_index is None:
        raise NotSupported("$search-text needs the full-text search index (not enabled)")
    note_access("search", action="R")
    grant = svc.grant("DocumentReference", "s")
    conds: list[Condition] = list(grant.conds)
    members: list[str | None] = [None]
    if params.patient is not None:
        members = list(identity_group(svc.store, params.patient))
        # the store has the last word on whose document it is (the index may lag behind)
        conds.append(ReferenceCond("patient", "Patient", params.patient, expand=True))
        note_access(patients=[params.patient])
    # as ITI-67: the current documents unless the client names statuses
    statuses = params.status or ("current",)
    conds.append(AnyOf(tuple(TokenCond("status", None, s) for s in statuses)))
    index = svc.search_index()
    entries: list[Json] = []
    page: list[StoredResource] = []
    if not grant.restricted and params.patient is None:
        # nothing to hide: the index ranks and pages on its own, the store reads the page
        found = index.search(
            params.q,
            resource_type="DocumentReference",
            filters={"status": list(statuses)},
            limit=params.count,
            offset=params.offset,
        )
        refs = [("DocumentReference", h.id.removeprefix("DocumentReference/")) for h in found.hits]
        visible = {r.id: r for r in svc.store.read_many(refs)}
    else:
        candidates: dict[str, None] = {}
        for member in members:
            patient = f"Patient/{member}" if member is not None else None
            hits = index.ids_matching(params.q, "DocumentReference", patient, limit=MAX_WINDOW)
            for rid in hits:
                candidates[rid.removeprefix("DocumentReference/")] = None
        visible = visible_documents(svc.store, list(candidates), conds)
        found = index.search(
            params.q,
            resource_type="DocumentReference",
            filters={"ref": [f"DocumentReference/{i}" for i in visible]},
            limit=params.count,
            offset=params.offset,
        )
    total = found.total
    for hit in found.hits:
        doc = visible.get(hit.id.removeprefix("DocumentReference/"))
        if doc is None:  # deleted since it was indexed
            continue
        page.append(doc)
        entries.append(
            {
                "fullUrl": f"{base}/DocumentReference/{doc.id}",
                "resource": orjson.Fragment(doc.content or b"{}"),
                "search": {
                    "extension": [{"url": SNIPPET_EXTENSION, "valueString": hit.snippet}],
                    "mode": "match",
                    "score": round(hit.score, 6),
                },
            }
        )
    note_access(
        entities=[f"DocumentReference/{r.id}" for r in page], patients=subject_patients(page)
    )
    links = [{"relation": "self", "url": _url(base, list(items))}]
    if params.count and params.offset + params.count < min(total, MAX_WINDOW):
        nxt = [(k, v) for k, v in items if k != "_offset"]
        nxt.append(("_offset", str(params.offset + params.count)))
        links.append({"relation": "next", "url": _url(base, nxt)})
    bundle: Json = {
        "resourceType": "Bundle",
        "id": new_id(),
        "meta": {"lastUpdated": format_instant(now_us())},
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": entries,
    }
    return orjson.dumps(bundle)


def _url(base: str, items: list[tuple[str, str]]) -> str:
    qs = urlencode(items)
    return f"{base}/DocumentReference/$search-text" + (f"?{qs}" if qs else "")
