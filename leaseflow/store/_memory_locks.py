"""``MemoryStore``'s resource locks: the semantics of ``pg_locks`` (each method one
atomic "transaction" under the store's lock; time is the store's clock)."""

from __future__ import annotations

import copy
import dataclasses
import uuid
from collections.abc import Sequence
from datetime import datetime

from leaseflow import errors
from leaseflow.store import _memory as tables
from leaseflow.store import records as rec


class _Contended(Exception):
    def __init__(self, key: str, holder: str | None) -> None:
        super().__init__(key, holder)
        self.key = key
        self.holder = holder


class LockTables(tables.Tables):
    """Locks of runs and of ``locks.hold``, the sweeper and forced releases."""

    # -- helpers ------------------------------------------------------------------------

    def _acquire(
        self,
        key: str,
        *,
        holder: str,
        run_id: str | None,
        state: str | None,
        ttl: float,
        now: datetime,
    ) -> tables.LockRow:
        row = self._locks.setdefault(key, tables.LockRow(key))
        if row.token is not None:
            raise _Contended(key, row.holder)
        row.fence += 1
        row.token, row.holder, row.holder_run, row.holder_state = (
            str(uuid.uuid4()),
            holder,
            run_id,
            state,
        )
        row.acquired_at, row.expires_at, row.released_at = now, self._later(now, ttl), None
        return row

    def _take(
        self,
        run: tables.Run,
        claim: rec.Claim,
        key: str,
        until: str | None,
        ttl: float,
        now: datetime,
    ) -> rec.Claim:
        holder = f"run {run.id} ({run.workflow}.{run.state})"
        row = self._acquire(key, holder=holder, run_id=run.id, state=run.state, ttl=ttl, now=now)
        run.lock_key, run.lock_token, run.lock_until = key, row.token, until
        return dataclasses.replace(
            claim, lock_key=key, lock_token=row.token, lock_until=until, lock_fence=row.fence
        )

    def _hold_on(self, run: tables.Run, claim: rec.Claim, ttl: float, now: datetime) -> rec.Claim:
        row = self._held(claim.lock_key, claim.lock_token)
        if row is not None:
            row.expires_at, row.holder_state = self._later(now, ttl), claim.state
            return dataclasses.replace(claim, lock_fence=row.fence)
        assert claim.lock_key is not None
        return self._take(run, claim, claim.lock_key, claim.lock_until, ttl, now)

    def _defer(self, run: tables.Run, delay: float, now: datetime) -> None:
        run.not_before = self._later(now, delay)
        run.redispatch_at = self._later(now, delay + self.dispatch_timeout)

    # -- claims ---------------------------------------------------------------------------

    def claim_locked(
        self,
        run_id: str,
        step_seq: int,
        *,
        owner: str,
        ttl: float,
        key_of: rec.KeyOf,
        backoff: float,
        versions: Sequence[int] | None = None,
    ) -> rec.Claim | rec.LockContended | None:
        with self._lock:
            run = self._runs.get(tables.run_key(run_id) or "")
            before = None if run is None else copy.copy(run)
            claim = self.claim(run_id, step_seq, owner=owner, ttl=ttl, versions=versions)  # type: ignore[attr-defined]
            if claim is None or run is None:
                return None
            now = self._now()
            want = key_of(claim)
            try:
                if want is None or want.key is None:
                    return self._hold_on(run, claim, ttl, now) if claim.holds_lock else claim
                if claim.holds_lock and claim.lock_key == want.key:
                    return self._hold_on(run, claim, ttl, now)
                return self._take(run, claim, want.key, want.until, ttl, now)
            except _Contended as exc:
                assert before is not None
                self._runs[run.id] = before  # the claim rolls back
                self._defer(before, backoff, now)
                return rec.LockContended(exc.key, exc.holder, backoff)

    def hold_on(
        self, claim: rec.Claim, *, ttl: float, backoff: float
    ) -> rec.Claim | rec.LockContended:
        with self._lock:
            now = self._now()
            run = self._runs[claim.run_id]
            try:
                return self._hold_on(run, claim, ttl, now)
            except _Contended as exc:
                if tables.holds(run, claim.lease_token, now):
                    tables.clear_lease(run)
                    run.status, run.attempt = "pending", run.attempt - 1
                    self._defer(run, backoff, now)
                return rec.LockContended(exc.key, exc.holder, backoff)

    def _guard(self, claim: rec.Claim) -> bool:
        return self._held(claim.lock_key, claim.lock_token) is not None

    def _settle_lock(
        self, run: tables.Run, claim: rec.Claim, release: bool, ttl: float, now: datetime
    ) -> None:
        row = self._held(claim.lock_key, claim.lock_token)
        if row is None:
            return
        if release:
            tables.free_lock(row, now)
            if run.lock_token == claim.lock_token:
                run.lock_key = run.lock_token = run.lock_until = None
        else:
            row.expires_at, row.holder_state = self._later(now, ttl), claim.state

    # -- locks.hold -------------------------------------------------------------------------

    def acquire_lock(self, key: str, *, holder: str, ttl: float) -> rec.HeldLock:
        with self._lock:
            now = self._now()
            try:
                row = self._acquire(key, holder=holder, run_id=None, state=None, ttl=ttl, now=now)
            except _Contended:
                found = self._locks[key]
                raise errors.LockHeld(key, found.holder, found.acquired_at) from None
            assert row.token is not None
            return rec.HeldLock(key, row.fence, row.token)

    def refresh_lock(self, key: str, token: str, *, ttl: float) -> bool:
        with self._lock:
            row = self._held(key, token)
            if row is not None:
                row.expires_at = self._later(self._now(), ttl)
            return row is not None

    def release_lock(self, key: str, token: str) -> bool:
        with self._lock:
            row = self._held(key, token)
            if row is not None:
                tables.free_lock(row, self._now())
            return row is not None

    # -- operators and the sweeper ------------------------------------------------------------

    def _audit(
        self, row: tables.LockRow, action: str, actor: str, reason: str, now: datetime
    ) -> rec.LockFreed:
        self._lock_audit.append(
            rec.LockAudit(
                row.key, row.fence, action, row.holder, row.holder_run, actor, reason, now
            )
        )
        freed = rec.LockFreed(row.key, row.fence, row.holder, row.holder_run, reason)
        tables.free_lock(row, now)
        return freed

    def sweep_locks(self, *, limit: int = 1000) -> list[rec.LockFreed]:
        with self._lock:
            now = self._now()
            expired = [
                row
                for row in self._locks.values()
                if row.token is not None and row.expires_at is not None and row.expires_at < now
            ]
            expired.sort(key=lambda row: row.expires_at or now)
            return [
                self._audit(row, "expired", "sweeper", "lease expired", now)
                for row in expired[:limit]
            ]

    def force_release(self, key: str, *, actor: str, reason: str) -> rec.LockFreed:
        with self._lock:
            row = self._locks.get(key)
            if row is None or row.token is None:
                raise errors.LockNotFound(key)
            return self._audit(row, "forced", actor, reason, self._now())

    def list_locks(self, *, limit: int = 1000) -> list[rec.LockRecord]:
        with self._lock:
            now = self._now()
            held = sorted(
                (r for r in self._locks.values() if r.token is not None), key=lambda r: r.key
            )
            return [
                rec.LockRecord(
                    r.key,
                    r.fence,
                    r.holder,
                    r.holder_run,
                    r.holder_state,
                    r.acquired_at,
                    r.expires_at,
                    r.expires_at is not None and r.expires_at < now,
                )
                for r in held[:limit]
            ]

    def lock_audit(self, key: str | None = None, *, limit: int = 100) -> list[rec.LockAudit]:
        with self._lock:
            rows = [a for a in reversed(self._lock_audit) if key is None or a.key == key]
            return rows[:limit]
