"""datasets and runs: AUTOINCREMENT, so a deleted dataset's or run's id is never reused

SQLite hands out max(id) + 1, so deleting the newest dataset (or run) gave its id to the next
one: commands, logs and model cards naming that id then pointed at other data. AUTOINCREMENT
can only be set by rebuilding the table (batch mode: copy into a new table, swap), which
keeps every row and id. storage.db runs migrations with foreign keys off (SQLite's procedure
for rebuilding a table), so dropping the old table does not cascade into images, runs, jobs...,
and checks the foreign keys before committing. Ids deleted before this migration cannot be
known, so only ids from here on are guaranteed fresh. Other databases never reuse sequence
values; there this migration does nothing.

Revision ID: 0002_autoincrement_ids
Revises: 0001_initial
Create Date: 2026-12-01
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002_autoincrement_ids"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("datasets", "runs")


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(table, recreate="always",
                                  table_kwargs={"sqlite_autoincrement": autoincrement}):
            pass


def upgrade() -> None:
    _rebuild(True)


def downgrade() -> None:
    _rebuild(False)
