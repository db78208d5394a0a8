"""DICOM index: dicom_studies.stale, set while the study's ImagingStudy lags its counts

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "dicom_studies", sa.Column("stale", sa.Integer(), nullable=False, server_default="0")
    )
    op.create_index("ix_dicom_studies_stale", "dicom_studies", ["stale"])


def downgrade() -> None:
    op.drop_index("ix_dicom_studies_stale", table_name="dicom_studies")
    op.drop_column("dicom_studies", "stale")
