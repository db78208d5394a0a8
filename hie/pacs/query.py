"""The one query engine over the DICOM index: C-FIND (:mod:`hie.adapters.dicom`) and QIDO-RS
both ask :func:`search`, and C-MOVE / C-GET find what to send through it
(:mod:`hie.pacs.retrieve`).

A :class:`DicomQuery` names a level (PATIENT, STUDY, SERIES, IMAGE) and match keys as DICOM
encodes them; every key becomes a condition **in one SQL statement** over
:mod:`hie.pacs.schema`'s tables, together with the caller's access condition
(:func:`hie.pacs.access.visible_studies`), so limits, offsets and counts never include what
the caller may not see, and no file is ever opened. Matching follows PS3.4 C.2.2.2:

- **universal**: an empty value or a lone ``*`` matches everything (the key is returned);
- **single value**: exact, case-sensitive — except PN, which matches case-insensitively (the
  index keeps an upper-cased copy of Patient's Name);
- **wildcard** (C.2.2.2.4): ``*`` and ``?`` in any value but dates, times, numbers and UIDs;
- **range** (C.2.2.2.5): ``a-b``, ``a-`` and ``-b`` for DA and TM (a bare TM value matches
  the whole precision it gives: ``1015`` is 10:15:00 to 10:15:59.999999); with
  :attr:`DicomQuery.combined_datetime` a date and a time key match together as one date-time
  range (C.2.2.2.5.1, the extended-negotiation option; QIDO's default);
- **list of UIDs** (C.2.2.2.2): ``\\``-separated UIDs; CS keys (Modality, Modalities in
  Study) take ``\\``-separated lists too, matching any (Modalities in Study matches a study
  holding a series of any listed modality).

Sequence matching (C.2.2.2.6) is not supported: no key the archive matches on is a sequence,
and a sequence in an identifier is returned empty (universal). Keys the index does not keep
are ignored for matching (and returned empty by the DICOM adapter), as C.2.2.1.3 allows for
optional keys; a key of a level *below* the query level is an error
(:class:`InvalidQuery`, C.4.1.2.1).

The person behind the images: ``_patient`` (or Issuer of Patient ID :data:`GOLDEN_ISSUER`
with a FHIR Patient id as Patient ID) matches every study of everyone the master patient
index links to that record (``identity_links``), whichever MO sent them.

Broad queries are cut at ``cap`` matches (``HIE_DICOM_QUERY_LIMIT``); :func:`search_page`
says whether more matched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from enum import IntEnum, StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Engine, Select, and_, exists, func, or_, select, true
from sqlalchemy.sql.elements import KeyedColumnElement

from hie.hub.store.schema import identity_links
from hie.pacs import schema as s
from hie.pacs.errors import CANNOT_UNDERSTAND, DATASET_MISMATCH, DicomRefused

P, ST, SE, IN = s.dicom_patients, s.dicom_studies, s.dicom_series, s.dicom_instances

DEFAULT_CAP = 1000  # HIE_DICOM_QUERY_LIMIT's default
GOLDEN_ISSUER = "HIE-MPI"  # Issuer of Patient ID naming the hub's own (FHIR Patient) ids
PATIENT_KEY = "_patient"
ONLINE = "ONLINE"  # Instance Availability (0008,0056)


class Level(StrEnum):
    """Query/Retrieve Level (0008,0052)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class _Depth(IntEnum):
    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


def depth(level: Level) -> int:
    """0 for PATIENT … 3 for IMAGE."""
    return int(_Depth[level.value])


class InvalidQuery(DicomRefused):
    """The identifier does not make a query the archive can answer: a level the information
    model has not, a key below the query level, a missing unique key of a level above
    (C-FIND answers 0xA900 with an Error Comment; QIDO-RS 400)."""

    code = "HIE-1306"
    status = 400
    dimse_status = DATASET_MISMATCH
    kind = "query"


class InvalidMatchValue(InvalidQuery):
    """A match value that is not what its VR allows: a malformed date, time or range, a
    non-numeric number, a malformed UID (C-FIND answers 0xC000; QIDO-RS 400)."""

    code = "HIE-1307"
    dimse_status = CANNOT_UNDERSTAND


@dataclass(frozen=True, slots=True)
class DicomQuery:
    """What to find (see the module docstring).

    ``keys``: DICOM keyword → match value as DICOM encodes it (PS3.4 C.2.2.2); ``_patient``:
    a FHIR Patient id, golden or source. ``fuzzy``: PN keys match case-insensitively any
    name component's prefix (QIDO ``fuzzymatching=true``). ``root``: the information model,
    ``PATIENT`` or ``STUDY``. ``hierarchical``: refuse a query whose unique keys of the
    levels above are not single values (C-FIND's baseline, C.4.1.2.1; QIDO queries are
    relational). ``combined_datetime``: a date and a time key of one level match together.
    ``retrieve_ae_title``: the Retrieve AE Title (0008,0054) returned."""

    level: Level
    keys: Mapping[str, str]
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False
    root: str = "STUDY"
    hierarchical: bool = False
    combined_datetime: bool = False
    retrieve_ae_title: str = "HUB"


@dataclass(frozen=True, slots=True)
class Match:
    """One matching entity: every return key of its level and the levels above, by DICOM
    keyword (values as DICOM encodes them: PN ``Family^Given``, DA ``YYYYMMDD``, multiple
    values ``\\``-separated; counts as ints), and what audit and retrieve need."""

    attrs: dict[str, Any]
    patient_ref: str  # the source Patient (sending MO's record of the person)
    imaging_study_id: str  # "" at PATIENT level
    blob_key: str | None = None  # IMAGE level: the Part 10 file
    size: int | None = None
    transfer_syntax: str | None = None
    sop_class_uid: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """The matches of one query, and whether more matched beyond the limit."""

    matches: list[Match]
    more: bool


# --- the keys the index answers ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Key:
    level: Level
    vr: str
    column: KeyedColumnElement[Any] | None  # matched on (None: return-only or special)


_KEYS: dict[str, _Key] = {
    # patient (PS3.4 C.6.1.1.2; in the Study Root model these are study attributes)
    "PatientID": _Key(Level.PATIENT, "LO", P.c.patient_id),
    "PatientName": _Key(Level.PATIENT, "PN", P.c.name_key),
    "IssuerOfPatientID": _Key(Level.PATIENT, "LO", None),
    "PatientBirthDate": _Key(Level.PATIENT, "DA", P.c.birth_date),
    "PatientSex": _Key(Level.PATIENT, "CS", P.c.sex),
    "NumberOfPatientRelatedStudies": _Key(Level.PATIENT, "IS", None),
    "NumberOfPatientRelatedSeries": _Key(Level.PATIENT, "IS", None),
    "NumberOfPatientRelatedInstances": _Key(Level.PATIENT, "IS", None),
    # study (C.6.1.1.3 / C.6.2.1.2)
    "StudyInstanceUID": _Key(Level.STUDY, "UI", ST.c.study_uid),
    "StudyDate": _Key(Level.STUDY, "DA", ST.c.study_date),
    "StudyTime": _Key(Level.STUDY, "TM", ST.c.study_time),
    "AccessionNumber": _Key(Level.STUDY, "SH", ST.c.accession),
    "StudyID": _Key(Level.STUDY, "SH", ST.c.study_id),
    "StudyDescription": _Key(Level.STUDY, "LO", ST.c.description),
    "ReferringPhysicianName": _Key(Level.STUDY, "PN", ST.c.referring),
    "ModalitiesInStudy": _Key(Level.STUDY, "CS", None),
    "NumberOfStudyRelatedSeries": _Key(Level.STUDY, "IS", None),
    "NumberOfStudyRelatedInstances": _Key(Level.STUDY, "IS", None),
    # series (C.6.1.1.4)
    "SeriesInstanceUID": _Key(Level.SERIES, "UI", SE.c.series_uid),
    "Modality": _Key(Level.SERIES, "CS", SE.c.modality),
    "SeriesNumber": _Key(Level.SERIES, "IS", SE.c.series_number),
    "SeriesDescription": _Key(Level.SERIES, "LO", SE.c.description),
    "BodyPartExamined": _Key(Level.SERIES, "CS", SE.c.body_part),
    "SeriesDate": _Key(Level.SERIES, "DA", SE.c.series_date),
    "SeriesTime": _Key(Level.SERIES, "TM", SE.c.series_time),
    "NumberOfSeriesRelatedInstances": _Key(Level.SERIES, "IS", None),
    # composite object instance (C.6.1.1.5)
    "SOPInstanceUID": _Key(Level.IMAGE, "UI", IN.c.sop_uid),
    "SOPClassUID": _Key(Level.IMAGE, "UI", IN.c.sop_class_uid),
    "InstanceNumber": _Key(Level.IMAGE, "IS", IN.c.instance_number),
    "Rows": _Key(Level.IMAGE, "US", IN.c.n_rows),
    "Columns": _Key(Level.IMAGE, "US", IN.c.n_columns),
    "NumberOfFrames": _Key(Level.IMAGE, "IS", IN.c.n_frames),
    "AvailableTransferSyntaxUID": _Key(Level.IMAGE, "UI", IN.c.transfer_syntax),
}
# Returned at every level, never matched.
ALWAYS = ("RetrieveAETitle", "InstanceAvailability")
UNIQUE = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = re.compile(r"^[0-9]{8}$")
_TIME = re.compile(r"^([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?$")


def keys_of(level: Level) -> list[str]:
    """The keywords the archive matches on and returns at ``level`` (its own and those of
    the levels above), for callers that list them (QIDO's default return keys, tests)."""
    top = depth(level)
    found = [k for k, key in _KEYS.items() if depth(key.level) <= top]
    if level is not Level.PATIENT:  # patient counts exist only at the patient level
        found = [k for k in found if not k.startswith("NumberOfPatientRelated")]
    return [*found, *ALWAYS]


def level_of(keyword: str) -> Level | None:
    """The level a keyword belongs to (None: the index does not keep it)."""
    key = _KEYS.get(keyword)
    return key.level if key else None


# --- matching ------------------------------------------------------------------------------


def _universal(value: str) -> bool:
    return value == "" or value == "*"


def _literal(text: str, sqlite: bool) -> str:
    if sqlite:  # GLOB: '[' opens a character class; a literal one is '[[]'
        return text.replace("[", "[[]")
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _pattern(value: str, sqlite: bool) -> str:
    """A DICOM wildcard value as a GLOB (SQLite: case-sensitive and indexable) or LIKE
    (PostgreSQL, escape ``\\``) pattern."""
    out = []
    for ch in value:
        if ch == "*":
            out.append("*" if sqlite else "%")
        elif ch == "?":
            out.append("?" if sqlite else "_")
        else:
            out.append(_literal(ch, sqlite))
    return "".join(out)


def _like(col: ColumnElement[Any], pattern: str, sqlite: bool) -> ColumnElement[bool]:
    if sqlite:
        return col.op("GLOB")(pattern)
    return col.like(pattern, escape="\\")


def _text(col: ColumnElement[Any], value: str, sqlite: bool) -> ColumnElement[bool]:
    if "*" in value or "?" in value:
        return _like(col, _pattern(value, sqlite), sqlite)
    return col == value


def _uids(keyword: str, value: str) -> list[str]:
    uids = [u.strip("\x00 ") for u in value.split("\\")]
    for u in uids:
        if not u or len(u) > 64 or not _UID.match(u):
            raise InvalidMatchValue(f"{keyword}: not a UID or a list of UIDs")
    return uids


def _date(keyword: str, value: str) -> str:
    if not _DATE.match(value):
        raise InvalidMatchValue(f"{keyword}: a date is YYYYMMDD (PS3.5 6.2, DA)")
    try:
        date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        raise InvalidMatchValue(f"{keyword}: {value} is not a calendar date") from None
    return value


def _time(keyword: str, value: str, upper: bool = False) -> str:
    """A TM value checked; as an upper bound, padded to the end of the precision it gives."""
    m = _TIME.match(value)
    if not m or int(m[1]) > 23 or int(m[2] or 0) > 59 or int(m[3] or 0) > 60:
        raise InvalidMatchValue(f"{keyword}: a time is HHMMSS.FFFFFF (PS3.5 6.2, TM)")
    if not upper:
        return value
    if m[2] is None:
        return value + "5959.999999"
    if m[3] is None:
        return value + "59.999999"
    frac = m[4] or ""
    return value[:6] + "." + frac + "9" * (6 - len(frac))


def _bounds(keyword: str, value: str) -> tuple[str | None, str | None, bool]:
    """``(lower, upper, is_range)`` of a range-capable value."""
    if value.count("-") > 1:
        raise InvalidMatchValue(f"{keyword}: a range is a-b, a- or -b")
    if "-" not in value:
        return value, value, False
    lo, hi = value.split("-")
    if not lo and not hi:
        raise InvalidMatchValue(f"{keyword}: a range needs at least one bound")
    return lo or None, hi or None, True


def _date_range(keyword: str, value: str) -> tuple[str | None, str | None]:
    lo, hi, _ = _bounds(keyword, value)
    lo = _date(keyword, lo) if lo else None
    hi = _date(keyword, hi) if hi else None
    if lo and hi and lo > hi:
        raise InvalidMatchValue(f"{keyword}: the range ends before it starts")
    return lo, hi


def _time_range(keyword: str, value: str) -> tuple[str | None, str | None]:
    lo, hi, _ = _bounds(keyword, value)
    return (_time(keyword, lo) if lo else None, _time(keyword, hi, upper=True) if hi else None)


def _between(col: ColumnElement[Any], lo: str | None, hi: str | None) -> list[ColumnElement[bool]]:
    out = []
    if lo is not None:
        out.append(col >= lo)
    if hi is not None:
        out.append(col <= hi)
    return out


def _datetime(
    dcol: ColumnElement[Any],
    tcol: ColumnElement[Any],
    dates: tuple[str | None, str | None],
    times: tuple[str | None, str | None],
) -> list[ColumnElement[bool]]:
    """Combined date-time range matching (PS3.4 C.2.2.2.5.1): the lower bound is the first
    date at the first time, the upper the last date at the last time."""
    (dlo, dhi), (tlo, thi) = dates, times
    out: list[ColumnElement[bool]] = []
    if dlo is not None:
        if tlo is None:
            out.append(dcol >= dlo)
        else:
            out.append(or_(dcol > dlo, and_(dcol == dlo, tcol >= tlo)))
    elif tlo is not None:
        out.append(tcol >= tlo)
    if dhi is not None:
        if thi is None:
            out.append(dcol <= dhi)
        else:
            out.append(or_(dcol < dhi, and_(dcol == dhi, tcol <= thi)))
    elif thi is not None:
        out.append(tcol <= thi)
    return out


def _number(keyword: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidMatchValue(f"{keyword}: not an integer") from None


def _person_name(
    col: ColumnElement[Any], value: str, fuzzy: bool, sqlite: bool, upper: bool
) -> ColumnElement[bool]:
    """PN matching; ``upper``: the column is the index's name key (case-insensitive)."""
    if upper:
        value = name_key(value)
    if not fuzzy:
        return _text(col, value, sqlite)
    # fuzzy: every word of the value is a prefix of some name component
    conds = []
    for word in re.split(r"[\s^=]+", value):
        if not word:
            continue
        prefix = _pattern(word, sqlite) + ("*" if sqlite else "%")
        anywhere = ("*" if sqlite else "%") + "{}" + prefix
        conds.append(
            or_(
                _like(col, prefix, sqlite),
                *(_like(col, anywhere.format(sep), sqlite) for sep in ("^", " ", "=")),
            )
        )
    return and_(*conds) if conds else true()


def name_key(pn: str) -> str:
    """A PN value (``Family^Given^Middle``, alphabetic group) in the form of the index's
    ``name_key``: the storage service keeps the readable name (components joined by spaces,
    :attr:`hie.pacs.p10.PatientName.text`) upper-cased."""
    alphabetic = pn.split("=", 1)[0]
    return " ".join(p.strip() for p in alphabetic.split("^")).strip().upper()


def person_name(text: str) -> str:
    """The index's readable name back as a PN value (``Family^Given^Middle``)."""
    return "^".join(text.split(" "))


def _modalities(value: str, sqlite: bool) -> ColumnElement[bool]:
    """Modalities in Study (0008,0061): a study holding a series of any listed modality."""
    other = SE.alias("ms")  # not the outer query's series (SERIES and IMAGE levels)
    wanted = [v.strip() for v in value.split("\\") if v.strip()]
    conds = [_text(other.c.modality, v, sqlite) for v in wanted]
    return exists(select(other.c.pk).where(other.c.study_pk == ST.c.pk, or_(*conds)))


def _issuer(value: str, sqlite: bool) -> ColumnElement[bool]:
    """Issuer of Patient ID: as sent, or the identifier system the hub resolved it to."""
    if "*" in value or "?" in value:
        return _text(P.c.issuer, value, sqlite)
    return or_(P.c.issuer == value, P.c.id_system == value, P.c.id_system == f"urn:oid:{value}")


def _person(patient: str) -> ColumnElement[bool]:
    """Every source Patient linked to the identity group of ``patient`` (golden or source)."""
    L1, L2 = identity_links.alias("l1"), identity_links.alias("l2")
    group = select(L1.c.group_id).where(L1.c.rtype == "Patient", L1.c.id == patient)
    members = select(L2.c.id).where(L2.c.rtype == "Patient", L2.c.group_id.in_(group))
    return or_(P.c.patient_ref.in_(members), P.c.patient_ref == patient)


def _conditions(q: DicomQuery, keys: dict[str, str], sqlite: bool) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    if PATIENT_KEY in keys:
        conds.append(_person(keys[PATIENT_KEY]))
    combined: dict[tuple[str, str], tuple[Any, Any]] = {}
    if q.combined_datetime:
        for dkey, tkey in (("StudyDate", "StudyTime"), ("SeriesDate", "SeriesTime")):
            dval, tval = keys.get(dkey, ""), keys.get(tkey, "")
            if not _universal(dval) and not _universal(tval):
                combined[(dkey, tkey)] = (
                    _date_range(dkey, dval),
                    _time_range(tkey, tval),
                )
    for (dkey, tkey), (dates, times) in combined.items():
        dcol, tcol = _KEYS[dkey].column, _KEYS[tkey].column
        assert dcol is not None and tcol is not None
        conds.extend(_datetime(dcol, tcol, dates, times))
    done = {k for pair in combined for k in pair}
    for keyword, value in keys.items():
        key = _KEYS.get(keyword)
        if key is None or keyword in done or _universal(value):
            continue
        col = key.column
        if keyword == "ModalitiesInStudy":
            conds.append(_modalities(value, sqlite))
        elif keyword == "IssuerOfPatientID":
            conds.append(_issuer(value, sqlite))
        elif col is None:
            continue  # a count: returned, never matched
        elif key.vr == "UI":
            uids = _uids(keyword, value)
            conds.append(col == uids[0] if len(uids) == 1 else col.in_(uids))
        elif key.vr == "DA":
            conds.extend(_between(col, *_date_range(keyword, value)))
        elif key.vr == "TM":
            lo, hi, is_range = _bounds(keyword, value)
            if not is_range:  # a bare time: the whole of its precision
                lo, hi = lo, lo
            conds.extend(
                _between(
                    col,
                    _time(keyword, lo) if lo else None,
                    _time(keyword, hi, upper=True) if hi else None,
                )
            )
        elif key.vr in ("IS", "US"):
            conds.append(col == _number(keyword, value))
        elif key.vr == "PN":
            conds.append(_person_name(col, value, q.fuzzy, sqlite, upper=col is P.c.name_key))
        elif key.vr == "CS" and "\\" in value:
            conds.append(or_(*(_text(col, v.strip(), sqlite) for v in value.split("\\"))))
        else:
            conds.append(_text(col, value, sqlite))
    return conds


# --- the query -----------------------------------------------------------------------------


def _clean(q: DicomQuery) -> dict[str, str]:
    """The keys, stripped (PS3.5 6.2: leading and trailing spaces are not significant), with
    a golden Patient ID turned into ``_patient``; checked against the level and model."""
    if q.root not in ("PATIENT", "STUDY"):
        raise InvalidQuery(f"unknown information model {q.root!r}")
    if not isinstance(q.level, Level):
        raise InvalidQuery("Query/Retrieve Level (0008,0052) is not PATIENT/STUDY/SERIES/IMAGE")
    if q.level is Level.PATIENT and q.root != "PATIENT":
        raise InvalidQuery("the Study Root model has no PATIENT level")
    keys = {k: str(v if v is not None else "").strip("\x00 ") for k, v in q.keys.items()}
    if keys.get("IssuerOfPatientID") == GOLDEN_ISSUER:
        pid = keys.pop("PatientID", "")
        del keys["IssuerOfPatientID"]
        if _universal(pid) or "*" in pid or "?" in pid:
            raise InvalidQuery(f"Issuer of Patient ID {GOLDEN_ISSUER} needs one Patient ID")
        keys[PATIENT_KEY] = pid
        keys.setdefault("PatientID", "")
    top = depth(q.level)
    for keyword in keys:
        key = _KEYS.get(keyword)
        if key is not None and depth(key.level) > top:
            raise InvalidQuery(
                f"{keyword} is a {key.level.value}-level key; the query is at "
                f"{q.level.value} level (PS3.4 C.4.1.2.1)"
            )
    if q.hierarchical:
        above = [lv for lv in Level if depth(lv) < top]
        if q.root == "STUDY":
            above = [lv for lv in above if lv is not Level.PATIENT]
        for lv in above:
            unique = UNIQUE[lv]
            value = keys.get(unique, "")
            if lv is Level.PATIENT and PATIENT_KEY in keys:
                continue
            if _universal(value) or any(c in value for c in "*?\\"):
                raise InvalidQuery(
                    f"a {q.level.value}-level query in the {q.root.title()} Root model "
                    f"needs one {unique} (PS3.4 C.4.1.2.1)"
                )
    return keys


def _limits(q: DicomQuery, cap: int | None) -> int | None:
    if q.limit is not None and q.limit < 0 or q.offset < 0:
        raise InvalidQuery("limit and offset must not be negative")
    if cap is None:
        return q.limit
    return min(q.limit, cap) if q.limit is not None else cap


def _statement(
    q: DicomQuery, keys: dict[str, str], visible: ColumnElement[bool] | None, sqlite: bool
) -> Select[Any]:
    conds = _conditions(q, keys, sqlite)
    if visible is not None:
        conds.append(visible)
    patient_cols = [
        P.c.pk.label("p_pk"),
        P.c.patient_ref,
        P.c.patient_id,
        P.c.issuer,
        P.c.id_system,
        P.c.patient_name,
        P.c.birth_date,
        P.c.sex,
    ]
    if q.level is Level.PATIENT:
        # a patient is visible through its visible studies, and counts only those
        return (
            select(
                *patient_cols,
                func.count(ST.c.pk).label("n_studies"),
                func.sum(ST.c.num_series).label("n_series"),
                func.sum(ST.c.num_instances).label("n_instances"),
            )
            .select_from(P.join(ST, ST.c.patient_pk == P.c.pk))
            .where(*conds)
            .group_by(*patient_cols)
            .order_by(P.c.pk)
        )
    study_cols = [
        ST.c.pk.label("st_pk"),
        ST.c.study_uid,
        ST.c.study_date,
        ST.c.study_time,
        ST.c.accession,
        ST.c.study_id,
        ST.c.description.label("study_description"),
        ST.c.referring,
        ST.c.modalities,
        ST.c.num_series,
        ST.c.num_instances.label("study_instances"),
        ST.c.imaging_study_id,
    ]
    joined = ST.join(P, P.c.pk == ST.c.patient_pk)
    if q.level is Level.STUDY:
        return (
            select(*patient_cols, *study_cols).select_from(joined).where(*conds).order_by(ST.c.pk)
        )
    series_cols = [
        SE.c.pk.label("se_pk"),
        SE.c.series_uid,
        SE.c.modality,
        SE.c.series_number,
        SE.c.description.label("series_description"),
        SE.c.body_part,
        SE.c.series_date,
        SE.c.series_time,
        SE.c.num_instances.label("series_instances"),
    ]
    joined = SE.join(ST, ST.c.pk == SE.c.study_pk).join(P, P.c.pk == ST.c.patient_pk)
    if q.level is Level.SERIES:
        return (
            select(*patient_cols, *study_cols, *series_cols)
            .select_from(joined)
            .where(*conds)
            .order_by(SE.c.pk)
        )
    instance_cols = [
        IN.c.sop_uid,
        IN.c.sop_class_uid,
        IN.c.instance_number,
        IN.c.n_rows,
        IN.c.n_columns,
        IN.c.n_frames,
        IN.c.transfer_syntax,
        IN.c.blob_key,
        IN.c.size,
    ]
    joined = IN.join(SE, SE.c.pk == IN.c.series_pk).join(ST, ST.c.pk == SE.c.study_pk)
    joined = joined.join(P, P.c.pk == ST.c.patient_pk)
    return (
        select(*patient_cols, *study_cols, *series_cols, *instance_cols)
        .select_from(joined)
        .where(*conds)
        .order_by(SE.c.pk, IN.c.instance_number, IN.c.pk)
    )


def issuer_of(issuer: str, id_system: str) -> str:
    """Issuer of Patient ID as returned: as sent, else the OID of the identifier system the
    number was filed under (so two MOs' equal numbers stay apart at the workstation)."""
    if issuer:
        return issuer
    bare = id_system.removeprefix("urn:oid:")
    return bare if len(bare) <= 64 and _UID.match(bare) else ""


def _match(q: DicomQuery, row: Any) -> Match:
    a: dict[str, Any] = {
        "PatientID": row.patient_id,
        "IssuerOfPatientID": issuer_of(row.issuer, row.id_system),
        "PatientName": person_name(row.patient_name),
        "PatientBirthDate": row.birth_date,
        "PatientSex": row.sex,
        "RetrieveAETitle": q.retrieve_ae_title,
        "InstanceAvailability": ONLINE,
    }
    if q.level is Level.PATIENT:
        a["NumberOfPatientRelatedStudies"] = int(row.n_studies or 0)
        a["NumberOfPatientRelatedSeries"] = int(row.n_series or 0)
        a["NumberOfPatientRelatedInstances"] = int(row.n_instances or 0)
        return Match(a, row.patient_ref, "")
    a |= {
        "StudyInstanceUID": row.study_uid,
        "StudyDate": row.study_date,
        "StudyTime": row.study_time,
        "AccessionNumber": row.accession,
        "StudyID": row.study_id,
        "StudyDescription": row.study_description,
        "ReferringPhysicianName": row.referring,
        "ModalitiesInStudy": row.modalities,
        "NumberOfStudyRelatedSeries": int(row.num_series),
        "NumberOfStudyRelatedInstances": int(row.study_instances),
    }
    if q.level is Level.STUDY:
        return Match(a, row.patient_ref, row.imaging_study_id)
    a |= {
        "SeriesInstanceUID": row.series_uid,
        "Modality": row.modality,
        "SeriesNumber": row.series_number,
        "SeriesDescription": row.series_description,
        "BodyPartExamined": row.body_part,
        "SeriesDate": row.series_date,
        "SeriesTime": row.series_time,
        "NumberOfSeriesRelatedInstances": int(row.series_instances),
    }
    if q.level is Level.SERIES:
        return Match(a, row.patient_ref, row.imaging_study_id)
    a |= {
        "SOPInstanceUID": row.sop_uid,
        "SOPClassUID": row.sop_class_uid,
        "InstanceNumber": row.instance_number,
        "Rows": row.n_rows,
        "Columns": row.n_columns,
        "NumberOfFrames": row.n_frames,
        "AvailableTransferSyntaxUID": row.transfer_syntax,
    }
    return Match(
        a,
        row.patient_ref,
        row.imaging_study_id,
        blob_key=row.blob_key,
        size=int(row.size),
        transfer_syntax=row.transfer_syntax,
        sop_class_uid=row.sop_class_uid,
    )


def compile_query(
    engine: Engine,
    q: DicomQuery,
    visible: ColumnElement[bool] | None,
    *,
    cap: int | None = DEFAULT_CAP,
) -> Select[Any]:
    """The SQL statement of a query (one row beyond the limit, to tell whether more
    matched); raises :class:`InvalidQuery`. For :func:`search_page` and query plans."""
    keys = _clean(q)
    limit = _limits(q, cap)
    stmt = _statement(q, keys, visible, engine.dialect.name == "sqlite")
    if limit is not None:
        stmt = stmt.limit(limit + 1)
    if q.offset:
        stmt = stmt.offset(q.offset)
    return stmt


def search_page(
    engine: Engine,
    q: DicomQuery,
    visible: ColumnElement[bool] | None,
    *,
    cap: int | None = DEFAULT_CAP,
) -> Page:
    """The matches of ``q`` the caller may see (``visible``: a condition on
    ``dicom_studies``, None for all), at most ``min(q.limit, cap)`` of them from
    ``q.offset`` on (``cap`` None: no bound — retrieve only), and whether more matched."""
    stmt = compile_query(engine, q, visible, cap=cap)
    limit = _limits(q, cap)
    if limit == 0:
        return Page([], False)
    with engine.connect() as conn, conn.begin():
        rows = conn.execute(stmt).all()
    more = limit is not None and len(rows) > limit
    return Page([_match(q, r) for r in rows[:limit]], more)


def search(
    engine: Engine,
    q: DicomQuery,
    visible: ColumnElement[bool] | None,
    *,
    cap: int | None = DEFAULT_CAP,
) -> list[Match]:
    """The matches of ``q`` the caller may see (see :func:`search_page`)."""
    return search_page(engine, q, visible, cap=cap).matches
