"""New runs and reading them back: idempotency, all-or-none batches, records."""

from __future__ import annotations

import uuid

import pytest

from leaseflow import errors
from leaseflow.store.base import NewRun, RunStore
from leaseflow.types import StepOutcome
from tests.contract.workflows import CHECKPOINT, TTL, complete, done, fan, fork, linear, move


def test_the_store_implements_the_port(env):
    # Given / When / Then
    assert isinstance(env.store, RunStore)


def test_a_new_run_is_pending_in_the_initial_state(env):
    # Given / When
    run_id = env.start(linear, {"who": "ada"})

    # Then
    run = env.store.get_run(run_id)
    assert (run.workflow, run.version, run.state, run.prev_state) == (
        "contract_linear",
        1,
        "first",
        None,
    )
    assert (run.status, run.step_seq, run.attempt, run.max_attempts) == ("pending", 1, 0, 2)
    assert run.input == {"who": "ada"}
    assert run.finished_at is None and run.lease_owner is None and run.steps == ()
    peek = env.store.peek(run_id)
    assert peek is not None
    assert (peek.status, peek.step_seq, peek.workflow, peek.state) == (
        "pending",
        1,
        "contract_linear",
        "first",
    )
    assert peek.wait_seconds == 0


def test_an_idempotency_key_names_one_run(env):
    # Given
    def start(input):
        return env.store.create_run(
            run_id=str(uuid.uuid4()),
            wf=linear,
            checkpoint=CHECKPOINT,
            input=input,
            idempotency_key="order-42",
        )

    first = start({"amount": 5})

    # When
    again = start({"amount": 5})

    # Then
    assert first.created and not again.created
    assert again.run_id == first.run_id
    assert [r.id for r in env.store.list_runs()] == [first.run_id]
    with pytest.raises(errors.IdempotencyConflict) as conflict:
        start({"amount": 6})
    assert conflict.value.run_id == first.run_id
    assert len(env.store.list_runs()) == 1


def test_create_runs_is_all_or_none(env):
    # Given: a batch whose last run reuses the first one's id
    ids = [str(uuid.uuid4()) for _ in range(3)]
    batch = [NewRun(run_id, CHECKPOINT, {"i": i}) for i, run_id in enumerate(ids)]
    batch.append(NewRun(ids[0], CHECKPOINT, {"i": 3}))

    # When
    with pytest.raises(errors.RunExists):
        env.store.create_runs(wf=linear, runs=batch)

    # Then
    assert env.store.list_runs() == []
    for run_id in ids:
        with pytest.raises(errors.RunNotFound):
            env.store.get_run(run_id)
    env.store.create_runs(wf=linear, runs=batch[:3])
    assert sorted(r.id for r in env.store.list_runs()) == sorted(ids)
    assert {r.status for r in env.store.list_runs()} == {"pending"}


def test_get_run_of_an_unknown_or_malformed_id_raises(env):
    # Given / When / Then
    for run_id in (str(uuid.uuid4()), "not-a-uuid"):
        with pytest.raises(errors.RunNotFound) as missing:
            env.store.get_run(run_id)
        assert missing.value.run_id == run_id


def test_get_run_shows_the_step_log_and_groups(env):
    # Given: a run that moved, then forked
    run_id = env.start(fan)
    claim = env.claim(run_id)
    committed = env.store.commit(claim, fork(), worker="w1")
    assert committed is not None and committed.group_id is not None
    branch = env.store.claim_branch(committed.group_id, 1, owner="w2", ttl=TTL)
    assert branch is not None
    env.store.commit_branch(committed.group_id, 1, branch.lease_token, done(7))

    # When
    run = env.store.get_run(run_id)

    # Then
    assert (run.state, run.status, run.step_seq) == ("spread", "waiting", 2)
    (step,) = run.steps
    assert (step.seq, step.state, step.attempt, step.outcome, step.next_state) == (
        1,
        "spread",
        1,
        StepOutcome.FORK,
        None,
    )
    assert (step.worker, step.lease_token, step.error) == ("w1", claim.lease_token, None)
    assert step.started_at == claim.started_at and step.finished_at >= step.started_at
    assert step.duration_ms is not None and step.duration_ms >= 0
    (group,) = run.groups
    assert (group.id, group.kind, group.join_state, group.width) == (
        committed.group_id,
        "parallel",
        "gathered",
        2,
    )
    assert (group.done, group.failed, group.status, group.parent_seq) == (1, 0, "running", 1)
    assert (group.on_branch_error, group.max_concurrency) == ("fail_fast", None)
    assert [(b.idx, b.state, b.status, b.result) for b in group.branches] == [
        (0, "leg", "pending", None),
        (1, "leg", "completed", 7),
    ]
    light = env.store.get_run(run_id, with_steps=False)
    assert light.steps == () and light.groups == ()


def test_a_completed_run_keeps_its_output(env):
    # Given
    run_id = env.start(linear)
    env.store.commit(env.claim(run_id), move("second"), worker="w1")

    # When
    env.store.commit(env.claim(run_id, 2), complete({"answer": 42}), worker="w1")

    # Then
    run = env.store.get_run(run_id)
    assert (run.state, run.prev_state, run.status, run.step_seq) == (
        "second",
        "first",
        "completed",
        3,
    )
    assert run.output == {"answer": 42} and run.finished_at is not None and run.terminal
    assert [(s.seq, s.outcome, s.next_state) for s in run.steps] == [
        (1, "next", "second"),
        (2, "completed", None),
    ]


def test_list_runs_is_newest_first_with_filters_and_limit(env):
    # Given
    older = env.start(linear)
    middle = env.start(fan)
    newest = env.start(linear)
    env.store.commit(env.claim(older), complete(None), worker="w1")

    # When / Then
    assert [r.id for r in env.store.list_runs()] == [newest, middle, older]
    assert [r.id for r in env.store.list_runs(limit=2)] == [newest, middle]
    assert [r.id for r in env.store.list_runs(workflow="contract_linear")] == [newest, older]
    assert [r.id for r in env.store.list_runs(status="completed")] == [older]
    assert env.store.list_runs(status="failed") == []
    assert all(r.steps == () for r in env.store.list_runs())


def test_a_taken_run_id_is_refused_and_the_first_run_kept(env):
    # Given a run
    run_id = str(uuid.uuid4())
    env.store.create_run(
        run_id=run_id, wf=linear, checkpoint=CHECKPOINT, input={"i": 1}, idempotency_key=None
    )

    # When another run is created with its id
    with pytest.raises(errors.RunExists):
        env.store.create_run(
            run_id=run_id, wf=linear, checkpoint=CHECKPOINT, input={"i": 2}, idempotency_key=None
        )

    # Then the first run is untouched
    assert env.store.get_run(run_id).input == {"i": 1}


def test_list_runs_pages_by_keyset_newest_first(env):
    started = [env.start(linear) for _ in range(5)]
    pages, before = [], None
    while True:
        page = env.store.list_runs(limit=2, before=before)
        if not page:
            break
        pages.append([r.id for r in page])
        before = (page[-1].created_at, page[-1].id)
    assert [run_id for page in pages for run_id in page] == started[::-1]
    assert [len(page) for page in pages] == [2, 2, 1]
