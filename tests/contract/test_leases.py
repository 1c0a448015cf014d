"""Claims and fenced commits: one lease holder per step, and only its writes land."""

from __future__ import annotations

from functools import partial

import pytest

from leaseflow import errors
from leaseflow.store.base import LeaseRef
from tests.contract.workflows import TTL, complete, linear, move, retry


def test_a_step_is_claimed_once(env):
    # Given
    run_id = env.start(linear)

    # When
    contenders = [partial(env.store.claim, run_id, 1, owner=f"w{i}", ttl=TTL) for i in (1, 2)]
    claims = env.race(contenders)

    # Then
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1
    (claim,) = winners
    assert (claim.run_id, claim.workflow, claim.version, claim.state) == (
        run_id,
        "contract_linear",
        1,
        "first",
    )
    assert (claim.step_seq, claim.attempt, claim.max_attempts, claim.group_id) == (1, 1, 2, None)
    assert claim.input == {} and claim.context_version == 1
    assert env.store.claim(run_id, 1, owner="w3", ttl=TTL) is None
    run = env.store.get_run(run_id)
    assert (run.status, run.attempt, run.lease_owner) == (
        "running",
        1,
        f"w{claims.index(claim) + 1}",
    )
    assert run.lease_expires_at is not None


def test_a_stale_or_early_step_seq_claims_nothing(env):
    # Given: the run moved on to step 2
    run_id = env.start(linear)
    env.store.commit(env.claim(run_id), move("second"), worker="w1")

    # When / Then
    assert env.store.claim(run_id, 1, owner="w2", ttl=TTL) is None  # a stale message
    assert env.store.claim(run_id, 3, owner="w2", ttl=TTL) is None  # not there yet
    assert env.store.claim(run_id, 2, owner="w2", ttl=TTL) is not None


def test_a_commit_lands_once_and_a_stale_token_is_refused(env):
    # Given
    run_id = env.start(linear)
    claim = env.claim(run_id)

    # When
    committed = env.store.commit(claim, move("second"), worker="w1")
    again = env.store.commit(claim, move("second"), worker="w1")

    # Then
    assert committed is not None and committed.step_seq == 2
    assert committed.group_id is None and committed.handoff is None
    assert again is None
    run = env.store.get_run(run_id)
    assert (run.state, run.prev_state, run.status, run.step_seq) == (
        "second",
        "first",
        "pending",
        2,
    )
    assert (run.attempt, run.lease_owner, run.lease_expires_at) == (0, None, None)
    assert len(run.steps) == 1


def test_a_lease_taken_over_fences_out_its_old_holder(env):
    # Given: w1's lease ran out and the run was handed to w2
    run_id = env.start(linear)
    old = env.claim(run_id, owner="w1")
    env.age(TTL + 1)
    (reaped,) = env.store.reap()
    new = env.claim(run_id, reaped.step_seq, owner="w2")

    # When
    late = env.store.commit(old, move("second"), worker="w1")

    # Then
    assert late is None
    assert env.store.get_run(run_id).state == "first"
    assert env.store.commit(new, move("second"), worker="w2") is not None


def test_an_expired_lease_cannot_commit_nor_be_extended(env):
    # Given: a lease that ran out before the reaper came by
    run_id = env.start(linear)
    claim = env.claim(run_id)
    env.age(TTL + 1)

    # When
    extended = env.store.heartbeat([LeaseRef(run_id, claim.lease_token)], worker="w1", ttl=TTL)
    committed = env.store.commit(claim, move("second"), worker="w1")

    # Then
    assert extended == frozenset()
    assert committed is None
    run = env.store.get_run(run_id)
    assert (run.state, run.status, run.step_seq, run.steps) == ("first", "running", 1, ())


def test_the_heartbeat_extends_live_leases_and_omits_lost_ones(env):
    # Given: two live leases, and one that was taken over
    live = [env.claim(env.start(linear)) for _ in range(2)]
    lost_run = env.start(linear)
    lost = env.claim(lost_run)
    env.store.commit(lost, move("second"), worker="w1")
    env.age(TTL / 2)

    # When
    leases = [LeaseRef(c.run_id, c.lease_token) for c in [*live, lost]]
    extended = env.store.heartbeat(leases, worker="w1", ttl=TTL)

    # Then
    assert extended == {c.lease_token for c in live}
    env.age(TTL * 0.8)  # past the first expiry, within the extended one
    assert all(env.store.commit(c, move("second"), worker="w1") is not None for c in live)


def test_an_illegal_edge_is_refused_and_writes_nothing(env):
    # Given
    run_id = env.start(linear)
    claim = env.claim(run_id)

    # When
    with pytest.raises(errors.IllegalTransition) as refused:
        env.store.commit(claim, move("third"), worker="w1")

    # Then
    assert (refused.value.run_id, refused.value.from_state, refused.value.to_state) == (
        run_id,
        "first",
        "third",
    )
    run = env.store.get_run(run_id)
    assert (run.state, run.status, run.step_seq, run.steps) == ("first", "running", 1, ())
    assert env.store.commit(claim, move("second"), worker="w1") is not None


def test_a_retry_waits_for_its_delay(env):
    # Given
    run_id = env.start(linear)
    claim = env.claim(run_id)

    # When
    committed = env.store.commit(claim, retry(1, 2, delay=5), worker="w1")

    # Then
    assert committed is not None and committed.step_seq == 2
    assert env.store.claim(run_id, 2, owner="w1", ttl=TTL) is None
    peek = env.store.peek(run_id)
    assert peek is not None and (peek.status, peek.step_seq) == ("pending", 2)
    assert 4 < peek.wait_seconds <= 5
    (step,) = env.store.get_run(run_id).steps
    assert (step.seq, step.state, step.attempt, step.outcome, step.next_state, step.error) == (
        1,
        "first",
        1,
        "retry",
        None,
        "Traceback: boom",
    )
    env.age(6)
    again = env.claim(run_id, 2)
    assert (again.state, again.attempt) == ("first", 2)


def test_a_handoff_leases_the_next_state_to_the_committer(env):
    # Given
    run_id = env.start(linear)
    claim = env.claim(run_id)

    # When
    committed = env.store.commit(claim, move("second"), worker="w1", handoff_ttl=TTL)

    # Then
    assert committed is not None and committed.handoff is not None
    nxt = committed.handoff
    assert (nxt.run_id, nxt.state, nxt.step_seq, nxt.attempt) == (run_id, "second", 2, 1)
    assert nxt.lease_token != claim.lease_token
    run = env.store.get_run(run_id)
    assert (run.state, run.status, run.lease_owner, run.attempt) == ("second", "running", "w1", 1)
    assert env.store.claim(run_id, 2, owner="w2", ttl=TTL) is None
    assert env.store.heartbeat([LeaseRef(run_id, nxt.lease_token)], worker="w1", ttl=TTL) == {
        nxt.lease_token
    }
    done = env.store.commit(nxt, complete({"ok": True}), worker="w1")
    assert done is not None and done.step_seq == 3
    steps = env.store.get_run(run_id).steps
    assert [(s.seq, s.state, s.lease_token) for s in steps] == [
        (1, "first", claim.lease_token),
        (2, "second", nxt.lease_token),
    ]


def test_a_commit_fenced_out_is_counted_against_the_worker(env):
    # Given
    assert env.leases_lost("w9") == 0

    # When
    env.store.count_lease_lost("w9")
    env.store.count_lease_lost("w9")

    # Then
    assert env.leases_lost("w9") == 2
