"""Lifecycle hooks: called after the commit with an immutable event, sync or async,
never changing a run's outcome, never delaying it (``leaseflow.hooks``)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel

from leaseflow import Complete, Parallel, Retry, Workflow, hooks, metrics
from leaseflow.testing import engine


class Ctx(BaseModel):
    fail_first: bool = False


def _linear(name: str) -> Workflow:
    wf = Workflow(name, context=Ctx, register=False)

    @wf.state(initial=True, to=["b"], retry=Retry(max_attempts=2, backoff=0, jitter=0))
    def a(ctx: Any) -> str:
        if ctx.data.fail_first and ctx.attempt == 1:
            raise ConnectionError("flaky")
        return "b"

    @wf.state()
    def b(ctx: Any) -> Complete:
        return Complete(output={"ok": True})

    return wf


def _fan(name: str) -> Workflow:
    wf = Workflow(name, context=Ctx, register=False)

    @wf.state(initial=True, to=["joined"])
    def fork(ctx: Any) -> Parallel:
        return Parallel(branches=["leg", "leg"], join="joined")

    @wf.state(branch=True)
    def leg(ctx: Any) -> int:
        return ctx.index

    @wf.state()
    def joined(ctx: Any) -> Complete:
        return Complete(output=ctx.branch_results)

    return wf


def _sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(autouse=True)
def _no_global_hooks() -> Iterator[None]:
    hooks.clear()
    yield
    hooks.clear()
    assert hooks.flush(timeout=10)


def test_transition_and_run_finished_hooks_see_each_commit_in_order():
    # Given a workflow with a sync hook on every transition and one on its end
    wf = _linear("hooked_sync")
    seen: list[hooks.Event] = []
    wf.on_transition(seen.append)
    finished: list[hooks.Event] = []
    wf.on_run_finished(finished.append)

    # When a run whose first state fails once runs to its end
    with engine() as eng:
        run_id = eng.start(wf, {"fail_first": True})
        eng.run_until_idle()
        run = eng.get(run_id)

    # Then each committed step was reported once, in order, after its commit
    assert run.status == "completed"
    assert [(e.state, e.outcome, e.next_state, e.status) for e in seen] == [
        ("a", "retry", None, "pending"),
        ("a", "next", "b", "pending"),
        ("b", "completed", None, "completed"),
    ]
    assert [e.step_seq for e in seen] == [1, 2, 3]
    assert {(e.run_id, e.workflow, e.version, e.kind) for e in seen} == {
        (run_id, "hooked_sync", 1, "transition")
    }
    # And the end once, with its status
    assert [(e.kind, e.state, e.status) for e in finished] == [("run_finished", "b", "completed")]
    # And an event is immutable
    with pytest.raises(dataclasses.FrozenInstanceError):
        seen[0].status = "failed"  # type: ignore[misc]


def test_an_async_global_hook_runs_to_completion():
    # Given a coroutine hook for every workflow's finished runs
    done: list[tuple[str, str]] = []

    @hooks.on("run_finished")
    async def record(event: hooks.Event) -> None:
        done.append((event.workflow, event.status))

    # When a run finishes
    with engine() as eng:
        eng.start(_linear("hooked_async"))
        eng.run_until_idle()

    # Then the coroutine ran (awaited on the hook thread's loop)
    assert done == [("hooked_async", "completed")]


def test_group_finished_fires_once_when_the_branches_are_done():
    # Given a Parallel of two branches with a group hook
    wf = _fan("hooked_fan")
    groups: list[hooks.Event] = []
    wf.on_group_finished(groups.append)

    # When the run goes through its fork and join
    with engine() as eng:
        run_id = eng.start(wf)
        eng.run_until_idle()
        assert eng.get(run_id).status == "completed"

    # Then the group was reported once, with its join as the next state
    assert [(e.outcome, e.next_state, e.group_id is not None) for e in groups] == [
        ("joined", "joined", True)
    ]


def test_a_raising_hook_changes_no_outcome_and_is_counted(caplog):
    # Given hooks that raise on every transition and at the end
    wf = _linear("hooked_raising")

    @wf.on_transition
    def broken(event: hooks.Event) -> None:
        raise RuntimeError("hook bug")

    hooks.on("run_finished", lambda event: 1 / 0)
    before = _sample("leaseflow_hook_errors_total", hook="transition")
    finished_before = _sample("leaseflow_hook_errors_total", hook="run_finished")

    # When a run goes through
    with engine() as eng:
        run_id = eng.start(wf)
        eng.run_until_idle()
        run = eng.get(run_id)

    # Then the run completed as without hooks, and every failure was counted
    assert run.status == "completed"
    assert _sample("leaseflow_hook_errors_total", hook="transition") - before == 2
    assert _sample("leaseflow_hook_errors_total", hook="run_finished") - finished_before == 1


def test_a_slow_hook_does_not_delay_the_run(monkeypatch):
    # Given a hook that sleeps 5 s on every transition (released at the test's end),
    # and run_until_idle not waiting for the hooks (as a worker never does)
    wf = _linear("hooked_slow")
    release = threading.Event()
    calls: list[str] = []

    @wf.on_transition
    def slow(event: hooks.Event) -> None:
        calls.append(event.state)
        release.wait(5.0)

    monkeypatch.setattr(hooks, "flush", lambda timeout=30.0: True)
    try:
        # When a run of two states runs
        with engine() as eng:
            started = time.monotonic()
            run_id = eng.start(wf)
            eng.run_until_idle()
            elapsed = time.monotonic() - started
            run = eng.get(run_id)
        # Then it completed well before even one hook call could have finished
        assert run.status == "completed"
        assert elapsed < 2.5, f"the run took {elapsed:.2f} s behind a 5 s hook"
    finally:
        release.set()
        monkeypatch.undo()
    assert hooks.flush(timeout=10)
    assert calls == ["a", "b"]


def test_a_full_hook_queue_drops_calls_and_counts_them():
    # Given a dispatcher with room for one call, its thread held by a blocked hook
    dispatcher = hooks.Dispatcher(size=1)
    entered, release = threading.Event(), threading.Event()

    def blocked(event: hooks.Event) -> None:
        entered.set()
        release.wait(5.0)

    now = datetime.now(UTC)
    event = hooks.Event("transition", "r", "wf", 1, "a", "b", "next", "pending", 1, None, now)
    before = _sample("leaseflow_hooks_dropped_total", hook="transition")

    # When three calls come while the first still runs
    dispatcher.submit([blocked], event)
    assert entered.wait(5.0)
    for _ in range(3):
        dispatcher.submit([blocked], event)

    # Then one waits in the queue and two are dropped, counted
    assert _sample("leaseflow_hooks_dropped_total", hook="transition") - before == 2
    release.set()
    assert dispatcher.flush(timeout=10)


def test_an_unknown_hook_kind_is_refused():
    with pytest.raises(Exception, match="unknown hook"):
        hooks.on("step", print)  # type: ignore[arg-type]
