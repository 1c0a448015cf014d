"""Waits, signals, cancel, re-drive, versions and priority with real workers, a real
broker and real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import redis

from leaseflow import errors
from leaseflow.beat import jobs
from leaseflow.client import Client
from leaseflow.settings import Settings
from leaseflow.tasks import dispatch
from tests.conftest import make_runner
from tests.helpers import WorkerProcess, eventually, processes
from tests.workflows import versions, waits

WORKFLOWS = ["tests.workflows.basic", "tests.workflows.waits", "tests.workflows.versions"]


@pytest.fixture
def wsettings(settings: Settings) -> Settings:
    return settings.model_copy(update={"workflows": WORKFLOWS})


def status(client: Client, run_id: str) -> str:
    return client.get(run_id).status


def statuses(db: psycopg.Connection, workflow: str) -> dict[str, int]:
    rows = db.execute(
        "SELECT status, count(*) FROM lf_runs WHERE workflow = %s GROUP BY status", (workflow,)
    )
    return {s: int(n) for s, n in rows}


def queued(redis_url: str, queue: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return sum(int(client.llen(key)) for key in dispatch.redis_queue_keys(queue))
    finally:
        client.close()


def test_approve_reject_and_timeout_take_the_declared_states(client, inline_worker, store, app):
    approve = client.start(waits.approval)
    reject = client.start(waits.approval)
    timeout = client.start(waits.approval)
    for run_id in (approve, reject, timeout):
        eventually(lambda r=run_id: status(client, r) == "waiting", message="waiting")

    assert client.signal(approve, "review", {"approve": True}).result == "resumed"
    assert client.signal(reject, "review", {"approve": False, "why": "risk"}).result == "resumed"
    store.connections.once(
        lambda c: c.execute("UPDATE lf_runs SET wait_deadline = now() WHERE id = %s", (timeout,))
    )
    dispatch.publish_all(app, jobs.sweep_timeouts(store))  # what beat's tick runs

    assert client.wait_for(approve, 30).output == {"approved_with": {"approve": True}}
    rejected = client.wait_for(reject, 30)
    assert (rejected.status, rejected.error_code, rejected.error) == (
        "failed",
        "REJECTED",
        "rejected: risk",
    )
    assert client.wait_for(timeout, 30).output == "expired"


def test_a_signal_sent_before_the_wait_resumes_it_when_reached(client, inline_worker):
    run_id = client.start(waits.gate)  # the worker may not have reached the wait yet
    receipt = client.signal(run_id, "go", {"early": True}, signal_id="early-1")

    run = client.wait_for(run_id, 30)

    assert receipt.result in ("stored", "resumed")
    assert (run.status, run.output) == ("completed", {"early": True})
    assert [s.consumed_seq for s in run.signals] == [2]


def test_a_thousand_waiting_runs_hold_nothing_and_resume_once_each(
    wsettings, client, db, tmp_path: Path
):
    worker = WorkerProcess(wsettings, tmp_path, concurrency=2)
    with processes(worker):
        worker.wait_ready()
        run_ids = client.start_many(waits.gate, [{} for _ in range(1000)])
        eventually(
            lambda: statuses(db, "wait_gate") == {"waiting": 1000},
            timeout=120,
            message="1000 runs waiting",
        )

        # Then: no lease, no running state, no message queued
        held = db.execute(
            "SELECT count(*) FILTER (WHERE lease_token IS NOT NULL),"
            "       count(*) FILTER (WHERE status = 'running')"
            "  FROM lf_runs WHERE workflow = 'wait_gate'"
        ).fetchone()
        assert held == (0, 0)
        assert queued(wsettings.broker_url or "", wsettings.default_queue) == 0

        receipts = [client.signal(r, "go", i, signal_id=f"go-{i}") for i, r in enumerate(run_ids)]
        eventually(
            lambda: statuses(db, "wait_gate") == {"completed": 1000},
            timeout=120,
            message="1000 runs completed",
        )

    assert {r.result for r in receipts} == {"resumed"}
    per_run = db.execute(
        "SELECT run_id, count(*) FILTER (WHERE outcome = 'signalled'),"
        "       count(*) FILTER (WHERE state = 'done')"
        "  FROM lf_steps WHERE run_id = ANY(%s::uuid[]) GROUP BY run_id",
        (run_ids,),
    ).fetchall()
    assert len(per_run) == 1000 and {(s, d) for _, s, d in per_run} == {(1, 1)}
    outputs = db.execute(
        "SELECT output FROM lf_runs WHERE id = ANY(%s::uuid[]) ORDER BY output::int",
        (run_ids,),
    ).fetchall()
    assert [o for (o,) in outputs] == list(range(1000))


def test_cancel_during_a_running_state_ends_the_run_and_the_next_state_never_runs(
    wsettings, client, db, tmp_path: Path
):
    worker = WorkerProcess(wsettings, tmp_path)
    with processes(worker):
        worker.wait_ready()
        run_id = client.start(waits.cancellable)
        eventually(lambda: status(client, run_id) == "running", message="work running")

        asked = client.cancel(run_id, "operator")
        run = client.wait_for(run_id, 30)

    assert (asked.result, asked.run_status) == ("requested", "running")
    assert (run.status, run.state, run.error_code) == ("cancelled", "work", "E-CANCELLED")
    assert [(s.state, s.outcome) for s in run.steps] == [("work", "cancelled")]
    assert client.cancel(run_id).result == "finished"


def test_retry_resumes_a_failed_run_with_its_context_and_from_a_named_state(
    client, inline_worker, tmp_path: Path
):
    marker = tmp_path / "fixed"
    run_id = client.start(waits.redrivable, {"marker": str(marker)})
    failed = client.wait_for(run_id, 30)
    assert (failed.status, failed.state, failed.error_code) == (
        "failed",
        "fragile",
        "E-STATE-ERROR",
    )
    marker.touch()
    assert client.retry(run_id) == "fragile"
    first = client.wait_for(run_id, 30)
    assert (first.status, first.output) == ("completed", {"prepared": 1, "attempt": 1})

    assert client.cancel(run_id).result == "finished"  # completed: nothing to cancel
    with pytest.raises(errors.RunCompleted):
        client.retry(run_id, from_state="prepare")
    assert [s.outcome for s in first.steps].count("redriven") == 1


def test_retry_from_a_named_state_and_of_an_active_run(client, inline_worker, tmp_path: Path):
    run_id = client.start(waits.redrivable, {"marker": str(tmp_path / "fixed")})
    client.wait_for(run_id, 30)
    (tmp_path / "fixed").touch()

    assert client.retry(run_id, from_state="prepare") == "prepare"
    run = client.wait_for(run_id, 30)

    assert run.output == {"prepared": 2, "attempt": 1}  # prepare ran again on the context
    with pytest.raises(errors.UnknownState):
        client.retry(run_id, from_state="nowhere")
    waiting = client.start(waits.gate)
    eventually(lambda: status(client, waiting) == "waiting", message="waiting")
    with pytest.raises(errors.RunActive):
        client.retry(waiting)


def test_runs_of_each_version_finish_on_it_with_its_own_queue(
    wsettings, client, db, tmp_path: Path
):
    # One default queue for every process; each worker serves one version's queue (-Q).
    workers = [
        WorkerProcess(wsettings, tmp_path, name=f"v{v}", extra_args=("-Q", versions.QUEUES[v]))
        for v in (1, 2)
    ]
    with processes(*workers):
        for worker in workers:
            worker.wait_ready()
        old = client.start("versioned", version=1)
        new = client.start("versioned")  # the newest: version 2
        for run_id in (old, new):
            eventually(lambda r=run_id: status(client, r) == "waiting", message="waiting")
        for run_id in (old, new):
            client.signal(run_id, "go")
        runs = {run_id: client.wait_for(run_id, 30) for run_id in (old, new)}
        pools = {worker.name: set(worker.worker_ids()) for worker in workers}

    assert runs[old].output == {"version": 1, "seen": [1, 1]}
    assert runs[new].output == {"version": 2, "seen": [2, 2]}
    for run_id, pool in ((old, "v1"), (new, "v2")):
        ran_by = {s.worker for s in runs[run_id].steps if s.worker}
        assert ran_by and ran_by <= pools[pool], (ran_by, pools)


def test_a_worker_without_the_run_s_version_leaves_it_untouched(store, settings, db):
    from leaseflow import Complete, Workflow
    from leaseflow.fsm import registry

    future = Workflow("wait_gate", context=waits.Review, version=99, register=False)

    @future.state(initial=True)
    def only(ctx):  # pragma: no cover - never runs here
        return Complete()

    run_id = "6b0f3c46-8e59-4d2a-9c1e-1f5a2b3c4d5e"
    store.create_run(run_id=run_id, wf=future, checkpoint=b"", input={}, idempotency_key=None)
    runner = make_runner(store, settings, "old-worker:1")
    try:
        assert registry.versions("wait_gate") == [1]
        result = runner.run_step(run_id, 1, workflow="wait_gate")
    finally:
        runner.keeper.stop()

    assert result.result == "skipped" and result.wakeups == ()
    row = db.execute(
        "SELECT status, attempt, lease_owner FROM lf_runs WHERE id = %s", (run_id,)
    ).fetchone()
    assert row == ("pending", 0, None)


def test_a_worker_serves_the_more_urgent_run_first(wsettings, client, db, tmp_path: Path):
    # Given runs queued while no worker runs: five of the default priority, then one of 9
    normal = [client.start(waits.quick) for _ in range(5)]
    urgent = client.start(waits.quick, priority=9)
    # When one worker process serves them one at a time
    worker = WorkerProcess(wsettings, tmp_path, concurrency=1)
    with processes(worker):
        worker.wait_ready()
        eventually(
            lambda: statuses(db, "wait_quick") == {"completed": 6},
            timeout=60,
            message="every run completed",
        )
    # Then the urgent one ran first
    order = db.execute(
        "SELECT id::text FROM lf_runs WHERE workflow = 'wait_quick' ORDER BY finished_at"
    ).fetchall()
    assert order[0] == (urgent,) and {r for (r,) in order[1:]} == set(normal)
