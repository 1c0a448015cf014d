"""Parallel and Map groups: branch leases, failure policies, the Map window, and the
join that happens exactly once."""

from __future__ import annotations

from functools import partial

from leaseflow import errors
from leaseflow.fsm import rules
from leaseflow.store.base import LeaseRef
from leaseflow.store.records import BranchRef
from tests.contract.workflows import TTL, broken, done, fan, fork


def forked(env, transition=None):
    """A run of ``fan`` waiting on the group its first step forked: (run_id, group_id)."""
    run_id = env.start(fan)
    committed = env.store.commit(env.claim(run_id), transition or fork(), worker="w1")
    assert committed is not None and committed.group_id is not None
    assert committed.step_seq == 2
    return run_id, committed.group_id


def claim_branch(env, group_id, idx, owner="w1"):
    branch = env.store.claim_branch(group_id, idx, owner=owner, ttl=TTL)
    assert branch is not None, f"branch {idx} of group {group_id} could not be claimed"
    return branch


def test_a_branch_claim_carries_the_group_snapshot(env):
    # Given
    run_id, group_id = forked(env, fork(("square", "square"), items=({"x": 2}, {"x": 3})))

    # When
    branch = claim_branch(env, group_id, 1)

    # Then
    assert (branch.group_id, branch.idx, branch.run_id, branch.workflow, branch.version) == (
        group_id,
        1,
        run_id,
        "contract_fan",
        1,
    )
    assert (branch.state, branch.attempt, branch.max_attempts, branch.kind) == (
        "square",
        1,
        3,
        "map",
    )
    assert branch.item == {"x": 3} and branch.input == {} and branch.context_version == 1
    assert env.store.claim_branch(group_id, 1, owner="w2", ttl=TTL) is None
    peek = env.store.peek_branch(group_id, 1)
    assert peek is not None
    assert (peek.status, peek.run_id, peek.workflow, peek.state) == (
        "running",
        run_id,
        "contract_fan",
        "square",
    )
    assert env.store.peek_branch(group_id, 7) is None


def test_the_join_happens_exactly_once_when_the_last_branches_race(env):
    for _ in range(20):
        # Given: both branches of a group claimed
        run_id, group_id = forked(env)
        branches = [claim_branch(env, group_id, idx) for idx in (0, 1)]

        # When: both commit their result at once
        commit = env.store.commit_branch
        results = env.race(
            [partial(commit, group_id, b.idx, b.lease_token, done(b.idx)) for b in branches]
        )

        # Then: one of them moved the run to its join, once
        assert all(r is not None and r.run_id == run_id for r in results)
        joins = [r.join for r in results if r.join is not None]
        assert len(joins) == 1
        assert (joins[0].workflow, joins[0].state, joins[0].step_seq) == (
            "contract_fan",
            "gathered",
            2,
        )
        run = env.store.get_run(run_id)
        assert (run.state, run.prev_state, run.status, run.step_seq) == (
            "gathered",
            "spread",
            "pending",
            2,
        )
        (group,) = run.groups
        assert (group.status, group.done, group.failed) == ("joined", 2, 0)
        assert len(run.steps) == 1
        join = env.claim(run_id, 2)
        assert (join.state, join.group_id, join.attempt) == ("gathered", group_id, 1)
        assert env.store.claim(run_id, 2, owner="w2", ttl=TTL) is None
        assert [(b.idx, b.result) for b in env.store.branch_results(group_id)] == [(0, 0), (1, 1)]


def test_fail_fast_fails_the_run_and_cancels_the_other_branches(env):
    # Given: three branches, two of them running
    run_id, group_id = forked(env, fork(("leg", "leg", "leg")))
    failing, sibling = claim_branch(env, group_id, 0), claim_branch(env, group_id, 1)

    # When
    outcome = env.store.commit_branch(group_id, 0, failing.lease_token, broken("ValueError: x"))

    # Then
    assert outcome is not None and outcome.parent_failed and outcome.join is None
    run = env.store.get_run(run_id)
    assert (run.status, run.error_code, run.step_seq) == ("failed", errors.BRANCH_FAILED, 3)
    assert run.error == "branch 0 failed: ValueError: x" and run.finished_at is not None
    step = run.steps[-1]
    assert (step.seq, step.state, step.outcome, step.error) == (
        2,
        "spread",
        "failed",
        "branch 0 failed: ValueError: x",
    )
    assert [b.status for b in run.groups[0].branches] == ["failed", "cancelled", "cancelled"]
    assert run.groups[0].status == "failed"
    assert env.store.commit_branch(group_id, 1, sibling.lease_token, done(1)) is None
    assert env.store.claim_branch(group_id, 2, owner="w1", ttl=TTL) is None


def test_collect_joins_with_the_errors_of_failed_branches(env):
    # Given
    run_id, group_id = forked(env, fork(policy="collect"))
    first, second = claim_branch(env, group_id, 0), claim_branch(env, group_id, 1)

    # When
    failed = env.store.commit_branch(group_id, 0, first.lease_token, broken("KeyError: k"))
    joined = env.store.commit_branch(group_id, 1, second.lease_token, done({"ok": 1}))

    # Then
    assert failed is not None and not failed.parent_failed and failed.join is None
    assert joined is not None and joined.join is not None and joined.join.state == "gathered"
    results = env.store.branch_results(group_id)
    assert [(r.idx, r.status, r.result, r.error) for r in results] == [
        (0, "failed", None, "KeyError: k"),
        (1, "completed", {"ok": 1}, None),
    ]
    run = env.store.get_run(run_id)
    assert (run.state, run.status, run.groups[0].done, run.groups[0].failed) == (
        "gathered",
        "pending",
        1,
        1,
    )


def test_the_map_window_releases_one_held_branch_per_final_branch(env):
    # Given: four items, two at a time
    run_id, group_id = forked(env, fork(("square",) * 4, items=(1, 2, 3, 4), window=2))
    assert env.store.claim_branch(group_id, 2, owner="w1", ttl=TTL) is None  # held
    assert env.store.peek_branch(group_id, 3).status == "held"
    first = claim_branch(env, group_id, 0)

    # When
    freed = env.store.commit_branch(group_id, 0, first.lease_token, done(1))

    # Then
    assert freed is not None and freed.released == (BranchRef(2, "square"),)
    assert env.store.peek_branch(group_id, 3).status == "held"
    outcomes = []
    for idx in (1, 2, 3):
        branch = claim_branch(env, group_id, idx)
        outcomes.append(env.store.commit_branch(group_id, idx, branch.lease_token, done(idx)))
    assert outcomes[0].released == (BranchRef(3, "square"),)
    assert outcomes[1].released == () and outcomes[1].join is None
    assert outcomes[2].join is not None
    assert env.store.get_run(run_id).state == "gathered"


def test_a_branch_retry_waits_for_its_delay(env):
    # Given
    _, group_id = forked(env)
    branch = claim_branch(env, group_id, 0)

    # When
    again = env.store.commit_branch(
        group_id, 0, branch.lease_token, rules.BranchDecision("retry", error="E", delay=5)
    )

    # Then
    assert again is not None and again.retry_state == "leg" and again.join is None
    assert env.store.claim_branch(group_id, 0, owner="w1", ttl=TTL) is None
    peek = env.store.peek_branch(group_id, 0)
    assert peek.status == "pending" and 4 < peek.wait_seconds <= 5
    env.age(6)
    assert claim_branch(env, group_id, 0).attempt == 2


def test_an_expired_branch_lease_is_reaped_once(env):
    # Given: a branch whose worker vanished, and one kept alive by its heartbeat
    _, group_id = forked(env)
    lost, kept = claim_branch(env, group_id, 0, "w1"), claim_branch(env, group_id, 1, "w2")
    env.age(TTL / 2)
    ref = LeaseRef(kept.run_id, kept.lease_token, group_id, 1)
    assert env.store.heartbeat([ref], worker="w2", ttl=TTL) == {kept.lease_token}
    env.age(TTL / 2 + 1)

    # When
    (expired,) = env.store.expired_branches()
    decision = rules.reap_branch(expired.attempt, expired.max_attempts, expired.lease_owner)
    reaped = env.store.commit_branch(group_id, 0, expired.lease_token, decision, expired=True)

    # Then
    assert (expired.group_id, expired.idx, expired.lease_token, expired.lease_owner) == (
        group_id,
        0,
        lost.lease_token,
        "w1",
    )
    assert (expired.attempt, expired.max_attempts, expired.state, expired.workflow) == (
        1,
        2,
        "leg",
        "contract_fan",
    )
    assert reaped is not None and reaped.retry_state == "leg"
    assert env.store.expired_branches() == []
    assert env.store.commit_branch(group_id, 0, lost.lease_token, done(0)) is None
    assert env.store.commit_branch(group_id, 0, lost.lease_token, decision, expired=True) is None
    assert env.store.commit_branch(group_id, 1, kept.lease_token, done(1)) is not None
    assert claim_branch(env, group_id, 0).attempt == 2
