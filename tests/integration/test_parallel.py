"""Parallel and Map: fan-out, exactly-once joins, failure policies (runner level).

Races are made deterministic with fault-point hooks and barriers; no broker."""

from __future__ import annotations

import threading

import pytest

from leaseflow import errors, faults, messages
from leaseflow.beat import jobs
from tests.conftest import make_runner
from tests.workflows import fanout


def expand(step) -> list[messages.Message]:
    """Every message a step result calls for (a fork's branches included)."""
    out = list(step.wakeups)
    if step.fork is not None:
        out.extend(step.fork.branches)
    return out


def run(runner, d: messages.Message):
    return runner.handle(d)


def drive(runner, first: messages.Message, limit: int = 5000) -> list[str]:
    pending, results = [first], []
    while pending and len(results) < limit:
        d = pending.pop(0)
        step = run(runner, d)
        if step.result == "deferred":
            pending.append(d)
            continue
        results.append(step.result)
        pending.extend(expand(step))
    return results


def start(client, wf, data) -> messages.StateStep:
    run_id = client.start(wf, data)
    return messages.StateStep(run_id, wf.name, wf.initial.name, 1)


def join_steps(db, run_id: str, join: str) -> int:
    return db.execute(
        "SELECT count(*) FROM lf_steps "
        "WHERE run_id = %s AND state = %s AND outcome <> 'lease_expired'",
        (run_id, join),
    ).fetchone()[0]


def test_parallel_joins_once_with_results_in_branch_order(client, runner, db):
    first = start(client, fanout.parallel, {"width": 5, "label": "snap"})
    drive(runner, first)
    run_ = client.get(first.run_id)
    assert run_.status == "completed", run_.error
    assert run_.output["results"] == [{"index": i, "label": "snap"} for i in range(5)]
    assert run_.output["errors"] == {}
    assert [(s.state, s.outcome) for s in run_.steps] == [("fork", "fork"), ("joined", "completed")]
    [group] = run_.groups
    assert (group.kind, group.join_state, group.width) == ("parallel", "joined", 5)
    assert [b.status for b in group.branches] == ["completed"] * 5
    assert run_.to_dict()["groups"][0]["branches"][4]["result"] == {"index": 4, "label": "snap"}
    assert db.execute("SELECT done, failed, width, status FROM lf_groups").fetchone() == (
        5,
        0,
        5,
        "joined",
    )


def test_map_results_follow_item_order(client, runner):
    first = start(client, fanout.mapped, {"items": [3, 1, 4, 1, 5]})
    drive(runner, first)
    assert client.get(first.run_id).output["squares"] == [9, 1, 16, 1, 25]


def test_empty_map_goes_straight_to_the_join(client, runner):
    first = start(client, fanout.mapped, {"items": []})
    drive(runner, first)
    run_ = client.get(first.run_id)
    assert (run_.status, run_.output["squares"]) == ("completed", [])


def test_duplicate_branch_message_runs_the_branch_once(client, runner, db):
    first = start(client, fanout.parallel, {"width": 2})
    fork = runner.run_step(first.run_id, 1).fork
    b0 = fork.branches[0]
    assert runner.handle(b0).result == "committed"
    assert runner.handle(b0).result == "skipped"  # the same message again
    row = db.execute("SELECT status, attempt FROM lf_branches WHERE idx = 0").fetchone()
    assert row == ("completed", 1)


def test_two_last_branches_committing_at_once_join_exactly_once(client, store, settings, db):
    # Given two branches that reach their commit together (FAULTS F-19)
    a = make_runner(store, settings, "a:1")
    b = make_runner(store, settings, "b:1")
    first = start(client, fanout.parallel, {"width": 2})
    fork = a.run_step(first.run_id, 1).fork
    barrier = threading.Barrier(2, timeout=10)
    faults.arm("before_commit", lambda info: barrier.wait() if "branch" in info else None)
    results = {}

    def go(runner, d):
        results[d.idx] = runner.handle(d)

    threads = [
        threading.Thread(target=go, args=(r, d)) for r, d in zip((a, b), fork.branches, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    faults.disarm()
    # Then exactly one of them woke the join, and the group counted each branch once
    joins = [d for r in results.values() for d in r.wakeups if isinstance(d, messages.JoinWake)]
    assert len(joins) == 1
    assert db.execute("SELECT done, status FROM lf_groups").fetchone() == (2, "joined")
    drive(a, joins[0])
    run_ = client.get(first.run_id)
    assert run_.status == "completed"
    assert join_steps(db, first.run_id, "joined") == 1
    a.keeper.stop()
    b.keeper.stop()


def test_fail_fast_fails_the_run_naming_the_branch_and_cancels_the_rest(client, runner, db):
    first = start(client, fanout.parallel, {"width": 4, "fail_index": 1})
    fork = runner.run_step(first.run_id, 1).fork
    # the broken branch runs first (two attempts), the others have not started
    d = fork.branches[1]
    while d is not None:
        step = runner.handle(d)
        retry = [x for x in step.wakeups if isinstance(x, messages.BranchStep) and x.idx == d.idx]
        d = retry[0] if retry else None
        if d is not None:
            while runner.handle(d).result == "deferred":
                pass
            d = None
    run_ = client.get(first.run_id)
    assert (run_.status, run_.error_code) == ("failed", errors.BRANCH_FAILED)
    assert "branch 1 failed" in run_.error and "broken" in run_.error
    statuses = dict(db.execute("SELECT idx, status FROM lf_branches").fetchall())
    assert statuses == {0: "cancelled", 1: "failed", 2: "cancelled", 3: "cancelled"}
    # a late branch message claims nothing
    assert runner.handle(fork.branches[0]).result == "skipped"


def test_collect_runs_the_join_with_the_errors(client, runner):
    first = start(client, fanout.parallel, {"width": 3, "fail_index": 2, "policy": "collect"})
    drive(runner, first)
    run_ = client.get(first.run_id)
    assert run_.status == "completed"
    assert run_.output["results"][:2] == [
        {"index": 0, "label": "ctx"},
        {"index": 1, "label": "ctx"},
    ]
    assert run_.output["results"][2] is None
    assert "broken" in run_.output["errors"]["2"]


def test_flaky_branch_is_retried_and_counted_once(client, runner, db):
    first = start(client, fanout.parallel, {"width": 3, "flaky_index": 0})
    drive(runner, first)
    assert client.get(first.run_id).status == "completed"
    assert db.execute("SELECT attempt FROM lf_branches WHERE idx = 0").fetchone() == (2,)
    assert db.execute("SELECT done, failed FROM lf_groups").fetchone() == (3, 0)


def test_map_window_keeps_at_most_n_branches_in_flight(client, runner, db):
    # Given a statement trigger recording the most branches ever in flight
    db.execute("CREATE TABLE inflight (n int)")
    db.execute(
        """
        CREATE FUNCTION record_inflight() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO inflight SELECT count(*) FROM lf_branches
             WHERE status IN ('pending', 'running');
            RETURN NULL;
        END $$;
        CREATE TRIGGER inflight AFTER INSERT OR UPDATE ON lf_branches
            FOR EACH STATEMENT EXECUTE FUNCTION record_inflight();
        """
    )
    first = start(client, fanout.mapped, {"items": list(range(40)), "max_concurrency": 3})
    drive(runner, first)
    run_ = client.get(first.run_id)
    assert run_.output["squares"] == [i * i for i in range(40)]
    assert db.execute("SELECT max(n) FROM inflight").fetchone() == (3,)


def test_expired_branch_lease_is_reaped_once_and_retried(client, runner, store, db):
    first = start(client, fanout.parallel, {"width": 2})
    fork = runner.run_step(first.run_id, 1).fork
    claim = store.claim_branch(fork.branches[0].group_id, 0, owner="ghost", ttl=60)
    assert claim is not None
    db.execute(
        "UPDATE lf_branches SET lease_expires_at = now() - interval '1 second' "
        "WHERE status = 'running'"
    )
    # two reapers at once act once
    again = jobs.reap_branches(store) + jobs.reap_branches(store)
    assert again == [fork.branches[0]]
    drive(runner, again[0])
    drive(runner, fork.branches[1])
    run_ = client.get(first.run_id)
    # the join was published by the last branch; run it
    assert run_.status in ("pending", "completed")
    if run_.status == "pending":
        runner.run_step(first.run_id, run_.step_seq)
    run_ = client.get(first.run_id)
    assert run_.status == "completed"
    assert db.execute("SELECT attempt FROM lf_branches WHERE idx = 0").fetchone() == (2,)


def test_illegal_forks_fail_the_run(client, runner):
    from pydantic import BaseModel

    from leaseflow import Complete, Parallel, Workflow
    from leaseflow.fsm import registry

    class E(BaseModel):
        pass

    wf = Workflow("badfork", context=E, register=False)

    @wf.state(initial=True, to=["end"])
    def go(ctx):
        return Parallel(branches=["end"], join="end")  # 'end' is not a branch state

    @wf.state()
    def end(ctx):
        return Complete()

    registry.register(wf)
    try:
        first = start(client, wf, {})
        drive(runner, first)
        run_ = client.list_runs(workflow="badfork")[0]
        assert (run_.status, run_.error_code) == ("failed", errors.ILLEGAL_TRANSITION)
    finally:
        registry.unregister(wf)


@pytest.mark.parametrize("bad", [{"to": ["b"]}, {"initial": True}])
def test_branch_states_are_never_targets(bad):
    from pydantic import BaseModel

    from leaseflow import Complete, Workflow

    class E(BaseModel):
        pass

    wf = Workflow("branchy", context=E, register=False)
    wf.state(initial=True, to=["b", "end"] if "to" in bad else ["end"], name="a")(lambda c: "end")
    wf.state(branch=True, name="b", initial=bad.get("initial", False))(lambda c: 1)
    wf.state(name="end")(lambda c: Complete())
    with pytest.raises(errors.InvalidDefinition) as caught:
        wf.validate()
    assert "b" in caught.value.problems or "a" in caught.value.problems
