"""The rules for ``Retry(give_up_on=)``, ``end=`` and ``branches=`` (leaseflow/fsm/rules.py)."""

from __future__ import annotations

import traceback
from typing import Any

import pytest
from pydantic import BaseModel

from leaseflow import Complete, Failed, Map, Parallel, Retry, Workflow, errors
from leaseflow.fsm import checkpoint, rules
from leaseflow.testing import engine
from leaseflow.types import StepOutcome

LIMITS = rules.Limits(max_payload_bytes=1000, compress_min_bytes=10_000)
PERMANENT = Retry(max_attempts=5, backoff=1.0, jitter=0, give_up_on=(ValueError,))


class Ctx(BaseModel):
    n: int = 0


def _fn(ctx: Any) -> Any:
    return None


def shop() -> Workflow:
    wf = Workflow("give_up_shop", context=Ctx, register=False)
    wf.state(initial=True, to=["charge", "guarded", "fan", "ok", "rejected"], name="start")(_fn)
    wf.state(to=["ok"], retry=PERMANENT, name="charge")(_fn)
    wf.state(to=["ok"], retry=PERMANENT, on_error="rejected", name="guarded")(_fn)
    wf.state(to=["ok"], branches=["leaf"], name="fan")(_fn)
    wf.state(branch=True, retry=PERMANENT, name="leaf")(_fn)
    wf.state(branch=True, name="other_leaf")(_fn)
    wf.state(end="completed", name="ok")(_fn)
    wf.state(end="failed", name="rejected")(_fn)
    return wf.validate()


def outcome(wf: Workflow, state: str, returned: object) -> rules.Transition:
    blob = checkpoint.encode(Ctx().model_dump(mode="json"), limit=1000, compress_min=10_000)
    return rules.on_outcome(
        wf,
        wf.states[state],
        returned,
        attempt=1,
        max_attempts=wf.states[state].retry.max_attempts,
        data=Ctx(),
        stored=blob,
        limits=LIMITS,
    )


# -- give_up_on ----------------------------------------------------------------------


def test_a_permanent_error_fails_on_its_first_attempt_saying_why():
    # Given a state with 5 attempts that gives up on ValueError
    wf = shop()
    # When its first attempt raises a ValueError
    tr = rules.on_error(
        wf, wf.states["charge"], attempt=1, max_attempts=5, exc=ValueError("bad iban"), rand=0.5
    )
    # Then the run fails at once, the reason naming the error and why it was not retried
    assert (tr.outcome, tr.status, tr.error_code) == ("failed", "failed", errors.STATE_ERROR)
    assert tr.error == (
        "ValueError: bad iban (attempt 1 of 5; ValueError is not retried: see the state's Retry)"
    )
    assert rules.error_line(tr.step_error) == "ValueError: bad iban"


def test_another_error_of_the_same_state_is_still_retried():
    wf = shop()
    tr = rules.on_error(
        wf, wf.states["charge"], attempt=1, max_attempts=5, exc=OSError("gateway"), rand=0.5
    )
    assert (tr.outcome, tr.status, tr.delay) == (StepOutcome.RETRY, "pending", 1.0)


def test_a_permanent_error_goes_to_on_error_when_declared():
    wf = shop()
    tr = rules.on_error(
        wf, wf.states["guarded"], attempt=1, max_attempts=5, exc=ValueError("x"), rand=0.5
    )
    assert (tr.outcome, tr.next_state) == ("next", "rejected")


def test_an_exhausted_error_keeps_its_plain_reason():
    wf = shop()
    tr = rules.on_error(
        wf, wf.states["charge"], attempt=5, max_attempts=5, exc=ValueError("x"), rand=0.5
    )
    assert tr.error == "ValueError: x (attempt 5 of 5)"


def test_a_permanent_error_fails_a_branch_at_once():
    spec = shop().states["leaf"]
    decision = rules.on_branch(
        spec, attempt=1, max_attempts=5, raised=ValueError("v"), limits=LIMITS, rand=0.5
    )
    assert decision.status == "failed"
    assert decision.error == (
        "ValueError: v (attempt 1 of 5; ValueError is not retried: see the state's Retry)"
    )


def test_a_permanent_error_fails_the_run_at_once_in_the_engine():
    # Given a workflow whose only state would retry 5 times, but gives up on ValueError
    wf = Workflow("give_up_engine", context=Ctx, register=False)

    @wf.state(initial=True, retry=PERMANENT)
    def only(ctx: Any) -> Any:
        raise ValueError("malformed order")

    with engine() as eng:
        # When it runs
        run_id = eng.start(wf)
        eng.run_until_idle()
        run = eng.get(run_id)
    # Then it failed on the first attempt, with no retry step
    assert (run.status, run.error_code) == ("failed", errors.STATE_ERROR)
    assert [(s.attempt, s.outcome) for s in run.steps] == [(1, "failed")]


# -- end= ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "returned", "status", "code"),
    [
        pytest.param("ok", Complete({"a": 1}), "completed", None, id="as-declared-completed"),
        pytest.param(
            "rejected", Failed("no", code="APP"), "failed", "APP", id="as-declared-failed"
        ),
        pytest.param("ok", Failed("no"), "failed", errors.ILLEGAL_TRANSITION, id="failed-at-ok"),
        pytest.param("rejected", Complete(), "failed", errors.ILLEGAL_TRANSITION, id="ok-at-fail"),
        pytest.param("start", Failed("no", code="APP"), "failed", "APP", id="undeclared"),
    ],
)
def test_a_state_declared_end_may_end_the_run_only_that_way(
    state: str, returned: object, status: str, code: str | None
):
    tr = outcome(shop(), state, returned)
    assert (tr.status, tr.error_code) == (status, code)
    if code == errors.ILLEGAL_TRANSITION:
        assert f"but it is declared end={shop().states[state].end!r}" in (tr.error or "")
        assert tr.accepted is False  # its in_commit writes do not land


# -- branches= -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "returned",
    [
        pytest.param(Parallel(branches=["leaf", "other_leaf"], join="ok"), id="parallel"),
        pytest.param(Map(items=[1, 2], branch="other_leaf", join="ok"), id="map"),
    ],
)
def test_a_fork_outside_its_declared_branches_fails_illegal(returned: object):
    tr = outcome(shop(), "fan", returned)
    assert (tr.status, tr.error_code) == ("failed", errors.ILLEGAL_TRANSITION)
    assert "forks 'other_leaf', not in branches=['leaf']" in (tr.error or "")


def test_a_fork_inside_its_declared_branches_forks():
    tr = outcome(shop(), "fan", Parallel(branches=["leaf", "leaf"], join="ok"))
    assert tr.fork is not None and tr.fork.states == ("leaf", "leaf")


def test_a_state_without_branches_may_fork_any_branch_state():
    tr = outcome(shop(), "start", Parallel(branches=["other_leaf"], join="ok"))
    assert tr.fork is not None and tr.fork.states == ("other_leaf",)


def test_error_line_is_the_exception_at_the_end_of_a_traceback_on_one_line():
    try:
        try:
            {}["sku"]
        except KeyError as exc:
            raise ConnectionError("gateway timed out\non attempt 2") from exc
    except ConnectionError as exc:
        trace = "".join(traceback.format_exception(exc))
    assert rules.error_line(trace) == "ConnectionError: gateway timed out | on attempt 2"
    assert rules.error_line("APP-1: nope") == "APP-1: nope"
    assert rules.error_line("E: " + "x" * 1000, limit=20) == "E: xxxxxxxxxxxxxx..."
    assert rules.error_line("") is None and rules.error_line(None) is None
