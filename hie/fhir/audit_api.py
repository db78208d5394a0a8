"""``/fhir/AuditEvent``: the audit trail (:mod:`hie.hub.audit`) as FHIR AuditEvents.

Each record is shown following IHE Basic Audit Log Patterns (BALP): the REST interaction as
``subtype``, the requesting agent with its roles, MO and network address, the patients as
entities of role *patient* and the resources touched, the query of a search. A patient sees
the records about them (any MO's record of them: the master patient index's group); admins
and the hub's service role see all; no one else sees the trail (``hie/hub/policy.py``).

``AuditEvent/$stats`` (officials, admins) counts records by outcome and role since a date,
naming no one. Search parameters: ``patient``, ``entity``, ``subtype`` (comma-separated),
``date`` (``ge``, ``gt``, ``le``, ``lt``), ``_count``, and the ``_cursor`` of a next link. The
trail cannot be written through the API.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from hie.fhir.api import fhir_response, query_items
from hie.fhir.dates import format_instant, require_range
from hie.fhir.service import FhirService, new_id
from hie.hub.audit import PAGE_SUBTYPES, AuditRecord, SqlAuditLog, note_access
from hie.hub.auth import Forbidden, current_principal
from hie.hub.errors import InvalidRequest, NotFound
from hie.hub.settings import Settings

Json = dict[str, Any]
DCM = "http://dicom.nema.org/resources/ontology/DCM"
REST = "http://hl7.org/fhir/restful-interaction"
_PARAMS = {"patient", "entity", "subtype", "date", "_count", "_cursor", "_format", "_pretty"}


def audit_event(rec: AuditRecord, base: str) -> Json:
    """A trail record as a FHIR R4 AuditEvent (BALP shape)."""
    agent: Json = {
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                    "code": "humanuser"
                    if rec.practitioner or "patient" in rec.roles
                    else "dataprocessor",
                }
            ]
        },
        "who": {"identifier": {"value": rec.agent or "(unauthenticated)"}},
        "requestor": True,
    }
    if rec.roles:
        agent["role"] = [{"text": r} for r in rec.roles]
    if rec.practitioner:
        agent["who"]["reference"] = f"Practitioner/{rec.practitioner}"
    if rec.client_id:
        agent["altId"] = rec.client_id
    if rec.source:
        agent["network"] = {"address": rec.source, "type": "2"}
    if rec.purpose:
        agent["purposeOfUse"] = [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                        "code": rec.purpose,
                    }
                ]
            }
        ]
    agents = [agent]
    if rec.org:
        agents.append(
            {
                "type": {
                    "coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]
                },
                "who": {"reference": f"Organization/{rec.org}"},
                "requestor": False,
            }
        )
    entities: list[Json] = [
        {
            "what": {"reference": f"Patient/{p}"},
            "type": {
                "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                "code": "1",
            },
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"},
        }
        for p in rec.patients
    ]
    entities += [{"what": {"reference": e}} for e in rec.entities if not e.startswith("Patient/")]
    if rec.subtype in PAGE_SUBTYPES:
        entities.append(
            {
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "2",
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "24",
                },
                "query": base64.b64encode(rec.path.encode()).decode(),
            }
        )
    event: Json = {
        "resourceType": "AuditEvent",
        "id": str(rec.seq),
        "meta": {"lastUpdated": format_instant(rec.recorded)},
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [{"system": REST, "code": rec.subtype}],
        "action": rec.action,
        "recorded": format_instant(rec.recorded),
        "outcome": str(rec.outcome),
        "agent": agents,
        "source": {
            "site": base,
            "observer": {"display": "HIE hub"},
            "type": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "4",
                }
            ],
        },
    }
    if rec.reason:
        event["outcomeDesc"] = rec.reason
    if rec.purpose:
        event["purposeOfEvent"] = agent["purposeOfUse"]
    if entities:
        event["entity"] = entities
    return event


def audit_router(svc: FhirService, trail: SqlAuditLog, settings: Settings) -> APIRouter:
    """The AuditEvent read and search routes (before the generic FHIR routes)."""
    router = APIRouter(prefix="/fhir", tags=["audit"])

    def base(request: Request) -> str:
        return (settings.base_url.rstrip("/") or str(request.base_url).rstrip("/")) + "/fhir"

    def group(pid: str) -> list[str]:
        with svc.store.identity_reader() as idx:
            g = idx.group_of("Patient", pid)
            members = [m.id for m in idx.members("Patient", g)] if g else []
        return sorted({pid, *members})

    def own_patients() -> list[str] | None:
        """The patients a restricted caller may see the trail of; None for everyone."""
        grant = svc.grant("AuditEvent", "s")
        if not grant.restricted:
            return None
        p = current_principal.get()
        if p is None or not p.patient:
            raise Forbidden("this token has no patient in context")
        return group(p.patient)

    def search(items: list[tuple[str, str]], url_base: str) -> Json:
        mine = own_patients()
        refs: list[str] | None = None
        subtypes: list[str] | None = None
        since = until = before = None
        count = settings.page_size
        for key, value in items:
            if key not in _PARAMS:
                raise InvalidRequest(f"AuditEvent search does not support {key!r}")
            if key == "patient":
                pid = value.removeprefix("Patient/")
                refs = [*(refs or []), *(f"Patient/{m}" for m in group(pid))]
            elif key == "entity":
                if value.startswith("Patient/"):
                    refs = [*(refs or []), *(f"Patient/{m}" for m in group(value[8:]))]
                else:
                    refs = [*(refs or []), value]
            elif key == "subtype":
                subtypes = [v.rsplit("|", 1)[-1] for v in value.split(",") if v]
            elif key == "date":
                prefix = value[:2] if value[:2] in ("ge", "gt", "le", "lt") else "ge"
                lo, hi = require_range(value[2:] if value[:2] == prefix else value, "date")
                if prefix in ("ge", "gt"):
                    since = lo if prefix == "ge" else hi
                else:
                    until = hi if prefix == "le" else lo
            elif key == "_count":
                count = max(
                    1, min(int(value) if value.isdigit() else count, settings.max_page_size)
                )
            elif key == "_cursor":
                if not value.isdigit():
                    raise InvalidRequest("malformed paging cursor")
                before = int(value)
        if mine is not None:
            own = [f"Patient/{m}" for m in mine]
            refs = own if refs is None else [r for r in refs if r in own]
            if not refs:  # asked about someone else: nothing, and no hint they exist
                refs = ["Patient/-none-"]
        found, more = trail.records(
            refs=refs, subtypes=subtypes, since=since, until=until, count=count, before_seq=before
        )
        note_access("search", action="E", patients=mine or [])
        self_url = f"{url_base}/AuditEvent" + (f"?{urlencode(items)}" if items else "")
        links = [{"relation": "self", "url": self_url}]
        if more is not None:
            nxt = [(k, v) for k, v in items if k != "_cursor"] + [("_cursor", str(more))]
            links.append({"relation": "next", "url": f"{url_base}/AuditEvent?{urlencode(nxt)}"})
        return {
            "resourceType": "Bundle",
            "id": new_id(),
            "type": "searchset",
            "link": links,
            "entry": [
                {
                    "fullUrl": f"{url_base}/AuditEvent/{r.seq}",
                    "resource": audit_event(r, url_base),
                    "search": {"mode": "match"},
                }
                for r in found
            ],
        }

    def read(id: str, url_base: str) -> Json:
        mine = own_patients()
        rec = trail.read(int(id)) if id.isdigit() and len(id) < 19 else None
        if rec is None:
            raise NotFound(f"AuditEvent/{id} is not known")
        if mine is not None and not set(rec.patients) & set(mine):
            raise Forbidden(f"AuditEvent/{id} is not about this patient")
        return audit_event(rec, url_base)

    def stats(items: list[tuple[str, str]]) -> Json:
        svc.operation("audit-stats")
        since = None
        for key, value in items:
            if key == "since":
                since = require_range(value, "since")[0]
            elif key not in ("_format", "_pretty"):
                raise InvalidRequest(f"$stats does not support {key!r}")
        counts = trail.stats(since)
        note_access("audit-stats", action="E")
        params: list[Json] = []
        for group, by in (("outcome", counts["by_outcome"]), ("role", counts["by_role"])):
            for key, n in sorted(by.items()):
                params.append(
                    {
                        "name": group,
                        "part": [
                            {"name": "value", "valueString": key},
                            {"name": "count", "valueInteger": n},
                        ],
                    }
                )
        return {"resourceType": "Parameters", "parameter": params}

    @router.get("/AuditEvent/$stats", summary="Audit counts by outcome and role (no one named)")
    async def audit_stats(request: Request) -> Response:
        return fhir_response(await run_in_threadpool(stats, query_items(request)))

    @router.get("/AuditEvent", summary="The audit trail (IHE BALP AuditEvents)")
    async def audit_search(request: Request) -> Response:
        items = query_items(request)
        return fhir_response(await run_in_threadpool(search, items, base(request)))

    @router.get("/AuditEvent/{id}", summary="One audit record")
    async def audit_read(id: str, request: Request) -> Response:
        return fhir_response(await run_in_threadpool(read, id, base(request)))

    return router
