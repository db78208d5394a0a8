"""FHIR operations without HTTP: create, read, update, patch, delete, search, history,
transaction/batch, ``$everything`` and ``$validate``.

The HTTP layer (:mod:`hie.fhir.api`) and the protocol adapters call these; every failure is a
:class:`~hie.hub.errors.HieError`. Stored JSON is served as bytes and embedded into bundles as
``orjson.Fragment`` — resources are parsed only when ``_summary``/``_elements`` need it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlencode

import jsonpatch
import orjson

from hie.fhir import model
from hie.fhir.access import Access, check_author, label_sensitive
from hie.fhir.dates import format_instant, require_range
from hie.fhir.documents import DOCUMENT_TYPES, DocumentIntake, IntakeBatch, security_context
from hie.fhir.extract import extract
from hie.fhir.indexing import FULLTEXT_TYPES
from hie.fhir.search import (
    SearchRequest,
    canonical_items,
    encode_cursor,
    parse_search,
)
from hie.fhir.searchparams import PATIENT_COMPARTMENT, params_for
from hie.hub.audit import AccessNote, AuditRecord, SqlAuditLog, current_access, note_access
from hie.hub.auth import Forbidden, Principal, current_principal
from hie.hub.blobs.port import BlobSource, BlobStore
from hie.hub.errors import (
    Gone,
    HieError,
    InvalidRequest,
    InvalidResource,
    NotFound,
    NotSupported,
    PreconditionFailed,
    Unprocessable,
    VersionConflict,
)
from hie.hub.outbox import LagGate
from hie.hub.policy import EVERYTHING, AccessPolicy, Grant
from hie.hub.search.port import SearchIndex
from hie.hub.settings import Settings
from hie.hub.store.port import (
    AnyOf,
    CompartmentCond,
    IdCond,
    LastUpdatedCond,
    NewVersion,
    OwnerCond,
    Query,
    ReferenceCond,
    ResourceStore,
    StoredResource,
    TokenCond,
    TypeCond,
    WriteTx,
)
from hie.hub.store.sql import now_us
from hie.registries.mpi.features import validate_demographics

if TYPE_CHECKING:
    from hie.registries.terminology import Terminology

Json = dict[str, Any]
NOTIFICATION_SYSTEM = "https://hie.spb.ru/fhir/CodeSystem/notification"
_ID_RX = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR R4 §2.24.0.1 "id"
_COMPARTMENT_TYPES = {t for t, _ in PATIENT_COMPARTMENT} | {"Patient"}
# Lab reports and results: their codes are checked against the reference data on write.
CODE_CHECKED = frozenset({"DiagnosticReport", "Observation"})


@dataclass
class WriteResult:
    """What a write did: the stored version, and whether it created the resource."""

    stored: StoredResource
    created: bool
    status: int


def new_id() -> str:
    """A server-assigned logical id: a UUID version 7 (RFC 9562) — 48 bits of milliseconds,
    then 74 random bits. Ids made close in time sort together, so the unique index on ids
    grows at its right edge instead of dirtying a random page per insert (at a million
    resources that is most of the write-ahead log a commit has to sync)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(_random_bytes(10), "big")
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64
    value |= 0b10 << 62 | rand & (2**62 - 1)
    return str(uuid.UUID(int=value))


_RANDOM_LOCK = threading.Lock()
_random_pool = bytearray()


def _random_bytes(n: int) -> bytes:
    """``n`` bytes from the operating system's generator, fetched 4 KB at a time: a lab
    message asks for fourteen ids, and each ``os.urandom`` call let another thread take the
    interpreter lock, which in a busy hub the caller then waited to get back."""
    with _RANDOM_LOCK:
        if len(_random_pool) < n:
            _random_pool.extend(os.urandom(4096))
        out = bytes(_random_pool[:n])
        del _random_pool[:n]
    return out


def _after_fork() -> None:
    """A forked child must not hand out the bytes its parent has used or will use, nor
    inherit the lock held by a parent's thread that does not exist in the child."""
    global _RANDOM_LOCK
    _RANDOM_LOCK = threading.Lock()
    _random_pool.clear()


os.register_at_fork(after_in_child=_after_fork)


def content_json(stored: StoredResource) -> Json:
    """The stored resource as a dict (parses; use only when the content must change)."""
    return orjson.loads(stored.content or b"{}")  # type: ignore[no-any-return]


def _digits(value: str, what: str) -> int:
    """ASCII digits as an int, capped at 2**62 so that it fits a 64-bit database column."""
    if not (value.isascii() and value.isdigit()):
        raise InvalidRequest(f"{what} must be a non-negative integer")
    return int(value) if len(value) <= 18 else 2**62


def check_type(resource_type: str) -> None:
    """Raise NotFound unless the hub stores ``resource_type``."""
    if not params_for(resource_type) and resource_type not in ("Binary",):
        if model.is_resource_type(resource_type):
            raise NotSupported(f"resource type {resource_type} is not supported by this server")
        raise NotFound(f"unknown resource type {resource_type!r}")


def check_demographics(patient: Json) -> None:
    """Refuse a Patient whose identity data is unusable: an invalid SNILS checksum or a
    malformed national identifier, an impossible birth date, no name at all, an identifier
    without a system (the master patient index could only mis-match it)."""
    problems = [p for p in validate_demographics(patient) if p.severity == "error"]
    if problems:
        raise InvalidResource(
            "; ".join(f"{p.expression}: {p.message} ({p.code})" for p in problems),
            expression=[p.expression for p in problems],
        )


MPI_SYSTEM = "https://hie.spb.ru/fhir/CodeSystem/mpi"
GOLDEN_TAG = {"system": MPI_SYSTEM, "code": "golden", "display": "Золотая запись / golden record"}


def is_golden(res: Json | None) -> bool:
    """True if ``res`` is a golden Patient (the master patient index's record of a person)."""
    if not res:
        return False
    tags = (res.get("meta") or {}).get("tag") or []
    return any(
        isinstance(t, dict) and t.get("system") == MPI_SYSTEM and t.get("code") == "golden"
        for t in tags
    )


def _stored_is_golden(stored: StoredResource | None) -> bool:
    if stored is None or stored.content is None or stored.resource_type != "Patient":
        return False
    return b'"golden"' in stored.content and is_golden(content_json(stored))


class PatientWrites(Protocol):
    """What the master patient index does when a source Patient is written (inside the
    write transaction, so the match, the golden record and the patient commit together)."""

    def on_patient_written(
        self, tx: WriteTx, res: Json | None, stored: StoredResource, when: int
    ) -> None:
        """Match, link and refresh the golden record (``res`` None: the patient was deleted)."""


def _walk_refs(node: Any, fn: Callable[[str], str]) -> None:
    """Apply ``fn`` to every ``reference`` string in a resource, in place."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                node[key] = fn(value)
            elif isinstance(value, dict | list):
                _walk_refs(value, fn)
    elif isinstance(node, list):
        for item in node:
            _walk_refs(item, fn)


class FhirService:
    """The FHIR operations over one resource store."""

    def __init__(
        self,
        store: ResourceStore,
        settings: Settings,
        search_index: Callable[[], SearchIndex] | None = None,
        *,
        require_principal: bool = False,
        trail: SqlAuditLog | None = None,
        blobs: Callable[[], BlobStore] | None = None,
        index_gate: LagGate | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.search_index = search_index
        # document bodies (IHE MHD): in the blob store when one is configured
        self.documents = (
            DocumentIntake(blobs, settings.max_document_bytes, index_gate)
            if blobs is not None
            else None
        )
        self.mpi: PatientWrites | None = None  # set by the app (hie.registries.patient_index)
        self.policy = AccessPolicy(PATIENT_COMPARTMENT)
        self.access = Access(store, self.policy)
        # The HTTP app sets this: a call without a principal is then refused rather than
        # trusted. In-process callers (CLI, demo, adapters' own principal) leave it off.
        self.require_principal = require_principal
        self.trail = trail  # the audit trail, for events the hub records itself (merges)

    # --- reference data ----------------------------------------------------------------------

    @cached_property
    def terminology(self) -> Terminology:
        """The reference data, for checking incoming codes (cached; re-read on change)."""
        from hie.registries.terminology import Terminology  # it builds on this module

        return Terminology(self.store, recheck_seconds=5.0)

    def unknown_codes(self, res: Json) -> list[tuple[str, str]]:
        """The ``code`` codings of a lab report or result that the reference data does not
        know (LOINC, the MO's local lab list), each counted in ``hie_unknown_codes_total``:
        such a record is stored all the same, and the sender told, as (system, message)."""
        from hie.registries.terminology import flag_unknown

        if res.get("resourceType") not in CODE_CHECKED:
            return []
        out: list[tuple[str, str]] = []
        for coding in (res.get("code") or {}).get("coding") or []:
            if not isinstance(coding, dict) or not coding.get("system") or not coding.get("code"):
                continue
            check = self.terminology.check_code(str(coding["system"]), str(coding["code"]))
            if not check.known:
                flag_unknown(str(coding["system"]))
                where = f"{coding['system']}|{coding['code']}"
                out.append((str(coding["system"]), f"{where}: {check.message}"))
        return out

    def code_warnings(self, res: Json) -> list[Json]:
        """:meth:`unknown_codes` as OperationOutcome warnings."""
        return [
            {
                "severity": "warning",
                "code": "code-invalid",
                "diagnostics": f"{message}; stored and flagged",
                "expression": [f"{res.get('resourceType')}.code"],
            }
            for _, message in self.unknown_codes(res)
        ]

    # --- access control (hie.hub.policy decides; this applies it to the queries) -------------

    def grant(self, resource_type: str | None, permission: str) -> Grant:
        """The rows the current principal may ``permission`` (c r u d s) of
        ``resource_type``; :class:`Forbidden` if none (:mod:`hie.fhir.access`)."""
        p = current_principal.get()
        if p is None:
            if self.require_principal:
                raise Forbidden("no authenticated principal for this call")
            return EVERYTHING
        grant = self.access.grant(p, resource_type, permission)
        if grant.break_glass:
            note = current_access.get()
            if note is not None:
                note.overridden["break-the-glass"] = None
        return grant

    def notify_break_glass(self, p: Principal | None, note: AccessNote, rec: AuditRecord) -> None:
        """After an emergency access: tell the patients whose records it opened beyond the
        caller's usual grant (a Communication each, shown in the portal)."""
        if p is None:
            return

        def write(tx: WriteTx, res: Json, rtype: str, id: str, when: int) -> None:
            self.write_internal(tx, res, rtype, id, when, fresh=True)

        self.access.notify_break_glass(p, note, rec, write, new_id)

    def operation(self, name: str) -> None:
        """Refuse the current principal an operation its roles may not run."""
        p = current_principal.get()
        if p is None:
            if self.require_principal:
                raise Forbidden("no authenticated principal for this call")
            return
        self.policy.operation(p, name)

    def _require_visible(
        self, stored: StoredResource, grant: Grant, tx: WriteTx | None = None
    ) -> None:
        """Refuse a single resource outside the rows ``grant`` allows (the same query a
        search would run, so a read and a search never disagree)."""
        if not grant.restricted:
            return
        q = Query(stored.resource_type, [IdCond((stored.id,)), *grant.conds], count=1)
        found = (
            tx.search_ids(q)
            if tx is not None
            else [(r.resource_type, r.id) for r in self.store.search(q).items]
        )
        if not found:
            raise Forbidden(
                f"{stored.resource_type}/{stored.id} is outside the records this principal "
                "may access"
            )

    def _note(self, items: Sequence[StoredResource], subtype: str, action: str = "R") -> None:
        """Tell the request's audit record what it returned: the resources, and the patients
        they are about (through the Patient compartment's references)."""
        if current_access.get() is None:
            return
        patients = [r.id for r in items if r.resource_type == "Patient"]
        rids = [r.rid for r in items if r.resource_type != "Patient" and r.rid is not None]
        if rids and len(items) <= 20:  # a few resources: their own references say
            for r in items:
                if r.resource_type != "Patient":
                    patients += _patients_in(content_json(r), r)
        elif rids:  # a page: one query over the reference index
            patients += [
                i for t, i in self.store.references_from(rids, _PATIENT_LINKS) if t == "Patient"
            ]
        note_access(
            subtype,
            action=action,
            entities=[f"{r.resource_type}/{r.id}" for r in items],
            patients=patients,
        )

    def visible(self, items: list[StoredResource], permission: str = "r") -> list[StoredResource]:
        """The resources of ``items`` the current principal may see (others dropped)."""
        by_type: dict[str, list[StoredResource]] = {}
        for r in items:
            by_type.setdefault(r.resource_type, []).append(r)
        keep: set[tuple[str, str]] = set()
        for rtype, rs in by_type.items():
            try:
                grant = self.grant(rtype, permission)
            except Forbidden:
                continue
            if not grant.restricted:
                keep.update((rtype, r.id) for r in rs)
                continue
            q = Query(rtype, [IdCond(tuple(r.id for r in rs)), *grant.conds], count=len(rs))
            keep.update((r.resource_type, r.id) for r in self.store.search(q).items)
        return [r for r in items if (r.resource_type, r.id) in keep]

    # --- preparing versions ----------------------------------------------------------------

    def prepare(
        self,
        res: Json,
        resource_type: str,
        id: str,
        version: int,
        when: int,
        method: str,
        *,
        validated: bool = False,
        internal: bool = False,
    ) -> NewVersion:
        """Stamp id and meta, validate (unless the caller already did, outside the write
        lock), extract index rows, serialise. ``internal`` marks the hub's own records
        (golden Patients), which skip the checks meant for what senders send."""
        if not _ID_RX.match(id):
            raise InvalidResource(f"{id!r} is not a valid id", expression=[f"{resource_type}.id"])
        res["id"] = id
        if not isinstance(res.get("meta") or {}, dict):
            raise InvalidResource("meta must be an object", expression=[f"{resource_type}.meta"])
        meta = dict(res.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = format_instant(when)
        res["meta"] = meta
        if not validated:
            model.validate(res)
        owner = None
        if not internal:
            p = current_principal.get()
            if p is not None and p.org:
                owner = p.org  # whose record this is (kept from its first version)
                if p.has_role("mis") and not p.has_role("service"):
                    check_author(p.org, res)
            label_sensitive(res)
        if resource_type == "Patient" and not internal:
            if is_golden(res):
                raise Unprocessable(
                    "golden Patient records are kept by the master patient index; send the "
                    "MO's own record, or use Patient/$merge (golden-record)",
                    expression=["Patient.meta.tag"],
                )
            check_demographics(res)
        return NewVersion(
            resource_type,
            id,
            orjson.dumps(res),
            extract(res),
            method,  # type: ignore[arg-type]
            owner=owner,
        )

    @staticmethod
    def _check_body(res: Any, resource_type: str | None) -> Json:
        if not isinstance(res, dict):
            raise InvalidResource("the body must be a JSON object (a FHIR resource)")
        rt = res.get("resourceType")
        if not isinstance(rt, str):
            raise InvalidResource("resourceType is missing", expression=["resourceType"])
        if resource_type is not None and rt != resource_type:
            raise InvalidResource(
                f"resourceType {rt!r} does not match the URL ({resource_type})",
                expression=["resourceType"],
            )
        check_type(rt)
        return res

    # --- single-resource interactions ------------------------------------------------------

    def create(
        self,
        res: Any,
        resource_type: str,
        if_none_exist: str | None = None,
        *,
        batch: IntakeBatch | None = None,
    ) -> WriteResult:
        """Create with a server id; ``If-None-Exist`` makes it conditional. ``batch``: the
        body of a Binary is already in the blob store (:meth:`write_binary`)."""
        res = self._check_body(res, resource_type)
        res.pop("id", None)
        when = now_us()
        rid = new_id()
        batch = batch or self._stage_documents(res, resource_type)
        new = self.prepare(res, resource_type, rid, 1, when, "POST") if batch is None else None
        with self.store.transaction() as tx:
            if if_none_exist:
                found = self._match(tx, resource_type, if_none_exist)
                if len(found) > 1:
                    raise PreconditionFailed(
                        f"If-None-Exist matched {len(found)} resources; be more specific"
                    )
                if found:
                    cur = tx.current(resource_type, found[0][1], for_update=False)
                    assert cur is not None
                    return WriteResult(cur, False, 200)
            if new is None:  # a document: checked against its body, inside the transaction
                self._link_document(batch, tx, res, resource_type, rid, when)
                new = self.prepare(res, resource_type, rid, 1, when, "POST", validated=True)
            stored = tx.write(new, 1, when)
            self.written(tx, res, stored, when)
        return WriteResult(stored, True, 201)

    def write_binary(
        self,
        source: BlobSource,
        content_type: str,
        context: str | None = None,
        id: str | None = None,
        if_match: int | None = None,
    ) -> WriteResult:
        """Create (``id`` None) or update a Binary from its raw bytes, sent with their own
        Content-Type and streamed into the blob store within the document limit;
        ``context``: the ``X-Security-Context`` reference the Binary's access follows."""
        if self.documents is None:
            raise NotSupported("raw Binary bodies need the blob store (HIE_BLOB_URL)")
        res: Json = {"resourceType": "Binary", "contentType": content_type}
        if context:
            if context.count("/") != 1 or not all(context.split("/")):
                raise InvalidRequest(f"X-Security-Context {context!r} is not Type/id")
            res["securityContext"] = {"reference": context}
        model.validate(res)
        batch = self.documents.batch(self)
        batch.attach(res, self.documents.put_checked(source, content_type))
        if id is None:
            return self.create(res, "Binary", batch=batch)
        return self.update(res, "Binary", id, if_match, batch=batch)

    def _stage_documents(self, res: Json, resource_type: str) -> IntakeBatch | None:
        """For a Binary or DocumentReference: validate, then put inline bodies into the blob
        store (before the transaction; :mod:`hie.fhir.documents`)."""
        if self.documents is None or resource_type not in DOCUMENT_TYPES:
            return None
        model.validate(res)
        batch = self.documents.batch(self)
        batch.stage(res)
        return batch

    @staticmethod
    def _link_document(
        batch: IntakeBatch | None, tx: WriteTx, res: Json, resource_type: str, id: str, when: int
    ) -> None:
        """Check a single written document against its body, inside the transaction."""
        if batch is None:
            return
        docs = [(res, id)] if resource_type == "DocumentReference" else []
        binaries = {id: res} if resource_type == "Binary" else {}
        batch.link(tx, when, docs, binaries, resolve=lambda url: url)

    def written(self, tx: WriteTx, res: Json | None, stored: StoredResource, when: int) -> None:
        """After a client's write, inside its transaction: the principal's right to it (what
        was written must lie in the rows it may write), then a source Patient goes through
        the master patient index (``res`` is None for a deletion)."""
        if res is not None:
            grant = self.grant(stored.resource_type, "c" if stored.version == 1 else "u")
            p = current_principal.get()
            # an MO's write grant is "its own records", and what it writes is stamped with its
            # MO (prepare) or was checked to be its own before (the version replaced): no query
            if not (p is not None and p.org and grant.conds == (OwnerCond(p.org),)):
                self._require_visible(stored, grant, tx)
        note_access(
            entities=[f"{stored.resource_type}/{stored.id}"],
            patients=_patients_in(res, stored),
        )
        if stored.resource_type == "Patient" and self.mpi is not None:
            self.mpi.on_patient_written(tx, res, stored, when)

    def write_internal(
        self,
        tx: WriteTx,
        res: Json,
        resource_type: str,
        id: str,
        when: int,
        *,
        fresh: bool = False,
        owner: str | None = None,
    ) -> StoredResource:
        """Write a resource the hub itself keeps (a golden Patient, a review Task, an
        AuditEvent) inside ``tx``: no sender checks, no master-patient-index hook. The content
        is built by the hub from validated parts, so it is not validated again. ``fresh``: the
        caller just made ``id`` up, so there is no current version to read. ``owner``: the MO
        whose record it is (a critical-result alert addressed to it), when it is new."""
        cur = None if fresh else tx.current(resource_type, id)
        version = cur.version + 1 if cur else 1
        new = self.prepare(
            res, resource_type, id, version, when, "PUT", validated=True, internal=True
        )
        return tx.write(dataclasses.replace(new, owner=owner) if owner else new, version, when)

    def delete_internal(self, tx: WriteTx, resource_type: str, id: str, when: int) -> None:
        """Delete a resource the hub keeps (a golden record left without sources)."""
        self._delete_in(tx, resource_type, id, when, internal=True)

    def _match_identifiers(
        self,
        tx: WriteTx,
        resource_type: str,
        criteria: list[list[tuple[str, str]]],
        permission: str = "u",
    ) -> list[list[tuple[str, str]] | None]:
        """The targets of many conditional updates (``permission`` ``u``) or creates
        (``s``) at once, where each criteria is one ``identifier=sys|value`` (a lab message's
        patient, order, report and results): one query per type. None for criteria of
        another shape (matched one by one, :meth:`_match`)."""
        tokens: dict[int, tuple[str, str]] = {}
        for i, items in enumerate(criteria):
            if len(items) != 1 or items[0][0] != "identifier":
                continue
            token = _plain_token(items[0][1])
            if token is None:  # escapes, modifiers: the search parser says what it means
                conds = parse_search(resource_type, items, default_count=3, max_count=3)
                cond = conds.query.conds[0] if len(conds.query.conds) == 1 else None
                if isinstance(cond, TokenCond) and cond.system and cond.code and not cond.negate:
                    token = (cond.system, cond.code)
            if token is not None:
                tokens[i] = token
        out: list[list[tuple[str, str]] | None] = [None] * len(criteria)
        if not tokens:
            return out
        # the target of a conditional update is looked for among the records the caller may
        # update (an MO: its own), so another organisation's record with the same identifier
        # is neither changed nor revealed; a conditional create's among those it may search
        grant = list(self.grant(resource_type, permission).conds)
        if resource_type == "Patient":
            grant.append(TokenCond("_tag", MPI_SYSTEM, "golden", negate=True))
        for system, code in sorted(set(tokens.values())):  # one order: no deadlock
            lock_criteria(tx, resource_type, [("identifier", f"{system}|{code}")])
        found = tx.ids_by_token(resource_type, "identifier", list(tokens.values()), grant)
        for i, tok in tokens.items():
            out[i] = [(resource_type, rid) for rid in found[tok][:3]]
        return out

    def _match(
        self, tx: WriteTx, resource_type: str, criteria: str | list[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        """Resources matching conditional criteria (a query string or parsed items), seen
        inside ``tx``; at most three, enough to tell none, one and several apart."""
        if isinstance(criteria, str):
            criteria = parse_qsl(criteria.split("?", 1)[-1], keep_blank_values=True)
        if not criteria:
            raise InvalidRequest("conditional criteria are empty")
        lock_criteria(tx, resource_type, criteria)
        req = parse_search(resource_type, criteria, default_count=3, max_count=3)
        req.query.conds.extend(self.grant(resource_type, "s").conds)
        if resource_type == "Patient":
            # a sender's conditional create/update/delete is about its own record, never the
            # golden record that carries the same identifier
            req.query.conds.append(TokenCond("_tag", MPI_SYSTEM, "golden", negate=True))
        return tx.search_ids(req.query)

    def read(self, resource_type: str, id: str) -> StoredResource:
        """Current version; NotFound if never existed, Gone if deleted."""
        check_type(resource_type)
        grant = self.grant(resource_type, "r")
        if grant.restricted:
            # one query reads the resource and checks the grant; only when it finds nothing
            # is the plain read needed, to tell unknown, deleted and forbidden apart
            hit = self.store.read_where(resource_type, id, grant.conds)
            if hit is not None:
                self._note([hit], "read")
                return hit
        cur = self.store.read(resource_type, id)
        if cur is None:
            raise NotFound(f"{resource_type}/{id} is not known")
        if cur.deleted:
            raise Gone(f"{resource_type}/{id} was deleted (version {cur.version})")
        if resource_type == "Binary" and grant.restricted and self._context_visible(cur):
            return cur
        self._require_visible(cur, grant)
        self._note([cur], "read")
        return cur

    def _context_visible(self, binary: StoredResource) -> bool:
        """Whether the caller may read the resource a Binary's ``securityContext`` names (a
        document's body is read on the document's rules); the read is audited as about that
        resource's patients."""
        context = security_context(content_json(binary))
        if context is None:
            return False
        try:
            grant = self.grant(context[0], "r")
        except Forbidden:
            return False
        about = self.store.read_where(context[0], context[1], grant.conds)
        if about is None:
            return False
        self._note([binary], "read")
        note_access(patients=_patients_in(content_json(about), about))
        return True

    def vread(self, resource_type: str, id: str, version: str) -> StoredResource:
        """A specific version; Gone for the version that is a deletion."""
        check_type(resource_type)
        grant = self.grant(resource_type, "r")
        if grant.restricted:  # the resource as it is now decides (a moved record is gone)
            self.read(resource_type, id)
        if not (version.isascii() and version.isdigit()) or len(version) > 18:
            raise NotFound(f"version {version!r} of {resource_type}/{id} does not exist")
        v = self.store.vread(resource_type, id, int(version))
        if v is None:
            raise NotFound(f"version {version} of {resource_type}/{id} does not exist")
        if v.deleted:
            raise Gone(f"version {version} of {resource_type}/{id} is a deletion")
        self._note([v], "vread")
        return v

    def update(
        self,
        res: Any,
        resource_type: str,
        id: str,
        if_match: int | None = None,
        *,
        batch: IntakeBatch | None = None,
    ) -> WriteResult:
        """Update (or create with the client's id when absent)."""
        res = self._check_body(res, resource_type)
        if res.get("id") not in (None, id):
            raise InvalidResource(
                f"the body's id {res.get('id')!r} does not match the URL id {id!r}",
                expression=["id"],
            )
        model.validate(res)  # outside the write lock: validation is the costly part
        batch = batch or self._stage_documents(res, resource_type)
        when = now_us()
        with self.store.transaction() as tx:
            return self._update_in(
                tx, res, resource_type, id, if_match, when, validated=True, batch=batch
            )

    def _update_in(
        self,
        tx: WriteTx,
        res: Json,
        resource_type: str,
        id: str,
        if_match: int | None,
        when: int,
        method: str = "PUT",
        *,
        validated: bool = False,
        batch: IntakeBatch | None = None,
    ) -> WriteResult:
        cur = tx.current(resource_type, id)
        if if_match is not None and (cur is None or cur.version != if_match):
            have = "none" if cur is None else str(cur.version)
            raise VersionConflict(
                f"If-Match expected version {if_match} of {resource_type}/{id}, current is {have}"
            )
        _refuse_golden(cur)
        if cur is not None and not cur.deleted:
            self._require_visible(cur, self.grant(resource_type, "u"), tx)
        version = cur.version + 1 if cur else 1
        self._link_document(batch, tx, res, resource_type, id, when)
        new = self.prepare(res, resource_type, id, version, when, method, validated=validated)
        stored = tx.write(new, version, when)
        self.written(tx, res, stored, when)
        created = cur is None or cur.deleted
        return WriteResult(stored, created, 201 if created else 200)

    def conditional_update(
        self, res: Any, resource_type: str, criteria: list[tuple[str, str]]
    ) -> WriteResult:
        """PUT ``Type?criteria``: 0 matches creates, 1 updates, more is 412."""
        res = self._check_body(res, resource_type)
        model.validate(res)
        batch = self._stage_documents(res, resource_type)
        when = now_us()
        with self.store.transaction() as tx:
            found = self._match(tx, resource_type, criteria)
            if len(found) > 1:
                raise PreconditionFailed(f"conditional update matched {len(found)} resources")
            if found:
                id = found[0][1]
                if res.get("id") not in (None, id):
                    raise InvalidResource(
                        "the body's id does not match the resource the criteria found",
                        expression=["id"],
                    )
            else:
                id = res.get("id") or new_id()
            return self._update_in(
                tx, res, resource_type, id, None, when, validated=True, batch=batch
            )

    def patch(
        self, ops: Any, resource_type: str, id: str, if_match: int | None = None
    ) -> WriteResult:
        """JSON Patch (RFC 6902) against the current version."""
        if not isinstance(ops, list):
            raise InvalidRequest("a JSON Patch body is an array of operations")
        if resource_type == "Binary":
            raise Unprocessable("a Binary's bytes cannot be patched; PUT the new body")
        when = now_us()
        with self.store.transaction() as tx:
            cur = tx.current(resource_type, id)
            if cur is None or cur.deleted:
                raise NotFound(f"{resource_type}/{id} is not known")
            try:
                res = jsonpatch.apply_patch(content_json(cur), ops)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise Unprocessable(f"the patch cannot be applied: {exc}") from None
            except (TypeError, KeyError, ValueError) as exc:
                raise InvalidRequest(f"malformed JSON Patch: {exc}") from None
            res = self._check_body(res, resource_type)
            if res.get("id") != id:
                raise Unprocessable("a patch may not change the resource id")
            batch = self._stage_documents(res, resource_type)
            return self._update_in(
                tx,
                res,
                resource_type,
                id,
                if_match,
                when,
                "PATCH",
                validated=batch is not None,
                batch=batch,
            )

    def delete(self, resource_type: str, id: str) -> StoredResource | None:
        """Delete: a new version that is a tombstone. Idempotent."""
        check_type(resource_type)
        with self.store.transaction() as tx:
            return self._delete_in(tx, resource_type, id, now_us())

    def _delete_in(
        self, tx: WriteTx, resource_type: str, id: str, when: int, *, internal: bool = False
    ) -> StoredResource | None:
        grant = EVERYTHING if internal else self.grant(resource_type, "d")
        cur = tx.current(resource_type, id)
        if cur is None or cur.deleted:
            return cur
        if not internal:
            _refuse_golden(cur)
            self._require_visible(cur, grant, tx)
        tomb = NewVersion(
            resource_type, id, None, extract({"resourceType": resource_type}), "DELETE"
        )
        tomb.index.rows.clear()
        stored = tx.write(tomb, cur.version + 1, when)
        if not internal:
            self.written(tx, None, stored, when)
        return stored

    def conditional_delete(self, resource_type: str, criteria: list[tuple[str, str]]) -> int:
        """DELETE ``Type?criteria`` for a single match (412 for several); returns the count."""
        check_type(resource_type)
        with self.store.transaction() as tx:
            found = self._match(tx, resource_type, criteria)
            if len(found) > 1:
                raise PreconditionFailed(f"conditional delete matched {len(found)} resources")
            for rt, rid in found:
                self._delete_in(tx, rt, rid, now_us())
            return len(found)

    # --- search ----------------------------------------------------------------------------

    def search(
        self,
        resource_type: str | None,
        items: list[tuple[str, str]],
        base: str,
        *,
        lenient: bool = False,
        extra_conds: list[Any] | None = None,
        path: str | None = None,
    ) -> bytes:
        """A searchset Bundle (JSON bytes) for the query items."""
        if resource_type is not None:
            check_type(resource_type)
        req = parse_search(
            resource_type,
            items,
            default_count=self.settings.page_size,
            max_count=self.settings.max_page_size,
            lenient=lenient,
        )
        if extra_conds:
            req.query.conds.extend(extra_conds)
        req.query.conds.extend(self.grant(resource_type, "s").conds)
        if resource_type == "Patient" and not any(k.startswith(("_tag", "_id")) for k, _ in items):
            # MOs' records by default; golden records when asked for (PDQm over golden records:
            # _tag=https://hie.spb.ru/fhir/CodeSystem/mpi|golden) or by id
            req.query.conds.append(TokenCond("_tag", MPI_SYSTEM, "golden", negate=True))
        if resource_type == "DocumentReference" and not any(
            k.split(":")[0] in ("status", "_id") for k, _ in items
        ):
            # IHE MHD: a replaced document stays retrievable, but search shows the current
            # ones unless the client asks for a status (status=superseded, or several)
            req.query.conds.append(TokenCond("status", None, "current"))
        if req.content is not None:
            req.query.conds.append(self._content_cond(resource_type, req.content, req.query.conds))
        page_path = path or (f"/{resource_type}" if resource_type else "")
        return self._run_search(req, items, base, page_path)

    def _content_cond(self, resource_type: str | None, text: str, conds: list[Any]) -> Any:
        # one patient's documents: ask the text index for that patient only, so the cap on
        # text hits can never hide a lower-ranked document of theirs
        patient = next(
            (
                f"Patient/{c.target_id}"
                for c in conds
                if isinstance(c, ReferenceCond)
                and c.param in ("patient", "subject")
                and c.target_type in (None, "Patient")
            ),
            None,
        )
        ids = self.content_search(resource_type, text, patient)
        # no hits: a condition that matches nothing (PostgreSQL rejects NUL in a sentinel id)
        return IdCond(tuple(ids)) if ids else AnyOf(())

    def content_search(
        self, resource_type: str | None, text: str, patient: str | None = None
    ) -> list[str]:
        """Logical ids whose text matches ``text`` in the full-text search index."""
        if self.search_index is None:
            raise NotSupported("_content/_text need the full-text search index (not enabled)")
        if resource_type is not None and resource_type not in FULLTEXT_TYPES:
            raise InvalidRequest(
                f"{resource_type} is not full-text indexed; _content/_text apply to "
                + ", ".join(sorted(FULLTEXT_TYPES))
            )
        index = self.search_index()
        if patient is None:
            hits = index.ids_matching(text, resource_type, None, limit=10_000)
            return [h.split("/", 1)[1] for h in hits]
        # the person's records from every MO: each member of the patient's identity group
        pid = patient.removeprefix("Patient/")
        with self.store.identity_reader() as idx:
            group = idx.group_of("Patient", pid)
            members = [m.id for m in idx.members("Patient", group)] if group else [pid]
        out: dict[str, None] = {}
        for member in members:
            for h in index.ids_matching(text, resource_type, f"Patient/{member}", limit=10_000):
                out[h.split("/", 1)[1]] = None
        return list(out)

    def _run_search(
        self, req: SearchRequest, items: list[tuple[str, str]], base: str, page_path: str
    ) -> bytes:
        q = req.query
        if req.summary == "count":
            q.count = 0
        page = self.store.search(q)
        self._note(page.items, "search")
        entries: list[Json] = [self._entry(base, r, "match", req) for r in page.items]
        if page.items:
            entries.extend(self._includes(base, page.items, req))
        links = [{"relation": "self", "url": self._url(base, page_path, items)}]
        if page.next_after is not None:
            nxt = [*canonical_items(items), ("_cursor", encode_cursor(page.next_after))]
            links.append({"relation": "next", "url": self._url(base, page_path, nxt)})
        bundle: Json = {"resourceType": "Bundle", "id": new_id(), "type": "searchset"}
        bundle["meta"] = {"lastUpdated": format_instant(now_us())}
        if page.total is not None:
            bundle["total"] = page.total
        bundle["link"] = links
        if req.ignored:
            entries.append(self._ignored_outcome(req.ignored))
        bundle["entry"] = entries
        return orjson.dumps(bundle)

    @staticmethod
    def _url(base: str, path: str, items: list[tuple[str, str]]) -> str:
        qs = urlencode(items)
        return f"{base}{path}" + (f"?{qs}" if qs else "")

    @staticmethod
    def _ignored_outcome(ignored: list[str]) -> Json:
        return {
            "resource": {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "warning",
                        "code": "not-supported",
                        "diagnostics": f"search parameter {k!r} is not supported and was ignored",
                    }
                    for k in ignored
                ],
            },
            "search": {"mode": "outcome"},
        }

    def _entry(self, base: str, r: StoredResource, mode: str, req: SearchRequest | None) -> Json:
        body: Any = orjson.Fragment(r.content or b"{}")
        if req is not None and (req.summary or req.elements):
            body = shape(content_json(r), req.summary, req.elements)
        return {
            "fullUrl": f"{base}/{r.resource_type}/{r.id}",
            "resource": body,
            "search": {"mode": mode},
        }

    def _includes(self, base: str, items: list[StoredResource], req: SearchRequest) -> list[Json]:
        seen = {(r.resource_type, r.id) for r in items}
        out: list[StoredResource] = []
        for inc in req.includes:
            rids = [r.rid for r in items if r.resource_type == inc.source_type]
            params = None if inc.param == "*" else [(inc.source_type, inc.param)]
            targets = self.store.references_from(rids, params)
            if inc.target_type:
                targets = [t for t in targets if t[0] == inc.target_type]
            out.extend(self.store.read_many([t for t in targets if t not in seen]))
            seen.update((r.resource_type, r.id) for r in out)
        for inc in req.revincludes:
            targets = [(r.resource_type, r.id) for r in items]
            param = None if inc.param == "*" else inc.param
            found = self.store.referencing(targets, inc.source_type, param, 1000)
            out.extend(r for r in found if (r.resource_type, r.id) not in seen)
            seen.update((r.resource_type, r.id) for r in found)
        unique = {(r.resource_type, r.id): r for r in out}
        shown = self.visible(list(unique.values()))
        self._note(shown, "search")
        return [self._entry(base, r, "include", None) for r in shown]

    # --- history ---------------------------------------------------------------------------

    def history(
        self,
        resource_type: str | None,
        id: str | None,
        items: list[tuple[str, str]],
        base: str,
    ) -> bytes:
        """A history Bundle (newest first) at instance, type or system level."""
        if resource_type is not None:
            check_type(resource_type)
        grant = self.grant(resource_type, "r")
        if id is not None:
            cur = self.store.read(resource_type or "", id)
            if cur is None:
                raise NotFound(f"{resource_type}/{id} is not known")
            self._require_visible(cur, grant)
        elif grant.restricted:
            raise Forbidden(
                "history across records is not available to this principal; read the history "
                "of each of your resources, or search with _lastUpdated"
            )
        since = None
        count = self.settings.page_size
        before = None
        for key, value in items:
            if key == "_since":
                since = require_range(value, "_since")[0]
            elif key == "_count":
                count = max(1, min(_digits(value, "_count"), self.settings.max_page_size))
            elif key == "_cursor":
                before = _digits(value, "the paging cursor")
            elif key not in ("_format", "_pretty"):
                raise InvalidRequest(f"parameter {key!r} is not supported on _history")
        versions, more = self.store.history(
            resource_type, id, since=since, count=count, before_seq=before
        )
        note_access(
            "history",
            action="R",
            entities=[f"{v.resource_type}/{v.id}" for v in versions],
            patients=[v.id for v in versions if v.resource_type == "Patient"],
        )
        path = "/".join(p for p in (resource_type, id) if p)
        path = f"/{path}/_history" if path else "/_history"
        entries = []
        for v in versions:
            url = f"{v.resource_type}/{v.id}"
            entry: Json = {"fullUrl": f"{base}/{url}"}
            if v.content is not None:
                entry["resource"] = orjson.Fragment(v.content)
            method = "DELETE" if v.deleted else ("POST" if v.version == 1 else "PUT")
            entry["request"] = {
                "method": method,
                "url": url if method != "POST" else v.resource_type,
            }
            entry["response"] = {
                "status": "204" if v.deleted else ("201" if v.version == 1 else "200"),
                "etag": f'W/"{v.version}"',
                "lastModified": format_instant(v.last_updated),
            }
            entries.append(entry)
        links = [{"relation": "self", "url": self._url(base, path, items)}]
        if more is not None:
            nxt = [*(i for i in items if i[0] != "_cursor"), ("_cursor", str(more))]
            links.append({"relation": "next", "url": self._url(base, path, nxt)})
        bundle = {
            "resourceType": "Bundle",
            "id": new_id(),
            "type": "history",
            "link": links,
            "entry": entries,
        }
        return orjson.dumps(bundle)

    # --- operations ------------------------------------------------------------------------

    def everything(self, id: str, items: list[tuple[str, str]], base: str) -> bytes:
        """``Patient/{id}/$everything``: the compartment plus what it references."""
        self.read("Patient", id)
        conds: list[Any] = [CompartmentCond("Patient", (id,), PATIENT_COMPARTMENT, expand=True)]
        conds.extend(self.grant(None, "s").conds)
        q = Query(None, conds, count=self.settings.page_size)
        for key, value in items:
            if key == "_since":
                conds.append(LastUpdatedCond("ge", *require_range(value, "_since")))
            elif key == "_type":
                conds.append(TypeCond(tuple(t for t in value.split(",") if t)))
            elif key == "_count":
                q.count = max(1, min(_digits(value, "_count"), self.settings.max_page_size))
            elif key == "_cursor":
                from hie.fhir.search import decode_cursor

                q.after = decode_cursor(value)
            elif key not in ("_format", "_pretty", "start", "end"):
                raise InvalidRequest(f"parameter {key!r} is not supported on $everything")
        page = self.store.search(q)
        self._note(page.items, "everything")
        note_access(patients=[id])
        entries = [self._entry(base, r, "match", None) for r in page.items]
        rids = [r.rid for r in page.items]
        seen = {(r.resource_type, r.id) for r in page.items}
        refs = [
            t
            for t in self.store.references_from(rids, None)
            if t[0] not in _COMPARTMENT_TYPES and t not in seen
        ]
        included = self.visible(self.store.read_many(refs))
        entries.extend(self._entry(base, r, "include", None) for r in included)
        path = f"/Patient/{id}/$everything"
        links = [{"relation": "self", "url": self._url(base, path, items)}]
        if page.next_after is not None:
            nxt = [*canonical_items(items), ("_cursor", encode_cursor(page.next_after))]
            links.append({"relation": "next", "url": self._url(base, path, nxt)})
        bundle = {
            "resourceType": "Bundle",
            "id": new_id(),
            "type": "searchset",
            "link": links,
            "entry": entries,
        }
        return orjson.dumps(bundle)

    def validate_only(self, res: Any, resource_type: str | None) -> Json:
        """``$validate``: an OperationOutcome describing the resource's validity."""
        if isinstance(res, dict) and res.get("resourceType") == "Parameters":
            for p in res.get("parameter", []) or []:
                if isinstance(p, dict) and p.get("name") == "resource":
                    res = p.get("resource")
        res = self._check_body(res, resource_type)
        model.validate(dict(res))
        return outcome("information", "informational", "the resource is valid")

    # --- transaction and batch ------------------------------------------------------------

    def transaction(self, bundle: Any, base: str, *, validated: bool = False) -> Json:
        """A transaction Bundle: all entries succeed together or none is stored
        (``validated``: built by the hub itself, see :func:`~hie.fhir.bundles.run_transaction`)."""
        from hie.fhir.bundles import run_transaction

        return run_transaction(self, bundle, base, validated=validated)

    def batch(self, bundle: Any, base: str) -> Json:
        """A batch Bundle: entries processed independently, each with its own status."""
        from hie.fhir.bundles import run_batch

        return run_batch(self, bundle, base)


_PATIENT_LINKS = tuple((t, p) for t, p in PATIENT_COMPARTMENT if t != "Patient")
_PATIENT_FIELDS = ("subject", "patient", "beneficiary", "for")


def _plain_token(value: str) -> tuple[str, str] | None:
    """``system|code`` with both parts and nothing to unescape, as (system, code); None
    for anything else (the search parser's business)."""
    if "\\" in value or "," in value or "$" in value:
        return None
    system, bar, code = value.partition("|")
    if not bar or not system or not code or "|" in code:
        return None
    return system, code


def lock_criteria(tx: WriteTx, resource_type: str, criteria: Sequence[tuple[str, str]]) -> None:
    """Serialise the writers whose conditional operation (or find-else-create) looks for the
    same ``criteria``: the second waits for the first to commit, then finds its record."""
    tx.lock(resource_type + "?" + "&".join(f"{k}={v}" for k, v in sorted(criteria)))


def _patients_in(res: Json | None, stored: StoredResource) -> list[str]:
    """The patients a written resource is about (for the audit record)."""
    if stored.resource_type == "Patient":
        return [stored.id]
    out = []
    for name in _PATIENT_FIELDS:
        ref = (res or {}).get(name)
        if isinstance(ref, dict) and str(ref.get("reference", "")).startswith("Patient/"):
            out.append(str(ref["reference"]).removeprefix("Patient/"))
    return out


def _refuse_golden(cur: StoredResource | None) -> None:
    if _stored_is_golden(cur):
        assert cur is not None
        raise Unprocessable(
            f"Patient/{cur.id} is a golden record kept by the master patient index; change "
            "the MO's source records, or use Patient/$merge and $unmerge (golden-record)"
        )


def outcome(severity: str, code: str, text: str, expression: list[str] | None = None) -> Json:
    """An OperationOutcome with one issue."""
    issue: Json = {"severity": severity, "code": code, "diagnostics": text}
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def error_outcome(err: HieError) -> Json:
    """The OperationOutcome for an error, carrying its stable code."""
    res = outcome("error", err.issue, err.message, err.expression)
    res["issue"][0]["details"] = {
        "coding": [{"system": "https://hie.spb.ru/fhir/CodeSystem/error", "code": err.code}],
        "text": err.message,
    }
    return res


def shape(res: Json, summary: str | None, elements: list[str] | None) -> Json:
    """Apply ``_summary`` (true/text/data) or ``_elements``, marking the result SUBSETTED."""
    rt = res.get("resourceType", "")
    keep: set[str] | None = None
    if summary == "true":
        keep = set(model.summary_elements(rt))
    elif summary == "text":
        keep = {"text", "id", "meta"} | set(model.required_elements(rt))
    elif summary == "data":
        res = {k: v for k, v in res.items() if k != "text"}
    if elements:
        keep = set(elements) | set(model.required_elements(rt)) | {"id", "meta"}
    if keep is not None:
        res = {k: v for k, v in res.items() if k == "resourceType" or _kept(k.lstrip("_"), keep)}
    meta = dict(res.get("meta") or {})
    meta["tag"] = [
        *(meta.get("tag") or []),
        {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
            "code": "SUBSETTED",
        },
    ]
    res["meta"] = meta
    return res


def _kept(key: str, keep: set[str]) -> bool:
    if key in keep:
        return True
    # a choice element asked for by its base name: value → valueQuantity
    return any(key.startswith(e) and key[len(e) : len(e) + 1].isupper() for e in keep)
