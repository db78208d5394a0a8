"""Reading registry load files into numbered rows (see :mod:`hie.registries.loader`).

CSV, JSON (a Bundle, an array of resources, one resource) and NDJSON become :class:`Row` objects,
each with the line it starts on and either the resource built from it or why it could not be
built. CSV rows are turned into FHIR resources here, one builder per kind; the column spec is
:data:`COLUMNS` and is documented in :mod:`hie.registries.loader`.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

from hie.registries.facility import (
    DICOM_AE_TITLE_SYSTEM,
    DICOM_DIMSE,
    ENDPOINT_PAYLOAD_TYPE_SYSTEM,
    FRMO_SYSTEM,
    HIE_CONNECTION_TYPE_SYSTEM,
    HL7_APPLICATION_SYSTEM,
    HL7_CONNECTION_TYPE_SYSTEM,
    HL7_CONNECTION_TYPES,
    HL7_FACILITY_SYSTEM,
    HL7V2_MLLP,
    MEDICAL_SPECIALTY_SYSTEM,
    MO_KIND_SYSTEM,
    ORGANIZATION_TYPE_SYSTEM,
    PRACTITIONER_ROLE_SYSTEM,
    bare_oid,
    parse_dicom_address,
    patient_id_system_identifier,
)
from hie.registries.identifiers import SNILS_SYSTEM, format_snils, snils_is_valid

Kind = Literal["organizations", "locations", "practitioners", "roles", "endpoints"]
KindArg = Literal["organizations", "locations", "practitioners", "roles", "endpoints", "auto"]
KIND_TYPES: dict[str, str] = {
    "organizations": "Organization",
    "locations": "Location",
    "practitioners": "Practitioner",
    "roles": "PractitionerRole",
    "endpoints": "Endpoint",
}
REGISTRY_TYPES = tuple(KIND_TYPES.values())
ID_RX = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR R4 §2.24.0.1 "id"
_CODE_RX = re.compile(r"^[^\s]+( [^\s]+)*$")  # FHIR R4 datatype "code"
V3_ROLE_CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"

# CSV columns per kind: name → required.
COLUMNS: dict[str, dict[str, bool]] = {
    "organizations": dict.fromkeys(
        ("short_name", "kind", "parent_id", "district", "city", "address", "postal_code",
         "phone", "email", "active", "patient_id_system"), False
    ) | {"id": True, "frmo_oid": True, "name": True},
    "locations": dict.fromkeys(
        ("parent_id", "type", "type_system", "status", "alias", "district", "city", "address",
         "postal_code", "phone", "latitude", "longitude"), False
    ) | {"id": True, "name": True, "organization_id": True},
    "practitioners": dict.fromkeys(
        ("middle", "gender", "birth_date", "snils", "phone", "email", "active"), False
    ) | {"id": True, "family": True, "given": True},
    "roles": dict.fromkeys(
        ("role", "specialty", "specialty_display", "location_ids", "start", "end", "phone",
         "email", "active"), False
    ) | {"id": True, "practitioner_id": True, "organization_id": True},
    "endpoints": dict.fromkeys(
        ("name", "status", "hl7_facility", "hl7_applications", "ae_title", "payload_mime_type"),
        False,
    ) | {"id": True, "organization_id": True, "connection_type": True, "address": True},
}  # fmt: skip


class LoadFileError(Exception):
    """The load file cannot be used at all (not CSV/JSON, bad header, unknown kind)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(slots=True)
class Row:
    """One row of a load file: the line it starts on, the resource built from it (None if it
    could not be built) and every problem found with it."""

    line: int
    resource: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str] | None:
        """``(resourceType, id)`` of the row's resource, when it has one."""
        if self.resource is None or not isinstance(self.resource.get("id"), str):
            return None
        return str(self.resource.get("resourceType")), str(self.resource["id"])


class _RowError(Exception):
    """A row-level problem found while reading or building (the row is bad, the file is not)."""


# --- reading files ------------------------------------------------------------------------


def decode(data: bytes) -> str:
    """The file's text: UTF-8 (a BOM is dropped), else Windows-1251."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Excel's "CSV" in a Russian Windows locale writes Windows-1251
        return data.decode("cp1251")


def detect_format(path: Path, text: str) -> str:
    """``csv``, ``json`` or ``ndjson``, from the file name, else from the first character."""
    suffix = path.suffix.lower()
    if suffix in (".ndjson", ".jsonl"):
        return "ndjson"
    if suffix == ".json":
        return "json"
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    head = text.lstrip()[:1]
    return "json" if head in ("{", "[") else "csv"


def _line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _array_elements(
    text: str, i: int, dec: json.JSONDecoder
) -> Iterator[tuple[int, Any]]:  # text[i] == "["
    i = _skip_ws(text, i + 1)
    if text[i] == "]":
        return
    while True:
        start = i
        value, i = dec.raw_decode(text, i)
        yield start, value
        i = _skip_ws(text, i)
        if text[i] == "]":
            return
        i = _skip_ws(text, i + 1)  # the comma


def _entry_positions(text: str, i: int, dec: json.JSONDecoder) -> list[tuple[int, Any]]:
    """(offset, entry) of a Bundle's ``entry`` array; ``text[i]`` opens the Bundle object."""
    i = _skip_ws(text, i + 1)
    out: list[tuple[int, Any]] = []
    while i < len(text) and text[i] != "}":
        key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # the colon
        if key == "entry" and text[i] == "[":
            out = list(_array_elements(text, i, dec))
        _, i = dec.raw_decode(text, i)
        i = _skip_ws(text, i)
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
    return out


def read_json(text: str, fmt: str) -> tuple[str, list[tuple[int, Any]]]:
    """(format, [(line, resource or problem string)]) of a JSON or NDJSON file."""
    dec = json.JSONDecoder()
    if fmt == "json":
        start = _skip_ws(text, 0)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data" and text[start : start + 1] == "{":
                fmt = "ndjson"  # several objects one after another: NDJSON
            else:
                raise LoadFileError(
                    f"line {exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})"
                ) from None
        else:
            if isinstance(doc, list):
                return "json", [
                    (_line_at(text, p), v) for p, v in _array_elements(text, start, dec)
                ]
            if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
                rows: list[tuple[int, Any]] = []
                for pos, entry in _entry_positions(text, start, dec):
                    line = _line_at(text, pos)
                    if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
                        rows.append((line, "the Bundle entry has no resource"))
                    elif str((entry.get("request") or {}).get("method", "PUT")).upper() not in (
                        "PUT",
                        "POST",
                    ):
                        rows.append((line, "only resources are loaded (entry request is not PUT)"))
                    else:
                        rows.append((line, entry["resource"]))
                return "json", rows
            if isinstance(doc, dict):
                return "json", [(_line_at(text, start), doc)]
            raise LoadFileError("the JSON file holds neither a resource, an array nor a Bundle")
    rows = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((n, json.loads(raw)))
        except json.JSONDecodeError as exc:
            rows.append((n, f"not valid JSON: {exc.msg} (column {exc.colno})"))
    return "ndjson", rows


def _normalise_column(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def read_csv(text: str) -> tuple[list[str], list[tuple[int, dict[str, str] | str]]]:
    """(columns, [(line, {column: value} or a problem)]) of a CSV file."""
    first = text.split("\n", 1)[0]
    delimiter = max((",", ";", "\t"), key=first.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise LoadFileError("the file is empty") from None
    except csv.Error as exc:
        raise LoadFileError(f"line 1: the header is not valid CSV: {exc}") from None
    columns = [_normalise_column(c) for c in header]
    rows: list[tuple[int, dict[str, str] | str]] = []
    line = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            rows.append((line, f"not valid CSV: {exc}"))
            line = reader.line_num + 1
            continue
        start, line = line, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(columns):
            rows.append(
                (start, f"the row has {len(cells)} values but the header has {len(columns)}")
            )
            continue
        rows.append((start, {c: v.strip() for c, v in zip(columns, cells, strict=True)}))
    return columns, rows


def _csv_kind(columns: list[str]) -> str:
    cols = set(columns)
    for kind, marker in (
        ("endpoints", "connection_type"),
        ("roles", "practitioner_id"),
        ("organizations", "frmo_oid"),
        ("practitioners", "family"),
    ):
        if marker in cols:
            return kind
    if "organization_id" in cols and "name" in cols:
        return "locations"
    raise LoadFileError(
        "cannot tell which kind of registry file this is from its columns; pass --kind"
    )


# --- building resources from CSV rows -----------------------------------------------------


def _many(value: str) -> list[str]:
    return [v.strip() for v in value.split("|") if v.strip()]


def _bool(value: str, column: str) -> bool:
    v = value.strip().lower()
    if v in ("", "true", "yes", "y", "1", "да", "д"):
        return True
    if v in ("false", "no", "n", "0", "нет", "н"):
        return False
    raise _RowError(f"column {column!r}: {value!r} is not true/false")


def _date(value: str, column: str) -> str:
    v = value.strip()
    m = re.fullmatch(r"(\d{1,2})\.(\d{1,2})\.(\d{4})", v)
    if m:
        v = f"{m.group(3)}-{int(m.group(2)):02d}-{int(m.group(1)):02d}"
    try:
        parsed = date.fromisoformat(v)
    except ValueError:
        raise _RowError(
            f"column {column!r}: {value!r} is not a date (YYYY-MM-DD or DD.MM.YYYY)"
        ) from None
    return parsed.isoformat()


def _ref_id(value: str, rtype: str, column: str) -> str:
    v = value.strip()
    if v.startswith(rtype + "/"):
        v = v[len(rtype) + 1 :]
    if not ID_RX.match(v):
        raise _RowError(f"column {column!r}: {value!r} is not a valid {rtype} id")
    return v


def _code(value: str, column: str) -> str:
    if not _CODE_RX.match(value):
        raise _RowError(f"column {column!r}: {value!r} is not a code")
    return value


def _telecom(row: dict[str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for system, column in (("phone", "phone"), ("email", "email")):
        for v in _many(row.get(column, "")):
            if system == "email" and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", v):
                raise _RowError(f"column 'email': {v!r} is not an e-mail address")
            out.append({"system": system, "value": v, "use": "work"})
    return out


def _address(row: dict[str, str]) -> list[dict[str, Any]]:
    parts = {k: row.get(k, "") for k in ("address", "district", "city", "postal_code")}
    if not any(parts.values()):
        return []
    addr: dict[str, Any] = {"use": "work", "type": "physical"}
    if parts["address"]:
        addr["line"] = [parts["address"]]
    if parts["city"]:
        addr["city"] = parts["city"]
    if parts["district"]:
        addr["district"] = parts["district"]
    if parts["postal_code"]:
        if not re.fullmatch(r"\d{6}", parts["postal_code"]):
            raise _RowError(f"column 'postal_code': {parts['postal_code']!r} is not 6 digits")
        addr["postalCode"] = parts["postal_code"]
    city = f"г. {parts['city']}" if parts["city"] else ""
    addr["text"] = ", ".join(x for x in (parts["postal_code"], city, parts["address"]) if x)
    addr["country"] = "RU"
    return [addr]


def _organization(row: dict[str, str]) -> dict[str, Any]:
    oid = bare_oid(row["frmo_oid"])
    idents: list[dict[str, Any]] = [{"use": "official", "system": FRMO_SYSTEM, "value": oid}]
    if row.get("patient_id_system"):
        idents.append(patient_id_system_identifier(row["patient_id_system"]))
    coding = [
        {"system": ORGANIZATION_TYPE_SYSTEM, "code": "prov", "display": "Healthcare Provider"}
    ]
    if row.get("kind"):
        coding.append({"system": MO_KIND_SYSTEM, "code": _code(row["kind"], "kind")})
    org: dict[str, Any] = {
        "resourceType": "Organization",
        "id": row["id"],
        "identifier": idents,
        "active": _bool(row.get("active", ""), "active"),
        "type": [{"coding": coding}],
        "name": row["name"],
    }
    if row.get("short_name"):
        org["alias"] = _many(row["short_name"])
    if telecom := _telecom(row):
        org["telecom"] = telecom
    if address := _address(row):
        org["address"] = address
    if row.get("parent_id"):
        org["partOf"] = {
            "reference": f"Organization/{_ref_id(row['parent_id'], 'Organization', 'parent_id')}"
        }
    return org


def _float(value: str, column: str, lo: float, hi: float) -> float:
    try:
        v = float(value.replace(",", "."))
    except ValueError:
        raise _RowError(f"column {column!r}: {value!r} is not a number") from None
    if not lo <= v <= hi:
        raise _RowError(f"column {column!r}: {value} is outside {lo}..{hi}")
    return v


def _location(row: dict[str, str]) -> dict[str, Any]:
    loc: dict[str, Any] = {
        "resourceType": "Location",
        "id": row["id"],
        "status": row.get("status") or "active",
        "mode": "instance",
        "name": row["name"],
        "managingOrganization": {
            "reference": "Organization/"
            + _ref_id(row["organization_id"], "Organization", "organization_id")
        },
    }
    if row.get("alias"):
        loc["alias"] = _many(row["alias"])
    if row.get("type"):
        loc["type"] = [
            {
                "coding": [
                    {
                        "system": row.get("type_system") or V3_ROLE_CODE_SYSTEM,
                        "code": _code(row["type"], "type"),
                    }
                ]
            }
        ]
    if telecom := _telecom(row):
        loc["telecom"] = telecom
    if address := _address(row):
        loc["address"] = address[0]
    lat, lon = row.get("latitude", ""), row.get("longitude", "")
    if bool(lat) != bool(lon):
        raise _RowError("latitude and longitude go together: give both or neither")
    if lat:
        loc["position"] = {
            "latitude": _float(lat, "latitude", -90, 90),
            "longitude": _float(lon, "longitude", -180, 180),
        }
    if row.get("parent_id"):
        loc["partOf"] = {
            "reference": f"Location/{_ref_id(row['parent_id'], 'Location', 'parent_id')}"
        }
    return loc


def _practitioner(row: dict[str, str]) -> dict[str, Any]:
    given = [row["given"], *([row["middle"]] if row.get("middle") else [])]
    pr: dict[str, Any] = {
        "resourceType": "Practitioner",
        "id": row["id"],
        "active": _bool(row.get("active", ""), "active"),
        "name": [
            {
                "use": "official",
                "text": " ".join([row["family"], *given]),
                "family": row["family"],
                "given": given,
            }
        ],
    }
    if row.get("snils"):
        if not snils_is_valid(row["snils"]):
            raise _RowError(
                f"column 'snils': {row['snils']!r} is not a valid SNILS (11 digits with a correct "
                "check number)"
            )
        digits = re.sub(r"[\s-]", "", row["snils"])
        pr["identifier"] = [
            {"use": "official", "type": {"text": "СНИЛС"}, "system": SNILS_SYSTEM,
             "value": format_snils(digits)}
        ]  # fmt: skip
    if telecom := _telecom(row):
        pr["telecom"] = telecom
    if row.get("gender"):
        pr["gender"] = row["gender"].lower()
    if row.get("birth_date"):
        born = _date(row["birth_date"], "birth_date")
        if not "1900-01-01" <= born <= datetime.now().date().isoformat():
            raise _RowError(
                f"column 'birth_date': {row['birth_date']!r} is not a possible birth date"
            )
        pr["birthDate"] = born
    return pr


def _role(row: dict[str, str]) -> dict[str, Any]:
    role_code = row.get("role") or "doctor"
    role: dict[str, Any] = {
        "resourceType": "PractitionerRole",
        "id": row["id"],
        "active": _bool(row.get("active", ""), "active"),
        "practitioner": {
            "reference": "Practitioner/"
            + _ref_id(row["practitioner_id"], "Practitioner", "practitioner_id")
        },
        "organization": {
            "reference": "Organization/"
            + _ref_id(row["organization_id"], "Organization", "organization_id")
        },
        "code": [
            {"coding": [{"system": PRACTITIONER_ROLE_SYSTEM, "code": _code(role_code, "role")}]}
        ],
    }
    if row.get("specialty"):
        coding: dict[str, Any] = {
            "system": MEDICAL_SPECIALTY_SYSTEM,
            "code": _code(row["specialty"], "specialty"),
        }
        concept: dict[str, Any] = {"coding": [coding]}
        if row.get("specialty_display"):
            coding["display"] = concept["text"] = row["specialty_display"]
        role["specialty"] = [concept]
    if row.get("location_ids"):
        role["location"] = [
            {"reference": f"Location/{_ref_id(v, 'Location', 'location_ids')}"}
            for v in _many(row["location_ids"])
        ]
    period: dict[str, str] = {}
    if row.get("start"):
        period["start"] = _date(row["start"], "start")
    if row.get("end"):
        period["end"] = _date(row["end"], "end")
    if period.get("start") and period.get("end") and period["end"] < period["start"]:
        raise _RowError("column 'end' is before 'start'")
    if period:
        role["period"] = period
    if telecom := _telecom(row):
        role["telecom"] = telecom
    return role


def _endpoint(row: dict[str, str]) -> dict[str, Any]:
    ctype = row["connection_type"]
    if ctype != DICOM_DIMSE and ctype not in HL7_CONNECTION_TYPES:
        raise _RowError(
            f"column 'connection_type': {ctype!r} is not dicom-dimse or an HL7 "
            "endpoint-connection-type code (hl7v2-mllp, hl7-fhir-rest, dicom-wado-rs, …)"
        )
    system = HIE_CONNECTION_TYPE_SYSTEM if ctype == DICOM_DIMSE else HL7_CONNECTION_TYPE_SYSTEM
    idents: list[dict[str, Any]] = []
    mime = _many(row.get("payload_mime_type", ""))
    if ctype == HL7V2_MLLP:
        facilities = _many(row.get("hl7_facility", ""))
        if not facilities:
            raise _RowError("column 'hl7_facility' (MSH-4) is required for hl7v2-mllp endpoints")
        idents += [{"system": HL7_FACILITY_SYSTEM, "value": f} for f in facilities]
        idents += [
            {"system": HL7_APPLICATION_SYSTEM, "value": a}
            for a in _many(row.get("hl7_applications", ""))
        ]
        mime = mime or ["x-application/hl7-v2+er7"]
    elif row.get("hl7_facility") or row.get("hl7_applications"):
        raise _RowError("hl7_facility and hl7_applications apply only to hl7v2-mllp endpoints")
    if ctype == DICOM_DIMSE:
        try:
            ae = parse_dicom_address(row["address"]).ae_title
        except ValueError as exc:
            raise _RowError(f"column 'address': {exc}") from None
        if row.get("ae_title") and row["ae_title"].strip() != ae:
            raise _RowError(
                f"column 'ae_title' {row['ae_title']!r} differs from the address's {ae!r}"
            )
        idents.append({"system": DICOM_AE_TITLE_SYSTEM, "value": ae})
        mime = mime or ["application/dicom"]
    elif row.get("ae_title"):
        raise _RowError("ae_title applies only to dicom-dimse endpoints")
    ep: dict[str, Any] = {
        "resourceType": "Endpoint",
        "id": row["id"],
        "status": row.get("status") or "active",
        "connectionType": {"system": system, "code": ctype},
        "managingOrganization": {
            "reference": "Organization/"
            + _ref_id(row["organization_id"], "Organization", "organization_id")
        },
        "payloadType": [
            {"coding": [{"system": ENDPOINT_PAYLOAD_TYPE_SYSTEM, "code": "any", "display": "Any"}]}
        ],
        "address": row["address"],
    }
    if idents:
        ep["identifier"] = idents
    if row.get("name"):
        ep["name"] = row["name"]
    if mime:
        ep["payloadMimeType"] = mime
    return ep


_BUILDERS: dict[str, Callable[[dict[str, str]], dict[str, Any]]] = {
    "organizations": _organization,
    "locations": _location,
    "practitioners": _practitioner,
    "roles": _role,
    "endpoints": _endpoint,
}


def csv_rows(text: str, kind: KindArg) -> tuple[str, list[Row]]:
    """(kind, rows) of a CSV file, each row built into a resource of that kind; raises
    :class:`LoadFileError` for a header that does not fit the kind."""
    columns, raw = read_csv(text)
    real_kind = _csv_kind(columns) if kind == "auto" else kind
    spec = COLUMNS[real_kind]
    seen: set[str] = set()
    for c in columns:
        if c in seen:
            raise LoadFileError(f"line 1: column {c!r} appears twice")
        seen.add(c)
    unknown = [c for c in columns if c not in spec]
    missing = [c for c, req in spec.items() if req and c not in seen]
    problems = []
    if missing:
        problems.append("missing required column(s): " + ", ".join(repr(c) for c in missing))
    if unknown:
        problems.append(
            "unknown column(s): "
            + ", ".join(repr(c) for c in unknown)
            + f" (a {real_kind} file has: {', '.join(spec)})"
        )
    if problems:
        raise LoadFileError("line 1: " + "; ".join(problems))
    rows: list[Row] = []
    for line, cells in raw:
        row = Row(line)
        rows.append(row)
        if isinstance(cells, str):
            row.problems.append(cells)
            continue
        empty = [c for c, req in spec.items() if req and not cells.get(c)]
        if empty:
            row.problems.append("required value(s) missing: " + ", ".join(repr(c) for c in empty))
            continue
        try:
            row.resource = _BUILDERS[real_kind](cells)
        except _RowError as exc:
            row.problems.append(str(exc))
    return real_kind, rows


def json_rows(text: str, fmt: str, kind: KindArg) -> tuple[str, list[Row]]:
    """(format, rows) of a JSON or NDJSON file; with a ``kind``, every resource must be of its
    type. ``meta.versionId``/``lastUpdated`` of exported resources are dropped."""
    fmt, raw = read_json(text, fmt)
    want = None if kind == "auto" else KIND_TYPES[kind]
    rows: list[Row] = []
    for line, res in raw:
        row = Row(line)
        rows.append(row)
        if isinstance(res, str):
            row.problems.append(res)
            continue
        if not isinstance(res, dict):
            row.problems.append("not a JSON object (a FHIR resource)")
            continue
        rtype = res.get("resourceType")
        if want is not None and rtype != want:
            row.problems.append(f"resourceType {rtype!r} in a {kind} load (expected {want})")
            continue
        if rtype not in REGISTRY_TYPES:
            row.problems.append(
                f"resourceType {rtype!r} is not a registry resource ({', '.join(REGISTRY_TYPES)})"
            )
            continue
        res = copy.deepcopy(res)
        meta = res.get("meta")
        if isinstance(meta, dict):  # the hub stamps these; keep tags and profiles
            meta.pop("versionId", None)
            meta.pop("lastUpdated", None)
            if not meta:
                res.pop("meta")
        row.resource = res
    return fmt, rows
