"""Tenants: a store's ``for_tenant`` view creates runs of its tenant and sees and acts
on those only; another tenant's run is "not found" (never "forbidden": its existence is
not revealed). The engine (the store itself) sees every tenant's runs and works on
them: claims, commits and the reaper. On PostgreSQL this is row-level security."""

from __future__ import annotations

import uuid

import pytest

from leaseflow import errors
from leaseflow.artifacts import Artifacts
from tests.contract.conftest import CHECKPOINT
from tests.contract.test_branches import claim_branch
from tests.contract.test_waits import park
from tests.contract.workflows import TTL, complete, done, fan, fork, linear, move, waiter


def start(store, wf, key: str | None = None, input: dict | None = None) -> str:
    return store.create_run(
        run_id=str(uuid.uuid4()),
        wf=wf,
        checkpoint=CHECKPOINT,
        input=input or {},
        idempotency_key=key,
    ).run_id


def finished_with_everything(env, store) -> str:
    """A completed run of ``tenant``'s with a step, a signal, an artefact, a group."""
    run_id = start(store, fan)
    committed = env.store.commit(env.claim(run_id), fork(), worker="w1")
    assert committed is not None and committed.group_id is not None
    writes: list = []
    for idx in (0, 1):
        branch = claim_branch(env, committed.group_id, idx)
        if idx == 0:
            Artifacts(env.store, run_id, branch.state, None, sink=writes).put("page", b"x")
        env.store.commit_branch(
            committed.group_id, idx, branch.lease_token, done(idx), callbacks=writes
        )
    env.store.signal(run_id, "note", {"n": 1}, signal_id="s1")
    join = env.claim(run_id, 2)
    assert env.store.commit(join, complete("ok"), worker="w1") is not None
    return run_id


def test_a_tenant_sees_and_lists_only_its_own_runs(env):
    acme, globex = env.store.for_tenant("acme"), env.store.for_tenant("globex")
    mine, theirs = start(acme, linear), start(globex, linear)
    plain = env.start(linear)

    assert acme.get_run(mine).tenant == "acme"
    with pytest.raises(errors.RunNotFound):
        acme.get_run(theirs)
    assert [r.id for r in acme.list_runs()] == [mine]
    assert [r.id for r in globex.list_runs()] == [theirs]
    # the engine sees every tenant's runs, and can filter by tenant
    assert {r.id: r.tenant for r in env.store.list_runs()} == {
        mine: "acme",
        theirs: "globex",
        plain: "default",
    }
    assert [r.id for r in env.store.list_runs(tenant="globex")] == [theirs]


def test_every_row_of_a_tenant_s_run_is_its_own_and_hidden_from_others(env):
    acme, globex = env.store.for_tenant("acme"), env.store.for_tenant("globex")
    run_id = finished_with_everything(env, acme)

    seen = acme.get_run(run_id)
    counts = (len(seen.steps), len(seen.groups), len(seen.signals), len(seen.artifacts))
    assert counts == (2, 1, 1, 1)  # fork + join steps
    assert acme.get_artifact(run_id, "page").data == b"x"
    for act in (
        lambda: globex.get_run(run_id),
        lambda: globex.get_artifact(run_id, "page"),
        lambda: globex.signal(run_id, "note", None, signal_id="s2"),
        lambda: globex.cancel(run_id),
        lambda: globex.redrive(run_id),
        lambda: globex.purge_run(run_id, force=True),
    ):
        with pytest.raises(errors.RunNotFound):
            act()
    assert globex.purge_runs(older_than=0, dry_run=True).runs == 0
    assert acme.purge_run(run_id).runs == 1


def test_a_tenant_acts_on_its_own_runs(env):
    acme = env.store.for_tenant("acme")
    run_id = start(acme, waiter)
    assert env.store.commit(env.claim(run_id), park(), worker="w1") is not None
    assert acme.signal(run_id, "approval", {"ok": True}, signal_id="a1").receipt.result == (
        "resumed"
    )
    cancelled = start(acme, linear)
    assert acme.cancel(cancelled, "no longer needed").result == "cancelled"
    assert acme.redrive(cancelled).state == "first"
    assert acme.get_run(cancelled).status == "pending"


def test_idempotency_keys_are_per_tenant(env):
    acme, globex = env.store.for_tenant("acme"), env.store.for_tenant("globex")
    a = start(acme, linear, key="order-1", input={"n": 1})
    assert start(acme, linear, key="order-1", input={"n": 1}) == a  # the same run
    b = start(globex, linear, key="order-1", input={"n": 2})  # another tenant's own
    assert b != a
    with pytest.raises(errors.IdempotencyConflict):
        start(acme, linear, key="order-1", input={"n": 3})


def test_the_engine_claims_commits_and_reaps_every_tenant_s_runs(env):
    acme, globex = env.store.for_tenant("acme"), env.store.for_tenant("globex")
    a, b = start(acme, linear), start(globex, linear)
    assert env.store.commit(env.claim(a), move("second"), worker="w1") is not None
    env.claim(b)  # its worker dies
    env.age(TTL + 1)
    reaped = {r.run_id for r in env.store.reap()}
    assert b in reaped
    assert globex.get_run(b).status == "pending"
    assert [s.outcome for s in acme.get_run(a).steps] == ["next"]
    assert [s.outcome for s in globex.get_run(b).steps] == ["lease_expired"]
