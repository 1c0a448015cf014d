"""Tenants isolated by row-level security, and the HTTP API's tokens

Every run has a ``tenant`` (``default`` unless set at start), copied to every row that
hangs off it (steps, groups, branches, signals, artefacts). leaseflow's statements copy
it themselves; a row inserted without it (by hand, or by a statement that forgot) gets
its run's through a trigger that only fires then (``WHEN (NEW.tenant IS NULL)``), and a
row whose run cannot be seen fails NOT NULL: never filed under another tenant.

Row-level security: the role ``leaseflow_tenant`` (no login) sees and writes only the
rows whose ``tenant`` is the transaction's ``leaseflow.tenant`` setting; a tenant-scoped
client or API request runs ``SET LOCAL ROLE leaseflow_tenant`` and sets it. Any other
role (the engine: workers, beat, admin) is let through by a second policy, and the
tables' owner bypasses RLS anyway. Locks and their audit are visible to the tenant role
only where held by one of its runs (or free).

``lf_tokens``: the API's bearer tokens, by name, stored as an scrypt hash (never the
token), with their tenant, admin flag, creation, last use and revocation.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

ROLE = "leaseflow_tenant"
CHILDREN = ("lf_steps", "lf_groups", "lf_branches", "lf_signals", "lf_artifacts")
SCOPED = ("lf_runs", *CHILDREN)
OWN_TENANT = "tenant = current_setting('leaseflow.tenant', true)"
NOT_TENANT_ROLE = f"current_user <> '{ROLE}'"
#: A lock (or an audit row) the tenant role may see: free, or held by a run it can see.
OWN_LOCK = "holder_run IS NULL OR EXISTS (SELECT 1 FROM lf_runs r WHERE r.id = holder_run)"


CHILD_TENANT = """
CREATE OR REPLACE FUNCTION lf_child_tenant() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    SELECT tenant INTO NEW.tenant FROM lf_runs WHERE id = NEW.run_id;
    RETURN NEW;
END
$$;
"""


def upgrade() -> None:
    op.execute("UPDATE lf_runs SET tenant = 'default' WHERE tenant IS NULL")
    op.alter_column("lf_runs", "tenant", nullable=False, server_default="default")
    for table in CHILDREN:
        op.add_column(table, sa.Column("tenant", sa.Text(), nullable=True))
    for table in ("lf_steps", "lf_groups", "lf_signals", "lf_artifacts"):
        op.execute(f"UPDATE {table} c SET tenant = r.tenant FROM lf_runs r WHERE r.id = c.run_id")
    op.execute(
        "UPDATE lf_branches b SET tenant = g.tenant FROM lf_groups g WHERE g.id = b.group_id"
    )
    op.execute(CHILD_TENANT)
    for table in CHILDREN:
        op.execute(f"UPDATE {table} SET tenant = 'default' WHERE tenant IS NULL")  # orphans
        op.alter_column(table, "tenant", nullable=False)
        op.execute(
            f"CREATE TRIGGER lf_child_tenant BEFORE INSERT ON {table} FOR EACH ROW "
            "WHEN (NEW.tenant IS NULL) EXECUTE FUNCTION lf_child_tenant()"
        )
    op.create_index("ix_lf_runs_tenant_created_at", "lf_runs", ["tenant", "created_at", "id"])
    # An idempotency key is a tenant's own: another tenant's run is never found by it.
    op.drop_index("uq_lf_runs_idempotency", table_name="lf_runs")
    op.create_index(
        "uq_lf_runs_idempotency",
        "lf_runs",
        ["tenant", "workflow", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_table(
        "lf_tokens",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("hash", sa.Text(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lf_tokens")),
    )
    op.create_index(
        "uq_lf_tokens_name",
        "lf_tokens",
        ["name"],
        unique=True,
        postgresql_where=sa.text("revoked_at IS NULL"),
    )
    _security()


def _security() -> None:
    op.execute(
        f"""
        DO $$ BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}') THEN
                CREATE ROLE {ROLE} NOLOGIN;
            END IF;
        END $$
        """
    )
    # The engine's role may act as the tenant role (SET ROLE) for scoped requests.
    op.execute(
        f"""
        DO $$ BEGIN
            IF NOT pg_has_role(current_user, '{ROLE}', 'MEMBER') THEN
                EXECUTE format('GRANT {ROLE} TO %I', current_user);
            END IF;
        END $$
        """
    )
    op.execute(f"GRANT USAGE ON SCHEMA {_schema()} TO {ROLE}")
    for table in SCOPED:
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {ROLE}")
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY lf_tenant_own ON {table} TO {ROLE} "
            f"USING ({OWN_TENANT}) WITH CHECK ({OWN_TENANT})"
        )
        op.execute(
            f"CREATE POLICY lf_engine_all ON {table} "
            f"USING ({NOT_TENANT_ROLE}) WITH CHECK ({NOT_TENANT_ROLE})"
        )
    op.execute(f"GRANT SELECT ON lf_workflows, lf_transitions TO {ROLE}")
    op.execute(f"GRANT SELECT, UPDATE ON lf_locks TO {ROLE}")
    op.execute(f"GRANT SELECT, INSERT ON lf_lock_audit TO {ROLE}")
    for table in ("lf_locks", "lf_lock_audit"):
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY lf_tenant_own ON {table} TO {ROLE} "
            f"USING ({OWN_LOCK}) WITH CHECK ({OWN_LOCK})"
        )
        op.execute(
            f"CREATE POLICY lf_engine_all ON {table} "
            f"USING ({NOT_TENANT_ROLE}) WITH CHECK ({NOT_TENANT_ROLE})"
        )
    op.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {_schema()} TO {ROLE}")


def _schema() -> str:
    return '"' + op.get_bind().execute(sa.text("SELECT current_schema()")).scalar_one() + '"'


def downgrade() -> None:
    schema = _schema()
    for table in (*SCOPED, "lf_locks", "lf_lock_audit"):
        op.execute(f"DROP POLICY IF EXISTS lf_engine_all ON {table}")
        op.execute(f"DROP POLICY IF EXISTS lf_tenant_own ON {table}")
        op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
        op.execute(f"REVOKE ALL ON {table} FROM {ROLE}")
    op.execute(f"REVOKE ALL ON lf_workflows, lf_transitions FROM {ROLE}")
    op.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {schema} FROM {ROLE}")
    op.execute(f"REVOKE ALL ON SCHEMA {schema} FROM {ROLE}")
    op.drop_index("uq_lf_tokens_name", table_name="lf_tokens")
    op.drop_table("lf_tokens")
    op.drop_index("ix_lf_runs_tenant_created_at", table_name="lf_runs")
    op.drop_index("uq_lf_runs_idempotency", table_name="lf_runs")
    op.create_index(
        "uq_lf_runs_idempotency",
        "lf_runs",
        ["workflow", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    for table in CHILDREN:
        op.execute(f"DROP TRIGGER IF EXISTS lf_child_tenant ON {table}")
        op.drop_column(table, "tenant")
    op.execute("DROP FUNCTION IF EXISTS lf_child_tenant()")
    op.alter_column("lf_runs", "tenant", nullable=True, server_default=None)
