"""Bad data fails closed, with its cause: a value the store cannot take fails the run
once, at once, with a stable code and the field it was in; never a retry loop ending
in ``E-LEASE-EXPIRED`` with nothing saying why.

The first tests run on a real ``celery worker`` subprocess (no beat: a run left to its
lease would hang, and the test would time out). Each prints how long the run took
from its creation to its failure (``pytest -s``). The others drive the runner in this
process, where the codec can be bypassed to reach PostgreSQL's own refusal.
"""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from leaseflow import Complete, Workflow, errors, messages
from leaseflow.fsm import checkpoint, registry
from tests.helpers import WorkerProcess, processes
from tests.workflows import unstorable

NUL = "a\x00b"


@pytest.fixture
def settings(settings):
    """The shared settings, with the workflows of this module on the worker."""
    workflows = [*settings.workflows, "tests.workflows.unstorable"]
    return settings.model_copy(update={"workflows": workflows})


@pytest.fixture
def worker(settings, tmp_path):
    proc = WorkerProcess(settings, tmp_path)
    with processes(proc):
        yield proc.wait_ready()


def step_rows(run) -> list[tuple[str, int, str]]:
    return [(s.state, s.attempt, s.outcome) for s in run.steps]


@pytest.mark.parametrize(
    ("wf", "what", "code", "words", "steps"),
    [
        pytest.param(
            unstorable.emitting,
            "nul",
            errors.STATE_ERROR,
            ['output["text"] cannot be stored', "NUL"],
            [("emit", 1, "failed")],
            id="nul-in-the-output",
        ),
        pytest.param(
            unstorable.emitting,
            "deep",
            errors.STATE_ERROR,
            ['output["tree"][0]', "nests deeper than 100 levels"],
            [("emit", 1, "failed")],
            id="deeply-nested-output",
        ),
        pytest.param(
            unstorable.emitting,
            "context",
            errors.CONTEXT_INVALID,
            ['context["note"] cannot be stored', "NUL"],
            [("emit", 1, "failed")],
            id="nul-in-the-context",
        ),
        pytest.param(
            unstorable.fanning,
            "nul",
            errors.BRANCH_FAILED,
            ["branch 0 failed", errors.STATE_ERROR, 'branch result["text"]', "NUL"],
            [("spread", 1, "fork"), ("spread", 1, "failed")],
            id="nul-in-a-branch-result",
        ),
    ],
)
def test_a_value_the_store_cannot_take_fails_the_run_once_on_a_worker(
    client, worker, db, wf, what, code, words, steps
):
    # Given a worker (and no beat), and a run whose state produces such a value
    run_id = client.start(wf, {"what": what})

    # When the worker runs it
    run = client.wait_for(run_id, timeout=30)

    # Then the run failed once, with the stable code, the field and the reason
    assert (run.status, run.error_code) == ("failed", code), run.error
    assert [w for w in words if w not in (run.error or "")] == [], run.error
    assert step_rows(run) == steps  # one row for the state: no retry, no lease_expired
    attempts = db.execute("SELECT attempt, status FROM lf_branches WHERE run_id = %s", (run_id,))
    assert attempts.fetchall() == ([(1, "failed")] if wf is unstorable.fanning else [])
    seconds = (run.finished_at - run.created_at).total_seconds()
    print(f"\nfail_closed[{wf.name}:{what}] {code} {seconds:.3f} s created->finished")


def test_an_input_the_store_cannot_take_is_refused_at_submit(client, db):
    # When runs are started with a NUL byte, or nesting far too deep, in their input
    with pytest.raises(errors.InvalidInput) as nul:
        client.start(unstorable.emitting, {"what": NUL})
    with pytest.raises(errors.InvalidInput) as deep:
        client.start(unstorable.emitting, {"what": "x", "tree": unstorable.nested(100_000)})
    with pytest.raises(errors.InvalidInput) as batch:
        client.start_many(unstorable.emitting, [{"what": "nul"}, {"what": "x", "n": [NUL]}])

    # Then each is refused naming the field, and no run exists
    assert nul.value.code == errors.CONTEXT_INVALID
    assert 'input["what"] cannot be stored: contains a NUL byte' in str(nul.value)
    assert 'input["tree"][0]' in str(deep.value) and "nests deeper" in str(deep.value)
    assert 'input #1: input["n"][0] cannot be stored' in str(batch.value)
    assert db.execute("SELECT count(*) FROM lf_runs").fetchone()[0] == 0


# -- past the codec: PostgreSQL's own refusal --------------------------------------------


@pytest.fixture
def codec_gap(monkeypatch):
    """The codec lets every value through, as if it had a gap: PostgreSQL refuses."""
    monkeypatch.setattr(checkpoint, "check", lambda value, *, what: None)


def drive(runner, first: messages.Message) -> list[str]:
    """Handle messages in this process until none is left; their results."""
    pending, results = [first], []
    while pending and len(results) < 50:
        step = runner.handle(pending.pop(0))
        results.append(step.result)
        pending.extend(step.wakeups)
        if step.fork is not None:
            pending.extend(step.fork.branches)
    return results


def start(client, wf, data) -> messages.StateStep:
    return messages.StateStep(client.start(wf, data), wf.name, wf.initial.name, 1)


@pytest.mark.parametrize(
    ("wf", "what", "code", "words"),
    [
        pytest.param(
            unstorable.emitting,
            "nul",
            errors.STATE_ERROR,
            ["step 1 of run", "unsupported Unicode escape sequence"],
            id="output",
        ),
        pytest.param(
            unstorable.fanning,
            "items",
            errors.STATE_ERROR,
            ["step 1 of run", "unsupported Unicode escape sequence"],
            id="map-items",
        ),
        pytest.param(
            unstorable.fanning,
            "nul",
            errors.BRANCH_FAILED,
            [errors.STATE_ERROR, "branch 0 of group", "unsupported Unicode escape sequence"],
            id="branch-result",
        ),
    ],
)
def test_a_value_postgres_refuses_past_the_codec_fails_the_run_once(
    client, runner, codec_gap, wf, what, code, words
):
    # Given a run whose value only PostgreSQL refuses (the codec is bypassed)
    first = start(client, wf, {"what": what})

    # When its steps run
    results = drive(runner, first)

    # Then the refused commit became a failure, committed at once, never retried
    run = client.get(first.run_id)
    assert (run.status, run.error_code) == ("failed", code), run.error
    assert [w for w in words if w not in (run.error or "")] == [], run.error
    assert "lease_lost" not in results
    assert [s.outcome for s in run.steps if s.outcome in ("retry", "lease_expired")] == []


class Plain(BaseModel):
    n: int = 0


def edges(to: list[str]) -> Workflow:
    """A workflow whose first state goes to ``shortcut``, declared with edges ``to``."""
    wf = Workflow("fail_closed_edges", context=Plain, register=False)
    wf.state(initial=True, to=to, name="begin")(lambda ctx: "shortcut")
    wf.state(to=["shortcut"], name="detour")(lambda ctx: "shortcut")
    wf.state(name="shortcut")(lambda ctx: Complete())
    return wf


def test_an_edge_postgres_does_not_know_fails_the_run_illegal(client, runner):
    # Given a run registered with the old definition, and a worker with a new one under
    # the same version (an edge was added without a version bump)
    first = start(client, edges(["detour"]), {})
    newer = edges(["detour", "shortcut"])
    registry.register(newer)
    try:
        # When the worker takes the new edge
        results = drive(runner, first)
    finally:
        registry.unregister(newer)

    # Then PostgreSQL's transition guard refused it and the run failed once for it
    run = client.get(first.run_id)
    assert (run.status, run.error_code, run.state) == (
        "failed",
        errors.ILLEGAL_TRANSITION,
        "begin",
    )
    assert "'begin' -> 'shortcut' is not a registered transition" in (run.error or "")
    assert (results, step_rows(run)) == (["committed"], [("begin", 1, "failed")])
