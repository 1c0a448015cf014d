"""Engine gaps the chaos suite ran into, now fixed: each test states the documented
behaviour (in_commit in a branch; a commit and a claim on dropped connections)."""

from __future__ import annotations

import pytest

from leaseflow import faults
from tests.chaos import workflows
from tests.chaos.inprocess import scratch_engine
from tests.helpers import eventually

pytestmark = pytest.mark.chaos


def test_a_branch_effect_commits_with_the_branch(pg_template):
    # Given a run whose 3 branches each write an effect through ctx.in_commit
    with scratch_engine(pg_template) as engine:
        run_id = engine.start(workflows.marked, {"width": 3, "pause": 0.0})

        # When the run completes
        engine.drive([run_id])
        status = engine.conn.execute("SELECT status FROM lf_runs").fetchone()
        effects = engine.conn.execute(
            "SELECT (detail ->> 'index')::int FROM chaos_effects WHERE state = 'mark' ORDER BY 1"
        ).fetchall()

    # Then each branch's effect committed with its result, once (DESIGN §1: in_commit
    # "commits exactly once, together with the transition")
    assert status == ("completed",)
    assert effects == [(0,), (1,), (2,)]


def _kill_pool_connections(engine) -> None:
    """F-7 in miniature: terminate the runner's pooled connections, and wait until gone."""
    sql = (
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'chaos-inprocess'"
    )
    pids = [row[0] for row in engine.conn.execute(sql).fetchall()]
    for pid in pids:
        engine.conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    eventually(lambda: not engine.conn.execute(sql).fetchall(), timeout=5, message="backends gone")


def test_a_commit_survives_a_dropped_connection_while_the_lease_holds(pg_template):
    # Given a run claimed by this worker, its lease valid for 30 s
    with scratch_engine(pg_template) as engine:
        run_id = engine.start(workflows.linear, {"pause": 0.0})
        fired: list[object] = []

        def drop_connections(info: dict[str, object]) -> None:
            if not fired:
                fired.append(info)
                _kill_pool_connections(engine)

        # When its pooled database connections are terminated just before the commit
        faults.arm("before_commit", drop_connections)
        try:
            result = engine.runner.run_step(run_id, 1)
        finally:
            faults.disarm("before_commit")
        row = engine.conn.execute(
            "SELECT r.status, r.step_seq, w.leases_lost FROM lf_runs r "
            "LEFT JOIN lf_workers w ON w.id = 'inprocess:1'"
        ).fetchone()

    # Then the fenced commit is retried on a fresh connection and lands: the lease
    # was never lost, so nothing is counted as a fenced rejection
    assert fired, "the fault point was not reached"
    assert result.result == "committed", (result, row)
    assert row[:2] == ("pending", 2) and not row[2], row


def test_a_claim_survives_dropped_idle_connections(pg_template):
    # Given a pending run, and this worker's idle pooled connections dropped by the server
    with scratch_engine(pg_template) as engine:
        run_id = engine.start(workflows.linear, {"pause": 0.0})
        engine.store.peek(run_id)  # the pool holds an idle connection now
        _kill_pool_connections(engine)

        # When the worker receives the run's message
        result = engine.runner.run_step(run_id, 1)

    # Then it claims on a fresh connection and runs the step
    assert result.result == "committed", result
