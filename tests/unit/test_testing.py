"""``leaseflow.testing``: every outcome kind, retries, timeouts and the crash path run
in-process on the memory store, with the validation and error codes of production."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from leaseflow import Complete, Failed, Map, Parallel, Retry, Workflow, errors
from leaseflow.testing import Engine, engine


class Ctx(BaseModel):
    n: int = 0
    fail_times: int = 0
    trail: list[str] = []
    items: list[int] = []
    slow: float = 0.0


def outcomes(eng: Engine, run_id: str) -> list[tuple[str, str]]:
    return [(s.state, s.outcome) for s in eng.get(run_id).steps]


def chain() -> Workflow:
    wf = Workflow("t_chain", context=Ctx, register=False)

    @wf.state(initial=True, to=["b", "nowhere"])
    def a(ctx: Any) -> str:
        ctx.data.trail.append("a")
        return "b"

    @wf.state(to=["c"], inline=True)
    def b(ctx: Any) -> str:
        ctx.data.trail.append("b")
        return "c"

    @wf.state()
    def c(ctx: Any) -> Complete:
        ctx.data.trail.append("c")
        return Complete(output={"trail": ctx.data.trail, "n": ctx.data.n})

    @wf.state()
    def nowhere(ctx: Any) -> Failed:
        return Failed("unused", code="X")

    return wf


def test_a_chain_completes_with_its_output_and_step_log():
    with engine() as eng:
        # Given a run of a three-state chain
        run_id = eng.start(chain(), {"n": 3})
        # When every due step runs
        eng.run_until_idle()
        # Then it completed, each state committed once, b inline in a's task
        run = eng.get(run_id)
        assert (run.status, run.output) == ("completed", {"trail": ["a", "b", "c"], "n": 3})
        assert outcomes(eng, run_id) == [("a", "next"), ("b", "next"), ("c", "completed")]
        assert [r.inlined for r in eng.results] == [1, 0]


def test_input_is_validated_as_in_production():
    with engine() as eng, pytest.raises(errors.InvalidInput):
        eng.start(chain(), {"n": "three"})


def test_an_idempotency_key_names_one_run():
    with engine() as eng:
        wf = chain()
        first = eng.start(wf, {"n": 1}, idempotency_key="k")
        assert eng.start(wf, {"n": 1}, idempotency_key="k") == first
        with pytest.raises(errors.IdempotencyConflict):
            eng.start(wf, {"n": 2}, idempotency_key="k")


def outcomes_wf() -> Workflow:
    wf = Workflow("t_outcomes", context=Ctx, register=False)

    @wf.state(initial=True, to=["flaky", "refuse", "bad", "rescued"])
    def pick(ctx: Any) -> str:
        return ["flaky", "refuse", "bad", "rescued"][ctx.data.n]

    @wf.state(to=["done"], retry=Retry(max_attempts=3, backoff=10, jitter=0))
    def flaky(ctx: Any) -> str:
        if ctx.attempt <= ctx.data.fail_times:
            raise ConnectionError(f"attempt {ctx.attempt}")
        return "done"

    @wf.state()
    def refuse(ctx: Any) -> Failed:
        return Failed("no stock", code="SHOP-1")

    @wf.state(to=["done"])
    def bad(ctx: Any) -> str:
        return "pick"  # not in to=

    @wf.state(to=["done"], retry=Retry(max_attempts=1), on_error="recover")
    def rescued(ctx: Any) -> str:
        raise RuntimeError("boom")

    @wf.state(to=["done"])
    def recover(ctx: Any) -> str:
        return "done"

    @wf.state()
    def done(ctx: Any) -> Complete:
        return Complete(output={"attempt": ctx.attempt})

    return wf


def test_a_failing_state_is_retried_with_backoff_as_the_clock_moves():
    with engine() as eng:
        # Given a state that fails twice, with backoff 10 s then 20 s
        run_id = eng.start(outcomes_wf(), {"n": 0, "fail_times": 2})
        eng.run_until_idle()
        assert eng.get(run_id).status == "pending"
        # When 9 s pass, nothing is due; at 10 s the second attempt runs and fails
        eng.advance(9)
        assert [s.outcome for s in eng.get(run_id).steps] == ["next", "retry"]
        eng.advance(1)
        assert [s.outcome for s in eng.get(run_id).steps] == ["next", "retry", "retry"]
        # Then 20 s later the third attempt succeeds
        eng.advance(20)
        run = eng.get(run_id)
        assert run.status == "completed"
        assert [(s.state, s.attempt) for s in run.steps if s.state == "flaky"] == [
            ("flaky", 1),
            ("flaky", 2),
            ("flaky", 3),
        ]


def test_a_state_that_keeps_failing_fails_the_run_with_its_traceback():
    with engine() as eng:
        run_id = eng.start(outcomes_wf(), {"n": 0, "fail_times": 5})
        run = eng.run_until_done(run_id)
        assert (run.status, run.error_code) == ("failed", errors.STATE_ERROR)
        assert "ConnectionError: attempt 3" in (run.steps[-1].error or "")


@pytest.mark.parametrize(
    ("n", "status", "code"),
    [(1, "failed", "SHOP-1"), (2, "failed", errors.ILLEGAL_TRANSITION), (3, "completed", None)],
)
def test_failed_illegal_and_on_error_outcomes(n: int, status: str, code: str | None):
    with engine() as eng:
        run_id = eng.start(outcomes_wf(), {"n": n})
        eng.run_until_idle()
        run = eng.get(run_id)
        assert (run.status, run.error_code) == (status, code)
        if n == 3:  # the exhausted error went to on_error
            assert outcomes(eng, run_id)[1:] == [
                ("rescued", "next"),
                ("recover", "next"),
                ("done", "completed"),
            ]


def fanout() -> Workflow:
    wf = Workflow("t_fanout", context=Ctx, register=False)

    @wf.state(initial=True, to=["joined"])
    def fork(ctx: Any) -> Any:
        if ctx.data.items:
            return Map(items=ctx.data.items, branch="square", join="joined", max_concurrency=2)
        return Parallel(branches=["left", "right"], join="joined", on_branch_error="collect")

    @wf.state(branch=True)
    def square(ctx: Any) -> int:
        if ctx.item < 0:
            raise ValueError("negative")
        return int(ctx.item) ** 2

    @wf.state(branch=True)
    def left(ctx: Any) -> str:
        return "L"

    @wf.state(branch=True, retry=Retry(max_attempts=1))
    def right(ctx: Any) -> str:
        raise KeyError("right")

    @wf.state()
    def joined(ctx: Any) -> Complete:
        return Complete(output={"results": ctx.branch_results, "errors": ctx.branch_errors})

    return wf


def test_parallel_joins_once_with_collected_errors():
    with engine() as eng:
        run_id = eng.start(fanout())
        eng.run_until_idle()
        run = eng.get(run_id)
        assert run.status == "completed"
        assert run.output["results"] == ["L", None]
        assert "KeyError" in run.output["errors"]["1"]
        assert outcomes(eng, run_id) == [("fork", "fork"), ("joined", "completed")]
        [group] = run.groups
        assert (group.kind, group.status, group.done, group.failed) == ("parallel", "joined", 1, 1)


def test_map_runs_every_item_within_its_window_in_item_order():
    with engine() as eng:
        run_id = eng.start(fanout(), {"items": [3, 1, 4, 1, 5]})
        eng.run_until_idle()
        assert eng.get(run_id).output["results"] == [9, 1, 16, 1, 25]


def test_a_failing_map_branch_fails_the_run_fast():
    with engine() as eng:
        run_id = eng.start(fanout(), {"items": [1, -1, 2]})
        eng.run_until_done(run_id)
        run = eng.get(run_id)
        assert (run.status, run.error_code) == ("failed", errors.BRANCH_FAILED)
        assert "branch 1 failed" in (run.error or "")


def timed(eng: Engine) -> Workflow:
    wf = Workflow("t_timed", context=Ctx, register=False)

    @wf.state(initial=True, timeout=5, retry=Retry(max_attempts=2, backoff=1, jitter=0))
    def slow(ctx: Any) -> Complete:
        eng.clock.advance(ctx.data.slow)  # the state "takes" this long
        return Complete()

    return wf


def test_a_state_past_its_timeout_is_a_state_error():
    with engine() as eng:
        wf = timed(eng)
        run_id = eng.start(wf, {"slow": 6})
        run = eng.run_until_done(run_id)
        assert (run.status, run.error_code) == ("failed", errors.STATE_ERROR)
        assert "SoftTimeLimitExceeded" in (run.error or "")
        fast = eng.start(wf, {"slow": 4})
        assert eng.run_until_done(fast).status == "completed"


def test_a_crashed_worker_is_recovered_by_the_reaper_after_the_lease_ttl():
    with engine(lease_ttl=30) as eng:
        # Given the worker dies in the middle of state b
        eng.crash_next("b")
        run_id = eng.start(chain())
        eng.run_until_idle()
        assert (eng.get(run_id).status, eng.get(run_id).state) == ("running", "b")
        # When less than the TTL passes, nothing happens; past it, the reaper requeues
        eng.advance(29)
        assert eng.get(run_id).status == "running"
        eng.advance(2)
        # Then b ran again on attempt 2 and the run completed
        run = eng.get(run_id)
        assert run.status == "completed"
        assert [(s.state, s.attempt, s.outcome) for s in run.steps] == [
            ("a", 1, "next"),
            ("b", 1, "lease_expired"),
            ("b", 2, "next"),
            ("c", 1, "completed"),
        ]


def test_crashes_that_spend_every_attempt_fail_the_run_lease_expired():
    with engine(lease_ttl=10) as eng:
        wf = outcomes_wf()
        eng.crash_next("flaky", times=3)
        run_id = eng.start(wf, {"n": 0})
        run = eng.run_until_done(run_id)
        assert (run.status, run.error_code) == ("failed", errors.LEASE_EXPIRED)
        assert [s.outcome for s in run.steps].count("lease_expired") == 3


def test_a_crashed_branch_is_retried_and_the_join_still_runs_once():
    with engine(lease_ttl=10) as eng:
        eng.crash_next("square")
        run_id = eng.start(fanout(), {"items": [2, 3]})
        run = eng.run_until_done(run_id)
        assert (run.status, run.output["results"]) == ("completed", [4, 9])
        assert outcomes(eng, run_id) == [("fork", "fork"), ("joined", "completed")]


def ledger() -> Workflow:
    wf = Workflow("t_ledger", context=Ctx, register=False)

    @wf.state(initial=True, to=["done"], retry=Retry(max_attempts=2, backoff=0))
    def book(ctx: Any) -> str:
        ctx.in_commit(lambda conn: conn.execute("INSERT INTO ledger VALUES (%s)", (ctx.attempt,)))
        if ctx.attempt == 1 and ctx.data.fail_times:
            ctx.in_commit(lambda conn: 1 / 0)
        return "done"

    @wf.state()
    def done(ctx: Any) -> Complete:
        return Complete()

    return wf


def test_in_commit_writes_commit_with_the_transition_and_roll_back_with_it():
    with engine() as eng:
        # Given a state whose second in_commit callback fails on attempt 1
        run_id = eng.start(ledger(), {"fail_times": 1})
        # When it runs: attempt 1 rolls back, attempt 2 commits
        run = eng.run_until_done(run_id)
        # Then only attempt 2's write is in the log, once
        assert run.status == "completed"
        assert [entry.params for entry in eng.in_commit_log] == [(2,)]
        assert [s.outcome for s in run.steps] == ["retry", "next", "completed"]


def test_run_until_done_skips_time_to_the_next_retry():
    with engine() as eng:
        run_id = eng.start(outcomes_wf(), {"n": 0, "fail_times": 2})
        run = eng.run_until_done(run_id)
        assert run.status == "completed"
        assert eng.clock.monotonic() == pytest.approx(30.0)
