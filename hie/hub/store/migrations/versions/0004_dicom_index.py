"""DICOM index: patient, study, series and instance rows (see hie.pacs.schema)

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "dicom_patients",
        sa.Column("pk", BigId, primary_key=True, autoincrement=True),
        sa.Column("patient_ref", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer", sa.String(length=64), nullable=False),
        sa.Column("id_system", sa.String(length=255), nullable=False),
        sa.Column("patient_name", sa.String(length=324), nullable=False),
        sa.Column("name_key", sa.String(length=324), nullable=False),
        sa.Column("birth_date", sa.String(length=8), nullable=False),
        sa.Column("sex", sa.String(length=16), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=True),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("patient_ref"),
    )
    op.create_index("ix_dicom_patients_patient_id", "dicom_patients", ["patient_id"])
    op.create_index("ix_dicom_patients_name_key", "dicom_patients", ["name_key"])

    op.create_table(
        "dicom_studies",
        sa.Column("pk", BigId, primary_key=True, autoincrement=True),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_pk", sa.BigInteger(), nullable=False),
        sa.Column("study_date", sa.String(length=8), nullable=False),
        sa.Column("study_time", sa.String(length=16), nullable=False),
        sa.Column("accession", sa.String(length=16), nullable=False),
        sa.Column("study_id", sa.String(length=16), nullable=False),
        sa.Column("description", sa.String(length=64), nullable=False),
        sa.Column("referring", sa.String(length=324), nullable=False),
        sa.Column("modalities", sa.String(length=255), nullable=False),
        sa.Column("num_series", sa.Integer(), nullable=False),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.Column("imaging_study_id", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=True),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("updated", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("study_uid"),
    )
    op.create_index("ix_dicom_studies_patient", "dicom_studies", ["patient_pk"])
    op.create_index("ix_dicom_studies_date", "dicom_studies", ["study_date"])
    op.create_index("ix_dicom_studies_accession", "dicom_studies", ["accession"])
    op.create_index("ix_dicom_studies_updated", "dicom_studies", ["updated"])

    op.create_table(
        "dicom_series",
        sa.Column("pk", BigId, primary_key=True, autoincrement=True),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("study_pk", sa.BigInteger(), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("description", sa.String(length=64), nullable=False),
        sa.Column("body_part", sa.String(length=64), nullable=False),
        sa.Column("series_date", sa.String(length=8), nullable=False),
        sa.Column("series_time", sa.String(length=16), nullable=False),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=True),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("series_uid"),
    )
    op.create_index("ix_dicom_series_study", "dicom_series", ["study_pk"])

    op.create_table(
        "dicom_instances",
        sa.Column("pk", BigId, primary_key=True, autoincrement=True),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("series_pk", sa.BigInteger(), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("transfer_syntax", sa.String(length=64), nullable=False),
        sa.Column("blob_key", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("n_rows", sa.Integer(), nullable=True),
        sa.Column("n_columns", sa.Integer(), nullable=True),
        sa.Column("n_frames", sa.Integer(), nullable=True),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=True),
        sa.Column("received", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("sop_uid"),
    )
    op.create_index("ix_dicom_instances_series", "dicom_instances", ["series_pk"])


def downgrade() -> None:
    op.drop_table("dicom_instances")
    op.drop_table("dicom_series")
    op.drop_table("dicom_studies")
    op.drop_table("dicom_patients")
