"""A patient's documents on one timeline, grouped: ``Patient/{id}/$document-timeline``.

The patient portal and the clinician view show a person's current documents from every MO,
newest first, grouped by care episode (``encounter``, the default), by the organisation that
wrote them (``organization``) or by document type (``type``). The answer is plain JSON
(``application/json``), not a FHIR resource: it is a view for people, with Russian labels and
dates shown in Europe/Moscow.

Access is the same as a search: the patient must be readable, and the documents are the ones
the caller's grant allows, selected in the store query. Encounters and organisations named by
the documents are shown only as far as the caller may read them (otherwise just referenced).
Whether a document's text is searchable (``indexable``) is asked of the full-text index and is
``null`` when it has not been indexed yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

import orjson

from hie.fhir.document_content import parse_media_type
from hie.fhir.indexing import IndexStatus, index_status
from hie.fhir.service import FhirService
from hie.hub.audit import note_access
from hie.hub.errors import InvalidRequest
from hie.hub.store.port import Query, ReferenceCond, SortKey, StoredResource, TokenCond

Json = dict[str, Any]
GROUPINGS: Final = ("encounter", "organization", "type")
#: At most this many documents are shown (newest first); ``truncated`` says when there are more.
MAX_DOCUMENTS: Final = 2000
_PAGE: Final = 500
_MOSCOW: Final = ZoneInfo("Europe/Moscow")
_PARAMS: Final = frozenset({"group", "_format", "_pretty"})

# Encounter.class (v3 ActCode) as a patient reads it.
ENCOUNTER_CLASS_RU: Final = {
    "AMB": "Амбулаторный приём",
    "IMP": "Госпитализация",
    "ACUTE": "Госпитализация",
    "NONAC": "Госпитализация",
    "EMER": "Неотложная помощь",
    "SS": "Дневной стационар",
    "HH": "Помощь на дому",
    "VR": "Телемедицинская консультация",
    "FLD": "Выездная помощь",
    "OBSENC": "Наблюдение",
    "PRENC": "Предварительный приём",
}
NO_ENCOUNTER: Final = "Без случая обращения"
NO_ORGANIZATION: Final = "Организация не указана"
NO_TYPE: Final = "Тип документа не указан"


def _obj(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    """``value`` if it is a JSON array, else an empty one."""
    return value if isinstance(value, list) else []


def moscow(value: str | None, *, with_time: bool = True) -> str | None:
    """A FHIR date/dateTime/instant as shown to people: ``дд.мм.гггг[ чч:мм]``, Moscow time."""
    if not value:
        return None
    if len(value) <= 10:  # a date (or year-month): shown as written
        parts = value.split("-")
        return ".".join(reversed(parts))
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return value
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    local = when.astimezone(_MOSCOW)
    return local.strftime("%d.%m.%Y %H:%M" if with_time else "%d.%m.%Y")


def _json(r: StoredResource) -> Json:
    return orjson.loads(r.content or b"{}")  # type: ignore[no-any-return]


def _ref(value: Any) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        return str(value["reference"])
    return None


def _concept_display(cc: Any) -> str | None:
    """What a CodeableConcept says in words: its text, a coding's display, else a code."""
    if not isinstance(cc, dict):
        return None
    if isinstance(cc.get("text"), str) and cc["text"].strip():
        return str(cc["text"])
    codings = [c for c in cc.get("coding") or () if isinstance(c, dict)]
    for c in codings:
        if isinstance(c.get("display"), str) and c["display"].strip():
            return str(c["display"])
    for c in codings:
        if isinstance(c.get("code"), str):
            return str(c["code"])
    return None


def _concept_key(cc: Any) -> str | None:
    """A stable key for a CodeableConcept: its first ``system|code``, else its text."""
    if not isinstance(cc, dict):
        return None
    for c in cc.get("coding") or ():
        if isinstance(c, dict) and isinstance(c.get("code"), str):
            return f"{c.get('system') or ''}|{c['code']}"
    text = cc.get("text")
    return f"text:{text.strip().lower()}" if isinstance(text, str) and text.strip() else None


@dataclass(frozen=True, slots=True)
class _Context:
    """What the documents name, as far as the caller may read it."""

    encounters: dict[str, Json]  # "Encounter/x" → resource
    organizations: dict[str, Json]  # "Organization/x" → resource
    status: IndexStatus | None

    def org_display(self, ref: str | None) -> Json | None:
        if ref is None:
            return None
        org = self.organizations.get(ref)
        name = org.get("name") if org else None
        return {"reference": ref, "display": name if isinstance(name, str) else None}

    def encounter_label(self, ref: str) -> str:
        enc = self.encounters.get(ref)
        if enc is None:
            return f"Случай обращения {ref.removeprefix('Encounter/')}"
        klass = _obj(enc.get("class"))
        kind = ENCOUNTER_CLASS_RU.get(str(klass.get("code") or ""))
        if kind is None:
            types = _list(enc.get("type"))
            kind = next((d for d in map(_concept_display, types) if d), None) or "Случай обращения"
        period = _obj(enc.get("period"))
        start = moscow(period.get("start"), with_time=False)
        end = moscow(period.get("end"), with_time=False)
        label = kind
        if start:
            label += f" {start}" + (f" — {end}" if end and end != start else "")
        org = self.org_display(_ref(enc.get("serviceProvider")))
        if org and org["display"]:
            label += f", {org['display']}"
        return label


def _author_org(doc: Json) -> str | None:
    """The organisation that wrote a document: an Organization author, else the custodian."""
    for a in doc.get("author") or ():
        ref = _ref(a)
        if ref and ref.startswith("Organization/"):
            return ref
    ref = _ref(doc.get("custodian"))
    return ref if ref and ref.startswith("Organization/") else None


def _encounter_of(doc: Json) -> str | None:
    context = _obj(doc.get("context"))
    for e in context.get("encounter") or ():
        ref = _ref(e)
        if ref and ref.startswith("Encounter/"):
            return ref
    return None


def _item(doc: Json, ctx: _Context) -> Json:
    """One document as the timeline shows it."""
    contents = []
    for c in doc.get("content") or ():
        att = (c or {}).get("attachment") if isinstance(c, dict) else None
        if not isinstance(att, dict):
            continue
        ctype = att.get("contentType")
        contents.append(
            {
                "content_type": parse_media_type(ctype)[0] or ctype
                if isinstance(ctype, str)
                else None,
                "size": att.get("size") if isinstance(att.get("size"), int) else None,
                "title": att.get("title") if isinstance(att.get("title"), str) else None,
                "url": att.get("url") if isinstance(att.get("url"), str) else None,
            }
        )
    title = doc.get("description")
    if not isinstance(title, str) or not title.strip():
        title = next((c["title"] for c in contents if c["title"]), None)
    date = doc.get("date") if isinstance(doc.get("date"), str) else None
    context = _obj(doc.get("context"))
    period = _obj(context.get("period"))
    date = date or (period.get("start") if isinstance(period.get("start"), str) else None)
    sizes = [c["size"] for c in contents if c["size"] is not None]
    return {
        "id": doc.get("id"),
        "reference": f"DocumentReference/{doc.get('id')}",
        "date": date,
        "date_display": moscow(date),
        "type": _concept_display(doc.get("type")),
        "category": [d for d in map(_concept_display, doc.get("category") or ()) if d],
        "title": title,
        "status": doc.get("status"),
        "docStatus": doc.get("docStatus"),
        "author_org": ctx.org_display(_author_org(doc)),
        "custodian": ctx.org_display(_ref(doc.get("custodian"))),
        "encounter": _encounter_of(doc),
        "content_type": contents[0]["content_type"] if contents else None,
        "size": sum(sizes) if sizes else None,
        "content": contents,
        "indexable": ctx.status.indexable(str(doc.get("id"))) if ctx.status else None,
    }


def _group_key(doc: Json, by: str, ctx: _Context) -> tuple[str, str]:
    """(key, label) of the group a document belongs to."""
    if by == "encounter":
        enc = _encounter_of(doc)
        return (enc, ctx.encounter_label(enc)) if enc else ("none", NO_ENCOUNTER)
    if by == "organization":
        org = _author_org(doc)
        if org is None:
            return "none", NO_ORGANIZATION
        shown = ctx.org_display(org)
        name = shown["display"] if shown else None
        return org, name or f"Организация {org.removeprefix('Organization/')}"
    key = _concept_key(doc.get("type"))
    return (key, _concept_display(doc.get("type")) or key) if key else ("none", NO_TYPE)


def _documents(svc: FhirService, patient_id: str) -> tuple[list[StoredResource], bool]:
    """The patient's current documents the caller may see, newest first (at most
    :data:`MAX_DOCUMENTS`), and whether there were more."""
    grant = svc.grant("DocumentReference", "s")
    q = Query(
        "DocumentReference",
        [
            ReferenceCond("patient", "Patient", patient_id, expand=True),
            TokenCond("status", None, "current"),
            *grant.conds,
        ],
        sort=[SortKey("date", "date", descending=True)],
        count=_PAGE,
    )
    out: list[StoredResource] = []
    while True:
        page = svc.store.search(q)
        out.extend(page.items)
        if page.next_after is None:
            return out, False
        if len(out) >= MAX_DOCUMENTS:
            return out[:MAX_DOCUMENTS], True
        q.after = page.next_after


def _context(svc: FhirService, docs: Sequence[Json]) -> _Context:
    """The encounters and organisations the documents name (those the caller may read), and
    what the full-text index knows of the documents."""
    encounters = list(dict.fromkeys(e for d in docs if (e := _encounter_of(d))))
    enc_found = svc.visible(
        svc.store.read_many([("Encounter", e.removeprefix("Encounter/")) for e in encounters])
    )
    enc_json = {f"Encounter/{r.id}": _json(r) for r in enc_found if r.content}
    orgs: dict[str, None] = {}
    for d in docs:
        for ref in [*(_ref(a) for a in d.get("author") or ()), _ref(d.get("custodian"))]:
            if ref and ref.startswith("Organization/"):
                orgs[ref] = None
    for enc in enc_json.values():
        ref = _ref(enc.get("serviceProvider"))
        if ref and ref.startswith("Organization/"):
            orgs[ref] = None
    org_found = svc.visible(
        svc.store.read_many([("Organization", o.removeprefix("Organization/")) for o in orgs])
    )
    status = None
    if svc.search_index is not None and docs:
        subjects = list(dict.fromkeys(s for d in docs if (s := _ref(d.get("subject")))))
        status = index_status(svc.search_index(), [str(d.get("id")) for d in docs], subjects)
    return _Context(
        encounters=enc_json,
        organizations={f"Organization/{r.id}": _json(r) for r in org_found if r.content},
        status=status,
    )


def document_timeline(svc: FhirService, patient_id: str, items: Sequence[tuple[str, str]]) -> Json:
    """``Patient/{id}/$document-timeline``: the patient's current documents, grouped."""
    by = "encounter"
    for key, value in items:
        if key not in _PARAMS:
            raise InvalidRequest(f"parameter {key!r} is not supported on $document-timeline")
        if key == "group":
            if value not in GROUPINGS:
                raise InvalidRequest(f"group must be one of {', '.join(GROUPINGS)}")
            by = value
    note_access("search", action="R", patients=[patient_id])
    svc.read("Patient", patient_id)  # unknown 404, deleted 410, not the caller's to see 403
    stored, truncated = _documents(svc, patient_id)
    docs = [_json(r) for r in stored]
    ctx = _context(svc, docs)
    groups: dict[str, Json] = {}
    for doc in docs:
        key, label = _group_key(doc, by, ctx)
        group = groups.setdefault(key, {"key": key, "label": label, "count": 0, "documents": []})
        group["documents"].append(_item(doc, ctx))
        group["count"] += 1
    subjects = [s.removeprefix("Patient/") for d in docs if (s := _ref(d.get("subject")))]
    note_access(
        entities=[f"DocumentReference/{r.id}" for r in stored],
        patients=list(dict.fromkeys(s for s in subjects if s)),
    )
    return {
        "patient": f"Patient/{patient_id}",
        "group": by,
        "total": len(docs),
        "truncated": truncated,
        "groups": list(groups.values()),
    }
