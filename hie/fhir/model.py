"""FHIR model validation (the only module that imports ``fhir.resources``).

Validation runs on write; reads serve the stored JSON as is (never re-serialised through the
model, which costs several times the validation).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError

from hie.hub.errors import InvalidResource

FHIR_VERSION = "4.0.1"


@cache
def _model(resource_type: str) -> Any:
    try:
        return get_fhir_model_class(resource_type)
    except (ValueError, KeyError, AttributeError):
        return None


def is_resource_type(name: str) -> bool:
    """True when ``name`` is a FHIR resource type (not a datatype)."""
    if not name or not name[0].isupper():
        return False
    m = _model(name)
    return isinstance(m, type) and issubclass(m, Resource)


def validate(res: dict[str, Any]) -> None:
    """Validate a resource dict; raise :class:`InvalidResource` naming the failing elements."""
    rtype = res.get("resourceType")
    if not isinstance(rtype, str) or not is_resource_type(rtype):
        raise InvalidResource(
            f"unknown or missing resourceType {rtype!r}", expression=["resourceType"]
        )
    bad = _malformed_primitive_extension(res, rtype)
    if bad is not None:
        raise InvalidResource(
            f"{bad}: a primitive's extension element must be an object (or a list of objects "
            "and nulls for a repeating primitive)",
            expression=[bad],
        )
    try:
        _model(rtype).model_validate(res)
    except ValidationError as exc:
        paths, msgs = [], []
        for err in exc.errors()[:20]:
            path = ".".join([rtype, *(str(p) for p in err.get("loc", ()))])
            paths.append(path)
            msgs.append(f"{path}: {err.get('msg', 'invalid')}")
        raise InvalidResource("; ".join(msgs), expression=paths) from None
    except (ValueError, TypeError, AttributeError) as exc:  # raised by some root validators
        raise InvalidResource(f"{rtype}: {exc}", expression=[rtype]) from None


def _malformed_primitive_extension(node: Any, path: str) -> str | None:
    """The path of the first ``_element`` (a primitive's id and extensions, FHIR JSON §2.6.2)
    that is not an object or a list of objects and nulls: the model library crashes on
    those instead of reporting them."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            found = _malformed_primitive_extension(item, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    if not isinstance(node, dict):
        return None
    for key, value in node.items():
        here = f"{path}.{key}"
        if key.startswith("_") and not (
            isinstance(value, dict)
            or (isinstance(value, list) and all(v is None or isinstance(v, dict) for v in value))
        ):
            return here
        found = _malformed_primitive_extension(value, here)
        if found is not None:
            return found
    return None


@cache
def summary_elements(resource_type: str) -> frozenset[str]:
    """Top-level element names marked "summary" in the specification for ``resource_type``."""
    m = _model(resource_type)
    if m is None:
        return frozenset({"id", "meta"})
    out = set()
    for name, field in m.model_fields.items():
        extra = field.json_schema_extra or {}
        if isinstance(extra, dict) and extra.get("summary_element_property"):
            out.add(field.alias or name)
    # choice elements appear once per type in the model (valueQuantity, valueString, …)
    return frozenset(out)


@cache
def required_elements(resource_type: str) -> frozenset[str]:
    """Top-level elements with minimum cardinality 1 (kept by ``_elements``/``_summary``)."""
    m = _model(resource_type)
    if m is None:
        return frozenset()
    out = set()
    for name, field in m.model_fields.items():
        extra = field.json_schema_extra or {}
        if isinstance(extra, dict) and (extra.get("element_required") or field.is_required()):
            out.add(field.alias or name)
    return frozenset(out)
