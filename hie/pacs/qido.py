"""QIDO-RS without HTTP (PS3.18 10.6): query parameters → a :class:`~hie.pacs.query.DicomQuery`,
and the matches → the DICOM JSON each result shows.

Parameters (PS3.18 8.3.4):

- ``{attribute}={value}`` — the attribute by keyword (``PatientID``) or tag (``00100020``),
  the value a DICOM match string (single value, ``*``/``?`` wildcards, ``a-b`` date and time
  ranges, PS3.4 C.2.2.2); UIDs and code strings may list several values separated by commas
  or backslashes (UID list matching), or repeat the parameter;
- ``includefield`` — more attributes to return (keywords or tags, repeated or comma-separated),
  or ``all``;
- ``fuzzymatching=true`` — person names match any name component's prefix, ignoring case;
- ``limit``, ``offset`` — a page of the results (``limit`` at most ``HIE_DICOM_QUERY_LIMIT``,
  which is also its default);
- ``patient={FHIR Patient id}`` — the hub's extension: every study of that person, whichever
  MO sent it (the golden record or any MO's source record, through the master patient index).

Attributes the index does not keep (:func:`hie.pacs.query.level_of`) cannot be matched: they
are ignored, and named in a ``Warning`` (PS3.18 8.3.4.1 allows it). Each result carries the
level's default attributes (PS3.18 Tables 10.6.3-3 to -5; those of the levels above when the
query spans them: all series, all instances), the match keys, the included fields, and its
``RetrieveURL``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hie.hub.errors import InvalidRequest
from hie.pacs.dicom_json import Json, attributes, element, keyword_of, parse_tag_or_keyword
from hie.pacs.query import PATIENT_KEY, DicomQuery, Level, Match, depth, level_of

CHARSET = "ISO_IR 192"  # DICOM JSON is UTF-8 (PS3.18 F.2)
CONTROL = frozenset({"includefield", "fuzzymatching", "limit", "offset", "patient"})
LIST_VRS_KEYS = frozenset(
    {
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "Modality",
        "ModalitiesInStudy",
        "PatientSex",
        "BodyPartExamined",
    }
)

# PS3.18 Table 10.6.3-3 (study), 10.6.3-4 (series), 10.6.3-5 (instance): what each result
# carries by default (RetrieveURL is added per result)
DEFAULTS: dict[Level, tuple[str, ...]] = {
    Level.STUDY: (
        "SpecificCharacterSet",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "InstanceAvailability",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    Level.SERIES: (
        "SpecificCharacterSet",
        "Modality",
        "SeriesDescription",
        "SeriesInstanceUID",
        "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
    ),
    Level.IMAGE: (
        "SpecificCharacterSet",
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceAvailability",
        "InstanceNumber",
        "Rows",
        "Columns",
        "NumberOfFrames",
    ),
}


@dataclass(frozen=True, slots=True)
class Qido:
    """A parsed QIDO-RS request: the index query, what to return, what was ignored."""

    query: DicomQuery
    returned: frozenset[str] | None  # keywords to return; None: everything the index has
    ignored: tuple[str, ...] = ()  # attributes given that the index cannot match on
    path_keys: dict[str, str] = field(default_factory=dict)


def parse(
    level: Level,
    params: Sequence[tuple[str, str]],
    *,
    cap: int,
    path: dict[str, str] | None = None,
    top: Level = Level.STUDY,
) -> Qido:
    """The query a request asks (module docstring). ``path``: the UIDs of the resource
    path (``/studies/{uid}/series``); ``top``: the highest level the results span (their
    default attributes are returned too). :class:`InvalidRequest` (400) for malformed
    parameters; malformed match values are the query engine's (400 too)."""
    keys: dict[str, str] = dict(path or {})
    include: set[str] = set()
    include_all = False
    fuzzy = False
    limit: int | None = None
    offset = 0
    ignored: list[str] = []
    for name, value in params:
        if name == "includefield":
            for item in (v.strip() for v in value.split(",")):
                if item == "all":
                    include_all = True
                elif item:
                    include.add(_keyword(item))
        elif name == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise InvalidRequest("fuzzymatching is true or false")
            fuzzy = value.lower() == "true"
        elif name == "limit":
            limit = _count("limit", value)
        elif name == "offset":
            offset = _count("offset", value)
        elif name == "patient":
            if not value.strip():
                raise InvalidRequest("patient names a FHIR Patient id")
            keys[PATIENT_KEY] = value.strip()
        else:
            if "." in name:  # a sequence path (PS3.18 8.3.4.1): no sequence is matched
                ignored.append(name)
                continue
            keyword = _keyword(name)
            if level_of(keyword) is None:
                ignored.append(keyword)
                continue
            if keyword in path_or_empty(path):
                if value not in ("", path_or_empty(path)[keyword]):
                    raise InvalidRequest(f"{keyword} is given by the path and differs")
                continue
            value = value.strip()
            if keyword in LIST_VRS_KEYS:
                value = value.replace(",", "\\")
            if keyword in keys:
                if keyword not in LIST_VRS_KEYS:
                    raise InvalidRequest(f"{keyword} is given more than once")
                value = "\\".join(v for v in (keys[keyword], value) if v)
            keys[keyword] = value
    cap_limit = cap if limit is None else min(limit, cap)
    query = DicomQuery(
        level,
        keys,
        limit=cap_limit,
        offset=offset,
        fuzzy=fuzzy,
        combined_datetime=True,
    )
    returned: frozenset[str] | None = None
    if not include_all:
        wanted = {k for lv in Level if _spans(lv, top, level) for k in DEFAULTS.get(lv, ())}
        wanted |= {k for k in keys if not k.startswith("_")} | include
        returned = frozenset(wanted)
    return Qido(query, returned, tuple(dict.fromkeys(ignored)), dict(path or {}))


def path_or_empty(path: dict[str, str] | None) -> dict[str, str]:
    """The path's UIDs (none: empty)."""
    return path or {}


def _spans(lv: Level, top: Level, level: Level) -> bool:
    return depth(top) <= depth(lv) <= depth(level)


def _keyword(text: str) -> str:
    tag = parse_tag_or_keyword(text)
    word = keyword_of(tag) if tag is not None else None
    if word is None:
        raise InvalidRequest(f"{text!r} is not a DICOM attribute keyword or tag")
    return word


def _count(name: str, value: str) -> int:
    if not value.strip().isdigit():
        raise InvalidRequest(f"{name} is a non-negative integer")
    return int(value)


def result(q: Qido, m: Match, base: str) -> Json:
    """One match as the DICOM JSON result the request asked for."""
    a = m.attrs
    level = q.query.level
    attrs: dict[str, Any] = {"SpecificCharacterSet": CHARSET, **a}
    if q.returned is not None:
        attrs = {k: v for k, v in attrs.items() if k in q.returned}
    out = attributes(attrs)
    url = f"{base}/studies/{a['StudyInstanceUID']}"
    if depth(level) >= depth(Level.SERIES):
        url += f"/series/{a['SeriesInstanceUID']}"
    if level is Level.IMAGE:
        url += f"/instances/{a['SOPInstanceUID']}"
    out.update(element("RetrieveURL", url))
    return dict(sorted(out.items()))


def warnings(q: Qido, more: bool) -> list[str]:
    """``Warning`` header values (PS3.18 8.3.4.1, 8.3.4.4)."""
    out = []
    if q.ignored:
        names = ", ".join(q.ignored)
        out.append(f'299 hie: "The following attributes are not supported for matching: {names}"')
    if more:
        out.append('299 hie: "There are additional results that can be requested"')
    return out


def patients_and_studies(matches: Iterable[Match]) -> tuple[list[str], list[str]]:
    """The source Patients and ImagingStudy ids of a page of results (for the audit)."""
    ms = list(matches)
    return [m.patient_ref for m in ms], [m.imaging_study_id for m in ms]
