"""Query/Retrieve operations on the archive, as the caller may see it: what C-FIND answers,
and what C-MOVE and C-GET send (PS3.4 Annex C), independent of the network.

:class:`QueryRetrieve` runs each operation as the current principal (a DICOM peer acts as
its MO's system, role ``mis``): the access condition (:func:`hie.pacs.access.
visible_studies`) goes into the index query, so a study the caller may not see is neither
found nor sent, and every operation leaves **one** audit record
(:func:`hie.pacs.access.audit_dimse`) naming the patients and studies it touched, its
outcome and the peer — refusals included.

- :meth:`QueryRetrieve.find`: a C-FIND (or any DIMSE query): the record is written *before*
  the matches go out (an audit trail that cannot take it fails the query, nothing is
  disclosed unaudited);
- :meth:`QueryRetrieve.retrieval`: the instances a C-MOVE / C-GET identifier names (its
  unique keys, PS3.4 C.4.2.2.1: Patient ID, Study, Series or SOP Instance UIDs; a list of
  UIDs at the retrieve level) → a :class:`Retrieval`, whose :meth:`~Retrieval.datasets`
  is the sending loop: each instance's Part 10 file read from the blob store as stored
  (transfer syntax as received — never transcoded), cancel checked before each, the
  sub-operation outcome recorded (:meth:`~Retrieval.record`); :meth:`~Retrieval.finish`
  writes the audit record with the counts once the last sub-operation is done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset

from hie.fhir.service import FhirService
from hie.hub.auth import Forbidden, Principal, current_principal
from hie.hub.blobs.port import BlobStore
from hie.hub.errors import HieError
from hie.hub.logging import get_logger
from hie.pacs.access import audit_dimse, visible_studies
from hie.pacs.errors import DicomRefused
from hie.pacs.index import DicomIndex
from hie.pacs.query import (
    UNIQUE,
    DicomQuery,
    InvalidQuery,
    Level,
    Match,
    Page,
    depth,
    search_page,
)

log = get_logger("hie.pacs.retrieve")

MAX_SUB_OPERATIONS = 65535  # the sub-operation counts are US (PS3.7 C.4.2.1.2)
REFUSED_TOO_MANY = 0xA701  # Refused: Out of Resources – unable to calculate number of matches
UNABLE_TO_PROCESS = 0xC000

# AuditEvent.outcome (FHIR R4): success, minor failure, serious failure
SUCCESS, MINOR, SERIOUS = 0, 4, 8


class TooManyInstances(DicomRefused):
    """A retrieve naming more instances than one operation may count (65535)."""

    code = "HIE-1308"
    status = 413
    dimse_status = REFUSED_TOO_MANY
    kind = "query"


def _status_of(err: HieError) -> int:
    return err.dimse_status if isinstance(err, DicomRefused) else UNABLE_TO_PROCESS


@dataclass(slots=True)
class SubOperations:
    """C-STORE sub-operation counts of one retrieve (PS3.4 C.4.2.1.4 / C.4.3.1.3)."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)


class QueryRetrieve:
    """C-FIND, C-MOVE and C-GET over the archive (see the module docstring)."""

    def __init__(self, svc: FhirService, index: DicomIndex, blobs: BlobStore) -> None:
        self.svc = svc
        self.index = index
        self.blobs = blobs

    @property
    def cap(self) -> int:
        """Most matches one query returns (``HIE_DICOM_QUERY_LIMIT``)."""
        return int(self.svc.settings.dicom_query_limit)

    def find(self, q: DicomQuery, *, source: str, detail: str = "") -> Page:
        """The matches of ``q`` the current principal may see, at most :attr:`cap`, audited
        before they are returned. Raises :class:`~hie.pacs.query.InvalidQuery`,
        :class:`~hie.hub.auth.Forbidden` (audited as failures) or
        :class:`~hie.hub.errors.StorageError`."""
        try:
            page = search_page(self.index.engine, q, visible_studies(self.svc), cap=self.cap)
        except (InvalidQuery, Forbidden) as err:
            self.refused("query", err, source, detail)
            raise
        audit_dimse(
            self.svc,
            subtype="query",
            outcome=SUCCESS,
            status=0,
            source=source,
            patients=[m.patient_ref for m in page.matches],
            studies=[m.imaging_study_id for m in page.matches if m.imaging_study_id],
            detail=f"{detail} matches={len(page.matches)}{' (cut)' if page.more else ''}",
        )
        return page

    def retrieval(
        self, level: Level, keys: Mapping[str, str], *, root: str, source: str, detail: str = ""
    ) -> Retrieval:
        """The instances a retrieve identifier names that the current principal may see
        (nothing at all when it may see none of them). Raises
        :class:`~hie.pacs.query.InvalidQuery` (no or a universal unique key at the level),
        :class:`TooManyInstances` or :class:`~hie.hub.auth.Forbidden`, each audited."""
        principal = current_principal.get()
        try:
            wanted = _retrieve_keys(level, keys, root)
            q = DicomQuery(Level.IMAGE, wanted, limit=MAX_SUB_OPERATIONS, root=root)
            page = search_page(self.index.engine, q, visible_studies(self.svc), cap=None)
            if page.more:
                raise TooManyInstances(
                    f"the retrieve names more than {MAX_SUB_OPERATIONS} instances; "
                    "retrieve study by study or series by series"
                )
        except (InvalidQuery, Forbidden, TooManyInstances) as err:
            self.refused("retrieve", err, source, detail)
            raise
        return Retrieval(self, page.matches, principal, source, detail)

    def refused(
        self,
        subtype: str,
        err: HieError,
        source: str,
        detail: str = "",
        *,
        status: int | None = None,
    ) -> None:
        """Audit an operation refused before it touched anything (``status``: the DIMSE
        status answered, when not the error's own)."""
        audit_dimse(
            self.svc,
            subtype=subtype,
            outcome=MINOR,
            status=_status_of(err) if status is None else status,
            source=source,
            reason=f"{err.code} {err.message}",
            detail=detail,
        )


def _retrieve_keys(level: Level, keys: Mapping[str, str], root: str) -> dict[str, str]:
    """The unique keys of a retrieve identifier (PS3.4 C.4.2.2.1: the retrieve level's,
    which may be a list of UIDs, and those above it); other keys are not matched on."""
    if not isinstance(level, Level) or (level is Level.PATIENT and root != "PATIENT"):
        raise InvalidQuery("Query/Retrieve Level (0008,0052) is not valid for this model")
    wanted: dict[str, str] = {}
    for lv in Level:
        if depth(lv) > depth(level) or (lv is Level.PATIENT and root != "PATIENT"):
            continue
        unique = UNIQUE[lv]
        value = str(keys.get(unique) or "").strip("\x00 ")
        if lv is level and (value in ("", "*") or "*" in value or "?" in value):
            raise InvalidQuery(f"a {level.value}-level retrieve needs {unique} (PS3.4 C.4.2.2.1)")
        if value:
            wanted[unique] = value
    if root == "PATIENT" and "PatientID" in wanted and keys.get("IssuerOfPatientID"):
        wanted["IssuerOfPatientID"] = str(keys["IssuerOfPatientID"])
    return wanted


class Retrieval:
    """The instances of one C-MOVE / C-GET and the state of its sub-operations."""

    def __init__(
        self,
        qr: QueryRetrieve,
        matches: list[Match],
        principal: Principal | None,
        source: str,
        detail: str,
    ) -> None:
        self.qr = qr
        self.matches = matches
        self.principal = principal
        self.source = source
        self.detail = detail
        self.counts = SubOperations(remaining=len(matches))
        self.cancelled = False
        self._finished = False

    def __len__(self) -> int:
        return len(self.matches)

    def syntaxes(self) -> dict[str, set[str]]:
        """SOP Class UID → the transfer syntaxes its instances are stored in (what an
        outgoing association must propose)."""
        out: dict[str, set[str]] = {}
        for m in self.matches:
            out.setdefault(m.sop_class_uid or "", set()).add(m.transfer_syntax or "")
        return out

    def datasets(self, cancelled: Callable[[], bool]) -> Iterator[tuple[Match, Dataset | None]]:
        """The sending loop: each instance with its dataset as stored (None when its file
        cannot be read: that sub-operation fails), until done or ``cancelled()``."""
        for m in self.matches:
            if cancelled():
                self.cancelled = True
                return
            yield m, self._read(m)

    def _read(self, m: Match) -> Dataset | None:
        assert m.blob_key is not None
        try:
            ds = dcmread(BytesIO(b"".join(self.qr.blobs.open(m.blob_key))))
        except Exception as exc:  # a lost or damaged file fails its sub-operation only
            log.error("pacs.retrieve_unreadable", error=type(exc).__name__, blob=m.blob_key)
            return None
        return ds

    def record(self, m: Match, category: str) -> None:
        """The outcome of one sub-operation: ``Success``, ``Warning`` or anything else (a
        failure)."""
        c = self.counts
        c.remaining -= 1
        if category == "Success":
            c.completed += 1
        elif category == "Warning":
            c.warning += 1
        else:
            c.failed += 1
            c.failed_uids.append(str(m.attrs["SOPInstanceUID"]))

    def finish(self, status: int) -> None:
        """Write the operation's audit record (once): the patients and studies of the
        instances it named, the DIMSE ``status`` answered and the sub-operation counts."""
        if self._finished:
            return
        self._finished = True
        c = self.counts
        sent = c.completed + c.warning
        outcome = SUCCESS if not c.failed else (SERIOUS if not sent else MINOR)
        audit_dimse(
            self.qr.svc,
            subtype="retrieve",
            outcome=outcome,
            status=status,
            source=self.source,
            patients=[m.patient_ref for m in self.matches],
            studies=[m.imaging_study_id for m in self.matches],
            detail=(
                f"{self.detail} instances={len(self.matches)} completed={c.completed} "
                f"failed={c.failed} warning={c.warning}"
                f"{' cancelled' if self.cancelled else ''}"
            ).strip(),
            principal=self.principal,
        )
