"""Resource locks: taken in the claim's transaction, one holder per key, a fence that
only grows, released by the right commit or when the run ends, swept once expired,
force-released with an audit row, and every guarded commit refused once it is lost."""

from __future__ import annotations

import uuid

import pytest

from leaseflow import errors
from leaseflow.store.base import LeaseRef
from leaseflow.store.records import Claim, LockContended
from tests.contract.workflows import TTL, complete, linear, lock_of, locked, move


def start(env, tenant: str = "acme") -> str:
    return env.start(locked, {"tenant": tenant})


def take(env, run_id: str, seq: int = 1, *, key: str = "db:acme", until="use", owner="w1"):
    return env.store.claim_locked(
        run_id, seq, owner=owner, ttl=TTL, key_of=lock_of(key, until), backoff=0.5
    )


def held(env) -> dict[str, tuple[int, str | None]]:
    return {lock.key: (lock.fence, lock.holder_run) for lock in env.store.list_locks()}


def test_a_locked_claim_takes_the_lock_and_its_last_state_frees_it(env):
    run_id = start(env)

    claim = take(env, run_id)
    assert isinstance(claim, Claim)
    assert (claim.lock_key, claim.lock_fence, claim.lock_until) == ("db:acme", 1, "use")
    assert held(env) == {"db:acme": (1, run_id)}

    # take -> use: the lock is kept (hold_lock_until="use"), its fence unchanged
    env.store.commit(claim, move("use"), worker="w1")
    second = env.claim(run_id, 2)
    assert second.holds_lock and second.lock_fence is None  # a plain claim: hold it on
    kept = env.store.hold_on(second, ttl=TTL, backoff=0.5)
    assert isinstance(kept, Claim) and kept.lock_fence == 1
    # use's commit frees it
    env.store.commit(kept, move("done"), worker="w1")
    assert held(env) == {}
    assert not env.claim(run_id, 3).holds_lock


def test_a_contended_claim_claims_nothing_and_spends_no_attempt(env):
    first, second = start(env), start(env)
    holder = take(env, first)
    assert isinstance(holder, Claim)

    busy = take(env, second, owner="w2")

    assert isinstance(busy, LockContended)
    assert (busy.key, busy.delay) == ("db:acme", 0.5)
    assert busy.holder is not None and first in busy.holder
    run = env.store.get_run(second)
    assert (run.status, run.attempt, run.lease_owner) == ("pending", 0, None)
    assert env.store.peek(second).wait_seconds > 0  # tried again after the pause
    # the holder ends; the other run then gets the lock with a higher fence
    env.store.commit(holder, complete("ok"), worker="w1")
    env.age(1)
    again = take(env, second, owner="w2")
    assert isinstance(again, Claim) and again.lock_fence == 2 and again.attempt == 1


def test_two_claims_race_for_one_key_and_one_wins(env):
    runs = [start(env) for _ in range(4)]

    found = env.race([lambda r=r: take(env, r, owner=f"w{r[:4]}") for r in runs])

    winners = [c for c in found if isinstance(c, Claim)]
    assert len(winners) == 1 and len(held(env)) == 1
    assert sum(isinstance(c, LockContended) for c in found) == 3


def test_a_forced_release_is_audited_and_fences_the_holder_out(env):
    run_id = start(env)
    claim = take(env, run_id)
    assert isinstance(claim, Claim)

    freed = env.store.force_release("db:acme", actor="ops@host", reason="stuck job")
    committed = env.store.commit(claim, move("use"), worker="w1")

    assert (freed.key, freed.fence, freed.holder_run) == ("db:acme", 1, run_id)
    assert committed is None  # its guarded commit is refused
    assert env.store.get_run(run_id).state == "take"
    (audit,) = env.store.lock_audit("db:acme")
    assert (audit.action, audit.actor, audit.reason, audit.fence) == (
        "forced",
        "ops@host",
        "stuck job",
        1,
    )
    with pytest.raises(errors.LockNotFound):
        env.store.force_release("db:acme", actor="ops", reason="again")


def test_an_expired_lock_is_swept_once_and_the_next_holder_gets_a_higher_fence(env):
    stale = start(env)
    claim = take(env, stale)
    assert isinstance(claim, Claim)
    env.age(TTL + 1)  # no heartbeat: the lease and the lock expire together

    swept = env.race([env.store.sweep_locks, env.store.sweep_locks])

    assert [len(s) for s in sorted(swept, key=len)] == [0, 1]
    (audit,) = env.store.lock_audit()
    assert (audit.action, audit.holder_run) == ("expired", stale)
    fresh = take(env, start(env), owner="w2")
    assert isinstance(fresh, Claim) and fresh.lock_fence == 2
    assert env.store.commit(claim, move("use"), worker="w1") is None


def test_the_heartbeat_extends_the_run_s_lock(env):
    run_id = start(env)
    claim = take(env, run_id)
    assert isinstance(claim, Claim)

    for _ in range(3):
        env.age(TTL * 0.6)
        env.store.heartbeat([LeaseRef(run_id, claim.lease_token)], worker="w1", ttl=TTL)

    assert env.store.sweep_locks() == []
    assert env.store.commit(claim, move("use"), worker="w1") is not None


def test_a_run_that_ends_frees_its_lock(env):
    cancelled = start(env)
    claim = take(env, cancelled)
    assert isinstance(claim, Claim)
    env.store.commit(claim, move("use"), worker="w1")  # held across: pending in use

    env.store.cancel(cancelled)

    assert held(env) == {}
    assert env.store.get_run(cancelled).status == "cancelled"


def test_a_failed_step_frees_the_lock(env):
    from leaseflow.fsm import rules

    run_id = start(env)
    claim = take(env, run_id)
    env.store.commit(claim, rules.failure("E-X", "no", attempt=1, max_attempts=1), worker="w1")

    assert held(env) == {}


def test_locks_held_by_any_code(env):
    first = env.store.acquire_lock("index:acme", holder="cli", ttl=30)

    with pytest.raises(errors.LockHeld) as info:
        env.store.acquire_lock("index:acme", holder="web", ttl=30)
    assert info.value.holder == "cli" and info.value.code == "E-LOCK-HELD"
    assert env.store.refresh_lock("index:acme", first.token, ttl=30)
    assert env.store.release_lock("index:acme", first.token)
    assert not env.store.release_lock("index:acme", first.token)
    second = env.store.acquire_lock("index:acme", holder="web", ttl=30)
    assert (first.fence, second.fence) == (1, 2)
    assert not env.store.refresh_lock("index:acme", first.token, ttl=30)


def test_a_claim_whose_key_cannot_be_made_takes_no_lock(env):
    run_id = env.start(linear)

    claim = env.store.claim_locked(
        run_id, 1, owner="w1", ttl=TTL, key_of=lambda c: None, backoff=0.5
    )

    assert isinstance(claim, Claim) and not claim.holds_lock
    assert held(env) == {}
    assert str(uuid.UUID(claim.run_id)) == run_id


def test_the_reaper_frees_a_reaped_attempt_s_lock_for_a_higher_fence(env):
    run_id = start(env)
    frozen = take(env, run_id)
    assert isinstance(frozen, Claim)
    env.age(TTL + 1)

    (reaped,) = env.store.reap()
    again = take(env, run_id, reaped.step_seq, owner="w2")

    assert reaped.status == "pending"
    (audit,) = env.store.lock_audit("db:acme")
    assert (audit.action, audit.actor, audit.fence) == ("expired", "reaper", 1)
    assert isinstance(again, Claim) and again.lock_fence == 2
    assert again.lock_token != frozen.lock_token
