"""Who may do what with which records: the hub's access policy, in one table.

A request is allowed when **both** the caller's role (:data:`RULES`) and its token's SMART
scopes grant the permission — ``c``\\ reate, ``r``\\ ead, ``u``\\ pdate, ``d``\\ elete,
``s``\\ earch — on the resource type. Whose rows it may touch is then a set of conditions
added to the query itself (:class:`Grant`), never a filter applied after paging, so
``_count``, ``_total`` and next links stay right when rows are hidden.

Rows, per role (see :meth:`AccessPolicy.grant`):

- ``patient``: their own compartment (the Patient compartment of their record and of every
  record the master patient index links to it); directory and terminology as anyone.
- a token whose only grant is a ``patient/`` scope: the same, for its ``patient`` claim.
- ``official``: no rows at all; aggregate endpoints only.
- ``admin``: directory, terminology and the audit trail; no clinical rows.
- ``service``: the hub's own trusted integration (every row; audited).
- ``mis``, ``clinician``, ``radiologist``: every row of the types their role allows, except
  the records of patients whose active Consent closes them to the caller's MO (a ``deny``
  naming it or naming no one, or a ``permit`` that names only other MOs). A clinician or
  radiologist may break the glass (purpose of use ``ETREAT`` with a declared reason): the
  denial is lifted for that request, which is audited with the reason, and the patient is
  notified. Care relationships come next (issue #5).

Nothing may change or delete an AuditEvent: the trail is append-only for everyone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hie.hub.auth import Forbidden, Principal
from hie.hub.store.port import CompartmentCond, Condition

# --- the table ---------------------------------------------------------------------------------

CLINICAL = frozenset(
    {
        "Patient",
        "Observation",
        "DiagnosticReport",
        "DocumentReference",
        "Binary",
        "List",
        "ImagingStudy",
        "Immunization",
        "MedicationRequest",
        "Condition",
        "AllergyIntolerance",
        "Encounter",
        "ServiceRequest",
        "Specimen",
        "Provenance",
        "Task",
        "Communication",
        "RelatedPerson",
    }
)
CONSENT = frozenset({"Consent"})
DIRECTORY = frozenset(
    {
        "Organization",
        "Location",
        "Practitioner",
        "PractitionerRole",
        "Endpoint",
        "HealthcareService",
    }
)
TERMINOLOGY = frozenset({"CodeSystem", "ValueSet", "ConceptMap", "NamingSystem"})
AUDIT = frozenset({"AuditEvent"})

# role → category (or a resource type, which wins over its category) → permissions
RULES: dict[str, dict[str, str]] = {
    "service": {
        "clinical": "cruds",
        "consent": "cruds",
        "directory": "cruds",
        "terminology": "cruds",
        "audit": "rs",
        "other": "cruds",
    },
    "mis": {"clinical": "cruds", "consent": "rs", "directory": "rs", "terminology": "rs"},
    "clinician": {"clinical": "rs", "consent": "rs", "directory": "rs", "terminology": "rs"},
    "radiologist": {"clinical": "rs", "consent": "rs", "directory": "rs", "terminology": "rs"},
    "patient": {
        "clinical": "rs",
        "consent": "cruds",
        "directory": "rs",
        "terminology": "rs",
        "audit": "rs",
        "DocumentReference": "crus",  # their own uploads
        "Binary": "crs",
    },
    "official": {"directory": "rs", "terminology": "rs"},
    "admin": {"directory": "cruds", "terminology": "cruds", "audit": "rs"},
}
# Roles that see only their own compartment in these categories.
OWN_COMPARTMENT = {"patient": frozenset({"clinical", "consent", "audit"})}
# Operations beyond CRUD+search, and who may run them.
OPERATIONS: dict[str, frozenset[str]] = {
    "patient-match": frozenset({"service", "mis", "clinician", "radiologist"}),  # $match, PDQm
    "patient-pix": frozenset({"service", "mis", "clinician", "radiologist"}),  # PIXm
    "patient-merge": frozenset({"service", "mis", "admin"}),  # $merge, $unmerge, ADT A40
    "mpi-explain": frozenset({"service", "admin"}),
    "audit-stats": frozenset({"service", "admin", "official"}),  # counts, no one named
    "validate": frozenset(RULES),
}
APPEND_ONLY = AUDIT  # no update or delete, for anyone
# Whose reads a patient's Consent can close (their MO is the one named or not allowed).
CONSENT_BINDS = frozenset({"mis", "clinician", "radiologist"})
# Who may override a denial for an emergency, declaring the reason (purpose of use ETREAT).
BREAK_THE_GLASS = frozenset({"clinician", "radiologist"})
EMERGENCY_PURPOSE = "ETREAT"


def category(resource_type: str) -> str:
    """The policy category of a resource type."""
    for name, types in (
        ("clinical", CLINICAL),
        ("consent", CONSENT),
        ("directory", DIRECTORY),
        ("terminology", TERMINOLOGY),
        ("audit", AUDIT),
    ):
        if resource_type in types:
            return name
    return "other"


def role_permits(role: str, resource_type: str, permission: str) -> bool:
    """Whether :data:`RULES` give ``role`` the ``permission`` on ``resource_type``."""
    if resource_type in APPEND_ONLY and permission in "ud":
        return False
    rules = RULES.get(role, {})
    allowed = rules.get(resource_type, rules.get(category(resource_type), ""))
    return permission in allowed


# --- decisions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    """What a request may touch: every row (no conditions) or the rows the conditions match."""

    conds: tuple[Condition, ...] = ()

    @property
    def restricted(self) -> bool:
        """Whether some rows are hidden from the caller."""
        return bool(self.conds)


EVERYTHING = Grant()
_VERB = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


class AccessPolicy:
    """Decisions of the table above for a principal (the mechanism is in the callers: the
    FHIR service adds :attr:`Grant.conds` to its queries)."""

    def __init__(self, compartment_links: Iterable[tuple[str, str]]) -> None:
        self.links = tuple(compartment_links)

    def grant(self, p: Principal, resource_type: str | None, permission: str) -> Grant:
        """The rows ``p`` may ``permission`` (``c r u d s``) of ``resource_type`` (None: a
        search or history across types), or :class:`Forbidden`."""
        rtype = resource_type or "Patient"  # across types: judged as the clinical record
        verb = _VERB[permission]
        what = resource_type or "records of every type"
        roles = [r for r in p.roles if role_permits(r, rtype, permission)]
        if not roles:
            raise Forbidden(f"role {'/'.join(sorted(p.roles)) or '(none)'} may not {verb} {what}")
        if not p.scope_allows(rtype, permission):
            raise Forbidden(f"the token's scopes do not allow to {verb} {what}")
        cat = category(rtype)
        unrestricted = any(cat not in OWN_COMPARTMENT.get(r, frozenset()) for r in roles)
        only_patient_scopes = all(
            s.context == "patient" for s in p.scopes if s.grants(rtype, permission)
        )
        if unrestricted and not only_patient_scopes:
            return EVERYTHING
        if cat not in ("clinical", "consent", "audit") and unrestricted:
            return EVERYTHING  # a patient/ scope on directory or terminology data
        if not p.patient:
            raise Forbidden("this token has no patient in context (SMART 'patient' claim)")
        owners = (p.patient,)
        return Grant((CompartmentCond("Patient", owners, self.links, expand=True),))

    def operation(self, p: Principal, name: str) -> None:
        """Refuse ``p`` an operation :data:`OPERATIONS` does not give its roles."""
        if not any(r in OPERATIONS.get(name, frozenset()) for r in p.roles):
            raise Forbidden(f"role {'/'.join(sorted(p.roles)) or '(none)'} may not run {name}")
