"""The runner against real PostgreSQL: outcomes, retries, fencing, beat jobs.

These tests drive ``Runner.run_step`` directly (no broker), which makes races
deterministic: a fault-point hook runs at the exact instant under test.
"""

from __future__ import annotations

import psycopg
import pytest

from leaseflow import errors, faults, messages
from leaseflow.beat import jobs
from tests.conftest import make_runner
from tests.helpers import eventually
from tests.workflows import basic


def drive(runner, first: messages.Message, limit: int = 50) -> list[str]:
    """Run dispatches until none is left (as a worker chain would); return results."""
    pending, results = [first], []
    while pending and len(results) < limit:
        d = pending.pop(0)
        step = runner.run_step(d.run_id, d.step_seq)
        results.append(step.result)
        pending.extend(step.wakeups)
    return results


def start(client, wf, data=None, **kw) -> messages.StateStep:
    run_id = client.start(wf, data or {}, **kw)
    return messages.StateStep(run_id, wf.name, wf.initial.name, 1)


def expire_lease(db, run_id: str) -> None:
    """Database time jumps past the lease (FAULTS F-11): as if the worker paused."""
    db.execute(
        "UPDATE lf_runs SET lease_expires_at = now() - interval '1 second' "
        "WHERE id = %s AND status = 'running'",
        (run_id,),
    )


def test_linear_run_writes_one_step_per_state(client, runner):
    # Given a run of the 5-state workflow
    first = start(client, basic.linear, {"n": 1})
    # When every step runs
    assert drive(runner, first) == ["committed"] * 5
    # Then each state committed once, in order, with consecutive seqs
    run = client.get(first.run_id)
    assert run.status == "completed"
    assert [(s.seq, s.state, s.outcome) for s in run.steps] == [
        (1, "s1", "next"),
        (2, "s2", "next"),
        (3, "s3", "next"),
        (4, "s4", "next"),
        (5, "s5", "completed"),
    ]
    assert run.output == {"n": 1, "trail": ["s1", "s2", "s3", "s4", "s5"]}
    assert all(s.started_at <= s.finished_at for s in run.steps)


def test_duplicate_and_stale_messages_claim_nothing(client, runner, db):
    # Given a run whose first step already ran
    first = start(client, basic.linear)
    assert runner.run_step(first.run_id, 1).result == "committed"
    # When the first message is delivered again, and a message for a future step arrives
    again = runner.run_step(first.run_id, 1)
    future = runner.run_step(first.run_id, 9)
    # Then neither claims anything nor writes a step
    assert (again.result, future.result) == ("skipped", "skipped")
    assert (
        db.execute("SELECT count(*) FROM lf_steps WHERE run_id = %s", (first.run_id,)).fetchone()[0]
        == 1
    )


def test_transient_errors_are_retried_with_backoff_then_succeed(client, runner):
    # Given a state that fails twice, with a 3-attempt policy
    first = start(client, basic.flaky, {"fail_times": 2})
    # When the chain runs (retries wait out not_before)
    results = []
    pending = [first]
    while pending:
        d = pending.pop(0)
        step = runner.run_step(d.run_id, d.step_seq)
        if step.result == "deferred":  # came before not_before: wait it out
            pending.insert(0, d)
            continue
        results.append(step.outcome)
        pending.extend(step.wakeups)
    # Then it completes on the third attempt and the log shows both failures
    run = client.get(first.run_id)
    assert run.status == "completed"
    shaky = [s for s in run.steps if s.state == "shaky"]
    assert [(s.attempt, s.outcome) for s in shaky] == [(1, "retry"), (2, "retry"), (3, "next")]
    assert "ConnectionError: transient failure on attempt 1" in shaky[0].error


def test_attempts_exhausted_by_errors_fail_with_traceback(client, runner):
    first = start(client, basic.flaky, {"fail_times": 9})
    pending = [first]
    while pending:
        d = pending.pop(0)
        step = runner.run_step(d.run_id, d.step_seq)
        if step.result == "deferred":
            pending.insert(0, d)
            continue
        pending.extend(step.wakeups)
    run = client.get(first.run_id)
    assert (run.status, run.error_code) == ("failed", errors.STATE_ERROR)
    assert "attempt 3 of 3" in run.error
    assert "Traceback" in run.steps[-1].error
    assert run.finished_at is not None


def test_exhausted_state_goes_to_on_error(client, runner):
    first = start(client, basic.recovering)
    drive(runner, first)
    run = client.get(first.run_id)
    assert (run.status, run.output) == ("completed", "fallback")
    assert [(s.state, s.outcome, s.next_state) for s in run.steps] == [
        ("risky", "retry", None),
        ("risky", "next", "fallback"),
        ("fallback", "completed", None),
    ]


@pytest.mark.parametrize(
    ("mode", "code"),
    [
        ("illegal", errors.ILLEGAL_TRANSITION),
        ("fail", "APP-REFUSED"),
        ("bad_output", errors.STATE_ERROR),
        ("huge", errors.PAYLOAD_TOO_LARGE),
    ],
)
def test_bad_outcomes_fail_the_run_with_a_stable_code(client, runner, mode, code):
    first = start(client, basic.flaky, {"mode": mode})
    drive(runner, first)
    run = client.get(first.run_id)
    assert (run.status, run.error_code) == ("failed", code), run.error
    assert run.lease_owner is None


def test_oversized_checkpoint_fails_the_run(client, runner, settings):
    # Given a state that grows the context past the limit
    from pydantic import BaseModel

    from leaseflow import Workflow

    class Big(BaseModel):
        blob: str = ""

    wf = Workflow("grows", context=Big, register=False)

    @wf.state(initial=True, to=["end"])
    def grow(ctx):
        ctx.data.blob = "y" * (settings.max_checkpoint_bytes + 1)
        return "end"

    @wf.state()
    def end(ctx):
        return "never"

    from leaseflow.fsm import registry

    registry.register(wf)
    try:
        drive(runner, start(client, wf))
        run = client.list_runs(workflow="grows")[0]
        assert (run.status, run.error_code) == ("failed", errors.PAYLOAD_TOO_LARGE)
    finally:
        registry.unregister(wf)


def test_reaper_requeues_then_fails_when_attempts_are_exhausted(client, runner, store, db):
    # Given a run whose state allows 2 attempts (slow3.work)
    first = start(client, basic.slow)
    [d] = runner.run_step(first.run_id, 1).wakeups
    # When two attempts in a row lose their lease
    for attempt in (1, 2):
        claim = store.claim(d.run_id, d.step_seq, owner=f"ghost:{attempt}", ttl=60)
        assert claim is not None and claim.attempt == attempt
        expire_lease(db, d.run_id)
        [reaped] = store.reap()
        if attempt == 1:
            assert reaped.status == "pending"
            d = messages.StateStep(d.run_id, d.workflow, reaped.state, reaped.step_seq)
    # Then the run failed E-LEASE-EXPIRED and each expiry is one step row
    run = client.get(first.run_id)
    assert (run.status, run.error_code) == ("failed", errors.LEASE_EXPIRED)
    expired = [(s.attempt, s.worker) for s in run.steps if s.outcome == "lease_expired"]
    assert expired == [(1, "ghost:1"), (2, "ghost:2")]


def test_reap_job_returns_dispatches_for_requeued_runs(client, runner, store, db):
    first = start(client, basic.slow)
    [d] = runner.run_step(first.run_id, 1).wakeups
    store.claim(d.run_id, d.step_seq, owner="ghost", ttl=60)
    expire_lease(db, d.run_id)
    [again] = jobs.reap(store)
    assert (again.run_id, again.state, again.step_seq) == (d.run_id, "work", d.step_seq + 1)
    assert jobs.reap(store) == []  # idempotent: nothing left to reap
    assert runner.run_step(again.run_id, again.step_seq).result == "committed"
    assert client.get(d.run_id).attempt == 0  # moved on to 'finish'


def test_zombie_commit_is_fenced_and_new_owner_writes_once(client, settings, store, db):
    # Given worker A running slow3.work, and worker B ready
    a = make_runner(store, settings, "worker-a:1")
    b = make_runner(store, settings, "worker-b:1")
    first = start(client, basic.slow)
    [d] = a.run_step(first.run_id, 1).wakeups
    taken_over = {}

    def b_takes_over(info):
        # While A is "paused" before its commit: its lease expires, the reaper
        # requeues the run and B runs the state to completion.
        if info["state"] == "work" and not taken_over:
            taken_over["yes"] = True
            expire_lease(db, d.run_id)
            [again] = jobs.reap(store)
            drive(b, again)

    faults.arm("before_commit", b_takes_over)
    # When A resumes and commits
    result = a.run_step(d.run_id, d.step_seq)
    # Then A's commit was refused and counted; B's transition is the only one
    assert result.result == "lease_lost"
    lost = db.execute("SELECT leases_lost FROM lf_workers WHERE id = 'worker-a:1'").fetchone()
    assert lost == (1,)
    run = client.get(d.run_id)
    assert run.status == "completed"
    work = [(s.outcome, s.worker) for s in run.steps if s.state == "work"]
    assert work == [("lease_expired", "worker-a:1"), ("next", "worker-b:1")]
    a.keeper.stop()
    b.keeper.stop()


def test_in_commit_writes_commit_iff_the_transition_commits(client, settings, store, db):
    # Given an application table and a workflow whose state writes to it in_commit
    db.execute("CREATE TABLE app_ledger (run_id uuid, worker text)")
    from pydantic import BaseModel

    from leaseflow import Complete, Workflow
    from leaseflow.fsm import registry

    class Empty(BaseModel):
        pass

    wf = Workflow("ledgered", context=Empty, register=False)
    worker_of = {}

    @wf.state(initial=True)
    def book(ctx):
        me = worker_of[ctx.fencing_token]
        ctx.in_commit(
            lambda conn: conn.execute("INSERT INTO app_ledger VALUES (%s, %s)", (ctx.run_id, me))
        )
        return Complete()

    registry.register(wf)
    a = make_runner(store, settings, "zombie:1")
    b = make_runner(store, settings, "owner:1")
    try:
        first = start(client, wf)
        claims = {}

        # Remember which runner holds which token (the state reads it)
        orig_claim = store.claim

        def claim(run_id, seq, *, owner, ttl, versions=None):
            c = orig_claim(run_id, seq, owner=owner, ttl=ttl)
            if c is not None:
                worker_of[c.lease_token] = owner
                claims[owner] = c
            return c

        store.claim = claim

        def takeover(info):
            if "owner:1" not in claims:
                expire_lease(db, first.run_id)
                [again] = jobs.reap(store)
                assert b.run_step(again.run_id, again.step_seq).result == "committed"

        faults.arm("before_commit", takeover)
        # When the zombie A commits after B did
        assert a.run_step(first.run_id, 1).result == "lease_lost"
    finally:
        registry.unregister(wf)
        a.keeper.stop()
        b.keeper.stop()
    # Then only the owner's in_commit write exists
    rows = db.execute("SELECT worker FROM app_ledger").fetchall()
    assert rows == [("owner:1",)]


def test_failing_in_commit_rolls_back_and_counts_as_a_state_error(client, runner, db):
    from pydantic import BaseModel

    from leaseflow import Complete, Retry, Workflow
    from leaseflow.fsm import registry

    class Empty(BaseModel):
        pass

    wf = Workflow("badcommit", context=Empty, register=False)

    @wf.state(initial=True, retry=Retry(max_attempts=1))
    def book(ctx):
        ctx.in_commit(lambda conn: conn.execute("INSERT INTO no_such_table VALUES (1)"))
        return Complete()

    registry.register(wf)
    try:
        first = start(client, wf)
        drive(runner, first)
    finally:
        registry.unregister(wf)
    run = client.get(first.run_id)
    assert (run.status, run.error_code) == ("failed", errors.STATE_ERROR)
    assert "no_such_table" in run.error


def test_database_refuses_illegal_transition_from_raw_sql(client, runner, db):
    first = start(client, basic.linear)
    # s1 -> s3 is not an edge of linear5
    with pytest.raises(psycopg.errors.CheckViolation, match="illegal transition s1 -> s3"):
        db.execute("UPDATE lf_runs SET state = 's3' WHERE id = %s", (first.run_id,))
    # a legal edge passes
    db.execute("UPDATE lf_runs SET state = 's2' WHERE id = %s", (first.run_id,))
    # a run cannot be created in a non-initial state, nor move to another workflow
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(
            "INSERT INTO lf_runs (id, workflow, version, state, checkpoint, input) "
            "VALUES (gen_random_uuid(), 'linear5', 1, 's4', '\\x00', '{}')"
        )
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("UPDATE lf_runs SET workflow = 'slow3' WHERE id = %s", (first.run_id,))


def _queue_of(workflow: str, state: str) -> str:
    return "q"


def test_dispatcher_republishes_a_lost_message_once_a_probe_came_through(client, store, db):
    # Given a pending run whose message is overdue
    first = start(client, basic.linear)
    assert jobs.dispatch_overdue(store, _queue_of).wakeups == []  # not overdue yet
    db.execute("UPDATE lf_runs SET redispatch_at = now() - interval '1 second'")
    # When the dispatcher runs twice (two beats) before anything came through the queue
    found = jobs.dispatch_overdue(store, _queue_of)
    again = jobs.dispatch_overdue(store, _queue_of)
    # Then it re-publishes nothing yet (the message may be waiting in a backlog) and
    # sends one probe through the run's queue
    assert found.wakeups == [] and again.wakeups == []
    assert [p.queue for p in found.probes] == ["q"] and again.probes == []
    # And once a worker consumed that probe, the run's message is known lost: the
    # dispatcher re-publishes it, once across two beats
    # (the arriving probe's own call, which sends no probe, then a beat)
    store.probe_passed("q", found.probes[0].sent_at)
    found = jobs.dispatch_overdue(store, _queue_of, probe=False)
    again = jobs.dispatch_overdue(store, _queue_of)
    assert [(d.run_id, d.state, d.step_seq) for d in found.wakeups] == [(first.run_id, "s1", 1)]
    assert (found.probes, again.wakeups, again.probes) == ([], [], [])


def test_dispatcher_does_not_republish_a_backlog(client, store, db):
    """Messages waiting behind a backlog longer than the dispatch timeout are not lost:
    copies would queue behind the same backlog and be re-published again, so the
    backlog would feed itself. Only what was published before a probe came through
    is re-published."""
    # Given 50 runs whose messages wait in the queue past the dispatch timeout
    runs = [start(client, basic.linear).run_id for _ in range(50)]
    db.execute("UPDATE lf_runs SET redispatch_at = now() - interval '1 second'")
    # When the dispatcher runs ten times while nothing comes through the queue
    rounds = [jobs.dispatch_overdue(store, _queue_of) for _ in range(10)]
    # Then it re-publishes none of them, and sends one probe
    assert [d for r in rounds for d in r.wakeups] == []
    probes = [p for r in rounds for p in r.probes]
    assert [p.queue for p in probes] == ["q"]
    # And when the probe comes through while the backlog is being worked off (half
    # the runs were claimed since, and one was published again after the probe was
    # sent: with a 0.5 s timeout, redispatch_at = probe time means published 0.5 s
    # before it, within the publish slack)
    sent = probes[0].sent_at
    store.dispatch_timeout = 0.5
    db.execute("UPDATE lf_runs SET not_before = now() WHERE id = ANY(%s::uuid[])", (runs,))
    for run_id in runs[:25]:
        assert store.claim(run_id, 1, owner="w:1", ttl=60) is not None
    db.execute(
        "UPDATE lf_runs SET redispatch_at = %s - interval '5 seconds' WHERE id = ANY(%s::uuid[])",
        (sent, runs[25:-1]),
    )
    db.execute("UPDATE lf_runs SET redispatch_at = %s WHERE id = %s", (sent, runs[-1]))
    store.probe_passed("q", sent)
    found = jobs.dispatch_overdue(store, _queue_of)
    # Then only the runs still pending from before the probe go out again
    assert sorted(d.run_id for d in found.wakeups) == sorted(runs[25:-1])
    # And the one published since waits for a probe of its own
    assert [p.queue for p in found.probes] == ["q"] and found.probes[0].sent_at > sent


def test_dispatcher_probes_again_when_a_probe_is_lost(client, store, db):
    # Given a probe sent longer ago than the dispatch timeout that never came through
    start(client, basic.linear)
    db.execute("UPDATE lf_runs SET redispatch_at = now() - interval '1 second'")
    first = jobs.dispatch_overdue(store, _queue_of).probes
    assert jobs.dispatch_overdue(store, _queue_of).probes == []  # still on its way
    db.execute("UPDATE lf_queue_marks SET probe_sent_at = probe_sent_at - interval '1 minute'")
    # When the dispatcher runs again
    again = jobs.dispatch_overdue(store, _queue_of).probes
    # Then it presumes the probe lost (a broker restart) and sends another
    assert len(first) == 1 and [p.queue for p in again] == ["q"]


def test_heartbeat_extends_leases_and_reports_lost_ones(client, runner, store, db):
    first = start(client, basic.linear)
    from leaseflow.store.base import LeaseRef

    claim = store.claim(first.run_id, 1, owner="hb:1", ttl=1)
    before = db.execute("SELECT lease_expires_at FROM lf_runs").fetchone()[0]
    alive = store.heartbeat([LeaseRef(first.run_id, claim.lease_token)], worker="hb:1", ttl=30)
    after = db.execute("SELECT lease_expires_at FROM lf_runs").fetchone()[0]
    assert alive == frozenset({claim.lease_token})
    assert (after - before).total_seconds() > 20
    lost = LeaseRef(first.run_id, "00000000-0000-0000-0000-000000000000")
    assert store.heartbeat([lost], worker="hb:1", ttl=30) == frozenset()
    assert db.execute("SELECT count(*) FROM lf_workers WHERE id = 'hb:1'").fetchone() == (1,)


def test_lease_keeper_stops_extending_past_the_state_deadline(client, settings, store, db):
    from leaseflow.heartbeat import LeaseKeeper

    # Given two runs claimed with 1 s leases and held by one keeper (TTL 30 s): the state
    # of one is past its deadline (timeout=), the other has none
    late, free = start(client, basic.linear), start(client, basic.linear)
    claims = {d.run_id: store.claim(d.run_id, 1, owner="k:1", ttl=1) for d in (late, free)}
    keeper = LeaseKeeper(store, worker="k:1", ttl=30, interval=3600)
    keeper.hold(late.run_id, claims[late.run_id].lease_token, timeout=0)  # deadline passed
    keeper.hold(free.run_id, claims[free.run_id].lease_token)
    # When the keeper beats
    keeper.beat()
    left = dict(
        db.execute(
            "SELECT id::text, extract(epoch FROM lease_expires_at - now()) FROM lf_runs"
        ).fetchall()
    )
    # Then only the lease within its deadline was extended to 30 s
    assert left[late.run_id] < 2  # not extended
    assert left[free.run_id] > 20
    for claim in claims.values():
        keeper.release(claim.lease_token)
    keeper.stop()


def test_invalid_input_creates_no_run(client, db):
    with pytest.raises(errors.InvalidInput, match="n"):
        client.start(basic.linear, {"n": "not a number"})
    with pytest.raises(errors.InvalidInput, match="JSON"):
        client.start(basic.linear, {"n": 1, "when": {1, 2}})
    with pytest.raises(errors.InvalidInput, match="JSON object"):
        client.start(basic.linear, ["n"])  # type: ignore[arg-type]
    with pytest.raises(errors.UnknownWorkflow):
        client.start("no-such-workflow", {})
    assert db.execute("SELECT count(*) FROM lf_runs").fetchone() == (0,)


def test_oversized_input_is_refused(client, db, settings):
    with pytest.raises(errors.PayloadTooLarge):
        client.start(basic.linear, {"trail": ["z" * settings.max_checkpoint_bytes]})
    assert db.execute("SELECT count(*) FROM lf_runs").fetchone() == (0,)


def test_idempotency_key_returns_the_same_run(client, db):
    a = client.start(basic.linear, {"n": 3}, idempotency_key="order-42")
    b = client.start(basic.linear, {"n": 3}, idempotency_key="order-42")
    assert a == b
    with pytest.raises(errors.IdempotencyConflict):
        client.start(basic.linear, {"n": 4}, idempotency_key="order-42")
    assert db.execute("SELECT count(*) FROM lf_runs").fetchone() == (1,)


def test_start_many_creates_all_runs_in_one_transaction_or_none(client, runner, db):
    # Given three valid inputs
    run_ids = client.start_many(basic.linear, [{"n": 1}, {"n": 2}, None])

    # Then three pending runs exist, in input order, and each runs to completion
    assert len(set(run_ids)) == 3
    for run_id, n in zip(run_ids, (1, 2, 0), strict=True):
        drive(runner, messages.StateStep(run_id, "linear5", "s1", 1))
        assert client.get(run_id).output == {"n": n, "trail": ["s1", "s2", "s3", "s4", "s5"]}

    # And a batch with one invalid input creates nothing, naming the bad position
    with pytest.raises(errors.InvalidInput, match="input #1"):
        client.start_many(basic.linear, [{"n": 5}, {"n": "five"}])
    assert db.execute("SELECT count(*) FROM lf_runs").fetchone() == (3,)
    assert client.start_many(basic.linear, []) == []


def test_wait_for_times_out_on_unfinished_run(client):
    run_id = client.start(basic.linear, {})
    with pytest.raises(TimeoutError, match="pending"):
        client.wait_for(run_id, timeout=0.2)


def test_list_runs_filters(client, runner):
    done = start(client, basic.linear)
    drive(runner, done)
    waiting = client.start(basic.slow, {})
    assert [r.id for r in client.list_runs(status="completed")] == [done.run_id]
    assert [r.id for r in client.list_runs(workflow="slow3")] == [waiting]
    assert len(client.list_runs(limit=1)) == 1
    with pytest.raises(errors.RunNotFound):
        client.get("00000000-0000-0000-0000-000000000000")
    with pytest.raises(errors.RunNotFound):
        client.get("not-a-uuid")


def test_claim_commit_and_heartbeat_are_hot_updates(client, runner, store, db):
    """No index covers a column the hot path changes (status, lease, state, seq), so
    each update of lf_runs by the store's own claim, heartbeat and commit statements
    is HOT: no new index entries, no index bloat."""
    # Given a run, and the runner's heartbeat beating once between its claim and commit
    d = start(client, basic.linear)
    faults.arm("before_commit", lambda info: runner.keeper.beat())
    # When its first state runs: the store's claim, heartbeat and commit
    assert runner.run_step(d.run_id, d.step_seq).result == "committed"
    faults.disarm()
    beaten = db.execute("SELECT count(*) FROM lf_workers WHERE id = %s", (runner.worker,))
    assert beaten.fetchone() == (1,)  # the heartbeat statement ran
    store.close()  # its backends exit, which flushes their table statistics

    # Then lf_runs counted at least those three updates, every one of them HOT
    def counted() -> tuple[int, int] | None:
        row = db.execute(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'lf_runs'"
        ).fetchone()
        return row if row[0] >= 3 else None

    updated, hot = eventually(counted, timeout=30, message="3 updates in the statistics")
    assert hot == updated, f"{updated - hot} of {updated} updates of lf_runs were not HOT"


@pytest.mark.parametrize("async_claims", [True, False])
def test_only_claims_skip_the_wal_flush_wait(settings, async_claims):
    """Claims run on their own connections with ``synchronous_commit=off`` (unless
    ``async_claims`` is off); every other write waits for its flush."""
    from leaseflow.store.postgres import CLAIMS, MAIN
    from leaseflow.tasks import runtime

    store = runtime.make_store(settings.model_copy(update={"async_claims": async_claims}))
    try:
        modes = {}
        for kind in (CLAIMS, MAIN):
            with store.connection(kind) as conn:
                modes[kind] = conn.execute("SHOW synchronous_commit").fetchone()[0]
    finally:
        store.close()
    assert modes == {CLAIMS: "off" if async_claims else "on", MAIN: "on"}


def test_a_claim_undone_by_a_crash_only_costs_a_rerun(client, runner, db):
    """An unflushed claim lost in a database crash leaves the run as it was before the
    claim: the worker's commit is fenced out, the state is claimed again and its
    transition commits once."""
    d = start(client, basic.linear)
    before = db.execute(
        "SELECT status, attempt, lease_token, lease_owner, lease_expires_at, claimed_at"
        " FROM lf_runs WHERE id = %s",
        (d.run_id,),
    ).fetchone()

    def crash_undoes_the_claim(info):
        db.execute(
            "UPDATE lf_runs SET status = %s, attempt = %s, lease_token = %s,"
            " lease_owner = %s, lease_expires_at = %s, claimed_at = %s WHERE id = %s",
            (*before, d.run_id),
        )

    faults.arm("before_commit", crash_undoes_the_claim)
    assert runner.run_step(d.run_id, d.step_seq).result == "lease_lost"
    faults.disarm()
    assert drive(runner, d) == ["committed"] * 5
    run = client.get(d.run_id)
    assert run.status == "completed"
    assert [(s.seq, s.state, s.attempt) for s in run.steps] == [
        (1, "s1", 1),
        (2, "s2", 1),
        (3, "s3", 1),
        (4, "s4", 1),
        (5, "s5", 1),
    ]
    assert run.output["trail"] == ["s1", "s2", "s3", "s4", "s5"]
