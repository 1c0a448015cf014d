"""Checkpoints that outlive their code: a run checkpointed at context version 1 goes on
under version 2 through an upcaster, re-gathers with only ``regather=``, or fails
``E-CHECKPOINT-STALE``; damaged bytes and a version from the future fail
``E-CHECKPOINT-CORRUPT``: never a crash loop, never a silent default."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from leaseflow import Complete, Wait, Workflow, errors
from leaseflow.testing import Engine, engine


class V1(BaseModel):
    name: str = "Ada Lovelace"


class V2(BaseModel):
    """The new context: defaults, so that a re-gather can start from the run's input."""

    first: str = ""
    last: str = ""


def v1() -> Workflow:
    wf = Workflow("t_ckpt", context=V1, register=False)

    @wf.state(initial=True, to=["greet"])
    def start(ctx: Any) -> Wait:
        return Wait(event="go", next="greet")

    @wf.state()
    def greet(ctx: Any) -> Complete:  # pragma: no cover - v1 never gets here in these tests
        return Complete(output=ctx.data.name)

    return wf


def v2(*, upcaster: bool, regather: bool) -> Workflow:
    wf = Workflow(
        "t_ckpt",
        context=V2,
        context_version=2,
        regather="rebuild" if regather else None,
        register=False,
    )

    @wf.state(initial=True, to=["greet"])
    def start(ctx: Any) -> Wait:  # pragma: no cover - runs were started on v1
        return Wait(event="go", next="greet")

    if regather:

        @wf.state(to=["greet"])
        def rebuild(ctx: Any) -> str:
            first, _, last = ctx.input["name"].partition(" ")
            ctx.data.first, ctx.data.last = first, last + " (re-gathered)"
            return "greet"

    @wf.state()
    def greet(ctx: Any) -> Complete:
        return Complete(output=f"{ctx.data.first}/{ctx.data.last}")

    if upcaster:

        @wf.upcaster(from_version=1)
        def split(data: dict[str, Any]) -> dict[str, Any]:
            first, _, last = data.pop("name").partition(" ")
            return {**data, "first": first, "last": last}

    return wf


def parked_on_v1(eng: Engine) -> str:
    """A run whose first state committed under v1 (its checkpoint is version 1), waiting
    for "go": the next state is claimed under whatever code is deployed then."""
    run_id = eng.start(v1(), {"name": "Ada Lovelace"})
    eng.run_until_idle()
    assert eng.get(run_id).status == "waiting"
    return run_id


def go_on(eng: Engine, run_id: str) -> Any:
    eng.signal(run_id, "go")
    eng.run_until_idle()
    return eng.get(run_id)


def test_an_upcaster_upgrades_the_checkpoint_and_the_run_goes_on():
    with engine() as eng:
        run_id = parked_on_v1(eng)
        eng.deploy(v2(upcaster=True, regather=True))
        run = go_on(eng, run_id)
        assert (run.status, run.output) == ("completed", "Ada/Lovelace")


def test_with_only_regather_the_run_rebuilds_its_context_from_its_input():
    with engine() as eng:
        run_id = parked_on_v1(eng)
        eng.deploy(v2(upcaster=False, regather=True))
        run = go_on(eng, run_id)
        assert (run.status, run.output) == ("completed", "Ada/Lovelace (re-gathered)")
        assert [(s.state, s.outcome, s.next_state) for s in run.steps][2:4] == [
            ("greet", "regathered", "rebuild"),
            ("rebuild", "next", "greet"),
        ]


def test_with_neither_the_run_fails_stale():
    with engine() as eng:
        run_id = parked_on_v1(eng)
        eng.deploy(v2(upcaster=False, regather=False))
        run = go_on(eng, run_id)
        assert (run.status, run.error_code) == ("failed", "E-CHECKPOINT-STALE")
        assert "no upcaster goes from version 1" in (run.error or "")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda blob: b"\x07" + blob[1:], "unknown codec byte 7"),
        (lambda blob: b"\x01" + b"not a zstd frame", "content size"),
        (lambda blob: blob[:-1] + bytes((blob[-1] ^ 1,)), "fails its checksum"),
        (lambda blob: blob[: max(2, len(blob) // 2)], ""),
    ],
    ids=["codec-byte", "bad-frame", "flipped-bit", "truncated"],
)
def test_damaged_bytes_fail_corrupt_once(damage, reason):
    with engine() as eng:
        run_id = parked_on_v1(eng)
        row = eng.store._runs[run_id]
        row.checkpoint = damage(row.checkpoint)
        run = go_on(eng, run_id)
        assert (run.status, run.error_code) == ("failed", "E-CHECKPOINT-CORRUPT")
        assert reason in (run.error or "")
        assert [s.outcome for s in run.steps] == ["wait", "signalled", "failed"]  # no loop


def test_a_checkpoint_from_the_future_fails_corrupt():
    with engine() as eng:
        run_id = parked_on_v1(eng)
        eng.store._runs[run_id].context_version = 9
        run = go_on(eng, run_id)
        assert (run.status, run.error_code) == ("failed", "E-CHECKPOINT-CORRUPT")
        assert "newer than this worker's 1" in (run.error or "")


def test_an_upcaster_that_raises_or_breaks_the_model_fails_corrupt():
    broken = v2(upcaster=False, regather=True)

    @broken.upcaster(from_version=1)
    def wrong(data: dict[str, Any]) -> dict[str, Any]:
        return {"first": 5, "last": "L"}  # not a string: the model refuses it

    with engine() as eng:
        run_id = parked_on_v1(eng)
        eng.deploy(broken)
        run = go_on(eng, run_id)
        assert (run.status, run.error_code) == ("failed", "E-CHECKPOINT-CORRUPT")
        assert "does not validate" in (run.error or "")


def test_bad_upgrade_definitions_are_refused():
    wf = v2(upcaster=False, regather=False)
    wf.regather = "nowhere"

    @wf.upcaster(from_version=2)
    def too_late(data: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover
        return data

    with pytest.raises(errors.InvalidDefinition) as info:
        wf.validate()
    assert "upcaster from context version 2, which is not below context_version=2" in str(
        info.value
    )
    assert "unknown state 'nowhere' in regather=" in str(info.value)


def test_a_model_changed_without_a_new_context_version_fails_corrupt_with_a_hint():
    # Given a run checkpointed under v1, then code whose model for the SAME context
    # version no longer accepts that data (a field renamed, no version bump)
    class Renamed(BaseModel):
        full_name: str

    changed = Workflow("t_ckpt", context=Renamed, register=False)

    @changed.state(initial=True, to=["greet"])
    def start(ctx: Any) -> Wait:  # pragma: no cover - the run was started on v1
        return Wait(event="go", next="greet")

    @changed.state()
    def greet(ctx: Any) -> Complete:  # pragma: no cover - never reached
        return Complete(output=ctx.data.full_name)

    with engine() as eng:
        run_id = parked_on_v1(eng)
        eng.deploy(changed)
        run = go_on(eng, run_id)
        # Then the run fails closed, once, naming the model and what to do
        assert (run.status, run.error_code) == ("failed", "E-CHECKPOINT-CORRUPT")
        assert "does not validate against Renamed" in (run.error or "")
        assert "raise the workflow's context_version" in (run.error or "")
        assert [s.outcome for s in run.steps] == ["wait", "signalled", "failed"]


def test_every_step_that_checkpoints_records_the_context_and_stored_sizes():
    class Notes(BaseModel):
        text: str = ""

    wf = Workflow("t_sizes", context=Notes, register=False)

    @wf.state(initial=True, to=["write"])
    def start(ctx: Any) -> str:
        ctx.data.text = "short"
        return "write"

    @wf.state()
    def write(ctx: Any) -> Complete:
        ctx.data.text = "the same sentence again and again. " * 200
        return Complete()

    with engine() as eng:
        run = eng.run_until_done(eng.start(wf, {}))
        small, large = run.steps
        # the raw codec below the compression threshold: framing only (codec byte + CRC)
        assert (small.context_bytes, small.checkpoint_bytes) == (16, 16 + 5)
        assert large.context_bytes == len('{"text":""}') + 35 * 200
        assert large.checkpoint_bytes is not None and large.checkpoint_ratio is not None
        assert large.checkpoint_ratio < 0.05  # zstd on repetitive text
