"""The access policy on the image archive: which studies a caller may find and retrieve, and
the audit record of every DICOM query and retrieve.

A study is visible exactly when its FHIR ImagingStudy is (:mod:`hie.hub.policy`, one policy
for every interface): the caller's grant on ``ImagingStudy`` becomes a subquery on the
resource store that the DICOM index's own queries filter on, so C-FIND, C-MOVE, C-GET,
QIDO-RS and WADO-RS hide rows **in the query** (limits, offsets and sub-operation counts stay
right) and a patient's consent or a missing care relationship applies at once.

A DICOM peer (a clinic's PACS or workstation, registered by AE title and address) acts as
its MO's system (role ``mis``, :func:`hie.lab_exchange.service.mo_principal`). HTTP callers
(DICOMweb) act as their token says and are audited by the HTTP layer
(:func:`hie.hub.audit.note_access`); DIMSE operations have no HTTP request, so
:func:`audit_dimse` appends their record (IHE BALP: who, which patients, which studies,
outcome, source address) to the same hash-chained trail.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import ColumnElement, exists

from hie.fhir.service import FhirService
from hie.hub.audit import collecting_access, note_access, record_of
from hie.hub.auth import Principal, current_principal
from hie.hub.errors import NotSupported
from hie.hub.store.sql import SqlResourceStore
from hie.pacs import schema as s

STUDY_RESOURCE = "ImagingStudy"


def visible_studies(svc: FhirService) -> ColumnElement[bool] | None:
    """The condition on ``dicom_studies`` rows the current principal may see, or None when
    it may see every study. Raises :class:`~hie.hub.auth.Forbidden` when it may see none
    (its role or scopes give no search on ImagingStudy)."""
    grant = svc.grant(STUDY_RESOURCE, "s")
    if not grant.restricted:
        return None
    store = svc.store
    if not isinstance(store, SqlResourceStore):
        raise NotSupported("the DICOM index needs the SQL resource store")
    # a correlated EXISTS: each candidate study probes the store's (type, id) index, so a
    # query costs what it matches, not the size of everything the caller may see (an IN list
    # is built whole first: ~30 ms at 100,000 studies on SQLite)
    ids = store.ids_select(STUDY_RESOURCE, grant.conds)
    return exists(ids.where(ids.selected_columns[0] == s.dicom_studies.c.imaging_study_id))


def audit_dimse(
    svc: FhirService,
    *,
    subtype: str,
    outcome: int,
    status: int,
    source: str,
    patients: Sequence[str] = (),
    studies: Sequence[str] = (),
    reason: str | None = None,
    detail: str = "",
    principal: Principal | None = None,
) -> None:
    """Append the audit record of one DIMSE operation (``subtype``: ``query`` for C-FIND,
    ``retrieve`` for C-MOVE / C-GET, ``store``), as the current principal, about
    ``patients`` (source Patient ids) and ``studies`` (ImagingStudy ids). ``status`` is the
    DIMSE status answered; ``outcome`` the AuditEvent outcome (0, 4, 8, 12). Raises
    :class:`~hie.hub.errors.StorageError` if the trail cannot take it (the caller answers
    with a failure status rather than serve unaudited)."""
    if svc.trail is None:
        return
    action = "E" if subtype in ("query", "retrieve") else "C"
    with collecting_access() as note:
        note_access(
            subtype,
            action=action,
            entities=[f"{STUDY_RESOURCE}/{i}" for i in dict.fromkeys(studies)],
            patients=patients,
        )
    svc.trail.append_ahead(
        record_of(
            note,
            principal or current_principal.get(),
            action=action,
            subtype=subtype,
            outcome=outcome,
            status=status,
            method="DIMSE",
            path=f"dicom:{subtype}{' ' + detail if detail else ''}",
            source=source,
            reason=reason,
        )
    )
