"""The faults of waits, signals and cancels (issue 17): what F-23 to F-27 inject, and
what each checks once every run has ended. Registered in ``faults.FAULTS``.

Their runs of ``workflows.waiter`` (``chaos_wait``: enter -> park, a ``Wait`` for
``"go"`` -> done | late) are started by the injection itself, beside the standard mix,
so that they reach their ``Wait`` at the instant the fault needs: a deadline about to
pass, beat down, a worker armed to die after the commit. Each injection notes what it
did in ``h.notes``; each check reads the step log (``lf_steps``), the signals
(``lf_signals``) and the effects (``chaos_effects``) against it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from leaseflow import errors
from leaseflow.client import Client
from tests.chaos import workflows
from tests.chaos.harness import LEASE_TTL, Busy, Harness, gone
from tests.helpers import eventually

EVENT = workflows.WAIT_EVENT
#: Outcomes that end a wait: exactly one per wait.
WAIT_ENDS = ("signalled", "wait_timeout")


# -- helpers ----------------------------------------------------------------------------


def db(h: Harness) -> psycopg.Connection[Any]:
    assert h.db is not None, "the harness is open"
    return h.db


def client(h: Harness) -> Client:
    assert h.client is not None, "the harness is open"
    return h.client


def one(h: Harness, sql: str, params: Any = None) -> tuple[Any, ...]:
    """The one row ``sql`` returns."""
    row = db(h).execute(sql, params).fetchone()
    assert row is not None, sql
    return tuple(row)


def start_waits(h: Harness, n: int, **data: Any) -> list[str]:
    """Start ``n`` runs of ``chaos_wait`` with input ``data`` (submitted: the invariants
    see them, quiescence waits for them)."""
    ids = [client(h).start(workflows.waiter, dict(data)) for _ in range(n)]
    h.submitted.extend(ids)
    return ids


def waiting(h: Harness, ids: list[str]) -> bool:
    """Every run of ``ids`` is parked on its Wait (not a fork: ``wait`` is set)."""
    row = one(
        h,
        """SELECT count(*) FROM lf_runs
            WHERE id = ANY(%s::uuid[]) AND status = 'waiting' AND wait IS NOT NULL""",
        (ids,),
    )
    return int(row[0]) == len(ids)


def wait_parked(h: Harness, ids: list[str], what: str) -> None:
    eventually(lambda: waiting(h, ids), timeout=30, interval=0.05, message=f"{what} waiting")


Step = tuple[int, str, str, str | None, str | None, Any]  # seq, state, outcome, next, worker, ts


def steps_of(h: Harness, ids: list[str]) -> dict[str, list[Step]]:
    """Each run's step log, in order: ``(seq, state, outcome, next_state, worker,
    finished_at)``."""
    out: dict[str, list[Step]] = {run_id: [] for run_id in ids}
    rows = (
        db(h)
        .execute(
            """SELECT run_id::text, seq, state, outcome, next_state, worker, finished_at
             FROM lf_steps WHERE run_id = ANY(%s::uuid[]) ORDER BY run_id, seq""",
            (ids,),
        )
        .fetchall()
    )
    for run_id, *step in rows:
        out[run_id].append(tuple(step))
    return out


def runs_of(h: Harness, ids: list[str]) -> dict[str, tuple[Any, ...]]:
    """``run id -> (status, state, error_code, output, lease_token)``."""
    rows = (
        db(h)
        .execute(
            """SELECT id::text, status, state, error_code, output, lease_token::text
             FROM lf_runs WHERE id = ANY(%s::uuid[])""",
            (ids,),
        )
        .fetchall()
    )
    return {row[0]: tuple(row[1:]) for row in rows}


def signals_of(h: Harness, ids: list[str]) -> dict[str, list[tuple[Any, ...]]]:
    """``run id -> [(signal_id, event, payload, consumed_at, consumed_seq)]``."""
    out: dict[str, list[tuple[Any, ...]]] = {run_id: [] for run_id in ids}
    rows = (
        db(h)
        .execute(
            """SELECT run_id::text, signal_id, event, payload, consumed_at, consumed_seq
             FROM lf_signals WHERE run_id = ANY(%s::uuid[]) ORDER BY id""",
            (ids,),
        )
        .fetchall()
    )
    for run_id, *sig in rows:
        out[run_id].append(tuple(sig))
    return out


def send(h: Harness, run_id: str, payload: Any, signal_id: str) -> str:
    """Signal ``run_id``: the receipt's result, or ``finished`` if the run had ended."""
    try:
        return client(h).signal(run_id, EVENT, payload, signal_id=signal_id).result
    except errors.RunFinished:
        return "finished"


def wait_ended_once(
    run_id: str, steps: list[Step], run: tuple[Any, ...] | None, how: str, then: str
) -> list[str]:
    """The run's wait ended exactly once, by ``how`` (``signalled``/``wait_timeout``),
    and the run went on to ``then`` and completed there."""
    ends = [outcome for _, _, outcome, _, _, _ in steps if outcome in WAIT_ENDS]
    if ends != [how]:
        return [f"{run_id}: its wait ended by {ends}, expected exactly [{how!r}]"]
    if run is None or run[:2] != ("completed", then):
        return [f"{run_id}: ended {run[:2] if run else None}, expected completed in {then!r}"]
    return []


# -- F-23: a signal at the same instant as its wait's timeout --------------------------------

RACE_RUNS = 16
#: The racing runs' deadlines are set this far ahead (database clock) ...
RACE_AHEAD_S = 0.6
#: ... and their signals spread evenly over the deadline, this much either side.
RACE_SPREAD_S = 0.3
#: The sweeper's period in F-23: it fires while the signals arrive.
RACE_SWEEP_S = 0.2


def race_signal_and_timeout(h: Harness, target: Any) -> dict[str, str]:
    """Runs wait for ``go`` (``on_timeout`` -> ``late``); their deadlines are pulled to
    ``RACE_AHEAD_S`` from now by SQL, and each gets its signal from a thread of its own
    at an instant spread across that deadline, while beat's sweeper fires every
    ``RACE_SWEEP_S``: some signals land before it, some just after (stored, the
    sweeper ends the wait), some while the sweeper holds the row."""
    ids = start_waits(h, RACE_RUNS, wait_s=60.0)
    wait_parked(h, ids, "the racing runs")
    db(h).execute(
        """UPDATE lf_runs SET wait_deadline = now() + %s * interval '1 second'
            WHERE id = ANY(%s::uuid[]) AND status = 'waiting'""",
        (RACE_AHEAD_S, ids),
    )
    t0 = time.monotonic()
    step = 2 * RACE_SPREAD_S / (RACE_RUNS - 1)
    at = [RACE_AHEAD_S - RACE_SPREAD_S + i * step for i in range(RACE_RUNS)]
    at = at[::2] + at[1::2]  # neighbours in time are different runs, not neighbours in id

    def fire(run_id: str, offset: float) -> str:
        time.sleep(max(0.0, t0 + offset - time.monotonic()))
        return send(h, run_id, {"run": run_id}, f"race-{run_id}")

    with ThreadPoolExecutor(RACE_RUNS) as pool:
        receipts = dict(zip(ids, pool.map(fire, ids, at), strict=True))
    h.notes.setdefault("race", {}).update(receipts)  # every round's, for the check
    return receipts


def one_winner_per_race(h: Harness) -> list[str]:
    """Each racing run: exactly one of ``signalled``/``wait_timeout``, the one its
    receipt announced (``resumed``: the signal won, ``done``; ``stored`` or refused as
    finished: the timeout won, ``late``, the signal left unconsumed); both kinds of
    winner seen (else the race never happened)."""
    receipts: dict[str, str] = h.notes.get("race", {})
    if not receipts:
        return ["F-23 raced no signal"]
    ids = list(receipts)
    steps, runs, signals = steps_of(h, ids), runs_of(h, ids), signals_of(h, ids)
    problems = []
    for run_id, result in receipts.items():
        won = result == "resumed"
        how, then = ("signalled", "done") if won else ("wait_timeout", "late")
        if result not in ("resumed", "stored", "finished"):
            problems.append(f"{run_id}: signal receipt {result!r}")
        problems += wait_ended_once(run_id, steps[run_id], runs.get(run_id), how, then)
        consumed = [s for s in signals[run_id] if s[3] is not None]
        if won and (len(consumed) != 1 or consumed[0][2] != {"run": run_id}):
            problems.append(f"{run_id}: resumed, but its signals consumed are {consumed}")
        if not won and consumed:
            problems.append(f"{run_id}: the timeout won, but a signal was consumed: {consumed}")
        run = runs.get(run_id)
        if won and run is not None and (run[3] or {}).get("signal") != {"run": run_id}:
            problems.append(f"{run_id}: resumed, but done saw the signal {run[3]}")
    kinds = {result == "resumed" for result in receipts.values()}
    if kinds != {True, False}:
        problems.append(f"F-23: no race: every signal {'won' if True in kinds else 'lost'}")
    return problems


# -- F-24: the same signal delivered twice ---------------------------------------------------

DUP_RUNS = 12  # half signalled as they start (before their Wait), half once waiting
DUP_COPIES = 3  # threads delivering the same signal id at once, then one more after


def deliver(h: Harness, ids: list[str]) -> dict[str, list[tuple[int, str]]]:
    """Each run gets the same signal id from ``DUP_COPIES`` threads at once (each copy
    with its own payload, so the one delivered is known), then once more."""
    receipts: dict[str, list[tuple[int, str]]] = {run_id: [] for run_id in ids}
    barrier = threading.Barrier(DUP_COPIES)

    def copy(run_id: str, k: int) -> tuple[str, int, str]:
        barrier.wait(timeout=30)
        return run_id, k, send(h, run_id, {"copy": k}, f"dup-{run_id}")

    with ThreadPoolExecutor(DUP_COPIES) as pool:
        for run_id in ids:
            for rid, k, result in pool.map(copy, [run_id] * DUP_COPIES, range(DUP_COPIES)):
                receipts[rid].append((k, result))
    for run_id in ids:  # the caller retries later: still the same signal
        again = send(h, run_id, {"copy": DUP_COPIES}, f"dup-{run_id}")
        receipts[run_id].append((DUP_COPIES, again))
    return receipts


def duplicate_signals(h: Harness, target: Any) -> int:
    early = start_waits(h, DUP_RUNS // 2)  # no timeout: a lost signal leaves it waiting
    receipts = deliver(h, early)
    parked = start_waits(h, DUP_RUNS - DUP_RUNS // 2)
    wait_parked(h, parked, "the runs to signal twice")
    receipts.update(deliver(h, parked))
    h.notes.setdefault("dup", {}).update(receipts)
    h.notes.setdefault("dup_early", []).extend(early)
    return len(receipts)


def delivered_once(h: Harness) -> list[str]:
    """Per run: one receipt ``resumed`` or ``stored``, every other ``duplicate``; one
    ``lf_signals`` row, consumed; one ``signalled`` step; ``done`` saw the payload of
    the copy that was not a duplicate. Some early signal was stored before its Wait."""
    receipts: dict[str, list[tuple[int, str]]] = h.notes.get("dup", {})
    if not receipts:
        return ["F-24 sent no signal"]
    ids = list(receipts)
    steps, runs, signals = steps_of(h, ids), runs_of(h, ids), signals_of(h, ids)
    problems = []
    for run_id, got in receipts.items():
        firsts = [(k, r) for k, r in got if r != "duplicate"]
        if len(firsts) != 1 or firsts[0][1] not in ("resumed", "stored"):
            problems.append(f"{run_id}: receipts {got}: exactly one must not be a duplicate")
            continue
        payload = {"copy": firsts[0][0]}
        problems += wait_ended_once(run_id, steps[run_id], runs.get(run_id), "signalled", "done")
        rows = signals[run_id]
        if len(rows) != 1 or rows[0][0] != f"dup-{run_id}" or rows[0][3] is None:
            problems.append(f"{run_id}: lf_signals rows {rows}: one, consumed, expected")
        elif rows[0][2] != payload:
            problems.append(f"{run_id}: stored payload {rows[0][2]}, delivered {payload}")
        run = runs.get(run_id)
        if run is not None and (run[3] or {}).get("signal") != payload:
            problems.append(f"{run_id}: done saw {run[3]}, the delivered copy was {payload}")
    early = h.notes.get("dup_early", [])
    if not any(r == "stored" for run_id in early for _, r in receipts.get(run_id, [])):
        problems.append("F-24: no early signal was stored before its Wait (path not exercised)")
    return problems


# -- F-25: beat stopped across a deadline, then restarted -------------------------------------

BEAT_RUNS = 8  # half waits for "go" (on_timeout -> late), half durable timers (-> done)
BEAT_WAIT_S = 1.5
#: How long past the last deadline beat stays down (sweeper periods that did not come).
BEAT_LATE_S = 2.0


def stop_beats_across_deadlines(h: Harness, target: Any) -> list[str]:
    """Stop every beat; park runs whose wait or timer ends while beat is down; once
    every deadline is ``BEAT_LATE_S`` past, check that nothing fired."""
    for beat in h.beats:
        beat.stop()
    waits = start_waits(h, BEAT_RUNS // 2, wait_s=BEAT_WAIT_S)
    timers = start_waits(h, BEAT_RUNS - BEAT_RUNS // 2, wait_s=BEAT_WAIT_S, timer=True)
    ids = waits + timers
    wait_parked(h, ids, "the runs outliving beat")
    deadlines = dict(
        db(h)
        .execute("SELECT id::text, wait_deadline FROM lf_runs WHERE id = ANY(%s::uuid[])", (ids,))
        .fetchall()
    )
    eventually(
        lambda: one(
            h,
            "SELECT now() > max(d) + %s * interval '1 second' FROM unnest(%s::timestamptz[]) d",
            (BEAT_LATE_S, list(deadlines.values())),
        )[0],
        timeout=BEAT_WAIT_S + BEAT_LATE_S + 10,
        interval=0.1,
        message="every deadline long past",
    )
    row = one(
        h,
        """SELECT count(*) FILTER (WHERE r.status <> 'waiting' OR r.wait_deadline >= now()),
                  (SELECT count(*) FROM lf_steps s
                    WHERE s.run_id = ANY(%(ids)s::uuid[]) AND s.outcome IN ('signalled',
                                                                           'wait_timeout'))
             FROM lf_runs r WHERE r.id = ANY(%(ids)s::uuid[])""",
        {"ids": ids},
    )
    if row != (0, 0):
        h.problems.append(
            f"F-25: while beat was down {row[0]} runs left their wait, {row[1]} waits ended"
        )
    h.notes.setdefault("beat_down", []).append({"waits": waits, "timers": timers})
    return ids


def restart_beat(h: Harness, token: Any) -> None:
    h.notes["beat_down"][-1]["up_at"] = one(h, "SELECT clock_timestamp()")[0]
    h.start_beat()


def fired_once_late(h: Harness) -> list[str]:
    """Each wait and timer of F-25 ended exactly once (one ``wait_timeout``), after beat
    came back: a wait at ``late``, a timer at ``done``."""
    rounds: list[dict[str, Any]] = h.notes.get("beat_down", [])
    if not rounds or any("up_at" not in down for down in rounds):
        return ["F-25 parked nothing across a beat outage, or never restarted beat"]
    problems = []
    for down in rounds:
        ids = down["waits"] + down["timers"]
        steps, runs = steps_of(h, ids), runs_of(h, ids)
        for run_id in ids:
            then = "late" if run_id in down["waits"] else "done"
            problems += wait_ended_once(
                run_id, steps[run_id], runs.get(run_id), "wait_timeout", then
            )
            fired = [ts for _, _, outcome, _, _, ts in steps[run_id] if outcome == "wait_timeout"]
            if fired and fired[0] < down["up_at"]:
                problems.append(f"{run_id}: its wait ended at {fired[0]}, before beat came back")
    return problems


# -- F-26: a worker killed right after a Wait commits -----------------------------------------

#: Limited to ``park``: the pool child SIGKILLs itself right after committing the Wait.
WAIT_KILL = "after_commit_before_enqueue@park=kill"
KILL_RUNS = 8  # parked: a signal resumes them after the kill
#: Signalled as they start, before their Wait: the Wait's commit consumes the signal
#: and resumes the run at once, and the worker dies before publishing its next state
#: (the dispatcher must re-publish it).
KILL_EARLY = 6
WAIT_KILL_LINE = "fault point after_commit_before_enqueue: kill"


def arm_wait_kill(h: Harness, busy: Busy) -> str:
    """Replace the busy worker by one whose pool children die right after committing a
    Wait, then park runs (no timeout): those parked by that worker lose it at once."""
    worker = h.restart_worker(busy.slot, faultpoints=WAIT_KILL)
    ids = start_waits(h, KILL_RUNS)
    early = start_waits(h, KILL_EARLY)
    receipts = h.notes.setdefault("wait_kill_receipts", {})
    for run_id in early:
        receipts[run_id] = send(h, run_id, {"early": run_id}, f"early-{run_id}")
    worker.wait_log(WAIT_KILL_LINE, timeout=30)
    wait_parked(h, ids, "the runs parked under the armed worker")
    h.notes["wait_kill"] = (ids, early)  # this round's
    h.notes.setdefault("wait_kill_all", []).extend(ids)
    h.notes.setdefault("wait_kill_early", []).extend(early)
    return busy.slot


def struck_by_the_kill(h: Harness, ids: list[str]) -> list[str]:
    """The runs whose Wait was committed by a pool child now dead."""
    return [
        run_id
        for run_id, log in steps_of(h, ids).items()
        for _, _, outcome, _, worker, _ in log
        if outcome == "wait" and worker and gone(int(worker.rsplit(":", 1)[1]))
    ]


def signal_after_the_kill(h: Harness, slot: str) -> None:
    """The struck runs (their Wait's worker dead) stay parked past a lease TTL and the
    reaper's passes: waiting, no lease, no reap. Then a clean worker, and a signal."""
    ids, early = h.notes["wait_kill"]
    struck = struck_by_the_kill(h, ids)
    h.notes.setdefault("wait_struck", []).extend(struck)
    h.notes.setdefault("wait_struck_early", []).extend(struck_by_the_kill(h, early))
    time.sleep(LEASE_TTL * 1.5)  # a lease would have expired and been reaped by now
    rows = (
        db(h)
        .execute(
            """SELECT r.id::text, r.status, r.lease_token::text, r.lease_owner,
                  (SELECT count(*) FROM lf_steps s WHERE s.run_id = r.id
                      AND s.outcome = 'lease_expired'),
                  (SELECT s.outcome FROM lf_steps s WHERE s.run_id = r.id
                    ORDER BY s.seq DESC LIMIT 1)
             FROM lf_runs r WHERE r.id = ANY(%s::uuid[])""",
            (struck,),
        )
        .fetchall()
    )
    for run_id, status, token, owner, reaped, last in rows:
        if (status, token, owner, reaped, last) != ("waiting", None, None, 0, "wait"):
            h.problems.append(
                f"F-26 {run_id}: after its worker died: {status}, lease {token} of {owner}, "
                f"{reaped} reaps, last step {last}: it must stay waiting, unleased"
            )
    h.restart_worker(slot)
    receipts = h.notes["wait_kill_receipts"]
    for run_id in ids:
        receipts[run_id] = send(h, run_id, {"after": "kill"}, f"after-kill-{run_id}")


def resumed_after_the_kill(h: Harness) -> list[str]:
    """Some Wait lost its worker right after committing; every run parked in F-26 was
    resumed by its one signal and completed in ``done``, with that signal; so was
    every run signalled before its Wait (resumed in the Wait's own commit, its next
    state then published by the dispatcher if the worker died first)."""
    ids: list[str] = h.notes.get("wait_kill_all", [])
    early: list[str] = h.notes.get("wait_kill_early", [])
    struck: list[str] = h.notes.get("wait_struck", [])
    receipts: dict[str, str] = h.notes.get("wait_kill_receipts", {})
    # The armed worker's first Wait kills it: a late run's, or an early one's (whose Wait
    # resumed it in its own commit); looked at again now, every dead pid long reaped.
    struck = struck or h.notes.get("wait_struck_early", []) or struck_by_the_kill(h, ids + early)
    problems = [] if struck else ["F-26: no worker died right after committing a Wait"]
    steps, runs = steps_of(h, ids + early), runs_of(h, ids + early)
    for run_id in ids + early:
        late = run_id in ids
        if receipts.get(run_id) not in (("resumed",) if late else ("resumed", "stored")):
            problems.append(f"{run_id}: signal receipt {receipts.get(run_id)!r}")
        problems += wait_ended_once(run_id, steps[run_id], runs.get(run_id), "signalled", "done")
        run = runs.get(run_id)
        sent = {"after": "kill"} if late else {"early": run_id}
        if run is not None and (run[3] or {}).get("signal") != sent:
            problems.append(f"{run_id}: done saw {run[3]}, the signal sent was {sent}")
    return problems


# -- F-27: cancel during a running state, under kill -9 ---------------------------------------

#: Runs claimed at most this long ago are still mid-state when the worker is killed.
CANCEL_FRESH_S = 0.7
#: The step that ends a run cancelled mid-state: the reaper's, or the fenced commit's.
CANCEL_ENDS = ("lease_expired", "cancelled")


def cancel_then_kill(h: Harness, busy: Busy) -> str:
    """Cancel every run whose slow state the busy worker has just claimed, then
    ``kill -9`` that worker before any of them commits: the reaper must end them."""
    owners = busy.worker.worker_ids()
    rows = (
        db(h)
        .execute(
            """SELECT id::text, state, step_seq FROM lf_runs
            WHERE status = 'running' AND state = 'slow'
              AND (id = %s::uuid OR (lease_owner = ANY(%s)
                               AND claimed_at > now() - %s * interval '1 second'))""",
            (busy.run_id, owners, CANCEL_FRESH_S),
        )
        .fetchall()
    )
    victims = {}
    for run_id, state, seq in rows:
        done = client(h).cancel(run_id, "chaos F-27")
        victims[run_id] = (state, seq, done.result)
        if done.result != "finished":
            h.expect(run_id, errors.CANCELLED)
    busy.worker.kill()
    h.notes.setdefault("cancelled", {}).update(victims)
    return busy.slot


def restart_killed(h: Harness, slot: str) -> None:
    h.restart_worker(slot)


def cancelled_where_they_were(h: Harness) -> list[str]:
    """Each run cancelled mid-state: the cancel was a request (the state ran), the run
    ended ``cancelled`` in that state by one last step (the reaper's ``lease_expired``
    or a fenced ``cancelled``), no state's effect after it, no lease left; and the
    reaper finished at least one (the worker died before its commit)."""
    victims: dict[str, tuple[str, int, str]] = h.notes.get("cancelled", {})
    if not victims:
        return ["F-27 cancelled no running state"]
    ids = list(victims)
    steps, runs = steps_of(h, ids), runs_of(h, ids)
    effects = {
        (run_id, seq)
        for run_id, seq in db(h)
        .execute(
            "SELECT run_id::text, seq FROM chaos_effects WHERE run_id = ANY(%s::uuid[])", (ids,)
        )
        .fetchall()
    }
    problems, reaped = [], 0
    for run_id, (state, seq, result) in victims.items():
        if result != "requested":
            problems.append(f"{run_id}: cancel of a running state answered {result!r}")
        run = runs.get(run_id)
        if run is None or (run[0], run[1], run[2], run[4]) != (
            "cancelled",
            state,
            errors.CANCELLED,
            None,
        ):
            problems.append(f"{run_id}: ended {run}, expected cancelled in {state!r}, unleased")
        after = [(s, st, o) for s, st, o, _, _, _ in steps[run_id] if s >= seq]
        last_ok = len(after) == 1 and after[0][1] == state and after[0][2] in CANCEL_ENDS
        if not last_ok:
            problems.append(f"{run_id}: steps from the cancelled one on: {after}")
        reaped += bool(after) and after[0][2] == "lease_expired"
        late = sorted(s for r, s in effects if r == run_id and s >= seq)
        if late:
            problems.append(f"{run_id}: effects committed at seqs {late} after the cancel")
    if not reaped:
        problems.append("F-27: no cancelled run was finished by the reaper")
    return problems
