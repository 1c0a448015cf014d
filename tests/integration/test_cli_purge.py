"""``leaseflow purge`` against a real database: by age (dry or not), one run (forced
when active, its worker then fenced off), and the usage errors of a bad command line."""

from __future__ import annotations

import json

import psycopg
import pytest

from leaseflow.fsm import checkpoint
from leaseflow.fsm.rules import Transition
from leaseflow.store.postgres import PostgresStore
from leaseflow.types import StepOutcome
from tests.integration.test_cli import Cli, bare_cli, cli, failed_cleanly, ok

__all__ = ["bare_cli", "cli"]  # the fixtures this module uses

TABLES = ("lf_runs", "lf_steps", "lf_signals", "lf_artifacts")


def finished(cli: Cli, db: psycopg.Connection, *, days_ago: float) -> str:
    """A run cancelled ``days_ago`` days ago, with a stored signal and an artifact."""
    run_id = ok(cli("start", "linear5", "--input", '{"n": 1}')).strip()
    ok(cli("signal", run_id, "note"))
    ok(cli("cancel", run_id))
    db.execute(
        "INSERT INTO lf_artifacts (run_id, name, codec, data, size_bytes, stored_bytes, sha256)"
        " VALUES (%s, 'report', 0, 'x', 1, 1, 'x')",
        (run_id,),
    )
    db.execute(
        "UPDATE lf_runs SET finished_at = finished_at - make_interval(days => %s) WHERE id = %s",
        (days_ago, run_id),
    )
    return run_id


def rows(db: psycopg.Connection, run_id: str) -> dict[str, int]:
    """The run's rows, by table."""
    out = {}
    for table in TABLES:
        column = "id" if table == "lf_runs" else "run_id"
        found = db.execute(f"SELECT count(*) FROM {table} WHERE {column} = %s", (run_id,))
        out[table] = found.fetchone()[0]
    return out


ALL = dict.fromkeys(TABLES, 1)
NONE = dict.fromkeys(TABLES, 0)


def test_a_dry_run_counts_and_a_purge_deletes_the_old_finished_runs(
    cli: Cli, db: psycopg.Connection
):
    # Given two runs cancelled ten days ago, one cancelled yesterday, one still pending
    old = [finished(cli, db, days_ago=10) for _ in range(2)]
    recent = finished(cli, db, days_ago=1)
    active = ok(cli("start", "linear5")).strip()

    # When a dry run asks what a week's retention would delete
    dry = ok(cli("purge", "--older-than", "7d", "--dry-run"))
    as_json = json.loads(ok(cli("purge", "--older-than", "1w", "--dry-run", "--json")))

    # Then it says, and deletes nothing
    assert dry == (
        "would purge 2 runs finished more than 7d ago (completed, failed, cancelled, "
        "timed_out): 2 steps, 0 groups, 0 branches, 2 signals, 2 artifacts\n"
    )
    assert as_json == {
        "runs": 2,
        "steps": 2,
        "groups": 0,
        "branches": 0,
        "signals": 2,
        "artifacts": 2,
        "run_ids": as_json["run_ids"],
        "dry_run": True,
        "total": 8,
    }
    assert sorted(as_json["run_ids"]) == sorted(old)
    assert [rows(db, run_id) for run_id in old] == [ALL, ALL]

    # When the purge runs for real
    out = ok(cli("purge", "--older-than", "6d12h", "--status", "cancelled,failed"))

    # Then the old runs are gone with all their rows; the others are whole
    assert out.startswith("purged 2 runs finished more than 6d12h ago (cancelled, failed): ")
    assert [rows(db, run_id) for run_id in old] == [NONE, NONE]
    assert rows(db, recent) == ALL
    assert rows(db, active)["lf_runs"] == 1
    again = json.loads(ok(cli("purge", "--older-than", "604800", "--json")))
    assert (again["runs"], again["total"], again["dry_run"]) == (0, 0, False)


def test_purge_run_id_deletes_one_run_and_refuses_an_active_one_unless_forced(
    cli: Cli, db: psycopg.Connection, database_url: str
):
    done = finished(cli, db, days_ago=0)
    running = ok(cli("start", "linear5")).strip()
    store = PostgresStore(database_url)
    try:
        claim = store.claim(running, 1, owner="w1", ttl=60)
        assert claim is not None

        # A finished run goes at once, whatever its age
        out = json.loads(ok(cli("purge", done, "--json")))
        assert (out["runs"], out["steps"], out["run_ids"]) == (1, 1, [done])
        assert rows(db, done) == NONE
        assert "no run" in failed_cleanly(cli("purge", done), "E-RUN-NOT-FOUND")

        # A running one only with --force
        refused = failed_cleanly(cli("purge", running), "E-RUN-ACTIVE")
        assert f"run {running} is running: cancel it first or purge with --force" in refused
        assert rows(db, running)["lf_runs"] == 1
        forced = ok(cli("purge", running, "--force"))
        assert forced.startswith(f"purged run {running}: 0 steps, ")
        assert rows(db, running) == NONE

        # and its worker's commit is fenced off: it lands nowhere, raises nothing
        move = Transition(
            outcome=StepOutcome.NEXT,
            status="pending",
            next_state="s2",
            max_attempts=3,
            checkpoint=checkpoint.encode({"n": 0, "trail": ["s1"]}, limit=1_000_000),
        )
        assert store.commit(claim, move, worker="w1") is None
        assert rows(db, running) == NONE
    finally:
        store.close()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--older-than", "7x"], "Invalid value for '--older-than': '7x' is not a duration"),
        (["--older-than", "-1d"], "Invalid value for '--older-than'"),
        (["--older-than", ""], "Invalid value for '--older-than'"),
        (["--older-than", "d7"], "Invalid value for '--older-than'"),
        (["--older-than", "7d", "--status", "running"], "Invalid value for '--status'"),
        ([], "give --older-than DURATION"),
        (["00000000-0000-4000-8000-000000000000", "--older-than", "7d"], "not both"),
        (["00000000-0000-4000-8000-000000000000", "--dry-run"], "go with --older-than"),
        (["--older-than", "7d", "--force"], "--force goes with RUN_ID"),
    ],
)
def test_a_malformed_purge_is_a_usage_error_and_deletes_nothing(
    cli: Cli, db: psycopg.Connection, args: list[str], says: str
):
    run_id = finished(cli, db, days_ago=30)

    message = failed_cleanly(cli("purge", *args), "E-USAGE", exit_code=2)

    assert says in message and "leaseflow purge --help" in message
    assert rows(db, run_id) == ALL
