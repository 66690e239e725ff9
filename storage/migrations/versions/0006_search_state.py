"""searches: the sitting's clock in columns, the search's plan stored once

A search's coordination state lived in its JSON summary: ``sitting_started`` (a POSIX time,
set by the first worker of a sitting) and ``reserve_s`` (the time kept back for the finish).
They become the columns ``sitting_started_at`` and ``reserve_s``; existing rows keep their
values (moved out of the summary, and back on downgrade). ``plan`` holds what the search is
over (workbench.search_plan.SearchPlan), computed once when it is queued; rows queued earlier
have none (their first worker stores one). On downgrade a plan's space goes back to the
summary's ``space``, where the earlier code showed it.

Revision ID: 0006_search_state
Revises: 0005_dataset_versions
Create Date: 2026-12-07
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0006_search_state"
down_revision: str | None = "0005_dataset_versions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Keep AUTOINCREMENT (0002) when SQLite rebuilds the table.
TABLE_KWARGS = {"sqlite_autoincrement": True}


def _searches(*extra: sa.Column[Any]) -> sa.TableClause:
    return sa.table("searches", sa.column("id", sa.Integer()), sa.column("summary", sa.JSON()), *extra)


def upgrade() -> None:
    with op.batch_alter_table("searches", table_kwargs=TABLE_KWARGS) as batch:
        batch.add_column(sa.Column("sitting_started_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("reserve_s", sa.Float(), nullable=True))
        batch.add_column(sa.Column("plan", sa.JSON(), nullable=True))
    t = _searches(sa.column("sitting_started_at", sa.DateTime()), sa.column("reserve_s", sa.Float()))
    conn = op.get_bind()
    for sid, summary in conn.execute(sa.select(t.c.id, t.c.summary)).all():
        summary = dict(summary or {})
        if "sitting_started" not in summary and "reserve_s" not in summary:
            continue
        started, reserve = summary.pop("sitting_started", None), summary.pop("reserve_s", None)
        # Naive UTC, as UTCDateTime stores it.
        at = datetime.fromtimestamp(float(started), UTC).replace(tzinfo=None) if started else None
        conn.execute(sa.update(t).where(t.c.id == sid).values(
            summary=summary, sitting_started_at=at, reserve_s=None if reserve is None else float(reserve)))


def downgrade() -> None:
    t = _searches(sa.column("sitting_started_at", sa.DateTime()), sa.column("reserve_s", sa.Float()),
                  sa.column("plan", sa.JSON()))
    conn = op.get_bind()
    for sid, summary, at, reserve, plan in conn.execute(
            sa.select(t.c.id, t.c.summary, t.c.sitting_started_at, t.c.reserve_s, t.c.plan)).all():
        summary = dict(summary or {})
        if at is not None:
            summary["sitting_started"] = at.replace(tzinfo=UTC).timestamp()
        if reserve is not None:
            summary["reserve_s"] = reserve
        if plan and "space" not in summary:
            summary["space"] = plan["space"]
        conn.execute(sa.update(t).where(t.c.id == sid).values(summary=summary))
    with op.batch_alter_table("searches", table_kwargs=TABLE_KWARGS) as batch:
        batch.drop_column("plan")
        batch.drop_column("reserve_s")
        batch.drop_column("sitting_started_at")
