"""Alembic environment: runs the leaseflow migrations with psycopg 3."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from leaseflow.migrations import VERSION_TABLE
from leaseflow.settings import get_settings, sqlalchemy_url
from leaseflow.store.schema import metadata

cfg = context.config


def _url() -> str:
    return sqlalchemy_url(
        cfg.get_main_option("sqlalchemy.url") or get_settings().require_database_url()
    )


def run_offline() -> None:
    context.configure(
        url=_url(), target_metadata=metadata, literal_binds=True, version_table=VERSION_TABLE
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=metadata, version_table=VERSION_TABLE)
        with context.begin_transaction():
            # Serialise concurrent upgrades (several processes starting at once).
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7361902418)")
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
