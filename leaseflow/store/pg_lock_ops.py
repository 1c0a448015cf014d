"""``PostgresStore``'s resource locks: claims that take their state's lock, guarded
commits, ``locks.hold``'s leases, the sweeper, forced releases (see ``pg_locks``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from leaseflow import errors
from leaseflow.store import connections, pg_locks, pg_runs
from leaseflow.store import records as rec


class Locks:
    """The lock operations of ``PostgresStore``."""

    connections: connections.Connections
    dispatch_timeout: float

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
        """``claim``, and in the same transaction the lock ``key_of(claim)`` names (or
        the one the run holds across states). Held by someone else: nothing is claimed,
        the run is deferred by ``backoff`` seconds (``LockContended``)."""
        known = pg_runs.int_array(versions)

        def txn(conn: psycopg.Connection[Any]) -> rec.Claim | None:
            return pg_locks.claim_locked_txn(
                conn, run_id, step_seq, owner=owner, ttl=ttl, versions=known, key_of=key_of
            )

        try:
            return self.connections.transact(txn)
        except pg_locks.Contended as exc:
            timeout = self.dispatch_timeout
            self.connections.once(
                lambda c: pg_locks.defer_txn(
                    c, run_id, step_seq, delay=backoff, dispatch_timeout=timeout
                )
            )
            return rec.LockContended(exc.key, exc.holder, backoff)

    def hold_on(
        self, claim: rec.Claim, *, ttl: float, backoff: float
    ) -> rec.Claim | rec.LockContended:
        """A run claimed while holding a lock across states: the lock refreshed (or
        taken again if it was lost); held by someone else meanwhile: the claim is handed
        back, the attempt refunded, the run deferred (``LockContended``)."""
        try:
            kept = self.connections.transact(lambda c: pg_locks.hold_on_txn(c, claim, ttl))
            assert kept is not None
            return kept
        except pg_locks.Contended as exc:
            timeout = self.dispatch_timeout
            self.connections.once(
                lambda c: pg_locks.unclaim_txn(c, claim, delay=backoff, dispatch_timeout=timeout)
            )
            return rec.LockContended(exc.key, exc.holder, backoff)

    # -- locks.hold ------------------------------------------------------------------------

    def acquire_lock(self, key: str, *, holder: str, ttl: float) -> rec.HeldLock:
        """Take ``key`` for ``holder`` for ``ttl`` seconds; ``LockHeld`` if it is held."""
        found = self.connections.once(lambda c: pg_locks.acquire_txn(c, key, holder, ttl))
        if isinstance(found, rec.HeldLock):
            return found
        raise errors.LockHeld(key, found[0], found[1])

    def refresh_lock(self, key: str, token: str, *, ttl: float) -> bool:
        """Extend a lock ``locks.hold`` took; False if it is no longer its own."""
        return self.connections.with_retry(lambda c: pg_locks.refresh_txn(c, key, token, ttl))

    def release_lock(self, key: str, token: str) -> bool:
        """Free a lock ``locks.hold`` took; False if it was no longer its own."""
        return self.connections.with_retry(lambda c: pg_locks.release_txn(c, key, token))

    # -- operators and the sweeper --------------------------------------------------------

    def sweep_locks(self, *, limit: int = 1000) -> list[rec.LockFreed]:
        """Free every expired lock, each with an ``expired`` audit row; once per lock
        under two sweepers."""
        return self.connections.once(lambda c: pg_locks.sweep_txn(c, limit=limit))

    def force_release(self, key: str, *, actor: str, reason: str) -> rec.LockFreed:
        """Free ``key`` whoever holds it, with a ``forced`` audit row; its holder's next
        guarded commit is refused. ``LockNotFound`` if nobody holds it."""
        freed = self.connections.once(
            lambda c: pg_locks.force_txn(c, key, actor=actor, reason=reason)
        )
        if freed is None:
            raise errors.LockNotFound(key)
        return freed

    def list_locks(self, *, limit: int = 1000) -> list[rec.LockRecord]:
        return self.connections.with_retry(lambda c: pg_locks.list_txn(c, limit=limit))

    def lock_audit(self, key: str | None = None, *, limit: int = 100) -> list[rec.LockAudit]:
        """The newest audit rows first (of ``key``, or of every lock)."""
        return self.connections.with_retry(lambda c: pg_locks.audit_txn(c, key, limit=limit))
