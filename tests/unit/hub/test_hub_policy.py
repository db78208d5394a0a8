"""The access policy table (hie.hub.policy), rule by rule, and the grants it gives."""

from __future__ import annotations

import pytest

from hie.hub.auth import Forbidden, Principal, parse_scopes
from hie.hub.policy import AccessPolicy, category, role_permits
from hie.hub.store.port import CompartmentCond

LINKS = (("Observation", "subject"), ("Consent", "patient"), ("AuditEvent", "patient"))
POLICY = AccessPolicy(LINKS)

# role, resource type → the permissions expected (written out here, not read from the table)
EXPECTED = {
    ("service", "Observation"): "cruds",
    ("service", "Organization"): "cruds",
    ("service", "AuditEvent"): "rs",
    ("service", "Parameters"): "cruds",
    ("mis", "Observation"): "cruds",
    ("mis", "Patient"): "cruds",
    ("mis", "Consent"): "rs",
    ("mis", "Organization"): "rs",
    ("mis", "CodeSystem"): "rs",
    ("mis", "AuditEvent"): "",
    ("clinician", "Observation"): "rs",
    ("clinician", "DocumentReference"): "rs",
    ("clinician", "Consent"): "rs",
    ("clinician", "AuditEvent"): "",
    ("radiologist", "ImagingStudy"): "rs",
    ("radiologist", "Organization"): "rs",
    ("patient", "Observation"): "rs",
    ("patient", "Consent"): "cruds",
    ("patient", "DocumentReference"): "crus",
    ("patient", "Binary"): "crs",
    ("patient", "AuditEvent"): "rs",
    ("patient", "Organization"): "rs",
    ("patient", "Task"): "rs",
    ("patient", "Parameters"): "",
    ("official", "Observation"): "",
    ("official", "Patient"): "",
    ("official", "AuditEvent"): "",
    ("official", "Organization"): "rs",
    ("official", "ValueSet"): "rs",
    ("admin", "Observation"): "",
    ("admin", "Patient"): "",
    ("admin", "Organization"): "cruds",
    ("admin", "Endpoint"): "cruds",
    ("admin", "CodeSystem"): "cruds",
    ("admin", "AuditEvent"): "rs",
}


@pytest.mark.parametrize(("role", "rtype"), sorted(EXPECTED))
def test_each_rule(role: str, rtype: str) -> None:
    granted = "".join(p for p in "cruds" if role_permits(role, rtype, p))
    assert granted == EXPECTED[(role, rtype)]


def test_unknown_role_gets_nothing() -> None:
    assert not any(role_permits("root", "Observation", p) for p in "cruds")


def test_categories() -> None:
    assert category("Observation") == "clinical"
    assert category("Consent") == "consent"
    assert category("PractitionerRole") == "directory"
    assert category("ConceptMap") == "terminology"
    assert category("AuditEvent") == "audit"
    assert category("Bundle") == "other"


def who(roles: str, scope: str, **kw: str) -> Principal:
    return Principal("s", frozenset(roles.split()), scopes=parse_scopes(scope), **kw)  # type: ignore[arg-type]


def test_patient_gets_their_compartment() -> None:
    g = POLICY.grant(who("patient", "patient/*.rs", patient="p1"), "Observation", "s")
    assert g.restricted
    (cond,) = g.conds
    assert isinstance(cond, CompartmentCond)
    assert cond.owner_ids == ("p1",) and cond.expand and cond.links == LINKS


def test_patient_reads_the_directory_unrestricted() -> None:
    g = POLICY.grant(who("patient", "patient/*.rs", patient="p1"), "Organization", "r")
    assert not g.restricted


def test_patient_without_a_patient_claim_is_refused() -> None:
    with pytest.raises(Forbidden, match="no patient in context"):
        POLICY.grant(who("patient", "patient/*.rs"), "Observation", "r")


def test_the_role_and_the_scope_must_both_allow() -> None:
    with pytest.raises(Forbidden, match="role clinician may not create"):
        POLICY.grant(who("clinician", "user/*.cruds"), "Observation", "c")
    with pytest.raises(Forbidden, match="scopes do not allow"):
        POLICY.grant(who("mis", "system/Observation.rs"), "Observation", "c")
    assert not POLICY.grant(who("mis", "system/*.cruds"), "Observation", "c").restricted


def test_patient_scopes_restrict_any_role() -> None:
    g = POLICY.grant(who("clinician", "patient/*.rs", patient="p2"), "Observation", "r")
    assert g.restricted
    # a user/ scope as well lifts it
    g = POLICY.grant(who("clinician", "patient/*.rs user/*.rs", patient="p2"), "Observation", "r")
    assert not g.restricted


def test_a_second_role_does_not_widen_the_compartment_wrongly() -> None:
    # a clinician who is also a patient reads clinically (the clinician rule) …
    both = who("clinician patient", "user/*.rs patient/*.rs", patient="p1")
    assert not POLICY.grant(both, "Observation", "r").restricted
    # … but writes Consent only as the patient
    consent = who("clinician patient", "user/*.rs patient/Consent.cruds", patient="p1")
    assert POLICY.grant(consent, "Consent", "c").restricted


def test_across_types_is_judged_as_the_clinical_record() -> None:
    with pytest.raises(Forbidden):
        POLICY.grant(who("official", "user/*.s"), None, "s")
    assert POLICY.grant(who("patient", "patient/*.rs", patient="p1"), None, "s").restricted


@pytest.mark.parametrize(
    ("role", "op", "ok"),
    [
        ("clinician", "patient-match", True),
        ("patient", "patient-match", False),
        ("official", "patient-pix", False),
        ("admin", "patient-merge", True),
        ("mis", "patient-merge", True),
        ("clinician", "patient-merge", False),
        ("admin", "mpi-explain", True),
        ("mis", "mpi-explain", False),
        ("patient", "no-such-operation", False),
    ],
)
def test_operations(role: str, op: str, ok: bool) -> None:
    p = who(role, "system/*.cruds")
    if ok:
        POLICY.operation(p, op)
    else:
        with pytest.raises(Forbidden):
            POLICY.operation(p, op)
