"""Cancel, re-drive, run deadlines, versions and priority: what the store does to a
run from outside its lease, and what its lease holder then finds."""

from __future__ import annotations

import uuid

import pytest

from leaseflow import errors
from leaseflow.fsm import rules
from leaseflow.store.base import LeaseRef
from tests.contract.test_waits import waiting
from tests.contract.workflows import (
    CHECKPOINT,
    TTL,
    broken,
    complete,
    fan,
    fork,
    linear,
    move,
    waiter,
)


def outcomes(env, run_id) -> list[str]:
    return [s.outcome for s in env.store.get_run(run_id).steps]


def test_cancel_ends_a_pending_or_waiting_run_at_once_and_is_idempotent(env):
    pending = env.start(linear)
    parked = waiting(env)

    first = [env.store.cancel(pending, "no longer needed"), env.store.cancel(parked)]
    again = env.store.cancel(pending)

    assert [(c.result, c.run_status) for c in first] == [("cancelled", "cancelled")] * 2
    assert (again.result, again.run_status) == ("finished", "cancelled")
    run = env.store.get_run(pending)
    assert (run.status, run.error_code, run.error) == (
        "cancelled",
        "E-CANCELLED",
        "cancelled: no longer needed",
    )
    assert run.finished_at is not None and outcomes(env, pending) == ["cancelled"]
    assert outcomes(env, parked) == ["wait", "cancelled"]
    assert env.store.claim(pending, 1, owner="w1", ttl=TTL) is None
    with pytest.raises(errors.RunFinished):
        env.store.signal(parked, "approval", None, signal_id="s")
    with pytest.raises(errors.RunNotFound):
        env.store.cancel(str(uuid.uuid4()))


def test_a_running_state_learns_of_a_cancel_and_its_commit_ends_the_run(env):
    run_id = env.start(linear)
    claim = env.claim(run_id)

    asked = env.store.cancel(run_id, "stop")
    beat = env.store.heartbeat([LeaseRef(run_id, claim.lease_token)], worker="w1", ttl=TTL)
    committed = env.store.commit(claim, move("second"), worker="w1")

    assert (asked.result, asked.run_status) == ("requested", "running")
    assert claim.lease_token in beat and claim.lease_token in beat.cancelled
    assert committed is not None and committed.ended == "cancelled"
    run = env.store.get_run(run_id)
    assert (run.status, run.state, run.error_code) == ("cancelled", "first", "E-CANCELLED")
    assert outcomes(env, run_id) == ["cancelled"]
    assert env.store.get_run(run_id).steps[0].lease_token == claim.lease_token


def test_a_cancel_requested_run_whose_worker_died_is_cancelled_by_the_reaper(env):
    run_id = env.start(linear)
    env.claim(run_id)
    env.store.cancel(run_id)

    env.age(TTL + 1)
    (reaped,) = env.store.reap()

    assert reaped.status == "cancelled"
    assert env.store.get_run(run_id).status == "cancelled"


def test_cancelling_a_forked_run_stops_its_branches(env):
    run_id = env.start(fan)
    env.store.commit(env.claim(run_id), fork(), worker="w1")
    group_id = env.store.get_run(run_id).groups[0].id
    running = env.store.claim_branch(group_id, 0, owner="w2", ttl=TTL)
    assert running is not None

    env.store.cancel(run_id)

    run = env.store.get_run(run_id)
    assert run.status == "cancelled" and run.groups[0].status == "cancelled"
    assert [b.status for b in run.groups[0].branches] == ["cancelled", "cancelled"]
    ref = LeaseRef(run_id, running.lease_token, group_id, 0)
    beat = env.store.heartbeat([ref], worker="w2", ttl=TTL)
    assert running.lease_token not in beat and running.lease_token in beat.cancelled
    assert env.store.commit_branch(group_id, 0, running.lease_token, broken()) is None
    assert env.store.claim_branch(group_id, 1, owner="w2", ttl=TTL) is None


def test_retry_re_drives_a_failed_run_at_its_state_with_a_fresh_budget(env):
    run_id = env.start(linear)
    env.store.commit(env.claim(run_id), move("second"), worker="w1")
    failure = rules.failure("E-X", "boom", attempt=1, max_attempts=1)
    env.store.commit(env.claim(run_id, 2), failure, worker="w1")
    assert env.store.get_run(run_id).status == "failed"

    due = env.store.redrive(run_id, max_attempts=3)

    run = env.store.get_run(run_id)
    assert (run.status, run.state, run.attempt, run.max_attempts) == ("pending", "second", 0, 3)
    assert (run.error_code, run.error, run.finished_at) == (None, None, None)
    assert (due.state, due.step_seq) == ("second", run.step_seq)
    assert run.steps[-1].outcome == "redriven" and run.steps[-1].next_state == "second"
    assert env.claim(run_id, run.step_seq).attempt == 1


def test_retry_from_a_named_state_and_the_refusals(env):
    done = env.start(linear)
    env.store.commit(env.claim(done), complete("ok"), worker="w1")
    active = env.start(linear)
    cancelled = env.start(linear)
    env.store.cancel(cancelled)

    with pytest.raises(errors.RunCompleted):
        env.store.redrive(done)
    with pytest.raises(errors.RunActive):
        env.store.redrive(active)
    with pytest.raises(errors.UnknownState):
        env.store.redrive(cancelled, from_state="nowhere")
    assert env.store.get_run(cancelled).status == "cancelled"  # nothing changed
    due = env.store.redrive(cancelled, from_state="third")

    assert due.state == "third"
    assert env.claim(cancelled, due.step_seq).state == "third"


def test_a_run_past_its_deadline_times_out_whatever_it_was_doing(env):
    pending = env.start(waiter)
    parked = waiting(env)
    running = env.start(waiter)
    claim = env.claim(running)

    env.age(601)
    ended = {row.run_id: row for row in env.store.sweep_deadlines()}

    assert set(ended) == {pending, parked, running}
    for run_id in (pending, parked, running):
        run = env.store.get_run(run_id)
        assert (run.status, run.error_code) == ("timed_out", "E-RUN-TIMEOUT")
    assert env.store.commit(claim, move("yes"), worker="w1") is None  # fenced out
    assert env.store.sweep_deadlines() == []


def test_a_commit_past_the_deadline_ends_the_run_timed_out(env):
    run_id = env.start(waiter)
    claim = env.claim(run_id)
    env.store.heartbeat([LeaseRef(run_id, claim.lease_token)], worker="w1", ttl=1000)
    env.age(601)

    assert env.store.claim(env.start(waiter), 1, owner="w", ttl=TTL) is not None
    committed = env.store.commit(claim, move("yes"), worker="w1")

    assert committed is not None and committed.ended == "timed_out"
    assert env.store.get_run(run_id).error_code == "E-RUN-TIMEOUT"


def test_a_claim_past_the_deadline_claims_nothing(env):
    run_id = env.start(waiter)
    env.age(601)

    assert env.store.claim(run_id, 1, owner="w1", ttl=TTL) is None
    assert env.store.peek(run_id).past_deadline


def test_retry_gives_a_timed_out_run_a_new_deadline(env):
    run_id = env.start(waiter)
    env.age(601)
    env.store.sweep_deadlines()

    due = env.store.redrive(run_id, run_timeout=600)

    assert env.claim(run_id, due.step_seq).state == "ask"


def test_a_claim_for_other_versions_leaves_the_run_untouched(env):
    run_id = env.start(linear)

    assert env.store.claim(run_id, 1, owner="w1", ttl=TTL, versions=[2, 3]) is None
    run = env.store.get_run(run_id)
    assert (run.status, run.attempt) == ("pending", 0)
    assert env.store.peek(run_id).version == 1
    assert env.store.claim(run_id, 1, owner="w1", ttl=TTL, versions=[1]) is not None


def test_a_run_keeps_its_priority_in_every_claim_and_redispatch(env):
    created = env.store.create_run(
        run_id=str(uuid.uuid4()),
        wf=linear,
        checkpoint=CHECKPOINT,
        input={},
        idempotency_key=None,
        priority=7,
    )
    run_id = created.run_id

    claim = env.claim(run_id)
    env.store.commit(claim, move("second"), worker="w1")
    env.age(31)
    (due,) = env.store.redispatch_runs([run_id])

    assert claim.priority == 7 and due.priority == 7
    assert env.store.get_run(run_id).priority == 7
