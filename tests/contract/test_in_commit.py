"""``ctx.in_commit``: an application write lands exactly when its transition does.

The callbacks write a note into the application's table (a real one in PostgreSQL;
the memory store records the write): ``env.app_notes()`` reads what landed."""

from __future__ import annotations

import pytest

from leaseflow import errors
from tests.contract.workflows import NOTE_SQL, TTL, broken, done, fan, fork, linear, move


def note(run_id: str, text: str):
    def write(conn) -> None:
        conn.execute(NOTE_SQL, (run_id, text))

    return write


def failing(run_id: str):
    def write(conn) -> None:
        conn.execute(NOTE_SQL, (run_id, "half-written"))
        raise RuntimeError("the application refused")

    return write


def test_callbacks_commit_with_the_transition(env):
    # Given
    run_id = env.start(linear)
    claim = env.claim(run_id)

    # When
    committed = env.store.commit(
        claim, move("second"), worker="w1", callbacks=[note(run_id, "a"), note(run_id, "b")]
    )

    # Then
    assert committed is not None
    assert env.app_notes() == [(run_id, "a"), (run_id, "b")]
    assert env.store.get_run(run_id).state == "second"


def test_a_failing_callback_rolls_the_whole_commit_back(env):
    # Given
    run_id = env.start(linear)
    claim = env.claim(run_id)

    # When
    with pytest.raises(errors.InCommitError) as failed:
        env.store.commit(
            claim, move("second"), worker="w1", callbacks=[note(run_id, "a"), failing(run_id)]
        )

    # Then: no note, no move, no step; the lease still holds
    assert failed.value.run_id == run_id and "the application refused" in failed.value.detail
    assert isinstance(failed.value.__cause__, RuntimeError)
    assert env.app_notes() == []
    run = env.store.get_run(run_id)
    assert (run.state, run.status, run.step_seq, run.steps) == ("first", "running", 1, ())
    again = env.store.commit(claim, move("second"), worker="w1", callbacks=[note(run_id, "c")])
    assert again is not None
    assert env.app_notes() == [(run_id, "c")]


def test_callbacks_of_a_fenced_out_commit_never_run(env):
    # Given: a claim whose lease was lost
    run_id = env.start(linear)
    claim = env.claim(run_id)
    env.store.commit(claim, move("second"), worker="w1")
    called: list[object] = []

    # When
    late = env.store.commit(claim, move("second"), worker="w1", callbacks=[called.append])

    # Then
    assert late is None and called == []
    assert env.app_notes() == []


def test_branch_callbacks_commit_or_roll_back_with_the_branch(env):
    # Given
    run_id = env.start(fan)
    group_id = env.store.commit(env.claim(run_id), fork(), worker="w1").group_id
    first = env.store.claim_branch(group_id, 0, owner="w1", ttl=TTL)
    second = env.store.claim_branch(group_id, 1, owner="w2", ttl=TTL)

    # When
    env.store.commit_branch(
        group_id, 0, first.lease_token, done(0), callbacks=[note(run_id, "leg 0")]
    )
    with pytest.raises(errors.InCommitError):
        env.store.commit_branch(
            group_id, 1, second.lease_token, broken(), callbacks=[failing(run_id)]
        )

    # Then: the failed branch did not land, so the run is still waiting on it
    assert env.app_notes() == [(run_id, "leg 0")]
    run = env.store.get_run(run_id)
    assert (run.status, run.error_code) == ("waiting", None)
    assert [b.status for b in run.groups[0].branches] == ["completed", "running"]
    joined = env.store.commit_branch(group_id, 1, second.lease_token, done(1))
    assert joined is not None and joined.join is not None
