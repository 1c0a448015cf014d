"""A database without leaseflow's schema (or with an older one): every store method
fails with ``errors.SchemaMissing`` (``E-DB-NOT-MIGRATED``, "run `leaseflow db
upgrade`"), whichever connection path it takes, never with psycopg's ``UndefinedTable``."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from leaseflow import errors
from leaseflow.settings import Settings, sqlalchemy_url
from leaseflow.store.postgres import PostgresStore
from leaseflow.tasks import runtime
from tests.conftest import ADMIN_URL
from tests.workflows import basic

RUN_ID = str(uuid.UUID(int=7))

#: One store method per connection path: pooled and retried, the thread's own
#: connection (claims), one transaction, a pooled statement not retried.
CALLS: dict[str, Callable[[PostgresStore], Any]] = {
    "get_run": lambda store: store.get_run(RUN_ID),
    "list_runs": lambda store: store.list_runs(limit=5),
    "claim": lambda store: store.claim(RUN_ID, 1, owner="test:1", ttl=5.0),
    "register_workflow": lambda store: store.register_workflow(basic.linear),
    "reap": lambda store: store.reap(limit=5),
}


def _store(url: str) -> PostgresStore:
    return runtime.make_store(Settings(database_url=url), application_name="leaseflow-test")


@pytest.fixture
def empty_url(pg_template: str) -> Iterator[str]:
    """A database with no tables at all."""
    name = f"lf_no_schema_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield sqlalchemy_url(f"{ADMIN_URL.rpartition('/')[0]}/{name}")
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("method", list(CALLS))
def test_every_store_method_says_the_schema_is_missing(empty_url: str, method: str):
    # Given a store on a database without the lf_* tables
    store = _store(empty_url)
    try:
        # When a store method runs
        with pytest.raises(errors.SchemaMissing) as caught:
            CALLS[method](store)
    finally:
        store.close()
    # Then it says to migrate, with the driver's word for what is missing
    assert caught.value.code == "E-DB-NOT-MIGRATED"
    assert 'relation "lf_' in str(caught.value)
    assert "run `leaseflow db upgrade`" in str(caught.value)
    assert isinstance(caught.value.__cause__, psycopg.errors.UndefinedTable)


def test_an_older_schema_missing_a_column_says_the_same(database_url: str, db: psycopg.Connection):
    # Given a schema that lacks a column this code reads (an older revision)
    db.execute("ALTER TABLE lf_runs DROP COLUMN idempotency_key")
    store = _store(database_url)
    try:
        # When runs are listed
        with pytest.raises(errors.SchemaMissing) as caught:
            store.list_runs(limit=5)
    finally:
        store.close()
    # Then the missing column is named, and the remedy
    assert "idempotency_key" in str(caught.value)
    assert isinstance(caught.value.__cause__, psycopg.errors.UndefinedColumn)


def test_the_threads_own_connection_survives_a_missing_schema(empty_url: str):
    # Given a claim that failed on the thread's own connection for lack of a schema
    store = _store(empty_url)
    try:
        with pytest.raises(errors.SchemaMissing):
            store.claim(RUN_ID, 1, owner="test:1", ttl=5.0)
        # Then that connection is kept, idle, and serves the next statement
        kept = [cur for cur in store.connections.pinned().values() if cur is not None]
        assert len(kept) == 1
        assert kept[0].connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with pytest.raises(errors.SchemaMissing):
            store.claim(RUN_ID, 1, owner="test:1", ttl=5.0)
    finally:
        store.close()
