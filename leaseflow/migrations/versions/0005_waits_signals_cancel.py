"""Waits, signals, timers, cancel, re-drive, run deadlines and priority

``lf_runs`` gains what a waiting run waits for (``wait``: its next state and timeout
route; ``wait_event`` and ``wait_deadline`` were there already), the payload of the
signal that resumed it (``signal``), its deadline (``run_deadline``), a cancel reason
and its message priority. ``lf_signals`` keeps every signal, consumed or not, once
per ``(run_id, signal_id)``. Groups may be ``cancelled``. The transition guard lets a
re-drive (a finished run back to ``pending``) enter any state of its version.

The new indexes are partial on columns that never change while a step runs
(``wait_deadline``, ``run_deadline``, ``finished_at``), so claims, commits and
heartbeats stay HOT updates.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# As 0001's guard, and: a finished run re-driven (back to 'pending') may enter any
# state its version declares (one that appears in its transition table).
TRANSITION_GUARD = """
CREATE OR REPLACE FUNCTION lf_check_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    source text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        source := '';
    ELSIF NEW.workflow IS DISTINCT FROM OLD.workflow
       OR NEW.version IS DISTINCT FROM OLD.version THEN
        RAISE EXCEPTION 'leaseflow: run % cannot change workflow or version', OLD.id
            USING ERRCODE = 'check_violation';
    ELSIF NEW.state IS NOT DISTINCT FROM OLD.state THEN
        RETURN NEW;
    ELSIF OLD.status IN ('failed', 'cancelled', 'timed_out') AND NEW.status = 'pending' THEN
        PERFORM 1 FROM lf_transitions
         WHERE workflow = NEW.workflow AND version = NEW.version AND to_state = NEW.state;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'leaseflow: run % cannot be re-driven to unknown state %',
                OLD.id, NEW.state USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    ELSE
        source := OLD.state;
    END IF;
    PERFORM 1 FROM lf_transitions
     WHERE workflow = NEW.workflow AND version = NEW.version
       AND from_state = source AND to_state = NEW.state;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'leaseflow: illegal transition % -> % for workflow % v%',
            CASE WHEN source = '' THEN '(start)' ELSE source END, NEW.state,
            NEW.workflow, NEW.version
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
"""


def _first_guard() -> str:
    """0001's guard (its module name starts with a digit: loaded by path)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("0001_initial_schema.py")
    spec = importlib.util.spec_from_file_location("lf_migration_0001", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.TRANSITION_GUARD)


def upgrade() -> None:
    op.add_column("lf_runs", sa.Column("wait", postgresql.JSONB(), nullable=True))
    op.add_column("lf_runs", sa.Column("signal", postgresql.JSONB(), nullable=True))
    op.add_column("lf_runs", sa.Column("run_deadline", sa.DateTime(timezone=True)))
    op.add_column("lf_runs", sa.Column("cancel_reason", sa.Text()))
    op.add_column(
        "lf_runs", sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="0")
    )
    op.create_check_constraint(op.f("ck_lf_runs_priority"), "lf_runs", "priority BETWEEN 0 AND 9")
    op.create_index(
        "ix_lf_runs_wait_deadline",
        "lf_runs",
        ["wait_deadline"],
        postgresql_where=sa.text("wait_deadline IS NOT NULL"),
    )
    op.create_index(
        "ix_lf_runs_run_deadline",
        "lf_runs",
        ["run_deadline"],
        postgresql_where=sa.text("finished_at IS NULL AND run_deadline IS NOT NULL"),
    )
    op.create_table(
        "lf_signals",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("run_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("signal_id", sa.Text(), nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(), nullable=True),
        sa.Column(
            "received_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("consumed_at", sa.DateTime(timezone=True)),
        sa.Column("consumed_seq", sa.Integer()),
        sa.PrimaryKeyConstraint("id", name="pk_lf_signals"),
        sa.UniqueConstraint("run_id", "signal_id", name="uq_lf_signals_run_id_signal_id"),
    )
    op.create_index(
        "ix_lf_signals_unconsumed",
        "lf_signals",
        ["run_id", "event", "id"],
        postgresql_where=sa.text("consumed_at IS NULL"),
    )
    op.drop_constraint(op.f("ck_lf_groups_status"), "lf_groups", type_="check")
    op.create_check_constraint(
        op.f("ck_lf_groups_status"),
        "lf_groups",
        "status IN ('running', 'joined', 'failed', 'cancelled')",
    )
    op.execute(TRANSITION_GUARD)


def downgrade() -> None:
    op.execute(_first_guard())
    op.drop_constraint(op.f("ck_lf_groups_status"), "lf_groups", type_="check")
    op.create_check_constraint(
        op.f("ck_lf_groups_status"), "lf_groups", "status IN ('running', 'joined', 'failed')"
    )
    op.drop_index("ix_lf_signals_unconsumed", table_name="lf_signals")
    op.drop_table("lf_signals")
    op.drop_index("ix_lf_runs_run_deadline", table_name="lf_runs")
    op.drop_index("ix_lf_runs_wait_deadline", table_name="lf_runs")
    op.drop_constraint(op.f("ck_lf_runs_priority"), "lf_runs", type_="check")
    for column in ("priority", "cancel_reason", "run_deadline", "signal", "wait"):
        op.drop_column("lf_runs", column)
