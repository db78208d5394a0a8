"""Embedded search backend: Tantivy in process, under ``<data_dir>/search/resources``.

The only module that imports ``tantivy``. Title and text are analysed once, lowercased
(``ё`` folded to ``е`` before analysis) and stemmed by the Russian Snowball stemmer, then the
English one: each stems only words of its own alphabet and leaves the others as they are, so a
Cyrillic word gets its Russian stem and a Latin word its English stem (on the bench corpus's
10,167 distinct words, exactly the stems the two stemmers give apart). Documents indexed before
2026-11-24 (same schema) also hold their text in ``*_en`` fields, analysed by the English
stemmer alone, and Latin words unstemmed in ``*_ru``; queries still ask the ``*_en`` fields, so
those documents are found by English word forms until ``hie search reindex`` rewrites them.

Ids, resource types, patients and filter fields are raw (untokenised) terms. Deletion and
replacement go by the raw ``id`` term.

Tantivy allows one ``IndexWriter`` per index directory (a lock file, across processes), so every
:class:`TantivySearchIndex` opened on the same directory in this process shares one handle: one
index, one lazily created writer behind a lock, and the reader reloaded after each commit.
"""

from __future__ import annotations

import html
import os
import threading
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import tantivy

from hie.hub.errors import StorageError
from hie.hub.search.port import (
    MARK_CLOSE,
    MARK_OPEN,
    MAX_WINDOW,
    MAX_WORD_CHARS,
    SNIPPET_CHARS,
    IndexDoc,
    ParsedQuery,
    SearchHit,
    SearchResult,
    check_doc,
    leading_snippet,
    normalize_text,
    normalized_filters,
    page_window,
    parse_query,
)

SCHEMA_VERSION = 1
_RU = "hie_ru"
_EN = "hie_en"
#: Separates a filter field's name from its value in the raw ``kv`` term.
_KV_SEP = "\x1f"
#: (field, analyzer name, boost) searched for every query word. New documents fill only the
#: ``*_ru`` fields (both stemmers, see the module docstring): one analysis of the text instead
#: of two, 4.5 -> 2.8 ms of CPU per document of the bench corpus (34,000 characters).
_TEXT_FIELDS = (
    ("title_ru", _RU, 2.0),
    ("title_en", _EN, 2.0),
    ("text_ru", _RU, 1.0),
    ("text_en", _EN, 1.0),
)
_SNIPPET_FIELDS = ("title_ru", "text_ru")
# Tantivy measures token length in UTF-8 bytes; keep every word parse_query keeps.
_MAX_TOKEN_BYTES = MAX_WORD_CHARS * 4 + 1
# Snippet length in bytes (Cyrillic is two bytes a letter, so ~SNIPPET_CHARS letters).
_SNIPPET_BYTES = SNIPPET_CHARS * 3 // 2
#: Snippets look for matches in this many leading characters only (cost bound, as in ES).
MAX_ANALYZED_CHARS = 1_000_000
#: The text is analysed again for every hit shown, twice (Russian and English): a 200 KB
#: discharge summary costs tens of milliseconds. Most matches are near the start (complaints,
#: diagnosis), so the opening is tried first and the rest only when it has no match.
_FIRST_WINDOW_CHARS = 8_000
#: Characters analysed around the first word that starts with a query term (see _Snippets).
_SNIPPET_WINDOW_CHARS = SNIPPET_CHARS * 2
#: Characters of context kept before the first of those words.
_SNIPPET_LEAD_CHARS = SNIPPET_CHARS // 8


def _analyzer(*languages: str) -> Any:
    builder = (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(_MAX_TOKEN_BYTES))
        .filter(tantivy.Filter.lowercase())
    )
    for language in languages:
        builder = builder.filter(tantivy.Filter.stemmer(language))
    return builder.build()


def _schema() -> Any:
    sb = tantivy.SchemaBuilder()
    sb.add_text_field("id", stored=True, tokenizer_name="raw")
    sb.add_text_field("resource_type", tokenizer_name="raw")
    sb.add_text_field("patient", tokenizer_name="raw")
    sb.add_text_field("kv", tokenizer_name="raw")
    for name, analyzer, _ in _TEXT_FIELDS:
        sb.add_text_field(name, tokenizer_name=analyzer)
    # The text as given (NFC), for snippets; the analysed fields hold the ё-folded copy.
    sb.add_bytes_field("title_src", stored=True, indexed=False)
    sb.add_bytes_field("text_src", stored=True, indexed=False)
    sb.add_date_field("date", stored=True, indexed=True, fast=True)
    return sb.build()


@dataclass
class _Handle:
    """One open index directory, shared by every TantivySearchIndex on it in this process."""

    path: Path
    index: Any
    schema: Any
    analyzers: dict[str, Any]
    lock: threading.RLock = field(default_factory=threading.RLock)
    writer: Any = None
    refs: int = 0

    def get_writer(self) -> Any:
        """The process's one writer for this directory, created on first write (lock held)."""
        if self.writer is None:
            threads = max(1, min(os.cpu_count() or 1, 4))
            try:
                self.writer = self.index.writer(heap_size=32_000_000 * threads, num_threads=threads)
            except ValueError as exc:
                raise StorageError(f"search index {self.path} is locked by another writer") from exc
        return self.writer

    def release(self) -> None:
        """Finish merges and drop the writer, releasing the directory lock (lock held)."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.rollback()
            writer.wait_merging_threads()


_handles: dict[Path, _Handle] = {}
_handles_lock = threading.Lock()


def _acquire(path: Path) -> _Handle:
    path = path.resolve()
    with _handles_lock:
        handle = _handles.get(path)
        if handle is None:
            path.mkdir(parents=True, exist_ok=True)
            _check_version(path)
            schema = _schema()
            try:
                index = tantivy.Index(schema, path=str(path), reuse=True)
            except ValueError as exc:
                raise StorageError(
                    f"search index at {path} does not match this version; "
                    "delete the directory and run `hie search reindex`"
                ) from exc
            analyzers = {_RU: _analyzer("russian", "english"), _EN: _analyzer("english")}
            for name, analyzer in analyzers.items():
                index.register_tokenizer(name, analyzer)
            handle = _Handle(path=path, index=index, schema=schema, analyzers=analyzers)
            _handles[path] = handle
        handle.refs += 1
        return handle


def _release(handle: _Handle) -> None:
    # Under the registry lock, so a re-open waits until the directory's writer lock is free.
    with _handles_lock:
        handle.refs -= 1
        if handle.refs > 0:
            return
        _handles.pop(handle.path, None)
        with handle.lock:
            handle.release()


def _check_version(path: Path) -> None:
    marker = path / "hie-schema-version"
    if marker.exists():
        found = marker.read_text().strip()
        if found != str(SCHEMA_VERSION):
            raise StorageError(
                f"search index at {path} has schema version {found}, expected {SCHEMA_VERSION}; "
                "delete the directory and run `hie search reindex`"
            )
    else:
        marker.write_text(f"{SCHEMA_VERSION}\n")


class TantivySearchIndex:
    """The embedded :class:`~hie.hub.search.port.SearchIndex` (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self._handle: _Handle | None = _acquire(Path(path) / "resources")

    @property
    def _h(self) -> _Handle:
        if self._handle is None:
            raise RuntimeError("search index is closed")
        return self._handle

    # -- writing -------------------------------------------------------------------------------

    def upsert(self, docs: Sequence[IndexDoc]) -> None:
        """Add items, replacing any with the same id; visible after :meth:`commit`."""
        for doc in docs:
            check_doc(doc)
        built = [(doc.id, self._document(doc)) for doc in docs]
        h = self._h
        with h.lock:
            writer = h.get_writer()
            for doc_id, document in built:
                # Deletes apply only to documents added before them, so a repeated id in one
                # batch leaves its last version.
                writer.delete_documents_by_term("id", doc_id)
                writer.add_document(document)

    def delete(self, ids: Sequence[str]) -> None:
        """Remove items by id (unknown ids are ignored); effective after :meth:`commit`."""
        h = self._h
        with h.lock:
            writer = h.get_writer()
            for doc_id in ids:
                writer.delete_documents_by_term("id", doc_id)

    def commit(self) -> None:
        """Commit pending changes durably and reload the reader so searches see them."""
        h = self._h
        with h.lock:
            if h.writer is not None:
                h.writer.commit()
            h.index.reload()

    def clear(self) -> None:
        """Delete every item and commit."""
        h = self._h
        with h.lock:
            writer = h.get_writer()
            writer.delete_all_documents()
            writer.commit()
            h.index.reload()

    def close(self) -> None:
        """Release this handle; the last one in the process drops uncommitted changes and the
        writer lock."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            _release(handle)

    def _document(self, doc: IndexDoc) -> Any:
        title = normalize_text(doc.title)
        text = normalize_text(doc.text)
        document = tantivy.Document(
            id=doc.id,
            resource_type=doc.resource_type,
            title_ru=title,
            text_ru=text,
        )
        if doc.patient:
            document.add_text("patient", doc.patient)
        for name, values in doc.fields.items():
            for value in dict.fromkeys(values):
                document.add_text("kv", f"{name}{_KV_SEP}{value}")
        # Stored as given (NFC only): same lengths as the folded copy, so offsets carry over.
        document.add_bytes("title_src", unicodedata.normalize("NFC", doc.title).encode())
        document.add_bytes("text_src", unicodedata.normalize("NFC", doc.text).encode())
        if doc.date is not None:
            date = doc.date if doc.date.tzinfo else doc.date.replace(tzinfo=UTC)
            document.add_date("date", date.astimezone(UTC))
        return document

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
        h = self._h
        terms: list[set[str]] = []
        text_q = self._text_query(parse_query(query), terms)
        full_q = self._with_filters(text_q, resource_type, patient, filters)
        if full_q is None or text_q is None:
            return SearchResult(total=0, hits=[])
        searcher = h.index.searcher()
        # Tantivy's top-k collector refuses a limit of 0; ask for one and drop it.
        found = searcher.search(full_q, limit=max(limit, 1), count=True, offset=offset)
        total = int(found.count)
        if limit == 0:
            return SearchResult(total=total, hits=[])
        snippets = _Snippets(searcher, text_q, h.schema, terms)
        hits = []
        for score, address in found.hits:
            stored = searcher.doc(address)
            hits.append(
                SearchHit(
                    id=stored.get_first("id"),
                    score=float(score),
                    snippet=snippets.render(stored),
                )
            )
        return SearchResult(total=total, hits=hits)

    def ids_matching(
        self,
        query: str,
        resource_type: str | None,
        patient: str | None = None,
        limit: int = MAX_WINDOW,
    ) -> list[str]:
        """Ids of up to ``limit`` matching items, best first."""
        if limit <= 0:
            return []
        h = self._h
        q = self._with_filters(self._text_query(parse_query(query)), resource_type, patient, None)
        if q is None:
            return []
        searcher = h.index.searcher()
        found = searcher.search(q, limit=limit, count=False)
        return [searcher.doc(address).get_first("id") for _, address in found.hits]

    def count(self) -> int:
        """Number of committed items."""
        return int(self._h.index.searcher().num_docs)

    def _text_query(self, parsed: ParsedQuery, terms: list[set[str]] | None = None) -> Any:
        """AND over query units; each unit is an OR over the Russian/English title/text fields.
        Each unit's analysed terms are added to ``terms`` when given (for the snippets)."""
        h = self._h
        must = []
        for unit in parsed.units:
            should = []
            if terms is not None:
                terms.append(set())
            for field_name, analyzer_name, boost in _TEXT_FIELDS:
                analyzer = h.analyzers[analyzer_name]
                tokens = [token for word in unit for token in analyzer.analyze(word)]
                if not tokens:
                    continue
                if terms is not None:
                    terms[-1].update(t for t in tokens if t)
                if len(tokens) == 1:
                    q = tantivy.Query.term_query(h.schema, field_name, tokens[0])
                else:
                    q = tantivy.Query.phrase_query(h.schema, field_name, tokens)
                if boost != 1.0:
                    q = tantivy.Query.boost_query(q, boost)
                should.append((tantivy.Occur.Should, q))
            if should:
                must.append((tantivy.Occur.Must, tantivy.Query.boolean_query(should)))
        return tantivy.Query.boolean_query(must) if must else None

    def _with_filters(
        self,
        text_q: Any,
        resource_type: str | None,
        patient: str | None,
        filters: Mapping[str, Sequence[str]] | None,
    ) -> Any:
        """``text_q`` restricted by exact-match filters; ``None`` when nothing can match."""
        kv = normalized_filters(filters)
        if text_q is None or kv is None:
            return None
        schema = self._h.schema
        clauses = [(tantivy.Occur.Must, text_q)]
        restrictions = []
        if resource_type is not None:
            restrictions.append(tantivy.Query.term_query(schema, "resource_type", resource_type))
        if patient is not None:
            restrictions.append(tantivy.Query.term_query(schema, "patient", patient))
        for name, values in kv.items():
            terms = [f"{name}{_KV_SEP}{value}" for value in values]
            restrictions.append(tantivy.Query.term_set_query(schema, "kv", terms))
        for q in restrictions:
            # Filters restrict, they do not score.
            clauses.append((tantivy.Occur.Must, tantivy.Query.const_score_query(q, 0.0)))
        return tantivy.Query.boolean_query(clauses)


class _Snippets:
    """Snippets for one search: Tantivy's SnippetGenerator per analysed field, merged.

    Highlights come back as UTF-8 byte ranges of the (ё-folded) analysed text, which has the
    same byte layout as the stored text, so they apply to the text as given.

    Analysing costs about 1.4 ms per 8,000 characters and per stemmer, for every hit shown.
    So the text is first scanned (``str.find``) for words that start with a query term: a
    Russian stem is the start of the word it came from. Only ``_SNIPPET_WINDOW_CHARS`` around
    the place where most query words come together are analysed (~80 µs per stemmer). When
    no word starts that way (an English stem such as ``happi`` need not be a prefix), or the
    window holds no real match (``котлеты`` for ``кот``), the opening and then the whole
    text are analysed, as before. On a 300-document corpus this took ``$search-text`` (20
    hits a page) from 20 to 7.5 ms of CPU per request.
    """

    def __init__(self, searcher: Any, query: Any, schema: Any, terms: Sequence[set[str]]) -> None:
        self._gens: dict[str, Any] = {}
        # the Russian fields' analyser stems both alphabets: it highlights every match (the
        # English fields' would re-analyse the same text for a subset of them)
        for name in _SNIPPET_FIELDS:
            gen = tantivy.SnippetGenerator.create(searcher, query, schema, name)
            gen.set_max_num_chars(_SNIPPET_BYTES)
            self._gens[name] = gen
        self._units = [sorted(unit) for unit in terms if unit]

    def render(self, stored: Any) -> str:
        """HTML-safe snippet of a stored document, matches wrapped in ``<mark>``."""
        text = _stored_text(stored, "text_src")
        title = _stored_text(stored, "title_src")
        for source, fields in ((text, ("text_ru",)), (title, ("title_ru",))):
            window = self._around_matches(source[:MAX_ANALYZED_CHARS])
            if window is not None:
                html_snippet = self._render_field(window, fields)
                if html_snippet is not None:
                    return html_snippet
            windows = (_FIRST_WINDOW_CHARS, MAX_ANALYZED_CHARS)
            for window_chars in windows if len(source) > _FIRST_WINDOW_CHARS else windows[1:]:
                html_snippet = self._render_field(source[:window_chars], fields)
                if html_snippet is not None:
                    return html_snippet
        return leading_snippet(text or title)

    def _around_matches(self, source: str) -> str | None:
        """A stretch of ``source`` (``_SNIPPET_WINDOW_CHARS``, cut at spaces) around words that
        start with a query term, where most of the query's words come close together; None
        when no word does (or case folding would move character offsets).

        The rarest query word's places are the candidates; each is scored by how many of the
        other query words start within half a snippet of it."""
        found = self._rarest_places(source) if len(source) > _SNIPPET_WINDOW_CHARS else None
        if found is None:
            return None
        folded, rarest, places = found
        others = [unit for n, unit in enumerate(self._units) if n != rarest]
        reach = SNIPPET_CHARS // 2
        best, best_score = places[0], 0
        for at in places:
            near = [x for unit in others if (x := _first_near(folded, unit, at, reach)) is not None]
            if len(near) + 1 > best_score:
                best, best_score = min([at, *near]), len(near) + 1
                if len(near) == len(others):
                    break
        # Tantivy cuts the text into fragments from its start: begin just before the words,
        # so the first fragment holds them all
        start = max(0, best - _SNIPPET_LEAD_CHARS)
        end = min(len(source), start + _SNIPPET_WINDOW_CHARS)
        if start > 0:
            space = source.find(" ", start, best)
            start = space + 1 if space >= 0 else best
        if end < len(source):
            space = source.rfind(" ", best, end)
            end = space if space > best else end
        return source[start:end]

    def _rarest_places(self, source: str) -> tuple[str, int, list[int]] | None:
        """(folded text, query unit, offsets of the words starting with one of its terms) for
        the unit with the fewest such words: in the opening, else in the whole text."""
        for scanned in (_FIRST_WINDOW_CHARS, len(source)):
            folded = normalize_text(source[:scanned]).lower()
            if len(folded) != min(scanned, len(source)):
                return None
            counts = sorted(
                (sum(folded.count(t) for t in unit), n) for n, unit in enumerate(self._units)
            )
            for count, n in counts:
                places = sorted(a for t in self._units[n] for a in _word_starts(folded, t))
                if count and places:
                    return folded, n, places
            if scanned >= len(source):
                break
        return None

    def _render_field(self, source: str, fields: tuple[str, ...]) -> str | None:
        raw = source.encode()
        folded = normalize_text(source)
        candidates: list[tuple[tuple[int, int], list[tuple[int, int]]]] = []
        for name in fields:
            snippet = self._gens[name].snippet_from_doc(tantivy.Document(**{name: folded}))
            frag = snippet.fragment_range()
            start = frag.start
            spans = [(start + r.start, start + r.end) for r in snippet.highlighted()]
            if spans:
                candidates.append(((frag.start, frag.end), spans))
        if not candidates:
            return None
        # The fragment with the most matches wins; the other stemmer's matches inside it count too.
        candidates.sort(key=lambda c: len(c[1]), reverse=True)
        (frag_start, frag_end), _ = candidates[0]
        if len(raw) <= _SNIPPET_BYTES:
            # A short text is shown whole, not cut at its first and last word.
            frag_start, frag_end = 0, len(raw)
        spans = sorted(
            {
                span
                for _, cand_spans in candidates
                for span in cand_spans
                if frag_start <= span[0] and span[1] <= frag_end
            }
        )
        return _html_from_bytes(raw, frag_start, frag_end, spans)


def _word_starts(
    folded: str, term: str, start: int = 0, end: int | None = None, limit: int = 64
) -> list[int]:
    """Offsets of up to ``limit`` words of ``folded[start:end]`` that start with ``term``."""
    out: list[int] = []
    start = max(start, 0)
    at = folded.find(term, start, end)
    while at >= 0 and len(out) < limit:
        if at == 0 or not folded[at - 1].isalnum():
            out.append(at)
        at = folded.find(term, at + 1, end)
    return out


def _first_near(folded: str, terms: Sequence[str], at: int, reach: int) -> int | None:
    """Offset of the first word within ``reach`` of ``at`` starting with one of ``terms``."""
    hits = [x for t in terms for x in _word_starts(folded, t, at - reach, at + reach, 1)]
    return min(hits) if hits else None


def _stored_text(stored: Any, name: str) -> str:
    value = stored.get_first(name)
    return bytes(value).decode() if value else ""


def _html_from_bytes(raw: bytes, start: int, end: int, spans: Sequence[tuple[int, int]]) -> str:
    out: list[str] = []
    pos = start
    for span_start, span_end in spans:
        span_start = max(span_start, pos)
        if span_end <= span_start:
            continue
        out.append(html.escape(raw[pos:span_start].decode()))
        out.append(MARK_OPEN + html.escape(raw[span_start:span_end].decode()) + MARK_CLOSE)
        pos = span_end
    out.append(html.escape(raw[pos:end].decode()))
    return " ".join("".join(out).split())
