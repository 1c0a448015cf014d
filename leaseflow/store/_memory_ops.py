"""``MemoryStore``'s waits, signals, cancels, re-drives and timeout sweeper: the
semantics of ``pg_control`` (each method is one atomic "transaction" under the
store's lock), decided by ``fsm.waits``."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from leaseflow import errors
from leaseflow.fsm import waits
from leaseflow.store import _memory as tables
from leaseflow.store import records as rec
from leaseflow.store._memory_locks import LockTables
from leaseflow.types import TERMINAL_STATUSES, RunStatus, StepOutcome


class Lifecycle(LockTables):
    """Waits and the operations on a run from outside its lease."""

    # -- helpers the commit shares --------------------------------------------------------

    def _run(self, run_id: str) -> tables.Run:
        run = self._runs.get(tables.run_key(run_id) or "")
        if run is None or (self.scoped and run.tenant != self.tenant):
            raise errors.RunNotFound(run_id)
        return run

    def _park(self, run: tables.Run, plan: waits.WaitPlan, now: datetime) -> None:
        """The run waits for what ``plan`` names (its status is set by the commit)."""
        run.wait, run.wait_event, run.signal = plan.to_json(), plan.event, None
        run.wait_deadline = None
        if plan.timeout is not None:
            run.wait_deadline = now + timedelta(seconds=plan.timeout)

    def _take_signal(self, run: tables.Run, event: str, now: datetime) -> tables.SignalRow | None:
        """The oldest stored signal for ``event``, consumed at the run's step."""
        for row in self._signals.get(run.id, []):
            if row.event == event and row.consumed_at is None:
                row.consumed_at, row.consumed_seq = now, run.step_seq
                return row
        return None

    def _resume(
        self,
        run: tables.Run,
        to: waits.Resume,
        signal: Any,
        now: datetime,
        note: str | None = None,
    ) -> None:
        assert to.state is not None
        self._step(
            run, now, attempt=0, outcome=to.outcome, next_state=to.state, started_at=now, error=note
        )
        self._check_edge(run, to.state)
        run.prev_state, run.state = run.state, to.state
        run.status, run.attempt, run.max_attempts = RunStatus.PENDING, 0, to.max_attempts
        run.step_seq += 1
        run.signal = tables.as_json(signal)
        run.wait = run.wait_event = run.wait_deadline = None
        run.not_before = run.updated_at = now
        run.redispatch_at = self._later(now, self.dispatch_timeout)

    def _end(
        self,
        run: tables.Run,
        now: datetime,
        *,
        status: str,
        code: str | None,
        error: str | None,
        outcome: str,
        token: str | None = None,
        worker: str | None = None,
        started_at: datetime | None = None,
    ) -> None:
        """End the run (its open groups stop, its lock is freed); a step row with
        ``outcome``."""
        self._free_run_lock(run, now)
        self._step(
            run,
            now,
            outcome=outcome,
            error=error,
            lease_token=token,
            worker=worker,
            started_at=started_at or now,
        )
        tables.clear_lease(run)
        run.status, run.error_code, run.error = status, code, error
        run.step_seq += 1
        run.wait = run.wait_event = run.wait_deadline = None
        run.finished_at = run.updated_at = now
        for group in self._groups.values():
            if group.run_id == run.id and group.status == "running":
                group.status = "cancelled"
                for idx in range(group.width):
                    branch = self._branches[(group.id, idx)]
                    if branch.status in ("held", "pending", "running"):
                        branch.status, branch.finished_at = "cancelled", now
                        branch.lease_owner = branch.lease_expires_at = None

    def _ended_instead(self, run: tables.Run, now: datetime) -> str | None:
        """Why a leased run must end instead of committing: cancelled, timed out."""
        if run.cancel_requested:
            return RunStatus.CANCELLED
        if run.past_deadline(now):
            return RunStatus.TIMED_OUT
        return None

    def _end_leased(
        self, run: tables.Run, now: datetime, status: str, *, worker: str, started_at: datetime
    ) -> None:
        cancelled = status == RunStatus.CANCELLED
        self._end(
            run,
            now,
            status=status,
            code=errors.CANCELLED if cancelled else errors.RUN_TIMEOUT,
            error=waits.cancel_reason(run.cancel_reason)
            if cancelled
            else waits.run_timeout_reason(run.state, "running"),
            outcome=status,
            token=run.lease_token,
            worker=worker,
            started_at=started_at,
        )

    # -- signals, cancel, re-drive ----------------------------------------------------------

    def signal(self, run_id: str, event: str, payload: Any, *, signal_id: str) -> rec.Signalled:
        with self._lock:
            now = self._now()
            run = self._run(run_id)
            if run.status in TERMINAL_STATUSES:
                raise errors.RunFinished(run_id, run.status)
            tables.refuse_json(f"signal {signal_id!r} of run {run_id}", payload)
            rows = self._signals.setdefault(run.id, [])

            def receipt(result: str) -> rec.SignalReceipt:
                return rec.SignalReceipt(run.id, event, signal_id, result, run.status, run.state)

            if any(row.signal_id == signal_id for row in rows):
                return rec.Signalled(receipt("duplicate"))
            row = tables.SignalRow(
                next(self._signal_ids), run.id, signal_id, event, tables.as_json(payload), now
            )
            rows.append(row)
            plan = waits.WaitPlan.from_json(run.wait) if run.wait is not None else None
            in_time = run.wait_deadline is None or run.wait_deadline > now
            if (
                run.status != RunStatus.WAITING
                or plan is None
                or plan.event != event
                or not in_time
            ):
                return rec.Signalled(receipt("stored"))
            row.consumed_at, row.consumed_seq = now, run.step_seq
            self._resume(run, waits.on_signal(plan), payload, now, note=f"signal {signal_id}")
            due = rec.Due(
                run.id, run.workflow, run.version, run.state, run.step_seq, priority=run.priority
            )
            return rec.Signalled(receipt("resumed"), due)

    def cancel(self, run_id: str, reason: str | None = None) -> rec.CancelResult:
        with self._lock:
            now = self._now()
            run = self._run(run_id)
            action = waits.cancel_action(run.status)
            if action == waits.CANCEL_NOOP:
                return rec.CancelResult(run.id, action, run.status)
            if action == waits.CANCEL_REQUESTED:
                run.cancel_requested, run.cancel_reason = True, reason
                run.updated_at = now
                return rec.CancelResult(run.id, action, run.status)
            run.cancel_reason = reason
            self._end(
                run,
                now,
                status=RunStatus.CANCELLED,
                code=errors.CANCELLED,
                error=waits.cancel_reason(reason),
                outcome=StepOutcome.CANCELLED,
            )
            return rec.CancelResult(run.id, action, run.status)

    def redrive(
        self,
        run_id: str,
        *,
        from_state: str | None = None,
        max_attempts: int | None = None,
        run_timeout: float | None = None,
    ) -> rec.Due:
        with self._lock:
            now = self._now()
            run = self._run(run_id)
            refusal = waits.redrive_refusal(run.id, run.status)
            if refusal is not None:
                raise refusal
            target = from_state or run.state
            edges = self._edges.get((run.workflow, run.version), frozenset())
            if not any(to == target for _, to in edges):
                raise errors.UnknownState(f"{run.workflow} v{run.version}", target)
            note = f"re-driven from {run.status} in state {run.state!r}"
            self._step(
                run,
                now,
                attempt=0,
                outcome=StepOutcome.REDRIVEN,
                next_state=target,
                started_at=now,
                error=note,
            )
            run.prev_state, run.state = run.state, target
            run.status, run.attempt = RunStatus.PENDING, 0
            if max_attempts is not None:
                run.max_attempts = max_attempts
            run.step_seq += 1
            run.error_code = run.error = run.output = run.finished_at = None
            run.cancel_requested, run.cancel_reason = False, None
            run.group_id = run.wait = run.wait_event = run.wait_deadline = run.signal = None
            if run_timeout is not None:
                run.run_deadline = self._later(now, run_timeout)
            run.not_before = run.updated_at = now
            run.redispatch_at = self._later(now, self.dispatch_timeout)
            return rec.Due(
                run.id, run.workflow, run.version, run.state, run.step_seq, priority=run.priority
            )

    # -- the timeout sweeper ---------------------------------------------------------------

    def sweep_waits(self, *, limit: int = 1000) -> list[rec.WaitEnded]:
        with self._lock:
            now = self._now()
            due = [
                run
                for run in self._runs.values()
                if run.status == RunStatus.WAITING
                and run.wait_deadline is not None
                and run.wait_deadline <= now
            ]
            due.sort(key=lambda run: run.wait_deadline or now)
            out: list[rec.WaitEnded] = []
            for run in due[:limit]:
                assert run.wait is not None
                to = waits.on_timeout(waits.WaitPlan.from_json(run.wait), run.state)
                if to.state is not None:
                    self._resume(run, to, None, now)
                else:
                    self._end(
                        run,
                        now,
                        status=to.status,
                        code=to.error_code,
                        error=to.error,
                        outcome=StepOutcome.WAIT_TIMEOUT,
                    )
                out.append(
                    rec.WaitEnded(
                        run.id,
                        run.workflow,
                        run.version,
                        run.state,
                        run.step_seq,
                        run.status,
                        run.priority,
                        to.error_code,
                    )
                )
            return out

    def sweep_deadlines(self, *, limit: int = 1000) -> list[rec.WaitEnded]:
        with self._lock:
            now = self._now()
            due = [r for r in self._runs.values() if r.finished_at is None and r.past_deadline(now)]
            due.sort(key=lambda run: run.run_deadline or now)
            out: list[rec.WaitEnded] = []
            for run in due[:limit]:
                self._end(
                    run,
                    now,
                    status=RunStatus.TIMED_OUT,
                    code=errors.RUN_TIMEOUT,
                    error=waits.run_timeout_reason(run.state, run.status),
                    outcome=StepOutcome.TIMED_OUT,
                )
                out.append(
                    rec.WaitEnded(
                        run.id,
                        run.workflow,
                        run.version,
                        run.state,
                        run.step_seq,
                        run.status,
                        run.priority,
                        errors.RUN_TIMEOUT,
                    )
                )
            return out

    def signal_records(self, run_id: str) -> tuple[rec.SignalRecord, ...]:
        return tuple(row.record() for row in self._signals.get(run_id, []))
