"""``leaseflow signal``, ``cancel`` and ``retry`` (and ``start --priority``) against a
real database and broker: each prints what it did; bad input is one clear error and
changes nothing."""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.integration.test_cli import Cli, bare_cli, cli, failed_cleanly, ok

__all__ = ["bare_cli", "cli"]  # the fixtures this module uses

#: ``wait_gate`` parks its run in ``park`` until "go"; ``wait_redrivable`` fails.
WORKFLOWS = "tests.workflows.basic,tests.workflows.waits"


@pytest.fixture
def ctl(cli: Cli) -> Cli:
    cli.setenv("LEASEFLOW_WORKFLOWS", WORKFLOWS)
    return cli


def park(db: psycopg.Connection, run_id: str) -> None:
    """Make the new run wait for "go", as a worker would (no worker runs here)."""
    db.execute(
        "UPDATE lf_runs SET status = 'waiting', step_seq = 2, wait_event = 'go',"
        ' wait = \'{"next": "done", "next_attempts": 1, "event": "go"}\''
        " WHERE id = %s",
        (run_id,),
    )


def run_row(db: psycopg.Connection, run_id: str) -> tuple[str, str, int]:
    row = db.execute(
        "SELECT status, state, step_seq FROM lf_runs WHERE id = %s", (run_id,)
    ).fetchone()
    assert row is not None
    return row


def test_signal_resumes_a_waiting_run_once(ctl: Cli, db: psycopg.Connection):
    run_id = ok(ctl("start", "wait_gate")).strip()
    park(db, run_id)

    first = ok(ctl("signal", run_id, "go", "--payload", '{"ok": true}', "--id", "hook-1"))
    again = ctl("signal", run_id, "go", "--payload", "1", "--id", "hook-1", "--json")

    assert first.strip() == f"resumed run {run_id}: pending in state 'done'"
    assert json.loads(ok(again))["result"] == "duplicate"
    assert run_row(db, run_id) == ("pending", "done", 3)
    assert db.execute("SELECT signal FROM lf_runs WHERE id = %s", (run_id,)).fetchone() == (
        {"ok": True},
    )


def test_a_signal_before_the_wait_is_stored(ctl: Cli, db: psycopg.Connection):
    run_id = ok(ctl("start", "wait_gate")).strip()

    out = ok(ctl("signal", run_id, "go"))

    assert out.startswith(f"stored for run {run_id} (pending in state 'park')")
    assert run_row(db, run_id) == ("pending", "park", 1)


def test_bad_signals_are_clear_errors_and_change_nothing(ctl: Cli, db: psycopg.Connection):
    run_id = ok(ctl("start", "wait_gate")).strip()
    park(db, run_id)
    unknown = "00000000-0000-4000-8000-000000000000"

    assert "no run" in failed_cleanly(ctl("signal", unknown, "go"), "E-RUN-NOT-FOUND")
    assert "event name" in failed_cleanly(ctl("signal", run_id, "no way"), "E-SIGNAL-INVALID")
    bad_json = ctl("signal", run_id, "go", "--payload", "{not json")
    assert "not valid JSON" in failed_cleanly(bad_json, "E-USAGE", exit_code=2)
    assert run_row(db, run_id) == ("waiting", "park", 2)
    assert db.execute("SELECT count(*) FROM lf_signals").fetchone() == (0,)

    ok(ctl("cancel", run_id))
    finished = failed_cleanly(ctl("signal", run_id, "go"), "E-RUN-FINISHED")
    assert "cancelled" in finished


def test_cancel_is_idempotent_and_says_what_it_did(ctl: Cli, db: psycopg.Connection):
    run_id = ok(ctl("start", "wait_gate")).strip()

    first = ok(ctl("cancel", run_id, "--reason", "duplicate order"))
    again = ok(ctl("cancel", run_id))

    assert first.strip() == f"cancelled run {run_id}"
    assert again.strip() == f"run {run_id} had already finished (cancelled): nothing done"
    row = db.execute("SELECT status, error FROM lf_runs WHERE id = %s", (run_id,)).fetchone()
    assert row == ("cancelled", "cancelled: duplicate order")
    failed_cleanly(ctl("cancel", "not-a-run"), "E-RUN-NOT-FOUND")


def test_retry_re_drives_and_refuses_what_it_cannot(ctl: Cli, db: psycopg.Connection):
    active = ok(ctl("start", "wait_gate")).strip()
    assert "cancel it first" in failed_cleanly(ctl("retry", active), "E-RUN-ACTIVE")
    ok(ctl("cancel", active))

    unknown_state = ctl("retry", active, "--from-state", "nowhere")
    assert "nowhere" in failed_cleanly(unknown_state, "E-UNKNOWN-STATE")
    assert run_row(db, active)[0] == "cancelled"
    out = ok(ctl("retry", active, "--from-state", "park"))

    assert out.strip() == f"re-driven run {active}: pending in state 'park'"
    assert run_row(db, active) == ("pending", "park", 3)
    db.execute(
        "UPDATE lf_runs SET status = 'completed', finished_at = now() WHERE id = %s", (active,)
    )
    failed_cleanly(ctl("retry", active), "E-RUN-COMPLETED")


def test_start_takes_a_priority(ctl: Cli, db: psycopg.Connection):
    run_id = ok(ctl("start", "wait_gate", "--priority", "8")).strip()

    assert db.execute("SELECT priority FROM lf_runs WHERE id = %s", (run_id,)).fetchone() == (8,)
    failed_cleanly(ctl("start", "wait_gate", "--priority", "10"), "E-USAGE", exit_code=2)
