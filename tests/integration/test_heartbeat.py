"""The heartbeat keeps a lease alive while its state runs, and tells a state that its
lease is gone: the worker's heartbeat thread (``LeaseKeeper``), ``ctx.heartbeat()``
and ``ctx.lease_lost()``, against real PostgreSQL (and a real worker and beat).

Each test fails if the heartbeat stops: with ``LeaseKeeper.beat`` or
``LeaseKeeper.beat_now`` made a no-op, a lease is not extended and runs out.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from leaseflow import errors
from leaseflow.beat import jobs
from leaseflow.client import Client
from leaseflow.fsm import rules
from leaseflow.heartbeat import LeaseKeeper
from leaseflow.runner import Runner
from leaseflow.settings import Settings
from leaseflow.tasks import runtime
from tests.helpers import BeatProcess, WorkerProcess, eventually, processes
from tests.integration.test_engine import expire_lease
from tests.workflows import basic, heartbeat


def lease_of(db: psycopg.Connection, run_id: str) -> tuple[str | None, datetime | None]:
    """``(lease_token, lease_expires_at)`` of the run now."""
    row = db.execute(
        "SELECT lease_token::text, lease_expires_at FROM lf_runs WHERE id = %s", (run_id,)
    ).fetchone()
    assert row is not None
    return row[0], row[1]


def held_for(db: psycopg.Connection, run_id: str, seconds: float) -> bool:
    """Has database time passed ``seconds`` since the run's lease was claimed?"""
    row = db.execute(
        "SELECT now() > claimed_at + %s * interval '1 second' FROM lf_runs WHERE id = %s",
        (seconds, run_id),
    ).fetchone()
    return bool(row and row[0])


def steps(db: psycopg.Connection, run_id: str) -> list[tuple[str, int, str, str | None]]:
    return db.execute(
        "SELECT state, attempt, outcome, worker FROM lf_steps WHERE run_id = %s ORDER BY seq",
        (run_id,),
    ).fetchall()


def make_runner(
    store: Any, *, ttl: float, interval: float, background: bool = True, worker: str = "hb:1"
) -> Runner:
    keeper = LeaseKeeper(store, worker=worker, ttl=ttl, interval=interval, background=background)
    return Runner(
        store, keeper, worker=worker, ttl=ttl, limits=rules.Limits(1 << 20), rand=lambda: 0.5
    )


@pytest.fixture
def in_state() -> Iterator[list[Callable[[Any], None]]]:
    """The hooks ``hb_probe.look`` calls with its ``ctx``; emptied afterwards."""
    yield heartbeat.IN_STATE
    heartbeat.IN_STATE.clear()


# -- the worker's heartbeat thread -------------------------------------------------------


def long_lease(db: psycopg.Connection, run_id: str) -> str | None:
    """The lease token of the run while it runs its state ``long``."""
    row = db.execute(
        "SELECT lease_token::text FROM lf_runs "
        "WHERE id = %s AND state = 'long' AND status = 'running'",
        (run_id,),
    ).fetchone()
    return row[0] if row else None


def orphaned_lease(store: Any, settings: Settings) -> str:
    """A run whose lease (0.5 s) a worker that is gone took: the reaper's to reap."""
    blob, payload = rules.first_checkpoint(basic.linear, {}, runtime.limits(settings))
    run_id = str(uuid.uuid4())
    store.create_run(
        run_id=run_id, wf=basic.linear, checkpoint=blob, input=payload, idempotency_key=None
    )
    assert store.claim(run_id, 1, owner="gone:1", ttl=0.5) is not None
    return run_id


def reaped(db: psycopg.Connection, run_id: str) -> bool:
    row = db.execute(
        "SELECT count(*) FROM lf_steps WHERE run_id = %s AND outcome = 'lease_expired' "
        "AND worker = 'gone:1'",
        (run_id,),
    ).fetchone()
    return bool(row and row[0])


def test_a_state_three_times_longer_than_its_lease_commits_once_on_attempt_1(
    settings: Settings, app: Any, store: Any, db: psycopg.Connection, tmp_path: Path
):
    # Given a worker with two pool processes (one to run the reaper beside the state) and
    # a beat (reaper every 0.5 s); a lease lasts 2 s, the heartbeat extends it every 0.5 s
    settings = settings.model_copy(
        update={"workflows": [*settings.workflows, "tests.workflows.heartbeat"]}
    )
    assert (settings.lease_ttl, settings.heartbeat_interval, settings.reaper_interval) == (
        2.0,
        0.5,
        0.5,
    )
    worker = WorkerProcess(settings, tmp_path, concurrency=2)
    beat = BeatProcess(settings, tmp_path)
    with processes(worker, beat), Client(settings=settings) as client:
        worker.wait_ready()

        # When a run reaches a state that sleeps 6 s, three times its TTL
        run_id = client.start(heartbeat.outlive, {"sleep": 6.0})
        token = eventually(lambda: long_lease(db, run_id), timeout=20, message="long claimed")
        # (and a decoy run's lease, held by no live worker, runs out meanwhile)
        decoy = orphaned_lease(store, settings)

        # Then the reaper, running all along, reaps the decoy while the long state runs
        eventually(lambda: reaped(db, decoy), timeout=20, message="the decoy reaped")
        assert lease_of(db, run_id)[0] == token
        # And two TTLs after its claim the same lease still holds, live
        eventually(
            lambda: lease_of(db, run_id)[0] != token or held_for(db, run_id, 4.0),
            timeout=20,
            message="4 s into the state, or its lease gone",
        )
        still, expires = lease_of(db, run_id)
        live = db.execute("SELECT %s::timestamptz > now()", (expires,)).fetchone()
        assert (still, live) == (token, (True,))
        run = client.wait_for(run_id, timeout=30)

    # And the state committed once, on attempt 1, with its first lease: nothing was reaped
    assert run.status == "completed", run
    assert [(s.state, s.attempt, s.outcome) for s in run.steps] == [
        ("begin", 1, "next"),
        ("long", 1, "next"),
        ("done", 1, "completed"),
    ]
    assert f"action=lease_reaped run_id={run_id}" not in worker.log()


def test_the_lease_keeper_extends_a_held_lease_beat_after_beat(client, store, db):
    # Given a run claimed with a 1 s lease, held by a keeper beating every 0.1 s (TTL 1 s)
    run_id = client.start(basic.linear, {})
    claim = store.claim(run_id, 1, owner="keeper:1", ttl=1)
    assert claim is not None
    keeper = LeaseKeeper(store, worker="keeper:1", ttl=1, interval=0.1)
    expiries = [lease_of(db, run_id)[1]]

    def three_ttls_later() -> bool:
        expires = lease_of(db, run_id)[1]
        if expires != expiries[-1]:
            expiries.append(expires)
        return held_for(db, run_id, 3.0)

    keeper.hold(run_id, claim.lease_token)
    try:
        # When three TTLs of database time pass
        eventually(three_ttls_later, timeout=20, message="3 s after the claim")
        token, expires = lease_of(db, run_id)
        live = db.execute("SELECT %s::timestamptz > now()", (expires,)).fetchone()
        lost = keeper.lost(claim.lease_token)
        reaped = jobs.reap(store)
    finally:
        keeper.release(claim.lease_token)
        keeper.stop()

    # Then the lease is still the claim's, live, and its expiry moved forward beat after beat
    assert (token, live, lost, reaped) == (claim.lease_token, (True,), False, [])
    assert len(expiries) >= 3, expiries
    assert expiries == sorted(expiries) and len(set(expiries)) == len(expiries)


# -- ctx.heartbeat() -----------------------------------------------------------------------


def test_ctx_heartbeat_extends_the_lease_at_once(client, store, db, in_state):
    # Given a state under a 5 s lease, with no heartbeat thread: only ctx.heartbeat() extends
    runner = make_runner(store, ttl=5, interval=3600, background=False)
    run_id = client.start(heartbeat.probe, {})
    seen: list[Any] = []

    def beat_twice(ctx: Any) -> None:
        seen.append(lease_of(db, ctx.run_id))
        for _ in range(2):
            ctx.heartbeat()
            seen.append(lease_of(db, ctx.run_id))
        seen.append(ctx.lease_lost())

    in_state.append(beat_twice)

    # When the state calls ctx.heartbeat() twice
    result = runner.run_step(run_id, 1)

    # Then each call moved the lease's expiry forward in the database, same token
    (token, first), (token1, second), (token2, third), lost = seen
    assert token == token1 == token2 is not None
    assert first < second < third
    assert lost is False
    # And the state committed on its first attempt
    assert result.result == "committed"
    assert steps(db, run_id) == [("look", 1, "completed", "hb:1")]


def test_a_state_calling_ctx_heartbeat_outlives_its_ttl_while_the_reaper_runs(
    client, store, db, in_state
):
    # Given a state under a 1 s lease, with no heartbeat thread
    runner = make_runner(store, ttl=1, interval=3600, background=False)
    run_id = client.start(heartbeat.probe, {})
    reaped: list[Any] = []

    def work_three_ttls(ctx: Any) -> None:
        give_up = time.monotonic() + 30
        while not (held_for(db, ctx.run_id, 3.0) or reaped) and time.monotonic() < give_up:
            ctx.heartbeat()
            reaped.extend(jobs.reap(store))  # a beat between two heartbeats
            time.sleep(0.2)  # a slice of the state's work

    in_state.append(work_three_ttls)

    # When the state works three TTLs, calling ctx.heartbeat() between slices of work
    result = runner.run_step(run_id, 1)

    # Then the reaper never found its lease expired and it committed on attempt 1
    assert reaped == []
    assert result.result == "committed"
    assert steps(db, run_id) == [("look", 1, "completed", "hb:1")]


def test_ctx_heartbeat_raises_lease_lost_once_another_worker_took_the_run(
    client, store, db, in_state
):
    # Given a state whose lease runs out by database time, is reaped and claimed by
    # another worker while it runs (no heartbeat thread)
    runner = make_runner(store, ttl=30, interval=3600, background=False)
    run_id = client.start(heartbeat.probe, {})
    seen: dict[str, Any] = {}

    def taken_over(ctx: Any) -> None:
        seen["mine"] = ctx.fencing_token
        expire_lease(db, ctx.run_id)
        [again] = jobs.reap(store)
        seen["other"] = store.claim(ctx.run_id, again.step_seq, owner="other:1", ttl=60)
        seen["other_lease"] = lease_of(db, ctx.run_id)
        seen["lost_before"] = ctx.lease_lost()
        # When the state calls ctx.heartbeat()
        try:
            ctx.heartbeat()
        except errors.LeaseLost as exc:
            seen["raised"] = exc
        seen["lost_after"] = ctx.lease_lost()
        seen["lease_after"] = lease_of(db, ctx.run_id)

    in_state.append(taken_over)
    result = runner.run_step(run_id, 1)

    # Then it raised LeaseLost for this run and this worker's token
    raised = seen.get("raised")
    assert isinstance(raised, errors.LeaseLost), seen
    assert (raised.run_id, raised.token) == (run_id, seen["mine"])
    # And ctx.lease_lost() turned true with it (nothing had told the state before)
    assert (seen["lost_before"], seen["lost_after"]) == (False, True)
    # And the other worker's lease was left as it was, and this worker's commit refused
    assert seen["other"] is not None
    assert seen["lease_after"] == seen["other_lease"]
    assert seen["lease_after"][0] == seen["other"].lease_token
    assert result.result == "lease_lost"
    assert steps(db, run_id) == [("look", 1, "lease_expired", "hb:1")]


def test_ctx_lease_lost_turns_true_once_the_heartbeat_thread_finds_the_lease_gone(
    client, store, db, in_state, caplog
):
    # Given a state under a 30 s lease, its worker's heartbeat thread beating every 0.1 s
    caplog.set_level(logging.WARNING, logger="leaseflow")
    runner = make_runner(store, ttl=30, interval=0.1)
    run_id = client.start(heartbeat.probe, {})
    seen: dict[str, Any] = {}

    def lease_taken(ctx: Any) -> None:
        seen["before"] = ctx.lease_lost()
        # When database time runs past the lease and the reaper takes it back
        expire_lease(db, ctx.run_id)
        seen["reaped"] = [m.run_id for m in jobs.reap(store)]
        # (the state never calls ctx.heartbeat(): only the thread can tell it)
        try:
            eventually(ctx.lease_lost, timeout=10, message="ctx.lease_lost()")
            seen["learnt"] = True
        except AssertionError:
            seen["learnt"] = False

    in_state.append(lease_taken)
    try:
        result = runner.run_step(run_id, 1)
    finally:
        runner.keeper.stop()

    # Then ctx.lease_lost() turned true while the state ran, from false before
    assert (seen["before"], seen["reaped"], seen["learnt"]) == (False, [run_id], True)
    # And the heartbeat said so, and the state's commit was refused
    warned = [
        r for r in caplog.records if getattr(r, "action", None) == "lease_expired_in_heartbeat"
    ]
    assert [getattr(r, "run_id", None) for r in warned] == [run_id]
    assert result.result == "lease_lost"
