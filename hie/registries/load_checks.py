"""Checks on the rows of a registry load file, alone and against each other and the hub.

Every problem is appended to its row (see :mod:`hie.registries.loader` for the list of checks);
nothing here writes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson

from hie.fhir import model
from hie.fhir.search import parse_search
from hie.hub.errors import HieError
from hie.hub.store.port import ResourceStore
from hie.registries.facility import (
    DICOM_AE_TITLE_SYSTEM,
    DICOM_DIMSE,
    FRMO_SYSTEM,
    HIE_CONNECTION_TYPE_SYSTEM,
    HL7_APPLICATION_SYSTEM,
    HL7_CONNECTION_TYPE_SYSTEM,
    HL7V2_MLLP,
    PATIENT_ID_SYSTEM_SYSTEM,
    connection_code,
    frmo_oid_of,
    frmo_oid_problem,
    identifier_values,
    parse_dicom_address,
)
from hie.registries.load_rows import ID_RX, REGISTRY_TYPES, Row

Progress = Callable[[str, int, int], None]  # (phase, done, total)
CHECK_BATCH = 500

_URI_RX = re.compile(
    r"^(urn:oid:[0-2](\.(0|[1-9][0-9]*))+|urn:uuid:[0-9a-fA-F-]{36}|https?://\S+)$"
)
_STATUS_CODES: dict[str, frozenset[str]] = {
    "Endpoint": frozenset({"active", "suspended", "error", "off", "entered-in-error", "test"}),
    "Location": frozenset({"active", "suspended", "inactive"}),
}
_GENDERS = frozenset({"male", "female", "other", "unknown"})


# --- checking ----------------------------------------------------------------------------


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            elif isinstance(value, dict | list):
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def registry_refs(res: dict[str, Any]) -> list[tuple[str, str]]:
    """Relative references of ``res`` to Organizations, Locations, Practitioners, roles and
    Endpoints, as ``(type, id)``."""
    out = []
    for ref in _refs(res):
        parts = ref.split("/")
        if len(parts) == 2 and parts[0] in REGISTRY_TYPES and parts[1]:
            out.append((parts[0], parts[1]))
    return out


def _search_ids(store: ResourceStore, rtype: str, items: list[tuple[str, str]]) -> list[str]:
    q = parse_search(rtype, items, default_count=50, max_count=50).query
    return [r.id for r in store.search(q).items]


def _search_all(
    store: ResourceStore, rtype: str, items: list[tuple[str, str]]
) -> list[dict[str, Any]]:
    q = parse_search(rtype, items, default_count=1000, max_count=1000).query
    out: list[dict[str, Any]] = []
    while True:
        page = store.search(q)
        out.extend(orjson.loads(r.content or b"{}") for r in page.items)
        if page.next_after is None:
            return out
        q.after = page.next_after


def _esc(value: str) -> str:
    for ch in ("\\", ",", "|", "$"):
        value = value.replace(ch, "\\" + ch)
    return value


def _hl7_facilities(ep: dict[str, Any]) -> tuple[str, ...]:
    return tuple(
        str(i["value"]).strip()
        for i in ep.get("identifier") or []
        if isinstance(i, dict)
        and isinstance(i.get("value"), str)
        and i.get("system") not in (HL7_APPLICATION_SYSTEM, DICOM_AE_TITLE_SYSTEM)
    )


def _org_of(res: dict[str, Any]) -> str | None:
    ref = (res.get("managingOrganization") or {}).get("reference")
    if isinstance(ref, str) and ref.startswith("Organization/"):
        return ref.split("/", 1)[1]
    return None


def _dicom_key(ep: dict[str, Any]) -> tuple[str, str] | None:
    try:
        addr = parse_dicom_address(str(ep.get("address") or ""))
    except ValueError:
        return None
    return addr.ae_title, (addr.host or "").lower()


class Checker:
    """Every check on the built rows of one file, against each other and the store."""

    def __init__(self, store: ResourceStore, rows: list[Row]) -> None:
        self.store = store
        self.rows = rows
        self._dicom: list[dict[str, Any]] | None = None
        self.by_key: dict[tuple[str, str], list[Row]] = defaultdict(list)
        for row in rows:
            if row.key is not None:
                self.by_key[row.key].append(row)

    def run(self, progress: Progress | None) -> None:
        """Run every check, appending problems to the rows."""
        total = len(self.rows)
        for n, row in enumerate(self.rows, start=1):
            if row.resource is not None and not row.problems:
                self._check_one(row)
            if progress and (n % 100 == 0 or n == total):
                progress("validating", n, total)
        self._duplicates()
        self._cycles()
        self._unique_registrations()
        self._references()

    # one row at a time: shape, codes, FHIR validation
    def _check_one(self, row: Row) -> None:
        res = row.resource
        assert res is not None
        rtype = res["resourceType"]
        rid = res.get("id")
        if not isinstance(rid, str) or not ID_RX.match(rid):
            row.problems.append(
                f"{rtype} id {rid!r} is missing or not a valid FHIR id (1-64 of A-Z a-z 0-9 - .); "
                "registry loads PUT every resource by its id"
            )
            return
        status = res.get("status")
        if rtype in _STATUS_CODES and status not in _STATUS_CODES[rtype]:
            row.problems.append(
                f"{rtype}.status {status!r} is not one of {', '.join(sorted(_STATUS_CODES[rtype]))}"
            )
        if rtype == "Practitioner" and "gender" in res and res["gender"] not in _GENDERS:
            row.problems.append(
                f"gender {res['gender']!r} is not one of {', '.join(sorted(_GENDERS))}"
            )
        if rtype == "Organization":
            self._check_org(row, res)
        elif rtype == "Endpoint":
            self._check_endpoint(row, res)
        elif rtype == "PractitionerRole":
            for element in ("practitioner", "organization"):
                if not (res.get(element) or {}).get("reference"):
                    row.problems.append(f"PractitionerRole.{element} is required by the registry")
        parent = (res.get("partOf") or {}).get("reference")
        if parent == f"{rtype}/{rid}":
            row.problems.append(f"{rtype}/{rid} is its own parent (partOf)")
        try:
            model.validate(res)
        except HieError as exc:
            row.problems.append(f"invalid FHIR {rtype}: {exc.message}")

    @staticmethod
    def _check_org(row: Row, res: dict[str, Any]) -> None:
        oids = [
            str(i.get("value") or "")
            for i in res.get("identifier") or []
            if isinstance(i, dict) and i.get("system") == FRMO_SYSTEM
        ]
        if not oids:
            row.problems.append(
                f"the Organization has no ФРМО OID identifier (system {FRMO_SYSTEM})"
            )
        for oid in oids:
            problem = frmo_oid_problem(oid)
            if problem:
                row.problems.append(problem)
        if len(oids) > 1:
            row.problems.append("the Organization has more than one ФРМО OID")
        for system in identifier_values(res, PATIENT_ID_SYSTEM_SYSTEM):
            if not _URI_RX.match(system):
                row.problems.append(
                    f"patient identifier system {system!r} is not a URI "
                    "(urn:oid:…, urn:uuid:… or http(s)://…)"
                )

    @staticmethod
    def _check_endpoint(row: Row, res: dict[str, Any]) -> None:
        ctype = connection_code(res)
        if _org_of(res) is None:
            row.problems.append("Endpoint.managingOrganization (the MO it belongs to) is required")
        if ctype == DICOM_DIMSE:
            try:
                parse_dicom_address(str(res.get("address") or ""))
            except ValueError as exc:
                row.problems.append(str(exc))
        elif ctype == HL7V2_MLLP and not _hl7_facilities(res):
            row.problems.append(
                "an hl7v2-mllp Endpoint needs its HL7 sending facility (MSH-4) as an identifier"
            )

    @staticmethod
    def _add(row: Row, msg: str) -> None:
        if msg not in row.problems:
            row.problems.append(msg)

    @staticmethod
    def _also(rows: Iterable[Row], row: Row) -> str:
        lines = sorted({r.line for r in rows if r is not row})
        return "also on line " + ", ".join(str(n) for n in lines)

    def _duplicates(self) -> None:
        for (rtype, rid), rows in self.by_key.items():
            if len(rows) > 1:
                for row in rows:
                    self._add(
                        row, f"duplicate {rtype} id {rid!r} in the file ({self._also(rows, row)})"
                    )

    def _cycles(self) -> None:
        """A partOf chain (Organization or Location) that comes back to where it started."""
        for row in self.rows:
            if row.key is None or row.resource is None:
                continue
            path = [row.key]
            cur: dict[str, Any] | None = row.resource
            while cur is not None:
                ref = (cur.get("partOf") or {}).get("reference")
                if not isinstance(ref, str) or ref.count("/") != 1:
                    break
                rtype, rid = ref.split("/")
                key = (rtype, rid)
                if key == row.key and len(path) > 1:
                    chain = " → ".join(f"{t}/{i}" for t, i in [*path, key])
                    self._add(row, f"partOf goes round in a circle: {chain}")
                    break
                if key in path:
                    break
                path.append(key)
                targets = self.by_key.get(key)
                cur = targets[0].resource if targets else None

    def _claims(self) -> dict[tuple[str, ...], list[tuple[Row, str]]]:
        """Registrations that must belong to one MO: what → [(row, owning organisation id)]."""
        claims: dict[tuple[str, ...], list[tuple[Row, str]]] = defaultdict(list)
        for row in self.rows:
            res = row.resource
            if res is None or row.key is None:
                continue
            rtype, rid = row.key
            if rtype == "Organization":
                oid = frmo_oid_of(res)
                if oid:
                    claims[("ФРМО OID", oid)].append((row, rid))
                for system in identifier_values(res, PATIENT_ID_SYSTEM_SYSTEM):
                    claims[("patient identifier system", system)].append((row, rid))
            elif rtype == "Endpoint" and res.get("status") == "active":
                org = _org_of(res) or ""
                if connection_code(res) == HL7V2_MLLP:
                    for facility in _hl7_facilities(res):
                        claims[("HL7 sending facility", facility)].append((row, org))
                elif connection_code(res) == DICOM_DIMSE and (key := _dicom_key(res)):
                    claims[("DICOM AE title", *key)].append((row, org))
        return claims

    def _unique_registrations(self) -> None:
        for what, owners in self._claims().items():
            orgs = {org for _, org in owners}
            label = f"{what[0]} {what[1]!r}" + (f" at host {what[2]!r}" if what[2:] else "")
            rows = [r for r, _ in owners]
            if len(orgs) > 1:
                for row in rows:
                    self._add(
                        row,
                        f"{label} is claimed by more than one organisation in the file "
                        f"({self._also(rows, row)})",
                    )
                continue
            taken = self._taken_in_store(what, next(iter(orgs)), rows)
            if taken:
                for row in rows:
                    self._add(row, f"{label} {taken}")

    def _taken_in_store(self, what: tuple[str, ...], org: str, rows: list[Row]) -> str | None:
        """Why the registration ``what`` of ``org`` clashes with the store, or None."""
        kind = what[0]
        if kind in ("ФРМО OID", "patient identifier system"):
            system = FRMO_SYSTEM if kind == "ФРМО OID" else PATIENT_ID_SYSTEM_SYSTEM
            for oid in _search_ids(
                self.store, "Organization", [("identifier", f"{system}|{_esc(what[1])}")]
            ):
                if oid != org and not self._file_moves_away(("Organization", oid), what):
                    return f"is already registered to Organization/{oid}"
            return None
        if kind == "HL7 sending facility":
            ctype = f"{HL7_CONNECTION_TYPE_SYSTEM}|{HL7V2_MLLP}"
            items = [
                ("identifier", _esc(what[1])),
                ("connection-type", ctype),
                ("status", "active"),
            ]
            stored = _search_all(self.store, "Endpoint", items)
        else:
            stored = self._stored_dicom()
        mine = {r.key for r in rows}
        for ep in stored:
            ep_id = str(ep.get("id"))
            if ("Endpoint", ep_id) in mine:
                continue
            if kind == "HL7 sending facility" and what[1] not in _hl7_facilities(ep):
                continue
            if kind == "DICOM AE title" and _dicom_key(ep) != (what[1], what[2]):
                continue
            owner = _org_of(ep)
            if owner != org and not self._file_moves_away(("Endpoint", ep_id), what):
                return f"is already registered to Organization/{owner} (Endpoint/{ep_id})"
        return None

    def _stored_dicom(self) -> list[dict[str, Any]]:
        """Every active dicom-dimse Endpoint in the store (read once per file)."""
        if self._dicom is None:
            ctype = f"{HIE_CONNECTION_TYPE_SYSTEM}|{DICOM_DIMSE}"
            items = [("connection-type", ctype), ("status", "active")]
            self._dicom = _search_all(self.store, "Endpoint", items)
        return self._dicom

    def _file_moves_away(self, key: tuple[str, str], what: tuple[str, ...]) -> bool:
        """True if the file replaces stored ``key`` with a version that no longer claims
        ``what`` (e.g. an OID moved from one organisation to another in the same load)."""
        rows = self.by_key.get(key)
        if not rows or rows[0].resource is None:
            return False
        res = rows[0].resource
        if what[0] == "ФРМО OID":
            return frmo_oid_of(res) != what[1]
        if what[0] == "patient identifier system":
            return what[1] not in identifier_values(res, PATIENT_ID_SYSTEM_SYSTEM)
        if res.get("status") != "active":
            return True
        if what[0] == "HL7 sending facility":
            return what[1] not in _hl7_facilities(res)
        return _dicom_key(res) != (what[1], what[2])

    def _references(self) -> None:
        wanted: set[tuple[str, str]] = set()
        for row in self.rows:
            if row.resource is not None:
                wanted.update(registry_refs(row.resource))
        outside = sorted(k for k in wanted if k not in self.by_key)
        in_store: set[tuple[str, str]] = set()
        for i in range(0, len(outside), CHECK_BATCH):
            found = self.store.read_many(outside[i : i + CHECK_BATCH])
            in_store.update((r.resource_type, r.id) for r in found if not r.deleted)
        # a reference is good if the target is stored, or is a good row of the file; a bad
        # row makes the rows that depend on it bad too, until nothing changes
        changed = True
        while changed:
            changed = False
            for row in self.rows:
                if row.resource is None or row.problems:
                    continue
                for key in registry_refs(row.resource):
                    if key in in_store:
                        continue
                    targets = self.by_key.get(key)
                    if not targets:
                        row.problems.append(
                            f"refers to {key[0]}/{key[1]}, which is neither in the file nor in "
                            "the hub"
                        )
                    elif any(t.problems for t in targets):
                        lines = ", ".join(str(t.line) for t in targets)
                        row.problems.append(
                            f"refers to {key[0]}/{key[1]} (line {lines}), which is bad and not "
                            "in the hub"
                        )
                    else:
                        continue
                    changed = True
                    break
