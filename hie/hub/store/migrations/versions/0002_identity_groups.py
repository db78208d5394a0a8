"""identity groups: the master patient index's links, blocking keys and journal

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "identity_links",
        sa.Column("rtype", sa.String(length=64), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("features", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("rtype", "id"),
    )
    op.create_index("ix_identity_links_group", "identity_links", ["rtype", "group_id"])
    op.create_table(
        "identity_keys",
        sa.Column("rtype", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=96), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
    )
    op.create_index("ix_identity_keys_key", "identity_keys", ["rtype", "key", "id"])
    op.create_index("ix_identity_keys_id", "identity_keys", ["rtype", "id"])
    op.create_table(
        "identity_log",
        sa.Column("seq", BigId, primary_key=True, autoincrement=True),
        sa.Column("rtype", sa.String(length=64), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("group_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_identity_log_id", "identity_log", ["rtype", "id", "seq"])
    op.create_index("ix_identity_log_group", "identity_log", ["rtype", "group_id", "seq"])


def downgrade() -> None:
    op.drop_table("identity_log")
    op.drop_table("identity_keys")
    op.drop_table("identity_links")
