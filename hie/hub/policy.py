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
- a patient acting for someone else (``patient`` context ≠ their own ``fhirUser``): only when
  they are that person's authorised proxy (:data:`PARENT_RELATIONSHIPS` for a child under
  :data:`PARENTAL_AGE`, or a RelatedPerson the person's active Consent permits), judged by the
  service and passed in as ``proxy_for``.
- ``mis``, ``clinician``, ``radiologist``, on clinical and consent records: what their MO wrote
  (:class:`~hie.hub.store.port.OwnerCond`), and the records of the patients their MO is treating
  (:func:`care_relationships`: an open Encounter at it, or an active referral to it), except
  what those patients' Consents close to the MO (a ``deny`` naming it or naming no one, a
  ``permit`` naming only other MOs; whole records or only records labelled with a sensitive
  category, :data:`SENSITIVE_CATEGORIES`). ``mis`` writes, updates and deletes only its own
  MO's records. A clinician or radiologist may break the glass (purpose of use ``ETREAT`` with
  a declared reason): every record is open for that request, which is audited with the reason,
  and the patients whose records it opened beyond the usual grant are notified.

Nothing may change or delete an AuditEvent: the trail is append-only for everyone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hie.hub.auth import Forbidden, Principal
from hie.hub.store.port import (
    AllOf,
    AnyOf,
    CompartmentCond,
    Condition,
    Not,
    OwnerCond,
    ReferenceCond,
    RelatedCond,
    TokenCond,
    Via,
)

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
        # the record of a message an MO sent (HL7 v2): the MO's own, like its results
        "MessageHeader",
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
TERMINOLOGY = frozenset(
    {"CodeSystem", "ValueSet", "ConceptMap", "NamingSystem", "ObservationDefinition"}
)
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
    # clinicians update Tasks (acknowledging a critical result addressed to their MO: its own
    # records only, like every MO write)
    "clinician": {
        "clinical": "rs",
        "Task": "rus",
        "consent": "rs",
        "directory": "rs",
        "terminology": "rs",
    },
    "radiologist": {
        "clinical": "rs",
        "Task": "rus",
        "consent": "rs",
        "directory": "rs",
        "terminology": "rs",
    },
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
    "rejected-messages": frozenset({"service", "admin"}),  # /admin/messages: may hold patient data
    "validate": frozenset(RULES),
}
APPEND_ONLY = AUDIT  # no update or delete, for anyone
# Whose reads a patient's Consent can close (their MO is the one named or not allowed).
CONSENT_BINDS = frozenset({"mis", "clinician", "radiologist"})
# Who may override a denial for an emergency, declaring the reason (purpose of use ETREAT).
BREAK_THE_GLASS = frozenset({"clinician", "radiologist"})
EMERGENCY_PURPOSE = "ETREAT"
# Roles whose reach into patient records follows their MO's care relationships.
CARE_ROLES = frozenset({"mis", "clinician", "radiologist"})
CARE_CATEGORIES = frozenset({"clinical", "consent"})
# A care relationship of an MO with a patient (FHIR R4 Encounter.status, ServiceRequest.status).
OPEN_ENCOUNTER = ("planned", "arrived", "triaged", "in-progress", "onleave")
ACTIVE_REFERRAL = ("active",)

# Sensitive categories a patient's Consent can close on their own (Consent.provision.
# securityLabel), and the codes that flag a record as one of them when its sender did not label
# it: ICD-10 chapters and blocks (Condition, Encounter reason, DiagnosticReport conclusion) and
# LOINC lab tests. Labels are HL7 v3 ActCode information-sensitivity codes.
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICD10_RU = "urn:oid:1.2.643.5.1.13.13.11.1005"  # МКБ-10 in the Russian НСИ
LOINC = "http://loinc.org"
SENSITIVE_CATEGORIES: dict[str, dict[str, tuple[str, ...]]] = {
    # mental and behavioural disorders (ICD-10 F00–F99)
    "PSY": {"icd10": ("F",)},
    # HIV disease and carrier status (B20–B24, Z21, R75) and HIV tests
    "HIV": {
        "icd10": ("B20", "B21", "B22", "B23", "B24", "Z21", "R75"),
        "loinc": ("7917-8", "5221-7", "56888-1", "75622-1", "68961-2", "25835-0", "20447-9"),
    },
    # reproductive health: pregnancy with abortive outcome, contraception, infertility,
    # procreative management (O00–O08, Z30–Z31, N97)
    "SEX": {
        "icd10": (
            "O00",
            "O01",
            "O02",
            "O03",
            "O04",
            "O05",
            "O06",
            "O07",
            "O08",
            "Z30",
            "Z31",
            "N97",
        )
    },
    # substance use (F10–F19 are also PSY; kept as its own label for consents that name it)
    "ETH": {"icd10": ("F10", "F11", "F12", "F13", "F14", "F15", "F16", "F18", "F19")},
}

# Proxies: a parent reads a child's record until the child is this old (Russian law: from 15 a
# patient decides about their own care, Federal Law 323-FZ art. 54); otherwise (a guardian, an
# older child's parent) the person's Consent must permit the RelatedPerson.
PARENTAL_AGE = 15
ROLE_CODE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
PARENT_RELATIONSHIPS = frozenset({"PRN", "MTH", "FTH", "NPRN", "ADOPTP", "STPPRN"})


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
    """What a request may touch: every row (no conditions) or the rows the conditions match.
    ``break_glass``: rows were opened by an emergency override (audit and notify)."""

    conds: tuple[Condition, ...] = ()
    break_glass: bool = False

    @property
    def restricted(self) -> bool:
        """Whether some rows are hidden from the caller."""
        return bool(self.conds)


EVERYTHING = Grant()
_VERB = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


@dataclass(frozen=True, slots=True)
class Denials:
    """What patients' Consents close to one MO: whole records, or records with a label."""

    patients: tuple[str, ...] = ()
    labelled: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (label, patients)

    def __bool__(self) -> bool:
        return bool(self.patients or self.labelled)

    def all_patients(self) -> tuple[str, ...]:
        """Every patient with some denial."""
        seen = dict.fromkeys(self.patients)
        for _, pats in self.labelled:
            seen.update(dict.fromkeys(pats))
        return tuple(seen)


NO_DENIALS = Denials()


def care_relationships(org: str) -> tuple[Via, ...]:
    """How MO ``org`` comes to treat a patient: an open Encounter at it, or an active
    referral (ServiceRequest) to it as performer."""
    return (
        Via(
            "Encounter",
            "subject",
            (
                ReferenceCond("service-provider", "Organization", org),
                AnyOf(tuple(TokenCond("status", "", st) for st in OPEN_ENCOUNTER)),
            ),
        ),
        Via(
            "ServiceRequest",
            "subject",
            (
                ReferenceCond("performer", "Organization", org),
                AnyOf(tuple(TokenCond("status", "", st) for st in ACTIVE_REFERRAL)),
            ),
        ),
    )


def sensitive_labels(codings: Iterable[tuple[str | None, str]]) -> list[str]:
    """The :data:`SENSITIVE_CATEGORIES` labels ``(system, code)`` pairs flag."""
    found: list[str] = []
    for label, rules in SENSITIVE_CATEGORIES.items():
        for system, code in codings:
            if system in (ICD10, ICD10_RU) and code.upper().startswith(rules.get("icd10", ("~",))):
                found.append(label)
                break
            if system == LOINC and code in rules.get("loinc", ()):
                found.append(label)
                break
    return found


class AccessPolicy:
    """Decisions of the table above for a principal (the mechanism is in the callers: the
    FHIR service adds :attr:`Grant.conds` to its queries)."""

    def __init__(self, compartment_links: Iterable[tuple[str, str]]) -> None:
        self.links = tuple(compartment_links)

    def compartment(self, patients: Iterable[str], *, negate: bool = False) -> CompartmentCond:
        """The records of these patients (their identity groups included)."""
        return CompartmentCond(
            "Patient", tuple(dict.fromkeys(patients)), self.links, expand=True, negate=negate
        )

    def grant(
        self,
        p: Principal,
        resource_type: str | None,
        permission: str,
        *,
        denied: Denials = NO_DENIALS,
        proxy_for: frozenset[str] = frozenset(),
    ) -> Grant:
        """The rows ``p`` may ``permission`` (``c r u d s``) of ``resource_type`` (None: a
        search or history across types), or :class:`Forbidden`. ``denied``: what Consents
        close to ``p``'s MO; ``proxy_for``: the patients ``p`` is an authorised proxy of."""
        rtype = resource_type or "Patient"  # across types: judged as the clinical record
        verb = _VERB[permission]
        what = resource_type or "records of every type"
        roles = [r for r in p.roles if role_permits(r, rtype, permission)]
        if not roles:
            raise Forbidden(f"role {'/'.join(sorted(p.roles)) or '(none)'} may not {verb} {what}")
        if not p.scope_allows(rtype, permission):
            raise Forbidden(f"the token's scopes do not allow to {verb} {what}")
        cat = category(rtype)
        if cat not in ("clinical", "consent", "audit"):
            return EVERYTHING  # directory, terminology: as the role and scopes say
        rows: list[Condition] = []
        break_glass = False
        for role in roles:
            if role == "patient" and cat in OWN_COMPARTMENT["patient"]:
                rows.append(self.compartment([self._patient_in_context(p, proxy_for)]))
            elif role in CARE_ROLES and cat in CARE_CATEGORIES:
                if self._breaks_glass(p, role, permission):
                    break_glass = True
                    break
                rows.append(self._care_rows(p, resource_type, permission, denied))
            else:
                break  # a role that reaches every row of this category (service, admin)
        else:
            conds: list[Condition] = [rows[0] if len(rows) == 1 else AnyOf(tuple(rows))]
            if self._only_patient_scopes(p, rtype, permission):
                patient_rows = self.compartment([self._patient_in_context(p, proxy_for)])
                if patient_rows not in conds:
                    conds.append(patient_rows)
            return Grant(tuple(conds))
        if self._only_patient_scopes(p, rtype, permission):
            patient_rows = self.compartment([self._patient_in_context(p, proxy_for)])
            return Grant((patient_rows,), break_glass)
        return Grant((), break_glass)

    @staticmethod
    def _only_patient_scopes(p: Principal, rtype: str, permission: str) -> bool:
        return all(s.context == "patient" for s in p.scopes if s.grants(rtype, permission))

    @staticmethod
    def _patient_in_context(p: Principal, proxy_for: frozenset[str]) -> str:
        if not p.patient:
            raise Forbidden("this token has no patient in context (SMART 'patient' claim)")
        if p.person and p.person != p.patient and p.patient not in proxy_for:
            raise Forbidden(
                "the caller is not an authorised proxy of the patient in context (a parent of "
                "a child under 15, or a RelatedPerson the patient's Consent permits)"
            )
        return p.patient

    @staticmethod
    def _breaks_glass(p: Principal, role: str, permission: str) -> bool:
        if role not in BREAK_THE_GLASS or permission not in "rs":
            return False
        if p.purpose != EMERGENCY_PURPOSE:
            return False
        if not p.purpose_reason:
            raise Forbidden("breaking the glass needs a declared reason (X-Break-Glass-Reason)")
        return True

    def _care_rows(
        self, p: Principal, resource_type: str | None, permission: str, denied: Denials
    ) -> Condition:
        if not p.org:
            raise Forbidden("this token names no MO (claim hie_org): no care relationships")
        own = OwnerCond(p.org)
        if permission not in "rs":
            return own  # an MO changes only its own records
        treated: list[Condition] = [RelatedCond("Patient", self.links, care_relationships(p.org))]
        if denied.patients:
            treated.append(self.compartment(denied.patients, negate=True))
        for label, patients in denied.labelled:
            if resource_type is None:  # labels are per type: across types, close them all
                treated.append(self.compartment(patients, negate=True))
                continue
            closed = AllOf((self.compartment(patients), TokenCond("_security", ACT_CODE, label)))
            treated.append(Not(closed))
        return AnyOf((own, AllOf(tuple(treated))))

    def operation(self, p: Principal, name: str) -> None:
        """Refuse ``p`` an operation :data:`OPERATIONS` does not give its roles."""
        if not any(r in OPERATIONS.get(name, frozenset()) for r in p.roles):
            raise Forbidden(f"role {'/'.join(sorted(p.roles)) or '(none)'} may not run {name}")
