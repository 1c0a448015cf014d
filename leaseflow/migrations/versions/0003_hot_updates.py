"""HOT updates on the hot path: unfinished-row indexes instead of status indexes

The partial indexes on ``status`` made every claim and commit a non-HOT update (the
status changes pending -> running -> pending), so each state wrote new entries into
every index of lf_runs and lf_branches and left dead index tuples behind. The beat
scans now find active rows through indexes whose column and predicate never change
while a run or branch is in flight (``finished_at IS NULL``).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_lf_runs_active", table_name="lf_runs")
    op.create_index(
        "ix_lf_runs_unfinished",
        "lf_runs",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("finished_at IS NULL"),
    )
    op.drop_index("ix_lf_branches_active", table_name="lf_branches")
    op.create_index(
        "ix_lf_branches_unfinished",
        "lf_branches",
        ["group_id"],
        unique=False,
        postgresql_where=sa.text("finished_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_lf_branches_unfinished", table_name="lf_branches")
    op.create_index(
        "ix_lf_branches_active",
        "lf_branches",
        ["status"],
        unique=False,
        postgresql_where=sa.text("status IN ('pending', 'running')"),
    )
    op.drop_index("ix_lf_runs_unfinished", table_name="lf_runs")
    op.create_index(
        "ix_lf_runs_active",
        "lf_runs",
        ["status"],
        unique=False,
        postgresql_where=sa.text("status IN ('pending', 'running', 'waiting')"),
    )
