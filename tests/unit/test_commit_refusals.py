"""What the runner does with each way a commit can go wrong (``runner.refused``), on the
memory store: a refused commit fails the step once with its cause, and never leaves
the lease to expire, except when the database itself is unreachable.

Each ``LeaseflowError`` that can escape ``RunStore.commit`` / ``commit_branch`` has a
test: ``InCommitError``, ``IllegalTransition``, ``UnstorableValue``,
``StoreUnavailable``; and the lost lease, which is a ``None`` return, not an exception.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from leaseflow import Complete, Parallel, Retry, Workflow, errors
from leaseflow.fsm import checkpoint
from leaseflow.testing import WORKER, Engine, engine

TTL = 60.0


class Box(BaseModel):
    text: str = ""


def written(conn: Any) -> None:
    conn.execute("INSERT INTO audit VALUES ('written')")


@pytest.fixture
def eng() -> Iterator[Engine]:
    with engine(lease_ttl=TTL) as e:
        yield e


@pytest.fixture
def codec_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The codec lets every value through, as if it had a gap: only the store refuses."""
    monkeypatch.setattr(checkpoint, "check", lambda value, *, what: None)


def steps(eng: Engine, run_id: str) -> list[tuple[str, int, str]]:
    return [(s.state, s.attempt, s.outcome) for s in eng.get(run_id).steps]


# -- UnstorableValue: the store refuses a value ------------------------------------------


def emitting() -> Workflow:
    wf = Workflow("refusal_emit", context=Box, register=False)

    @wf.state(initial=True, retry=Retry(max_attempts=3, backoff=0))
    def emit(ctx: Any) -> Complete:
        ctx.in_commit(written)
        return Complete(output={"text": ctx.data.text})

    return wf


def test_a_value_the_store_refuses_fails_the_run_once_with_the_cause(eng: Engine, codec_gap):
    # Given a state whose output the codec lets through but the store refuses
    run_id = eng.start(emitting(), {"text": "a\x00b"})

    # When it runs
    eng.run_until_idle()

    # Then the run failed once, for good, with the store's reason; no write landed
    run = eng.get(run_id)
    assert (run.status, run.error_code, run.output) == ("failed", errors.STATE_ERROR, None)
    assert (run.error or "").startswith(f"step 1 of run {run_id} cannot be stored: text cannot")
    assert steps(eng, run_id) == [("emit", 1, "failed")]
    assert eng.in_commit_log == [] and [r.result for r in eng.results] == ["committed"]


def test_a_branch_result_the_store_refuses_fails_the_branch_once(eng: Engine, codec_gap):
    # Given a branch whose result the codec lets through but the store refuses
    wf = Workflow("refusal_fan", context=Box, register=False)
    wf.state(initial=True, to=["joined"], name="spread")(
        lambda ctx: Parallel(branches=["leaf"], join="joined")
    )
    wf.state(branch=True, retry=Retry(max_attempts=3, backoff=0), name="leaf")(
        lambda ctx: {"text": "a\x00b"}
    )
    wf.state(name="joined")(lambda ctx: Complete(output=ctx.branch_results))
    run_id = eng.start(wf)

    # When it runs
    eng.run_until_idle()

    # Then the branch failed on its first attempt and fail_fast failed the run
    run = eng.get(run_id)
    assert (run.status, run.error_code) == ("failed", errors.BRANCH_FAILED)
    [leaf] = run.groups[0].branches
    assert leaf.status == "failed"
    assert (leaf.error or "").startswith(f"{errors.STATE_ERROR}: branch 0 of group ")
    assert steps(eng, run_id) == [("spread", 1, "fork"), ("spread", 1, "failed")]


def test_when_the_failure_is_refused_too_the_refusal_propagates(
    eng: Engine, monkeypatch: pytest.MonkeyPatch
):
    # Given a store that refuses every commit
    commits: list[Any] = []

    def refuse(claim: Any, tr: Any, **kw: Any) -> None:
        commits.append((tr, kw.get("callbacks")))
        raise errors.UnstorableValue("step", "refused")

    run_id = eng.start(emitting(), {"text": "ok"})
    monkeypatch.setattr(eng.store, "commit", refuse)

    # When the state runs
    with pytest.raises(errors.UnstorableValue):
        eng.run_until_idle()

    # Then the runner tried the decision, then the failure (without callbacks), no more
    (decision, callbacks), (failure, no_callbacks) = commits
    assert (decision.status, len(callbacks)) == ("completed", 1)
    assert (failure.status, failure.error_code, no_callbacks) == ("failed", "E-STATE-ERROR", ())
    monkeypatch.undo()
    assert eng.get(run_id).status == "running"  # the reaper's, once the lease expires


# -- IllegalTransition: the store does not know the edge --------------------------------


def test_an_edge_the_store_does_not_know_fails_the_run_illegal(eng: Engine):
    # Given a run whose stored definition lacks an edge the worker's definition has
    # (the definition changed without a new version)
    def define(edges: list[str]) -> Workflow:
        wf = Workflow("refusal_edges", context=Box, register=False)

        @wf.state(initial=True, to=edges)
        def start(ctx: Any) -> str:
            ctx.in_commit(written)
            return "shortcut"

        wf.state(to=["shortcut"], name="detour")(lambda ctx: "shortcut")
        wf.state(name="shortcut")(lambda ctx: Complete())
        return wf

    run_id = eng.start(define(["detour", "shortcut"]))
    eng.store.register_workflow(define(["detour"]))  # as an older client registered it

    # When the worker moves along the edge the store does not know
    eng.run_until_idle()

    # Then the run failed once with E-ILLEGAL-TRANSITION; the in_commit write did not land
    run = eng.get(run_id)
    assert (run.status, run.error_code, run.state) == (
        "failed",
        errors.ILLEGAL_TRANSITION,
        "start",
    )
    assert "'start' -> 'shortcut' is not a registered transition" in (run.error or "")
    assert steps(eng, run_id) == [("start", 1, "failed")]
    assert eng.in_commit_log == []


# -- InCommitError: a callback raised ------------------------------------------------


def test_a_failing_in_commit_callback_is_an_error_of_the_state(eng: Engine):
    # Given a state whose in_commit callback raises on the first attempt
    wf = Workflow("refusal_callback", context=Box, register=False)

    @wf.state(initial=True, retry=Retry(max_attempts=2, backoff=0))
    def write(ctx: Any) -> Complete:
        def callback(conn: Any) -> None:
            if ctx.attempt == 1:
                raise ValueError("constraint violated")
            written(conn)

        ctx.in_commit(callback)
        return Complete(output={"attempt": ctx.attempt})

    run_id = eng.start(wf)

    # When it runs
    eng.run_until_idle()

    # Then the first attempt was rolled back and retried; the second landed with its write
    run = eng.get(run_id)
    assert (run.status, run.output) == ("completed", {"attempt": 2})
    assert steps(eng, run_id) == [("write", 1, "retry"), ("write", 2, "completed")]
    assert "ValueError: constraint violated" in (run.steps[0].error or "")
    assert len(eng.in_commit_log) == 1


# -- StoreUnavailable: left to the lease ---------------------------------------------


def test_an_unreachable_store_leaves_the_run_to_its_lease_and_the_reaper(
    eng: Engine, monkeypatch: pytest.MonkeyPatch
):
    # Given a run whose commit finds the database unreachable (back right after)
    run_id = eng.start(emitting(), {"text": "ok"})
    commit, calls = eng.store.commit, []

    def unreachable_once(*args: Any, **kw: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise errors.StoreUnavailable("connection refused")
        return commit(*args, **kw)

    monkeypatch.setattr(eng.store, "commit", unreachable_once)

    # When the state runs
    with pytest.raises(errors.StoreUnavailable):
        eng.run_until_idle()

    # Then no failure was committed instead: the run keeps its lease until it expires;
    # the reaper then hands it on and the next attempt commits
    assert len(calls) == 1
    assert (eng.get(run_id).status, steps(eng, run_id)) == ("running", [])
    eng.advance(TTL + 1)
    run = eng.get(run_id)
    assert (run.status, run.output) == ("completed", {"text": "ok"})
    assert steps(eng, run_id) == [("emit", 1, "lease_expired"), ("emit", 2, "completed")]


# -- the lost lease: a None return ---------------------------------------------------


def test_a_commit_after_the_lease_was_lost_writes_nothing_and_is_counted(eng: Engine):
    # Given a state during which its lease expires and the reaper requeues the run
    wf = Workflow("refusal_slow", context=Box, register=False)

    @wf.state(initial=True, retry=Retry(max_attempts=2, backoff=0))
    def slow(ctx: Any) -> Complete:
        if ctx.attempt == 1:
            eng.clock.advance(TTL + 1)
            eng.store.reap()
        return Complete(output={"attempt": ctx.attempt})

    run_id = eng.start(wf)

    # When its commit comes
    eng.run_until_idle()

    # Then it was fenced out: reported lease_lost and counted; the reaper's row only
    assert [r.result for r in eng.results] == ["lease_lost"]
    assert eng.store.workers[WORKER].leases_lost == 1
    run = eng.get(run_id)
    assert (run.status, run.attempt) == ("pending", 1)
    assert steps(eng, run_id) == [("slow", 1, "lease_expired")]
