"""Retention: finished runs older than a cutoff are deleted with every row that hangs
off them, in small batches, once each under two purgers; one run is deleted on request,
an active one only when forced (its worker is then fenced off, never crashed)."""

from __future__ import annotations

import uuid

import pytest

from leaseflow import errors
from leaseflow.artifacts import Artifacts
from leaseflow.fsm.rules import Transition
from leaseflow.store.base import LeaseRef
from leaseflow.store.purge_records import Purged
from leaseflow.store.records import Claim
from leaseflow.types import StepOutcome
from tests.contract.test_branches import claim_branch, forked
from tests.contract.test_waits import waiting
from tests.contract.workflows import TTL, complete, done, linear, lock_of, locked, move

HOUR = 3600.0
TABLES = ("steps", "groups", "branches", "signals", "artifacts")


def completed(env, *, signals: int = 0, artifacts: int = 0) -> str:
    """A completed run of ``linear`` (one step), with stored signals and artifacts."""
    run_id = env.start(linear)
    for n in range(signals):
        env.store.signal(run_id, "note", {"n": n}, signal_id=f"s{n}")
    claim = env.claim(run_id)
    writes: list = []  # the artefacts, written by the commit as ctx.artifacts.put does
    arts = Artifacts(env.store, run_id, claim.state, claim.step_seq, sink=writes)
    for n in range(artifacts):
        arts.put(f"a{n}", b"data")
    assert env.store.commit(claim, complete("ok"), worker="w1", callbacks=writes) is not None
    return run_id


def failed(env) -> str:
    run_id = env.start(linear)
    tr = Transition(outcome=StepOutcome.FAILED, status="failed", error_code="E-X", error="x")
    assert env.store.commit(env.claim(run_id), tr, worker="w1") is not None
    return run_id


def cancelled(env) -> str:
    run_id = env.start(linear)
    env.store.cancel(run_id, "not needed")
    return run_id


def joined(env) -> str:
    """A completed run of ``fan``: a fork (one group, two branches), its join, its end."""
    run_id, group_id = forked(env)
    for idx in (0, 1):
        branch = claim_branch(env, group_id, idx)
        env.store.commit_branch(group_id, idx, branch.lease_token, done(idx))
    claim = env.claim(run_id, 2)
    assert env.store.commit(claim, complete([0, 1]), worker="w1") is not None
    return run_id


def children(env, run_id: str) -> dict[str, int]:
    """The rows of every child table that belong to ``run_id``."""
    if env.name == "postgres":
        counts = {}
        for table in TABLES:
            row = env.db.execute(f"SELECT count(*) FROM lf_{table} WHERE run_id = %s", (run_id,))
            counts[table] = row.fetchone()[0]
        return counts
    m = env.memory
    return {
        "steps": len(m._steps.get(run_id, ())),
        "groups": sum(g.run_id == run_id for g in m._groups.values()),
        "branches": sum(b.run_id == run_id for b in m._branches.values()),
        "signals": len(m._signals.get(run_id, ())),
        "artifacts": len(m._artifacts.get(run_id, {})),
    }


def orphans(env) -> int:
    """Branches whose group is gone (must never happen)."""
    if env.name == "postgres":
        row = env.db.execute(
            "SELECT count(*) FROM lf_branches b"
            " WHERE NOT EXISTS (SELECT 1 FROM lf_groups g WHERE g.id = b.group_id)"
        )
        return int(row.fetchone()[0])
    return sum(key[0] not in env.memory._groups for key in env.memory._branches)


def exists(env, run_id: str) -> bool:
    try:
        env.store.get_run(run_id, with_steps=False)
    except errors.RunNotFound:
        return False
    return True


def test_finished_runs_past_the_cutoff_go_with_all_their_rows_and_nothing_else(env):
    # Given: finished runs two hours old, of every kind and with every kind of row
    rich, fanned = completed(env, signals=2, artifacts=3), joined(env)
    old = [rich, fanned, failed(env), cancelled(env)]
    active = env.start(linear)  # old too, but never finished
    env.age(2 * HOUR)
    # and finished runs ten minutes old, with rows of their own
    recent = [completed(env, signals=1, artifacts=1), joined(env)]
    kept_rows = {run_id: children(env, run_id) for run_id in recent}
    env.age(600)

    # When: runs finished more than an hour ago are purged
    purged = env.store.purge_runs(older_than=HOUR)

    # Then: exactly the old finished runs, with all their rows, are gone
    assert purged == Purged(runs=4, steps=5, groups=1, branches=2, signals=2, artifacts=3)
    assert purged.total == 17 and purged.run_ids == () and not purged.dry_run
    assert [exists(env, run_id) for run_id in old] == [False] * 4
    for run_id in old:
        assert children(env, run_id) == dict.fromkeys(TABLES, 0)
    # and the recent and the active runs are whole
    assert exists(env, active) and env.store.get_run(active).status == "pending"
    assert {run_id: children(env, run_id) for run_id in recent} == kept_rows
    assert kept_rows[recent[0]]["artifacts"] == 1 and kept_rows[recent[1]]["branches"] == 2
    assert orphans(env) == 0
    # and purging again finds nothing: idempotent
    assert env.store.purge_runs(older_than=HOUR) == Purged()


def test_only_the_statuses_asked_for_are_purged(env):
    runs = {"completed": completed(env), "failed": failed(env), "cancelled": cancelled(env)}
    env.age(HOUR)

    purged = env.store.purge_runs(older_than=60, statuses=["failed", "cancelled"])

    assert purged.runs == 2
    assert {status: exists(env, run_id) for status, run_id in runs.items()} == {
        "completed": True,
        "failed": False,
        "cancelled": False,
    }


def test_a_timed_out_run_is_finished_and_purged(env):
    run_id = waiting(env)
    env.age(601)  # past the waiter's run_timeout
    assert [row.run_id for row in env.store.sweep_deadlines()] == [run_id]
    env.age(HOUR)

    assert env.store.purge_runs(older_than=60, statuses=["timed_out"]).runs == 1
    assert not exists(env, run_id)


@pytest.mark.parametrize("statuses", [["completed", "running"], ["pending"], ["bogus"], []])
def test_an_active_or_unknown_status_is_refused(env, statuses):
    run_id = completed(env)
    env.age(HOUR)

    with pytest.raises(ValueError, match="purge"):
        env.store.purge_runs(older_than=0, statuses=statuses)

    assert exists(env, run_id)


def test_a_purge_deletes_in_batches_and_stops_at_max_runs(env):
    runs = [completed(env) for _ in range(8)]
    env.age(HOUR)

    first = env.store.purge_runs(older_than=60, batch=2, max_runs=3)

    assert (first.runs, first.steps) == (3, 3)
    assert not any(exists(env, run_id) for run_id in runs[:3])  # the oldest first
    assert all(exists(env, run_id) for run_id in runs[3:])
    rest = env.store.purge_runs(older_than=60, batch=2)
    assert (rest.runs, rest.steps) == (5, 5)
    assert not any(exists(env, run_id) for run_id in runs)


def test_a_dry_run_counts_what_a_purge_would_delete_and_deletes_nothing(env):
    runs = [completed(env, signals=1, artifacts=2), joined(env), cancelled(env)]
    env.age(HOUR)

    dry = env.store.purge_runs(older_than=60, dry_run=True)
    capped = env.store.purge_runs(older_than=60, dry_run=True, max_runs=1)

    assert dry.dry_run and dry == Purged(
        runs=3,
        steps=4,
        groups=1,
        branches=2,
        signals=1,
        artifacts=2,
        run_ids=dry.run_ids,
        dry_run=True,
    )
    assert sorted(dry.run_ids) == sorted(runs)
    assert (capped.runs, capped.run_ids) == (1, (runs[0],))
    assert all(exists(env, run_id) for run_id in runs)
    real = env.store.purge_runs(older_than=60)
    assert (real.runs, real.steps, real.groups, real.branches, real.signals, real.artifacts) == (
        3,
        4,
        1,
        2,
        1,
        2,
    )


def test_two_purgers_at_once_delete_each_run_exactly_once(env):
    runs = [completed(env) for _ in range(30)]
    env.age(HOUR)

    found = env.race([lambda: env.store.purge_runs(older_than=60, batch=4)] * 2)

    assert sum(p.runs for p in found) == 30 and sum(p.steps for p in found) == 30
    assert not any(exists(env, run_id) for run_id in runs)


# -- one run ------------------------------------------------------------------------------


def test_purge_run_deletes_a_finished_run_with_its_rows(env):
    run_id, other = completed(env, signals=1, artifacts=1), completed(env)

    purged = env.store.purge_run(run_id)

    assert purged == Purged(runs=1, steps=1, signals=1, artifacts=1, run_ids=(run_id,))
    assert not exists(env, run_id) and children(env, run_id) == dict.fromkeys(TABLES, 0)
    assert exists(env, other)
    with pytest.raises(errors.RunNotFound):
        env.store.purge_run(run_id)


@pytest.mark.parametrize("run_id", [str(uuid.uuid4()), "not-a-run"])
def test_purge_run_of_an_unknown_run_is_run_not_found(env, run_id):
    with pytest.raises(errors.RunNotFound):
        env.store.purge_run(run_id)


def test_an_active_run_is_purged_only_when_forced(env):
    pending, parked = env.start(linear), waiting(env)
    running = env.start(linear)
    env.claim(running)

    for run_id, status in ((pending, "pending"), (parked, "waiting"), (running, "running")):
        with pytest.raises(errors.RunNotFinished) as refused:
            env.store.purge_run(run_id)
        assert refused.value.code == "E-RUN-ACTIVE" and refused.value.status == status
        assert str(refused.value) == (
            f"run {run_id} is {status}: cancel it first or purge with --force"
        )
        assert env.store.get_run(run_id).status == status

    assert env.store.purge_run(pending, force=True).runs == 1
    assert env.store.purge_run(parked, force=True).run_ids == (parked,)
    assert not exists(env, pending) and not exists(env, parked)


def test_a_forced_purge_of_a_running_run_frees_its_lock_and_fences_its_worker_off(env):
    # Given: a running state holding the lock db:acme
    run_id = env.start(locked, {"tenant": "acme"})
    claim = env.store.claim_locked(
        run_id, 1, owner="w1", ttl=TTL, key_of=lock_of("db:acme", "use"), backoff=0.5
    )
    assert isinstance(claim, Claim) and claim.holds_lock

    # When it is purged, forced
    purged = env.store.purge_run(run_id, force=True)

    # Then it is gone, its lock freed and audited as forced by the purge
    assert (purged.runs, purged.run_ids) == (1, (run_id,))
    assert not exists(env, run_id) and children(env, run_id) == dict.fromkeys(TABLES, 0)
    assert env.store.list_locks() == []
    audit = env.store.lock_audit("db:acme")[0]
    assert (audit.action, audit.actor, audit.reason, audit.holder_run) == (
        "forced",
        "purge",
        "run purged",
        run_id,
    )
    # and its worker is fenced off: the heartbeat loses the lease, the commit lands nowhere
    beat = env.store.heartbeat([LeaseRef(run_id, claim.lease_token)], worker="w1", ttl=TTL)
    assert claim.lease_token not in beat
    assert env.store.commit(claim, move("use"), worker="w1") is None
    assert not exists(env, run_id)
    # and the key is free for others
    other = env.start(locked, {"tenant": "acme"})
    again = env.store.claim_locked(
        other, 1, owner="w2", ttl=TTL, key_of=lock_of("db:acme", "use"), backoff=0.5
    )
    assert isinstance(again, Claim) and again.lock_fence == 2


def test_a_forced_purge_of_a_forked_run_deletes_its_open_branches(env):
    # Given: a run waiting on its group, one branch running on a worker
    run_id, group_id = forked(env)
    branch = claim_branch(env, group_id, 0)

    # When
    purged = env.store.purge_run(run_id, force=True)

    # Then: the group and both branches are gone, and the branch's commit lands nowhere
    assert (purged.runs, purged.groups, purged.branches) == (1, 1, 2)
    assert children(env, run_id) == dict.fromkeys(TABLES, 0) and orphans(env) == 0
    assert env.store.commit_branch(group_id, 0, branch.lease_token, done(0)) is None
    assert env.store.claim_branch(group_id, 1, owner="w2", ttl=TTL) is None
    assert env.store.branch_results(group_id) == []
