"""The access policy table (hie.hub.policy), rule by rule, and the grants it gives."""

from __future__ import annotations

import pytest

from hie.hub.auth import Forbidden, Principal, parse_scopes
from hie.hub.policy import (
    ACT_CODE,
    ICD10,
    LOINC,
    AccessPolicy,
    Denials,
    care_relationships,
    category,
    role_permits,
    sensitive_labels,
)
from hie.hub.store.port import (
    AllOf,
    AnyOf,
    CompartmentCond,
    Not,
    OwnerCond,
    ReferenceCond,
    RelatedCond,
    TokenCond,
)

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
    ("clinician", "Task"): "rus",  # acknowledging an alert
    ("radiologist", "Task"): "rus",
    ("admin", "ObservationDefinition"): "cruds",  # critical limits are reference data
    ("clinician", "ObservationDefinition"): "rs",
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
        POLICY.grant(who("clinician", "user/*.cruds", org="mo1"), "Observation", "c")
    with pytest.raises(Forbidden, match="scopes do not allow"):
        POLICY.grant(who("mis", "system/Observation.rs", org="mo1"), "Observation", "c")
    assert POLICY.grant(who("mis", "system/*.cruds", org="mo1"), "Observation", "c").restricted
    assert not POLICY.grant(who("service", "system/*.cruds"), "Observation", "c").restricted


def test_an_mo_writes_only_its_own_records() -> None:
    for perm in "cud":
        g = POLICY.grant(who("mis", "system/*.cruds", org="mo1"), "Observation", perm)
        assert g.conds == (OwnerCond("mo1"),)
    with pytest.raises(Forbidden, match="names no MO"):
        POLICY.grant(who("mis", "system/*.cruds"), "Observation", "c")


def _care(org: str) -> RelatedCond:
    return RelatedCond("Patient", LINKS, care_relationships(org))


def test_care_roles_read_their_own_and_their_patients_records() -> None:
    for role in ("mis", "clinician", "radiologist"):
        g = POLICY.grant(who(role, "user/*.rs", org="mo1"), "Observation", "s")
        assert g.conds == (AnyOf((OwnerCond("mo1"), AllOf((_care("mo1"),)))),)
    # the relationships: an open Encounter at the MO, or an active referral to it
    enc, ref = care_relationships("mo1")
    assert (enc.resource_type, ref.resource_type) == ("Encounter", "ServiceRequest")
    assert ReferenceCond("service-provider", "Organization", "mo1") in enc.conds
    assert ReferenceCond("performer", "Organization", "mo1") in ref.conds
    # directory and terminology stay open
    assert not POLICY.grant(who("clinician", "user/*.rs", org="mo1"), "Practitioner", "r").conds


def test_consents_close_records_to_the_mo_but_not_its_own() -> None:
    denied = Denials(("p1",), (("PSY", ("p2",)),))
    g = POLICY.grant(who("clinician", "user/*.rs", org="mo1"), "Condition", "r", denied=denied)
    ((own, treated),) = (c.conds for c in g.conds if isinstance(c, AnyOf))
    assert own == OwnerCond("mo1")
    care, whole, labelled = treated.conds
    assert care == _care("mo1")
    assert whole == CompartmentCond("Patient", ("p1",), LINKS, expand=True, negate=True)
    closed = AllOf(
        (
            CompartmentCond("Patient", ("p2",), LINKS, expand=True),
            TokenCond("_security", ACT_CODE, "PSY"),
        )
    )
    assert labelled == Not(closed)
    # across types a label cannot be told per type: the labelled patient is closed entirely
    g = POLICY.grant(who("clinician", "user/*.rs", org="mo1"), None, "s", denied=denied)
    ((_, treated),) = (c.conds for c in g.conds if isinstance(c, AnyOf))
    assert treated.conds[2] == CompartmentCond("Patient", ("p2",), LINKS, expand=True, negate=True)


def test_break_the_glass_needs_a_reason_and_opens_everything() -> None:
    doc = who("clinician", "user/*.rs", org="mo1", purpose="ETREAT")
    with pytest.raises(Forbidden, match="reason"):
        POLICY.grant(doc, "Observation", "r")
    doc = who("clinician", "user/*.rs", org="mo1", purpose="ETREAT", purpose_reason="unconscious")
    g = POLICY.grant(doc, "Observation", "r", denied=Denials(("p1",)))
    assert g.break_glass and not g.restricted
    mis = who("mis", "system/*.cruds", org="mo1", purpose="ETREAT", purpose_reason="x")
    g = POLICY.grant(mis, "Observation", "r")
    assert not g.break_glass and g.restricted  # an MIS cannot break the glass


def test_patient_scopes_restrict_any_role() -> None:
    g = POLICY.grant(who("clinician", "patient/*.rs", org="mo1", patient="p2"), "Observation", "r")
    assert g.conds[-1] == CompartmentCond("Patient", ("p2",), LINKS, expand=True)
    # a user/ scope as well leaves the role's own rule
    both = who("clinician", "patient/*.rs user/*.rs", org="mo1", patient="p2")
    assert POLICY.grant(both, "Observation", "r").conds == (
        AnyOf((OwnerCond("mo1"), AllOf((_care("mo1"),)))),
    )


def test_a_second_role_adds_its_rows() -> None:
    # a clinician who is also a patient reads their MO's patients and their own record …
    both = who("clinician patient", "user/*.rs patient/*.rs", org="mo1", patient="p1")
    (either,) = POLICY.grant(both, "Observation", "r").conds
    assert isinstance(either, AnyOf)
    assert CompartmentCond("Patient", ("p1",), LINKS, expand=True) in either.conds
    # … but writes Consent only as the patient
    consent = who("clinician patient", "user/*.rs patient/Consent.cruds", patient="p1")
    assert POLICY.grant(consent, "Consent", "c").restricted


def test_a_proxy_acts_only_for_the_people_it_may() -> None:
    parent = who("patient", "patient/*.rs", patient="child", person="mum")
    with pytest.raises(Forbidden, match="proxy"):
        POLICY.grant(parent, "Observation", "r")
    g = POLICY.grant(parent, "Observation", "r", proxy_for=frozenset({"child"}))
    assert g.conds == (CompartmentCond("Patient", ("child",), LINKS, expand=True),)
    # their own record needs no proxy
    me = who("patient", "patient/*.rs", patient="mum", person="mum")
    assert POLICY.grant(me, "Observation", "r").restricted


def test_sensitive_codes_are_labelled() -> None:
    assert sensitive_labels([(ICD10, "F32.1")]) == ["PSY"]
    assert sensitive_labels([(ICD10, "B20")]) == ["HIV"]
    assert sensitive_labels([(LOINC, "7917-8")]) == ["HIV"]
    assert sensitive_labels([(ICD10, "O04.9")]) == ["SEX"]
    assert sensitive_labels([(ICD10, "F10.2")]) == ["PSY", "ETH"]
    assert sensitive_labels([(ICD10, "J18.9"), (LOINC, "718-7")]) == []


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
