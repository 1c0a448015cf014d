"""``MemoryStore``'s reaper: expired leases of runs and branches (the semantics of the
reaper's SQL in ``queries``)."""

from __future__ import annotations

from datetime import datetime

from leaseflow import errors
from leaseflow.fsm import waits
from leaseflow.store import records as rec
from leaseflow.store._memory import Run, Tables, clear_lease


class Reaper(Tables):
    """The reaper: expired leases of runs and branches."""

    def _reap_lock(self, run: Run, now: datetime) -> None:
        """The lock a reaped attempt held is freed, audited: the next attempt takes it
        again under a higher fence."""
        row = self._held(run.lock_key, run.lock_token)
        if row is not None:
            self._lock_audit.append(
                rec.LockAudit(
                    row.key,
                    row.fence,
                    "expired",
                    row.holder,
                    row.holder_run,
                    "reaper",
                    "the holder's lease expired",
                    now,
                )
            )
        self._free_run_lock(run, now)

    def reap(self, *, limit: int = 1000) -> list[rec.Reaped]:
        with self._lock:
            now = self._now()
            expired = [
                run
                for run in self._runs.values()
                if run.finished_at is None
                and run.status == "running"
                and run.lease_expires_at is not None
                and run.lease_expires_at < now
            ]
            expired.sort(key=lambda run: run.lease_expires_at or now)
            reaped: list[rec.Reaped] = []
            for run in expired[:limit]:
                owner = run.lease_owner
                self._step(
                    run,
                    now,
                    outcome="lease_expired",
                    started_at=run.claimed_at,
                    worker=owner,
                    lease_token=run.lease_token,
                    error=f"lease of {owner or 'unknown worker'} expired",
                )
                requeue = run.attempt < run.max_attempts and not run.cancel_requested
                self._reap_lock(run, now)
                run.status = "pending" if requeue else "failed"
                run.error_code = None if requeue else errors.LEASE_EXPIRED
                run.finished_at = None if requeue else now
                run.error = None
                if run.cancel_requested:
                    run.status, run.error_code = "cancelled", errors.CANCELLED
                    run.error = waits.cancel_reason(run.cancel_reason)
                elif not requeue:
                    run.error = (
                        f"lease expired on attempt {run.attempt} of {run.max_attempts} "
                        f"in state {run.state}"
                    )
                clear_lease(run)
                run.step_seq += 1
                run.not_before = run.updated_at = now
                run.redispatch_at = self._later(now, self.dispatch_timeout)
                fields = (run.id, run.workflow, run.version, run.state, run.step_seq)
                reaped.append(rec.Reaped(*fields, run.status, run.attempt, owner, run.priority))
            return reaped

    def expired_branches(self, *, limit: int = 1000) -> list[rec.ExpiredBranch]:
        with self._lock:
            now = self._now()
            expired = [
                b
                for b in self._branches.values()
                if b.finished_at is None
                and b.status == "running"
                and b.lease_expires_at is not None
                and b.lease_expires_at < now
            ]
            expired.sort(key=lambda b: b.lease_expires_at or now)
            return [
                rec.ExpiredBranch(
                    b.group_id,
                    b.idx,
                    b.lease_token or "",
                    b.lease_owner,
                    b.attempt,
                    b.max_attempts,
                    b.state,
                    self._runs[b.run_id].workflow,
                    self._runs[b.run_id].version,
                    self._runs[b.run_id].priority,
                )
                for b in expired[:limit]
            ]
