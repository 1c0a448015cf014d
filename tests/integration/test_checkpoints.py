"""Checkpoint upgrades against PostgreSQL: the transition guard accepts the move to
``regather=`` from any state (registered with the new definition), and an upcaster's
run goes on."""

from __future__ import annotations

from typing import Any

from leaseflow import Complete, Wait, Workflow
from leaseflow.fsm import registry
from tests.conftest import make_runner
from tests.unit.test_checkpoints import V1, V2


def declare(context: type, context_version: int, regather: bool) -> Workflow:
    wf = Workflow(
        "pg_ckpt",
        context=context,
        context_version=context_version,
        regather="rebuild" if regather else None,
        register=False,
    )

    @wf.state(initial=True, to=["greet"])
    def start(ctx: Any) -> Wait:
        return Wait(event="go", next="greet")

    if regather:

        @wf.state(to=["greet"])
        def rebuild(ctx: Any) -> str:
            ctx.data.first, _, ctx.data.last = ctx.input["name"].partition(" ")
            return "greet"

    @wf.state()
    def greet(ctx: Any) -> Complete:
        return Complete(output=f"{ctx.data.first}/{ctx.data.last}")

    return wf


def test_a_stale_checkpoint_is_regathered_through_the_guard(store, settings):
    old, new = declare(V1, 1, False), declare(V2, 2, True)
    registry.register(old)
    runner = make_runner(store, settings, "ckpt:1")
    try:
        from leaseflow.fsm import rules

        blob, payload = rules.first_checkpoint(old, {"name": "Ada Lovelace"}, runner.limits)
        run_id = "5b7c8d2e-1f3a-4b6c-9d0e-2a4b6c8d0e1f"
        store.create_run(
            run_id=run_id, wf=old, checkpoint=blob, input=payload, idempotency_key=None
        )
        assert runner.run_step(run_id, 1).result == "committed"  # parked under v1
        registry.unregister(old)
        registry.register(new)  # the deploy: context version 2, regather=
        store._registered.clear()
        store.register_workflow(new)  # its transitions, with the implicit edges
        resumed = store.signal(run_id, "go", None, signal_id="go")
        assert resumed.due is not None
        step = runner.run_step(run_id, resumed.due.step_seq)
        assert (step.result, step.outcome) == ("committed", "regathered")
        wakeups = list(step.wakeups)
        while wakeups:  # as a worker chain would: rebuild, then greet
            wakeups += runner.run_step(run_id, wakeups.pop(0).step_seq).wakeups
        run = store.get_run(run_id)
        assert (run.status, run.output) == ("completed", "Ada/Lovelace")
        assert [s.outcome for s in run.steps] == [
            "wait",
            "signalled",
            "regathered",
            "next",
            "completed",
        ]
    finally:
        runner.keeper.stop()
        registry.unregister(new)
        registry.unregister(old)
