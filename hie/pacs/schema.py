"""The DICOM index: patient, study, series and instance rows in the resource store's database.

Created by migrations ``0004_dicom_index`` and ``0005_dicom_study_stale`` (which spell the
same tables out, as migrations must not import application code; a test checks that the two
agree). One set of SQLAlchemy Core tables for SQLite and PostgreSQL.

What each level keeps is what C-FIND (PS3.4 C.6.1.1 / C.6.2.1 unique and required keys) and
QIDO-RS (PS3.18 10.6.1.2) match and return, so queries never open a file:

- ``dicom_patients``: one row per source Patient the DICOM intake linked instances to (the
  sending MO's record of the person, ``patient_ref``), with Patient ID, Issuer of Patient ID
  and the identifier system they were resolved to. The golden record is found through the
  master patient index's ``identity_links`` (so a merge or unmerge is seen at once, never a
  stale copy);
- ``dicom_studies``, ``dicom_series``: the study and series attributes, instance counts and
  the FHIR ImagingStudy that shows the study in the integrated record;
- ``dicom_instances``: one row per stored SOP instance, with the blob key of its Part 10 file
  (content address: the SHA-256 of the bytes), its transfer syntax and size.

Every row carries ``owner``, the MO whose system sent it (access policy: an MO's own records).
Attribute values are kept as DICOM encodes them (dates ``YYYYMMDD``, times ``HHMMSS.FFFFFF``),
so range matching compares strings of one fixed format.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table

metadata = MetaData()

# SQLite needs INTEGER PRIMARY KEY for a rowid alias (fast, autoincrementing).
BigId = BigInteger().with_variant(Integer(), "sqlite")

UID = 64  # PS3.5 6.2: a UI value is at most 64 characters
PN = 324  # PS3.5 6.2: 64 characters per component group, three groups and separators

dicom_patients = Table(
    "dicom_patients",
    metadata,
    Column("pk", BigId, primary_key=True, autoincrement=True),
    Column("patient_ref", String(64), nullable=False, unique=True),  # source Patient id
    Column("patient_id", String(64), nullable=False),  # (0010,0020)
    Column("issuer", String(64), nullable=False),  # (0010,0021), '' when absent
    Column("id_system", String(255), nullable=False),  # the identifier system it resolved to
    Column("patient_name", String(PN), nullable=False),  # (0010,0010) as sent (decoded)
    Column("name_key", String(PN), nullable=False),  # upper-cased, for matching
    Column("birth_date", String(8), nullable=False),  # (0010,0030)
    Column("sex", String(16), nullable=False),  # (0010,0040)
    Column("owner", String(64), nullable=True),
    Column("created", BigInteger, nullable=False),  # epoch microseconds
)
Index("ix_dicom_patients_patient_id", dicom_patients.c.patient_id)
Index("ix_dicom_patients_name_key", dicom_patients.c.name_key)

dicom_studies = Table(
    "dicom_studies",
    metadata,
    Column("pk", BigId, primary_key=True, autoincrement=True),
    Column("study_uid", String(UID), nullable=False, unique=True),  # (0020,000D)
    Column("patient_pk", BigInteger, nullable=False),
    Column("study_date", String(8), nullable=False),  # (0008,0020)
    Column("study_time", String(16), nullable=False),  # (0008,0030)
    Column("accession", String(16), nullable=False),  # (0008,0050)
    Column("study_id", String(16), nullable=False),  # (0020,0010)
    Column("description", String(64), nullable=False),  # (0008,1030)
    Column("referring", String(PN), nullable=False),  # (0008,0090)
    Column("modalities", String(255), nullable=False),  # (0008,0061), backslash-separated
    Column("num_series", Integer, nullable=False),
    Column("num_instances", Integer, nullable=False),
    Column("imaging_study_id", String(64), nullable=False),  # FHIR ImagingStudy id
    Column("owner", String(64), nullable=True),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    # 1 while the ImagingStudy shows fewer instances than these rows: instances added to a
    # known series update only the counts here, and a background pass rewrites the
    # ImagingStudy (hie.pacs.storage.StorageService.refresh_summaries)
    Column("stale", Integer, nullable=False, server_default="0"),
)
Index("ix_dicom_studies_patient", dicom_studies.c.patient_pk)
Index("ix_dicom_studies_stale", dicom_studies.c.stale)
Index("ix_dicom_studies_date", dicom_studies.c.study_date)
Index("ix_dicom_studies_accession", dicom_studies.c.accession)
Index("ix_dicom_studies_updated", dicom_studies.c.updated)

dicom_series = Table(
    "dicom_series",
    metadata,
    Column("pk", BigId, primary_key=True, autoincrement=True),
    Column("series_uid", String(UID), nullable=False, unique=True),  # (0020,000E)
    Column("study_pk", BigInteger, nullable=False),
    Column("modality", String(16), nullable=False),  # (0008,0060)
    Column("series_number", Integer, nullable=True),  # (0020,0011)
    Column("description", String(64), nullable=False),  # (0008,103E)
    Column("body_part", String(64), nullable=False),  # (0018,0015)
    Column("series_date", String(8), nullable=False),  # (0008,0021)
    Column("series_time", String(16), nullable=False),  # (0008,0031)
    Column("num_instances", Integer, nullable=False),
    Column("owner", String(64), nullable=True),
    Column("created", BigInteger, nullable=False),
)
Index("ix_dicom_series_study", dicom_series.c.study_pk)

dicom_instances = Table(
    "dicom_instances",
    metadata,
    Column("pk", BigId, primary_key=True, autoincrement=True),
    Column("sop_uid", String(UID), nullable=False, unique=True),  # (0008,0018)
    Column("series_pk", BigInteger, nullable=False),
    Column("sop_class_uid", String(UID), nullable=False),  # (0008,0016)
    Column("instance_number", Integer, nullable=True),  # (0020,0013)
    Column("transfer_syntax", String(UID), nullable=False),  # (0002,0010) as received
    Column("blob_key", String(64), nullable=False),  # SHA-256 of the Part 10 file
    Column("size", BigInteger, nullable=False),  # bytes of the Part 10 file
    Column("n_rows", Integer, nullable=True),  # (0028,0010)
    Column("n_columns", Integer, nullable=True),  # (0028,0011)
    Column("n_frames", Integer, nullable=True),  # (0028,0008)
    Column("calling_ae", String(16), nullable=False),  # who sent it (C-STORE) or ''
    Column("owner", String(64), nullable=True),
    Column("received", BigInteger, nullable=False),
)
Index("ix_dicom_instances_series", dicom_instances.c.series_pk)

TABLES = (dicom_patients, dicom_studies, dicom_series, dicom_instances)
