"""The checks of the lock, shutdown and dead-worker faults (F-21, F-28 to F-31) can see:
each holds on a real ledger of what its fault should leave, and flags forged rows that
break its property.

The ledger is made in-process (the runner and the store, no Celery) on a scratch
database, each fault's end state reproduced by the store operations the engine would
run: a ``chaos_lock`` holder whose lease and lock expire (swept, reaped, re-run under
the next fence), one whose lock is forced away, abandoned locks swept then taken
again, a ``chaos_slow`` run handed back by a worker shutting down (``released``), one
whose worker died (marked dead, its lease expired at once, reaped). Each check is fed
what its injection would have noted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import psycopg
import pytest

from leaseflow import claims, locks, messages
from leaseflow.store.records import Claim
from tests.chaos import locks_faults as lf
from tests.chaos import workflows
from tests.chaos.harness import Harness
from tests.chaos.inprocess import Engine, scratch_engine

pytestmark = pytest.mark.chaos

QUIET = {"pause": 0.0, "slow": 0.0, "p": 0.0}
TTL = 30.0


@dataclass
class Noted:
    """Stands for the harness in a check: its database connection and its notes."""

    db: psycopg.Connection[Any]
    notes: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    beats: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Ledger:
    conn: psycopg.Connection[Any]
    frozen: dict[str, Any]  # F-21: a holder whose lock expired and was swept
    forced: dict[str, Any]  # F-28: a holder whose lock was forced away
    abandoned: dict[str, int]  # F-29: locks of code that died, swept
    retaken: dict[str, int]  # ... then taken again
    sigterm: dict[str, Any]  # F-30: a run handed back by a worker shutting down
    dead: dict[str, Any]  # F-31: a run of a worker found dead


def noted(ledger: Ledger, notes: dict[str, Any]) -> Harness:
    return cast(Harness, Noted(ledger.conn, notes))


def follow(engine: Engine, todo: list[messages.Message]) -> None:
    while todo:
        result = engine.runner.handle(todo.pop(0))
        assert result.result == "committed", result
        todo.extend(result.wakeups)


def step(run_id: str, wf: str, seq: int, state: str = "") -> messages.StateStep:
    return messages.StateStep(run_id, wf, state, seq)


def to_hold(engine: Engine, key: str) -> str:
    """A ``chaos_lock`` run past ``enter``, pending in ``hold`` (seq 2)."""
    run_id = engine.start(workflows.locked, {**QUIET, "key": key})
    result = engine.runner.handle(step(run_id, workflows.locked.name, 1))
    assert result.result == "committed", result
    return run_id


def claim_hold(engine: Engine, run_id: str, owner: str) -> Claim:
    """``owner`` claims ``hold`` with its lock, and enters the ledger as the state does."""
    claim = claims.claim_step(
        engine.store, run_id, 2, owner=owner, ttl=TTL, workflow="chaos_lock", state="hold"
    )
    assert isinstance(claim, Claim) and claim.lock_fence is not None, claim
    workflows.ledger_write(
        claim.lock_key or "", claim.lock_fence, f"run {claim.lease_token}", "enter"
    )
    return claim


def victim(claim: Claim) -> dict[str, Any]:
    return {
        "run_id": claim.run_id,
        "token": claim.lease_token,
        "key": claim.lock_key,
        "fence": claim.lock_fence,
    }


def expire(engine: Engine, run_id: str) -> None:
    """The run's lease and its lock expire (no heartbeat: a frozen holder)."""
    engine.conn.execute(
        "UPDATE lf_runs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        (run_id,),
    )
    engine.conn.execute(
        "UPDATE lf_locks SET expires_at = now() - interval '1 second' WHERE holder_run = %s",
        (run_id,),
    )


def rerun(engine: Engine, run_id: str) -> None:
    """Reaped (pending again, seq 3), then run to completion by the runner."""
    (reaped,) = [r for r in engine.store.reap() if r.run_id == run_id]
    follow(engine, [step(run_id, reaped.workflow, reaped.step_seq, reaped.state)])


def held_now(engine: Engine, run_id: str) -> list[Any]:
    row = engine.conn.execute(
        """SELECT id::text, lease_token::text, state, attempt, claimed_at, lease_expires_at
             FROM lf_runs WHERE id = %s""",
        (run_id,),
    ).fetchone()
    assert row is not None
    return [tuple(row)]


def now(engine: Engine) -> Any:
    return engine.conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]


@pytest.fixture(scope="module")
def ledger(pg_template: str) -> Iterator[Ledger]:
    with scratch_engine(pg_template) as engine:
        workflows.LEDGER_URL = engine.conn.info.dsn
        try:
            yield build(engine)
        finally:
            workflows.LEDGER_URL = None
            for conn in workflows._ledger.values():
                conn.close()
            workflows._ledger.clear()


def build(engine: Engine) -> Ledger:
    store = engine.store
    # F-21: a frozen holder past its TTL: swept (expired), reaped, re-run with fence 2;
    # it wakes up and leaves its state (its commit would be refused: nothing written)
    run = to_hold(engine, "k0")
    zombie = claim_hold(engine, run, "zombie:1")
    expire(engine, run)
    assert [f.key for f in store.sweep_locks()] == ["chaos:k0"]
    rerun(engine, run)
    workflows.ledger_write("chaos:k0", zombie.lock_fence or 0, f"run {zombie.lease_token}", "exit")
    frozen = victim(zombie)

    # F-28: a holder whose lock is forced away mid-state; refused, reaped, re-run
    run = to_hold(engine, "k1")
    holder = claim_hold(engine, run, "holder:2")
    store.force_release("chaos:k1", actor=lf.FORCE_ACTOR, reason=lf.FORCE_REASON)
    workflows.ledger_write("chaos:k1", holder.lock_fence or 0, f"run {holder.lease_token}", "exit")
    expire(engine, run)
    rerun(engine, run)
    forced = victim(holder)

    # F-29: locks of code that died, swept once, then taken again by locks.hold
    abandoned = {}
    for i in range(2):
        held = store.acquire_lock(f"chaos-sweep:0:{i}", holder=f"chaos code {i}", ttl=TTL)
        abandoned[held.key] = held.fence
    engine.conn.execute("UPDATE lf_locks SET expires_at = now() - interval '1 second'")
    assert len(store.sweep_locks()) == 2 and store.sweep_locks() == []
    retaken = {}
    for key in abandoned:
        with locks.hold(key, holder="chaos re-take", ttl=TTL, store=store) as lock:
            retaken[key] = lock.token

    # F-30: a worker shutting down hands a running state back; another one resumes it
    run = engine.start(workflows.slow, QUIET)
    result = engine.runner.handle(step(run, workflows.slow.name, 1))
    assert result.result == "committed"
    at = now(engine)
    claim = store.claim(run, 2, owner="host:30", ttl=TTL)
    assert claim is not None
    sigterm = {"victim": run, "owners": ["host:30"], "held": held_now(engine, run), "at": at}
    sigterm |= {"ttl": TTL, "exited_s": 1.5}
    (due,) = store.release_leases_of(["host:30"]).runs
    follow(engine, [step(run, due.workflow, due.step_seq, due.state)])

    # F-31: a worker found dead: its lease expired at once, reaped, resumed by another
    run = engine.start(workflows.slow, QUIET)
    result = engine.runner.handle(step(run, workflows.slow.name, 1))
    at = now(engine)
    claim = store.claim(run, 2, owner="host:31", ttl=TTL)
    assert claim is not None
    store.heartbeat([], worker="host:31", ttl=TTL)
    dead = {"victim": run, "owners": ["host:31"], "held": held_now(engine, run), "at": at}
    dead |= {"ttl": TTL, "killed_at": now(engine)}
    engine.conn.execute(
        "UPDATE lf_workers SET last_seen_at = now() - interval '1 minute' WHERE id = 'host:31'"
    )
    assert store.reap_dead_workers(self_id="inprocess:1", after=lf.DEAD_AFTER_S) == ["host:31"]
    rerun(engine, run)
    return Ledger(engine.conn, frozen, forced, abandoned, retaken, sigterm, dead)


def forged(ledger: Ledger, sql: str, params: Any = None) -> Iterator[None]:
    """Run ``sql`` in a transaction rolled back after the check."""
    with ledger.conn.transaction(force_rollback=True):
        ledger.conn.execute(sql, params)
        yield


# -- F-21 ---------------------------------------------------------------------------------


def f21(ledger: Ledger) -> Harness:
    return noted(ledger, {"frozen_holders": [ledger.frozen]})


def test_the_frozen_holder_check_holds_on_the_ledger(ledger: Ledger) -> None:
    assert lf.frozen_holder_fenced(f21(ledger)) == []


def test_the_frozen_holder_check_flags_a_lock_never_swept(ledger: Ledger) -> None:
    for _ in forged(ledger, "DELETE FROM lf_lock_audit WHERE key = 'chaos:k0'"):
        problems = lf.frozen_holder_fenced(f21(ledger))
    assert any("expected ['expired']" in p for p in problems), problems


def test_the_frozen_holder_check_flags_a_fence_that_did_not_grow(ledger: Ledger) -> None:
    sql = (
        "UPDATE chaos_lock_ledger SET fence = 1 WHERE key = 'chaos:k0';"
        "UPDATE chaos_effects SET detail = jsonb_set(detail, '{fence}', '1') "
        "WHERE detail ->> 'key' = 'chaos:k0'"
    )
    for _ in forged(ledger, sql):
        problems = lf.frozen_holder_fenced(f21(ledger))
    assert any("the fence did not grow" in p for p in problems), problems
    assert any("with a fence above 1" in p for p in problems), problems


def test_the_frozen_holder_check_flags_its_commit_accepted(ledger: Ledger) -> None:
    sql = "UPDATE lf_steps SET outcome = 'next' WHERE lease_token = %s"
    for _ in forged(ledger, sql, (ledger.frozen["token"],)):
        problems = lf.frozen_holder_fenced(f21(ledger))
    assert any("steps under the struck lease ['next']" in p for p in problems), problems


def test_the_frozen_holder_check_flags_nothing_frozen(ledger: Ledger) -> None:
    assert lf.frozen_holder_fenced(noted(ledger, {})) == ["F-21 froze no lock holder"]


# -- F-28 ---------------------------------------------------------------------------------


def f28(ledger: Ledger) -> Harness:
    return noted(ledger, {"forced": [ledger.forced]})


def test_the_forced_release_check_holds_on_the_ledger(ledger: Ledger) -> None:
    assert lf.forced_holder_fenced(f28(ledger)) == []


def test_the_forced_release_check_flags_an_unaudited_release(ledger: Ledger) -> None:
    for _ in forged(ledger, "DELETE FROM lf_lock_audit WHERE key = 'chaos:k1'"):
        problems = lf.forced_holder_fenced(f28(ledger))
    assert any("expected one 'forced' row" in p for p in problems), problems


def test_the_forced_release_check_flags_an_effect_under_the_forced_lease(ledger: Ledger) -> None:
    sql = (
        "INSERT INTO chaos_effects (run_id, state, seq, token, attempt, pid) "
        "VALUES (%s, 'hold', 2, %s, 1, 1)"
    )
    for _ in forged(ledger, sql, (ledger.forced["run_id"], ledger.forced["token"])):
        problems = lf.forced_holder_fenced(f28(ledger))
    assert any("effects committed under the struck lease" in p for p in problems), problems


# -- F-29 ---------------------------------------------------------------------------------


def f29(ledger: Ledger) -> Harness:
    return noted(ledger, {"abandoned": ledger.abandoned, "retaken": ledger.retaken})


def test_the_sweep_check_holds_on_the_ledger(ledger: Ledger) -> None:
    assert lf.swept_once(f29(ledger)) == []


def test_the_sweep_check_flags_a_lock_swept_twice(ledger: Ledger) -> None:
    sql = (
        "INSERT INTO lf_lock_audit (key, fence, action, actor) "
        "SELECT key, fence, action, actor FROM lf_lock_audit WHERE key = 'chaos-sweep:0:0'"
    )
    for _ in forged(ledger, sql):
        problems = lf.swept_once(f29(ledger))
    assert any("chaos-sweep:0:0: audit rows" in p for p in problems), problems


def test_the_sweep_check_flags_a_retake_without_the_next_fence(ledger: Ledger) -> None:
    notes = {"abandoned": ledger.abandoned, "retaken": dict.fromkeys(ledger.retaken, 1)}
    problems = lf.swept_once(noted(ledger, notes))
    assert len([p for p in problems if "taken again with fence 1" in p]) == 2, problems


# -- F-30 ---------------------------------------------------------------------------------


def f30(ledger: Ledger, **changes: Any) -> Harness:
    return noted(ledger, {"sigterm": [{**ledger.sigterm, **changes}]})


def test_the_handback_check_holds_on_the_ledger(ledger: Ledger) -> None:
    assert lf.handed_back(f30(ledger)) == []


def test_the_handback_check_flags_an_attempt_not_refunded(ledger: Ledger) -> None:
    sql = "UPDATE lf_steps SET attempt = 2 WHERE run_id = %s AND seq = 3"
    for _ in forged(ledger, sql, (ledger.sigterm["victim"],)):
        problems = lf.handed_back(f30(ledger))
    assert any("(refunded)" in p for p in problems), problems


def test_the_handback_check_flags_a_run_left_to_the_reaper(ledger: Ledger) -> None:
    sql = "UPDATE lf_steps SET outcome = 'lease_expired' WHERE run_id = %s AND seq = 2"
    for _ in forged(ledger, sql, (ledger.sigterm["victim"],)):
        problems = lf.handed_back(f30(ledger))
    assert any("expected ['released']" in p for p in problems), problems
    assert any("was not handed back" in p for p in problems), problems


def test_the_handback_check_flags_a_slow_exit_and_a_late_resume(ledger: Ledger) -> None:
    sql = (
        "UPDATE lf_steps SET started_at = started_at + interval '20 seconds' "
        "WHERE run_id = %s AND seq = 3"
    )
    for _ in forged(ledger, sql, (ledger.sigterm["victim"],)):
        problems = lf.handed_back(f30(ledger, exited_s=None))
    assert any("the worker exited None s" in p for p in problems), problems
    assert any("not well before the lease TTL" in p for p in problems), problems


# -- F-31 ---------------------------------------------------------------------------------


def f31(ledger: Ledger) -> Harness:
    return noted(ledger, {"dead": [ledger.dead]})


def test_the_dead_worker_check_holds_on_the_ledger(ledger: Ledger) -> None:
    assert lf.resumed_before_expiry(f31(ledger)) == []


def test_the_dead_worker_check_flags_a_reap_at_expiry(ledger: Ledger) -> None:
    sql = (
        "UPDATE lf_steps SET finished_at = finished_at + interval '1 minute' "
        "WHERE run_id = %s AND outcome = 'lease_expired'"
    )
    for _ in forged(ledger, sql, (ledger.dead["victim"],)):
        problems = lf.resumed_before_expiry(f31(ledger))
    assert any("not handed on as a dead worker's" in p for p in problems), problems


def test_the_dead_worker_check_flags_a_worker_still_alive(ledger: Ledger) -> None:
    for _ in forged(ledger, "UPDATE lf_workers SET status = 'alive' WHERE id = 'host:31'"):
        problems = lf.resumed_before_expiry(f31(ledger))
    assert problems == ["F-31: the killed process host:31 is 'alive' in the registry"]


def test_the_dead_worker_check_flags_a_commit_after_the_kill(ledger: Ledger) -> None:
    sql = "UPDATE lf_steps SET outcome = 'next' WHERE run_id = %s AND outcome = 'lease_expired'"
    for _ in forged(ledger, sql, (ledger.dead["victim"],)):
        problems = lf.resumed_before_expiry(f31(ledger))
    assert any("expected ['lease_expired']" in p for p in problems), problems
    assert any("was not reaped" in p for p in problems), problems
