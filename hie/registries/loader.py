"""Bulk load of the facility and practitioner registries (``hie registry load FILE``).

A load file is CSV (one kind of resource per file) or JSON: a FHIR Bundle (any type; entry
requests are ignored), a JSON array of resources, or NDJSON (one resource per line). Every row
is validated before anything is written, and *every* bad row is reported with its line number
and the reason. If any row is bad nothing is loaded, unless ``skip_bad`` is set: then the good
rows are loaded and the bad ones reported as skipped (rows that refer to a skipped row and to
nothing already in the store are skipped too). Loading PUTs each resource by its id in
transaction Bundles of :data:`BATCH` entries; a resource whose content is already stored is
left alone, so re-loading a file writes nothing new (no new versions for mCSD ``_history``
consumers to sync).

CSV files: UTF-8 (with or without BOM; Windows-1251 is accepted as a fallback), delimiter ``,``
``;`` or tab (taken from the header line), one header line, column names case-insensitive.
Unknown columns are an error (a misspelt column must not drop data silently). Columns marked *
are required. ``|`` separates several values in one cell. Booleans: ``true/false``, ``yes/no``,
``1/0``, ``да/нет`` (default true). Dates: ``YYYY-MM-DD`` or ``DD.MM.YYYY``. Reference columns
take the id of the target (``mo-0001``; ``Organization/mo-0001`` is accepted); the target must
be in the same file or already in the hub.

``organizations`` → Organization (id = ``id``, identifier = the ФРМО OID)
    ``id``*, ``frmo_oid``* (``1.2.643.5.1.13.13.12.2.<region>.<n>``), ``name``*, ``short_name``
    (alias), ``kind`` (code of ``https://hie.spb.ru/fhir/CodeSystem/mo-kind``: polyclinic,
    hospital, laboratory, …), ``parent_id`` (Organization.partOf), ``district``, ``city``,
    ``address`` (street and house), ``postal_code``, ``phone``, ``email``, ``active``,
    ``patient_id_system`` (URI of the MO's local patient identifiers, e.g.
    ``urn:oid:1.2.643.5.1.13.13.12.2.78.8111.100``; see :mod:`hie.registries.facility`).
``locations`` → Location
    ``id``*, ``name``*, ``organization_id``* (managingOrganization), ``parent_id`` (Location
    partOf), ``type`` (code, default system HL7 v3 RoleCode, e.g. ``HOSP``, ``OF``),
    ``type_system``, ``status`` (active | suspended | inactive; default active), ``alias``,
    ``district``, ``city``, ``address``, ``postal_code``, ``phone``, ``latitude``, ``longitude``.
``practitioners`` → Practitioner
    ``id``*, ``family``*, ``given``*, ``middle`` (patronymic), ``gender`` (male | female |
    other | unknown), ``birth_date``, ``snils`` (checked), ``phone``, ``email``, ``active``.
``roles`` → PractitionerRole
    ``id``*, ``practitioner_id``*, ``organization_id``*, ``role`` (code of HL7
    ``practitioner-role``, default ``doctor``), ``specialty`` (code of
    ``https://hie.spb.ru/fhir/CodeSystem/medical-specialty``), ``specialty_display``,
    ``location_ids``, ``start``, ``end``, ``phone``, ``email``, ``active``.
``endpoints`` → Endpoint (managingOrganization = ``organization_id``)
    ``id``*, ``organization_id``*, ``connection_type``* (``hl7v2-mllp``, ``dicom-dimse`` or
    another HL7 endpoint-connection-type code), ``address``* (``mllp://host:port``;
    ``dicom://AE_TITLE@host:port`` for dicom-dimse), ``hl7_facility`` (MSH-4; required for
    hl7v2-mllp), ``hl7_applications`` (MSH-3 values the endpoint is limited to), ``ae_title``
    (optional; must agree with the address), ``name``, ``status`` (active | suspended | error |
    off | entered-in-error | test; default active), ``payload_mime_type``.

Checks on every row, CSV or JSON: the id is a valid FHIR id and unique in the file; an
Organization has a well-formed ФРМО OID that no other Organization (in the file or the hub)
has, and its patient identifier system is nobody else's; an active hl7v2-mllp Endpoint's
sending facility and an active dicom-dimse Endpoint's AE title + host are not registered to
another MO; references to Organizations, Locations, Practitioners and Endpoints resolve to the
file or the hub; codes with required bindings are valid; the resource passes FHIR validation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from hie.fhir.service import FhirService
from hie.registries.load_checks import Checker, Progress
from hie.registries.load_rows import (
    KIND_TYPES,
    Kind,
    KindArg,
    LoadFileError,
    Row,
    csv_rows,
    decode,
    detect_format,
    json_rows,
)

__all__ = ["BATCH", "KIND_TYPES", "Kind", "KindArg", "LoadReport", "RowProblem", "load_file"]

# Load order: what is referenced first (within a type, parents before children).
_TYPE_ORDER = {t: i for i, t in enumerate(("Organization", "Location", "Practitioner", "Endpoint",
                                           "PractitionerRole"))}  # fmt: skip
BATCH = 500


# --- the report ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RowProblem:
    """A bad row: its line in the file, the resource id if known, and why it is bad."""

    line: int
    reason: str
    id: str | None = None

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(slots=True)
class LoadReport:
    """What a load found and did."""

    path: str
    format: str = ""
    rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # resource type → rows
    problems: list[RowProblem] = field(default_factory=list)
    fatal: bool = False  # the file as a whole is unusable (nothing could be loaded)
    dry_run: bool = False
    skip_bad: bool = False
    loaded: bool = False  # resources were written (or, for a dry run, would be)
    created: int = 0
    updated: int = 0
    unchanged: int = 0

    @property
    def bad_rows(self) -> int:
        """How many distinct rows are bad."""
        return len({p.line for p in self.problems})

    @property
    def skipped(self) -> list[RowProblem]:
        """The problems of rows left out by ``skip_bad`` (empty unless something loaded)."""
        return self.problems if self.loaded and self.skip_bad else []

    @property
    def exit_code(self) -> int:
        """0 when the load went ahead (bad rows skipped on request), 1 when nothing loaded."""
        if self.fatal or (self.problems and not self.skip_bad):
            return 1
        return 0

    def summary(self) -> str:
        """One line for people."""
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(self.counts.items()))
        head = f"{self.path}: {self.rows} row(s)" + (f" ({kinds})" if kinds else "")
        if not self.loaded:
            if self.problems:
                return f"{head}; {self.bad_rows} bad row(s); nothing loaded"
            return f"{head}; nothing to load"
        verb = "would be" if self.dry_run else "were"
        out = (
            f"{head}; {self.created} {verb} created, {self.updated} updated, "
            f"{self.unchanged} unchanged"
        )
        if self.problems:
            out += f"; {self.bad_rows} bad row(s) skipped"
        return out + (" (dry run: nothing written)" if self.dry_run else "")

    def as_json(self) -> dict[str, Any]:
        """The report as plain JSON (``hie registry load --json``)."""
        return {
            "path": self.path,
            "format": self.format,
            "rows": self.rows,
            "counts": self.counts,
            "bad_rows": self.bad_rows,
            "problems": [{"line": p.line, "id": p.id, "reason": p.reason} for p in self.problems],
            "fatal": self.fatal,
            "dry_run": self.dry_run,
            "skip_bad": self.skip_bad,
            "loaded": self.loaded,
            "created": self.created,
            "updated": self.updated,
            "unchanged": self.unchanged,
        }


# --- loading ------------------------------------------------------------------------------


def _depth(res: dict[str, Any], by_key: dict[tuple[str, str], dict[str, Any]]) -> int:
    depth, seen = 0, set()
    cur: dict[str, Any] | None = res
    while cur is not None:
        ref = (cur.get("partOf") or {}).get("reference")
        if not isinstance(ref, str) or ref in seen or "/" not in ref:
            break
        seen.add(ref)
        rtype, rid = ref.split("/", 1)
        cur = by_key.get((rtype, rid))
        depth += 1
    return depth


def _ordered(rows: list[Row]) -> list[dict[str, Any]]:
    good = [r.resource for r in rows if r.resource is not None and not r.problems]
    by_key = {(str(r["resourceType"]), str(r["id"])): r for r in good}
    return sorted(good, key=lambda r: (_TYPE_ORDER[r["resourceType"]], _depth(r, by_key)))


def _same(stored: bytes | None, res: dict[str, Any]) -> bool:
    if stored is None:
        return False
    old = orjson.loads(stored)
    meta = dict(old.get("meta") or {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    if meta:
        old["meta"] = meta
    else:
        old.pop("meta", None)
    return bool(old == orjson.loads(orjson.dumps(res)))


def _write(
    svc: FhirService,
    resources: list[dict[str, Any]],
    report: LoadReport,
    dry_run: bool,
    progress: Progress | None,
    batch: int,
) -> None:
    base = svc.settings.public_base + "/fhir"
    total = len(resources)
    for i in range(0, total, batch):
        chunk = resources[i : i + batch]
        current = {
            (r.resource_type, r.id): r
            for r in svc.store.read_many([(c["resourceType"], c["id"]) for c in chunk])
        }
        entries = []
        for res in chunk:
            cur = current.get((res["resourceType"], res["id"]))
            if cur is not None and _same(cur.content, res):
                report.unchanged += 1
                continue
            if cur is None:
                report.created += 1
            else:
                report.updated += 1
            url = f"{res['resourceType']}/{res['id']}"
            entries.append({"resource": res, "request": {"method": "PUT", "url": url}})
        if entries and not dry_run:
            svc.transaction(
                {"resourceType": "Bundle", "type": "transaction", "entry": entries}, base
            )
        if progress:
            progress("loading", min(i + batch, total), total)


def load_file(
    svc: FhirService,
    path: str | Path,
    kind: KindArg = "auto",
    skip_bad: bool = False,
    dry_run: bool = False,
    *,
    progress: Progress | None = None,
    batch: int = BATCH,
) -> LoadReport:
    """Validate and load a registry file (see the module docstring); never raises for bad
    content — everything wrong is in the returned :class:`LoadReport`."""
    path = Path(path)
    report = LoadReport(str(path), dry_run=dry_run, skip_bad=skip_bad)
    if kind not in KIND_TYPES and kind != "auto":
        report.fatal = True
        report.problems.append(RowProblem(0, f"unknown kind {kind!r}"))
        return report
    try:
        text = decode(path.read_bytes())
        report.format = detect_format(path, text)
        if report.format == "csv":
            csv_kind, rows = csv_rows(text, kind)
            report.counts[KIND_TYPES[csv_kind]] = len(rows)
        else:
            report.format, rows = json_rows(text, report.format, kind)
    except OSError as exc:
        report.fatal = True
        report.problems.append(RowProblem(0, f"cannot read the file: {exc.strerror or exc}"))
        return report
    except LoadFileError as exc:
        report.fatal = True
        m = re.match(r"line (\d+): (.*)", exc.message, re.DOTALL)
        line, reason = (int(m.group(1)), m.group(2)) if m else (1, exc.message)
        report.problems.append(RowProblem(line, reason))
        return report
    report.rows = len(rows)
    Checker(svc.store, rows).run(progress)
    for row in rows:
        if row.resource is not None and report.format != "csv":
            rtype = str(row.resource.get("resourceType"))
            report.counts[rtype] = report.counts.get(rtype, 0) + 1
        rid = str(row.key[1]) if row.key else None
        report.problems.extend(RowProblem(row.line, p, rid) for p in row.problems)
    if report.problems and not skip_bad:
        return report
    resources = _ordered(rows)
    if not resources:
        return report
    _write(svc, resources, report, dry_run, progress, batch)
    report.loaded = True
    return report
