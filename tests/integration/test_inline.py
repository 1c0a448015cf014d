"""Inline continuation against real PostgreSQL: ``@wf.state(inline=True)``.

The commit of a state hands the next state's lease to the committing worker in the
same statement, so the next state runs in the same call with no claim and no
broker hop. Each state keeps its own lease token, step-log row, retries and fence.
"""

from __future__ import annotations

from typing import Any

import pytest

from leaseflow import Complete, Workflow, errors, faults, messages
from leaseflow.beat import jobs
from leaseflow.fsm import rules
from leaseflow.heartbeat import LeaseKeeper
from leaseflow.runner import Runner
from leaseflow.settings import Settings
from leaseflow.tasks import runtime
from tests.integration.test_engine import drive, expire_lease, start
from tests.workflows import basic


def steps(db, run_id: str) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT seq, state, attempt, outcome, lease_token::text, worker FROM lf_steps "
        "WHERE run_id = %s ORDER BY seq",
        (run_id,),
    ).fetchall()


def make_inline_runner(store, settings, *, max_states: int = 100) -> Runner:
    keeper = LeaseKeeper(store, worker="inline:1", ttl=settings.lease_ttl, interval=30)
    return Runner(
        store,
        keeper,
        worker="inline:1",
        ttl=settings.lease_ttl,
        limits=rules.Limits(settings.max_checkpoint_bytes),
        inline_max_states=max_states,
        rand=lambda: 0.5,
    )


@pytest.fixture
def inline_runner(store, settings):
    r = make_inline_runner(store, settings)
    yield r
    r.keeper.stop()


def test_inline_states_run_in_one_call_each_with_its_own_lease(client, inline_runner, db):
    # Given a run whose states b and c are inline, and d (another queue) is not
    first = start(client, basic.inline_chain)

    # When the first message is handled
    result = inline_runner.run_step(first.run_id, 1)

    # Then a, b and c ran in that one call, and only d was published (it is on another queue)
    assert (result.result, result.inlined) == ("committed", 2)
    assert [(d.state, d.step_seq) for d in result.wakeups] == [("d", 4)]
    rows = steps(db, first.run_id)
    assert [r[:4] for r in rows] == [
        (1, "a", 1, "next"),
        (2, "b", 1, "next"),
        (3, "c", 1, "next"),
    ]
    tokens = [r[4] for r in rows]
    assert len(set(tokens)) == 3, "every inlined state had a lease token of its own"
    assert {r[5] for r in rows} == {"inline:1"}
    run = db.execute(
        "SELECT state, status, lease_token, attempt FROM lf_runs WHERE id = %s", (first.run_id,)
    ).fetchone()
    assert run == ("d", "pending", None, 0)

    # And d's task inlines e, which is on d's queue
    [d] = result.wakeups
    last = inline_runner.run_step(d.run_id, d.step_seq)
    assert (last.result, last.inlined, last.wakeups) == ("committed", 1, ())
    done = client.get(first.run_id)
    assert done.status == "completed"
    assert done.output == {"trail": ["a#1", "b#1", "c#1", "d#1", "e#1"]}
    assert [s.seq for s in done.steps] == [1, 2, 3, 4, 5]


def test_an_inlined_state_holds_a_visible_heartbeated_lease(client, inline_runner, db, store):
    from leaseflow.store.base import LeaseRef

    # Given a run paused by a hook just before the inlined state c commits
    first = start(client, basic.inline_chain)
    seen: dict[str, Any] = {}

    def look(info: dict[str, Any]) -> None:
        if info["state"] == "c":
            seen["row"] = db.execute(
                "SELECT state, status, lease_owner, lease_token::text, attempt, "
                "lease_expires_at > now() FROM lf_runs WHERE id = %s",
                (first.run_id,),
            ).fetchone()
            seen["held"] = store.heartbeat(
                [LeaseRef(first.run_id, seen["row"][3])], worker="inline:1", ttl=30
            )

    faults.arm("before_commit", look)
    inline_runner.run_step(first.run_id, 1)

    # Then operators see c running, leased to this worker on attempt 1, and the
    # heartbeat statement extends that lease like any claimed one
    state, status, owner, token, attempt, live = seen["row"]
    assert (state, status, owner, attempt, live) == ("c", "running", "inline:1", 1, True)
    assert seen["held"] == frozenset({token})


def test_a_retry_leaves_the_inline_chain_and_the_next_attempt_rejoins_it(client, inline_runner, db):
    # Given c fails on its first attempt (3 attempts, no backoff)
    first = start(client, basic.inline_chain, {"fail_at": "c", "fail_times": 1})

    # When the first message runs: a, b inline, then c fails
    result = inline_runner.run_step(first.run_id, 1)

    # Then the retry is published (a delayed retry never runs inline)...
    assert result.inlined == 2
    [retry] = result.wakeups
    assert (retry.state, retry.step_seq) == ("c", 4)

    # ...and the retried attempt runs in its own task, then carries on inline
    drive(inline_runner, retry)
    assert [r[:4] for r in steps(db, first.run_id)] == [
        (1, "a", 1, "next"),
        (2, "b", 1, "next"),
        (3, "c", 1, "retry"),
        (4, "c", 2, "next"),
        (5, "d", 1, "next"),
        (6, "e", 1, "completed"),
    ]
    assert client.get(first.run_id).output == {"trail": ["a#1", "b#1", "c#2", "d#1", "e#1"]}


def test_a_lost_lease_in_an_inlined_state_is_fenced_and_ends_the_chain(
    client, inline_runner, settings, store, db
):
    # Given the database clock jumps past the lease of the inlined state b
    first = start(client, basic.inline_chain)
    taken: list[messages.Message] = []

    def expire(info: dict[str, Any]) -> None:
        if info["state"] == "b" and not taken:
            expire_lease(db, first.run_id)
            taken.extend(jobs.reap(store))

    faults.arm("before_commit", expire)

    # When the chain tries to commit b
    result = inline_runner.run_step(first.run_id, 1)

    # Then b's commit is refused, nothing after it ran, and the reaper's requeue finishes
    # the run once
    assert (result.result, result.inlined, result.wakeups) == ("lease_lost", 1, ())
    assert [r[:4] for r in steps(db, first.run_id)] == [
        (1, "a", 1, "next"),
        (2, "b", 1, "lease_expired"),
    ]
    faults.disarm("before_commit")
    drive(inline_runner, taken[0])
    run = client.get(first.run_id)
    assert run.status == "completed"
    assert run.output == {"trail": ["a#1", "b#2", "c#1", "d#1", "e#1"]}


def test_the_inline_budget_bounds_one_task(client, store, settings, db):
    # Given a runner allowed one inlined state per task
    runner = make_inline_runner(store, settings, max_states=1)
    first = start(client, basic.inline_chain)

    # When the first message runs
    result = runner.run_step(first.run_id, 1)

    # Then it ran a and b only, and published c
    assert result.inlined == 1
    assert [(d.state, d.step_seq) for d in result.wakeups] == [("c", 3)]
    assert drive(runner, result.wakeups[0]) == ["committed", "committed"]
    assert client.get(first.run_id).status == "completed"
    runner.keeper.stop()


def test_the_inline_time_budget_stops_a_chain_once_spent(client, store, settings, db):
    # Given a runner whose tasks may inline for 2 s, on a clock the test moves
    clock = [1000.0]
    keeper = LeaseKeeper(store, worker="inline:1", ttl=settings.lease_ttl, interval=30)
    runner = Runner(
        store,
        keeper,
        worker="inline:1",
        ttl=settings.lease_ttl,
        limits=rules.Limits(settings.max_checkpoint_bytes),
        inline_max_seconds=2.0,
        monotonic=lambda: clock[0],
        rand=lambda: 0.5,
    )
    first = start(client, basic.inline_chain)

    # And the inlined state b takes 2.5 s by that clock
    def b_takes_long(info: dict[str, Any]) -> None:
        if info["state"] == "b":
            clock[0] += 2.5

    faults.arm("before_commit", b_takes_long)
    try:
        # When the first message runs
        result = runner.run_step(first.run_id, 1)

        # Then b ran inline after a, but c, due once the budget was spent, was published
        assert (result.result, result.inlined) == ("committed", 1)
        assert [(d.state, d.step_seq) for d in result.wakeups] == [("c", 3)]
        assert [r[:4] for r in steps(db, first.run_id)] == [
            (1, "a", 1, "next"),
            (2, "b", 1, "next"),
        ]
        state = db.execute("SELECT state, status FROM lf_runs WHERE id = %s", (first.run_id,))
        assert state.fetchone() == ("c", "pending")

        # And c runs in a task of its own, with a budget of its own
        assert drive(runner, result.wakeups[0]) == ["committed", "committed"]
        assert client.get(first.run_id).status == "completed"
    finally:
        keeper.stop()


def test_leaseflow_inline_max_seconds_is_the_workers_inline_time_budget(settings, monkeypatch):
    # Given LEASEFLOW_INLINE_MAX_SECONDS in the environment
    monkeypatch.setenv("LEASEFLOW_INLINE_MAX_SECONDS", "0.25")
    from_env = Settings(database_url=settings.database_url, broker_url=settings.broker_url)
    # When a worker process builds its runner
    runtime.configure(from_env)
    try:
        engine = runtime.get()
        # Then its tasks inline for that long
        assert engine.runner.inline_max_seconds == 0.25
    finally:
        runtime.configure(None)


def test_duplicate_message_of_an_inlined_run_claims_nothing(client, inline_runner, db):
    # Given a run whose first message already ran a, b and c inline
    first = start(client, basic.inline_chain)
    inline_runner.run_step(first.run_id, 1)

    # When that message, and one for the inlined step 2, are delivered again
    again = inline_runner.run_step(first.run_id, 1)
    inlined_step = inline_runner.run_step(first.run_id, 2)

    # Then neither runs anything
    assert (again.result, inlined_step.result) == ("skipped", "skipped")
    assert len(steps(db, first.run_id)) == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"branch": True, "inline": True}, "cannot be inline="),
        ({"to": ["end"], "inline": True, "timeout": 5}, "has both inline= and timeout="),
    ],
)
def test_inline_is_refused_where_it_cannot_hold(options: dict[str, Any], message: str):
    wf = Workflow("inline_invalid", context=basic.Linear, register=False)

    @wf.state(initial=True, to=["end"])
    def begin(ctx: Any) -> str:
        return "end"

    @wf.state(**options)
    def odd(ctx: Any) -> Any:
        return "end"

    @wf.state()
    def end(ctx: Any) -> Complete:
        return Complete()

    with pytest.raises(errors.InvalidDefinition, match=message):
        wf.validate()
