"""Scale-out search backend: an Elasticsearch 8 cluster, through the ``elasticsearch`` client.

The only module that imports ``elasticsearch``, and only when an index is opened, so the hub
runs without the client installed. One index, ``{prefix}-resources``: ``title`` and ``text`` are
analysed with the Snowball ``russian`` stemmer and, as the ``.en`` multi-field, the Snowball
English (``porter2``) stemmer, both after folding ``ё`` to ``е``; ids, resource types, patients
and filter fields (a ``flattened`` field) are keywords. Words are split on every character
that is not a letter or digit, exactly as the query parser does. ``commit`` is a refresh.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC
from typing import Any

from hie.hub.errors import StorageError
from hie.hub.search.port import (
    MARK_CLOSE,
    MARK_OPEN,
    MAX_WINDOW,
    SNIPPET_CHARS,
    IndexDoc,
    ParsedQuery,
    SearchHit,
    SearchResult,
    check_doc,
    leading_snippet,
    normalized_filters,
    page_window,
    parse_query,
)

#: Documents per bulk request, and the approximate text volume that closes a request early.
BULK_DOCS = 500
BULK_CHARS = 8_000_000
#: The unified highlighter's per-document analysis bound (characters); beyond it, no highlights.
MAX_ANALYZED_OFFSET = 1_000_000

_PREFIX = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,200}$")

INDEX_SETTINGS: dict[str, Any] = {
    "analysis": {
        "char_filter": {
            "hie_yo": {"type": "mapping", "mappings": ["ё => е", "Ё => Е"]},
        },
        # Words are runs of letters and digits, as in the query parser and the Tantivy backend
        # (the standard tokenizer would keep "37.5" or "o'brien" whole and diverge from both).
        "tokenizer": {
            "hie_words": {"type": "pattern", "pattern": "[^\\p{L}\\p{N}]+"},
        },
        "filter": {
            "hie_ru_stem": {"type": "stemmer", "language": "russian"},
            "hie_en_stem": {"type": "stemmer", "language": "porter2"},
        },
        "analyzer": {
            "hie_ru": {
                "type": "custom",
                "tokenizer": "hie_words",
                "char_filter": ["hie_yo"],
                "filter": ["lowercase", "hie_ru_stem"],
            },
            "hie_en": {
                "type": "custom",
                "tokenizer": "hie_words",
                "char_filter": ["hie_yo"],
                "filter": ["lowercase", "hie_en_stem"],
            },
        },
    },
}


def _text_mapping() -> dict[str, Any]:
    # Offsets in the postings let the unified highlighter skip re-analysing long documents.
    return {
        "type": "text",
        "analyzer": "hie_ru",
        "index_options": "offsets",
        "fields": {"en": {"type": "text", "analyzer": "hie_en", "index_options": "offsets"}},
    }


INDEX_MAPPINGS: dict[str, Any] = {
    "dynamic": "strict",
    "properties": {
        "id": {"type": "keyword"},
        "resource_type": {"type": "keyword"},
        "patient": {"type": "keyword"},
        "fields": {"type": "flattened"},
        "title": _text_mapping(),
        "text": _text_mapping(),
        "date": {"type": "date"},
    },
}

_SEARCH_FIELDS = ["title^2", "title.en^2", "text", "text.en"]


class ElasticsearchSearchIndex:
    """The scale-out :class:`~hie.hub.search.port.SearchIndex` (thread-safe, like its client)."""

    def __init__(
        self,
        url: str,
        *,
        index_prefix: str = "hie",
        api_key: str | None = None,
        request_timeout: float = 30.0,
        client: Any = None,
    ) -> None:
        try:
            import elasticsearch
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise StorageError(
                "HIE_SEARCH_URL points at Elasticsearch but the client is not installed: "
                "pip install 'elasticsearch>=8,<9'"
            ) from exc
        if not _PREFIX.match(index_prefix):
            raise ValueError(f"invalid Elasticsearch index prefix {index_prefix!r}")
        self._errors: tuple[type[Exception], ...] = (
            elasticsearch.ApiError,
            elasticsearch.TransportError,
        )
        self._not_found: type[Exception] = elasticsearch.NotFoundError
        self._bad_request: type[Exception] = elasticsearch.BadRequestError
        self._owns_client = client is None
        self._es: Any = client or elasticsearch.Elasticsearch(
            url, api_key=api_key, request_timeout=request_timeout
        )
        self.index_name = f"{index_prefix}-resources"
        self._closed = False
        self._ensure_index()

    @contextmanager
    def _engine(self, what: str) -> Iterator[None]:
        """Turn client failures into :class:`StorageError` (the hub's error for engines)."""
        if self._closed:
            raise RuntimeError("search index is closed")
        try:
            yield
        except self._errors as exc:
            raise StorageError(f"Elasticsearch {what} failed: {exc}") from exc

    def _ensure_index(self) -> None:
        with self._engine("index creation"):
            if self._es.indices.exists(index=self.index_name):
                return
            try:
                self._es.indices.create(
                    index=self.index_name, settings=INDEX_SETTINGS, mappings=INDEX_MAPPINGS
                )
            except self._bad_request as exc:
                # Another process created it first.
                if "resource_already_exists_exception" not in str(exc):
                    raise

    # -- writing -------------------------------------------------------------------------------

    def upsert(self, docs: Sequence[IndexDoc]) -> None:
        """Index items by id (replacing); durable on return, searchable after :meth:`commit`."""
        for doc in docs:
            check_doc(doc)
        ops: list[dict[str, Any]] = []
        chars = 0
        for doc in docs:
            ops.append({"index": {"_index": self.index_name, "_id": doc.id}})
            ops.append(_source(doc))
            chars += len(doc.text) + len(doc.title)
            if len(ops) >= 2 * BULK_DOCS or chars >= BULK_CHARS:
                self._bulk(ops)
                ops, chars = [], 0
        if ops:
            self._bulk(ops)

    def delete(self, ids: Sequence[str]) -> None:
        """Remove items by id (unknown ids are ignored); searchable after :meth:`commit`."""
        for start in range(0, len(ids), BULK_DOCS):
            chunk = ids[start : start + BULK_DOCS]
            self._bulk([{"delete": {"_index": self.index_name, "_id": i}} for i in chunk])

    def _bulk(self, ops: list[dict[str, Any]]) -> None:
        with self._engine("bulk write"):
            resp = self._es.bulk(operations=ops)
        if not resp["errors"]:
            return
        for item in resp["items"]:
            ((action, result),) = item.items()
            if action == "delete" and result.get("status") == 404:
                continue
            if result.get("error"):
                raise StorageError(f"Elasticsearch {action} of {result.get('_id')!r} failed")

    def commit(self) -> None:
        """Refresh the index so every acknowledged write is searchable on return."""
        with self._engine("refresh"):
            self._es.indices.refresh(index=self.index_name)

    def clear(self) -> None:
        """Delete every item and refresh."""
        with self._engine("clear"):
            self._es.delete_by_query(
                index=self.index_name,
                query={"match_all": {}},
                conflicts="proceed",
                refresh=True,
                slices="auto",
            )

    def drop(self) -> None:
        """Delete the whole Elasticsearch index (tests and decommissioning); then close."""
        with self._engine("index deletion"):
            self._es.options(ignore_status=404).indices.delete(index=self.index_name)
        self.close()

    def close(self) -> None:
        """Close the client connection pool (when this object created the client)."""
        if not self._closed:
            self._closed = True
            if self._owns_client:
                self._es.close()

    # -- reading -------------------------------------------------------------------------------

    def search(
        self,
        query: str,
        *,
        resource_type: str | None = None,
        patient: str | None = None,
        filters: Mapping[str, Sequence[str]] | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> SearchResult:
        """Best-first page of items matching ``query``, with ``<mark>`` snippets."""
        limit, offset = page_window(limit, offset)
        body = _query(parse_query(query), resource_type, patient, filters)
        if body is None:
            return SearchResult(total=0, hits=[])
        with self._engine("search"):
            resp = self._es.search(
                index=self.index_name,
                query=body,
                from_=offset,
                size=limit,
                track_total_hits=True,
                source=False,
                highlight=_HIGHLIGHT,
            )
        hits = [
            SearchHit(
                id=hit["_id"],
                score=float(hit.get("_score") or 0.0),
                snippet=_snippet(hit.get("highlight", {})),
            )
            for hit in resp["hits"]["hits"]
        ]
        return SearchResult(total=int(resp["hits"]["total"]["value"]), hits=hits)

    def ids_matching(
        self,
        query: str,
        resource_type: str | None,
        patient: str | None = None,
        limit: int = MAX_WINDOW,
    ) -> list[str]:
        """Ids of up to ``limit`` matching items: best first within :data:`MAX_WINDOW`, beyond
        it in id order (``search_after``)."""
        body = _query(parse_query(query), resource_type, patient, None)
        if body is None or limit <= 0:
            return []
        if limit <= MAX_WINDOW:
            with self._engine("search"):
                resp = self._es.search(
                    index=self.index_name,
                    query=body,
                    size=limit,
                    source=False,
                    track_total_hits=False,
                )
            return [hit["_id"] for hit in resp["hits"]["hits"]]
        ids: list[str] = []
        after: list[Any] | None = None
        while len(ids) < limit:
            size = min(MAX_WINDOW, limit - len(ids))
            extra = {"search_after": after} if after is not None else {}
            with self._engine("search"):
                resp = self._es.search(
                    index=self.index_name,
                    query=body,
                    size=size,
                    source=False,
                    sort=[{"id": "asc"}],
                    track_total_hits=False,
                    **extra,
                )
            page = resp["hits"]["hits"]
            ids.extend(hit["_id"] for hit in page)
            if len(page) < size:
                break
            after = page[-1]["sort"]
        return ids

    def count(self) -> int:
        """Number of items visible to searches (refreshed)."""
        with self._engine("count"):
            return int(self._es.count(index=self.index_name)["count"])


def _source(doc: IndexDoc) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": doc.id,
        "resource_type": doc.resource_type,
        "title": unicodedata.normalize("NFC", doc.title),
        "text": unicodedata.normalize("NFC", doc.text),
        "fields": {name: list(dict.fromkeys(values)) for name, values in doc.fields.items()},
    }
    if doc.patient:
        body["patient"] = doc.patient
    if doc.date is not None:
        date = doc.date if doc.date.tzinfo else doc.date.replace(tzinfo=UTC)
        body["date"] = date.astimezone(UTC).isoformat()
    return body


def _query(
    parsed: ParsedQuery,
    resource_type: str | None,
    patient: str | None,
    filters: Mapping[str, Sequence[str]] | None,
) -> dict[str, Any] | None:
    """The bool query: one phrase ``multi_match`` per unit (AND), filters as ``filter``."""
    kv = normalized_filters(filters)
    if parsed.empty or kv is None:
        return None
    must = [
        {"multi_match": {"query": " ".join(unit), "type": "phrase", "fields": _SEARCH_FIELDS}}
        for unit in parsed.units
    ]
    restrict: list[dict[str, Any]] = []
    if resource_type is not None:
        restrict.append({"term": {"resource_type": resource_type}})
    if patient is not None:
        restrict.append({"term": {"patient": patient}})
    for name, values in kv.items():
        restrict.append({"terms": {f"fields.{name}": values}})
    return {"bool": {"must": must, "filter": restrict}}


_HIGHLIGHT: dict[str, Any] = {
    "type": "unified",
    "encoder": "html",
    "pre_tags": [MARK_OPEN],
    "post_tags": [MARK_CLOSE],
    "fragment_size": SNIPPET_CHARS,
    "number_of_fragments": 1,
    "require_field_match": True,
    "max_analyzed_offset": MAX_ANALYZED_OFFSET,
    "fields": {
        "text": {"no_match_size": SNIPPET_CHARS},
        "text.en": {},
        "title": {"no_match_size": SNIPPET_CHARS},
        "title.en": {},
    },
}


def _snippet(highlight: Mapping[str, list[str]]) -> str:
    """Pick the fragment with the most matches (text before title), re-escaped uniformly."""
    for fields in (("text", "text.en"), ("title", "title.en")):
        fragments = [frag for name in fields for frag in highlight.get(name, [])[:1]]
        best = max(fragments, key=lambda f: f.count(MARK_OPEN), default="")
        if MARK_OPEN in best:
            return _safe(best)
    for name in ("text", "title"):
        for frag in highlight.get(name, [])[:1]:
            return leading_snippet(html.unescape(frag))
    return ""


def _safe(fragment: str) -> str:
    """Keep only our ``<mark>`` tags as markup; everything else escaped as ``html.escape`` does."""
    parts = re.split(f"({re.escape(MARK_OPEN)}|{re.escape(MARK_CLOSE)})", fragment)
    out: list[str] = []
    depth = 0
    for part in parts:
        if part == MARK_OPEN:
            if depth == 0:
                out.append(part)
            depth += 1
        elif part == MARK_CLOSE:
            if depth == 1:
                out.append(part)
            depth = max(depth - 1, 0)
        else:
            out.append(html.escape(html.unescape(part)))
    if depth:
        out.append(MARK_CLOSE)
    return " ".join("".join(out).split())
