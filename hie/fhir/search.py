"""FHIR search URL parameters → a store :class:`Query` (FHIR R4 §3.1.1 "Search").

Supports AND (repeated parameters) and OR (comma-separated values), modifiers ``:exact``,
``:contains``, ``:missing``, ``:not``, ``:below``, ``:above``, ``:[Type]`` and
``:identifier`` on references, prefixes on dates and numbers, chains
(``subject:Patient.identifier=…``), and the result parameters ``_sort``, ``_count``,
``_include``, ``_revinclude``, ``_total``, ``_summary`` and ``_elements``.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from hie.fhir.dates import require_range
from hie.fhir.extract import normalise, split_reference
from hie.fhir.searchparams import SearchParam, params_for
from hie.hub.errors import InvalidRequest, UnknownSearchParameter
from hie.hub.store.port import (
    AnyOf,
    ChainCond,
    Condition,
    DateCond,
    IdCond,
    LastUpdatedCond,
    MissingCond,
    NumberCond,
    Prefix,
    Query,
    ReferenceCond,
    SortKey,
    StringCond,
    TokenCond,
    TypeCond,
    UriCond,
)

PREFIXES = ("eq", "ne", "lt", "le", "gt", "ge", "sa", "eb", "ap")
# Parameters that shape the result rather than filter it.
RESULT_PARAMS = {
    "_sort",
    "_count",
    "_include",
    "_revinclude",
    "_total",
    "_summary",
    "_elements",
    "_format",
    "_pretty",
    "_cursor",
    "_contained",
    "_containedType",
}
_CHAIN_DEFAULT_TARGETS = ("Patient", "Practitioner", "Organization", "Location", "Encounter")
_ID_RX = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass
class Include:
    """``_include=Source:param[:Target]`` or ``_revinclude`` (with ``iterate`` ignored)."""

    source_type: str
    param: str
    target_type: str | None = None


@dataclass
class SearchRequest:
    """A parsed search: the store query plus what to add to and how to shape the results."""

    query: Query
    includes: list[Include] = field(default_factory=list)
    revincludes: list[Include] = field(default_factory=list)
    summary: str | None = None
    elements: list[str] | None = None
    ignored: list[str] = field(default_factory=list)
    content: str | None = None  # _content / _text, answered by the search index


def _split_escaped(raw: str, sep: str) -> list[str]:
    """Split on ``sep`` where it is not escaped with a backslash; the escapes stay."""
    out: list[str] = []
    cur: list[str] = []
    esc = False
    for ch in raw:
        if esc:
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == sep:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


def _unescape(v: str) -> str:
    return re.sub(r"\\(.?)", r"\1", v, flags=re.DOTALL)


def split_values(raw: str) -> list[str]:
    """Split on commas not escaped with a backslash; unescape ``\\,`` ``\\$`` ``\\|``."""
    return [_unescape(v) for v in _split_escaped(raw, ",")]


def _split_token(v: str) -> tuple[str | None, str | None]:
    """``system|code`` of a still-escaped value: ``\\|`` is a literal bar (FHIR R4 §3.1.1.4.7)."""
    parts = _split_escaped(v, "|")
    if len(parts) == 1:
        return None, _unescape(v) or None
    code = _unescape("|".join(parts[1:]))
    return _unescape(parts[0]), code or None


def _prefix(v: str) -> tuple[Prefix, str]:
    if len(v) > 2 and v[:2] in PREFIXES and (v[2].isdigit() or v[2] in "-+."):
        return v[:2], v[2:]  # type: ignore[return-value]
    return "eq", v


def _number(param: str, v: str) -> NumberCond:
    prefix, rest = _prefix(v)
    parts = rest.split("|")
    try:
        d = Decimal(parts[0])
        if not d.is_finite():
            raise InvalidOperation
        # the precision range: ±half a unit of the last digit given (FHIR R4 §3.1.1.4.2)
        half = Decimal(5).scaleb(int(d.as_tuple().exponent) - 1)
        value, lo, hi = float(d), float(d - half), float(d + half)
    except ArithmeticError:  # InvalidOperation, Overflow, signalling NaN
        raise InvalidRequest(f"{param}: {rest!r} is not a number") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InvalidRequest(f"{param}: {rest!r} is not a finite number")
    system = parts[1] or None if len(parts) > 1 else None
    code = parts[2] or None if len(parts) > 2 else None
    return NumberCond(param, prefix, value, lo, hi, system, code)


def escape_value(value: str) -> str:
    """Escape a search value (FHIR R4 §3.1.1.1.8: backslash, comma, pipe, dollar)."""
    for ch in ("\\", ",", "|", "$"):
        value = value.replace(ch, "\\" + ch)
    return value


def _reference_cond(p: SearchParam, v: str, type_mod: str | None) -> Condition:
    if "/" in v:
        tid = split_reference(v)
        if tid is None:
            return ReferenceCond(p.name, "", v)
        type_mod, v = tid
    elif type_mod is None and len(p.targets) == 1:
        type_mod = p.targets[0]
    # A reference to a patient finds the records of every member of the person's identity
    # group (each MO's record, the golden record, merged records) — the integrated record.
    # Patient.link itself is the one reference that names records, not people.
    expand = type_mod == "Patient" and not (p.resource_type == "Patient" and p.name == "link")
    return ReferenceCond(p.name, type_mod, v, expand=expand)


def value_cond(p: SearchParam, modifier: str | None, escaped: str) -> Condition:
    """One value (still escaped, as split from the comma list) of one parameter as a condition."""
    name, kind = p.name, p.kind
    v = _unescape(escaped)
    if kind == "token":
        if modifier not in (None, "not"):
            raise InvalidRequest(f"modifier :{modifier} is not supported on token {name}")
        system, code = _split_token(escaped)
        return TokenCond(name, system, code, negate=modifier == "not")
    if kind in ("date", "quantity", "number") and modifier is not None:
        raise InvalidRequest(f"modifier :{modifier} is not supported on {kind} {name}")
    if kind == "string":
        if modifier not in (None, "exact", "contains"):
            raise InvalidRequest(f"modifier :{modifier} is not supported on string {name}")
        if modifier == "exact":
            return StringCond(name, v, "exact")
        return StringCond(name, normalise(v), "contains" if modifier == "contains" else "prefix")
    if kind == "date":
        prefix, rest = _prefix(v)
        lo, hi = require_range(rest, name)
        return DateCond(name, prefix, lo, hi)
    if kind in ("quantity", "number"):
        return _number(name, v)
    if kind == "uri":
        if modifier not in (None, "below", "above"):
            raise InvalidRequest(f"modifier :{modifier} is not supported on uri {name}")
        return UriCond(name, v, modifier or "exact")  # type: ignore[arg-type]
    if kind == "reference":
        if modifier == "identifier":
            system, code = _split_token(escaped)
            targets = p.targets or ("Patient", "Practitioner", "Organization")
            ident = (TokenCond("identifier", system, code),)
            return _any([ChainCond(name, t, ident) for t in targets])
        if modifier is not None and not modifier[:1].isupper():
            raise InvalidRequest(f"modifier :{modifier} is not supported on reference {name}")
        return _reference_cond(p, v, modifier)
    raise InvalidRequest(f"parameter {name} has unsupported type {kind}")


def _any(conds: list[Condition]) -> Condition:
    return conds[0] if len(conds) == 1 else AnyOf(tuple(conds))


def param_cond(resource_type: str, key: str, raw: str, *, depth: int = 0) -> list[Condition] | None:
    """Conditions (all must hold) for ``key=raw`` on ``resource_type``; None if unknown."""
    if key in ("_id", "_id:not"):
        ids = tuple(split_values(raw))
        for i in ids:
            if not _ID_RX.match(i):
                raise InvalidRequest(f"_id: {i!r} is not a valid id")
        return [IdCond(ids, negate=key.endswith(":not"))]
    if key == "_lastUpdated":
        conds: list[Condition] = []
        for v in split_values(raw):
            prefix, rest = _prefix(v)
            lo, hi = require_range(rest, "_lastUpdated")
            conds.append(LastUpdatedCond(prefix, lo, hi))
        return [_any(conds)]
    name, _, chain = key.partition(".")
    name, _, modifier = name.partition(":")
    params = params_for(resource_type)
    p = params.get(name)
    if p is None:
        return None
    mod = modifier or None
    if chain:
        if p.kind != "reference":
            raise InvalidRequest(f"{name} is not a reference parameter and cannot be chained")
        if depth >= 2:
            raise InvalidRequest("chains deeper than three links are not supported")
        targets = (mod,) if mod else p.targets or _CHAIN_DEFAULT_TARGETS
        inner_name = chain.split(".", 1)[0].split(":", 1)[0]
        if len(targets) > 1:  # ambiguous: every candidate type that knows the parameter
            targets = tuple(
                t for t in targets if inner_name in params_for(t) or inner_name.startswith("_")
            )
        chained: list[Condition] = []
        for target in targets:
            inner = param_cond(target, chain, raw, depth=depth + 1)
            if inner is not None:
                chained.append(ChainCond(name, target, tuple(inner)))
        if not chained:
            raise UnknownSearchParameter(f"unknown search parameter {chain!r} in chain {key!r}")
        return [_any(chained)]
    if mod == "missing":
        if raw not in ("true", "false"):
            raise InvalidRequest(f"{key}: :missing takes true or false")
        return [MissingCond(name, p.table, raw == "true")]  # type: ignore[arg-type]
    conds = [value_cond(p, mod, v) for v in _split_escaped(raw, ",") if _unescape(v)]
    if not conds:
        raise InvalidRequest(f"{key}: empty value")
    if mod == "not":
        return conds  # none of the values: an AND of negations (FHIR R4 §3.1.1.5.9)
    return [_any(conds)]


def _sort_keys(resource_type: str | None, raw: str) -> list[SortKey]:
    keys: list[SortKey] = []
    for item in split_values(raw):
        desc = item.startswith("-")
        name = item.lstrip("-")
        if name == "_id":
            keys.append(SortKey("_id", "id", desc))
        elif name == "_lastUpdated":
            keys.append(SortKey("_lastUpdated", "lastUpdated", desc))
        else:
            p = params_for(resource_type or "").get(name)
            if p is None or p.kind == "reference":
                raise InvalidRequest(f"cannot sort by {name!r}")
            keys.append(SortKey(name, p.table, desc))  # type: ignore[arg-type]
    return keys


def _include(raw: str, rev: bool) -> Include:
    parts = raw.split(":")
    if parts[-1] == "iterate":
        parts = parts[:-1]
    if len(parts) < 2:
        raise InvalidRequest(f"{'_revinclude' if rev else '_include'}={raw!r}: use Type:param")
    src, param = parts[0], parts[1]
    if param != "*" and (
        params_for(src).get(param) is None or params_for(src)[param].kind != "reference"
    ):
        raise InvalidRequest(f"{src}:{param} is not a reference search parameter")
    return Include(src, param, parts[2] if len(parts) > 2 else None)


def encode_cursor(values: list[object]) -> str:
    """Opaque paging cursor."""
    return base64.urlsafe_b64encode(orjson.dumps(values)).decode().rstrip("=")


def decode_cursor(raw: str) -> list[object]:
    """Inverse of :func:`encode_cursor`; a malformed cursor is a 400."""
    try:
        values = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        raise InvalidRequest("the paging cursor is malformed") from None
    if not isinstance(values, list) or not all(
        isinstance(v, int | float | str)
        and not isinstance(v, bool)
        and not (isinstance(v, int) and not -(2**63) <= v < 2**63)  # databases take 64 bits
        for v in values
    ):
        raise InvalidRequest("the paging cursor is malformed")
    return values


def parse_search(
    resource_type: str | None,
    items: list[tuple[str, str]],
    *,
    default_count: int,
    max_count: int,
    lenient: bool = False,
) -> SearchRequest:
    """Parse URL query items (in order) into a :class:`SearchRequest`."""
    if resource_type is not None and not params_for(resource_type):
        raise UnknownSearchParameter(f"search is not supported on {resource_type}")
    q = Query(resource_type, count=default_count)
    req = SearchRequest(q)
    for key, raw in items:
        base = key.split(":", 1)[0]
        if base == "_count":
            try:
                n = int(raw)
            except ValueError:
                raise InvalidRequest("_count must be an integer") from None
            q.count = max(0, min(n, max_count))
        elif base == "_sort":
            q.sort = _sort_keys(resource_type, raw)
        elif base == "_include":
            req.includes.extend(_include(v, False) for v in split_values(raw))
        elif base == "_revinclude":
            req.revincludes.extend(_include(v, True) for v in split_values(raw))
        elif base == "_total":
            if raw not in ("none", "estimate", "accurate"):
                raise InvalidRequest("_total must be none, estimate or accurate")
            q.total = raw != "none"
        elif base == "_summary":
            if raw not in ("true", "false", "text", "data", "count"):
                raise InvalidRequest("_summary must be true, false, text, data or count")
            req.summary = None if raw == "false" else raw
            if raw == "count":
                q.total = True
        elif base == "_elements":
            req.elements = [e.strip() for e in raw.split(",") if e.strip()]
        elif base == "_cursor":
            q.after = decode_cursor(raw)
        elif base in RESULT_PARAMS:
            continue
        elif base in ("_content", "_text"):
            req.content = raw
        elif base == "_type" and resource_type is None:
            q.conds.append(TypeCond(tuple(split_values(raw))))
        elif resource_type is None and base not in ("_id", "_lastUpdated"):
            if lenient:
                req.ignored.append(key)
                continue
            raise UnknownSearchParameter(f"parameter {key!r} is not supported across all types")
        else:
            conds = param_cond(resource_type or "", key, raw)
            if conds is None:
                if lenient:
                    req.ignored.append(key)
                    continue
                raise UnknownSearchParameter(
                    f"unknown search parameter {key!r} for {resource_type}"
                )
            q.conds.extend(conds)
    return req


def canonical_items(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The query items without paging state, for self/next links."""
    return [(k, v) for k, v in items if k != "_cursor"]


def describe(resource_type: str) -> list[dict[str, Any]]:
    """CapabilityStatement ``searchParam`` entries for a type."""
    out = [
        {"name": "_id", "type": "token"},
        {"name": "_lastUpdated", "type": "date"},
    ]
    for p in params_for(resource_type).values():
        out.append({"name": p.name, "type": p.kind})
    return out
