"""The faults of resource locks, graceful shutdown and the worker registry (issue 18):
what F-21 and F-28 to F-31 inject, and what each checks once every run has ended.
Registered in ``faults.FAULTS``.

The lock faults run ``workflows.locked`` (``chaos_lock``: enter -> hold -> leave,
``hold`` declared ``lock="chaos:{key}"``), whose ``hold`` state writes its own
``enter``/``exit`` rows to ``chaos_lock_ledger`` with ``ctx.lock_token``: the
evidence of invariant I6 (never two live holders of one key, fences growing per key)
and of these checks. The shutdown and dead-worker faults strike long states
(``workflows.LONG``: ``chaos_slow`` whose slow state lasts ``LONG_S``) under a long
lease TTL, so that a hand-over by lease expiry would be visibly late. Each injection
notes what it struck in ``h.notes``; each check reads the step log (``lf_steps``),
the lock audit (``lf_lock_audit``), the registry (``lf_workers``) and the ledgers
against it.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Any

import psycopg

from leaseflow import locks
from leaseflow.client import Client
from tests.chaos import workflows
from tests.chaos.harness import Busy, Harness, signal_pid, stopped
from tests.helpers import eventually

#: F-21 and F-28 strike the holders of this key (``workflows.LOCKED``: a slow hold).
SLOW_KEY = "k0"
#: F-21's lock sweeper period: the freeze outlasts the lease TTL and this.
SWEEP_F21_S = 1.0


def db(h: Harness) -> psycopg.Connection[Any]:
    assert h.db is not None, "the harness is open"
    return h.db


def client(h: Harness) -> Client:
    assert h.client is not None, "the harness is open"
    return h.client


def rows(h: Harness, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in db(h).execute(sql, params).fetchall()]


def outcomes_of(h: Harness, token: str) -> list[str]:
    """The outcomes of the steps written with lease token ``token``."""
    found = rows(h, "SELECT outcome FROM lf_steps WHERE lease_token = %s ORDER BY seq", (token,))
    return [outcome for (outcome,) in found]


def audit_of(h: Harness, key: str, fence: int) -> list[tuple[str, str | None, str | None]]:
    """``(action, actor, reason)`` of each ``lf_lock_audit`` row of lock (key, fence)."""
    return rows(
        h,
        "SELECT action, actor, reason FROM lf_lock_audit WHERE key = %s AND fence = %s ORDER BY id",
        (key, fence),
    )


def ledger(h: Harness, key: str, fence: int, holder: str, event: str) -> None:
    """A ``chaos_lock_ledger`` row written by the harness (a holder that is code)."""
    db(h).execute(
        "INSERT INTO chaos_lock_ledger (key, fence, holder, event, pid) VALUES (%s, %s, %s, %s, 0)",
        (key, fence, holder, event),
    )


# -- F-21 and F-28: a lock holder struck mid-state ------------------------------------------


def slow_holder_entered(h: Harness) -> Busy | None:
    """A worker that has just claimed ``hold`` of a ``k0`` run (a slow hold), whose
    holder has written its ``enter`` row: it is inside the lock for another second."""
    return h.busy(
        state="hold",
        fresh=0.6,
        workflow=workflows.locked.name,
        data={"key": SLOW_KEY},
        entered=True,
    )


def holder_of(h: Harness, busy: Busy) -> dict[str, Any]:
    """The struck holder: its run, lease token, lock key and fence (read now)."""
    found = rows(
        h,
        """SELECT r.lease_token::text, r.lock_key, l.fence FROM lf_runs r
             JOIN lf_locks l ON l.key = r.lock_key AND l.token = r.lock_token
            WHERE r.id = %s""",
        (busy.run_id,),
    )
    if not found:
        h.problems.append(f"{busy.run_id}: struck in hold, but it held no lock")
        return {"run_id": busy.run_id, "token": None, "key": None, "fence": None}
    token, key, fence = found[0]
    return {"run_id": busy.run_id, "token": token, "key": key, "fence": int(fence)}


def freeze_holder(h: Harness, busy: Busy) -> Busy:
    """SIGSTOP the whole worker whose pool child is inside the lock."""
    h.notes.setdefault("frozen_holders", []).append(holder_of(h, busy))
    h.zombies.append(busy)  # its guarded commit must be refused (I4)
    busy.worker.signal_all(signal.SIGSTOP)
    eventually(lambda: stopped(busy.worker), timeout=5, message=f"{busy.worker.name} stopped")
    return busy


def thaw_holder(h: Harness, busy: Busy) -> None:
    busy.worker.signal_all(signal.SIGCONT)


def struck_holder(h: Harness, victim: dict[str, Any], what: str) -> list[str]:
    """What F-21 and F-28 demand of the holder they struck, besides its audit row: it
    had entered and, resumed, left its state; nothing was committed under its lease
    (its one step the reaper's ``lease_expired``: the guarded commit was refused); the
    next holder of the key entered with a higher fence; its run completed later,
    its hold committed once, with a higher fence."""
    run_id, token, key, fence = victim["run_id"], victim["token"], victim["key"], victim["fence"]
    if token is None:
        return [f"{what} {run_id}: no lock noted"]
    problems = []
    holder = f"run {token}"
    events = [
        e
        for (e,) in rows(
            h, "SELECT event FROM chaos_lock_ledger WHERE holder = %s ORDER BY id", (holder,)
        )
    ]
    if events != ["enter", "exit"]:
        problems.append(f"{what} {run_id}: the struck holder's ledger rows {events}")
    steps = outcomes_of(h, token)
    if steps != ["lease_expired"]:
        problems.append(
            f"{what} {run_id}: steps under the struck lease {steps}, expected only the "
            "reaper's lease_expired (its guarded commit refused)"
        )
    effects = rows(h, "SELECT state, seq FROM chaos_effects WHERE token = %s", (token,))
    if effects:
        problems.append(f"{what} {run_id}: effects committed under the struck lease {effects}")
    after = rows(
        h,
        """SELECT holder, fence FROM chaos_lock_ledger
            WHERE key = %(key)s AND event = 'enter' AND holder <> %(holder)s
              AND at > (SELECT min(at) FROM chaos_lock_ledger
                         WHERE holder = %(holder)s AND event = 'enter')
            ORDER BY at, id LIMIT 1""",
        {"key": key, "holder": holder},
    )
    if not after:
        problems.append(f"{what} {run_id}: nobody held {key} after the struck holder")
    elif after[0][1] <= fence:
        problems.append(
            f"{what} {run_id}: the next holder of {key} ({after[0][0]}) entered with fence "
            f"{after[0][1]}, the struck holder's was {fence}: the fence did not grow"
        )
    run = rows(h, "SELECT status FROM lf_runs WHERE id = %s", (run_id,))
    held = rows(
        h,
        """SELECT (detail ->> 'fence')::bigint FROM chaos_effects
            WHERE run_id = %s AND state = 'hold'""",
        (run_id,),
    )
    if run != [("completed",)] or len(held) != 1 or held[0][0] <= fence:
        problems.append(
            f"{what} {run_id}: ended {run}, its hold committed with fences {held}: expected "
            f"completed, once, with a fence above {fence}"
        )
    return problems


def frozen_holder_fenced(h: Harness) -> list[str]:
    """F-21: the sweeper freed the frozen holder's lock (one ``expired`` audit row of its
    key and fence), and :func:`struck_holder`."""
    victims: list[dict[str, Any]] = h.notes.get("frozen_holders", [])
    if not victims:
        return ["F-21 froze no lock holder"]
    problems = []
    for victim in victims:
        if victim["token"] is not None:
            audit = [a[0] for a in audit_of(h, victim["key"], victim["fence"])]
            if audit != ["expired"]:
                problems.append(
                    f"F-21 {victim['run_id']}: audit of {victim['key']} fence {victim['fence']} "
                    f"{audit}, expected ['expired'] (the sweeper freed the frozen holder's lock)"
                )
        problems += struck_holder(h, victim, "F-21")
    return problems


FORCE_ACTOR = "chaos"
FORCE_REASON = "F-28: forced release mid-state"


def force_release_mid_state(h: Harness, busy: Busy) -> Busy:
    """``store.force_release`` (``leaseflow locks release --force``) of the lock a state
    is running under: its holder's next guarded commit must be refused."""
    victim = holder_of(h, busy)
    h.zombies.append(busy)  # its commit must be refused (I4), its lease left to expire
    if victim["key"] is not None:
        freed = client(h).store.force_release(victim["key"], actor=FORCE_ACTOR, reason=FORCE_REASON)
        victim["freed"] = (freed.fence, freed.holder_run)
        if (freed.fence, freed.holder_run) != (victim["fence"], victim["run_id"]):
            h.problems.append(
                f"F-28 freed fence {freed.fence} of {freed.holder_run}, the state running "
                f"under it was {victim['run_id']} with fence {victim['fence']}"
            )
    h.notes.setdefault("forced", []).append(victim)
    return busy


def forced_holder_fenced(h: Harness) -> list[str]:
    """F-28: one ``forced`` audit row (actor, reason) of the holder's key and fence, and
    :func:`struck_holder` (refused, reaped, re-run under a higher fence)."""
    victims: list[dict[str, Any]] = h.notes.get("forced", [])
    if not victims:
        return ["F-28 forced no lock"]
    problems = []
    for victim in victims:
        if victim["token"] is not None:
            audit = audit_of(h, victim["key"], victim["fence"])
            if audit != [("forced", FORCE_ACTOR, FORCE_REASON)]:
                problems.append(
                    f"F-28 {victim['run_id']}: audit of {victim['key']} fence "
                    f"{victim['fence']} {audit}, expected one 'forced' row"
                )
        problems += struck_holder(h, victim, "F-28")
    return problems


# -- F-29: two sweepers while locks expire -----------------------------------------------------

#: Locks taken by code that then "dies" (never refreshed), expiring one after another.
SWEEP_LOCKS = 12
SWEEP_TTL_S = 0.3  # the first one's lease; each next one lives SWEEP_STEP_S longer
SWEEP_STEP_S = 0.1
#: F-29's sweepers run this often (both beats): they meet on every expiry.
SWEEP_EVERY_S = 0.2


def at_once(h: Harness) -> bool:
    return True


def abandon_locks(h: Harness, target: Any) -> dict[str, int]:
    """Code takes ``SWEEP_LOCKS`` locks (``store.acquire_lock``, what ``locks.hold``
    does) with leases expiring one after another, enters each in the ledger, and never
    refreshes or releases them: a holder that died. Both beats' sweepers then race
    to free each one."""
    store = client(h).store
    taken: dict[str, int] = {}
    for i in range(SWEEP_LOCKS):
        key = f"chaos-sweep:{h.round}:{i}"
        held = store.acquire_lock(key, holder=f"chaos code {i}", ttl=SWEEP_TTL_S + i * SWEEP_STEP_S)
        ledger(h, key, held.fence, f"code {held.token}", "enter")
        taken[key] = held.fence
    h.notes.setdefault("abandoned", {}).update(taken)
    return taken


def retake_after_sweep(h: Harness, taken: dict[str, int]) -> None:
    """Once every abandoned lock was swept, a ``locks.hold`` caller takes each again
    (entering and leaving in the ledger): its fence must be the next one."""
    keys = list(taken)
    with contextlib.suppress(AssertionError):  # the check names the locks never swept
        eventually(
            lambda: (
                rows(
                    h, "SELECT count(DISTINCT key) FROM lf_lock_audit WHERE key = ANY(%s)", (keys,)
                )[0][0]
                == len(keys)
            ),
            timeout=SWEEP_TTL_S + SWEEP_LOCKS * SWEEP_STEP_S + 10,
            interval=0.1,
            message="every abandoned lock swept",
        )
    retaken = h.notes.setdefault("retaken", {})
    for key in keys:
        try:
            with locks.hold(
                key, holder="chaos re-take", ttl=5, max_wait=3, store=client(h).store
            ) as lock:
                ledger(h, key, lock.token, f"code {key}#{lock.token}", "enter")
                ledger(h, key, lock.token, f"code {key}#{lock.token}", "exit")
                retaken[key] = lock.token
        except Exception as exc:
            h.problems.append(f"F-29: {key} could not be taken again: {exc!r}")


def swept_once(h: Harness) -> list[str]:
    """F-29: each abandoned lock freed by exactly one ``expired`` audit row of its fence
    (two sweepers, one action), and taken again with the next fence."""
    taken: dict[str, int] = h.notes.get("abandoned", {})
    if not taken:
        return ["F-29 abandoned no lock"]
    retaken: dict[str, int] = h.notes.get("retaken", {})
    problems = []
    for key, fence in taken.items():
        audit = rows(
            h,
            "SELECT action, fence, actor FROM lf_lock_audit WHERE key = %s ORDER BY id",
            (key,),
        )
        if audit != [("expired", fence, "sweeper")]:
            problems.append(
                f"F-29 {key}: audit rows {audit}, expected one expired of fence {fence}"
            )
        if retaken.get(key) != fence + 1:
            problems.append(
                f"F-29 {key}: taken again with fence {retaken.get(key)}, not {fence + 1}"
            )
    return problems


def both_beats_swept(h: Harness) -> list[str]:
    sent = "Sending due task leaseflow-lock-sweeper"
    return [f"{b.name} never sent the lock sweeper" for b in h.beats if sent not in b.log()]


def two_sweepers(h: Harness) -> list[str]:
    return swept_once(h) + both_beats_swept(h)


# -- F-30 and F-31: a worker holding long states, stopped or killed ----------------------------

#: Their lease TTL: a hand-over by expiry would take this long; theirs must be far quicker.
LONG_TTL = 10.0
#: F-30's shutdown grace: shorter than a long state (``workflows.LONG_S``).
GRACE_S = 1.0
#: F-31's ``worker_dead_after``: just over two heartbeat intervals.
DEAD_AFTER_S = 1.2
#: A running state is handed back this long after the grace at most.
HANDBACK_SLACK_S = 1.5
#: A worker exits this long after its grace at most.
EXIT_SLACK_S = 5.0


#: F-30 and F-31 start their long runs once at most this many runs of the mix wait for a
#: worker: a run handed on is queued behind them, and its resumption should measure the
#: engine, not the backlog.
BACKLOG = 3
#: The long runs each of them starts (``workflows.LONG``), and mix runs beside them.
LONG_RUNS = 2
BESIDE = 3


def backlog_drained(h: Harness) -> bool:
    """Few runs of the mix still wait for a worker."""
    return rows(h, "SELECT count(*) FROM lf_runs WHERE status = 'pending'")[0][0] <= BACKLOG


def long_state_claimed(h: Harness) -> Busy:
    """Start ``LONG_RUNS`` long runs (``workflows.LONG_S``, beyond the grace) and a few
    runs of the mix; the worker that has just claimed a long state's lease."""
    for job in workflows.LONG * LONG_RUNS:
        h.submitted.append(client(h).start(job.wf, dict(job.input)))
    h.submit(BESIDE)
    return eventually(
        lambda: h.busy(
            state="slow", fresh=0.5, workflow=workflows.slow.name, data={"slow": workflows.LONG_S}
        ),
        timeout=20,
        interval=0.05,
        message="a long state claimed",
    )


Held = tuple[str, str, str, int, Any, Any]  # run id, token, state, attempt, claimed, expires


def leases_of(h: Harness, owners: list[str]) -> list[Held]:
    """The runs leased by ``owners`` now: ``(run, token, state, attempt, claimed_at,
    lease_expires_at)``."""
    return [
        (run_id, token, state, int(attempt), claimed, expires)
        for run_id, token, state, attempt, claimed, expires in rows(
            h,
            """SELECT id::text, lease_token::text, state, attempt, claimed_at, lease_expires_at
                 FROM lf_runs WHERE status = 'running' AND lease_owner = ANY(%s)""",
            (owners,),
        )
    ]


def strike_note(h: Harness, busy: Busy) -> dict[str, Any]:
    owners = busy.worker.worker_ids()
    note = {
        "victim": busy.run_id,
        "owners": owners,
        "held": leases_of(h, owners),
        "at": rows(h, "SELECT clock_timestamp()")[0][0],
        "ttl": h.settings.lease_ttl,
    }
    return note


def sigterm_main(h: Harness, target: Any) -> str:
    """SIGTERM to the worker's main process only (systemd's ``KillMode=mixed``), while
    one of its children runs a long state."""
    busy = long_state_claimed(h)
    note = strike_note(h, busy)
    signal_pid(busy.worker.pid, signal.SIGTERM)
    note["t0"] = time.monotonic()
    h.notes.setdefault("sigterm", []).append(note)
    return busy.slot


def restart_after_handback(h: Harness, slot: str) -> None:
    """The worker exits by itself soon after its grace; then a fresh one replaces it."""
    note = h.notes["sigterm"][-1]
    worker = h.workers[slot]
    with contextlib.suppress(AssertionError):
        eventually(
            lambda: worker.proc.poll() is not None,
            timeout=GRACE_S + EXIT_SLACK_S + 10,
            message=f"{worker.name} exited after its grace",
        )
    note["exited_s"] = time.monotonic() - note["t0"] if worker.proc.poll() is not None else None
    h.restart_worker(slot)


Step = tuple[int, str, int, str, str | None, Any, Any]  # seq, state, attempt, outcome, worker...


def steps_by_run(h: Harness, ids: list[str]) -> dict[str, list[Step]]:
    """Each run's steps: ``(seq, state, attempt, outcome, worker, started_at,
    finished_at)``, and the lease token of each (``tokens``)."""
    out: dict[str, list[Step]] = {run_id: [] for run_id in ids}
    for run_id, *step in rows(
        h,
        """SELECT run_id::text, seq, state, attempt, outcome, worker, started_at, finished_at,
                  lease_token::text
             FROM lf_steps WHERE run_id = ANY(%s::uuid[]) ORDER BY run_id, seq""",
        (ids,),
    ):
        out[run_id].append(tuple(step))
    return out


def resumed_elsewhere(
    what: str, run_id: str, steps: list[Any], token: str, outcome: str, note: Any, *, soon: bool
) -> tuple[list[str], Any]:
    """The step under ``token`` ended ``outcome``; the next one (same state) was started
    by a worker other than the struck one's, before the struck lease would have
    expired (``soon``: within half the TTL of the fault). ``(problems, the struck
    step)``."""
    mine = [s for s in steps if s[7] == token]
    if [s[3] for s in mine] != [outcome]:
        return [
            f"{what} {run_id}: steps under its lease {[s[3] for s in mine]}, expected [{outcome!r}]"
        ], None
    struck = mine[0]
    after = [s for s in steps if s[0] == struck[0] + 1]
    if not after:
        return [f"{what} {run_id}: never resumed after its {outcome} step"], struck
    nxt = after[0]
    problems = []
    if nxt[1] != struck[1] or nxt[4] in note["owners"]:
        problems.append(f"{what} {run_id}: resumed as {nxt[:5]} after {struck[:5]}")
    expires = next(h_[5] for h_ in note["held"] if h_[1] == token)
    if nxt[5] is None or nxt[5] >= expires:
        problems.append(
            f"{what} {run_id}: resumed at {nxt[5]}, not before its struck lease would have "
            f"expired ({expires})"
        )
    elif soon and (nxt[5] - note["at"]).total_seconds() >= note["ttl"] / 2:
        problems.append(
            f"{what} {run_id}: resumed {(nxt[5] - note['at']).total_seconds():.1f} s after the "
            f"fault, not well before the lease TTL ({note['ttl']:g} s)"
        )
    return problems, struck


def handed_back(h: Harness) -> list[str]:
    """F-30: every run the worker held at SIGTERM either committed within the grace or
    was handed back: a ``released`` step under its lease, nothing reaped, the next
    attempt of that state numbered the same (refunded), started by another worker
    well before the lease TTL; the long state was handed back; the worker exited soon
    after its grace and left the registry."""
    notes: list[dict[str, Any]] = h.notes.get("sigterm", [])
    if not notes:
        return ["F-30 sent no SIGTERM"]
    problems = []
    for note in notes:
        ids = [held[0] for held in note["held"]]
        steps = steps_by_run(h, ids)
        released = 0
        for run_id, token, _state, attempt, _claimed, _expires in note["held"]:
            outcomes = [s[3] for s in steps[run_id] if s[7] == token]
            if outcomes and outcomes[0] != "released" and outcomes[0] != "lease_expired":
                continue  # it finished within the grace, committed by the worker
            found, struck = resumed_elsewhere(
                "F-30", run_id, steps[run_id], token, "released", note, soon=True
            )
            problems += found
            if struck is not None:
                released += run_id == note["victim"]
                took = (struck[6] - note["at"]).total_seconds()
                if took > GRACE_S + HANDBACK_SLACK_S:
                    problems.append(
                        f"F-30 {run_id}: handed back {took:.1f} s after SIGTERM "
                        f"(grace {GRACE_S:g} s)"
                    )
                later = [s for s in steps[run_id] if s[0] == struck[0] + 1]
                if struck[2] != attempt or (later and later[0][2] != attempt):
                    problems.append(
                        f"F-30 {run_id}: released on attempt {struck[2]}, next attempt "
                        f"{later[0][2] if later else None}: expected both {attempt} (refunded)"
                    )
        if not released:
            problems.append(f"F-30: the long state of {note['victim']} was not handed back")
        if note.get("exited_s") is None or note["exited_s"] > GRACE_S + EXIT_SLACK_S:
            problems.append(f"F-30: the worker exited {note.get('exited_s')} s after SIGTERM")
        left = rows(h, "SELECT id, status FROM lf_workers WHERE id = ANY(%s)", (note["owners"],))
        if left:
            problems.append(f"F-30: the stopped worker's processes still registered: {left}")
    return problems


def kill_group(h: Harness, target: Any) -> str:
    """``kill -9`` of the worker's whole process group while it holds leases (a long
    state among them)."""
    busy = long_state_claimed(h)
    note = strike_note(h, busy)
    busy.worker.kill()
    note["killed_at"] = rows(h, "SELECT clock_timestamp()")[0][0]
    h.notes.setdefault("dead", []).append(note)
    return busy.slot


def restart_after_reap(h: Harness, slot: str) -> None:
    """Once every lease of the killed worker was reaped (or its TTL passed), a fresh
    worker replaces it (the survivor alone resumes the runs)."""
    note = h.notes["dead"][-1]
    tokens = [held[1] for held in note["held"]]
    with contextlib.suppress(AssertionError):  # the check reports what was not reaped
        eventually(
            lambda: (
                rows(
                    h,
                    "SELECT count(*) FROM lf_steps WHERE lease_token = ANY(%s::uuid[])",
                    (tokens,),
                )[0][0]
                >= len(tokens)
            ),
            timeout=note["ttl"] + 5,
            interval=0.1,
            message="the killed worker's leases reaped",
        )
    h.restart_worker(slot)


def resumed_before_expiry(h: Harness) -> list[str]:
    """F-31: each run the killed worker held was reaped (``lease_expired``) before its
    lease would have expired, and resumed by another worker before then, well within
    the TTL; the registry shows each of the worker's processes dead."""
    notes: list[dict[str, Any]] = h.notes.get("dead", [])
    if not notes:
        return ["F-31 killed no worker"]
    problems = []
    for note in notes:
        ids = [held[0] for held in note["held"]]
        if note["victim"] not in ids:
            problems.append(f"F-31: the struck run {note['victim']} was not among {ids}")
        steps = steps_by_run(h, ids)
        reaped = 0
        for run_id, token, _state, _attempt, _claimed, expires in note["held"]:
            mine = [s for s in steps[run_id] if s[7] == token]
            if mine and mine[0][3] != "lease_expired" and mine[0][6] < note["killed_at"]:
                continue  # committed between the note and the kill
            found, struck = resumed_elsewhere(
                "F-31", run_id, steps[run_id], token, "lease_expired", note, soon=False
            )
            problems += found
            reaped += struck is not None and run_id == note["victim"]
            if struck is not None and struck[6] >= expires:
                problems.append(
                    f"F-31 {run_id}: reaped at {struck[6]}, after its lease would have "
                    f"expired ({expires}): not handed on as a dead worker's"
                )
        if not reaped:
            problems.append(f"F-31: the long state of {note['victim']} was not reaped")
        status = dict(
            rows(h, "SELECT id, status FROM lf_workers WHERE id = ANY(%s)", (note["owners"],))
        )
        for owner in note["owners"]:
            if status.get(owner) != "dead":
                problems.append(
                    f"F-31: the killed process {owner} is {status.get(owner)!r} in the registry"
                )
    return problems
