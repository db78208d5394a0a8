"""Reference data (НСИ): code systems, value sets and concept maps, and the FHIR terminology
operations over them — ``$lookup``, ``$validate-code``, ``$expand`` and ``$translate``
(FHIR R4 §4.7.14–§4.10.13) — plus the code check other parts call on incoming data.

CodeSystem, ValueSet and ConceptMap are ordinary FHIR resources in the resource store, so CRUD,
search and ``_history`` come from the FHIR layer. This module reads them through an in-memory
cache (:class:`Terminology`), one per store:

- A canonical URL resolves to every stored resource with that ``url``; several versions
  (``CodeSystem.version``) coexist as separate resources and each stays resolvable with
  ``version`` (or ``url|version``). Without a version the *latest* is used, chosen by, in order:
  a CodeSystem whose ``content`` is ``complete`` over a fragment (so a full dictionary loaded
  later wins over the subset the hub ships); then the highest ``version`` in natural order
  (runs of digits compare as numbers, so ``2.10`` > ``2.9`` and ``2024-03-01`` > ``2023-12-31``;
  at the same position text sorts before a number; no version sorts lowest); then the most
  recently stored.
- The cache is checked against the store on every call without reading big resources again:
  each cached resource is confirmed by asking for its next stored version (``vread`` of
  ``versionId + 1``; absent = unchanged), and resources new to a URL are found by a search on
  the URL that excludes the ids already known. A code system's index (code → concept, with the
  hierarchy) is built once per stored version, so a 100,000-code LOINC is parsed once.

Unknown codes in incoming data are accepted but flagged: :meth:`Terminology.check_code` never
raises for them, and callers count them with :func:`flag_unknown` (the Prometheus counter
``hie_unknown_codes_total{system}`` on the dashboards).

The loader (:func:`read_fhir_json`, :func:`read_csv`, :func:`store_resources`,
:func:`load_builtin`) validates everything first and stores nothing from input with any bad
entry; ``hie terminology load`` drives it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Counter

from hie.fhir import model
from hie.fhir.dates import format_instant
from hie.fhir.extract import normalise
from hie.fhir.service import FhirService
from hie.hub.errors import Gone, HieError, InvalidRequest, NotFound, Unprocessable
from hie.hub.store.port import (
    IdCond,
    MissingCond,
    Query,
    ResourceStore,
    StoredResource,
    TokenCond,
    UriCond,
    WriteTx,
)
from hie.hub.store.sql import now_us

Json = dict[str, Any]
TYPES = ("CodeSystem", "ValueSet", "ConceptMap")
MAX_EXPANSION = 10_000  # codes an $expand returns without count/offset paging
DESIGNATION_USAGE = "http://terminology.hl7.org/CodeSystem/designation-usage"
PROPERTY_URI = "http://hl7.org/fhir/concept-properties"
_ID_RX = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR R4 §2.24.0.1 "id"
_RUN_RX = re.compile(r"(\d+)|(\D+)")
_INACTIVE_STATUS = {"retired", "inactive", "deprecated"}
# R4 ConceptMap equivalences that say "there is no match" (§4.10.13 $translate: result)
_NO_MATCH = {"unmatched", "disjoint"}


class ExpansionTooLarge(InvalidRequest):
    """The expansion is larger than the server returns in one response (use count/offset)."""

    issue = "too-costly"


# (resource type, operation, Terminology method, has an instance-level form) — FHIR R4 §4.7.14,
# §4.8.15, §4.9.16, §4.10.13
OPERATIONS: tuple[tuple[str, str, str, bool], ...] = (
    ("CodeSystem", "lookup", "lookup", False),
    ("CodeSystem", "validate-code", "validate_code_cs", True),
    ("ValueSet", "expand", "expand", True),
    ("ValueSet", "validate-code", "validate_code_vs", True),
    ("ConceptMap", "translate", "translate", True),
)


def terminology_operations() -> dict[str, list[Json]]:
    """CapabilityStatement ``rest.resource.operation`` entries, by resource type."""
    out: dict[str, list[Json]] = {}
    for rtype, name, _method, _instance in OPERATIONS:
        out.setdefault(rtype, []).append(
            {"name": name, "definition": f"http://hl7.org/fhir/OperationDefinition/{rtype}-{name}"}
        )
    return out


# --- metrics: unknown codes in incoming data ------------------------------------------------

UNKNOWN_CODES = Counter(
    "hie_unknown_codes_total",
    "Codes in incoming data that the hub's reference data does not know, by code system",
    ["system"],
)
_MAX_SYSTEM_LABELS = 200  # senders choose the system URL: keep the label set bounded
_system_labels: set[str] = set()
_labels_lock = threading.Lock()


def flag_unknown(system: str | None) -> None:
    """Count one unknown code of ``system`` (call it where :class:`CodeCheck` says unknown).

    The label is the system URL (at most 200 characters); after 200 distinct systems further
    ones are counted under ``(other)``, so a bad feed cannot blow up the metric's cardinality.
    """
    label = (system or "").strip()[:200] or "(none)"
    with _labels_lock:
        if label not in _system_labels:
            if len(_system_labels) >= _MAX_SYSTEM_LABELS:
                label = "(other)"
            else:
                _system_labels.add(label)
    UNKNOWN_CODES.labels(system=label).inc()


# --- versions and canonicals ----------------------------------------------------------------


def version_key(version: str | None) -> tuple[tuple[int, int | str], ...]:
    """Natural sort key of a version string (see the module docstring for the rule)."""
    if not version:
        return ()
    return tuple(
        (1, int(digits)) if digits else (0, text.lower())
        for digits, text in _RUN_RX.findall(version)
    )


def split_canonical(value: str, version: str | None = None) -> tuple[str, str | None]:
    """``url|version`` → (url, version); an explicit ``version`` argument wins."""
    url, bar, ver = value.partition("|")
    return url, (version or (ver if bar and ver else None))


# --- a code system's concepts ---------------------------------------------------------------


@dataclass(slots=True)
class Concept:
    """One concept of a code system, with its place in the hierarchy."""

    code: str
    display: str | None
    definition: str | None
    designations: list[Json]
    properties: list[Json]
    parents: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    inactive: bool = False
    abstract: bool = False

    def display_in(self, language: str | None) -> str | None:
        """The display in ``language`` (a designation), else the concept's display."""
        if language:
            lang = language.lower()
            for d in self.designations:
                dl = str(d.get("language") or "").lower()
                if dl and (dl == lang or dl.split("-")[0] == lang.split("-")[0]):
                    value = d.get("value")
                    if isinstance(value, str) and value:
                        return value
        return self.display

    def names(self) -> Iterator[str]:
        """The display and every designation value (for display checks and text filters)."""
        if self.display:
            yield self.display
        for d in self.designations:
            value = d.get("value")
            if isinstance(value, str) and value:
                yield value

    def property_values(self, prop: str) -> list[str]:
        """Values of property ``prop`` as strings (``parent``/``child`` from the hierarchy)."""
        if prop == "parent":
            return list(self.parents)
        if prop == "child":
            return list(self.children)
        if prop == "display":
            return [self.display] if self.display else []
        if prop == "inactive":
            return ["true" if self.inactive else "false"]
        return [v for p in self.properties if p.get("code") == prop for v in _prop_strings(p)]


def _prop_value(p: Json) -> tuple[str, Any] | None:
    for key, value in p.items():
        if key.startswith("value"):
            return key, value
    return None


def _prop_strings(p: Json) -> list[str]:
    kv = _prop_value(p)
    if kv is None:
        return []
    key, value = kv
    if key == "valueCoding" and isinstance(value, dict):
        return [str(value.get("code", ""))]
    if key == "valueBoolean":
        return ["true" if value else "false"]
    return [str(value)]


class CodeSystemIndex:
    """The concepts of one stored CodeSystem version, by code, with the is-a hierarchy.

    The hierarchy comes from nested ``concept`` elements and from ``parent``/``child``
    properties (flat LOINC-style files); both may be mixed.
    """

    def __init__(self, res: Json) -> None:
        self.url: str = res.get("url") or ""
        self.version: str | None = res.get("version")
        self.name: str = res.get("name") or res.get("title") or self.url
        self.content: str = res.get("content") or "complete"
        self.case_sensitive: bool = res.get("caseSensitive") is not False
        self.concepts: dict[str, Concept] = {}
        self._fold: dict[str, str] = {}
        self._add(res.get("concept") or [], None)
        extra_parents: dict[str, list[str]] = {}
        for c in self.concepts.values():
            for p in c.properties:
                kv = _prop_value(p)
                if kv is None:
                    continue
                target = _prop_strings(p)[0]
                if p.get("code") == "parent" and target not in c.parents:
                    c.parents.append(target)
                elif p.get("code") == "child":
                    extra_parents.setdefault(target, []).append(c.code)
        for code, parents in extra_parents.items():
            child = self.concepts.get(code)
            if child is not None:
                child.parents.extend(p for p in parents if p not in child.parents)
        for c in self.concepts.values():
            for parent in c.parents:
                pc = self.concepts.get(parent)
                if pc is not None and c.code not in pc.children:
                    pc.children.append(c.code)
        if not self.case_sensitive:
            self._fold = {code.lower(): code for code in self.concepts}

    def _add(self, items: list[Json], parent: str | None) -> None:
        for item in items:
            code = item.get("code")
            if not isinstance(code, str) or not code:
                continue
            props = [p for p in item.get("property") or [] if isinstance(p, dict)]
            c = self.concepts.get(code)
            if c is None:
                c = Concept(
                    code,
                    item.get("display"),
                    item.get("definition"),
                    [d for d in item.get("designation") or [] if isinstance(d, dict)],
                    props,
                )
                for p in props:
                    values = _prop_strings(p)
                    if p.get("code") == "status" and values and values[0] in _INACTIVE_STATUS:
                        c.inactive = True
                    elif p.get("code") in ("inactive", "deprecated") and values == ["true"]:
                        c.inactive = True
                    elif p.get("code") == "notSelectable" and values == ["true"]:
                        c.abstract = True
                self.concepts[code] = c
            if parent is not None and parent not in c.parents:
                c.parents.append(parent)
            self._add(item.get("concept") or [], code)

    @property
    def complete(self) -> bool:
        """True when the resource holds every code of the system (``content = complete``)."""
        return self.content == "complete"

    def get(self, code: str) -> Concept | None:
        """The concept with ``code`` (case-insensitively when the system says so)."""
        c = self.concepts.get(code)
        if c is None and self._fold:
            real = self._fold.get(code.lower())
            c = self.concepts.get(real) if real else None
        return c

    def descendants(self, code: str) -> list[str]:
        """Codes below ``code`` in the hierarchy (breadth first, each once)."""
        return self._walk(code, lambda c: c.children)

    def ancestors(self, code: str) -> list[str]:
        """Codes above ``code`` in the hierarchy."""
        return self._walk(code, lambda c: c.parents)

    def _walk(self, code: str, step: Callable[[Concept], list[str]]) -> list[str]:
        start = self.get(code)
        if start is None:
            return []
        seen = {start.code}
        out: list[str] = []
        queue = [start.code]
        while queue:
            nxt: list[str] = []
            for cur in queue:
                concept = self.concepts.get(cur)
                for other in step(concept) if concept else []:
                    if other not in seen and other in self.concepts:
                        seen.add(other)
                        out.append(other)
                        nxt.append(other)
            queue = nxt
        return out

    def filter(self, prop: str, op: str, value: str) -> list[str]:
        """Codes matching one ``compose.include.filter`` (R4 filter-operator), in file order."""
        if prop in ("concept", "code"):
            return self._hierarchy_filter(op, value)
        if op == "=":
            return [c.code for c in self.concepts.values() if value in c.property_values(prop)]
        if op in ("in", "not-in"):
            wanted = {v.strip() for v in value.split(",")}
            inside = op == "in"
            return [
                c.code
                for c in self.concepts.values()
                if bool(wanted & set(c.property_values(prop))) == inside
            ]
        if op == "regex":
            rx = _regex(value)
            return [
                c.code
                for c in self.concepts.values()
                if any(rx.fullmatch(v) for v in c.property_values(prop))
            ]
        if op == "exists":
            want = value.lower() == "true"
            return [c.code for c in self.concepts.values() if bool(c.property_values(prop)) == want]
        raise InvalidRequest(f"filter operator {op!r} is not supported on property {prop!r}")

    def _hierarchy_filter(self, op: str, value: str) -> list[str]:
        concept = self.get(value) if op not in ("in", "not-in", "regex") else None
        if op == "is-a":
            return [concept.code, *self.descendants(concept.code)] if concept else []
        if op == "descendent-of":
            return self.descendants(concept.code) if concept else []
        if op == "is-not-a":
            below = {concept.code, *self.descendants(concept.code)} if concept else set()
            return [code for code in self.concepts if code not in below]
        if op == "generalizes":
            return [concept.code, *self.ancestors(concept.code)] if concept else []
        if op == "=":
            return [concept.code] if concept else []
        if op in ("in", "not-in"):
            wanted = {c.code for v in value.split(",") if (c := self.get(v.strip()))}
            return [code for code in self.concepts if (code in wanted) == (op == "in")]
        if op == "regex":
            rx = _regex(value)
            return [code for code in self.concepts if rx.fullmatch(code)]
        raise InvalidRequest(f"filter operator {op!r} is not supported on property 'concept'")


def _regex(value: str) -> re.Pattern[str]:
    if len(value) > 200:
        raise InvalidRequest("a regex filter is limited to 200 characters")
    try:
        return re.compile(value)
    except re.error as exc:
        raise InvalidRequest(f"the regex filter {value!r} is invalid: {exc}") from None


# --- concept maps ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mapping:
    """One source → target pair of a ConceptMap group."""

    source_system: str
    source_code: str
    target_system: str
    target_code: str | None
    target_display: str | None
    equivalence: str


class ConceptMapIndex:
    """A ConceptMap's element/target pairs by source and by target (for ``reverse``)."""

    def __init__(self, res: Json) -> None:
        self.url: str = res.get("url") or ""
        self.source: str | None = res.get("sourceUri") or res.get("sourceCanonical")
        self.target: str | None = res.get("targetUri") or res.get("targetCanonical")
        self.forward: dict[tuple[str, str], list[Mapping]] = {}
        self.backward: dict[tuple[str, str], list[Mapping]] = {}
        self.unmapped: dict[str, Json] = {}  # source system → group.unmapped
        for g in res.get("group") or []:
            src = g.get("source") or ""
            tgt = g.get("target") or ""
            if isinstance(g.get("unmapped"), dict):
                self.unmapped[src] = {**g["unmapped"], "_target": tgt}
            for el in g.get("element") or []:
                code = el.get("code")
                if not code:
                    continue
                for t in el.get("target") or [{"equivalence": "unmatched"}]:
                    m = Mapping(
                        src,
                        code,
                        tgt,
                        t.get("code"),
                        t.get("display"),
                        t.get("equivalence") or "equivalent",
                    )
                    self.forward.setdefault((src, code), []).append(m)
                    if m.target_code:
                        self.backward.setdefault((tgt, m.target_code), []).append(m)

    @property
    def systems(self) -> tuple[set[str], set[str]]:
        """(source systems, target systems) of the groups."""
        return {k[0] for k in self.forward}, {k[0] for k in self.backward}


# --- the cache of stored terminology resources -----------------------------------------------


@dataclass(slots=True)
class Entry:
    """One stored terminology resource (current version) as the cache holds it."""

    resource_type: str
    id: str
    version_id: int
    last_updated: int
    res: Json  # a CodeSystem without its ``concept`` (they live in ``codes``)
    codes: CodeSystemIndex | None = None
    cmap: ConceptMapIndex | None = None
    checked: float = 0.0

    @property
    def url(self) -> str:
        return str(self.res.get("url") or "")

    @property
    def version(self) -> str | None:
        v = self.res.get("version")
        return v if isinstance(v, str) else None

    def latest_key(self) -> tuple[Any, ...]:
        complete = self.codes is None or self.codes.complete
        return (complete, version_key(self.version), self.last_updated, self.id)

    def keys(self) -> set[tuple[str, str]]:
        """The (uri search parameter, value) pairs this resource is found under."""
        out = {("url", self.url)} if self.url else set()
        if self.cmap is not None:
            sources, targets = self.cmap.systems
            out |= {("source-system", s) for s in sources}
            out |= {("target-system", t) for t in targets}
        return out

    def system(self) -> CodeSystemIndex:
        assert self.codes is not None
        return self.codes


@dataclass(frozen=True, slots=True)
class Item:
    """One code of an expansion."""

    system: str
    version: str | None
    code: str
    display: str | None
    inactive: bool = False
    abstract: bool = False
    designations: tuple[Json, ...] = ()


@dataclass(frozen=True, slots=True)
class Dep:
    """A canonical an expansion used and what it resolved to (None: not known then)."""

    resource_type: str
    url: str
    version: str | None
    resolved: tuple[str, int] | None


@dataclass(slots=True)
class Expansion:
    """A value set's codes (before the request's text filter and paging)."""

    items: list[Item]
    deps: list[Dep]
    where: dict[tuple[str, str], int] = field(default_factory=dict)
    _texts: list[str] | None = None

    def __post_init__(self) -> None:
        self.where = {(it.system, it.code): i for i, it in enumerate(self.items)}

    def texts(self) -> list[str]:
        """Normalised searchable text per item: code, display and designations."""
        if self._texts is None:
            self._texts = [
                normalise(
                    " ".join(
                        [it.code, it.display or ""]
                        + [str(d.get("value") or "") for d in it.designations]
                    )
                )
                for it in self.items
            ]
        return self._texts


@dataclass(frozen=True, slots=True)
class CodeCheck:
    """The verdict on one incoming code; unknown codes are accepted and flagged."""

    known: bool
    system_known: bool
    display_ok: bool
    message: str
    display: str | None = None

    @property
    def ok(self) -> bool:
        """True when there is nothing to warn about (known code, fitting display)."""
        return self.known and self.display_ok

    def issue(self, expression: str | None = None) -> Json:
        """An OperationOutcome issue for the sender: a warning (the data is still accepted)."""
        out: Json = {
            "severity": "warning" if not self.ok else "information",
            "code": "code-invalid" if not self.ok else "informational",
            "diagnostics": self.message,
        }
        if expression:
            out["expression"] = [expression]
        return out


class Terminology:
    """Terminology operations over one resource store, with the cache described above.

    ``recheck_seconds`` lets hot paths skip the freshness check of a resource confirmed that
    recently (0, the default, checks on every call: a write is seen by the next call).
    """

    def __init__(
        self,
        store: ResourceStore,
        *,
        max_expansion: int = MAX_EXPANSION,
        recheck_seconds: float = 0.0,
    ) -> None:
        self.store = store
        self.max_expansion = max_expansion
        self.recheck_seconds = recheck_seconds
        self._lock = threading.RLock()
        self._entries: dict[tuple[str, str], Entry] = {}
        self._members: dict[tuple[str, str, str], set[str]] = {}
        self._checked: dict[tuple[str, str, str], float] = {}
        self._expansions: dict[tuple[str, int], Expansion] = {}

    # --- the cache -----------------------------------------------------------------------

    def _fresh(self, checked: float) -> bool:
        return self.recheck_seconds > 0 and time.monotonic() - checked < self.recheck_seconds

    def _install(self, rtype: str, id: str, stored: StoredResource | None) -> Entry | None:
        old = self._entries.pop((rtype, id), None)
        if old is not None:
            for param, value in old.keys():
                self._members.get((rtype, param, value), set()).discard(id)
            self._expansions.pop((id, old.version_id), None)
        if stored is None or stored.deleted or stored.content is None:
            return None
        res: Json = orjson.loads(stored.content)
        entry = Entry(rtype, id, stored.version, stored.last_updated, res)
        if rtype == "CodeSystem":
            entry.codes = CodeSystemIndex(res)
            entry.res = {k: v for k, v in res.items() if k != "concept"}
        elif rtype == "ConceptMap":
            entry.cmap = ConceptMapIndex(res)
        entry.checked = time.monotonic()
        self._entries[(rtype, id)] = entry
        for param, value in entry.keys():
            self._members.setdefault((rtype, param, value), set()).add(id)
        return entry

    def _refresh(self, rtype: str, id: str) -> Entry | None:
        """The current version of ``rtype/id`` (None when absent or deleted)."""
        entry = self._entries.get((rtype, id))
        if entry is not None:
            if self._fresh(entry.checked):
                return entry
            newer = self.store.vread(rtype, id, entry.version_id + 1)
            if newer is None:
                entry.checked = time.monotonic()
                return entry
            while (after := self.store.vread(rtype, id, newer.version + 1)) is not None:
                newer = after  # several writes since: walk to the current one
            return self._install(rtype, id, newer)
        return self._install(rtype, id, self.store.read(rtype, id))

    def _candidates(self, rtype: str, param: str, value: str) -> list[Entry]:
        """Every stored ``rtype`` whose uri parameter ``param`` is ``value``."""
        key = (rtype, param, value)
        with self._lock:
            if not self._fresh(self._checked.get(key, -1e9)):
                for id in sorted(self._members.get(key, set())):
                    self._refresh(rtype, id)
                known = sorted(self._members.get(key, set()))
                conds: list[Any] = [UriCond(param, value)]
                if known:
                    conds.append(IdCond(tuple(known), negate=True))
                after: list[object] | None = None
                while True:
                    page = self.store.search(Query(rtype, list(conds), count=50, after=after))
                    for stored in page.items:
                        self._install(rtype, stored.id, stored)
                    if page.next_after is None:
                        break
                    after = page.next_after
                self._checked[key] = time.monotonic()
            ids = sorted(self._members.get(key, set()))
            return [self._entries[(rtype, i)] for i in ids if (rtype, i) in self._entries]

    def resolve(self, rtype: str, canonical: str, version: str | None = None) -> Entry:
        """The stored ``rtype`` for a canonical URL (``url|version`` allowed): the given
        version, or the latest (see the module docstring). NotFound when there is none."""
        url, version = split_canonical(canonical, version)
        if not url:
            raise InvalidRequest(f"a {rtype} URL is required")
        found = self._candidates(rtype, "url", url)
        if version is not None:
            found = [e for e in found if e.version == version]
            if not found:
                raise NotFound(f"{rtype} {url} version {version} is not known to the hub")
        if not found:
            kind = "code system" if rtype == "CodeSystem" else rtype
            raise NotFound(f"{kind} {url} is not known to the hub")
        return max(found, key=Entry.latest_key)

    def by_id(self, rtype: str, id: str) -> Entry:
        """The stored ``rtype/id`` (instance-level operations)."""
        with self._lock:
            entry = self._refresh(rtype, id)
        if entry is None:
            if self.store.read(rtype, id) is not None:
                raise Gone(f"{rtype}/{id} was deleted")
            raise NotFound(f"{rtype}/{id} is not known")
        return entry

    # --- the code check other parts call --------------------------------------------------

    def check_code(
        self,
        system: str | None,
        code: str | None,
        display: str | None = None,
        version: str | None = None,
    ) -> CodeCheck:
        """Is ``system|code`` known to the reference data, and does ``display`` fit it?

        Never raises for unknown systems or codes: they come back ``known=False`` with a
        message for the sender (the caller adds the warning and calls :func:`flag_unknown`).
        """
        if not system or not code:
            what = "code" if not code else "code system"
            return CodeCheck(False, bool(system), True, f"the coding has no {what}")
        try:
            entry = self.resolve("CodeSystem", system, version)
        except (NotFound, InvalidRequest):
            ver = f" version {version}" if version else ""
            return CodeCheck(
                False, False, True, f"code system {system}{ver} is not in the hub's reference data"
            )
        cs = entry.system()
        concept = cs.get(code)
        if concept is None:
            partial = "" if cs.complete else f" (the hub holds a {cs.content} of it)"
            return CodeCheck(
                False, True, True, f"code {code!r} is not in code system {system}{partial}"
            )
        ok, message = _display_verdict(concept, display)
        return CodeCheck(True, True, ok, message or "the code is known", concept.display)

    # --- $lookup ---------------------------------------------------------------------------

    def lookup(self, params: OpParams) -> Json:
        """``CodeSystem/$lookup``: a concept's name, display, designations and properties."""
        system, code, version = params.coding_parts(system_key="system")
        if not code or not system:
            raise InvalidRequest("$lookup needs system and code (or coding)")
        cs = self.resolve("CodeSystem", system, version).system()
        concept = cs.get(code)
        if concept is None:
            raise NotFound(f"code {code!r} is not in code system {cs.url}")
        language = params.text("displayLanguage")
        out: list[Json] = [_p("name", valueString=cs.name)]
        if cs.version:
            out.append(_p("version", valueString=cs.version))
        out.append(_p("display", valueString=concept.display_in(language) or concept.code))
        if concept.definition:
            out.append(_p("definition", valueString=concept.definition))
        if concept.abstract:
            out.append(_p("abstract", valueBoolean=True))
        for d in concept.designations:
            parts: list[Json] = []
            if d.get("language"):
                parts.append(_p("language", valueCode=d["language"]))
            if isinstance(d.get("use"), dict):
                parts.append(_p("use", valueCoding=d["use"]))
            parts.append(_p("value", valueString=d.get("value", "")))
            out.append({"name": "designation", "part": parts})
        wanted = set(params.texts("property"))
        props: list[tuple[str, str, Any]] = [
            ("parent", "valueCode", p) for p in concept.parents if p in cs.concepts
        ] + [("child", "valueCode", c) for c in concept.children]
        if concept.inactive:
            props.append(("inactive", "valueBoolean", True))
        for p in concept.properties:
            kv = _prop_value(p)
            if kv is not None and p.get("code") not in ("parent", "child"):
                props.append((str(p.get("code")), kv[0], kv[1]))
        for pcode, key, value in props:
            if wanted and pcode not in wanted:
                continue
            out.append(
                {
                    "name": "property",
                    "part": [_p("code", valueCode=pcode), {"name": "value", key: value}],
                }
            )
        return {"resourceType": "Parameters", "parameter": out}

    # --- $validate-code --------------------------------------------------------------------

    def validate_code_cs(self, params: OpParams, id: str | None = None) -> Json:
        """``CodeSystem/$validate-code`` (type level by ``url``, or instance level)."""
        codings = params.codings(system_key="url", alt_system_key="system")
        if not codings:
            raise InvalidRequest("$validate-code needs code (with url), coding or codeableConcept")
        if id is not None:
            entry = self.by_id("CodeSystem", id)
        else:
            url = params.text("url") or next((c["system"] for c in codings if c.get("system")), "")
            if not url:
                raise InvalidRequest("$validate-code on CodeSystem needs url (the code system)")
            entry = self.resolve("CodeSystem", url, params.text("version"))
        cs = entry.system()
        results: list[Verdict] = []
        for coding in codings:
            system = coding.get("system") or cs.url
            if system != cs.url:
                results.append(Verdict(False, f"{system} is not the code system {cs.url}"))
            else:
                results.append(
                    _check_in_system(cs, coding.get("code") or "", coding.get("display"))
                )
        return _validation_result(results, params.text("displayLanguage"))

    def validate_code_vs(self, params: OpParams, id: str | None = None) -> Json:
        """``ValueSet/$validate-code``: is the code (coding, codeableConcept) in the value set?"""
        codings = params.codings(system_key="system")
        if not codings:
            raise InvalidRequest("$validate-code needs code with system, coding or codeableConcept")
        vs, exp = self._expansion_for(params, id)
        vs_url = vs.get("url") or "(inline value set)"
        results = [
            self._check_in_expansion(exp, vs_url, coding, params.text("systemVersion"))
            for coding in codings
        ]
        return _validation_result(results, params.text("displayLanguage"))

    def _check_in_expansion(
        self, exp: Expansion, vs_url: str, coding: Json, system_version: str | None
    ) -> Verdict:
        code = str(coding.get("code") or "")
        system = coding.get("system")
        if not system:  # infer it when the value set has that code in one system only
            systems = {it.system for it in exp.items if it.code == code}
            if len(systems) != 1:
                return Verdict(False, f"code {code!r} has no system")
            system = systems.pop()
        cs: CodeSystemIndex | None
        try:
            cs = self.resolve("CodeSystem", system, system_version).system()
        except NotFound:
            cs = None
        concept = cs.get(code) if cs is not None else None
        idx = exp.where.get((system, concept.code if concept else code))
        if idx is None:
            if cs is not None and concept is None and cs.complete:
                return Verdict(False, f"code {code!r} is not in code system {system}")
            return Verdict(False, f"code {system}|{code} is not in value set {vs_url}")
        if concept is None:  # enumerated in the value set, from a system the hub lacks
            item = exp.items[idx]
            concept = Concept(item.code, item.display, None, list(item.designations), [])
        return _display_result(concept, coding.get("display"))

    # --- $expand ---------------------------------------------------------------------------

    def expand(self, params: OpParams, id: str | None = None) -> Json:
        """``ValueSet/$expand`` with the text ``filter``, ``offset``/``count`` paging,
        ``activeOnly``, ``includeDesignations`` and ``displayLanguage``."""
        vs, exp = self._expansion_for(params, id)
        offset = params.integer("offset", 0) or 0
        count = params.integer("count", None)
        text = params.text("filter")
        active_only = params.flag("activeOnly", False)
        items = exp.items
        order: list[int] = list(range(len(items)))
        if active_only:
            order = [i for i in order if not items[i].inactive]
        if text:
            order = _text_match(exp, order, text)
        total = len(order)
        if count is None:
            if total - offset > self.max_expansion:
                raise ExpansionTooLarge(
                    f"the expansion has {total} codes, more than the {self.max_expansion} "
                    "returned at once; page with count and offset, or narrow it with filter"
                )
            count = total
        count = min(count, self.max_expansion)
        page = order[offset : offset + count]
        language = params.text("displayLanguage")
        designations = params.flag("includeDesignations", False)
        contains = [_contains(items[i], language, designations) for i in page]
        used: list[Json] = []
        for dep in exp.deps:
            if dep.resource_type == "CodeSystem" and dep.resolved is not None:
                entry = self._entries.get(("CodeSystem", dep.resolved[0]))
                if entry is not None and entry.version:
                    used.append(_p("version", valueUri=f"{entry.url}|{entry.version}"))
        parameters = params.echo(_EXPAND_ECHO)
        expansion: Json = {
            "identifier": f"urn:uuid:{uuid.uuid4()}",
            "timestamp": format_instant(now_us()),
            "total": total,
            "offset": offset,
        }
        if parameters or used:
            expansion["parameter"] = [*parameters, *_unique(used)]
        if contains:
            expansion["contains"] = contains
        out = {k: v for k, v in vs.items() if k not in ("compose", "expansion", "text", "meta")}
        out["resourceType"] = "ValueSet"
        out.setdefault("status", "active")
        out["expansion"] = expansion
        return out

    def _expansion_for(self, params: OpParams, id: str | None) -> tuple[Json, Expansion]:
        """The value set an operation names (instance id, ``url``/``valueSetVersion`` or an
        inline ``valueSet``) and its expansion (cached per stored version)."""
        inline = params.resource("valueSet")
        if id is None and inline is not None:
            if inline.get("resourceType") != "ValueSet":
                raise InvalidRequest("the valueSet parameter must be a ValueSet resource")
            return inline, self._compute_expansion(inline, [])
        if id is not None:
            entry = self.by_id("ValueSet", id)
        else:
            url = params.text("url") or params.text("context")
            if not url:
                raise InvalidRequest("name the value set: url, valueSet, or ValueSet/{id}/…")
            entry = self.resolve("ValueSet", url, params.text("valueSetVersion"))
        return entry.res, self._expansion_of(entry, [])

    def _expansion_of(self, entry: Entry, stack: list[str]) -> Expansion:
        key = (entry.id, entry.version_id)
        with self._lock:
            exp = self._expansions.get(key)
        if exp is not None and all(self._dep_holds(d) for d in exp.deps):
            return exp
        exp = self._compute_expansion(entry.res, [*stack, entry.url or entry.id])
        with self._lock:
            self._expansions[key] = exp
        return exp

    def _dep_holds(self, dep: Dep) -> bool:
        try:
            entry = self.resolve(dep.resource_type, dep.url, dep.version)
        except NotFound:
            return dep.resolved is None
        return dep.resolved == (entry.id, entry.version_id)

    def _compute_expansion(self, vs: Json, stack: list[str]) -> Expansion:
        """R4 §4.9.5: the union of the includes minus the union of the excludes."""
        deps: list[Dep] = []
        compose = vs.get("compose")
        if not isinstance(compose, dict):
            pre = (vs.get("expansion") or {}).get("contains")
            if pre is None:
                raise Unprocessable("the value set has neither compose nor expansion")
            return Expansion(list(_flatten_contains(pre)), deps)
        chosen: dict[tuple[str, str], Item] = {}
        for inc in compose.get("include") or []:
            for item in self._include(inc, deps, stack):
                chosen.setdefault((item.system, item.code), item)
        for exc in compose.get("exclude") or []:
            for item in self._include(exc, deps, stack):
                chosen.pop((item.system, item.code), None)
        items = list(chosen.values())
        if compose.get("inactive") is False:
            items = [it for it in items if not it.inactive]
        return Expansion(items, deps)

    def _include(self, inc: Json, deps: list[Dep], stack: list[str]) -> list[Item]:
        system = inc.get("system")
        version = inc.get("version")
        selected: list[Item] | None = None
        if system:
            selected = self._include_system(system, version, inc, deps)
        for canonical in inc.get("valueSet") or []:
            url, ver = split_canonical(canonical)
            if url in stack:
                raise Unprocessable(f"value set {url} includes itself ({' → '.join(stack)})")
            try:
                entry = self.resolve("ValueSet", url, ver)
            except NotFound:
                deps.append(Dep("ValueSet", url, ver, None))
                raise
            deps.append(Dep("ValueSet", url, ver, (entry.id, entry.version_id)))
            sub = self._expansion_of(entry, stack)
            deps.extend(sub.deps)
            if selected is None:  # several value sets: their intersection (R4 §4.9.5)
                selected = list(sub.items)
            else:
                selected = [it for it in selected if (it.system, it.code) in sub.where]
        return selected or []

    def _include_system(
        self, system: str, version: str | None, inc: Json, deps: list[Dep]
    ) -> list[Item]:
        enumerated = [c for c in inc.get("concept") or [] if isinstance(c, dict)]
        filters = [f for f in inc.get("filter") or [] if isinstance(f, dict)]
        try:
            entry = self.resolve("CodeSystem", system, version)
        except NotFound:
            deps.append(Dep("CodeSystem", system, version, None))
            if enumerated and not filters:  # expand as written: the hub cannot check them
                return [
                    Item(
                        system,
                        version,
                        str(c.get("code")),
                        c.get("display"),
                        designations=tuple(c.get("designation") or ()),
                    )
                    for c in enumerated
                    if c.get("code")
                ]
            raise
        deps.append(Dep("CodeSystem", system, version, (entry.id, entry.version_id)))
        cs = entry.system()
        if enumerated:
            out: list[Item] = []
            for c in enumerated:
                concept = cs.get(str(c.get("code") or ""))
                if concept is not None:
                    extra = tuple(c.get("designation") or ())
                    out.append(_item(cs, concept, c.get("display"), extra))
                elif not cs.complete and c.get("code"):
                    out.append(Item(system, cs.version, str(c["code"]), c.get("display")))
            return out
        if cs.content == "not-present":
            raise Unprocessable(f"code system {system} is stored without its concepts")
        codes: list[str] = list(cs.concepts)
        for f in filters:
            prop, op, value = f.get("property"), f.get("op"), f.get("value")
            if not (isinstance(prop, str) and isinstance(op, str) and isinstance(value, str)):
                raise Unprocessable("a value set filter needs property, op and value")
            keep = set(cs.filter(prop, op, value))
            codes = [c for c in codes if c in keep]
        return [_item(cs, cs.concepts[c], None, ()) for c in codes]

    # --- $translate ------------------------------------------------------------------------

    def translate(self, params: OpParams, id: str | None = None) -> Json:
        """``ConceptMap/$translate``: the targets a code maps to, with their equivalence."""
        codings = params.codings(system_key="system")
        if not codings or not all(c.get("system") and c.get("code") for c in codings):
            raise InvalidRequest("$translate needs system and code, coding or codeableConcept")
        reverse = params.flag("reverse", False)
        source_vs, target_vs = params.text("source"), params.text("target")
        target_system = params.text("targetsystem")
        if id is not None:
            maps = [self.by_id("ConceptMap", id)]
        elif url := params.text("url"):
            maps = [self.resolve("ConceptMap", url, params.text("conceptMapVersion"))]
        else:
            param = "target-system" if reverse else "source-system"
            found: dict[str, Entry] = {}
            for coding in codings:
                for e in self._candidates("ConceptMap", param, coding["system"]):
                    if e.url not in found or e.latest_key() > found[e.url].latest_key():
                        found[e.url] = e
            maps = [
                found[u]
                for u in sorted(found)
                if _same_canonical(
                    found[u].res.get("sourceUri", found[u].res.get("sourceCanonical")), source_vs
                )
                and _same_canonical(
                    found[u].res.get("targetUri", found[u].res.get("targetCanonical")), target_vs
                )
            ]
        matches: list[Json] = []
        for entry in maps:
            cmap = entry.cmap
            assert cmap is not None
            for coding in codings:
                for system, code, display, eq in _mappings(cmap, coding, reverse):
                    if target_system and system != target_system:
                        continue
                    concept: Json = {"system": system, "code": code}
                    if display:
                        concept["display"] = display
                    matches.append(
                        {
                            "name": "match",
                            "part": [
                                _p("equivalence", valueCode=eq),
                                _p("concept", valueCoding=concept),
                                _p("source", valueUri=cmap.url),
                            ],
                        }
                    )
        ok = any(m["part"][0]["valueCode"] not in _NO_MATCH for m in matches)
        out: list[Json] = [_p("result", valueBoolean=ok)]
        if not ok:
            what = ", ".join(f"{c['system']}|{c['code']}" for c in codings)
            where = f" in {len(maps)} concept map(s)" if maps else "; no concept map covers it"
            out.append(_p("message", valueString=f"no mapping for {what}{where}"))
        out.extend(matches)
        return {"resourceType": "Parameters", "parameter": out}


# --- operation parameters -------------------------------------------------------------------

_EXPAND_ECHO = {
    "filter": "valueString",
    "offset": "valueInteger",
    "count": "valueInteger",
    "activeOnly": "valueBoolean",
    "includeDesignations": "valueBoolean",
    "displayLanguage": "valueCode",
}


class OpParams:
    """An operation's input parameters, from a GET query or a POST ``Parameters`` resource
    (FHIR R4 §3.1.0.7: simple parameters may appear in the URL; complex ones need POST)."""

    def __init__(self, items: Sequence[tuple[str, Any]]) -> None:
        self.items = list(items)

    @classmethod
    def from_query(cls, items: Iterable[tuple[str, str]]) -> OpParams:
        """Parameters from URL query items (``_format`` and ``_pretty`` ignored)."""
        return cls([(k, v) for k, v in items if k not in ("_format", "_pretty")])

    @classmethod
    def from_parameters(cls, body: Any, query: Iterable[tuple[str, str]] = ()) -> OpParams:
        """Parameters from a ``Parameters`` resource, after any given in the URL."""
        if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
            raise InvalidRequest("the body of a POSTed operation must be a Parameters resource")
        items: list[tuple[str, Any]] = list(cls.from_query(query).items)
        for p in body.get("parameter") or []:
            if not isinstance(p, dict) or not isinstance(p.get("name"), str):
                raise InvalidRequest("each Parameters.parameter needs a name")
            if "resource" in p:
                items.append((p["name"], p["resource"]))
                continue
            value = next((v for k, v in p.items() if k.startswith("value")), None)
            if value is not None:
                items.append((p["name"], value))
        return cls(items)

    def get(self, name: str) -> Any:
        """The first value of ``name`` (None when absent)."""
        return next((v for k, v in self.items if k == name), None)

    def text(self, name: str) -> str | None:
        """A string parameter (empty counts as absent)."""
        value = self.get(name)
        if value is None or isinstance(value, str):
            return (value or "").strip() or None
        if isinstance(value, bool | int):
            return str(value).lower()
        raise InvalidRequest(f"parameter {name!r} must be a string")

    def texts(self, name: str) -> list[str]:
        """Every value of a repeating string parameter (comma lists split)."""
        return [
            part.strip()
            for k, v in self.items
            if k == name and isinstance(v, str)
            for part in v.split(",")
            if part.strip()
        ]

    def flag(self, name: str, default: bool) -> bool:
        """A boolean parameter."""
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise InvalidRequest(f"parameter {name!r} must be true or false")

    def integer(self, name: str, default: int | None) -> int | None:
        """A non-negative integer parameter."""
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 10:
            return int(value)
        raise InvalidRequest(f"parameter {name!r} must be a non-negative integer")

    def resource(self, name: str) -> Json | None:
        """A resource parameter (POST only)."""
        value = self.get(name)
        return value if isinstance(value, dict) and "resourceType" in value else None

    def codings(self, *, system_key: str, alt_system_key: str | None = None) -> list[Json]:
        """The codings to work on: ``code`` (+ system, display, version), ``coding`` and every
        coding of ``codeableConcept``."""
        out: list[Json] = []
        code = self.text("code")
        if code:
            system = self.text(system_key) or (
                self.text(alt_system_key) if alt_system_key else None
            )
            out.append({"system": system, "code": code, "display": self.text("display")})
        coding = self.get("coding")
        if isinstance(coding, str):  # GET form: system|code
            system, _, code = coding.rpartition("|")
            coding = {"system": system or None, "code": code}
        if isinstance(coding, dict):
            out.append(coding)
        cc = self.get("codeableConcept")
        if isinstance(cc, dict):
            out.extend(c for c in cc.get("coding") or [] if isinstance(c, dict))
        return [c for c in out if c.get("code")]

    def coding_parts(self, *, system_key: str) -> tuple[str | None, str | None, str | None]:
        """(system, code, version) of the one coding an operation like $lookup takes."""
        codings = self.codings(system_key=system_key)
        if not codings:
            return self.text(system_key), None, self.text("version")
        first = codings[0]
        return first.get("system"), first.get("code"), self.text("version") or first.get("version")

    def echo(self, names: dict[str, str]) -> list[Json]:
        """``expansion.parameter`` entries repeating the request's parameters."""
        out: list[Json] = []
        for name, key in names.items():
            value = self.get(name)
            if value is None:
                continue
            if key == "valueInteger":
                value = self.integer(name, 0)
            elif key == "valueBoolean":
                value = self.flag(name, False)
            out.append({"name": name, key: value})
        return out


# --- helpers for the operations ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of checking one coding."""

    valid: bool
    message: str = ""
    concept: Concept | None = None


def _p(name: str, **value: Any) -> Json:
    return {"name": name, **value}


def _unique(params: list[Json]) -> list[Json]:
    seen: set[str] = set()
    out = []
    for p in params:
        key = orjson.dumps(p).decode()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _same_canonical(value: Any, wanted: str | None) -> bool:
    if not wanted:
        return True
    return isinstance(value, str) and split_canonical(value)[0] == split_canonical(wanted)[0]


def _display_verdict(concept: Concept, display: str | None) -> tuple[bool, str]:
    """Does ``display`` name the concept (its display or any designation, ignoring case)?
    A mismatch is a warning: the code itself is valid."""
    if not display:
        return True, ""
    wanted = normalise(display).strip()
    if any(normalise(n).strip() == wanted for n in concept.names()):
        return True, ""
    expected = f"{concept.display!r}" if concept.display else "no display"
    return (
        False,
        f"the display {display!r} does not match code {concept.code!r} (expected {expected})",
    )


def _display_result(concept: Concept, display: str | None) -> Verdict:
    _ok, message = _display_verdict(concept, display)
    if concept.inactive:
        message = "; ".join(m for m in (message, f"code {concept.code!r} is inactive") if m)
    return Verdict(True, message, concept)


def _check_in_system(cs: CodeSystemIndex, code: str, display: str | None) -> Verdict:
    concept = cs.get(code)
    if concept is None:
        partial = "" if cs.complete else f" (the hub holds a {cs.content} of it)"
        return Verdict(False, f"code {code!r} is not in code system {cs.url}{partial}")
    return _display_result(concept, display)


def _validation_result(results: list[Verdict], language: str | None) -> Json:
    """The ``Parameters`` of $validate-code: result, message, display (R4 §4.8.15)."""
    valid = [r for r in results if r.valid]
    out: list[Json] = [_p("result", valueBoolean=bool(valid))]
    messages = [r.message for r in (valid or results) if r.message]
    if messages:
        out.append(_p("message", valueString="; ".join(dict.fromkeys(messages))))
    concept = next((r.concept for r in valid if r.concept is not None), None)
    if concept is not None:
        shown = concept.display_in(language)
        if shown:
            out.append(_p("display", valueString=shown))
    return {"resourceType": "Parameters", "parameter": out}


def _item(
    cs: CodeSystemIndex, concept: Concept, display: str | None, extra: tuple[Json, ...]
) -> Item:
    return Item(
        cs.url,
        cs.version,
        concept.code,
        display or concept.display,
        concept.inactive,
        concept.abstract,
        (*concept.designations, *extra),
    )


def _flatten_contains(contains: list[Json]) -> Iterator[Item]:
    for c in contains:
        if not isinstance(c, dict):
            continue
        if c.get("code") and c.get("system"):
            yield Item(
                c["system"],
                c.get("version"),
                c["code"],
                c.get("display"),
                bool(c.get("inactive")),
                bool(c.get("abstract")),
                tuple(c.get("designation") or ()),
            )
        yield from _flatten_contains(c.get("contains") or [])


def _text_match(exp: Expansion, order: list[int], text: str) -> list[int]:
    """The ``filter`` parameter: every word of it occurs in the code, display or a designation
    (case-insensitive, ё = е); exact code matches first, then displays that start with it."""
    words = normalise(text).split()
    if not words:
        return order
    texts = exp.texts()
    hits = [i for i in order if all(w in texts[i] for w in words)]
    whole = " ".join(words)

    def rank(i: int) -> int:
        item = exp.items[i]
        if normalise(item.code) == whole:
            return 0
        return 1 if normalise(item.display or "").startswith(whole) else 2

    return sorted(hits, key=rank)


def _contains(item: Item, language: str | None, designations: bool) -> Json:
    out: Json = {"system": item.system}
    if item.version:
        out["version"] = item.version
    if item.abstract:
        out["abstract"] = True
    if item.inactive:
        out["inactive"] = True
    out["code"] = item.code
    display = item.display
    if language:
        concept = Concept(item.code, item.display, None, list(item.designations), [])
        display = concept.display_in(language)
    if display:
        out["display"] = display
    if designations and item.designations:
        out["designation"] = list(item.designations)
    return out


_REVERSE = {
    "wider": "narrower",
    "narrower": "wider",
    "subsumes": "specializes",
    "specializes": "subsumes",
}


def _mappings(
    cmap: ConceptMapIndex, coding: Json, reverse: bool
) -> Iterator[tuple[str, str, str | None, str]]:
    """(system, code, display, equivalence) the coding maps to in one ConceptMap."""
    system, code = coding["system"], coding["code"]
    if reverse:
        for m in cmap.backward.get((system, code), []):
            yield m.source_system, m.source_code, None, _REVERSE.get(m.equivalence, m.equivalence)
        return
    found = cmap.forward.get((system, code))
    if found:
        for m in found:
            if m.target_code:
                yield m.target_system, m.target_code, m.target_display, m.equivalence
        return
    unmapped = cmap.unmapped.get(system)
    if unmapped is None:
        return
    target = unmapped.get("_target") or system
    if unmapped.get("mode") == "provided":  # R4 conceptmap-unmapped-mode: the code as sent
        yield target, code, None, "equal"
    elif unmapped.get("mode") == "fixed" and unmapped.get("code"):
        yield target, unmapped["code"], unmapped.get("display"), "inexact"


# --- one Terminology per store ------------------------------------------------------------------

_instances: weakref.WeakValueDictionary[int, Terminology] = weakref.WeakValueDictionary()
_instances_lock = threading.Lock()


def terminology_for(store: ResourceStore) -> Terminology:
    """The shared :class:`Terminology` of ``store`` (one cache per store while anyone holds
    it; the FHIR router holds it for the app's lifetime)."""
    with _instances_lock:
        term = _instances.get(id(store))
        if term is None or term.store is not store:
            term = Terminology(store)
            _instances[id(store)] = term
        return term


# --- loading dictionaries ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One bad entry of a load file: where (line or entry) and what."""

    source: str
    where: str
    message: str

    def __str__(self) -> str:
        return (
            f"{self.source}:{self.where}: {self.message}"
            if self.where
            else f"{self.source}: {self.message}"
        )


class LoadError(InvalidRequest):
    """Load input with bad entries; nothing was stored. ``problems`` lists every one."""

    def __init__(self, problems: list[Problem]) -> None:
        head = "; ".join(str(p) for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{len(problems)} problem(s), nothing loaded: {head}{more}")
        self.problems = problems


@dataclass(slots=True)
class LoadReport:
    """What a load stored."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.created) + len(self.updated) + len(self.unchanged)


Progress = Callable[[str, int, int | None], None]  # (stage, done, total) — for progress bars


def _no_progress(stage: str, done: int, total: int | None) -> None:
    del stage, done, total


def read_fhir_json(path: Path) -> list[Json]:
    """Terminology resources from a FHIR JSON file: a Bundle (any type) or one resource."""
    source = str(path)
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise LoadError([Problem(source, f"{exc.lineno}", f"not valid JSON: {exc.msg}")]) from None
    except OSError as exc:
        raise LoadError([Problem(source, "", f"cannot read: {exc.strerror}")]) from None
    if not isinstance(data, dict):
        raise LoadError([Problem(source, "", "expected a FHIR resource or Bundle (a JSON object)")])
    resources: list[Any]
    if data.get("resourceType") != "Bundle":
        resources, where = [data], [""]
    else:
        entries = data.get("entry") or []
        resources = [e.get("resource") if isinstance(e, dict) else None for e in entries]
        where = [f"entry[{i}]" for i in range(len(entries))]
    problems = []
    out = []
    for res, w in zip(resources, where, strict=True):
        if not isinstance(res, dict) or res.get("resourceType") not in TYPES:
            rt = res.get("resourceType") if isinstance(res, dict) else None
            problems.append(
                Problem(
                    source,
                    w,
                    f"{rt or 'a non-resource'} is not a CodeSystem, ValueSet or ConceptMap",
                )
            )
            continue
        out.append(res)
    if problems:
        raise LoadError(problems)
    return out


def read_csv(
    path: Path,
    *,
    system: str,
    name: str,
    version: str | None = None,
    title: str | None = None,
    id: str | None = None,
    progress: Progress = _no_progress,
) -> Json:
    """A CodeSystem from a CSV file with the columns ``code,display[,parent][,designation_ru]``
    (a header row naming them is optional; ``designation_<lang>`` for other languages; ``,``
    ``;`` or tab separated; UTF-8). Every bad row is reported with its line number."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadError([Problem(source, "", f"cannot read as UTF-8: {exc}")]) from None
    problems: list[Problem] = []
    if not system or ":" not in system:
        problems.append(Problem(source, "", f"--system must be an absolute URI, not {system!r}"))
    if not name:
        problems.append(Problem(source, "", "--name is required"))
    first = text.split("\n", 1)[0]
    delimiter = max((",", ";", "\t"), key=first.count)
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    columns = ["code", "display", "parent", "designation_ru"]
    total = text.count("\n") or None
    concepts: dict[str, Json] = {}
    lines: dict[str, int] = {}
    parents: dict[str, str] = {}
    header_seen = False
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if not header_seen:
            header_seen = True
            if row[0].strip().lower() == "code":
                columns = [c.strip().lower() for c in row]
                unknown = [
                    c
                    for c in columns
                    if c not in ("code", "display", "parent") and not c.startswith("designation_")
                ]
                if unknown or "display" not in columns:
                    problems.append(
                        Problem(
                            source,
                            str(line),
                            "the header must name code, display[, parent][, designation_ru];"
                            f" got {', '.join(columns)}",
                        )
                    )
                    break
                continue
        if len(row) > len(columns):
            problems.append(
                Problem(source, str(line), f"{len(row)} columns, expected at most {len(columns)}")
            )
            continue
        cells = dict(zip(columns, (c.strip() for c in row), strict=False))
        code, display = cells.get("code", ""), cells.get("display", "")
        if not code:
            problems.append(Problem(source, str(line), "the code is empty"))
            continue
        if not display:
            problems.append(Problem(source, str(line), f"code {code!r} has no display"))
        if code in lines:
            problems.append(Problem(source, str(line), f"code {code!r} repeats line {lines[code]}"))
            continue
        lines[code] = line
        concept: Json = {"code": code, "display": display}
        designations = [
            {"language": col.removeprefix("designation_"), "value": value}
            for col, value in cells.items()
            if col.startswith("designation_") and value
        ]
        if designations:
            concept["designation"] = designations
        if cells.get("parent"):
            parents[code] = cells["parent"]
            concept["property"] = [{"code": "parent", "valueCode": cells["parent"]}]
        concepts[code] = concept
        if line % 1000 == 0:
            progress(f"reading {path.name}", line, total)
    for code, parent in parents.items():
        if parent not in concepts:
            problems.append(
                Problem(
                    source, str(lines[code]), f"parent {parent!r} of {code!r} is not in the file"
                )
            )
            continue
        seen = {code}
        cur: str | None = parent
        while cur is not None and cur in parents:
            if cur in seen:
                problems.append(
                    Problem(source, str(lines[code]), f"code {code!r} is its own ancestor")
                )
                break
            seen.add(cur)
            cur = parents.get(cur)
    if not concepts and not problems:
        problems.append(Problem(source, "", "the file has no codes"))
    progress(f"reading {path.name}", total or 0, total)
    if problems:
        problems.sort(key=lambda p: int(p.where) if p.where.isdigit() else 0)
        raise LoadError(problems)
    res: Json = {"resourceType": "CodeSystem"}
    if id:
        res["id"] = id
    res |= {"url": system, "name": name, "status": "active"}
    if version:
        res["version"] = version
    if title:
        res["title"] = title
    res["content"] = "complete"
    res["count"] = len(concepts)
    if parents:
        res["hierarchyMeaning"] = "is-a"
        res["property"] = [{"code": "parent", "uri": f"{PROPERTY_URI}#parent", "type": "code"}]
    res["concept"] = list(concepts.values())
    return res


def check_resources(
    resources: Sequence[Json], source: str = "", progress: Progress = _no_progress
) -> None:
    """Validate terminology resources (FHIR model plus the invariants the operations rely
    on); raise :class:`LoadError` listing every problem."""
    problems: list[Problem] = []
    for i, res in enumerate(resources):
        rt = res.get("resourceType")
        where = f"{rt}/{res['id']}" if res.get("id") else f"{rt}[{i}]"
        for message in _invariants(res):
            problems.append(Problem(source, where, message))
        try:
            model.validate(dict(res))
        except HieError as exc:
            problems.append(Problem(source, where, exc.message))
        progress("validating", i + 1, len(resources))
    if problems:
        raise LoadError(problems)


def _invariants(res: Json) -> list[str]:
    out = []
    rt = res.get("resourceType")
    if rt not in TYPES:
        return [f"{rt} is not a terminology resource"]
    if res.get("id") is not None and not (isinstance(res["id"], str) and _ID_RX.match(res["id"])):
        out.append(f"{res['id']!r} is not a valid id")
    url = res.get("url")
    if not isinstance(url, str) or ":" not in url:
        out.append("url (an absolute canonical URL) is required")
    if rt == "CodeSystem":
        seen: set[str] = set()
        stack = list(res.get("concept") or [])
        while stack:
            c = stack.pop()
            code = c.get("code") if isinstance(c, dict) else None
            if not isinstance(code, str) or not code:
                out.append("a concept has no code")
                continue
            if code in seen:
                out.append(f"code {code!r} appears more than once (csd-1)")
            seen.add(code)
            stack.extend(c.get("concept") or [])
    elif rt == "ValueSet":
        for part in ("include", "exclude"):
            for inc in (res.get("compose") or {}).get(part) or []:
                if not (inc.get("system") or inc.get("valueSet")):
                    out.append(f"compose.{part} needs a system or a valueSet (vsd-1)")
                if inc.get("concept") and inc.get("filter"):
                    out.append(f"compose.{part} cannot have both concept and filter (vsd-3)")
                if (inc.get("concept") or inc.get("filter")) and not inc.get("system"):
                    out.append(f"compose.{part} with concepts or filters needs a system (vsd-2)")
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "-", text).strip("-.").lower()


def _id_for(tx: WriteTx, res: Json) -> str:
    """The id to store a resource under: its own; else the stored resource with the same url
    and version (re-loading a file updates it); else one made from its name and version."""
    rt = res["resourceType"]
    if res.get("id"):
        return str(res["id"])
    url, version = res["url"], res.get("version")
    conds: list[Any] = [UriCond("url", url)]
    conds.append(
        TokenCond("version", None, version) if version else MissingCond("version", "token", True)
    )
    found = tx.search_ids(Query(rt, conds, count=2))
    if found:
        return found[0][1]
    base = _slug(str(res.get("name") or url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]))
    rid = "-".join(p for p in (base[:40] or rt.lower(), _slug(version or "")[:20]) if p)
    cur = tx.current(rt, rid, for_update=False)
    if cur is not None and not cur.deleted:
        digest = hashlib.sha1(f"{url}|{version or ''}".encode()).hexdigest()[:8]
        rid = f"{rid[:55]}-{digest}"
    return rid


def store_resources(
    svc: FhirService, resources: Sequence[Json], progress: Progress = _no_progress
) -> LoadReport:
    """Store validated terminology resources in one transaction (all or nothing); a resource
    whose stored content is the same is left alone, so loading twice writes nothing new."""
    report = LoadReport()
    when = now_us()
    with svc.store.transaction() as tx:
        for i, original in enumerate(resources):
            res = dict(original)
            rt = res["resourceType"]
            rid = _id_for(tx, res)
            cur = tx.current(rt, rid)
            label = f"{rt}/{rid}"
            if cur is not None and not cur.deleted and _same_content(cur.content, res):
                report.unchanged.append(label)
            else:
                version = cur.version + 1 if cur else 1
                new = svc.prepare(res, rt, rid, version, when, "PUT", validated=True)
                tx.write(new, version, when)
                (report.updated if cur is not None and not cur.deleted else report.created).append(
                    label
                )
            progress("storing", i + 1, len(resources))
    return report


def _same_content(content: bytes | None, res: Json) -> bool:
    if content is None:
        return False
    stored = orjson.loads(content)
    strip = ("meta", "id")
    return {k: v for k, v in stored.items() if k not in strip} == {
        k: v for k, v in res.items() if k not in strip
    }


def load_files(
    svc: FhirService,
    paths: Sequence[Path],
    *,
    csv_system: str | None = None,
    csv_name: str | None = None,
    csv_version: str | None = None,
    csv_title: str | None = None,
    progress: Progress = _no_progress,
) -> LoadReport:
    """Read, validate and store FHIR JSON and CSV files: every problem in every file is
    reported (with line numbers for CSV) and nothing is stored unless all of them are good."""
    problems: list[Problem] = []
    resources: list[tuple[str, Json]] = []
    for path in paths:
        try:
            if path.suffix.lower() == ".csv":
                res = read_csv(
                    path,
                    system=csv_system or "",
                    name=csv_name or "",
                    version=csv_version,
                    title=csv_title,
                    progress=progress,
                )
                resources.append((str(path), res))
            else:
                resources.extend((str(path), r) for r in read_fhir_json(path))
        except LoadError as exc:
            problems.extend(exc.problems)
    for source in dict.fromkeys(s for s, _ in resources):
        try:
            check_resources([r for s, r in resources if s == source], source, progress)
        except LoadError as exc:
            problems.extend(exc.problems)
    if problems:
        raise LoadError(problems)
    return store_resources(svc, [r for _, r in resources], progress)


def builtin_resources() -> list[Json]:
    """The reference data the hub ships (``hie/registries/data/*.json``)."""
    data = importlib_resources.files("hie.registries") / "data"
    out: list[Json] = []
    for name in sorted(p.name for p in data.iterdir() if p.name.endswith(".json")):
        doc = orjson.loads((data / name).read_bytes())
        if doc.get("resourceType") == "Bundle":
            out.extend(e["resource"] for e in doc.get("entry") or [])
        else:
            out.append(doc)
    return out


def load_builtin(svc: FhirService, progress: Progress = _no_progress) -> LoadReport:
    """Load the shipped reference data (idempotent: PUT by id, unchanged ones skipped)."""
    resources = builtin_resources()
    check_resources(resources, "builtin", progress)
    return store_resources(svc, resources, progress)
