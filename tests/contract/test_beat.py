"""What beat asks of the store: the reaper and the dispatcher act once, however many
beats call them at once."""

from __future__ import annotations

from functools import partial

from leaseflow import errors
from tests.contract.workflows import DISPATCH_TIMEOUT, TTL, fan, fork, linear, move


def test_the_reaper_requeues_while_attempts_remain_then_fails_the_run(env):
    # Given: a state with two attempts, whose first worker vanished
    run_id = env.start(linear)
    first = env.claim(run_id, owner="w1")
    env.age(TTL + 1)

    # When
    (requeued,) = env.store.reap()

    # Then
    assert (requeued.run_id, requeued.workflow, requeued.version, requeued.state) == (
        run_id,
        "contract_linear",
        1,
        "first",
    )
    assert (requeued.step_seq, requeued.status, requeued.attempt, requeued.lease_owner) == (
        2,
        "pending",
        1,
        "w1",
    )
    assert env.store.reap() == []

    # When: the second attempt's worker vanishes too
    second = env.claim(run_id, 2, owner="w2")
    assert second.attempt == 2
    env.age(TTL + 1)
    (failed,) = env.store.reap()

    # Then
    assert (failed.step_seq, failed.status, failed.attempt, failed.lease_owner) == (
        3,
        "failed",
        2,
        "w2",
    )
    run = env.store.get_run(run_id)
    assert (run.status, run.error_code, run.step_seq) == ("failed", errors.LEASE_EXPIRED, 3)
    assert run.error == "lease expired on attempt 2 of 2 in state first"
    assert run.finished_at is not None and run.lease_owner is None
    assert [
        (s.seq, s.state, s.attempt, s.outcome, s.worker, s.lease_token, s.error) for s in run.steps
    ] == [
        (1, "first", 1, "lease_expired", "w1", first.lease_token, "lease of w1 expired"),
        (2, "first", 2, "lease_expired", "w2", second.lease_token, "lease of w2 expired"),
    ]
    assert all(s.started_at is not None and s.duration_ms is None for s in run.steps)
    assert env.store.claim(run_id, 3, owner="w3", ttl=TTL) is None


def test_the_reaper_leaves_live_and_waiting_runs_alone(env):
    # Given: a live lease, a run waiting on its group, a pending run
    live = env.claim(env.start(linear))
    waiting = env.start(fan)
    env.store.commit(env.claim(waiting), fork(), worker="w1")
    env.start(linear)
    env.age(TTL - 1)

    # When / Then
    assert env.store.reap() == []
    assert env.store.commit(live, move("second"), worker="w1") is not None


def test_two_reapers_at_once_reap_each_lease_once(env):
    # Given
    run_ids = [env.start(linear) for _ in range(3)]
    for run_id in run_ids:
        env.claim(run_id)
    env.age(TTL + 1)

    # When
    batches = env.race([env.store.reap, env.store.reap])

    # Then
    reaped = [r.run_id for batch in batches for r in batch]
    assert sorted(reaped) == sorted(run_ids)
    for run_id in run_ids:
        run = env.store.get_run(run_id)
        assert (run.status, run.step_seq, len(run.steps)) == ("pending", 2, 1)


def test_a_pending_run_is_overdue_after_the_dispatch_timeout(env):
    # Given
    run_id = env.start(linear)
    claimed = env.start(linear)
    env.claim(claimed)
    assert env.store.overdue_runs() == []

    # When
    env.age(DISPATCH_TIMEOUT + 1)

    # Then
    (overdue,) = env.store.overdue_runs()
    assert (overdue.run_id, overdue.workflow, overdue.state) == (run_id, "contract_linear", "first")
    created = env.store.get_run(run_id).not_before  # when it was created (and published)
    assert abs((overdue.published_by - created).total_seconds()) < 1


def test_redispatch_hands_each_overdue_run_to_one_dispatcher(env):
    # Given
    run_ids = [env.start(linear) for _ in range(3)]
    env.age(DISPATCH_TIMEOUT + 1)
    overdue = [o.run_id for o in env.store.overdue_runs()]
    assert sorted(overdue) == sorted(run_ids)

    # When
    got = env.race([partial(env.store.redispatch_runs, overdue) for _ in range(2)])

    # Then
    due = [d for batch in got for d in batch]
    assert sorted(d.run_id for d in due) == sorted(run_ids)
    assert {(d.workflow, d.version, d.state, d.step_seq, d.countdown) for d in due} == {
        ("contract_linear", 1, "first", 1, 0.0)
    }
    assert env.store.overdue_runs() == []
    assert env.store.redispatch_runs(overdue) == []
    env.age(DISPATCH_TIMEOUT + 1)
    assert len(env.store.overdue_runs()) == 3


def test_redispatch_skips_a_run_claimed_meanwhile(env):
    # Given
    run_id = env.start(linear)
    env.age(DISPATCH_TIMEOUT + 1)
    assert [o.run_id for o in env.store.overdue_runs()] == [run_id]

    # When
    env.claim(run_id)

    # Then
    assert env.store.redispatch_runs([run_id]) == []


def test_overdue_branches_are_redispatched_once(env):
    # Given: a Map group of three, one at a time
    run_id = env.start(fan)
    group_id = env.store.commit(
        env.claim(run_id), fork(("square",) * 3, items=(1, 2, 3), window=1), worker="w1"
    ).group_id
    env.age(DISPATCH_TIMEOUT + 1)

    # When
    (overdue,) = env.store.overdue_branches()
    got = env.race([partial(env.store.redispatch_branches, [(group_id, 0)]) for _ in range(2)])

    # Then: only the released branch is overdue; held ones have no message yet
    assert (overdue.group_id, overdue.idx, overdue.workflow, overdue.state) == (
        group_id,
        0,
        "contract_fan",
        "square",
    )
    (due,) = [d for batch in got for d in batch]
    assert (due.run_id, due.group_id, due.idx, due.workflow, due.state) == (
        run_id,
        group_id,
        0,
        "contract_fan",
        "square",
    )
    assert env.store.overdue_branches() == []


def test_a_probe_on_its_way_blocks_a_second_one(env):
    # Given
    sent = env.store.send_probe("q")
    assert sent is not None

    # When
    second = env.race([partial(env.store.send_probe, "q") for _ in range(2)])

    # Then
    assert second == [None, None]
    assert env.store.queue_marks(["q", "other"]) == {}
    assert env.store.send_probe("other") is not None


def test_a_probe_that_came_through_marks_its_queue(env):
    # Given
    sent = env.store.send_probe("q")

    # When
    env.store.probe_passed("q", sent)

    # Then
    assert env.store.queue_marks(["q"]) == {"q": sent}
    again = env.store.send_probe("q")
    assert again is not None and again >= sent
    env.store.probe_passed("q", sent)  # a late duplicate never moves the mark back
    assert env.store.queue_marks(["q"]) == {"q": sent}


def test_a_probe_lost_for_the_dispatch_timeout_is_sent_again(env):
    # Given
    assert env.store.send_probe("q") is not None
    assert env.store.send_probe("q") is None

    # When
    env.age(DISPATCH_TIMEOUT + 1)

    # Then
    assert env.store.send_probe("q") is not None
    assert env.store.send_probe("q") is None
