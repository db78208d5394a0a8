"""Full-text search of resources and documents (Russian and English morphology).

The port is :class:`SearchIndex` (``port.py``); backends are Tantivy embedded
(``tantivy_index.py``, the default) and Elasticsearch (``elastic.py``), chosen by
``HIE_SEARCH_URL`` through :func:`open_search_index`.
"""

from hie.hub.search.port import (
    IndexDoc,
    SearchHit,
    SearchIndex,
    SearchResult,
    open_search_index,
    parse_query,
)

__all__ = [
    "IndexDoc",
    "SearchHit",
    "SearchIndex",
    "SearchResult",
    "open_search_index",
    "parse_query",
]
