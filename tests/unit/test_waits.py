"""Waits, signals, timers, cancel, re-drive and run deadlines on ``leaseflow.testing``:
the production runner, rules and beat jobs, on the memory store, under a test clock."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from leaseflow import Complete, Failed, Retry, Wait, Workflow, errors
from leaseflow.testing import Engine, engine


class Ask(BaseModel):
    question: str = "ship it?"
    answer: Any = None


def approval(run_timeout: float | None = None) -> Workflow:
    """decide waits an hour at most (-> expired) for a "review" signal; route sends
    the run on by its payload: approved, or rejected."""
    wf = Workflow("t_approval", context=Ask, register=False, run_timeout=run_timeout)

    @wf.state(initial=True, to=["decide"])
    def draft(ctx: Any) -> str:
        return "decide"

    @wf.state(to=["route", "expired"])
    def decide(ctx: Any) -> Wait:
        return Wait(event="review", next="route", timeout=3600, on_timeout="expired")

    @wf.state(to=["approved", "rejected"])
    def route(ctx: Any) -> str:
        ctx.data.answer = ctx.signal
        return "approved" if ctx.signal.get("approve") else "rejected"

    @wf.state(retry=Retry(max_attempts=2, backoff=1.0))
    def approved(ctx: Any) -> Complete:
        assert ctx.signal is None  # a signal is for the state it resumed
        return Complete(output={"approved_with": ctx.data.answer})

    @wf.state(end="failed")
    def rejected(ctx: Any) -> Failed:
        return Failed(f"rejected: {ctx.data.answer['why']}", code="REJECTED")

    @wf.state()
    def expired(ctx: Any) -> Complete:
        return Complete(output="expired")

    return wf


def trail(eng: Engine, run_id: str) -> list[tuple[str, str, str | None]]:
    return [(s.state, s.outcome, s.next_state) for s in eng.get(run_id).steps]


def test_approve_continues_at_next_with_the_payload():
    with engine() as eng:
        run_id = eng.start(approval())
        eng.run_until_idle()
        assert eng.get(run_id).status == "waiting"
        assert eng.pending() == []  # no message waits in a queue

        receipt = eng.signal(run_id, "review", {"approve": True, "by": "ana"})
        eng.run_until_idle()

        assert (receipt.result, receipt.state) == ("resumed", "route")
        run = eng.get(run_id)
        answer = {"approve": True, "by": "ana"}
        assert (run.status, run.output) == ("completed", {"approved_with": answer})
        assert trail(eng, run_id) == [
            ("draft", "next", "decide"),
            ("decide", "wait", None),
            ("decide", "signalled", "route"),
            ("route", "next", "approved"),
            ("approved", "completed", None),
        ]


def test_reject_is_routed_by_the_state_the_signal_resumed():
    with engine() as eng:
        run_id = eng.start(approval())
        eng.run_until_idle()

        eng.signal(run_id, "review", {"approve": False, "why": "too risky"})
        eng.run_until_idle()

        run = eng.get(run_id)
        assert (run.status, run.error_code, run.error) == (
            "failed",
            "REJECTED",
            "rejected: too risky",
        )


def test_a_timeout_goes_to_on_timeout_and_a_timer_ends_on_time():
    with engine() as eng:
        run_id = eng.start(approval())
        eng.run_until_idle()
        eng.advance(3599)
        assert eng.get(run_id).status == "waiting"

        eng.advance(2)

        run = eng.get(run_id)
        assert (run.status, run.output) == ("completed", "expired")
        assert ("decide", "wait_timeout", "expired") in trail(eng, run_id)


def test_a_signal_sent_before_the_wait_resumes_it_as_soon_as_it_is_reached():
    with engine() as eng:
        run_id = eng.start(approval())

        early = eng.signal(run_id, "review", {"approve": True})  # the run is still at draft
        eng.run_until_idle()

        assert early.result == "stored"
        assert eng.get(run_id).output == {"approved_with": {"approve": True}}


def test_a_signal_for_another_event_is_kept_and_does_not_resume():
    with engine() as eng:
        run_id = eng.start(approval())
        eng.run_until_idle()

        other = eng.signal(run_id, "comment", "looks fine")

        assert other.result == "stored" and eng.get(run_id).status == "waiting"
        (kept,) = eng.get(run_id).signals
        assert (kept.event, kept.payload, kept.consumed_at) == ("comment", "looks fine", None)


def test_the_same_signal_id_twice_resumes_once():
    with engine() as eng:
        run_id = eng.start(approval())
        eng.run_until_idle()

        first = eng.signal(run_id, "review", {"approve": True, "n": 1}, signal_id="hook-42")
        second = eng.signal(run_id, "review", {"approve": False}, signal_id="hook-42")
        eng.run_until_idle()

        assert (first.result, second.result) == ("resumed", "duplicate")
        assert eng.get(run_id).output == {"approved_with": {"approve": True, "n": 1}}


def test_bad_signals_are_refused_and_change_nothing():
    with engine() as eng:
        run_id = eng.start(approval())
        eng.run_until_idle()
        with pytest.raises(errors.InvalidSignal, match="event name"):
            eng.signal(run_id, "no spaces allowed", None)
        with pytest.raises(errors.InvalidSignal, match="not JSON"):
            eng.signal(run_id, "review", {1, 2})
        with pytest.raises(errors.PayloadTooLarge):
            eng.signal(run_id, "review", "x" * 2_000_000)
        with pytest.raises(errors.RunNotFound):
            eng.signal("00000000-0000-4000-8000-000000000000", "review", None)
        assert eng.get(run_id).status == "waiting" and eng.get(run_id).signals == ()
        eng.signal(run_id, "review", {"approve": True})
        eng.run_until_idle()
        with pytest.raises(errors.RunFinished) as info:
            eng.signal(run_id, "review", None)
        assert info.value.code == "E-RUN-FINISHED"


def test_an_illegal_wait_fails_the_run():
    wf = Workflow("t_bad_wait", context=Ask, register=False)

    @wf.state(initial=True, to=["done"])
    def start(ctx: Any) -> Wait:
        return Wait(event="go", next="elsewhere")

    @wf.state()
    def done(ctx: Any) -> Complete:  # pragma: no cover - never reached
        return Complete()

    with engine() as eng:
        run_id = eng.start(wf)
        eng.run_until_idle()
        run = eng.get(run_id)
        assert (run.status, run.error_code) == ("failed", "E-ILLEGAL-TRANSITION")
        assert "elsewhere" in (run.error or "")


def test_cancel_a_waiting_run_then_retry_it():
    with engine() as eng:
        run_id = eng.start(approval())
        eng.run_until_idle()

        first, again = eng.cancel(run_id, "wrong input"), eng.cancel(run_id)

        assert (first.result, again.result) == ("cancelled", "finished")
        assert eng.get(run_id).error == "cancelled: wrong input"
        assert eng.retry(run_id) == "decide"
        eng.run_until_idle()
        assert eng.get(run_id).status == "waiting"


def test_cancel_during_a_running_state_ends_the_run_at_its_commit():
    wf = Workflow("t_cancel_running", context=Ask, register=False)
    seen: list[bool] = []

    with engine() as eng:

        @wf.state(initial=True, to=["after"])
        def work(ctx: Any) -> str:
            eng.cancel(ctx.run_id, "operator")
            ctx.heartbeat()  # the heartbeat learns of it
            seen.append(ctx.cancel_requested())
            return "after"

        @wf.state()
        def after(ctx: Any) -> Complete:  # pragma: no cover - must never run
            raise AssertionError("the next state ran")

        run_id = eng.start(wf)
        eng.run_until_idle()

        run = eng.get(run_id)
        assert seen == [True]
        assert (run.status, run.state, run.error_code) == ("cancelled", "work", "E-CANCELLED")
        assert [s.outcome for s in run.steps] == ["cancelled"]


def test_retry_of_a_failed_run_resumes_at_the_failed_state_with_its_context():
    wf = Workflow("t_retry", context=Ask, register=False)

    @wf.state(initial=True, to=["fragile"])
    def prepare(ctx: Any) -> str:
        ctx.data.answer = "kept"
        return "fragile"

    @wf.state(retry=Retry(max_attempts=2))
    def fragile(ctx: Any) -> Complete:
        if ctx.data.question != "fixed":
            ctx.data.question = "fixed"  # lost: an attempt that raises saves nothing
            raise RuntimeError("not yet")
        return Complete(output=ctx.data.answer)

    with engine() as eng:
        run_id = eng.start(wf)
        eng.run_until_idle()
        eng.advance(60)
        failed = eng.get(run_id)
        assert (failed.status, failed.state, failed.attempt) == ("failed", "fragile", 2)

        with pytest.raises(errors.UnknownState):
            eng.retry(run_id, from_state="nope")
        assert eng.retry(run_id, from_state="prepare") == "prepare"
        eng.run_until_idle()
        eng.advance(60)

        run = eng.get(run_id)
        assert run.status == "failed" and run.attempt == 2  # a fresh budget, spent again
        assert [s.outcome for s in run.steps].count("redriven") == 1
        with pytest.raises(errors.RunActive):
            eng.retry(eng.start(wf))


def test_a_completed_run_cannot_be_retried():
    with engine() as eng:
        run_id = eng.start(approval())
        eng.run_until_idle()
        eng.signal(run_id, "review", {"approve": True})
        eng.run_until_idle()
        with pytest.raises(errors.RunCompleted):
            eng.retry(run_id)


def test_a_run_past_its_deadline_times_out_while_waiting():
    with engine() as eng:
        run_id = eng.start(approval(run_timeout=60))
        eng.run_until_idle()

        eng.advance(61)

        run = eng.get(run_id)
        assert (run.status, run.error_code) == ("timed_out", "E-RUN-TIMEOUT")
        with pytest.raises(errors.RunFinished):
            eng.signal(run_id, "review", None)


def test_a_durable_timer():
    wf = Workflow("t_timer", context=Ask, register=False)

    @wf.state(initial=True, to=["later"])
    def sleep(ctx: Any) -> Wait:
        return Wait(next="later", timeout=86_400)

    @wf.state()
    def later(ctx: Any) -> Complete:
        return Complete(output="a day later")

    with engine() as eng:
        run_id = eng.start(wf)
        eng.run_until_idle()
        eng.advance(86_399)
        assert eng.get(run_id).status == "waiting"
        eng.advance(1)
        assert eng.get(run_id).output == "a day later"


def test_priority_is_validated_and_kept():
    wf = approval()
    with engine() as eng:
        run_id = eng.start(wf, priority=9)
        assert eng.get(run_id).priority == 9
        with pytest.raises(errors.InvalidInput, match="priority"):
            eng.start(wf, priority=10)
