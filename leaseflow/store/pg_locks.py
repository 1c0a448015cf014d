"""The SQL work of resource locks: a claim that takes its state's lock in the same
transaction, guarded commits, ``locks.hold``'s leases, the sweeper and forced
releases. Statements from ``lock_sql``."""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg

from leaseflow.store import lock_sql, pg_runs, records


class Contended(Exception):
    """Rolls the claim back: its lock ``key`` is held by ``holder``."""

    def __init__(self, key: str, holder: str | None) -> None:
        super().__init__(key, holder)
        self.key = key
        self.holder = holder


def claim_locked_txn(
    conn: psycopg.Connection[Any],
    run_id: str,
    seq: int,
    *,
    owner: str,
    ttl: float,
    versions: str | None,
    key_of: records.KeyOf,
) -> records.Claim | None:
    """The claim and its state's lock, in the caller's transaction. Raises
    ``Contended`` (the caller rolls back) when the lock is held elsewhere."""
    claim = pg_runs.claim_txn(conn.cursor(), run_id, seq, owner=owner, ttl=ttl, versions=versions)
    if claim is None:
        return None
    want = key_of(claim)
    if want is None or want.key is None:
        return keep_txn(conn, claim, ttl) if claim.holds_lock else claim
    if claim.holds_lock and claim.lock_key == want.key:
        kept = keep_txn(conn, claim, ttl)
        if kept.lock_fence is not None:
            return kept
    return take_txn(conn, claim, want.key, want.until, ttl=ttl)


def take_txn(
    conn: psycopg.Connection[Any], claim: records.Claim, key: str, until: str | None, *, ttl: float
) -> records.Claim:
    """Take ``key`` for the claimed run (``Contended`` when someone else holds it)."""
    holder = f"run {claim.run_id} ({claim.workflow}.{claim.state})"
    row = conn.execute(
        lock_sql.ACQUIRE,
        {"key": key, "holder": holder, "run_id": claim.run_id, "state": claim.state, "ttl": ttl},
    ).fetchone()
    if row is None:
        found = conn.execute(lock_sql.HOLDER, {"key": key}).fetchone()
        raise Contended(key, None if found is None else found[0])
    fence, token = row
    conn.execute(
        lock_sql.RECORD_ON_RUN,
        {"key": key, "token": token, "until": until, "run_id": claim.run_id},
    )
    return dataclasses.replace(
        claim, lock_key=key, lock_token=token, lock_until=until, lock_fence=int(fence)
    )


def hold_on_txn(conn: psycopg.Connection[Any], claim: records.Claim, ttl: float) -> records.Claim:
    """A run claimed while it holds a lock across states: refresh it, or take it again
    if it was lost meanwhile (``Contended`` when someone else took it)."""
    kept = keep_txn(conn, claim, ttl)
    if kept.lock_fence is not None or claim.lock_key is None:
        return kept
    return take_txn(conn, claim, claim.lock_key, claim.lock_until, ttl=ttl)


def unclaim_txn(
    conn: psycopg.Connection[Any], claim: records.Claim, *, delay: float, dispatch_timeout: float
) -> None:
    """Hand a claim back (its lock could not be had): pending again, attempt refunded."""
    conn.execute(
        lock_sql.UNCLAIM,
        {
            "run_id": claim.run_id,
            "token": claim.lease_token,
            "delay": delay,
            "dispatch_timeout": dispatch_timeout,
        },
    )


def keep_txn(conn: psycopg.Connection[Any], claim: records.Claim, ttl: float) -> records.Claim:
    """The lock the run holds across states, refreshed; ``lock_fence`` None if it was
    lost meanwhile (swept once expired, or forced)."""
    row = conn.execute(
        lock_sql.KEEP,
        {"key": claim.lock_key, "token": claim.lock_token, "state": claim.state, "ttl": ttl},
    ).fetchone()
    return dataclasses.replace(claim, lock_fence=None if row is None else int(row[0]))


def defer_txn(
    conn: psycopg.Connection[Any], run_id: str, seq: int, *, delay: float, dispatch_timeout: float
) -> None:
    conn.execute(
        lock_sql.DEFER,
        {"run_id": run_id, "seq": seq, "delay": delay, "dispatch_timeout": dispatch_timeout},
    )


def guard_txn(conn: psycopg.Connection[Any], claim: records.Claim) -> bool:
    """Lock the run's lock row for the commit: False if it is no longer the run's."""
    params = {"key": claim.lock_key, "token": claim.lock_token}
    return conn.execute(lock_sql.GUARD, params).fetchone() is not None


def settle_lock_txn(
    conn: psycopg.Connection[Any], claim: records.Claim, *, release: bool, ttl: float
) -> None:
    """After a guarded commit: free the lock (and forget it on the run), or refresh it."""
    params = {"key": claim.lock_key, "token": claim.lock_token, "state": claim.state, "ttl": ttl}
    if release:
        conn.execute(lock_sql.RELEASE, params)
        conn.execute(lock_sql.FORGET_ON_RUN, {"run_id": claim.run_id, "token": claim.lock_token})
    else:
        conn.execute(lock_sql.KEEP, params)


# -- locks.hold ----------------------------------------------------------------------------


def acquire_txn(
    conn: psycopg.Connection[Any], key: str, holder: str, ttl: float
) -> records.HeldLock | tuple[str | None, Any]:
    """Take ``key`` for ``holder``; when held elsewhere, ``(holder, since)``."""
    params = {"key": key, "holder": holder, "run_id": None, "state": None, "ttl": ttl}
    row = conn.execute(lock_sql.ACQUIRE, params).fetchone()
    if row is not None:
        return records.HeldLock(key, int(row[0]), row[1])
    found = conn.execute(lock_sql.HOLDER, {"key": key}).fetchone()
    return (None, None) if found is None else (found[0], found[1])


def refresh_txn(conn: psycopg.Connection[Any], key: str, token: str, ttl: float) -> bool:
    params = {"key": key, "token": token, "ttl": ttl}
    return conn.execute(lock_sql.REFRESH, params).fetchone() is not None


def release_txn(conn: psycopg.Connection[Any], key: str, token: str) -> bool:
    params = {"key": key, "token": token}
    return conn.execute(lock_sql.RELEASE, params).fetchone() is not None


# -- operators and the sweeper ----------------------------------------------------------------


def sweep_txn(conn: psycopg.Connection[Any], *, limit: int) -> list[records.LockFreed]:
    params = {"limit": limit, "action": "expired", "actor": "sweeper", "reason": "lease expired"}
    return [records.LockFreed(*row) for row in conn.execute(lock_sql.SWEEP, params)]


def force_txn(
    conn: psycopg.Connection[Any], key: str, *, actor: str, reason: str
) -> records.LockFreed | None:
    params = {"key": key, "action": "forced", "actor": actor, "reason": reason}
    row = conn.execute(lock_sql.FORCE, params).fetchone()
    return None if row is None else records.LockFreed(*row)


def list_txn(conn: psycopg.Connection[Any], *, limit: int) -> list[records.LockRecord]:
    return [records.LockRecord(*row) for row in conn.execute(lock_sql.LIST, {"limit": limit})]


def audit_txn(
    conn: psycopg.Connection[Any], key: str | None, *, limit: int
) -> list[records.LockAudit]:
    rows = conn.execute(lock_sql.AUDIT, {"key": key, "limit": limit})
    return [records.LockAudit(*row) for row in rows]
