"""jobs carry a lease (worker, host, heartbeat, lease expiry); a workers table with heartbeats

Workers on several hosts share one database: a job's claim names its worker and host and
holds until ``lease_until``, renewed by the worker's heartbeat; a job whose lease ran out is
an orphan whatever host ran it. ``workers`` lists each worker process with its heartbeat and
what it has (CPU cores, memory, GPUs, ONNX Runtime providers), so a job stating needs can say
when no running worker can take it. Rows claimed before this revision have no host: they keep
the local pid check.

Revision ID: 0004_worker_leases
Revises: 0003_searches
Create Date: 2026-12-03
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0004_worker_leases"
down_revision: str | None = "0003_searches"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOB_COLUMNS = ("worker_id", "host_id", "heartbeat_at", "lease_until")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("worker_id", sa.String(200), nullable=True))
        batch.add_column(sa.Column("host_id", sa.String(100), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.DateTime(), nullable=True))
    op.create_table(
        "workers",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("host_id", sa.String(100), nullable=False),
        sa.Column("lane", sa.String(20), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("lease_until", sa.DateTime(), nullable=False),
        sa.Column("stopped_at", sa.DateTime(), nullable=True),
        sa.Column("resources", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    op.create_index(op.f("ix_workers_host_id"), "workers", ["host_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_workers_host_id"), table_name="workers")
    op.drop_table("workers")
    with op.batch_alter_table("jobs") as batch:
        for name in reversed(JOB_COLUMNS):
            batch.drop_column(name)
