"""Alembic ``upgrade head`` produces exactly the schema of the SQLAlchemy metadata."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from leaseflow import migrations
from leaseflow.store.schema import metadata


def test_upgrade_head_matches_metadata(database_url):
    engine = create_engine(database_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": migrations.VERSION_TABLE})
        assert context.get_current_revision() is not None
        diff = compare_metadata(context, metadata)
    engine.dispose()
    assert diff == []


def test_upgrade_is_idempotent_and_downgrade_removes_everything(database_url, db):
    migrations.upgrade(database_url)  # already at head: a no-op
    migrations.downgrade(database_url, "base")
    tables = db.execute(
        "SELECT count(*) FROM pg_tables "
        "WHERE tablename LIKE 'lf\\_%' AND tablename <> 'lf_alembic_version'"
    ).fetchone()
    assert tables == (0,)
    migrations.upgrade(database_url)
    assert db.execute("SELECT to_regclass('lf_runs') IS NOT NULL").fetchone() == (True,)
