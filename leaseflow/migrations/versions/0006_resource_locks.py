"""Resource locks: held by states (``lock=``) or by any code (``locks.hold``), swept by
beat, force-releasable, audited; the worker registry

``lf_workers`` gains each worker process's queues, pool size, leases held and status
(``dead`` once beat finds it stopped checking in).

``lf_locks`` keeps one row per key ever locked: its fence only grows, across holders.
A lock is held while ``token`` is set. ``lf_runs`` records the lock its run holds
(``lock_key``, ``lock_token``) and the state whose commit releases it (``lock_until``).
``expires_at``, refreshed by heartbeats, is in no index (HOT updates); held locks are
found through a partial index on ``key``.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lf_locks",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("fence", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("token", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("holder", sa.Text(), nullable=True),
        sa.Column("holder_run", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("holder_state", sa.Text(), nullable=True),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_lf_locks")),
        sa.CheckConstraint(
            "token IS NULL OR expires_at IS NOT NULL", name=op.f("ck_lf_locks_held_expires")
        ),
    )
    op.create_index(
        "ix_lf_locks_held", "lf_locks", ["key"], postgresql_where=sa.text("token IS NOT NULL")
    )
    op.create_table(
        "lf_lock_audit",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("fence", sa.BigInteger(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("holder", sa.Text(), nullable=True),
        sa.Column("holder_run", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("token", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("actor", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lf_lock_audit")),
        sa.CheckConstraint("action IN ('expired', 'forced')", name=op.f("ck_lf_lock_audit_action")),
    )
    op.create_index("ix_lf_lock_audit_key", "lf_lock_audit", ["key", "id"])
    op.add_column("lf_runs", sa.Column("lock_key", sa.Text(), nullable=True))
    op.add_column("lf_runs", sa.Column("lock_token", sa.UUID(as_uuid=False), nullable=True))
    op.add_column("lf_runs", sa.Column("lock_until", sa.Text(), nullable=True))
    op.add_column("lf_workers", sa.Column("queues", sa.Text(), nullable=True))
    op.add_column("lf_workers", sa.Column("concurrency", sa.Integer(), nullable=True))
    op.add_column(
        "lf_workers", sa.Column("leases_held", sa.Integer(), nullable=False, server_default="0")
    )
    op.add_column(
        "lf_workers", sa.Column("status", sa.Text(), nullable=False, server_default="alive")
    )
    op.create_check_constraint(
        op.f("ck_lf_workers_status"), "lf_workers", "status IN ('alive', 'dead')"
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_lf_workers_status"), "lf_workers", type_="check")
    for column in ("status", "leases_held", "concurrency", "queues"):
        op.drop_column("lf_workers", column)
    for column in ("lock_until", "lock_token", "lock_key"):
        op.drop_column("lf_runs", column)
    op.drop_index("ix_lf_lock_audit_key", table_name="lf_lock_audit")
    op.drop_table("lf_lock_audit")
    op.drop_index("ix_lf_locks_held", table_name="lf_locks")
    op.drop_table("lf_locks")
