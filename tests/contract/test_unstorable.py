"""A value the store cannot take: the commit raises ``UnstorableValue`` and writes nothing.

The runner's codec refuses such values before any commit (``checkpoint.check``); these
tests hand them to the store directly, as a gap in the codec would. PostgreSQL refuses
them itself (a ``DataError``, mapped by ``PostgresStore``); the memory store refuses the
same values so that both behave alike.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from leaseflow import errors
from leaseflow.fsm.rules import Transition
from leaseflow.types import StepOutcome
from tests.contract.test_branches import claim_branch, forked
from tests.contract.test_in_commit import note
from tests.contract.workflows import TTL, broken, complete, done, fan, fork, linear, move

NUL = "a\x00b"


def failed(text: str) -> Transition:
    """The run fails with ``text`` as its reason, code and step log error."""
    return Transition(
        outcome=StepOutcome.FAILED,
        status="failed",
        error_code=text,
        error=text,
        step_error=text,
        accepted=False,
    )


@pytest.mark.parametrize(
    "tr",
    [
        pytest.param(complete({"text": NUL}), id="nul-in-a-json-string"),
        pytest.param(complete({"deep": [{NUL: 1}]}), id="nul-in-a-json-key"),
        pytest.param(complete([1.5, float("nan")]), id="nan-in-json"),
        pytest.param(failed(NUL), id="nul-in-text"),
        pytest.param(failed("a\ud800b"), id="lone-surrogate-in-text"),
    ],
)
@pytest.mark.parametrize("with_callbacks", [False, True], ids=["alone", "with-callbacks"])
def test_a_commit_the_store_cannot_take_is_refused_and_writes_nothing(
    env, tr: Transition, with_callbacks: bool
):
    # Given a claimed run
    run_id = env.start(linear)
    claim = env.claim(run_id)
    callbacks = [note(run_id, "a")] if with_callbacks else []

    # When its commit carries a value the store cannot take
    with pytest.raises(errors.UnstorableValue) as refused:
        env.store.commit(claim, tr, worker="w1", callbacks=callbacks)

    # Then it is refused naming the commit, nothing is written, the lease still holds
    assert refused.value.code == errors.STATE_ERROR
    assert refused.value.what == f"step 1 of run {run_id}"
    assert env.app_notes() == []
    run = env.store.get_run(run_id)
    assert (run.status, run.step_seq, run.steps, run.output) == ("running", 1, (), None)
    assert env.store.commit(claim, complete({"ok": 1}), worker="w1") is not None
    assert env.store.get_run(run_id).status == "completed"


def test_a_hand_off_the_store_cannot_take_is_refused_and_leases_nothing(env):
    # Given a claimed run whose next state may run inline
    run_id = env.start(linear)
    claim = env.claim(run_id)

    # When the hand-off commit carries a NUL byte in its step log
    with pytest.raises(errors.UnstorableValue):
        env.store.commit(
            claim, replace(move("second"), step_error=NUL), worker="w1", handoff_ttl=TTL
        )

    # Then the run is where it was, under the same lease
    run = env.store.get_run(run_id)
    assert (run.state, run.status, run.step_seq, run.steps) == ("first", "running", 1, ())
    assert env.store.commit(claim, move("second"), worker="w1", handoff_ttl=TTL) is not None


def test_a_fork_whose_items_the_store_cannot_take_creates_no_group(env):
    # Given a claimed run of the fan workflow
    run_id = env.start(fan)
    claim = env.claim(run_id)

    # When it forks a Map over an item holding a NUL byte
    bad = fork(("square", "square"), items=({"x": 1}, {"text": NUL}))
    with pytest.raises(errors.UnstorableValue):
        env.store.commit(claim, bad, worker="w1")

    # Then no group exists and the run still runs its forking state
    run = env.store.get_run(run_id)
    assert (run.state, run.status, run.step_seq, run.groups) == ("spread", "running", 1, ())


@pytest.mark.parametrize(
    "decision",
    [
        pytest.param(done({"text": NUL}), id="nul-in-the-result"),
        pytest.param(broken(f"ValueError: {NUL}"), id="nul-in-the-error"),
    ],
)
def test_a_branch_commit_the_store_cannot_take_is_refused_and_writes_nothing(env, decision):
    # Given a claimed branch of a forked run
    run_id, group_id = forked(env)
    branch = claim_branch(env, group_id, 0)

    # When its commit carries a NUL byte
    with pytest.raises(errors.UnstorableValue) as refused:
        env.store.commit_branch(
            group_id, 0, branch.lease_token, decision, callbacks=[note(run_id, "b")]
        )

    # Then nothing is written and the branch still holds its lease
    assert refused.value.what == f"branch 0 of group {group_id}"
    assert env.app_notes() == []
    [group] = env.store.get_run(run_id).groups
    assert (group.done, group.failed, group.status) == (0, 0, "running")
    peek = env.store.peek_branch(group_id, 0)
    assert peek is not None and peek.status == "running"
    assert env.store.commit_branch(group_id, 0, branch.lease_token, done(0)) is not None
