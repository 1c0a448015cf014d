"""Queue marks: the dispatcher re-publishes only messages known to be gone

Before, every pending run whose message was older than ``dispatch_timeout`` was
re-published, including messages merely waiting behind a backlog; each copy then
waited too and was re-published again, so a backlog fed itself. The dispatcher now
first sends a probe through the queue and re-publishes only what was published
before a probe that came through.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lf_queue_marks",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("probe_sent_at", sa.DateTime(timezone=True)),
        sa.Column("passed_at", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("queue", name="pk_lf_queue_marks"),
    )


def downgrade() -> None:
    op.drop_table("lf_queue_marks")
