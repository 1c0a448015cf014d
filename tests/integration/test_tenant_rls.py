"""Row-level security in the database itself: raw SQL run as the tenant role, with
``leaseflow.tenant`` set, reads and writes only that tenant's runs and the rows hanging
off them, whatever the statement asks for; the tokens are out of its reach."""

from __future__ import annotations

import psycopg
import pytest

from tests.contract.conftest import CHECKPOINT, PostgresEnv
from tests.contract.test_tenants import finished_with_everything
from tests.contract.workflows import linear

TABLES = ("lf_runs", "lf_steps", "lf_groups", "lf_branches", "lf_signals", "lf_artifacts")


@pytest.fixture
def env(database_url: str):
    env = PostgresEnv(database_url)
    yield env
    env.store.close()
    env.close()


def as_tenant(conn: psycopg.Connection, tenant: str | None) -> None:
    conn.execute("SET LOCAL ROLE leaseflow_tenant")
    if tenant is not None:
        conn.execute("SELECT set_config('leaseflow.tenant', %s, true)", (tenant,))


def counts(conn: psycopg.Connection, tenant: str) -> dict[str, int]:
    return {
        t: conn.execute(f"SELECT count(*) FROM {t} WHERE tenant = %s", (tenant,)).fetchone()[0]
        for t in TABLES
    }


def test_raw_sql_as_a_tenant_sees_and_touches_none_of_another_tenant_s_rows(env, db):
    acme_run = finished_with_everything(env, env.store.for_tenant("acme"))
    globex_run = finished_with_everything(env, env.store.for_tenant("globex"))
    everything = {"lf_runs": 1, "lf_steps": 2, "lf_groups": 1, "lf_branches": 2}
    everything |= {"lf_signals": 1, "lf_artifacts": 1}
    assert counts(db, "globex") == everything  # the engine's role sees it all

    with db.transaction():
        as_tenant(db, "acme")
        assert counts(db, "globex") == dict.fromkeys(TABLES, 0)
        assert counts(db, "acme") == everything
        total = db.execute("SELECT count(*), min(tenant) FROM lf_runs").fetchone()
        assert total == (1, "acme")
        # writes aimed at the other tenant's rows touch nothing
        hit = db.execute("UPDATE lf_runs SET status = 'failed' WHERE id = %s", (globex_run,))
        assert hit.rowcount == 0
        assert db.execute("DELETE FROM lf_steps WHERE run_id = %s", (globex_run,)).rowcount == 0
        assert db.execute("UPDATE lf_signals SET payload = NULL").rowcount == 1  # its own
    assert db.execute("SELECT status FROM lf_runs WHERE id = %s", (globex_run,)).fetchone() == (
        "completed",
    )

    # a row filed under another tenant is refused
    refused = pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security")
    with refused, db.transaction():
        as_tenant(db, "acme")
        db.execute("UPDATE lf_runs SET tenant = 'globex' WHERE id = %s", (acme_run,))
    # with no tenant set, nothing at all; and the tokens are not its to read
    with db.transaction():
        as_tenant(db, None)
        assert db.execute("SELECT count(*) FROM lf_runs").fetchone() == (0,)
    with pytest.raises(psycopg.errors.InsufficientPrivilege), db.transaction():
        as_tenant(db, "acme")
        db.execute("SELECT count(*) FROM lf_tokens")


def test_a_child_row_inserted_without_its_tenant_gets_its_run_s(env, db):
    run_id = (
        env.store.for_tenant("acme")
        .create_run(
            run_id="6f1c1b5e-0d4e-4c4e-9d35-2f9f3b9a1c01",
            wf=linear,
            checkpoint=CHECKPOINT,
            input={},
            idempotency_key=None,
        )
        .run_id
    )
    db.execute(
        "INSERT INTO lf_steps (run_id, seq, state, attempt, outcome) VALUES (%s, 1, 'x', 1, 'n')",
        (run_id,),
    )
    assert db.execute("SELECT tenant FROM lf_steps WHERE run_id = %s", (run_id,)).fetchone() == (
        "acme",
    )
