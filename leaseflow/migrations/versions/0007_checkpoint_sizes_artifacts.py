"""Checkpoint sizes in the step log, artefacts, and the index retention scans

``lf_steps`` records, for every commit that checkpoints the context, the size of its
JSON (``context_bytes``) and of the stored checkpoint (``checkpoint_bytes``): the step
log shows the codec's ratio.

``lf_artifacts`` holds what states put with ``ctx.artifacts.put``: zstd-compressed,
owned by a run (one row per name), written in the state's fenced commit.

``ix_lf_runs_finished`` finds finished runs by age for ``leaseflow purge``; its column
and predicate are set once, when a run finishes, so in-flight updates stay HOT.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("lf_steps", sa.Column("context_bytes", sa.Integer(), nullable=True))
    op.add_column("lf_steps", sa.Column("checkpoint_bytes", sa.Integer(), nullable=True))
    op.create_table(
        "lf_artifacts",
        sa.Column("run_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("content_type", sa.Text(), nullable=True),
        sa.Column("codec", sa.SmallInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("stored_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=True),
        sa.Column("step_seq", sa.Integer(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("run_id", "name", name=op.f("pk_lf_artifacts")),
    )
    op.create_index(
        "ix_lf_runs_finished",
        "lf_runs",
        ["finished_at"],
        postgresql_where=sa.text("finished_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_lf_runs_finished", table_name="lf_runs")
    op.drop_table("lf_artifacts")
    op.drop_column("lf_steps", "checkpoint_bytes")
    op.drop_column("lf_steps", "context_bytes")
