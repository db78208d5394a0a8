"""Search parameters the hub supports, per resource type (FHIR R4 definitions, §search).

Each line reads ``name type path[,path…] [>Target,Target]``: paths are dotted element paths
from the resource root; a segment ending in ``[x]`` is a choice element (``effective[x]``
matches ``effectiveDateTime`` and ``effectivePeriod``); ``telecom(system=phone)`` keeps only
the items whose ``system`` is ``phone`` (FHIRPath ``where``); ``>Patient`` limits a reference
parameter to targets of those types (FHIRPath ``where(resolve() is Patient)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from hie.hub.store.port import param_id

Kind = str  # token | string | date | reference | quantity | number | uri


@dataclass(frozen=True)
class SearchParam:
    """One search parameter of one resource type."""

    resource_type: str
    name: str
    kind: Kind
    paths: tuple[tuple[str, ...], ...]
    targets: tuple[str, ...] = ()

    @property
    def pid(self) -> int:
        return param_id(self.resource_type, self.name)

    @property
    def table(self) -> str:
        return "quantity" if self.kind == "number" else self.kind


COMMON = """
_tag token meta.tag
_profile uri meta.profile
_security token meta.security
_source uri meta.source
"""

_CLINICAL = """
identifier token identifier
patient reference subject >Patient
subject reference subject
encounter reference encounter >Encounter
"""

# Canonical (conformance) resources: the parameters FHIR R4 defines on each of them.
_CANONICAL = """
url uri url
version token version
name string name
title string title
status token status
date date date
publisher string publisher
description string description
identifier token identifier
jurisdiction token jurisdiction
"""

DEFINITIONS: dict[str, str] = {
    "Patient": """
identifier token identifier
name string name
family string name.family
given string name.given
birthdate date birthDate
gender token gender
active token active
address string address
address-city string address.city
address-postalcode string address.postalCode
address-district string address.district
phone token telecom(system=phone).value
email token telecom(system=email).value
telecom token telecom.value
deceased token deceased[x]
death-date date deceasedDateTime
general-practitioner reference generalPractitioner
organization reference managingOrganization >Organization
link reference link.other
""",
    "Observation": _CLINICAL
    + """
code token code
category token category
status token status
date date effective[x]
issued date issued
performer reference performer
based-on reference basedOn
specimen reference specimen >Specimen
value-quantity quantity valueQuantity
value-concept token valueCodeableConcept
value-string string valueString
value-date date valueDateTime,valuePeriod
component-code token component.code
combo-code token code,component.code
has-member reference hasMember
derived-from reference derivedFrom
part-of reference partOf
interpretation token interpretation
""",
    "DiagnosticReport": _CLINICAL
    + """
code token code
category token category
status token status
date date effective[x]
issued date issued
performer reference performer
results-interpreter reference resultsInterpreter
result reference result >Observation
based-on reference basedOn
specimen reference specimen >Specimen
conclusion token conclusionCode
media reference media.link
""",
    "DocumentReference": """
identifier token masterIdentifier,identifier
patient reference subject >Patient
subject reference subject
type token type
category token category
status token status
date date date
period date context.period
author reference author
authenticator reference authenticator
custodian reference custodian
encounter reference context.encounter
related reference context.related
relatesto reference relatesTo.target >DocumentReference
relation token relatesTo.code
contenttype token content.attachment.contentType
format token content.format
language token content.attachment.language
location uri content.attachment.url
facility token context.facilityType
setting token context.practiceSetting
event token context.event
security-label token securityLabel
description string description
""",
    "List": """
identifier token identifier
patient reference subject >Patient
subject reference subject
encounter reference encounter >Encounter
code token code
status token status
date date date
source reference source
item reference entry.item
title string title
""",
    "ImagingStudy": """
identifier token identifier
patient reference subject >Patient
subject reference subject
encounter reference encounter >Encounter
started date started
status token status
modality token series.modality
bodysite token series.bodySite
endpoint reference endpoint,series.endpoint >Endpoint
basedon reference basedOn
instance token series.instance.uid
series token series.uid
referrer reference referrer
interpreter reference interpreter
""",
    "Immunization": """
identifier token identifier
patient reference patient >Patient
date date occurrence[x]
status token status
vaccine-code token vaccineCode
performer reference performer.actor
location reference location >Location
lot-number string lotNumber
reason-code token reasonCode
target-disease token protocolApplied.targetDisease
""",
    "MedicationRequest": _CLINICAL
    + """
status token status
intent token intent
category token category
code token medicationCodeableConcept
medication reference medicationReference
authoredon date authoredOn
requester reference requester
priority token priority
intended-performer reference performer
""",
    "Condition": """
identifier token identifier
patient reference subject >Patient
subject reference subject
encounter reference encounter >Encounter
code token code
category token category
clinical-status token clinicalStatus
verification-status token verificationStatus
severity token severity
body-site token bodySite
onset-date date onset[x]
abatement-date date abatement[x]
recorded-date date recordedDate
asserter reference asserter
""",
    "AllergyIntolerance": """
identifier token identifier
patient reference patient >Patient
code token code,reaction.substance
clinical-status token clinicalStatus
verification-status token verificationStatus
type token type
category token category
criticality token criticality
date date recordedDate
onset date reaction.onset
recorder reference recorder
asserter reference asserter
manifestation token reaction.manifestation
""",
    "Encounter": """
identifier token identifier
patient reference subject >Patient
subject reference subject
status token status
class token class
type token type
date date period
participant reference participant.individual
practitioner reference participant.individual >Practitioner
service-provider reference serviceProvider >Organization
location reference location.location >Location
reason-code token reasonCode
episode-of-care reference episodeOfCare
part-of reference partOf >Encounter
based-on reference basedOn
""",
    "ServiceRequest": _CLINICAL
    + """
status token status
intent token intent
category token category
code token code
authored date authoredOn
occurrence date occurrence[x]
requester reference requester
performer reference performer
based-on reference basedOn
requisition token requisition
specimen reference specimen >Specimen
priority token priority
""",
    "Consent": """
identifier token identifier
patient reference patient >Patient
status token status
scope token scope
category token category
date date dateTime
period date provision.period
actor reference provision.actor.reference
provision-type token provision.type
consentor reference performer
organization reference organization >Organization
purpose token provision.purpose
action token provision.action
source-reference reference source[x]
""",
    "AuditEvent": """
date date recorded
type token type
subtype token subtype
action token action
outcome token outcome
agent reference agent.who
altid token agent.altId
address string agent.network.address
patient reference entity.what >Patient
entity reference entity.what
entity-type token entity.type
source reference source.observer
site token source.site
policy uri agent.policy
purpose token purposeOfEvent
""",
    "Organization": """
identifier token identifier
name string name,alias
type token type
active token active
address string address
address-city string address.city
partof reference partOf >Organization
endpoint reference endpoint >Endpoint
""",
    "Endpoint": """
identifier token identifier
name string name
organization reference managingOrganization >Organization
connection-type token connectionType
status token status
payload-type token payloadType
""",
    "Practitioner": """
identifier token identifier
name string name
family string name.family
given string name.given
active token active
gender token gender
telecom token telecom.value
address string address
""",
    "PractitionerRole": """
identifier token identifier
practitioner reference practitioner >Practitioner
organization reference organization >Organization
role token code
specialty token specialty
active token active
location reference location >Location
endpoint reference endpoint >Endpoint
date date period
service reference healthcareService >HealthcareService
""",
    "HealthcareService": """
identifier token identifier
name string name
active token active
organization reference providedBy >Organization
location reference location >Location
service-type token type
service-category token category
specialty token specialty
coverage-area reference coverageArea >Location
endpoint reference endpoint >Endpoint
characteristic token characteristic
program token program
""",
    "OrganizationAffiliation": """
identifier token identifier
active token active
date date period
primary-organization reference organization >Organization
participating-organization reference participatingOrganization >Organization
role token code
specialty token specialty
location reference location >Location
service reference healthcareService >HealthcareService
network reference network >Organization
endpoint reference endpoint >Endpoint
telecom token telecom.value
""",
    "Location": """
identifier token identifier
name string name,alias
address string address
address-city string address.city
type token type
status token status
operational-status token operationalStatus
organization reference managingOrganization >Organization
partof reference partOf >Location
endpoint reference endpoint >Endpoint
""",
    "Specimen": """
identifier token identifier
patient reference subject >Patient
subject reference subject
type token type
status token status
collected date collection.collected[x]
collector reference collection.collector
accession token accessionIdentifier
bodysite token collection.bodySite
parent reference parent >Specimen
""",
    "Provenance": """
target reference target
patient reference target >Patient
agent reference agent.who
recorded date recorded
entity reference entity.what
location reference location >Location
when date occurred[x]
signature-type token signature.type
""",
    "Task": """
identifier token identifier
status token status
intent token intent
code token code
business-status token businessStatus
focus reference focus
patient reference for >Patient
subject reference for
owner reference owner
requester reference requester
authored-on date authoredOn
modified date lastModified
priority token priority
group-identifier token groupIdentifier
based-on reference basedOn
part-of reference partOf >Task
encounter reference encounter >Encounter
performer token performerType
period date executionPeriod
""",
    "Communication": """
identifier token identifier
status token status
category token category
patient reference subject >Patient
subject reference subject
recipient reference recipient
sender reference sender
sent date sent
received date received
encounter reference encounter >Encounter
based-on reference basedOn
part-of reference partOf
medium token medium
priority token priority
about reference about
""",
    # Reference data: what a test is and its critical limits (qualifiedInterval category
    # critical), read by the critical-result alerts
    "ObservationDefinition": """
identifier token identifier
code token code
category token category
""",
    # A message the hub received over HL7 v2 (the record of what arrived, and its digest)
    "MessageHeader": """
event token event[x]
focus reference focus
sender reference sender
source-uri uri source.endpoint
""",
    "RelatedPerson": """
identifier token identifier
patient reference patient >Patient
name string name
relationship token relationship
active token active
gender token gender
birthdate date birthDate
telecom token telecom.value
address string address
""",
    # Terminology (reference data, НСИ). R4 types ConceptMap's source/target as references to
    # canonicals; the hub indexes every canonical as a uri so that it matches the URL exactly.
    "CodeSystem": _CANONICAL
    + """
system uri url
code token concept.code
content-mode token content
language token concept.designation.language
""",
    "ValueSet": _CANONICAL
    + """
code token expansion.contains.code,compose.include.concept.code
reference uri compose.include.system
expansion uri expansion.identifier
""",
    "ConceptMap": _CANONICAL
    + """
source uri source[x]
target uri target[x]
source-uri uri sourceUri
target-uri uri targetUri
source-system uri group.source
target-system uri group.target
source-code token group.element.code
target-code token group.element.target.code
dependson uri group.element.target.dependsOn.property
product uri group.element.target.product.property
""",
    "Binary": "",
}

# Patient compartment (FHIR R4 CompartmentDefinition "patient"), by (type, reference param).
PATIENT_COMPARTMENT: tuple[tuple[str, str], ...] = (
    ("Observation", "subject"),
    ("Observation", "performer"),
    ("DiagnosticReport", "subject"),
    ("DocumentReference", "subject"),
    ("DocumentReference", "author"),
    ("List", "subject"),
    ("List", "source"),
    ("ImagingStudy", "subject"),
    ("Immunization", "patient"),
    ("MedicationRequest", "subject"),
    ("Condition", "subject"),
    ("Condition", "asserter"),
    ("AllergyIntolerance", "patient"),
    ("AllergyIntolerance", "recorder"),
    ("AllergyIntolerance", "asserter"),
    ("Encounter", "subject"),
    ("ServiceRequest", "subject"),
    ("ServiceRequest", "performer"),
    ("Consent", "patient"),
    ("AuditEvent", "patient"),
    ("Specimen", "subject"),
    ("Provenance", "patient"),
    ("Task", "subject"),
    ("Communication", "subject"),
    ("Communication", "sender"),
    ("Communication", "recipient"),
    ("RelatedPerson", "patient"),
    ("Patient", "link"),
)


def _parse(resource_type: str, text: str) -> dict[str, SearchParam]:
    out: dict[str, SearchParam] = {}
    for line in text.strip().splitlines():
        parts = line.split()
        if not parts:
            continue
        name, kind, paths = parts[0], parts[1], parts[2]
        targets = tuple(parts[3][1:].split(",")) if len(parts) > 3 else ()
        out[name] = SearchParam(
            resource_type,
            name,
            kind,
            tuple(tuple(p.split(".")) for p in paths.split(",")),
            targets,
        )
    return out


@cache
def params_for(resource_type: str) -> dict[str, SearchParam]:
    """Search parameters of ``resource_type`` (common ones included); empty if unsupported."""
    if resource_type not in DEFINITIONS:
        return {}
    out = _parse(resource_type, COMMON)
    out.update(_parse(resource_type, DEFINITIONS[resource_type]))
    return out


def supported_types() -> list[str]:
    """Resource types with search support, sorted."""
    return sorted(DEFINITIONS)
