"""The CapabilityStatement: generated from what the code supports, so it cannot drift."""

from __future__ import annotations

from typing import Any

from hie import __version__
from hie.fhir.model import FHIR_VERSION
from hie.fhir.search import describe
from hie.fhir.searchparams import params_for, supported_types
from hie.hub.settings import Settings
from hie.registries.terminology import terminology_operations

_INTERACTIONS = [
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
]


def _resource(rtype: str) -> dict[str, Any]:
    refs = [p for p in params_for(rtype).values() if p.kind == "reference"]
    out: dict[str, Any] = {
        "type": rtype,
        "interaction": [{"code": c} for c in _INTERACTIONS],
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalRead": "full-support",
        "conditionalUpdate": True,
        "conditionalDelete": "single",
        "referencePolicy": ["literal", "logical"],
        "searchInclude": [f"{rtype}:{p.name}" for p in refs] + ([f"{rtype}:*"] if refs else []),
        "searchRevInclude": [],
        "searchParam": describe(rtype),
    }
    if ops := terminology_operations().get(rtype):
        out["operation"] = [*out.get("operation", []), *ops]
    if rtype == "Patient":
        out["operation"] = [
            {
                "name": "everything",
                "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
            },
            {
                "name": "match",
                "definition": "http://hl7.org/fhir/OperationDefinition/Patient-match",
            },
            {
                "name": "merge",
                "definition": "http://hl7.org/fhir/OperationDefinition/Patient-merge",
            },
            {
                "name": "ihe-pix",
                "definition": "https://profiles.ihe.net/ITI/PIXm/OperationDefinition/IHE.PIXm.pix",
            },
            {
                "name": "unmerge",
                "definition": "https://hie.spb.ru/fhir/OperationDefinition/Patient-unmerge",
            },
            {
                "name": "mpi-explain",
                "definition": "https://hie.spb.ru/fhir/OperationDefinition/Patient-mpi-explain",
            },
            {
                "name": "document-timeline",
                "definition": f"{_OPS}/Patient-document-timeline",
            },
        ]
    if rtype == "DocumentReference":
        out["operation"] = [
            {"name": "search-text", "definition": f"{_OPS}/DocumentReference-search-text"}
        ]
    if rtype == "AuditEvent":
        out["operation"] = [{"name": "stats", "definition": f"{_OPS}/AuditEvent-stats"}]
    return out


def _security(settings: Settings) -> dict[str, Any]:
    if not settings.auth_enabled:
        return {
            "cors": False,
            "description": "Authentication is off (HIE_AUTH_ENABLED=false): development only.",
        }
    return {
        "cors": False,
        "service": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                    }
                ]
            }
        ],
        "description": "OAuth2 bearer tokens with SMART on FHIR v2 scopes; see "
        "/fhir/.well-known/smart-configuration.",
    }


_OPS = "https://hie.spb.ru/fhir/OperationDefinition"
# IHE MHD actors the hub plays (ITI-65 recipient; ITI-66/67/68 responder)
_MHD = "https://profiles.ihe.net/ITI/MHD/CapabilityStatement"


def capability_statement(base: str, settings: Settings) -> dict[str, Any]:
    """The server's CapabilityStatement (FHIR R4 §3.1.0.15)."""
    types = supported_types()
    resources = [_resource(t) for t in types]
    for res in resources:
        res["searchRevInclude"] = [
            f"{src}:{p.name}"
            for src in types
            for p in params_for(src).values()
            if p.kind == "reference" and (not p.targets or res["type"] in p.targets)
        ]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-23",
        "publisher": "hie",
        "kind": "instance",
        "software": {
            "name": "hie — regional health information exchange hub",
            "version": __version__,
        },
        "implementation": {"description": "Regional HIE hub FHIR API", "url": base},
        "instantiates": [f"{_MHD}/IHE.MHD.DocumentRecipient", f"{_MHD}/IHE.MHD.DocumentResponder"],
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [
            {
                "mode": "server",
                "security": _security(settings),
                "resource": resources,
                "interaction": [
                    {"code": "transaction"},
                    {"code": "batch"},
                    {"code": "search-system"},
                    {"code": "history-system"},
                ],
                "searchParam": [
                    {"name": "_id", "type": "token"},
                    {"name": "_lastUpdated", "type": "date"},
                    {"name": "_type", "type": "token"},
                ],
                "operation": [
                    {
                        "name": "validate",
                        "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
                    }
                ],
            }
        ],
    }
