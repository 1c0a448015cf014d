"""Every value bound for the store is measured against its limit before anything reaches
the broker or the database: an oversized input, output, branch result and signal payload
are each refused with ``E-PAYLOAD-TOO-LARGE``, naming the limit and the size, and
nothing of them is written."""

from __future__ import annotations

import psycopg
import pytest

from leaseflow import errors
from leaseflow.settings import Settings
from tests.integration.test_parallel import drive, start
from tests.workflows.limits import limits

LIMIT = 2048


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_payload_bytes": LIMIT})


def count(db: psycopg.Connection, table: str, run_id: str | None = None) -> int:
    if run_id is None:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    return db.execute(f"SELECT count(*) FROM {table} WHERE run_id = %s", (run_id,)).fetchone()[0]


def test_an_oversized_input_is_refused_and_no_run_is_created(client, db):
    before = count(db, "lf_runs")
    with pytest.raises(errors.PayloadTooLarge) as refused:
        client.start(limits, {"note": "n" * LIMIT})
    assert (refused.value.code, refused.value.what, refused.value.limit) == (
        "E-PAYLOAD-TOO-LARGE",
        "input",
        LIMIT,
    )
    assert refused.value.size > LIMIT
    assert "(LEASEFLOW_MAX_PAYLOAD_BYTES)" in str(refused.value)
    assert count(db, "lf_runs") == before


def test_an_oversized_output_fails_the_run_and_no_output_is_stored(client, runner, db):
    first = start(client, limits, {"make": "output", "size": LIMIT})
    drive(runner, first)
    run = client.get(first.run_id)
    assert (run.status, run.error_code, run.output) == ("failed", "E-PAYLOAD-TOO-LARGE", None)
    assert f"over the limit of {LIMIT} bytes (LEASEFLOW_MAX_PAYLOAD_BYTES)" in (run.error or "")
    stored = db.execute("SELECT output FROM lf_runs WHERE id = %s", (first.run_id,)).fetchone()
    assert stored == (None,)


def test_an_oversized_branch_result_fails_the_branch_and_no_result_is_stored(client, runner, db):
    first = start(client, limits, {"make": "branch", "size": LIMIT})
    drive(runner, first)
    run = client.get(first.run_id)
    assert (run.status, run.error_code) == ("failed", "E-BRANCH-FAILED")
    row = db.execute(
        "SELECT status, result, error FROM lf_branches WHERE run_id = %s", (first.run_id,)
    ).fetchone()
    assert row[:2] == ("failed", None)
    assert "E-PAYLOAD-TOO-LARGE" in row[2] and f"over the limit of {LIMIT} bytes" in row[2]


def test_an_oversized_signal_payload_is_refused_and_nothing_is_stored(client, runner, db):
    first = start(client, limits, {"make": "wait"})
    drive(runner, first)
    assert client.get(first.run_id).status == "waiting"
    with pytest.raises(errors.PayloadTooLarge) as refused:
        client.signal(first.run_id, "go", {"blob": "z" * LIMIT})
    assert (refused.value.what, refused.value.limit) == ("signal payload", LIMIT)
    assert count(db, "lf_signals", first.run_id) == 0
    assert client.get(first.run_id).status == "waiting"
    # a payload within the limit still resumes it
    assert client.signal(first.run_id, "go", {"ok": True}).result == "resumed"
