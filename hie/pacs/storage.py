"""Storing one DICOM instance: the operation the C-STORE SCP (and later STOW-RS) calls.

:meth:`StorageService.store` takes a dataset as received from a registered MO and either
returns once the instance is durable or raises a :class:`~hie.pacs.errors.DicomRefused`
naming the DIMSE status to answer. The stages, in order:

1. **parse** — the encoding is walked (a truncated or malformed dataset is refused, 0xC000),
   the File Meta Information written in front of it (:mod:`hie.pacs.p10`), and the filing
   attributes read: Study, Series and SOP Instance UID, Patient ID, and the SOP Class and
   Instance UID must agree with the C-STORE request (else 0xA900);
2. **idempotency** — an instance already stored under this SOP Instance UID with the same
   bytes is a success that changes nothing; with different bytes it is a conflict (the first
   is kept; the second is refused and kept in the rejected-message store);
3. **identity** — the Patient ID is placed in an identifier system
   (:mod:`hie.pacs.patients`) so two MOs' equal numbers stay two people;
4. **persist** — the Part 10 file goes to the blob store (content-addressed, synced to disk,
   or by one synced write to the store's write-ahead journal, :mod:`hie.hub.blobs.journal`);
   then, in **one transaction** as the sending MO: its source Patient (found by its number,
   or created and matched to the golden record by the master patient index), the index rows
   (patient, study, series, instance) and, when the instance starts a study or a series, the
   study's ImagingStudy. Success is returned only after that commit. An instance of a known
   series marks the study stale instead; :meth:`StorageService.refresh_summaries` rewrites
   its ImagingStudy's counts shortly after.

A blob stored for a transaction that then fails is left behind unreferenced (harmless:
content-addressed, and a later retry of the same bytes reuses it); an index row never points
at a blob that is not durable. Every refusal is kept in the rejected-message store with the
bytes as received (``hie messages list``), and stored from there once its cause is fixed
(:mod:`hie.pacs.replay`, ``hie messages replay``).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson

from hie.fhir.service import MPI_SYSTEM, FhirService, lock_criteria, new_id
from hie.hub.auth import acting_as
from hie.hub.blobs.journal import BlobJournal
from hie.hub.blobs.port import BlobInfo, BlobStore
from hie.hub.errors import HieError, InvalidResource, StorageError, VersionConflict
from hie.hub.logging import get_logger
from hie.hub.outbox import Poller
from hie.hub.rejected import RejectedStore
from hie.hub.store.port import TokenCond, WriteTx
from hie.hub.store.sql import now_us
from hie.lab_exchange.service import mo_principal
from hie.pacs.errors import (
    ArchiveUnavailable,
    DicomRefused,
    InstanceConflict,
    InstanceMismatch,
    PatientUnresolved,
)
from hie.pacs.imaging_study import (
    ENDPOINT_ID,
    StudySummary,
    dicomweb_endpoint,
    imaging_study,
    with_counts,
)
from hie.pacs.index import DicomIndex, IndexTx, InstanceRow, StudyRow, connection_of
from hie.pacs.p10 import Header, file_meta, instance_header
from hie.pacs.patients import DicomPatient, IssuerResolver, patient_resource
from hie.registries.senders import RegisteredMo, SenderRegistry

log = get_logger("hie.pacs.storage")

Json = dict[str, Any]
_NOT_GOLDEN = TokenCond("_tag", MPI_SYSTEM, "golden", negate=True)
_ATTEMPTS = 4  # a transaction that raced another on the same new study/series is retried


@dataclass(frozen=True, slots=True)
class Received:
    """One dataset as a sender sent it, with what its request said about it."""

    dataset: bytes  # encoded in ``transfer_syntax``, without File Meta Information
    transfer_syntax: str
    sop_class_uid: str  # the request's Affected SOP Class UID
    sop_instance_uid: str  # the request's Affected SOP Instance UID
    calling_ae: str = ""
    peer: str = ""


@dataclass(frozen=True, slots=True)
class Stored:
    """What :meth:`StorageService.store` did with an instance."""

    sop_uid: str
    blob_key: str
    study_uid: str = ""
    series_uid: str = ""
    imaging_study_id: str = ""
    patient_ref: str = ""  # the sending MO's source Patient
    duplicate: bool = False  # the same bytes were stored before: nothing changed


class StorageService:
    """DICOM instances into the archive and the integrated record (module docstring)."""

    def __init__(
        self,
        svc: FhirService,
        blobs: BlobStore,
        rejected: RejectedStore | None = None,
        senders: SenderRegistry | None = None,
        journal: BlobJournal | None = None,
    ) -> None:
        self.svc = svc
        self.blobs = blobs
        self.journal = journal  # files durable by one synced append each
        self.rejected = rejected
        self.senders = senders or SenderRegistry(svc.store)
        self.issuers = IssuerResolver(self.senders)
        self.index = DicomIndex(svc.store)
        self._endpoint_ready = False
        self._blob_writer = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pacs-blob")

    # --- the operation ---------------------------------------------------------------------

    def store(self, rx: Received, mo: RegisteredMo, *, keep: bool = True) -> Stored:
        """Store one instance from ``mo``; raise :class:`DicomRefused` when it is not stored,
        after keeping it in the rejected-message store — unless ``keep`` is false: a replay
        of an instance kept already (:mod:`hie.pacs.replay`) must not keep it twice."""
        try:
            return self._store(rx, mo)
        except DicomRefused as err:
            if keep:
                self._keep(rx, mo, err)
            raise
        except Exception as exc:  # a bug must not cost the instance: kept, the sender told
            log.error("pacs.store_failed", error=type(exc).__name__, mo=mo.id)
            failure = ArchiveUnavailable(
                "the archive could not store the instance; it is kept for replay"
            )
            if keep:
                self._keep(rx, mo, failure)
            raise failure from exc

    def _store(self, rx: Received, mo: RegisteredMo) -> Stored:
        ts = rx.transfer_syntax.strip("\x00 ")
        sop_class = rx.sop_class_uid.strip("\x00 ")
        sop_uid = rx.sop_instance_uid.strip("\x00 ")
        hdr = instance_header(rx.dataset, ts, sop_class, sop_uid)
        p10 = file_meta(sop_class, sop_uid, ts) + rx.dataset
        seen = self.index.instance(hdr.sop_uid)
        if seen is not None:
            return _again(seen, hashlib.sha256(p10).hexdigest(), hdr)
        patient = self.issuers.resolve(hdr, mo)
        # the file is hashed, written and synced while the transaction is prepared; the
        # transaction waits for it before its instance row (an index row never names a blob
        # not on disk)
        blob = self._blob_writer.submit(self._keep_file, p10)
        try:
            for attempt in range(_ATTEMPTS):
                try:
                    with acting_as(mo_principal(mo, "dicom")):
                        done = self._commit(hdr, ts, rx.calling_ae, mo, patient, len(p10), blob)
                    self._endpoint_ready = True
                    if not done.duplicate:
                        log.info(
                            "pacs.stored",
                            mo=mo.id,
                            size=len(p10),
                            imaging_study=done.imaging_study_id,
                        )
                    return done
                except VersionConflict:
                    if attempt == _ATTEMPTS - 1:
                        raise ArchiveUnavailable(
                            "concurrent writes to the same study kept conflicting; retry"
                        ) from None
                except StorageError as exc:
                    raise ArchiveUnavailable(f"the database failed: {exc.message}") from exc
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            blob.cancel()

    def _keep_file(self, p10: bytes) -> BlobInfo:
        """The Part 10 file in the blob store, durable when this returns."""
        return self.journal.keep(p10) if self.journal is not None else self.blobs.put(p10)

    def close(self) -> None:
        """Finish the file writes in hand and stop their threads (and the journal's)."""
        self._blob_writer.shutdown(wait=True)
        if self.journal is not None:
            self.journal.close()

    # --- the transaction -------------------------------------------------------------------

    def _commit(
        self,
        hdr: Header,
        ts: str,
        calling_ae: str,
        mo: RegisteredMo,
        patient: DicomPatient,
        size: int,
        blob: Future[BlobInfo],
    ) -> Stored:
        when = now_us()
        with self.svc.store.transaction() as tx:
            ix = IndexTx(connection_of(tx))
            seen = ix.instance(hdr.sop_uid)
            if seen is not None:  # stored by another association since we looked
                return _again(seen, _durable(blob).key, hdr)
            self._ensure_endpoint(tx, when)
            study = ix.study(hdr.study_uid)
            if study is not None and (study.id_system, study.patient_id) == (
                patient.system[:255],
                hdr.patient_id[:64],
            ):
                # the study's own patient (most instances): nothing to resolve
                patient_ref = study.patient_ref
            else:
                patient_ref = self._source_patient(tx, hdr, patient, mo, when)
                patient_pk = ix.patient_pk(
                    {
                        "patient_ref": patient_ref,
                        "patient_id": hdr.patient_id[:64],
                        "issuer": hdr.issuer[:64],
                        "id_system": patient.system[:255],
                        "patient_name": hdr.name.text,
                        "name_key": hdr.name.text.upper(),
                        "birth_date": hdr.birth_date,
                        "sex": hdr.sex,
                        "owner": mo.id,
                        "created": when,
                    }
                )
            new_study = study is None
            if study is None:
                study = self._new_study(ix, hdr, patient, patient_pk, patient_ref, mo, when)
            elif study.patient_ref != patient_ref and not _same_person(
                tx, study.patient_ref, patient_ref
            ):
                raise InstanceMismatch(
                    "Study Instance UID (0020,000D) is stored for another patient; "
                    "the instance's Patient ID does not match the study's"
                )
            found = ix.series(hdr.series_uid)
            if found is None:
                series_pk = ix.insert_series(
                    {
                        "series_uid": hdr.series_uid,
                        "study_pk": study.pk,
                        "modality": hdr.modality,
                        "series_number": hdr.series_number,
                        "description": hdr.series_description,
                        "body_part": hdr.body_part,
                        "series_date": hdr.series_date,
                        "series_time": hdr.series_time,
                        "num_instances": 0,
                        "owner": mo.id,
                        "created": when,
                    }
                )
            elif found[1] != study.pk:
                raise InstanceMismatch(
                    "Series Instance UID (0020,000E) is stored under another study"
                )
            else:
                series_pk = found[0]
            ix.count_instance(study.pk, when, new_series=found is None)
            ix.count_series_instance(series_pk)
            if found is None:  # a new study or series: the ImagingStudy lists it now
                series = ix.series_of(study.pk)
                modalities = sorted({x.modality for x in series if x.modality})
                ix.set_modalities(study.pk, "\\".join(modalities)[:255])
                summary = StudySummary(
                    study_uid=study.study_uid,
                    study_date=study.study_date,
                    study_time=study.study_time,
                    accession=study.accession,
                    description=study.description,
                    referring=study.referring,
                    num_instances=sum(x.num_instances for x in series),
                    timezone_offset=hdr.timezone_offset,
                )
                res = imaging_study(summary, series, study.patient_ref)
                self.svc.write_internal(
                    tx,
                    res,
                    "ImagingStudy",
                    study.imaging_study_id,
                    when,
                    fresh=new_study,
                    owner=study.owner or mo.id,
                )
            # the blob is on disk before the row that names it (inserted last, so the file's
            # write and hash overlap the statements before)
            key = _durable(blob).key
            ix.insert_instance(
                {
                    "sop_uid": hdr.sop_uid,
                    "series_pk": series_pk,
                    "sop_class_uid": hdr.sop_class_uid,
                    "instance_number": hdr.instance_number,
                    "transfer_syntax": ts,
                    "blob_key": key,
                    "size": size,
                    "n_rows": hdr.rows,
                    "n_columns": hdr.columns,
                    "n_frames": hdr.frames,
                    "calling_ae": calling_ae.strip()[:16],
                    "owner": mo.id,
                    "received": when,
                }
            )
        return Stored(
            hdr.sop_uid,
            key,
            hdr.study_uid,
            hdr.series_uid,
            study.imaging_study_id,
            patient_ref,
        )

    @staticmethod
    def _new_study(
        ix: IndexTx,
        hdr: Header,
        patient: DicomPatient,
        patient_pk: int,
        patient_ref: str,
        mo: RegisteredMo,
        when: int,
    ) -> StudyRow:
        imaging_study_id = new_id()
        values: dict[str, Any] = {
            "study_uid": hdr.study_uid,
            "patient_pk": patient_pk,
            "study_date": hdr.study_date,
            "study_time": hdr.study_time,
            "accession": hdr.accession,
            "study_id": hdr.study_id,
            "description": hdr.study_description,
            "referring": hdr.referring,
            "modalities": "",
            "num_series": 0,
            "num_instances": 0,
            "imaging_study_id": imaging_study_id,
            "owner": mo.id,
            "created": when,
            "updated": when,
        }
        pk = ix.insert_study(values)
        return StudyRow(
            pk,
            hdr.study_uid,
            patient_pk,
            patient_ref,
            imaging_study_id,
            mo.id,
            hdr.study_date,
            hdr.study_time,
            hdr.accession,
            hdr.study_description,
            hdr.referring,
            patient.system[:255],
            hdr.patient_id[:64],
        )

    def _ensure_endpoint(self, tx: WriteTx, when: int) -> None:
        """The hub's DICOMweb Endpoint, which ImagingStudy.endpoint names (written once)."""
        if self._endpoint_ready or tx.current("Endpoint", ENDPOINT_ID, for_update=False):
            return
        res = dicomweb_endpoint(self.svc.settings.public_base)
        self.svc.write_internal(tx, res, "Endpoint", ENDPOINT_ID, when, fresh=True)

    def _source_patient(
        self, tx: WriteTx, hdr: Header, patient: DicomPatient, mo: RegisteredMo, when: int
    ) -> str:
        """The source Patient the instance's number names, created (and matched by the
        master patient index) when the hub has none."""
        token = (patient.system, patient.value)
        # another association may be filing another study of the same new patient right now
        lock_criteria(tx, "Patient", [("identifier", f"{patient.system}|{patient.value}")])
        found = tx.ids_by_token("Patient", "identifier", [token], [_NOT_GOLDEN])[token]
        if len(found) == 1:
            return found[0]
        if found:
            groups = {tx.identity.group_of("Patient", f) for f in found}
            if len(groups) == 1 and None not in groups:
                return sorted(found)[0]
            raise PatientUnresolved(
                "the Patient ID names records of more than one person in the hub; "
                "an operator must resolve them"
            )
        res = patient_resource(hdr, patient, mo)
        try:
            new = self.svc.prepare(res, "Patient", new_id(), 1, when, "POST")
            stored = tx.write(new, 1, when)
            self.svc.written(tx, res, stored, when)
        except InvalidResource as err:
            raise PatientUnresolved(
                f"the hub has no record of this Patient ID and cannot register one from the "
                f"dataset: {err.message}"
            ) from err
        return stored.id

    # --- ImagingStudy counts ----------------------------------------------------------------

    def refresh_summaries(self, limit: int = 500) -> int:
        """See :func:`refresh_summaries` (the listener calls it when an association ends)."""
        return refresh_summaries(self.svc, self.index, limit)

    # --- refusals --------------------------------------------------------------------------

    def _keep(self, rx: Received, mo: RegisteredMo, err: DicomRefused) -> None:
        """Keep a refused instance with its bytes as received (best effort: the sender
        hears the refusal either way)."""
        if self.rejected is None:
            return
        try:
            raw = rx.dataset
            try:
                raw = (
                    file_meta(
                        rx.sop_class_uid.strip("\x00 "),
                        rx.sop_instance_uid.strip("\x00 "),
                        rx.transfer_syntax.strip("\x00 "),
                    )
                    + raw
                )
            except Exception:  # noqa: BLE001 - UIDs too broken for a header: the dataset alone
                log.info("pacs.kept_without_meta")
            self.rejected.keep(
                channel="dicom",
                kind=err.kind,
                raw=raw,
                sender=f"{rx.calling_ae.strip()}|{mo.id}",
                peer=rx.peer,
                code=err.code,
                reason=err.message,
                control_id=rx.sop_instance_uid.strip("\x00 "),
            )
        except Exception as exc:  # noqa: BLE001 - the rejected store itself is down
            log.error("pacs.keep_failed", error=type(exc).__name__)


def refresh_summaries(svc: FhirService, index: DicomIndex, limit: int = 500) -> int:
    """Bring the ImagingStudy of up to ``limit`` stale studies to the index's counts, one
    short transaction each; returns how many were rewritten. Runs as a job of the worker
    (:class:`SummaryRefresher`), when an association ends, and so after a crash too (the
    stale mark is in the database)."""
    done = 0
    for study_pk in index.stale_studies(limit):
        with svc.store.transaction() as tx:
            ix = IndexTx(connection_of(tx))
            claimed = ix.claim_stale(study_pk)
            if claimed is None:  # another pass got there first
                continue
            imaging_study_id, owner, total = claimed
            cur = tx.current("ImagingStudy", imaging_study_id)
            if cur is None or cur.content is None:  # deleted by an operator: not revived
                continue
            res = with_counts(orjson.loads(cur.content), total, ix.series_of(study_pk))
            svc.write_internal(tx, res, "ImagingStudy", imaging_study_id, now_us(), owner=owner)
        done += 1
    return done


class SummaryRefresher(Poller):
    """The worker's job that keeps ImagingStudy counts current (``HIE_DICOM_SUMMARY_SECONDS``)."""

    thread_name = "hie-imaging-study"
    batch = 500

    def __init__(self, svc: FhirService, poll_seconds: float) -> None:
        super().__init__(poll_seconds)
        self.svc = svc
        self.index = DicomIndex(svc.store)

    def tick(self) -> bool:
        return refresh_summaries(self.svc, self.index, self.batch) == self.batch


def _again(seen: InstanceRow, key: str, hdr: Header) -> Stored:
    """An instance whose SOP Instance UID is stored: the same bytes again succeed and change
    nothing; other bytes are a conflict (the first is kept)."""
    if seen.blob_key == key:
        return Stored(hdr.sop_uid, key, hdr.study_uid, hdr.series_uid, duplicate=True)
    raise InstanceConflict(
        "an instance with this SOP Instance UID is already stored with different content; "
        "the stored one is kept (send changed images under a new SOP Instance UID)"
    )


def _durable(blob: Future[BlobInfo]) -> BlobInfo:
    """Wait for a blob write; its failure is the archive's (0xA700), and rolls back."""
    try:
        return blob.result()
    except HieError as exc:
        raise ArchiveUnavailable(f"the blob store failed: {exc.message}") from exc


def _same_person(tx: WriteTx, a: str, b: str) -> bool:
    """Whether two source Patients are linked to one golden record."""
    ga, gb = tx.identity.group_of("Patient", a), tx.identity.group_of("Patient", b)
    return ga is not None and ga == gb
