"""Transaction and batch Bundles (FHIR R4 §3.1.0.11 "transaction").

Transaction: entries are checked and validated before the database is touched; inside one
store transaction, conditional creates/updates are resolved, ``urn:uuid:`` and conditional
references are rewritten to the ids they resolve to, and everything is written together
(plain creates in one bulk write). Any failure rolls the whole bundle back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from hie.fhir import model
from hie.fhir.dates import format_instant
from hie.fhir.documents import DOCUMENT_TYPES
from hie.hub.errors import (
    HieError,
    InvalidRequest,
    InvalidResource,
    PreconditionFailed,
    Unprocessable,
)
from hie.hub.store.port import NewVersion, StoredResource
from hie.hub.store.sql import now_us

if TYPE_CHECKING:
    from hie.fhir.service import FhirService, Json

_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 3, "GET": 4, "HEAD": 4}


@dataclass
class _Op:
    index: int
    method: str
    url: str
    resource_type: str
    id: str | None
    criteria: list[tuple[str, str]] | None
    full_url: str | None
    resource: Any
    if_none_exist: str | None = None
    if_match: int | None = None
    result: dict[str, Any] = field(default_factory=dict)
    fresh: bool = False  # the id was made up here: no resource can have it yet


def _entries(bundle: Any, kind: str) -> list[Any]:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InvalidResource("POST to the base must be a Bundle", expression=["resourceType"])
    if bundle.get("type") != kind:
        raise InvalidResource(f"Bundle.type must be {kind!r}", expression=["Bundle.type"])
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise InvalidResource("Bundle.entry must be a list", expression=["Bundle.entry"])
    return entries


def _parse_op(i: int, entry: Any) -> _Op:
    where = f"Bundle.entry[{i}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
        raise InvalidResource(f"{where}.request is missing", expression=[f"{where}.request"])
    req = entry["request"]
    method = str(req.get("method", "")).upper()
    url = str(req.get("url", ""))
    if method not in _ORDER or not url:
        raise InvalidResource(
            f"{where}.request needs a method (GET/POST/PUT/PATCH/DELETE) and a url",
            expression=[f"{where}.request"],
        )
    for key, value in (("fullUrl", entry.get("fullUrl")), ("ifNoneExist", req.get("ifNoneExist"))):
        if value is not None and not isinstance(value, str):
            raise InvalidResource(f"{where} {key} must be a string", expression=[f"{where}"])
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. "http://[" (an unclosed IPv6 host)
        raise InvalidResource(
            f"{where}.request.url {url!r} is not a URL", expression=[f"{where}.request.url"]
        ) from None
    path = parts.path.strip("/")
    segs = path.split("/") if path else []
    criteria = parse_qsl(parts.query, keep_blank_values=True) if parts.query else None
    rtype = segs[0] if segs else ""
    rid = segs[1] if len(segs) > 1 else None
    if_match = None
    if req.get("ifMatch"):
        try:
            if_match = int(str(req["ifMatch"]).replace('W/"', "").strip('"'))
        except ValueError:
            raise InvalidRequest(f"{where}.request.ifMatch is not a version") from None
    return _Op(
        i,
        method,
        url,
        rtype,
        rid,
        criteria,
        entry.get("fullUrl"),
        entry.get("resource"),
        req.get("ifNoneExist"),
        if_match,
    )


def _check_put_id(op: _Op) -> None:
    if op.resource.get("id") not in (None, op.id):
        raise InvalidResource(
            f"entry {op.index}: resource id does not match the request url",
            expression=[f"Bundle.entry[{op.index}].resource.id"],
        )


def _response(status: str, stored: StoredResource | None) -> dict[str, Any]:
    out: dict[str, Any] = {"status": status}
    if stored is not None:
        out["location"] = f"{stored.resource_type}/{stored.id}/_history/{stored.version}"
        out["etag"] = f'W/"{stored.version}"'
        out["lastModified"] = format_instant(stored.last_updated)
    return out


def run_transaction(svc: FhirService, bundle: Any, base: str, *, validated: bool = False) -> Json:
    """Run a transaction Bundle atomically; return the transaction-response Bundle.
    ``validated``: the hub built the resources itself from checked parts (the HL7 v2 lab
    mapping), so the model validation meant for what clients send is skipped."""
    from hie.fhir.service import check_type, new_id

    ops = [_parse_op(i, e) for i, e in enumerate(_entries(bundle, "transaction"))]
    full_urls = [op.full_url for op in ops if op.full_url]
    if len(full_urls) != len(set(full_urls)):
        raise InvalidResource("two entries share a fullUrl", expression=["Bundle.entry.fullUrl"])
    for op in ops:
        check_type(op.resource_type)
        if op.method in ("POST", "PUT"):
            op.resource = svc._check_body(op.resource, op.resource_type)
            try:  # validated here, outside the write lock; only references change later
                if not validated:
                    model.validate(op.resource)
            except InvalidResource as err:
                where = f"Bundle.entry[{op.index}].resource"
                err.expression = [e.replace(op.resource_type, where, 1) for e in err.expression]
                err.message = f"entry {op.index}: {err.message}"
                raise
        if op.method == "POST" and op.id is not None:
            raise InvalidRequest(f"entry {op.index}: POST url must be the type, not {op.url!r}")
        if op.method == "PUT" and op.id is None and op.criteria is None:
            raise InvalidRequest(f"entry {op.index}: PUT needs Type/id or Type?criteria")
    # document bodies go to the blob store before the transaction (IHE MHD ITI-65)
    documents = [
        op
        for op in ops
        if op.method in ("POST", "PUT") and op.resource_type in DOCUMENT_TYPES and not validated
    ]
    batch = svc.documents.batch(svc) if documents and svc.documents is not None else None
    if batch is not None:
        for op in documents:
            try:
                batch.stage(op.resource)
            except HieError as err:
                err.message = f"entry {op.index}: {err.message}"
                raise
    # urn:uuid / fullUrl → Type/id for entries whose id is known before touching the database
    mapping: dict[str, str] = {}
    for op in ops:
        if op.method == "POST":
            op.id = new_id()
        if op.full_url and op.method in ("POST", "PUT") and op.id:
            mapping[op.full_url] = f"{op.resource_type}/{op.id}"
    when = now_us()
    with svc.store.transaction() as tx:
        # conditional creates and updates decide their target inside the transaction; those
        # by one identifier each (a lab message's patient, order, report and results) are
        # looked up together, per type and permission (an update's target among the records
        # the caller may change, a create's among those it may search)
        by_identifier: dict[int, list[tuple[str, str]]] = {}
        wanted: dict[tuple[str, str], list[tuple[_Op, list[tuple[str, str]]]]] = {}
        for op in ops:
            if op.method == "PUT" and op.id is None and op.criteria:
                wanted.setdefault((op.resource_type, "u"), []).append((op, op.criteria))
            elif op.method == "POST" and op.if_none_exist:
                items = parse_qsl(op.if_none_exist.split("?", 1)[-1], keep_blank_values=True)
                wanted.setdefault((op.resource_type, "s"), []).append((op, items))
        for (rtype, permission), group in wanted.items():
            matched = svc._match_identifiers(tx, rtype, [c for _, c in group], permission)
            for (o, _), hits in zip(group, matched, strict=True):
                if hits is not None:
                    by_identifier[o.index] = hits
        for op in sorted(ops, key=lambda o: _ORDER[o.method]):
            if op.method == "POST" and op.if_none_exist:
                known = by_identifier.get(op.index)
                found = (
                    known
                    if known is not None
                    else svc._match(tx, op.resource_type, op.if_none_exist)
                )
                if len(found) > 1:
                    raise PreconditionFailed(
                        f"entry {op.index}: ifNoneExist matched {len(found)} resources"
                    )
                if found:
                    op.id = found[0][1]
                    op.method = "NOOP"
                    if op.full_url:
                        mapping[op.full_url] = f"{op.resource_type}/{op.id}"
            elif op.method == "PUT" and op.id is None:
                known = by_identifier.get(op.index)
                found = (
                    known
                    if known is not None
                    else svc._match(tx, op.resource_type, op.criteria or [])
                )
                if len(found) > 1:
                    raise PreconditionFailed(
                        f"entry {op.index}: conditional update matched {len(found)} resources"
                    )
                if found:
                    op.id = found[0][1]
                else:
                    op.fresh = not op.resource.get("id")
                    op.id = op.resource.get("id") or new_id()
                if op.full_url:
                    mapping[op.full_url] = f"{op.resource_type}/{op.id}"

        cache: dict[str, str] = {}

        def resolve(ref: str) -> str:
            if ref in mapping:
                return mapping[ref]
            if ref.startswith(("urn:uuid:", "urn:oid:")):
                raise Unprocessable(f"reference {ref!r} does not resolve to an entry of the bundle")
            if "?" in ref and ref.split("?", 1)[0].isidentifier():
                if ref not in cache:
                    rtype, crit = ref.split("?", 1)
                    found = svc._match(tx, rtype, crit)
                    if rtype == "Patient" and len(found) > 1:
                        # several MOs' records of one person: the reference is to the person
                        groups = {tx.identity.group_of("Patient", f[1]) for f in found}
                        if len(groups) == 1 and None not in groups:
                            found = [("Patient", str(groups.pop()))]
                    if len(found) != 1:
                        raise PreconditionFailed(
                            f"conditional reference {ref!r} matched {len(found)} resources"
                        )
                    cache[ref] = f"{found[0][0]}/{found[0][1]}"
                return cache[ref]
            return ref

        from hie.fhir.service import _walk_refs

        for op in ops:
            if op.method in ("POST", "PUT") and isinstance(op.resource, dict):
                _walk_refs(op.resource, resolve)
        if batch is not None:
            kept = [op for op in documents if op.method in ("POST", "PUT") and op.id]
            batch.link(
                tx,
                when,
                [(op.resource, op.id or "") for op in kept if op.resource_type != "Binary"],
                {op.id or "": op.resource for op in kept if op.resource_type == "Binary"},
                resolve,
            )

        creates: list[tuple[NewVersion, int]] = []
        create_ops: list[_Op] = []
        for op in sorted(ops, key=lambda o: _ORDER.get(o.method, 5)):
            if op.method == "DELETE":
                if op.id is not None:
                    svc._delete_in(tx, op.resource_type, op.id, when)
                    op.result = _response("204 No Content", None)
                else:
                    found = svc._match(tx, op.resource_type, op.criteria or [])
                    if len(found) > 1:
                        raise PreconditionFailed(
                            f"entry {op.index}: conditional delete matched {len(found)} resources"
                        )
                    for rt, rid in found:
                        svc._delete_in(tx, rt, rid, when)
                    op.result = _response("204 No Content", None)
            elif op.method == "POST":
                assert op.id is not None
                creates.append(
                    (
                        svc.prepare(
                            op.resource, op.resource_type, op.id, 1, when, "POST", validated=True
                        ),
                        1,
                    )
                )
                create_ops.append(op)
            elif op.method == "NOOP":
                cur = tx.current(op.resource_type, op.id or "", for_update=False)
                op.result = _response("200 OK", cur)
            elif op.method == "PUT" and op.if_match is None:
                _check_put_id(op)
                if op.fresh or tx.current(op.resource_type, op.id or "", for_update=False) is None:
                    # update-as-create of a new id joins the bulk write (registry loads, demo)
                    new = svc.prepare(
                        op.resource, op.resource_type, op.id or "", 1, when, "PUT", validated=True
                    )
                    creates.append((new, 1))
                    create_ops.append(op)
                    op.method = "PUT-CREATE"
        if creates:
            for op, stored in zip(create_ops, tx.write_many(creates, when), strict=True):
                op.result = _response("201 Created", stored)
                svc.written(tx, op.resource, stored, when)
        for op in ops:
            if op.method == "PUT":
                assert op.id is not None
                _check_put_id(op)
                res = svc._update_in(
                    tx, op.resource, op.resource_type, op.id, op.if_match, when, validated=True
                )
                op.result = _response("201 Created" if res.created else "200 OK", res.stored)
            elif op.method == "PATCH":
                raise InvalidRequest(
                    f"entry {op.index}: PATCH inside a transaction is not supported"
                )
    out_entries: list[Json] = []
    for op in ops:
        if op.method in ("GET", "HEAD"):
            out_entries.append(_get_entry(svc, op, base))
            continue
        warnings = (
            svc.code_warnings(op.resource)
            if not validated
            and op.method in ("POST", "PUT", "PUT-CREATE")
            and isinstance(op.resource, dict)
            else []
        )
        if warnings:  # unknown codes: stored, and the sender is told per entry
            op.result = {
                **(op.result or {}),
                "outcome": {"resourceType": "OperationOutcome", "issue": warnings},
            }
        out_entries.append({"response": op.result})
    return {
        "resourceType": "Bundle",
        "id": new_id(),
        "type": "transaction-response",
        "entry": out_entries,
    }


def _get_entry(svc: FhirService, op: _Op, base: str) -> Json:
    if op.id is None:
        body = svc.search(op.resource_type, op.criteria or [], base)
        return {"resource": orjson.Fragment(body), "response": {"status": "200 OK"}}
    stored = svc.read(op.resource_type, op.id)
    return {
        "resource": orjson.Fragment(stored.content or b"{}"),
        "response": _response("200 OK", stored),
    }


def run_batch(svc: FhirService, bundle: Any, base: str) -> Json:
    """Run each entry of a batch on its own; failures become per-entry OperationOutcomes."""
    from hie.fhir.service import error_outcome, new_id

    entries = _entries(bundle, "batch")
    out: list[Json] = []
    for i, entry in enumerate(entries):
        try:
            op = _parse_op(i, entry)
            out.append(_batch_one(svc, op, base))
        except HieError as err:
            out.append(
                {
                    "response": {
                        "status": str(err.status),
                        "outcome": error_outcome(err),
                    }
                }
            )
    return {"resourceType": "Bundle", "id": new_id(), "type": "batch-response", "entry": out}


def _batch_one(svc: FhirService, op: _Op, base: str) -> Json:
    if op.method in ("GET", "HEAD"):
        return _get_entry(svc, op, base)
    if op.method == "POST":
        res = svc.create(op.resource, op.resource_type, op.if_none_exist)
        return {"response": _response("201 Created" if res.created else "200 OK", res.stored)}
    if op.method == "PUT":
        if op.id is None:
            res = svc.conditional_update(op.resource, op.resource_type, op.criteria or [])
        else:
            res = svc.update(op.resource, op.resource_type, op.id, op.if_match)
        return {"response": _response("201 Created" if res.created else "200 OK", res.stored)}
    if op.method == "DELETE":
        if op.id is None:
            svc.conditional_delete(op.resource_type, op.criteria or [])
        else:
            svc.delete(op.resource_type, op.id)
        return {"response": {"status": "204 No Content"}}
    if op.method == "PATCH":
        ops = op.resource
        if isinstance(ops, dict) and ops.get("resourceType") == "Binary":
            import base64

            try:
                ops = orjson.loads(base64.b64decode(str(ops.get("data", "")), validate=True))
            except ValueError:  # binascii.Error and orjson.JSONDecodeError are ValueErrors
                raise InvalidRequest(
                    f"entry {op.index}: the Binary is not a base64 JSON Patch"
                ) from None
        if op.id is None:
            raise InvalidRequest(f"entry {op.index}: PATCH url must be Type/id, not {op.url!r}")
        res = svc.patch(ops, op.resource_type, op.id, op.if_match)
        return {"response": _response("200 OK", res.stored)}
    raise InvalidRequest(f"entry {op.index}: unsupported method {op.method}")
