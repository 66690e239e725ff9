"""dataset_versions: how a dataset was derived from another by a fix

A fix from the health report (drop duplicates, resolve leakage, exclude or relabel files,
re-split by group) never edits a dataset in place: it creates a new dataset row with its own
image rows (pointing at the same content-addressed store files) and records here which
dataset it came from and what changed. A new table rather than new columns on ``datasets``:
adding a foreign key column to ``datasets`` on SQLite means rebuilding that table.

Revision ID: 0005_dataset_versions
Revises: 0004_worker_leases
Create Date: 2026-12-03
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0005_dataset_versions"
down_revision: str | None = "0004_worker_leases"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dataset_versions",
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("root_id", sa.Integer(), nullable=False),
        sa.Column("root_name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("change", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE",
                                name=op.f("fk_dataset_versions_dataset_id_datasets")),
        sa.ForeignKeyConstraint(["parent_id"], ["datasets.id"], ondelete="SET NULL",
                                name=op.f("fk_dataset_versions_parent_id_datasets")),
        sa.PrimaryKeyConstraint("dataset_id", name=op.f("pk_dataset_versions")),
    )
    op.create_index(op.f("ix_dataset_versions_parent_id"), "dataset_versions", ["parent_id"])
    op.create_index(op.f("ix_dataset_versions_root_id"), "dataset_versions", ["root_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_dataset_versions_root_id"), table_name="dataset_versions")
    op.drop_index(op.f("ix_dataset_versions_parent_id"), table_name="dataset_versions")
    op.drop_table("dataset_versions")
