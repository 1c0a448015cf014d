"""The decision rules (leaseflow/fsm/rules.py): pure values in, decision values out."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from leaseflow import Complete, Failed, Map, Next, Parallel, Retry, Workflow, errors
from leaseflow.fsm import checkpoint, rules
from leaseflow.types import StepOutcome

LIMITS = rules.Limits(max_payload_bytes=1000, compress_min_bytes=10_000)


class Ctx(BaseModel):
    n: int = 0
    note: str = ""


def _fn(ctx: Any) -> Any:
    return None


def shop() -> Workflow:
    wf = Workflow("rules_shop", context=Ctx, register=False)
    wf.state(initial=True, to=["work", "fan", "done"], name="start")(_fn)
    wf.state(to=["done"], retry=Retry(max_attempts=3, backoff=2.0, jitter=0), name="work")(_fn)
    wf.state(to=["done"], on_error="rescue", name="fragile")(_fn)
    wf.state(to=["done"], name="rescue")(_fn)
    wf.state(to=["join"], name="fan")(_fn)
    wf.state(branch=True, retry=Retry(max_attempts=2, jitter=0), name="leaf")(_fn)
    wf.state(to=["done"], retry=Retry(max_attempts=4), name="join")(_fn)
    wf.state(name="done")(_fn)
    wf.state(to=["done"], name="entry_fragile", initial=False)(_fn)
    return wf


def stored(data: Ctx) -> bytes:
    return checkpoint.encode(data.model_dump(mode="json"), limit=1000, compress_min=10_000)


def outcome(
    wf: Workflow, state: str, returned: object, data: Ctx | None = None
) -> rules.Transition:
    data = data or Ctx()
    return rules.on_outcome(
        wf,
        wf.states[state],
        returned,
        attempt=1,
        max_attempts=wf.states[state].retry.max_attempts,
        data=data,
        stored=stored(Ctx()),
        limits=LIMITS,
    )


def test_a_returned_name_moves_to_that_state_with_its_retry_budget():
    wf = shop()
    tr = outcome(wf, "start", "work", Ctx(n=1))
    assert (tr.outcome, tr.status, tr.next_state) == (StepOutcome.NEXT, "pending", "work")
    assert (tr.attempt, tr.max_attempts, tr.accepted) == (0, 3, True)
    assert checkpoint.decode(tr.checkpoint) == {"n": 1, "note": ""}
    assert tr.context_version == 1


def test_an_unchanged_context_keeps_the_stored_checkpoint():
    tr = outcome(shop(), "start", Next("work"))
    assert tr.checkpoint is None and tr.context_version is None


def test_a_name_outside_to_fails_illegal_and_refuses_in_commit_writes():
    tr = outcome(shop(), "start", "rescue")
    assert (tr.status, tr.error_code, tr.accepted) == ("failed", errors.ILLEGAL_TRANSITION, False)
    assert "not in its to=" in (tr.error or "")


@pytest.mark.parametrize("returned", [42, None, object()])
def test_a_value_that_is_no_outcome_fails_illegal(returned: object):
    assert outcome(shop(), "start", returned).error_code == errors.ILLEGAL_TRANSITION


def test_complete_carries_its_output_and_the_context():
    tr = outcome(shop(), "done", Complete(output={"ok": True}), Ctx(n=7))
    assert (tr.outcome, tr.status, tr.output, tr.terminal) == (
        "completed",
        "completed",
        {"ok": True},
        True,
    )
    assert checkpoint.decode(tr.checkpoint)["n"] == 7


@pytest.mark.parametrize(
    ("output", "code"),
    [({"x": "y" * 2000}, errors.PAYLOAD_TOO_LARGE), ({"x": float("nan")}, errors.STATE_ERROR)],
)
def test_an_output_too_large_or_not_json_fails_the_run(output: Any, code: str):
    tr = outcome(shop(), "done", Complete(output=output))
    assert (tr.status, tr.error_code, tr.accepted) == ("failed", code, False)


def test_a_context_too_large_fails_payload_too_large():
    tr = outcome(shop(), "start", "work", Ctx(note="x" * 2000))
    assert (tr.status, tr.error_code) == ("failed", errors.PAYLOAD_TOO_LARGE)


def test_failed_is_accepted_so_its_in_commit_writes_land():
    tr = outcome(shop(), "done", Failed("nope", code="APP-1"))
    assert (tr.status, tr.error_code, tr.error, tr.accepted) == ("failed", "APP-1", "nope", True)


def test_an_error_is_retried_with_exponential_backoff_while_attempts_remain():
    wf = shop()
    spec = wf.states["work"]
    delays = [
        rules.on_error(wf, spec, attempt=a, max_attempts=3, exc=ValueError("x"), rand=0.5).delay
        for a in (1, 2)
    ]
    assert delays == [2.0, 4.0]
    retry = rules.on_error(wf, spec, attempt=1, max_attempts=3, exc=ValueError("x"), rand=0.5)
    assert (retry.outcome, retry.status, retry.attempt, retry.accepted) == (
        "retry",
        "pending",
        1,
        False,
    )
    assert "ValueError: x" in (retry.step_error or "")


def test_an_exhausted_error_fails_state_error_with_the_traceback():
    wf = shop()
    try:
        {}["k"]
    except KeyError as raised:
        exc = raised
    tr = rules.on_error(wf, wf.states["work"], attempt=3, max_attempts=3, exc=exc, rand=0)
    assert (tr.status, tr.error_code) == ("failed", errors.STATE_ERROR)
    assert "attempt 3 of 3" in (tr.error or "") and "Traceback" in (tr.step_error or "")


def test_an_exhausted_error_goes_to_on_error_when_declared():
    wf = shop()
    tr = rules.on_error(wf, wf.states["fragile"], attempt=3, max_attempts=3, exc=OSError(), rand=0)
    assert (tr.outcome, tr.next_state, tr.attempt) == ("next", "rescue", 0)


def test_parallel_forks_a_group_and_the_run_waits():
    tr = outcome(shop(), "fan", Parallel(branches=["leaf", "leaf"], join="join"))
    assert (tr.outcome, tr.status, tr.max_attempts) == (StepOutcome.FORK, "waiting", 4)
    fork = tr.fork
    assert fork is not None
    assert (fork.kind, fork.states, fork.max_attempts, fork.chord) == (
        "parallel",
        ("leaf", "leaf"),
        (2, 2),
        True,
    )
    assert fork.released == 2 and fork.checkpoint == stored(Ctx())


def test_map_with_a_window_releases_only_that_many_and_is_no_chord():
    tr = outcome(shop(), "fan", Map(items=[1, 2, 3], branch="leaf", join="join", max_concurrency=2))
    assert tr.fork is not None
    assert (tr.fork.items, tr.fork.released, tr.fork.chord) == ((1, 2, 3), 2, False)


def test_an_empty_map_moves_straight_to_its_join():
    tr = outcome(shop(), "fan", Map(items=[], branch="leaf", join="join"))
    assert (tr.outcome, tr.next_state, tr.fork) == ("next", "join", None)


@pytest.mark.parametrize(
    ("returned", "words"),
    [
        (Parallel(branches=["leaf"], join="done"), "not in its to="),
        (Parallel(branches=[], join="join"), "at least one branch"),
        (Parallel(branches=["work"], join="join"), "not a branch state"),
        (Parallel(branches=["leaf"], join="join", on_branch_error="shrug"), "on_branch_error"),
        (Map(items=[1], branch="leaf", join="join", max_concurrency=0), "max_concurrency"),
    ],
)
def test_a_malformed_fork_fails_illegal_naming_why(returned: object, words: str):
    tr = outcome(shop(), "fan", returned)
    assert tr.error_code == errors.ILLEGAL_TRANSITION and words in (tr.error or "")


def test_map_items_that_are_not_json_fail_the_run():
    tr = outcome(shop(), "fan", Map(items=[{1, 2}], branch="leaf", join="join"))
    assert tr.error_code == errors.STATE_ERROR


def test_a_branch_result_completes_or_fails_on_size():
    spec = shop().states["leaf"]
    done = rules.on_branch(
        spec, attempt=1, max_attempts=2, returned={"a": 1}, limits=LIMITS, rand=0
    )
    assert (done.status, done.result, done.accepted) == ("completed", {"a": 1}, True)
    big = rules.on_branch(
        spec, attempt=1, max_attempts=2, returned="y" * 2000, limits=LIMITS, rand=0
    )
    assert big.status == "failed" and (big.error or "").startswith(errors.PAYLOAD_TOO_LARGE)


def test_a_branch_error_retries_then_fails():
    spec = shop().states["leaf"]
    first = rules.on_branch(
        spec, attempt=1, max_attempts=2, raised=ValueError("v"), limits=LIMITS, rand=0.5
    )
    last = rules.on_branch(
        spec, attempt=2, max_attempts=2, raised=ValueError("v"), limits=LIMITS, rand=0.5
    )
    assert (first.status, first.delay) == ("retry", 1.0)
    assert last.status == "failed" and "attempt 2 of 2" in (last.error or "")


def test_the_reaper_retries_an_expired_branch_while_attempts_remain():
    assert rules.reap_branch(1, 2, "w:1").status == "retry"
    last = rules.reap_branch(2, 2, None)
    assert last.status == "failed" and errors.LEASE_EXPIRED in (last.error or "")
    assert "unknown worker" in (last.error or "")


def test_a_checkpoint_of_another_context_version_is_refused():
    wf = Workflow("rules_v2", context=Ctx, context_version=2, register=False)
    wf.state(initial=True, name="only")(_fn)
    blob = stored(Ctx())
    with pytest.raises(errors.CheckpointError) as newer:
        rules.load_context(wf, blob, 3)
    with pytest.raises(errors.CheckpointError) as older:
        rules.load_context(wf, blob, 1)
    assert (newer.value.code, older.value.code) == (
        errors.CHECKPOINT_CORRUPT,
        errors.CHECKPOINT_STALE,
    )
    assert rules.load_context(wf, blob, 2) == Ctx()


@pytest.mark.parametrize(
    ("payload", "words"),
    [([1], "JSON object"), ({"n": "many"}, "n"), ({"n": float("inf")}, "JSON")],
)
def test_a_bad_first_input_is_invalid_input(payload: Any, words: str):
    with pytest.raises(errors.InvalidInput, match=words):
        rules.first_checkpoint(shop(), payload, LIMITS)


def test_the_inline_budget_takes_only_immediate_moves_to_inline_states_on_the_same_queue():
    wf = Workflow("rules_inline", context=Ctx, register=False)
    wf.state(initial=True, to=["b", "c", "d"], name="a")(_fn)
    wf.state(to=["c"], inline=True, name="b")(_fn)
    wf.state(to=["d"], inline=True, queue="other", name="c")(_fn)
    wf.state(inline=False, name="d")(_fn)
    move = {n: rules.Transition("next", "pending", next_state=n) for n in "bcd"}
    budget = rules.InlineBudget.for_task(wf.states["a"], max_states=1, max_seconds=2.0, now=100.0)
    assert not budget.take(wf, move["c"], 100.0)  # another queue
    assert not budget.take(wf, move["d"], 100.0)  # not inline
    assert not budget.take(wf, move["b"], 102.0)  # past the deadline
    assert budget.take(wf, move["b"], 101.0)
    assert not budget.take(wf, move["b"], 101.0)  # spent


# -- values the store cannot take: refused before the commit, naming their field -------


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("output", "words"),
    [
        ({"text": "a\x00b"}, 'output["text"] cannot be stored: contains a NUL byte'),
        ({"k\x00": 1}, 'output["k\\u0000"] cannot be stored: its key contains a NUL byte'),
        ({"tree": _nested(5000)}, 'output["tree"][0][0][0]...'),
    ],
)
def test_an_output_the_store_cannot_take_fails_state_error_naming_the_field(
    output: Any, words: str
):
    # When
    tr = outcome(shop(), "done", Complete(output=output))
    # Then: failed once, for good (no retry), with the field and why
    assert (tr.outcome, tr.status, tr.error_code, tr.accepted) == (
        "failed",
        "failed",
        errors.STATE_ERROR,
        False,
    )
    assert words in (tr.error or "")


def test_a_context_the_store_cannot_take_fails_context_invalid_naming_the_field():
    tr = outcome(shop(), "start", "work", Ctx(note="a\x00b"))
    assert (tr.status, tr.error_code) == ("failed", errors.CONTEXT_INVALID)
    assert (tr.error or "").startswith('context["note"] cannot be stored: contains a NUL byte')


def test_map_items_the_store_cannot_take_fail_state_error_naming_the_item():
    tr = outcome(shop(), "fan", Map(items=[1, {"text": "\x00"}], branch="leaf", join="join"))
    assert (tr.status, tr.error_code, tr.fork) == ("failed", errors.STATE_ERROR, None)
    assert (tr.error or "").startswith('Map.items[1]["text"] cannot be stored')


def test_a_branch_result_the_store_cannot_take_fails_the_branch_with_state_error():
    spec = shop().states["leaf"]
    bad = rules.on_branch(
        spec, attempt=1, max_attempts=2, returned={"text": "\x00"}, limits=LIMITS, rand=0
    )
    assert bad.status == "failed"  # not "retry", although an attempt is left
    assert (bad.error or "").startswith(f'{errors.STATE_ERROR}: branch result["text"] cannot')


def test_error_texts_with_nul_are_escaped_never_refused():
    # Given texts with NUL bytes: a Failed reason and code, an exception message
    wf = shop()
    failed = outcome(wf, "done", Failed("no\x00pe", code="APP\x00"))
    boom = ValueError("bad\x00byte")
    retry = rules.on_error(wf, wf.states["work"], attempt=1, max_attempts=3, exc=boom, rand=0.5)
    last = rules.on_error(wf, wf.states["work"], attempt=3, max_attempts=3, exc=boom, rand=0.5)
    rescue = rules.on_error(wf, wf.states["fragile"], attempt=3, max_attempts=3, exc=boom, rand=0)
    branch = rules.on_branch(
        wf.states["leaf"], attempt=2, max_attempts=2, raised=boom, limits=LIMITS, rand=0
    )

    # Then every text reaches its column with the NUL escaped, and nothing is refused
    assert (failed.status, failed.error, failed.error_code, failed.accepted) == (
        "failed",
        "no\\x00pe",
        "APP\\x00",
        True,
    )
    assert "ValueError: bad\\x00byte" in (retry.step_error or "")
    assert (last.error or "").startswith("ValueError: bad\\x00byte (attempt 3 of 3")
    assert "bad\\x00byte" in (last.step_error or "") and rescue.next_state == "rescue"
    assert "bad\\x00byte" in (rescue.step_error or "")
    assert (branch.status, (branch.error or "")[:25]) == ("failed", "ValueError: bad\\x00byte (")
    texts = [failed.error, failed.error_code, retry.step_error, last.error, last.step_error]
    texts += [rescue.step_error, branch.error]
    assert not [t for t in texts if t is None or "\x00" in t]
