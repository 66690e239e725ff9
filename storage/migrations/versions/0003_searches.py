"""searches: the Auto search's own row; runs.search_id / trial_number link its trials

Revision ID: 0003_searches
Revises: 0002_autoincrement_ids
Create Date: 2026-12-03
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_searches"
down_revision: str | None = "0002_autoincrement_ids"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "searches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("study_name", sa.String(length=100), nullable=False),
        sa.Column("objective", sa.String(length=50), nullable=False),
        sa.Column("device", sa.String(length=100), nullable=False),
        sa.Column("budget", sa.JSON(), nullable=False),
        sa.Column("time_budget_s", sa.Float(), nullable=False),
        sa.Column("spent_s", sa.Float(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("max_trials", sa.Integer(), nullable=True),
        sa.Column("workers", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("winner_run_id", sa.Integer(), nullable=True),
        sa.Column("bundle_artifact_id", sa.Integer(), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name=op.f("fk_searches_dataset_id_datasets"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_searches")),
        sa.UniqueConstraint("study_name", name=op.f("uq_searches_study_name")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_searches_dataset_id"), "searches", ["dataset_id"], unique=False)
    # Keep AUTOINCREMENT (0002) when SQLite rebuilds the table.
    with op.batch_alter_table("runs", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.add_column(sa.Column("search_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("trial_number", sa.Integer(), nullable=True))
        batch.create_index(batch.f("ix_runs_search_id"), ["search_id"], unique=False)
        batch.create_foreign_key(batch.f("fk_runs_search_id_searches"), "searches", ["search_id"], ["id"],
                                 ondelete="CASCADE")


def downgrade() -> None:
    # Keep AUTOINCREMENT (0002) when SQLite rebuilds the table.
    with op.batch_alter_table("runs", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_constraint(batch.f("fk_runs_search_id_searches"), type_="foreignkey")
        batch.drop_index(batch.f("ix_runs_search_id"))
        batch.drop_column("trial_number")
        batch.drop_column("search_id")
    op.drop_index(op.f("ix_searches_dataset_id"), table_name="searches")
    op.drop_table("searches")
