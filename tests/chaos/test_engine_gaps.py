"""Engine gaps the chaos suite ran into: each test states the documented behaviour.
Fixed: in_commit in a branch; a commit and a claim on dropped connections; two branch
commits of one group deadlocked when one of them failed (fail_fast cancelled its
siblings' rows while a sibling held its row and waited for the group row): every final
branch commit now locks the group row first. A reaped run re-claimed the resource lock
its reaped attempt still held, under the same token and fence (F-21): the reaper now
frees (and audits) the lock of every attempt it reaps, so the next one takes it again
under a higher fence."""

from __future__ import annotations

import threading

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


def test_a_failing_branch_and_a_committing_one_do_not_deadlock(pg_template):
    # Given a run forked into two branches: keep completes, drop fails (fail_fast)
    with scratch_engine(pg_template) as engine:
        run_id = engine.start(workflows.split, {})
        group_id = engine.runner.run_step(run_id, 1).fork.group_id
        inside, go = threading.Event(), threading.Event()
        workflows.IN_KEEP_COMMIT.append(lambda: (inside.set(), go.wait(15)))
        outcome: dict[int, object] = {}

        def run(idx: int) -> None:
            try:
                outcome[idx] = engine.runner.run_branch(group_id, idx).result
            except Exception as exc:
                outcome[idx] = exc

        # When keep's commit is inside its transaction (its branch row written), drop
        # fails meanwhile (it closes the group, then waits to cancel keep's row), and
        # keep's commit goes on to count itself on the group row
        keeper = threading.Thread(target=run, args=(0,))
        dropper = threading.Thread(target=run, args=(1,))
        try:
            keeper.start()
            assert inside.wait(15), "keep's commit never reached its in_commit callback"
            dropper.start()
            eventually(
                lambda: engine.conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND application_name = 'chaos-inprocess'"
                ).fetchone()[0],
                timeout=15,
                message="drop's commit waiting for the group row keep holds",
            )
        finally:
            go.set()
            keeper.join(30)
            dropper.join(30)
            workflows.IN_KEEP_COMMIT.clear()
        run = engine.conn.execute("SELECT status, error_code FROM lf_runs").fetchone()

    # Then the two commits serialise: neither dies of a deadlock, and the run fails
    # with E-BRANCH-FAILED (keep's result committed first, or keep cancelled)
    assert not any(isinstance(v, Exception) for v in outcome.values()), outcome
    assert run == ("failed", "E-BRANCH-FAILED")


def test_a_reaped_attempt_s_lock_is_not_kept_under_its_fence(pg_template):
    # Given a run whose state holds lock chaos:k0 (fence 1), claimed by a worker that
    # then froze: its lease ran out, and beat's reaper made the run pending again
    # (the dead-worker reaper does this before the lock itself expires)
    from leaseflow import claims
    from leaseflow.store.records import Claim

    with scratch_engine(pg_template) as engine:
        run_id = engine.start(workflows.locked, {"pause": 0.0, "slow": 0.0, "key": "k0"})
        first = engine.runner.handle(messages_step(run_id, 1))
        assert first.result == "committed"
        frozen = claims.claim_step(
            engine.store, run_id, 2, owner="frozen:1", ttl=30, workflow="chaos_lock", state="hold"
        )
        assert isinstance(frozen, Claim) and frozen.lock_fence == 1
        engine.conn.execute(
            "UPDATE lf_runs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
            (run_id,),
        )
        assert len(engine.store.reap()) == 1

        # When another worker claims the run again
        again = claims.claim_step(
            engine.store, run_id, 3, owner="fresh:2", ttl=30, workflow="chaos_lock", state="hold"
        )
        audit = engine.store.lock_audit("chaos:k0")

    # Then it does not hold the lock under the frozen attempt's token and fence, which
    # the frozen attempt still uses (README: "Each acquisition of a key gets a higher
    # fence"; lock_sql.ACQUIRE: "re-acquired after a reaped attempt: the fence grows"):
    # either it waits until the lock is freed (swept, audited) or it gets fence 2
    assert isinstance(again, Claim), again
    assert (again.lock_token, again.lock_fence) != (frozen.lock_token, frozen.lock_fence), audit


def messages_step(run_id: str, seq: int):
    from leaseflow import messages

    return messages.StateStep(run_id, workflows.locked.name, "", seq)
