"""The master patient index over HTTP: ``Patient/$match``, ``Patient/$ihe-pix`` (IHE PIXm
ITI-83), ``Patient/$merge``, ``Patient/$unmerge`` and ``Patient/{id}/$mpi-explain``.

The logic lives in :mod:`hie.registries.patient_index`; this router maps HTTP and
``Parameters`` to it. Include it before the generic FHIR router (whose ``/fhir/{rtype}/{id}``
would take ``/fhir/Patient/$match`` for a read).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from hie.fhir.api import fhir_response, query_items, read_json_body
from hie.fhir.service import Json, content_json, new_id, outcome
from hie.hub.errors import InvalidRequest, NotFound, PreconditionFailed
from hie.hub.settings import Settings
from hie.registries.patient_index import MasterPatientIndex, MergeOutcome

MATCH_GRADE_URL = "http://hl7.org/fhir/StructureDefinition/match-grade"


def _params(body: Any) -> list[Json]:
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise InvalidRequest("the body must be a Parameters resource")
    params = body.get("parameter") or []
    if not isinstance(params, list) or not all(isinstance(p, dict) for p in params):
        raise InvalidRequest("Parameters.parameter must be a list of objects")
    return params


def _param(params: list[Json], name: str) -> Json | None:
    return next((p for p in params if p.get("name") == name), None)


def _bool(p: Json | None, name: str) -> bool:
    if p is None:
        return False
    value = p.get("valueBoolean")
    if not isinstance(value, bool):
        raise InvalidRequest(f"parameter {name} must be a valueBoolean")
    return value


def mpi_router(mpi: MasterPatientIndex, settings: Settings) -> APIRouter:
    """The router for the master patient index operations (prefix ``/fhir``)."""
    router = APIRouter(prefix="/fhir", tags=["master patient index"])
    limit = settings.max_body_bytes

    def base(request: Request) -> str:
        if settings.base_url:
            return settings.base_url.rstrip("/") + "/fhir"
        return str(request.base_url).rstrip("/") + "/fhir"

    @router.post("/Patient/$match", summary="Patient $match (golden records)")
    async def match(request: Request) -> Response:
        mpi.svc.operation("patient-match")
        body = await read_json_body(request, limit, what="a Parameters resource")
        if isinstance(body, dict) and body.get("resourceType") == "Patient":
            params: list[Json] = [{"name": "resource", "resource": body}]
        else:
            params = _params(body)
        resource = (_param(params, "resource") or {}).get("resource")
        only = _bool(_param(params, "onlyCertainMatches"), "onlyCertainMatches")
        count_p = _param(params, "count")
        count = 10
        if count_p is not None:
            count = count_p.get("valueInteger")  # type: ignore[assignment]
            if not isinstance(count, int) or count < 1:
                raise InvalidRequest("count must be a positive valueInteger")
        found = await run_in_threadpool(
            mpi.match, resource, count=min(count, 100), only_certain=only
        )
        b = base(request)
        bundle = {
            "resourceType": "Bundle",
            "id": new_id(),
            "type": "searchset",
            "total": len(found),
            "entry": [
                {
                    "fullUrl": f"{b}/Patient/{g.golden.id}",
                    "resource": content_json(g.golden),
                    "search": {
                        "mode": "match",
                        "score": g.probability,
                        "extension": [{"url": MATCH_GRADE_URL, "valueCode": g.grade}],
                    },
                }
                for g in found
            ],
        }
        return fhir_response(bundle)

    @router.get("/Patient/$ihe-pix", summary="IHE PIXm ITI-83 cross-reference query")
    @router.post("/Patient/$ihe-pix", include_in_schema=False)
    async def pix(request: Request) -> Response:
        mpi.svc.operation("patient-pix")
        items = query_items(request)
        if request.method == "POST":
            params = _params(await read_json_body(request, limit, what="a Parameters resource"))
            for p in params:
                v = p.get("valueString") or p.get("valueUri")
                ident = p.get("valueIdentifier")
                if isinstance(ident, dict):
                    v = f"{ident.get('system', '')}|{ident.get('value', '')}"
                if isinstance(v, str):
                    items.append((str(p.get("name")), v))
        sources = [v for k, v in items if k == "sourceIdentifier"]
        if len(sources) != 1:
            raise InvalidRequest("exactly one sourceIdentifier (system|value) is required")
        targets = [t for k, v in items if k == "targetSystem" for t in v.split(",") if t]
        identifiers, refs = await run_in_threadpool(mpi.pix, sources[0], targets)
        result = {
            "resourceType": "Parameters",
            "parameter": [{"name": "targetIdentifier", "valueIdentifier": i} for i in identifiers]
            + [{"name": "targetId", "valueReference": {"reference": r}} for r in refs],
        }
        return fhir_response(result)

    def resolve(params: list[Json], role: str) -> str:
        ref = _param(params, f"{role}-patient")
        if ref is not None:
            value = (ref.get("valueReference") or {}).get("reference")
            if not isinstance(value, str) or not value:
                raise InvalidRequest(f"{role}-patient must be a valueReference")
            kind, _, pid = value.rpartition("/")
            if kind not in ("", "Patient") and not kind.endswith("/Patient"):
                raise InvalidRequest(f"{role}-patient must reference a Patient")
            return pid
        idents = [p for p in params if p.get("name") == f"{role}-patient-identifier"]
        if not idents:
            raise InvalidRequest(f"{role}-patient or {role}-patient-identifier is required")
        matches: set[str] = set()
        for p in idents:
            ident = p.get("valueIdentifier") or {}
            system, value = ident.get("system"), ident.get("value")
            if not isinstance(system, str) or not isinstance(value, str):
                raise InvalidRequest(f"{role}-patient-identifier needs a system and a value")
            matches.update(mpi.resolve_identifier(system, value))
        if not matches:
            raise NotFound(f"no Patient has the {role}-patient-identifier (unknown-patient)")
        if len(matches) > 1:
            raise PreconditionFailed(
                f"{role}-patient-identifier matches {len(matches)} records; name the record"
            )
        return matches.pop()

    def merge_response(request: Request, params: list[Json], out: MergeOutcome) -> Response:
        text = out.message or (
            f"Patient/{out.source} merged into Patient/{out.target} ({out.kind}; "
            f"{len(out.moved)} records moved)"
        )
        parts: list[Json] = [
            {"name": "input", "resource": {"resourceType": "Parameters", "parameter": params}},
            {"name": "outcome", "resource": outcome("information", "informational", text)},
        ]
        if out.result is not None and out.result.content is not None:
            parts.append({"name": "result", "resource": content_json(out.result)})
        del request
        return fhir_response({"resourceType": "Parameters", "parameter": parts})

    @router.post("/Patient/$merge", summary="Patient $merge (HL7 ADT A40 equivalent)")
    async def merge(request: Request) -> Response:
        mpi.svc.operation("patient-merge")
        params = _params(await read_json_body(request, limit, what="a Parameters resource"))
        preview = _bool(_param(params, "preview"), "preview")
        reason = (_param(params, "reason") or {}).get("valueString")
        source = await run_in_threadpool(resolve, params, "source")
        target = await run_in_threadpool(resolve, params, "target")
        out = await run_in_threadpool(
            mpi.merge, source, target, preview=preview, reason=reason, agent="FHIR $merge"
        )
        return merge_response(request, params, out)

    @router.post("/Patient/$unmerge", summary="Undo the latest merge of a patient")
    async def unmerge(request: Request) -> Response:
        mpi.svc.operation("patient-merge")
        params = _params(await read_json_body(request, limit, what="a Parameters resource"))
        reason = (_param(params, "reason") or {}).get("valueString")
        source = await run_in_threadpool(resolve, params, "source")
        out = await run_in_threadpool(mpi.unmerge, source, reason=reason, agent="FHIR $unmerge")
        out.message = f"Patient/{out.source} restored ({len(out.moved)} records moved back)"
        return merge_response(request, params, out)

    @router.get("/Patient/{id}/$mpi-explain", summary="Why the index linked this patient")
    async def explain(id: str) -> Response:
        mpi.svc.operation("mpi-explain")
        if await run_in_threadpool(mpi.svc.store.read, "Patient", id) is None:
            raise NotFound(f"Patient/{id} is not known")
        entries = await run_in_threadpool(mpi.explain, id)
        return fhir_response(
            {"resourceType": "Parameters", "parameter": [_entry(e) for e in entries]}
        )

    return router


def _entry(e: Json) -> Json:
    """One journal entry as a ``Parameters`` part (decision, rule, score, field details)."""
    parts: list[Json] = [
        {"name": "kind", "valueCode": str(e["kind"])},
        {"name": "at", "valueInstant": str(e["at"])},
        {"name": "patient", "valueReference": {"reference": str(e["patient"])}},
        {"name": "golden", "valueReference": {"reference": str(e["golden"])}},
    ]
    for key in ("decision", "rule", "event", "reason"):
        if isinstance(e.get(key), str):
            parts.append({"name": key, "valueString": e[key]})
    if isinstance(e.get("score"), int | float):
        parts.append({"name": "score", "valueDecimal": round(float(e["score"]), 2)})
    if isinstance(e.get("candidate"), str):
        parts.append(
            {"name": "candidate", "valueReference": {"reference": f"Patient/{e['candidate']}"}}
        )
    if isinstance(e.get("task"), str):
        parts.append({"name": "task", "valueReference": {"reference": f"Task/{e['task']}"}})
    for name, bits in (e.get("details") or {}).items():
        parts.append(
            {
                "name": "detail",
                "part": [
                    {"name": "field", "valueString": str(name)},
                    {"name": "bits", "valueDecimal": round(float(bits), 2)},
                ],
            }
        )
    for moved in e.get("moved") or []:
        parts.append({"name": "moved", "valueReference": {"reference": f"Patient/{moved}"}})
    return {"name": "entry", "part": parts}
