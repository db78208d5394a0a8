"""Reading and writing the DICOM index (:mod:`hie.pacs.schema`) with SQLAlchemy Core.

:class:`IndexTx` works inside a resource-store write transaction, so an instance's rows, its
patient's source record and the study's ImagingStudy commit together (or not at all).
:class:`DicomIndex` answers reads on its own connections.

Concurrency: the first write of an instance's transaction to an existing study is an
``UPDATE`` of the study row's counters, which row-locks it (PostgreSQL) — two associations
sending the same study take turns from there, so the ImagingStudy each rebuilds sees the
other's series. A new study, series or instance racing another of the same UID fails on the
unique index; the store reports that as a version conflict and the storage service retries.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, insert, select, update

from hie.hub.errors import NotSupported
from hie.hub.store.port import ResourceStore, WriteTx
from hie.hub.store.schema import identity_links
from hie.hub.store.sql import SqlResourceStore, SqlWriteTx
from hie.pacs import schema as s
from hie.pacs.imaging_study import SeriesSummary

P, ST, SE, IN = s.dicom_patients, s.dicom_studies, s.dicom_series, s.dicom_instances


@dataclass(frozen=True, slots=True)
class InstanceRow:
    """A stored instance: where its file is and which series holds it."""

    pk: int
    sop_uid: str
    sop_class_uid: str
    series_pk: int
    blob_key: str
    size: int
    transfer_syntax: str
    owner: str | None


@dataclass(frozen=True, slots=True)
class StudyRow:
    """A study row (what the storage service needs to decide and to rebuild)."""

    pk: int
    study_uid: str
    patient_pk: int
    patient_ref: str
    imaging_study_id: str
    owner: str | None
    study_date: str
    study_time: str
    accession: str
    description: str
    referring: str
    id_system: str  # the patient's number, as the study was filed
    patient_id: str


def _engine(store: ResourceStore) -> Engine:
    if not isinstance(store, SqlResourceStore):
        raise NotSupported("the DICOM index needs the SQL resource store")
    return store.engine


def connection_of(tx: WriteTx) -> Connection:
    """The database connection of a resource-store write transaction."""
    if not isinstance(tx, SqlWriteTx):
        raise NotSupported("the DICOM index needs the SQL resource store")
    return tx.conn


def _instance(row: Any) -> InstanceRow:
    return InstanceRow(
        row.pk,
        row.sop_uid,
        row.sop_class_uid,
        row.series_pk,
        row.blob_key,
        row.size,
        row.transfer_syntax,
        row.owner,
    )


_INSTANCE_COLS = (
    IN.c.pk,
    IN.c.sop_uid,
    IN.c.sop_class_uid,
    IN.c.series_pk,
    IN.c.blob_key,
    IN.c.size,
    IN.c.transfer_syntax,
    IN.c.owner,
)
_STUDY_SELECT = select(
    ST.c.pk,
    ST.c.study_uid,
    ST.c.patient_pk,
    P.c.patient_ref,
    ST.c.imaging_study_id,
    ST.c.owner,
    ST.c.study_date,
    ST.c.study_time,
    ST.c.accession,
    ST.c.description,
    ST.c.referring,
    P.c.id_system,
    P.c.patient_id,
).select_from(ST.join(P, P.c.pk == ST.c.patient_pk))

# Statements of the per-instance path, built once (building a statement costs more than
# SQLite's running it).
_Q_INSTANCE = select(*_INSTANCE_COLS).where(IN.c.sop_uid == bindparam("uid"))
_Q_STUDY = _STUDY_SELECT.where(ST.c.study_uid == bindparam("uid"))
_Q_PATIENT = select(P.c.pk).where(P.c.patient_ref == bindparam("ref"))
_Q_SERIES = select(SE.c.pk, SE.c.study_pk).where(SE.c.series_uid == bindparam("uid"))
# one more instance in a known series: the ImagingStudy is rewritten later (stale)
_U_STUDY = (
    update(ST)
    .where(ST.c.pk == bindparam("spk"))
    .values(num_instances=ST.c.num_instances + 1, updated=bindparam("when"), stale=1)
)
# one more series: the instance's transaction rewrites the ImagingStudy (current again)
_U_STUDY_SERIES = (
    update(ST)
    .where(ST.c.pk == bindparam("spk"))
    .values(
        num_instances=ST.c.num_instances + 1,
        num_series=ST.c.num_series + 1,
        updated=bindparam("when"),
        stale=0,
    )
)
_U_CLAIM_STALE = update(ST).where(ST.c.pk == bindparam("spk"), ST.c.stale == 1).values(stale=0)
_Q_SUMMARY = select(ST.c.imaging_study_id, ST.c.owner, ST.c.num_instances).where(
    ST.c.pk == bindparam("spk")
)
_U_SERIES = (
    update(SE).where(SE.c.pk == bindparam("sepk")).values(num_instances=SE.c.num_instances + 1)
)
_U_MODALITIES = (
    update(ST).where(ST.c.pk == bindparam("spk")).values(modalities=bindparam("modalities"))
)
_Q_SERIES_OF = (
    select(
        SE.c.series_uid,
        SE.c.modality,
        SE.c.series_number,
        SE.c.description,
        SE.c.body_part,
        SE.c.series_date,
        SE.c.series_time,
        SE.c.num_instances,
    )
    .where(SE.c.study_pk == bindparam("spk"))
    .order_by(SE.c.pk)
)
_I_PATIENT = insert(P).returning(P.c.pk)
_I_STUDY = insert(ST).returning(ST.c.pk)
_I_SERIES = insert(SE).returning(SE.c.pk)
_I_INSTANCE = insert(IN)


class IndexTx:
    """The index inside one write transaction."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def instance(self, sop_uid: str) -> InstanceRow | None:
        """The stored instance with this SOP Instance UID, if any."""
        row = self.conn.execute(_Q_INSTANCE, {"uid": sop_uid}).first()
        return _instance(row) if row else None

    def patient_pk(self, values: dict[str, Any]) -> int:
        """The row of a source Patient (inserted with ``values`` the first time)."""
        pk = self.conn.execute(_Q_PATIENT, {"ref": values["patient_ref"]}).scalar()
        if pk is not None:
            return int(pk)
        return int(self.conn.execute(_I_PATIENT, values).scalar_one())

    def study(self, study_uid: str) -> StudyRow | None:
        """The study row with this Study Instance UID, if any."""
        row = self.conn.execute(_Q_STUDY, {"uid": study_uid}).first()
        return StudyRow(**row._mapping) if row else None

    def insert_study(self, values: dict[str, Any]) -> int:
        """A new study row; returns its key."""
        return int(self.conn.execute(_I_STUDY, values).scalar_one())

    def count_instance(self, study_pk: int, when: int, new_series: bool) -> None:
        """One more instance (and maybe series) in the study; the row stays locked until the
        transaction ends."""
        self.conn.execute(
            _U_STUDY_SERIES if new_series else _U_STUDY, {"spk": study_pk, "when": when}
        )

    def set_modalities(self, study_pk: int, modalities: str) -> None:
        """Modalities in Study (0008,0061), kept as the series arrive."""
        self.conn.execute(_U_MODALITIES, {"spk": study_pk, "modalities": modalities})

    def series(self, series_uid: str) -> tuple[int, int] | None:
        """``(series key, study key)`` of the series with this UID, if any."""
        row = self.conn.execute(_Q_SERIES, {"uid": series_uid}).first()
        return (int(row.pk), int(row.study_pk)) if row else None

    def insert_series(self, values: dict[str, Any]) -> int:
        """A new series row; returns its key."""
        return int(self.conn.execute(_I_SERIES, values).scalar_one())

    def count_series_instance(self, series_pk: int) -> None:
        """One more instance in the series."""
        self.conn.execute(_U_SERIES, {"sepk": series_pk})

    def insert_instance(self, values: dict[str, Any]) -> None:
        """A new instance row."""
        self.conn.execute(_I_INSTANCE, values)

    def series_of(self, study_pk: int) -> list[SeriesSummary]:
        """The study's series, as the ImagingStudy shows them."""
        rows = self.conn.execute(_Q_SERIES_OF, {"spk": study_pk}).all()
        return [SeriesSummary(*r) for r in rows]

    def claim_stale(self, study_pk: int) -> tuple[str, str | None, int] | None:
        """Clear a study's stale mark (row-locking it until the transaction ends, so an
        instance arriving meanwhile marks it again after) and return its ImagingStudy id,
        owner and instance count; None when it was not stale."""
        if self.conn.execute(_U_CLAIM_STALE, {"spk": study_pk}).rowcount != 1:
            return None
        row = self.conn.execute(_Q_SUMMARY, {"spk": study_pk}).one()
        return str(row.imaging_study_id), row.owner, int(row.num_instances)


class DicomIndex:
    """Reads of the DICOM index (its own short read transactions)."""

    def __init__(self, store: ResourceStore) -> None:
        self.engine = _engine(store)

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def instance(self, sop_uid: str) -> InstanceRow | None:
        """The stored instance with this SOP Instance UID, if any."""
        with self._read() as conn:
            row = conn.execute(_Q_INSTANCE, {"uid": sop_uid}).first()
        return _instance(row) if row else None

    def instances(self, sop_uids: list[str]) -> dict[str, InstanceRow]:
        """The stored instances among ``sop_uids`` (storage commitment asks this)."""
        out: dict[str, InstanceRow] = {}
        with self._read() as conn:
            for start in range(0, len(sop_uids), 500):
                chunk = sop_uids[start : start + 500]
                stmt = select(*_INSTANCE_COLS).where(IN.c.sop_uid.in_(chunk))
                out.update((r.sop_uid, _instance(r)) for r in conn.execute(stmt))
        return out

    def study(self, study_uid: str) -> dict[str, Any] | None:
        """The study row with its patient's Patient ID and source Patient, as a dict."""
        stmt = (
            select(ST, P.c.patient_ref, P.c.patient_id, P.c.issuer, P.c.id_system)
            .select_from(ST.join(P, P.c.pk == ST.c.patient_pk))
            .where(ST.c.study_uid == study_uid)
        )
        with self._read() as conn:
            row = conn.execute(stmt).first()
        return dict(row._mapping) if row else None

    def series_of(self, study_uid: str) -> list[dict[str, Any]]:
        """The series rows of a study."""
        stmt = (
            select(SE)
            .select_from(SE.join(ST, ST.c.pk == SE.c.study_pk))
            .where(ST.c.study_uid == study_uid)
            .order_by(SE.c.pk)
        )
        with self._read() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def stale_studies(self, limit: int) -> list[int]:
        """Keys of studies whose ImagingStudy lags their counts (at most ``limit``)."""
        stmt = select(ST.c.pk).where(ST.c.stale == 1).order_by(ST.c.pk).limit(limit)
        with self._read() as conn:
            return [int(r[0]) for r in conn.execute(stmt)]

    def studies_of_person(self, patient_ref: str) -> list[str]:
        """Study Instance UIDs of every study of the person ``patient_ref`` names — a golden
        record or any MO's source record: every member of its identity group counts."""
        L1, L2 = identity_links.alias("l1"), identity_links.alias("l2")
        group = select(L1.c.group_id).where(L1.c.rtype == "Patient", L1.c.id == patient_ref)
        members = select(L2.c.id).where(L2.c.rtype == "Patient", L2.c.group_id.in_(group))
        stmt = (
            select(ST.c.study_uid)
            .select_from(ST.join(P, P.c.pk == ST.c.patient_pk))
            .where(P.c.patient_ref.in_(members) | (P.c.patient_ref == patient_ref))
            .order_by(ST.c.study_date, ST.c.pk)
        )
        with self._read() as conn:
            return [str(r[0]) for r in conn.execute(stmt)]

    def counts(self) -> dict[str, int]:
        """Rows per table (for tests, ``hie`` status output and benchmarks)."""
        with self._read() as conn:
            return {
                t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
                for t in s.TABLES
            }
