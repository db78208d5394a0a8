"""Document sharing (IHE MHD): where a document's body lives and how a published one is checked.

A document is a DocumentReference whose ``content.attachment.url`` is ``Binary/<id>``. The
Binary resource holds no ``data``: its bytes are in the blob store, named in
``Binary.meta.extension`` (:data:`BLOB_EXTENSION`: SHA-256 key, size, and the base64 SHA-1
FHIR R4 puts in ``Attachment.hash``), and ``Binary.securityContext`` names the
DocumentReference, whose access rules the body follows.

Publishing (ITI-65, or a single create/update of a Binary or DocumentReference) goes through
an :class:`IntakeBatch`:

1. :meth:`IntakeBatch.stage`, before the database transaction: bodies sent inline (``Binary.
   data``, ``attachment.data``) are streamed into the blob store, hashed (SHA-256 for the key,
   SHA-1 for FHIR) and taken out of the JSON. A body over the document limit is refused as it
   is decoded; a body whose metadata is later refused stays an unreferenced blob (content
   addressed, so harmless; the same bytes sent again land on it).
2. :meth:`IntakeBatch.link`, inside the transaction, once ``urn:uuid`` references are resolved:
   every attachment must reach a body (a Binary of the same request or one the sender posted
   before); ``size``, ``hash`` and ``contentType`` are checked against the bytes and filled in
   when missing; the Binary's ``securityContext`` is set; a patient named only by identifier is
   found through the master patient index; ``relatesTo`` targets are checked (same patient)
   and a replaced document becomes ``superseded``. Any failure rolls the whole request back.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from hie.fhir.document_content import CDA_MEDIA_TYPE, check_declared, parse_media_type
from hie.hub.blobs.port import BlobSource, BlobStore, iter_chunks
from hie.hub.errors import BlobIntegrityError, BlobTooLarge, Unprocessable
from hie.hub.outbox import LagGate
from hie.hub.store.port import ResourceStore, WriteTx

if TYPE_CHECKING:
    from hie.fhir.service import FhirService

Json = dict[str, Any]

BLOB_EXTENSION = "https://hie.spb.ru/fhir/StructureDefinition/blob"
#: The types whose writes go through the document intake.
DOCUMENT_TYPES = frozenset({"Binary", "DocumentReference"})


@dataclass(frozen=True, slots=True)
class BlobRef:
    """Where a Binary's bytes are: blob ``key`` (hex SHA-256), ``size``, base64 ``sha1``."""

    key: str
    size: int
    sha1: str


def blob_extension(ref: BlobRef) -> Json:
    """The ``meta.extension`` entry that records a Binary's body."""
    return {
        "url": BLOB_EXTENSION,
        "extension": [
            {"url": "sha256", "valueString": ref.key},
            {"url": "size", "valueDecimal": ref.size},
            {"url": "sha1", "valueBase64Binary": ref.sha1},
        ],
    }


def blob_of(binary: Json) -> BlobRef | None:
    """The body a stored Binary names, or None (a Binary from before the blob store)."""
    for ext in (binary.get("meta") or {}).get("extension") or ():
        if isinstance(ext, dict) and ext.get("url") == BLOB_EXTENSION:
            parts = {
                e.get("url"): next((v for k, v in e.items() if k.startswith("value")), None)
                for e in ext.get("extension") or ()
                if isinstance(e, dict)
            }
            key, size, sha1 = parts.get("sha256"), parts.get("size"), parts.get("sha1")
            if isinstance(key, str) and isinstance(size, int | float) and isinstance(sha1, str):
                return BlobRef(key=key, size=int(size), sha1=sha1)
    return None


def binary_id(url: object) -> str | None:
    """The Binary id an attachment URL names (``Binary/<id>``, or an absolute URL ending so)."""
    if not isinstance(url, str):
        return None
    head, sep, tail = url.rpartition("Binary/")
    if not sep or not tail or "/" in tail or (head and not head.endswith("/")):
        return None
    return tail


def security_context(binary: Json) -> tuple[str, str] | None:
    """The resource whose access rules a Binary follows (``securityContext``), as (type, id)."""
    ref = (binary.get("securityContext") or {}).get("reference")
    if not isinstance(ref, str) or ref.count("/") != 1:
        return None
    rtype, rid = ref.split("/")
    return (rtype, rid) if rtype and rid else None


@dataclass(frozen=True, slots=True)
class Body:
    """One stored body of a document: the Binary's id, its blob and declared content type."""

    binary_id: str
    blob: BlobRef
    content_type: str


def bodies(store: ResourceStore, docref: Json) -> list[Body]:
    """The stored bodies of a DocumentReference, in ``content`` order (missing ones skipped)."""
    ids = []
    for content in docref.get("content") or ():
        bid = binary_id(((content or {}).get("attachment") or {}).get("url"))
        if bid is not None:
            ids.append(bid)
    out = []
    for stored in store.read_many([("Binary", i) for i in dict.fromkeys(ids)]):
        if stored.content is None:
            continue
        binary = orjson.loads(stored.content)
        ref = blob_of(binary)
        if ref is not None:
            out.append(Body(stored.id, ref, str(binary.get("contentType") or "")))
    order = {i: n for n, i in enumerate(ids)}
    return sorted(out, key=lambda b: order[b.binary_id])


# --- publishing ------------------------------------------------------------------------------

#: Bytes of a body kept in memory for the content-type check when only a stream was seen.
HEAD_BYTES = 64 * 1024
#: Bodies up to this size are read whole for the content-type check (XML must parse as a whole).
FULL_CHECK_BYTES = 8 << 20
#: ``relatesTo.code`` values after which the target is no longer the current version.
SUPERSEDING = frozenset({"replaces"})
_CDA_FORMAT_HINTS = ("cda", "urn:ihe:", "1.2.643.5.1.13.13.14")  # IHE format codes, ЕГИСЗ СЭМД


@dataclass(slots=True)
class Staged:
    """A body put into the blob store by this request: where it is, and its first bytes (all
    of them when the request carried it whole)."""

    blob: BlobRef
    head: bytes
    whole: bool


def body_problem(declared: str, staged: Staged, *, cda: bool = False) -> str | None:
    """Why a body is not what its declared content type says, or None. XML and text are judged
    on the whole body; with only the head at hand (a large body streamed in), the magic
    numbers are what can be checked."""
    base = parse_media_type(declared)[0]
    if not staged.whole and (base.endswith("xml") or base.startswith("text/")):
        return None if base else f"contentType {declared!r} is not a media type (type/subtype)"
    return check_declared(declared, staged.head, cda=cda or base == CDA_MEDIA_TYPE)


class DocumentIntake:
    """Puts document bodies into the blob store and checks documents against them."""

    def __init__(
        self, blobs: Callable[[], BlobStore], max_bytes: int, gate: LagGate | None = None
    ) -> None:
        self.blobs = blobs
        self.max_bytes = max_bytes
        self.gate = gate

    def batch(self, svc: FhirService) -> IntakeBatch:
        """The intake of one request (a transaction or a single write). While the full-text
        index trails the hub by more than ``HIE_INDEX_MAX_LAG_SECONDS``, this waits first
        (``gate``), before any body is stored or anything written."""
        if self.gate is not None:
            self.gate.admit()
        return IntakeBatch(self, svc)

    def put(self, source: BlobSource, *, keep_whole: bool = False) -> Staged:
        """Stream ``source`` into the blob store within the document limit."""
        sha1 = hashlib.sha1()  # noqa: S324 - FHIR R4 Attachment.hash is SHA-1
        head = bytearray()

        def feed() -> Any:
            for chunk in iter_chunks(source):
                sha1.update(chunk)
                if len(head) < HEAD_BYTES:
                    head.extend(chunk[: HEAD_BYTES - len(head)])
                yield chunk

        info = self.blobs().put(feed(), max_bytes=self.max_bytes)
        ref = BlobRef(info.key, info.size, base64.b64encode(sha1.digest()).decode())
        if keep_whole and isinstance(source, bytes):
            return Staged(ref, source, whole=True)
        return Staged(ref, bytes(head), whole=False)

    def put_base64(self, data: object, where: str) -> Staged:
        """Decode an inline base64 body and store it."""
        if not isinstance(data, str):
            raise Unprocessable(f"{where} must be base64 text", expression=[where])
        if len(data) // 4 * 3 > self.max_bytes + 3:
            raise BlobTooLarge(f"{where} exceeds the document limit of {self.max_bytes} bytes")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise Unprocessable(f"{where} is not valid base64", expression=[where]) from None
        return self.put(raw, keep_whole=True)

    def sample(self, blob: BlobRef) -> Staged:
        """A stored body with the bytes needed for its content-type check."""
        end = blob.size if blob.size <= FULL_CHECK_BYTES else HEAD_BYTES
        return Staged(blob, b"".join(self.blobs().open(blob.key, 0, end)), end == blob.size)

    def put_checked(self, source: BlobSource, declared: str) -> Staged:
        """Stream a body sent with its own Content-Type into the store, and check that type
        (:class:`Unprocessable` when the bytes are something else; the blob then stays
        unreferenced)."""
        staged = self.put(source)
        if not staged.whole and staged.blob.size <= FULL_CHECK_BYTES:
            staged = self.sample(staged.blob)
        problem = body_problem(declared, staged)
        if problem:
            raise Unprocessable(f"Binary: {problem}", expression=["Binary.contentType"])
        return staged


@dataclass(slots=True)
class IntakeBatch:
    """The documents and bodies of one request (see the module's description)."""

    intake: DocumentIntake
    svc: FhirService
    staged: dict[int, Staged] = field(default_factory=dict)  # id(resource or attachment) →

    def stage(self, res: Json) -> None:
        """Move inline bodies of a Binary or DocumentReference into the blob store."""
        rtype = res.get("resourceType")
        if rtype == "Binary":
            if blob_of(res) is not None:
                raise Unprocessable(
                    "Binary.meta names a stored body: the hub sets that itself",
                    expression=["Binary.meta.extension"],
                )
            if "data" not in res:
                raise Unprocessable(
                    "a Binary needs its data (or POST the bytes with their own Content-Type)",
                    expression=["Binary.data"],
                )
            staged = self.intake.put_base64(res.pop("data"), "Binary.data")
            self.attach(res, staged)
        elif rtype == "DocumentReference":
            for i, content in enumerate(res.get("content") or ()):
                att = (content or {}).get("attachment") if isinstance(content, dict) else None
                if isinstance(att, dict) and "data" in att:
                    where = f"DocumentReference.content[{i}].attachment.data"
                    self.staged[id(att)] = self.intake.put_base64(att.pop("data"), where)

    def attach(self, binary: Json, staged: Staged) -> None:
        """Record a stored body on a Binary resource of this request."""
        meta = dict(binary.get("meta") or {})
        meta["extension"] = [
            *(e for e in meta.get("extension") or () if e.get("url") != BLOB_EXTENSION),
            blob_extension(staged.blob),
        ]
        binary["meta"] = meta
        self.staged[id(binary)] = staged

    def link(
        self,
        tx: WriteTx,
        when: int,
        docs: list[tuple[Json, str]],
        binaries: dict[str, Json],
        resolve: Callable[[str], str],
    ) -> None:
        """Check the request's documents against their bodies and the record; see the module
        description. ``docs``: (DocumentReference, id); ``binaries``: this request's Binaries
        by id; ``resolve``: the request's fullUrl → ``Type/id`` mapping."""
        for doc, doc_id in docs:
            self._subject(tx, doc)
            for i, content in enumerate(doc.get("content") or ()):
                self._content(tx, when, doc_id, i, content, binaries, resolve)
        for doc, doc_id in docs:
            self._relations(tx, when, doc, doc_id)

    # --- the parts of link ---------------------------------------------------------------

    def _subject(self, tx: WriteTx, doc: Json) -> None:
        subject = doc.get("subject")
        if not isinstance(subject, dict) or subject.get("reference"):
            return
        ident = subject.get("identifier")
        if not isinstance(ident, dict) or not ident.get("value"):
            return
        system, value = str(ident.get("system") or ""), str(ident["value"])
        found = self.svc._match(tx, "Patient", [("identifier", f"{system}|{value}")])
        groups = {tx.identity.group_of("Patient", f[1]) for f in found}
        if len(groups) == 1 and None not in groups:
            found = [("Patient", str(groups.pop()))]
        if len(found) != 1:
            what = "no patient" if not found else f"{len(found)} patients"
            raise Unprocessable(
                f"DocumentReference.subject.identifier {system}|{value} names {what}; send "
                "the patient's record (with demographics) in the bundle, or a reference",
                expression=["DocumentReference.subject"],
            )
        subject["reference"] = f"Patient/{found[0][1]}"

    def _content(
        self,
        tx: WriteTx,
        when: int,
        doc_id: str,
        i: int,
        content: Any,
        binaries: dict[str, Json],
        resolve: Callable[[str], str],
    ) -> None:
        where = f"DocumentReference.content[{i}].attachment"
        att = content.get("attachment") if isinstance(content, dict) else None
        if not isinstance(att, dict):
            raise Unprocessable(f"{where} is missing", expression=[where])
        context = {"reference": f"DocumentReference/{doc_id}"}
        staged = self.staged.get(id(att))
        if staged is not None:  # sent inline: the body becomes a Binary of its own
            new = new_binary_id()
            binary: Json = {"resourceType": "Binary", "securityContext": context}
            binary["contentType"] = att.get("contentType") or "application/octet-stream"
            self.attach(binary, staged)
            self._check(att, binary, staged, content, where)
            self.svc._update_in(tx, binary, "Binary", new, None, when, validated=True)
            att["url"] = f"Binary/{new}"
            return
        url = att.get("url")
        if isinstance(url, str) and url.startswith("urn:"):
            url = resolve(url)
        bid = binary_id(url)
        if bid is None:
            raise Unprocessable(
                f"{where} has no body: send it as a Binary in the bundle (attachment.url = "
                "its fullUrl), as attachment.data, or POST it first and give Binary/<id>",
                expression=[where],
            )
        att["url"] = f"Binary/{bid}"
        if bid in binaries:
            binary = binaries[bid]
            staged = self.staged[id(binary)]
            self._check(att, binary, staged, content, where)
            binary.setdefault("securityContext", context)
            return
        cur = tx.current("Binary", bid, for_update=False)
        stored_blob = blob_of(orjson.loads(cur.content)) if cur and cur.content else None
        if cur is None or stored_blob is None:
            raise Unprocessable(f"{where}.url names Binary/{bid}, which holds no body")
        self.svc._require_visible(cur, self.svc.grant("Binary", "u"), tx)
        binary = orjson.loads(cur.content or b"{}")
        self._check(att, binary, self.intake.sample(stored_blob), content, where)
        if "securityContext" not in binary:
            binary["securityContext"] = context
            self.svc._update_in(tx, binary, "Binary", bid, None, when, validated=True)

    @staticmethod
    def _check(att: Json, binary: Json, staged: Staged, content: Json, where: str) -> None:
        blob = staged.blob
        if "size" in att and att["size"] != blob.size:
            raise BlobIntegrityError(
                f"{where}.size is {att['size']} but the body has {blob.size} bytes"
            )
        if "hash" in att and att["hash"] != blob.sha1:
            raise BlobIntegrityError(
                f"{where}.hash (base64 SHA-1) is {att['hash']} but the body's is {blob.sha1}"
            )
        att["size"] = blob.size
        att["hash"] = blob.sha1
        declared = att.get("contentType") or binary.get("contentType")
        if not declared:
            raise Unprocessable(f"{where}.contentType is missing", expression=[where])
        own = binary.get("contentType")
        if own and parse_media_type(own)[0] != parse_media_type(declared)[0]:
            raise Unprocessable(
                f"{where}.contentType is {declared} but its Binary says {own}",
                expression=[f"{where}.contentType"],
            )
        att["contentType"] = declared
        fmt = str((content.get("format") or {}).get("code") or "").lower()
        cda = any(h in fmt for h in _CDA_FORMAT_HINTS)
        problem = body_problem(declared, staged, cda=cda)
        if problem:
            raise Unprocessable(f"{where}: {problem}", expression=[f"{where}.contentType"])

    def _relations(self, tx: WriteTx, when: int, doc: Json, doc_id: str) -> None:
        for i, rel in enumerate(doc.get("relatesTo") or ()):
            where = f"DocumentReference.relatesTo[{i}]"
            ref = ((rel or {}).get("target") or {}).get("reference")
            if not isinstance(ref, str) or not ref.startswith("DocumentReference/"):
                raise Unprocessable(f"{where}.target must reference a DocumentReference")
            tid = ref.removeprefix("DocumentReference/")
            if tid == doc_id:
                raise Unprocessable(f"{where}.target is the document itself")
            cur = tx.current("DocumentReference", tid)
            if cur is None or cur.content is None:
                raise Unprocessable(f"{where}.target {ref} is not a stored document")
            target = orjson.loads(cur.content)
            if not self._same_patient(tx, doc, target):
                raise Unprocessable(
                    f"{where}.target {ref} is a document of another patient",
                    expression=[f"{where}.target"],
                )
            if rel.get("code") in SUPERSEDING:
                if target.get("status") != "current":
                    raise Unprocessable(
                        f"{where}: {ref} is {target.get('status')}, not current; replace "
                        "the current version of the document"
                    )
                target["status"] = "superseded"
                self.svc._update_in(
                    tx, target, "DocumentReference", tid, None, when, validated=True
                )

    @staticmethod
    def _same_patient(tx: WriteTx, a: Json, b: Json) -> bool:
        def person(doc: Json) -> str | None:
            ref = (doc.get("subject") or {}).get("reference")
            if not isinstance(ref, str) or not ref.startswith("Patient/"):
                return None
            pid = ref.removeprefix("Patient/")
            group = tx.identity.group_of("Patient", pid)
            return f"group:{group}" if group is not None else pid

        pa, pb = person(a), person(b)
        return pa is not None and pa == pb


def new_binary_id() -> str:
    """An id for a Binary the hub creates from an inline attachment."""
    from hie.fhir.service import new_id

    return new_id()
