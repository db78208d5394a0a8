"""Outbox consumer that keeps the full-text search index in step with the resource store.

Only types whose text is worth searching are indexed (documents, reports, conditions, …);
high-volume coded data such as lab Observations is searched through the SQL index instead.

A DocumentReference is indexed with the text of its bodies (IHE MHD: ``content.attachment.url``
is ``Binary/<id>``, the bytes are in the blob store): each body is read from the blob store
here, in the outbox worker, never in the request that published it, and its text extracted
(:func:`hie.fhir.document_content.extract_text`). A body that cannot be read — encrypted or
damaged PDF, missing blob, a type without text, larger than ``HIE_MAX_DOCUMENT_BYTES`` — never
stops the worker: the document is indexed on its metadata, flagged ``indexable: ["false"]``
with ``unindexable_kind`` / ``unindexable_reason``, logged and counted in
``hie_document_bodies_unindexable_total``. See :func:`document_fields` for the filter fields.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import html
import multiprocessing
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from prometheus_client import Counter, Histogram

from hie.fhir.document_content import MAX_TEXT_CHARS, Extracted, extract_text, parse_media_type
from hie.fhir.documents import BlobRef, Body, binary_id, bodies, security_context
from hie.hub.blobs.port import BlobStore
from hie.hub.errors import BlobNotFound, HieError, InvalidRequest, StorageError
from hie.hub.logging import get_logger
from hie.hub.search.port import IndexDoc, SearchIndex
from hie.hub.store.port import OutboxEvent, ResourceStore

log = get_logger("hie.indexing")

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

#: What a body that was not indexed is, in a few words (the ``unindexable_kind`` field and the
#: ``kind`` label of the counter; ``unindexable_reason`` has the details).
UNINDEXABLE_KINDS: Final = (
    "encrypted",  # a PDF that needs a user password
    "unreadable",  # damaged PDF, XML that is not well-formed or is refused, undecodable text
    "unsupported",  # a type with no text: DICOM, images, unknown binary data
    "no-text",  # read, but no text in it (a scanned PDF without a text layer)
    "too-large",  # larger than HIE_MAX_DOCUMENT_BYTES: not read at all
    "missing",  # no Binary, or its blob is not in the blob store
    "integrity",  # the blob's bytes do not match its SHA-256 key
    "storage-error",  # the blob store failed while reading
    "extractor-error",  # the text extractor failed: a bug, or its process crashed or hung
)

UNINDEXABLE = Counter(
    "hie_document_bodies_unindexable_total",
    "Document bodies indexed on metadata only, by why their text could not be read",
    ["kind"],
)
BODIES = Counter("hie_document_bodies_indexed_total", "Document bodies whose text was indexed")
EXTRACTOR_RESTARTS = Counter(
    "hie_document_extractor_restarts_total",
    "Text-extraction worker pools replaced after a body crashed or hung a worker",
)
EXTRACT_SECONDS = Histogram(
    "hie_document_extract_seconds",
    "Time to read one document body from the blob store and extract its text",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

#: The word every indexed DocumentReference's text contains (its ``resourceType``, which
#: :func:`resource_text` keeps): a query for it finds every indexed document, which is how
#: :func:`index_status` asks the index which documents it holds and which it flagged.
PRESENCE_WORD: Final = "DocumentReference"


def _obj(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    """``value`` if it is a JSON array, else an empty one."""
    return value if isinstance(value, list) else []


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


def to_doc(
    res: dict[str, Any],
    extra_text: str = "",
    *,
    title: str = "",
    fields: dict[str, list[str]] | None = None,
) -> IndexDoc:
    """The index document for a resource (``extra_text``: its bodies' text; ``title``: used
    when the resource names none; ``fields``: filter fields besides ``status``)."""
    for key in ("description", "title"):
        if isinstance(res.get(key), str) and res[key].strip():
            title = res[key]
            break
    if not title and isinstance(res.get("code"), dict):
        title = str(res["code"].get("text") or "")
    out: dict[str, list[str]] = {}
    if isinstance(res.get("status"), str):
        out["status"] = [res["status"]]
    out.update(fields or {})
    text = resource_text(res)
    if extra_text:
        text = f"{text}\n{extra_text}"
    return IndexDoc(
        id=f"{res['resourceType']}/{res['id']}",
        resource_type=res["resourceType"],
        text=text,
        title=title,
        patient=_patient_of(res),
        fields=out,
        date=_document_date(res) if res["resourceType"] == "DocumentReference" else None,
    )


# --- DocumentReference: filter fields --------------------------------------------------------


def _codes(concepts: Any) -> list[str]:
    """``code`` and ``system|code`` of every coding of one CodeableConcept or a list of them."""
    out: list[str] = []
    for cc in concepts if isinstance(concepts, list) else [concepts]:
        for coding in (cc or {}).get("coding") or () if isinstance(cc, dict) else ():
            if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                code = coding["code"]
                out.append(code)
                if isinstance(coding.get("system"), str):
                    out.append(f"{coding['system']}|{code}")
    return list(dict.fromkeys(out))


def _refs(values: Any) -> list[str]:
    """The ``reference`` strings of one Reference or a list of them."""
    items = values if isinstance(values, list) else [values]
    return [
        v["reference"] for v in items if isinstance(v, dict) and isinstance(v.get("reference"), str)
    ]


def _document_date(res: dict[str, Any]) -> datetime | None:
    """When the document was made: ``date``, else the start of ``context.period`` (UTC)."""
    context = _obj(res.get("context"))
    period = _obj(context.get("period"))
    for value in (res.get("date"), period.get("start")):
        if isinstance(value, str) and value:
            try:
                when = datetime.fromisoformat(value if len(value) > 10 else value[:10])
            except ValueError:
                continue
            return when if when.tzinfo else when.replace(tzinfo=UTC)
    return None


def document_fields(res: dict[str, Any]) -> dict[str, list[str]]:
    """Exact-match filter fields of a DocumentReference (ITI-67-like filters, the timeline).

    ``ref`` (``DocumentReference/<id>``: lets a search be restricted to the documents a caller
    may see), ``status``, ``docStatus``, ``type`` and ``category`` (each coding as ``code`` and
    ``system|code``), ``format``, ``content_type``, ``facility``, ``author`` (every author
    reference), ``custodian``, ``org`` (the Organization references among author and
    custodian), ``encounter`` and ``date`` (``YYYY-MM-DD`` as written).
    """
    fields: dict[str, list[str]] = {"ref": [f"DocumentReference/{res['id']}"]}
    if isinstance(res.get("docStatus"), str):
        fields["docStatus"] = [res["docStatus"]]
    context = _obj(res.get("context"))
    contents = [c for c in res.get("content") or () if isinstance(c, dict)]
    attachments = [c.get("attachment") or {} for c in contents]
    types = [
        parse_media_type(a["contentType"])[0]
        for a in attachments
        if isinstance(a, dict) and isinstance(a.get("contentType"), str)
    ]
    author = _refs(res.get("author"))
    custodian = _refs(res.get("custodian"))
    date = res.get("date")
    candidates = {
        "type": _codes(res.get("type")),
        "category": _codes(res.get("category")),
        "format": list(
            dict.fromkeys(
                f["code"]
                for c in contents
                if isinstance(f := c.get("format"), dict) and isinstance(f.get("code"), str)
            )
        ),
        "content_type": list(dict.fromkeys(t for t in types if t)),
        "facility": _codes(context.get("facilityType")),
        "author": author,
        "custodian": custodian,
        "org": list(dict.fromkeys(r for r in author + custodian if r.startswith("Organization/"))),
        "encounter": _refs(context.get("encounter")),
        "date": [date[:10]] if isinstance(date, str) and len(date) >= 10 else [],
    }
    fields.update({k: v for k, v in candidates.items() if v})
    return fields


# --- DocumentReference: bodies ---------------------------------------------------------------


class _Unreadable(Exception):
    """A body whose text is not indexed: ``kind`` (one of :data:`UNINDEXABLE_KINDS`), why."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(slots=True)
class BodiesText:
    """What the bodies of one document gave: their text, a title, and what went wrong."""

    text: str = ""
    title: str | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, reason)
    truncated: bool = False
    read: int = 0  # bodies whose text was indexed

    def fields(self) -> dict[str, list[str]]:
        """The ``indexable`` flag fields for the index document."""
        out = {"indexable": ["false" if self.problems else "true"]}
        if self.problems:
            out["unindexable_kind"] = list(dict.fromkeys(k for k, _ in self.problems))
            out["unindexable_reason"] = list(dict.fromkeys(r for _, r in self.problems))
        if self.truncated:
            out["truncated"] = ["true"]
        return out


def _kind_of(reason: str | None) -> str:
    """The :data:`UNINDEXABLE_KINDS` entry for an :class:`Extracted` reason."""
    reason = reason or ""
    if reason == "encrypted":
        return "encrypted"
    if reason.startswith(EXTRACTOR_FAILED):
        return "extractor-error"
    if reason.startswith(("no text extractor", "DICOM")):
        return "unsupported"
    return "unreadable"


EXTRACTOR_FAILED = "the text extractor"  # how a crashed or hung extraction's reason starts
Extract = Callable[[bytes, str], Extracted]


def _pool_context() -> Any:
    # forkserver, not fork: the hub's process has threads (a forked child could inherit a
    # lock some other thread held); the server process is started once, lean
    return multiprocessing.get_context("forkserver")


class TextExtractor:
    """:func:`~hie.fhir.document_content.extract_text` in ``processes`` worker processes
    (0: in the calling thread).

    In processes, extraction runs beside the hub's own threads instead of taking turns with
    them under one interpreter lock, and a body that crashes PDFium or never finishes costs a
    worker process, not the hub. At most ``processes`` bodies are in the pool at once, so
    ``timeout`` measures a body's own extraction, not a wait behind a stuck one; a new pool's
    workers are started before it takes bodies. After ``timeout`` seconds, or when a worker
    dies, the pool is replaced and the body is tried once more alone in a process of its own
    (the body that broke the pool may have been another one in flight beside it), then
    reported as not indexable (``extractor-error``). ``fn`` is the extraction function (a
    module-level function: it crosses to the workers by name)."""

    STARTUP_SECONDS = 60.0  # longest wait for a new worker process to import the extractor

    def __init__(self, processes: int, *, timeout: float = 120.0, fn: Extract = extract_text):
        self.processes = max(0, processes)
        self.timeout = timeout
        self.fn = fn
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max(1, self.processes))
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, data: bytes, content_type: str) -> Extracted:
        if not self.processes:
            return self.fn(data, content_type)
        with self._slots:
            pool = self._current()
            try:
                return self._run(pool, data, content_type)
            except (FuturesTimeout, BrokenProcessPool):
                self._replace(pool)
        alone = self._started(1)
        try:
            return self._run(alone, data, content_type)
        except FuturesTimeout:
            why = f"{EXTRACTOR_FAILED} ran over {self.timeout:g} s"
        except BrokenProcessPool:
            why = f"{EXTRACTOR_FAILED} crashed"
        finally:
            _stop(alone)
        return Extracted("", indexable=False, reason=why)

    def _run(self, pool: ProcessPoolExecutor, data: bytes, content_type: str) -> Extracted:
        return pool.submit(self.fn, data, content_type).result(timeout=self.timeout)

    def _started(self, workers: int) -> ProcessPoolExecutor:
        """A new pool whose workers have imported the extractor (one empty body each)."""
        pool = ProcessPoolExecutor(workers, mp_context=_pool_context())
        warm = [pool.submit(self.fn, b"", "text/plain") for _ in range(workers)]
        for f in warm:
            f.result(timeout=self.STARTUP_SECONDS)
        return pool

    def _current(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = self._started(self.processes)
            return self._pool

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """Retire ``broken`` once (another thread may have already)."""
        with self._lock:
            if self._pool is not broken:
                return
            self._pool = None
        log.warning("document.extractor.restarted")
        EXTRACTOR_RESTARTS.inc()
        _stop(broken)

    def close(self) -> None:
        """Stop the worker processes."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Shut a pool down without waiting, its workers killed (one may be stuck in a body, and
    would never come back to the pool's own shutdown)."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)


class BodyReader:
    """Reads document bodies from the blob store and extracts their text, within a size limit.

    ``max_bytes`` bounds memory: a body declared (or found while streaming) larger than that
    is not read and is reported ``too-large``. Every failure is reported, never raised.
    ``extract``: the extraction (:class:`TextExtractor`; by default in the calling thread).
    """

    def __init__(
        self, blobs: Callable[[], BlobStore], max_bytes: int, extract: Extract = extract_text
    ) -> None:
        self.blobs = blobs
        self.max_bytes = max_bytes
        self.extract = extract

    def read(self, store: ResourceStore, res: dict[str, Any]) -> BodiesText:
        """The text of every body of DocumentReference ``res``, and what could not be read."""
        out = BodiesText()
        stored = {b.binary_id: b for b in bodies(store, res)}
        parts: list[str] = []
        size = 0
        for i, content in enumerate(res.get("content") or ()):
            attachment = (content or {}).get("attachment") if isinstance(content, dict) else None
            if not isinstance(attachment, dict):
                continue
            declared = attachment.get("contentType")
            declared = declared if isinstance(declared, str) else ""
            bid = binary_id(attachment.get("url"))
            where = f"Binary/{bid}" if bid else f"content[{i}]"
            started = time.perf_counter()
            try:
                if bid is not None:
                    body = stored.get(bid)
                    if body is None:
                        raise _Unreadable("missing", f"{where}: no stored Binary with a body")
                    data = self._blob(body)
                    ctype = body.content_type or declared
                elif isinstance(attachment.get("data"), str):
                    data = self._inline(attachment["data"])
                    ctype = declared
                else:
                    raise _Unreadable("missing", f"{where}: the body is not stored in the hub")
                try:
                    got = self.extract(data, ctype)
                except Exception as exc:  # noqa: BLE001 - one body must not stop the worker
                    raise _Unreadable("extractor-error", f"{type(exc).__name__}: {exc}") from exc
                del data
                if not got.indexable:
                    raise _Unreadable(_kind_of(got.reason), got.reason or "not indexable")
                if not got.text.strip():
                    raise _Unreadable("no-text", "no text in the body (a scan without text?)")
            except _Unreadable as bad:
                reason = bad.reason if bad.reason.startswith(where) else f"{where}: {bad.reason}"
                out.problems.append((bad.kind, reason[:500]))
                UNINDEXABLE.labels(bad.kind).inc()
                log.warning(
                    "document.body.unindexable",
                    document=f"DocumentReference/{res.get('id')}",
                    body=where,
                    kind=bad.kind,
                    reason=reason[:500],
                )
                continue
            finally:
                EXTRACT_SECONDS.observe(time.perf_counter() - started)
            BODIES.inc()
            out.read += 1
            out.title = out.title or got.title
            out.truncated = out.truncated or got.truncated
            room = MAX_TEXT_CHARS - size
            if room <= 0:
                out.truncated = True
                continue
            text = got.text[:room]
            out.truncated = out.truncated or len(text) < len(got.text)
            parts.append(text)
            size += len(text)
        out.text = "\n\n".join(parts)
        return out

    def _blob(self, body: Body) -> bytes:
        """The bytes of a stored body, checked against its SHA-256 key, within the limit."""
        ref: BlobRef = body.blob
        if ref.size > self.max_bytes:
            raise _Unreadable(
                "too-large", f"{ref.size} bytes is over the {self.max_bytes}-byte limit"
            )
        digest = hashlib.sha256()
        chunks: list[bytes] = []
        size = 0
        try:
            stream = self.blobs().open(ref.key)
        except BlobNotFound:
            raise _Unreadable("missing", f"blob {ref.key} is not in the blob store") from None
        except InvalidRequest as exc:
            raise _Unreadable("missing", exc.message) from None
        except StorageError:
            raise  # an outage: the worker retries the batch later, nothing is flagged
        except Exception as exc:  # noqa: BLE001 - a failing store must not stop the worker
            raise _Unreadable("storage-error", _describe(exc)) from exc
        try:
            for chunk in stream:
                size += len(chunk)
                if size > self.max_bytes:  # the store holds more than the Binary says
                    raise _Unreadable(
                        "too-large", f"more than the {self.max_bytes}-byte limit in the store"
                    )
                digest.update(chunk)
                chunks.append(chunk)
        except (_Unreadable, StorageError):
            raise
        except Exception as exc:  # noqa: BLE001 - as above
            raise _Unreadable("storage-error", _describe(exc)) from exc
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        if digest.hexdigest() != ref.key:
            raise _Unreadable("integrity", f"blob {ref.key}: the bytes do not match the key")
        return b"".join(chunks)

    def _inline(self, data: str) -> bytes:
        """An ``attachment.data`` body (documents stored before the blob store)."""
        if len(data) * 3 // 4 > self.max_bytes:
            raise _Unreadable("too-large", f"inline data is over the {self.max_bytes}-byte limit")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise _Unreadable("unreadable", "attachment.data is not valid base64") from None


def _describe(exc: Exception) -> str:
    message = exc.message if isinstance(exc, HieError) else str(exc)
    return f"{type(exc).__name__}: {message}"[:300]


def _document_title(res: dict[str, Any], body_title: str | None) -> str:
    """A title for a document without ``description``: its body's, its type's, its file's."""
    if body_title:
        return body_title
    doc_type = _obj(res.get("type"))
    for coding in doc_type.get("coding") or ():
        if isinstance(coding, dict) and isinstance(coding.get("display"), str):
            return str(coding["display"])
    if isinstance(doc_type.get("text"), str):
        return str(doc_type["text"])
    for content in res.get("content") or ():
        title = ((content or {}).get("attachment") or {}).get("title")
        if isinstance(title, str) and title:
            return title
    return ""


# --- the consumer ----------------------------------------------------------------------------


CHUNK = 16  # resources read and indexed at a time within a batch
COMMIT_SECONDS = 0.5  # longest indexing time between two commits of the index


class SearchIndexer:
    """Indexes created/updated resources and removes deleted ones (idempotent by design:
    an upsert of the current version is the same however often it runs).

    ``blobs``: the blob store, for the text of document bodies (without it, documents are
    indexed on their metadata and not flagged). ``max_body_bytes``: bodies larger than this
    are not read (``HIE_MAX_DOCUMENT_BYTES``). ``extract_processes``: worker processes that
    extract body text (:class:`TextExtractor`; ``HIE_INDEX_EXTRACT_PROCESSES``); with them, the
    documents of a chunk are read and extracted side by side.
    """

    name = "search-index"

    def __init__(
        self,
        store: ResourceStore,
        index: Callable[[], SearchIndex],
        *,
        blobs: Callable[[], BlobStore] | None = None,
        max_body_bytes: int = 64 << 20,
        extract_processes: int = 0,
        extractor: TextExtractor | None = None,
    ) -> None:
        self.store = store
        self.index = index
        self.extractor = extractor or TextExtractor(extract_processes)
        self.reader = (
            BodyReader(blobs, max_body_bytes, self.extractor) if blobs is not None else None
        )
        # reading threads: each waits on the blob store or a worker process, not the CPU
        self._threads = (
            ThreadPoolExecutor(2 * self.extractor.processes, thread_name_prefix="hie-index")
            if self.extractor.processes
            else None
        )

    def close(self) -> None:
        """Stop the reading threads and the extraction processes."""
        if self._threads is not None:
            self._threads.shutdown(wait=True)
        self.extractor.close()

    def document(self, res: dict[str, Any]) -> IndexDoc:
        """The index document for a current resource (a document's bodies read and extracted)."""
        if res.get("resourceType") != "DocumentReference":
            return to_doc(res)
        fields = document_fields(res)
        if self.reader is None:
            return to_doc(res, fields=fields, title=_document_title(res, None))
        got = self.reader.read(self.store, res)
        fields.update(got.fields())
        return to_doc(res, got.text, title=_document_title(res, got.title), fields=fields)

    def handle(self, events: Sequence[OutboxEvent]) -> None:
        """Bring the index in line with the current state of every resource in ``events``."""
        refs = list(
            dict.fromkeys(
                (e.resource_type, e.id) for e in events if e.resource_type in FULLTEXT_TYPES
            )
        )
        binaries = list(
            dict.fromkeys(("Binary", e.id) for e in events if e.resource_type == "Binary")
        )
        waits_for: dict[tuple[str, str], tuple[str, str]] = {}  # Binary → its document
        if binaries and self.reader is not None:
            # a body replaced after its DocumentReference was indexed: index the document again
            for stored in self.store.read_many(binaries):
                context = security_context(orjson.loads(stored.content)) if stored.content else None
                if context is not None and context[0] == "DocumentReference":
                    waits_for[("Binary", stored.id)] = context
                    if context not in refs:
                        refs.append(context)
        if not refs:
            return
        idx = self.index()
        # A batch can be thousands of documents (a backlog): what is indexed is committed at
        # least every COMMIT_SECONDS, so a document becomes searchable about that long after
        # it is indexed, not after the whole batch (re-indexing after a crash is harmless).
        # Each commit also moves the outbox offset past the events it covers, so the
        # position tells writers (the documents' LagGate) how far behind the index really is.
        since_commit = time.monotonic()
        for start in range(0, len(refs), CHUNK):
            chunk = refs[start : start + CHUNK]
            current = {(r.resource_type, r.id): r for r in self.store.read_many(chunk)}
            gone: list[str] = []
            present: list[dict[str, Any]] = []
            for ref in chunk:
                found = current.get(ref)
                if found is None or found.content is None:
                    gone.append(f"{ref[0]}/{ref[1]}")
                else:
                    present.append(orjson.loads(found.content))
            docs = (
                list(self._threads.map(self.document, present))
                if self._threads is not None
                else [self.document(res) for res in present]
            )
            if gone:
                idx.delete(gone)
            if docs:
                idx.upsert(docs)
            if time.monotonic() - since_commit >= COMMIT_SECONDS:
                idx.commit()
                since_commit = time.monotonic()
                done = _covered(events, refs[: start + CHUNK], waits_for)
                if done is not None:
                    self.store.outbox_ack(self.name, done)
        idx.commit()


def _covered(
    events: Sequence[OutboxEvent],
    done: Sequence[tuple[str, str]],
    waits_for: Mapping[tuple[str, str], tuple[str, str]],
) -> int | None:
    """The last seq of the longest run of ``events`` from the start that the index has
    caught up with: each one's resource is in ``done``, or not indexed at all; a Binary
    waits for the document it is the body of (``waits_for``)."""
    finished = set(done)
    last = None
    for e in events:
        ref = (e.resource_type, e.id)
        needs = waits_for.get(ref) if e.resource_type == "Binary" else ref
        if needs is not None and needs[0] in FULLTEXT_TYPES and needs not in finished:
            break
        last = e.seq
    return last


# --- what the index knows about documents ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class IndexStatus:
    """Which of some documents the index holds, and which of those it flagged not indexable."""

    indexed: frozenset[str]
    unindexable: frozenset[str]

    def indexable(self, doc_id: str) -> bool | None:
        """True / False for an indexed document, None when the index does not hold it (yet)."""
        if doc_id in self.unindexable:
            return False
        return True if doc_id in self.indexed else None


def index_status(
    index: SearchIndex, doc_ids: Sequence[str], patients: Sequence[str]
) -> IndexStatus:
    """Ask the index which of the DocumentReferences ``doc_ids`` (of ``patients``, "Patient/x")
    it holds and which it flagged; two cheap queries per patient, no text read."""
    wanted = set(doc_ids)
    if not wanted:
        return IndexStatus(frozenset(), frozenset())
    indexed: set[str] = set()
    for patient in patients:
        for hit in index.ids_matching(PRESENCE_WORD, "DocumentReference", patient):
            rid = hit.removeprefix("DocumentReference/")
            if rid in wanted:
                indexed.add(rid)
    flagged: set[str] = set()
    refs = [f"DocumentReference/{i}" for i in sorted(indexed)]
    for start in range(0, len(refs), 1000):
        chunk = refs[start : start + 1000]
        found = index.search(
            PRESENCE_WORD,
            resource_type="DocumentReference",
            filters={"ref": chunk, "indexable": ["false"]},
            limit=len(chunk),
        )
        flagged.update(h.id.removeprefix("DocumentReference/") for h in found.hits)
    return IndexStatus(frozenset(indexed), frozenset(flagged))
