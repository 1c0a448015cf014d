"""Waits and signals: a parked run holds nothing, a signal resumes it once, a stored
signal is never lost, and a signal racing a timeout has one winner."""

from __future__ import annotations

import pytest

from leaseflow import errors
from leaseflow.store.base import LeaseRef
from tests.contract.workflows import TTL, complete, move, park, waiter


def waiting(env, *, transition=None) -> str:
    """A run of ``waiter`` parked in ``ask`` (by default waiting for "approval")."""
    run_id = env.start(waiter)
    committed = env.store.commit(env.claim(run_id), transition or park(), worker="w1")
    assert committed is not None and committed.resumed is None
    return run_id


def kinds(env, run_id) -> list[tuple[str, str, str | None]]:
    return [(s.state, s.outcome, s.next_state) for s in env.store.get_run(run_id).steps]


def test_a_waiting_run_holds_no_lease_and_claims_nothing(env):
    run_id = waiting(env)

    run = env.store.get_run(run_id)
    assert (run.status, run.state, run.step_seq, run.lease_owner) == ("waiting", "ask", 2, None)
    assert run.wait_event == "approval" and run.lease_expires_at is None
    assert env.store.claim(run_id, 2, owner="w2", ttl=TTL) is None
    assert env.store.reap() == [] and env.store.overdue_runs() == []
    assert kinds(env, run_id) == [("ask", "wait", None)]


def test_a_signal_resumes_the_run_once_at_next_with_its_payload(env):
    run_id = waiting(env)

    done = env.store.signal(run_id, "approval", {"ok": True}, signal_id="s1")
    again = env.store.signal(run_id, "approval", {"ok": True}, signal_id="s1")

    assert (done.receipt.result, done.receipt.state, done.receipt.run_status) == (
        "resumed",
        "yes",
        "pending",
    )
    assert done.due is not None and (done.due.state, done.due.step_seq) == ("yes", 3)
    assert again.receipt.result == "duplicate" and again.due is None
    claim = env.claim(run_id, 3)
    assert (claim.state, claim.signal) == ("yes", {"ok": True})
    env.store.commit(claim, move("ask"), worker="w1")  # moving on forgets the signal
    assert env.claim(run_id, 4).signal is None
    assert kinds(env, run_id)[:3] == [
        ("ask", "wait", None),
        ("ask", "signalled", "yes"),
        ("yes", "next", "ask"),
    ]
    (signal,) = env.store.get_run(run_id).signals
    assert (signal.signal_id, signal.event, signal.consumed_seq) == ("s1", "approval", 2)


def test_a_signal_sent_before_the_wait_resumes_it_when_it_is_reached(env):
    run_id = env.start(waiter)
    claim = env.claim(run_id)

    early = env.store.signal(run_id, "approval", 7, signal_id="early")
    committed = env.store.commit(claim, park(), worker="w1")

    assert (early.receipt.result, early.due) == ("stored", None)
    assert committed is not None and (committed.resumed, committed.step_seq) == ("yes", 3)
    run = env.store.get_run(run_id)
    assert (run.status, run.state) == ("pending", "yes")
    assert env.claim(run_id, 3).signal == 7
    assert [s.outcome for s in run.steps] == ["wait", "signalled"]


def test_a_signal_for_another_event_stays_stored_until_a_wait_asks_for_it(env):
    run_id = waiting(env)

    other = env.store.signal(run_id, "rejection", "why", signal_id="r")
    assert other.receipt.result == "stored"
    assert env.store.get_run(run_id).status == "waiting"
    # The run moves on through "approval", then waits for "rejection": the stored one.
    env.store.signal(run_id, "approval", None, signal_id="a")
    env.store.commit(env.claim(run_id, 3), move("ask"), worker="w1")
    committed = env.store.commit(env.claim(run_id, 4), park("rejection", next="no"), worker="w1")
    assert committed is not None and committed.resumed == "no"
    assert env.claim(run_id, 6).signal == "why"


def test_signalling_a_finished_or_unknown_run_is_refused(env):
    run_id = env.start(waiter)
    env.store.commit(env.claim(run_id), complete("done"), worker="w1")

    with pytest.raises(errors.RunFinished, match="completed") as info:
        env.store.signal(run_id, "approval", None, signal_id="x")
    assert info.value.code == "E-RUN-FINISHED"
    with pytest.raises(errors.RunNotFound):
        env.store.signal("00000000-0000-4000-8000-000000000000", "e", None, signal_id="x")
    with pytest.raises(errors.RunNotFound):
        env.store.signal("not-a-uuid", "e", None, signal_id="x")
    assert env.store.get_run(run_id).signals == ()


def test_a_wait_timeout_goes_to_on_timeout_or_fails_the_run(env):
    routed = waiting(env, transition=park(timeout=30, on_timeout="late"))
    failing = waiting(env, transition=park(timeout=30))
    env.age(10)
    assert env.store.sweep_waits() == []

    env.age(25)
    ended = {row.run_id: row for row in env.store.sweep_waits()}

    assert (ended[routed].status, ended[routed].state, ended[routed].step_seq) == (
        "pending",
        "late",
        3,
    )
    assert (ended[failing].status, ended[failing].error_code) == ("failed", "E-WAIT-TIMEOUT")
    assert env.store.get_run(failing).error_code == "E-WAIT-TIMEOUT"
    assert kinds(env, routed)[-1] == ("ask", "wait_timeout", "late")
    assert env.store.sweep_waits() == []  # once


def test_a_timer_moves_the_run_to_next_when_it_ends(env):
    run_id = waiting(env, transition=park(None, timeout=5))

    env.age(6)
    (row,) = env.store.sweep_waits()

    assert (row.status, row.state) == ("pending", "yes")
    assert env.claim(run_id, 3).state == "yes"


def test_a_signal_after_the_deadline_leaves_the_run_to_the_timeout(env):
    run_id = waiting(env, transition=park(timeout=5, on_timeout="late"))
    env.age(6)

    late = env.store.signal(run_id, "approval", None, signal_id="late")
    (row,) = env.store.sweep_waits()

    assert late.receipt.result == "stored"
    assert (row.run_id, row.state) == (run_id, "late")


def test_a_signal_racing_the_timeout_has_one_winner(env):
    runs = [waiting(env, transition=park(timeout=5, on_timeout="late")) for _ in range(5)]
    env.age(4.999)

    def signal_all() -> list[str]:
        return [env.store.signal(r, "approval", 1, signal_id="s").receipt.result for r in runs]

    def sweep_after_the_deadline() -> int:
        env.age(0.002)
        return len(env.store.sweep_waits())

    env.race([signal_all, sweep_after_the_deadline])
    env.store.sweep_waits()  # the next beat: a wait the racing one skipped (locked) ends now

    for run_id in runs:
        run = env.store.get_run(run_id)
        resumes = [s for s in run.steps if s.outcome in ("signalled", "wait_timeout")]
        assert len(resumes) == 1, run.steps
        assert run.state == ("yes" if resumes[0].outcome == "signalled" else "late")


def test_two_sweepers_end_a_wait_once(env):
    runs = [waiting(env, transition=park(timeout=1, on_timeout="late")) for _ in range(4)]
    env.age(2)

    found = env.race([env.store.sweep_waits, env.store.sweep_waits])

    assert sorted(row.run_id for rows in found for row in rows) == sorted(runs)


def test_the_heartbeat_keeps_a_waiting_run_out_of_its_leases(env):
    run_id = env.start(waiter)
    claim = env.claim(run_id)
    env.store.commit(claim, park(), worker="w1")

    assert env.store.heartbeat([LeaseRef(run_id, claim.lease_token)], worker="w1", ttl=TTL) == (
        frozenset()
    )
