"""The wait faults' checks can see: each flags a ledger that breaks its property.

A real ledger of ``chaos_wait`` and ``chaos_linear`` runs is made in-process (the
runner and the store, no Celery): one run resumed by a signal, one resumed by the
same signal id twice, one whose wait timed out, one cancelled mid-state and reaped.
Each check of ``waits_faults`` is fed what its injection would have noted: it holds
when that is true, and names the run when the notes or the ledger contradict it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import psycopg
import pytest

from leaseflow import messages
from tests.chaos import waits_faults as waits
from tests.chaos import workflows
from tests.chaos.harness import Harness
from tests.chaos.inprocess import Engine, scratch_engine

pytestmark = pytest.mark.chaos

QUIET = {"pause": 0.0, "slow": 0.0, "p": 0.0}


@dataclass
class Noted:
    """Stands for the harness in a check: its database connection and its notes."""

    db: psycopg.Connection[Any]
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ledger:
    conn: psycopg.Connection[Any]
    raced: str  # resumed by its signal ({"run": id}, signal id race-<id>)
    duplicated: str  # signal id dup-<id>: copy 1 delivered, copy 0 a duplicate
    timed_out: str  # its wait ran out: late
    cancelled: str  # cancel requested in state a (seq 1), its lease then reaped
    after_kill: str  # resumed by {"after": "kill"}, as F-26 signals
    swept_at: Any  # database time just before the wait of timed_out was swept


def noted(ledger: Ledger, notes: dict[str, Any]) -> Harness:
    """What a check reads of the harness: the ledger's connection, and ``notes``."""
    return cast(Harness, Noted(ledger.conn, notes))


def follow(engine: Engine, todo: list[messages.Message]) -> None:
    while todo:
        result = engine.runner.handle(todo.pop(0))
        assert result.result == "committed", result
        todo.extend(result.wakeups)


def resume(engine: Engine, due: Any) -> None:
    follow(engine, [messages.StateStep(due.run_id, due.workflow, due.state, due.step_seq)])


@pytest.fixture(scope="module")
def ledger(pg_template: str) -> Iterator[Ledger]:
    with scratch_engine(pg_template) as engine:
        parked = [engine.start(workflows.waiter, {**QUIET, "wait_s": 60.0}) for _ in range(4)]
        raced, duplicated, timed_out, after_kill = parked
        engine.drive(parked)  # each commits its Wait
        done = engine.store.signal(raced, "go", {"run": raced}, signal_id=f"race-{raced}")
        resume(engine, done.due)
        done = engine.store.signal(after_kill, "go", {"after": "kill"}, signal_id="k")
        resume(engine, done.due)
        first = engine.store.signal(duplicated, "go", {"copy": 1}, signal_id=f"dup-{duplicated}")
        again = engine.store.signal(duplicated, "go", {"copy": 0}, signal_id=f"dup-{duplicated}")
        assert (first.receipt.result, again.receipt.result) == ("resumed", "duplicate")
        resume(engine, first.due)
        swept_at = engine.conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        engine.conn.execute("UPDATE lf_runs SET wait_deadline = now() WHERE id = %s", (timed_out,))
        (ended,) = engine.store.sweep_waits()
        resume(engine, ended)
        cancelled = engine.start(workflows.linear, QUIET)
        claim = engine.store.claim(cancelled, 1, owner="doomed:1", ttl=30)
        assert claim is not None
        assert engine.store.cancel(cancelled, "test").result == "requested"
        engine.conn.execute(
            "UPDATE lf_runs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
            (cancelled,),
        )
        assert len(engine.store.reap()) == 1
        yield Ledger(engine.conn, raced, duplicated, timed_out, cancelled, after_kill, swept_at)


def forged(ledger: Ledger, sql: str, params: Any = None) -> Iterator[None]:
    """Run ``sql`` in a transaction rolled back after the check."""
    with ledger.conn.transaction(force_rollback=True):
        ledger.conn.execute(sql, params)
        yield


def second_end(run_id: str) -> str:
    """A second end of the run's wait, as if both the signal and the timeout won."""
    return (
        "INSERT INTO lf_steps (run_id, seq, state, attempt, outcome, next_state) "
        f"SELECT '{run_id}', max(seq) + 1, 'park', 0, 'wait_timeout', 'late' FROM lf_steps "
        f"WHERE run_id = '{run_id}'"
    )


# -- F-23 --------------------------------------------------------------------------------


def race_notes(ledger: Ledger, raced: str = "resumed", timed_out: str = "stored") -> Harness:
    return noted(ledger, {"race": {ledger.raced: raced, ledger.timed_out: timed_out}})


def test_the_race_check_holds_on_the_ledger(ledger: Ledger) -> None:
    assert waits.one_winner_per_race(race_notes(ledger)) == []


def test_the_race_check_flags_a_receipt_the_ledger_contradicts(ledger: Ledger) -> None:
    problems = waits.one_winner_per_race(race_notes(ledger, raced="stored", timed_out="resumed"))
    assert any(ledger.raced in p for p in problems) and any(ledger.timed_out in p for p in problems)


def test_the_race_check_flags_two_ends_of_one_wait(ledger: Ledger) -> None:
    for _ in forged(ledger, second_end(ledger.raced)):
        problems = waits.one_winner_per_race(race_notes(ledger))
    assert any(ledger.raced in p and "exactly" in p for p in problems), problems


def test_the_race_check_flags_a_race_with_one_kind_of_winner(ledger: Ledger) -> None:
    notes = noted(ledger, {"race": {ledger.raced: "resumed"}})
    assert any("no race" in p for p in waits.one_winner_per_race(notes))


# -- F-24 --------------------------------------------------------------------------------


def dup_notes(ledger: Ledger, receipts: list[tuple[int, str]]) -> Harness:
    return noted(ledger, {"dup": {ledger.duplicated: receipts}, "dup_early": []})


def test_the_duplicate_check_holds_on_the_ledger(ledger: Ledger) -> None:
    problems = waits.delivered_once(dup_notes(ledger, [(1, "resumed"), (0, "duplicate")]))
    assert problems == ["F-24: no early signal was stored before its Wait (path not exercised)"]


def test_the_duplicate_check_flags_two_deliveries(ledger: Ledger) -> None:
    problems = waits.delivered_once(dup_notes(ledger, [(1, "resumed"), (0, "stored")]))
    assert any("exactly one must not be a duplicate" in p for p in problems), problems


def test_the_duplicate_check_flags_the_wrong_copy_delivered(ledger: Ledger) -> None:
    problems = waits.delivered_once(dup_notes(ledger, [(0, "resumed"), (1, "duplicate")]))
    assert any("delivered {'copy': 0}" in p for p in problems), problems


def test_the_duplicate_check_flags_a_second_signalled_step(ledger: Ledger) -> None:
    sql = (
        "INSERT INTO lf_steps (run_id, seq, state, attempt, outcome, next_state) "
        "SELECT run_id, max(seq) + 1, 'park', 0, 'signalled', 'done' FROM lf_steps "
        "WHERE run_id = %s GROUP BY run_id"
    )
    for _ in forged(ledger, sql, (ledger.duplicated,)):
        problems = waits.delivered_once(dup_notes(ledger, [(1, "resumed"), (0, "duplicate")]))
    assert any("['signalled', 'signalled']" in p for p in problems), problems


# -- F-25 --------------------------------------------------------------------------------


def beat_notes(ledger: Ledger, up_at: Any, waits_: list[str] | None = None) -> Harness:
    down = {"waits": waits_ or [ledger.timed_out], "timers": [], "up_at": up_at}
    return noted(ledger, {"beat_down": [down]})


def test_the_beat_check_holds_on_the_ledger(ledger: Ledger) -> None:
    assert waits.fired_once_late(beat_notes(ledger, ledger.swept_at)) == []


def test_the_beat_check_flags_a_wait_ended_before_beat_came_back(ledger: Ledger) -> None:
    later = waits.one(noted(ledger, {}), "SELECT now() + interval '1 hour'")[0]
    problems = waits.fired_once_late(beat_notes(ledger, later))
    assert any("before beat came back" in p for p in problems), problems


def test_the_beat_check_flags_a_wait_ended_by_a_signal(ledger: Ledger) -> None:
    problems = waits.fired_once_late(beat_notes(ledger, ledger.swept_at, [ledger.raced]))
    assert any(ledger.raced in p for p in problems), problems


def test_the_beat_check_flags_a_beat_never_restarted(ledger: Ledger) -> None:
    notes = noted(ledger, {"beat_down": [{"waits": [ledger.timed_out], "timers": []}]})
    assert waits.fired_once_late(notes) != []


# -- F-26 --------------------------------------------------------------------------------


def kill_notes(ledger: Ledger, struck: list[str], receipt: str = "resumed") -> Harness:
    return noted(
        ledger,
        {
            "wait_kill_all": [ledger.after_kill],
            "wait_kill_early": [],
            "wait_struck": struck,
            "wait_kill_receipts": {ledger.after_kill: receipt},
        },
    )


def test_the_wait_kill_check_holds_on_the_ledger(ledger: Ledger) -> None:
    assert waits.resumed_after_the_kill(kill_notes(ledger, [ledger.after_kill])) == []


def test_the_wait_kill_check_flags_no_struck_run_and_a_lost_signal(ledger: Ledger) -> None:
    problems = waits.resumed_after_the_kill(kill_notes(ledger, [], receipt="stored"))
    assert any("no worker died" in p for p in problems)
    assert any("signal receipt 'stored'" in p for p in problems), problems


# -- F-27 --------------------------------------------------------------------------------


def cancel_notes(ledger: Ledger, state: str = "a", seq: int = 1) -> Harness:
    return noted(ledger, {"cancelled": {ledger.cancelled: (state, seq, "requested")}})


def test_the_cancel_check_holds_on_the_ledger(ledger: Ledger) -> None:
    assert waits.cancelled_where_they_were(cancel_notes(ledger)) == []


def test_the_cancel_check_flags_a_run_cancelled_elsewhere(ledger: Ledger) -> None:
    problems = waits.cancelled_where_they_were(cancel_notes(ledger, state="b"))
    assert any("expected cancelled in 'b'" in p for p in problems), problems


def test_the_cancel_check_flags_an_effect_after_the_cancel(ledger: Ledger) -> None:
    sql = (
        "INSERT INTO chaos_effects (run_id, state, seq, token, attempt, pid) "
        "VALUES (%s, 'b', 2, gen_random_uuid(), 1, 1)"
    )
    for _ in forged(ledger, sql, (ledger.cancelled,)):
        problems = waits.cancelled_where_they_were(cancel_notes(ledger))
    assert any("after the cancel" in p for p in problems), problems


def test_the_cancel_check_flags_a_cancel_no_reaper_finished(ledger: Ledger) -> None:
    sql = "UPDATE lf_steps SET outcome = 'cancelled' WHERE run_id = %s AND seq = 1"
    for _ in forged(ledger, sql, (ledger.cancelled,)):
        problems = waits.cancelled_where_they_were(cancel_notes(ledger))
    assert problems == ["F-27: no cancelled run was finished by the reaper"]
