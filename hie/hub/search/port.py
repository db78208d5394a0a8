"""The search-index port: full text of resources and documents, Russian first, with English.

Every backend (Tantivy embedded, Elasticsearch at scale) implements :class:`SearchIndex` and
passes ``tests/contract/test_search_index.py``. What the backends share is written once here:
the query language (:func:`parse_query`), text normalisation, paging limits, filter checks and
HTML-safe snippet building.

Query language: the user's words as plain text. Words are runs of letters and digits; every
other character is a separator, so nothing the user types reaches an engine's query parser.
All words must match (AND); a word matches by its Russian or English stem. Text in double
quotes (or «…», “…”) is a phrase whose words must appear in order. An unbalanced quote is
ignored. A query with no words left matches nothing.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from hie.hub.settings import Settings

#: Results beyond ``offset + limit`` of this many are not served (Elasticsearch's default
#: ``index.max_result_window``; the same bound for every backend keeps them interchangeable).
MAX_WINDOW = 10_000
#: A query keeps at most this many words/phrases; the rest are ignored.
MAX_QUERY_UNITS = 32
#: A phrase keeps at most this many words.
MAX_PHRASE_WORDS = 16
#: Words longer than this (in characters) are not indexed nor searched.
MAX_WORD_CHARS = 60
#: Length (in characters) of a snippet fragment.
SNIPPET_CHARS = 200

MARK_OPEN = "<mark>"
MARK_CLOSE = "</mark>"

_FIELD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$")
_WORD = re.compile(r"[^\W_]+")
_QUOTES = str.maketrans({"«": '"', "»": '"', "“": '"', "”": '"', "„": '"', "‟": '"'})


@dataclass(frozen=True, slots=True)
class IndexDoc:
    """One searchable item: a resource or a document body, keyed by ``"Type/id"``.

    ``fields`` are exact-match filter fields (keyword semantics), e.g.
    ``{"org": ["Organization/5"], "type": ["34108-1"], "status": ["current"]}``; names match
    ``[A-Za-z0-9_][A-Za-z0-9_.:-]*``. ``date`` is stored for later sorting (UTC; naive means UTC).
    """

    id: str
    resource_type: str
    text: str
    title: str = ""
    patient: str | None = None
    fields: dict[str, list[str]] = field(default_factory=dict)
    date: datetime | None = None


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One match: the item's id, its relevance score and an HTML-safe snippet.

    ``snippet`` is escaped text in which matching words are wrapped in ``<mark>…</mark>``; it
    can be placed into HTML as is.
    """

    id: str
    score: float
    snippet: str


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One page of matches and the total number of matching items."""

    total: int
    hits: list[SearchHit]


@runtime_checkable
class SearchIndex(Protocol):
    """Full-text index of resources and documents (Russian and English morphology)."""

    def upsert(self, docs: Sequence[IndexDoc]) -> None:
        """Add items, replacing any stored item with the same id; visible after :meth:`commit`."""
        ...

    def delete(self, ids: Sequence[str]) -> None:
        """Remove items by id (unknown ids are ignored); effective after :meth:`commit`."""
        ...

    def commit(self) -> None:
        """Make every preceding upsert and delete durable and visible to searches on return."""
        ...

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
        """Find items matching the user's ``query`` (see the module docstring), best first.

        ``resource_type`` and ``patient`` restrict to exact values; each ``filters`` entry
        restricts to items having at least one of the listed values in that field (an empty list
        matches nothing), entries combine with AND. ``total`` counts all matches; ``hits`` is
        the page ``[offset, offset + limit)``, never reaching past :data:`MAX_WINDOW`. Never
        raises on odd query text: a query without words returns no hits.
        """
        ...

    def ids_matching(
        self,
        query: str,
        resource_type: str | None,
        patient: str | None = None,
        limit: int = MAX_WINDOW,
    ) -> list[str]:
        """Ids of up to ``limit`` items matching ``query`` (for FHIR ``_content``/``_text``).

        Order is best-first where the backend can afford it; callers must not rely on it.
        """
        ...

    def count(self) -> int:
        """Number of committed items in the index."""
        ...

    def clear(self) -> None:
        """Remove every item (committed on return); used before a full re-index."""
        ...

    def close(self) -> None:
        """Release the index (writer lock, connections); the object is unusable afterwards."""
        ...


@dataclass(frozen=True, slots=True)
class ParsedQuery:
    """A user query reduced to words: each unit is one word or a phrase (several words)."""

    units: tuple[tuple[str, ...], ...]

    @property
    def empty(self) -> bool:
        """True when nothing searchable is left (the query matches nothing)."""
        return not self.units


def normalize_text(text: str) -> str:
    """NFC-normalise and fold ``ё`` to ``е`` (same length in characters and UTF-8 bytes).

    ``str.replace`` rather than ``str.translate``: a translation table is looked up per
    character, 7 ms for a 100,000-character Russian document against 0.2 ms (every document
    indexed, every snippet shown)."""
    return unicodedata.normalize("NFC", text).replace("ё", "е").replace("Ё", "Е")


def _words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text) if len(w) <= MAX_WORD_CHARS]


def parse_query(query: str) -> ParsedQuery:
    """Split user text into words and quoted phrases; never raises, never keeps syntax.

    Only letters and digits survive; duplicates are dropped; at most :data:`MAX_QUERY_UNITS`
    units are kept.
    """
    text = normalize_text(query).translate(_QUOTES)
    parts = text.split('"')
    if len(parts) % 2 == 0:
        # An unbalanced quote: the last one opens nothing, treat it as a separator.
        parts[-2:] = [parts[-2] + " " + parts[-1]]
    units: list[tuple[str, ...]] = []
    seen: set[tuple[str, ...]] = set()
    for i, part in enumerate(parts):
        words = _words(part)
        candidates = [tuple(words[:MAX_PHRASE_WORDS])] if i % 2 == 1 else [(w,) for w in words]
        for unit in candidates:
            key = tuple(w.lower() for w in unit)
            if unit and key not in seen:
                seen.add(key)
                units.append(unit)
    return ParsedQuery(tuple(units[:MAX_QUERY_UNITS]))


def page_window(limit: int, offset: int) -> tuple[int, int]:
    """Clamp a page to :data:`MAX_WINDOW`; returns ``(limit, offset)``, limit may become 0."""
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must not be negative")
    offset = min(offset, MAX_WINDOW)
    return min(limit, MAX_WINDOW - offset), offset


def check_field_name(name: str) -> str:
    """Return ``name`` if it is a valid filter-field name, else raise ``ValueError``."""
    if not _FIELD_NAME.match(name):
        raise ValueError(f"invalid search filter field name {name!r}")
    return name


def normalized_filters(
    filters: Mapping[str, Sequence[str]] | None,
) -> dict[str, list[str]] | None:
    """Validate filter names and listify values; ``None`` when some filter can match nothing."""
    out: dict[str, list[str]] = {}
    for name, values in (filters or {}).items():
        check_field_name(name)
        if isinstance(values, str):
            values = [values]
        if not values:
            return None
        out[name] = list(dict.fromkeys(values))
    return out


def check_doc(doc: IndexDoc) -> None:
    """Raise ``ValueError`` for an item no backend can store consistently."""
    if not doc.id or not doc.resource_type:
        raise ValueError("an indexed item needs an id and a resource_type")
    for name, values in doc.fields.items():
        check_field_name(name)
        if isinstance(values, str):
            raise ValueError(f"field {name!r} must be a list of strings")


def leading_snippet(text: str) -> str:
    """The start of ``text`` (cut at a word boundary), escaped: the snippet when nothing matched."""
    text = " ".join(text.split())
    if len(text) > SNIPPET_CHARS:
        cut = text.rfind(" ", 0, SNIPPET_CHARS)
        text = text[: cut if cut > SNIPPET_CHARS // 2 else SNIPPET_CHARS]
    return html.escape(text)


def open_search_index(settings: Settings, *, index_prefix: str = "hie") -> SearchIndex:
    """Open the index ``settings.search_url`` names.

    ``embedded`` (the default) opens Tantivy under ``settings.data_dir / "search"``;
    ``http(s)://…`` opens Elasticsearch there (credentials may be given in the URL), using
    indices named ``{index_prefix}-resources``.
    """
    url = settings.search_url.strip()
    if url in ("", "embedded"):
        from hie.hub.search.tantivy_index import TantivySearchIndex

        return TantivySearchIndex(settings.data_dir / "search")
    if url.startswith(("http://", "https://")):
        from hie.hub.search.elastic import ElasticsearchSearchIndex

        return ElasticsearchSearchIndex(url, index_prefix=index_prefix)
    raise ValueError(f"unsupported HIE_SEARCH_URL {url!r}: use 'embedded' or http(s)://…")
