"""The worker registry: heartbeats check workers in (leases or not), beat marks the
silent ones dead and expires their leases, a stopping worker hands its leases back."""

from __future__ import annotations

from leaseflow.store.base import LeaseRef
from leaseflow.store.records import WorkerInfo
from tests.contract.workflows import TTL, linear


def test_a_heartbeat_checks_the_worker_in_with_its_queues_and_leases(env):
    run_id = env.start(linear)
    claim = env.claim(run_id, owner="w1")
    info = WorkerInfo(("default", "gpu"), 4)

    env.store.heartbeat([], worker="idle:1", ttl=TTL, info=info)
    env.store.heartbeat([LeaseRef(run_id, claim.lease_token)], worker="w1", ttl=TTL, info=info)

    workers = {w.id: w for w in env.store.list_workers()}
    assert set(workers) == {"idle:1", "w1"}
    assert (workers["w1"].queues, workers["w1"].concurrency) == ("default,gpu", 4)
    assert (workers["w1"].leases_held, workers["idle:1"].leases_held) == (1, 0)
    assert {w.status for w in workers.values()} == {"alive"}


def test_a_silent_worker_is_dead_and_its_leases_go_to_the_reaper_at_once(env):
    run_id = env.start(linear)
    claim = env.claim(run_id, owner="host:1")
    env.store.heartbeat([LeaseRef(run_id, claim.lease_token)], worker="host:1", ttl=TTL)
    env.store.heartbeat([], worker="host:2", ttl=TTL)  # the beat's own worker
    env.age(3)

    dead = env.race(
        [
            lambda: env.store.reap_dead_workers(self_id="host:2", after=2),
            lambda: env.store.reap_dead_workers(self_id="host:2", after=2),
        ]
    )
    (reaped,) = env.store.reap()

    assert sorted(dead, key=len) == [[], ["host:1"]]
    assert (reaped.run_id, reaped.status, reaped.attempt) == (run_id, "pending", 1)
    statuses = {w.id: w.status for w in env.store.list_workers()}
    assert statuses == {"host:1": "dead", "host:2": "alive"}
    env.store.heartbeat([], worker="host:1", ttl=TTL)  # it was only paused: alive again
    assert {w.id: w.status for w in env.store.list_workers()}["host:1"] == "alive"


def test_a_stopping_worker_hands_its_runs_back_with_the_attempt_refunded(env):
    run_id = env.start(linear)
    env.claim(run_id, owner="host:7")
    env.store.heartbeat([], worker="host:7", ttl=TTL)

    released = env.store.release_leases_of(["host:7"])
    env.store.forget_workers(["host:7"])

    (due,) = released.runs
    assert (due.run_id, due.state, due.step_seq) == (run_id, "first", 2)
    run = env.store.get_run(run_id)
    assert (run.status, run.attempt, run.lease_owner) == ("pending", 0, None)
    assert [(s.outcome, s.worker) for s in run.steps] == [("released", "host:7")]
    assert env.claim(run_id, 2).attempt == 1
    assert env.store.list_workers() == []
