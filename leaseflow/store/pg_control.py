"""The SQL work of waits and of the operations on a run from outside its lease:
signals, cancels, re-drives, and the timeout sweeper (wait timeouts, run deadlines).

Each function runs inside one short transaction the store opens; the decisions are
``fsm.waits``'s, the statements ``control_sql``'s. The run's row is locked first, so
these operations, and the commit of a Wait, take turns on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from leaseflow import errors
from leaseflow.fsm import waits
from leaseflow.fsm.rules import Transition
from leaseflow.store import control_sql, lock_sql, pg_runs, queries, records
from leaseflow.types import TERMINAL_STATUSES, RunStatus, StepOutcome


def _lock(conn: psycopg.Connection[Any], run_id: str) -> tuple[Any, ...]:
    """The run's row, locked until the transaction ends; ``RunNotFound`` if none."""
    try:
        row = conn.execute(control_sql.LOCK_RUN, {"run_id": run_id}).fetchone()
    except psycopg.errors.InvalidTextRepresentation:  # not a uuid: no such run
        row = None
    if row is None:
        raise errors.RunNotFound(run_id)
    return row


def lock_run(conn: psycopg.Connection[Any], run_id: str) -> tuple[Any, ...]:
    """``_lock``, for the other operations on a run from outside its lease (a purge)."""
    return _lock(conn, run_id)


def _resume(
    conn: psycopg.Connection[Any],
    run_id: str,
    seq: int,
    to: waits.Resume,
    signal: Any,
    *,
    dispatch_timeout: float,
    note: str | None = None,
) -> int:
    """Move the waiting run at ``seq`` to ``to.state``; the run's new step_seq."""
    row = conn.execute(
        control_sql.RESUME,
        {
            "run_id": run_id,
            "seq": seq,
            "state": to.state,
            "max_attempts": to.max_attempts,
            "signal": None if signal is None else Jsonb(signal),
            "dispatch_timeout": dispatch_timeout,
            "outcome": to.outcome,
            "note": note,
        },
    ).fetchone()
    assert row is not None, "the run's row is locked and waiting"
    return int(row[0])


def _end(
    conn: psycopg.Connection[Any],
    run_id: str,
    *,
    status: str,
    code: str | None,
    error: str | None,
    outcome: str,
    reason: str | None = None,
) -> int:
    """End an unleased run (its open groups and its lock too); its new step_seq."""
    params = {
        "run_id": run_id,
        "status": status,
        "code": code,
        "error": error,
        "outcome": outcome,
        "reason": reason,
    }
    conn.execute(lock_sql.RELEASE_OF_RUN, {"run_id": run_id})  # before END_RUN forgets it
    row = conn.execute(control_sql.END_RUN, params).fetchone()
    conn.execute(control_sql.CANCEL_GROUPS, {"run_id": run_id})
    return 0 if row is None else int(row[0])


# -- signals ---------------------------------------------------------------------------


def signal_txn(
    conn: psycopg.Connection[Any],
    run_id: str,
    event: str,
    payload: Any,
    signal_id: str,
    *,
    dispatch_timeout: float,
) -> records.Signalled:
    """Store the signal (once per ``signal_id``); resume the run if it waits for it."""
    status, state, seq, wait, in_time, workflow, version, priority = _lock(conn, run_id)
    if status in TERMINAL_STATUSES:
        raise errors.RunFinished(run_id, status)
    params = {"run_id": run_id, "signal_id": signal_id, "event": event, "payload": Jsonb(payload)}
    with pg_runs.refusing_unstorable(f"signal {signal_id!r} of run {run_id}"):
        row = conn.execute(control_sql.INSERT_SIGNAL, params).fetchone()

    def receipt(result: str, run_status: str, at: str) -> records.SignalReceipt:
        return records.SignalReceipt(run_id, event, signal_id, result, run_status, at)

    if row is None:
        return records.Signalled(receipt("duplicate", status, state))
    plan = waits.WaitPlan.from_json(wait) if wait is not None else None
    if status != RunStatus.WAITING or plan is None or plan.event != event or not in_time:
        return records.Signalled(receipt("stored", status, state))
    to = waits.on_signal(plan)
    new_seq = _resume(
        conn, run_id, seq, to, payload, dispatch_timeout=dispatch_timeout, note=_note(signal_id)
    )
    conn.execute(control_sql.MARK_SIGNAL, {"id": row[0], "seq": seq})
    assert to.state is not None
    due = records.Due(run_id, workflow, version, to.state, new_seq, priority=priority)
    return records.Signalled(receipt("resumed", RunStatus.PENDING, to.state), due)


def _note(signal_id: str) -> str:
    return f"signal {signal_id}"


def wait_commit_txn(
    conn: psycopg.Connection[Any],
    claim: records.Claim,
    tr: Transition,
    params: dict[str, Any],
    callbacks: Sequence[records.InCommit],
    *,
    dispatch_timeout: float,
) -> records.Committed | None:
    """The fenced commit of a Wait; a signal already stored for its event is consumed
    in the same transaction and resumes the run at once. None when fenced out."""
    plan = tr.wait
    assert plan is not None
    params = {
        **params,
        "wait": Jsonb(plan.to_json()),
        "wait_event": plan.event,
        "wait_timeout": plan.timeout,
    }
    if pg_runs.fenced_txn(conn, queries.COMMIT_WAIT, params) is None:
        return None
    pg_runs.run_callbacks(conn, claim.run_id, callbacks)
    seq = claim.step_seq + 1
    if plan.event is None:
        return records.Committed(step_seq=seq)
    taken = conn.execute(
        control_sql.TAKE_SIGNAL, {"run_id": claim.run_id, "event": plan.event, "seq": seq}
    ).fetchone()
    if taken is None:
        return records.Committed(step_seq=seq)
    to = waits.on_signal(plan)
    new_seq = _resume(conn, claim.run_id, seq, to, taken[0], dispatch_timeout=dispatch_timeout)
    return records.Committed(step_seq=new_seq, resumed=to.state)


def end_leased_txn(db: pg_runs.Executor, params: dict[str, Any]) -> str | None:
    """After a refused fenced commit: end the run ``cancelled`` or ``timed_out`` if that
    is why it was refused (the lease still holds); the status, else None."""
    row = pg_runs.fenced_txn(
        db,
        control_sql.END_LEASED,
        {
            **params,
            "cancelled": errors.CANCELLED,
            "timed_out": errors.RUN_TIMEOUT,
            "deadline_error": waits.run_timeout_reason(params["state"], "running"),
        },
    )
    return None if row is None else str(row[0])


# -- cancel and re-drive ------------------------------------------------------------------


def cancel_txn(
    conn: psycopg.Connection[Any], run_id: str, reason: str | None
) -> records.CancelResult:
    status = _lock(conn, run_id)[0]
    action = waits.cancel_action(status)
    if action == waits.CANCEL_NOOP:
        return records.CancelResult(run_id, action, status)
    if action == waits.CANCEL_REQUESTED:
        conn.execute(control_sql.REQUEST_CANCEL, {"run_id": run_id, "reason": reason})
        return records.CancelResult(run_id, action, status)
    _end(
        conn,
        run_id,
        status=RunStatus.CANCELLED,
        code=errors.CANCELLED,
        error=waits.cancel_reason(reason),
        outcome=StepOutcome.CANCELLED,
        reason=reason,
    )
    return records.CancelResult(run_id, action, RunStatus.CANCELLED)


def redrive_txn(
    conn: psycopg.Connection[Any],
    run_id: str,
    *,
    from_state: str | None,
    max_attempts: int | None,
    run_timeout: float | None,
    dispatch_timeout: float,
) -> records.Due:
    status, state, _seq, _wait, _in_time, workflow, version, priority = _lock(conn, run_id)
    refusal = waits.redrive_refusal(run_id, status)
    if refusal is not None:
        raise refusal
    target = from_state or state
    declared = conn.execute(
        control_sql.STATE_DECLARED, {"run_id": run_id, "state": target}
    ).fetchone()
    if declared is None:
        raise errors.UnknownState(f"{workflow} v{version}", target)
    note = f"re-driven from {status} in state {state!r}"
    row = conn.execute(
        control_sql.REDRIVE,
        {
            "run_id": run_id,
            "state": target,
            "max_attempts": max_attempts,
            "run_timeout": run_timeout,
            "dispatch_timeout": dispatch_timeout,
            "note": note,
        },
    ).fetchone()
    assert row is not None, "the run's row is locked and finished"
    return records.Due(run_id, workflow, version, target, int(row[0]), priority=priority)


# -- the timeout sweeper -------------------------------------------------------------------


def sweep_waits_txn(
    conn: psycopg.Connection[Any], *, limit: int, dispatch_timeout: float
) -> list[records.WaitEnded]:
    """Waits past their deadline: resumed at ``on_timeout`` (a timer at ``next``), or
    failed ``E-WAIT-TIMEOUT``."""
    out: list[records.WaitEnded] = []
    for run_id, state, seq, wait, workflow, version, priority in conn.execute(
        control_sql.DUE_WAITS, {"limit": limit}
    ).fetchall():
        to = waits.on_timeout(waits.WaitPlan.from_json(wait), state)
        if to.state is not None:
            new_seq = _resume(conn, run_id, seq, to, None, dispatch_timeout=dispatch_timeout)
            out.append(
                records.WaitEnded(run_id, workflow, version, to.state, new_seq, to.status, priority)
            )
        else:
            new_seq = _end(
                conn,
                run_id,
                status=to.status,
                code=to.error_code,
                error=to.error,
                outcome=StepOutcome.WAIT_TIMEOUT,
            )
            out.append(
                records.WaitEnded(
                    run_id, workflow, version, state, new_seq, to.status, priority, to.error_code
                )
            )
    return out


def sweep_deadlines_txn(conn: psycopg.Connection[Any], *, limit: int) -> list[records.WaitEnded]:
    """Runs past their deadline end ``timed_out``, whatever they were doing."""
    out: list[records.WaitEnded] = []
    for run_id, state, status, workflow, version, priority in conn.execute(
        control_sql.DUE_DEADLINES, {"limit": limit}
    ).fetchall():
        new_seq = _end(
            conn,
            run_id,
            status=RunStatus.TIMED_OUT,
            code=errors.RUN_TIMEOUT,
            error=waits.run_timeout_reason(state, status),
            outcome=StepOutcome.TIMED_OUT,
        )
        out.append(
            records.WaitEnded(
                run_id,
                workflow,
                version,
                state,
                new_seq,
                RunStatus.TIMED_OUT,
                priority,
                errors.RUN_TIMEOUT,
            )
        )
    return out
