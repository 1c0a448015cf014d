"""``PostgresStore``'s beat jobs: the reaper's and the dispatcher's statements, queue
probes. Writes are not retried: a lost reply is repaired by the next beat."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from leaseflow.store import connections, pg_beat
from leaseflow.store import records as rec


class BeatJobs:
    """The reaper and the dispatcher of ``PostgresStore``."""

    connections: connections.Connections
    dispatch_timeout: float

    def reap(self, *, limit: int = 1000) -> list[rec.Reaped]:
        timeout = self.dispatch_timeout
        return self.connections.once(
            lambda c: pg_beat.reap_txn(c, limit=limit, dispatch_timeout=timeout)
        )

    def expired_branches(self, *, limit: int = 1000) -> list[rec.ExpiredBranch]:
        return self.connections.with_retry(lambda c: pg_beat.expired_branches_txn(c, limit=limit))

    def overdue_runs(self, *, limit: int = 1000) -> list[rec.OverdueRun]:
        timeout = self.dispatch_timeout
        return self.connections.with_retry(
            lambda c: pg_beat.overdue_runs_txn(c, limit=limit, dispatch_timeout=timeout)
        )

    def overdue_branches(self, *, limit: int = 1000) -> list[rec.OverdueBranch]:
        timeout = self.dispatch_timeout
        return self.connections.with_retry(
            lambda c: pg_beat.overdue_branches_txn(c, limit=limit, dispatch_timeout=timeout)
        )

    def redispatch_runs(self, run_ids: Sequence[str]) -> list[rec.Due]:
        """Two dispatchers at once: each run goes to one of them."""
        if not run_ids:
            return []
        timeout = self.dispatch_timeout
        return self.connections.once(
            lambda c: pg_beat.redispatch_runs_txn(c, run_ids, dispatch_timeout=timeout)
        )

    def redispatch_branches(self, keys: Sequence[tuple[int, int]]) -> list[rec.DueBranch]:
        if not keys:
            return []
        timeout = self.dispatch_timeout
        return self.connections.once(
            lambda c: pg_beat.redispatch_branches_txn(c, keys, dispatch_timeout=timeout)
        )

    def queue_marks(self, queues: Sequence[str]) -> dict[str, datetime]:
        if not queues:
            return {}
        return self.connections.with_retry(lambda c: pg_beat.queue_marks_txn(c, queues))

    def send_probe(self, queue: str) -> datetime | None:
        timeout = self.dispatch_timeout
        return self.connections.once(
            lambda c: pg_beat.send_probe_txn(c, queue, dispatch_timeout=timeout)
        )

    def probe_passed(self, queue: str, sent_at: datetime) -> None:
        self.connections.with_retry(lambda c: pg_beat.probe_passed_txn(c, queue, sent_at))

    # -- the worker registry -----------------------------------------------------------

    def reap_dead_workers(self, *, self_id: str, after: float) -> list[str]:
        """Mark the workers that stopped checking in ``after`` seconds ago as dead (not
        ``self_id``, the one asking) and expire their leases now, for the reaper to hand
        them on at once; the dead ids. Once each under two beats."""

        def txn(conn: Any) -> list[str]:
            dead = pg_beat.mark_dead_txn(conn, self_id=self_id, after=after)
            if dead:
                pg_beat.expire_leases_of_txn(conn, dead)
            return dead

        return self.connections.transact(txn) or []

    def release_leases_of(self, owners: Sequence[str]) -> rec.Released:
        """Hand back the runs and branches leased by ``owners`` (a worker shutting down):
        pending again at once, attempt refunded, a ``released`` step logged."""
        if not owners:
            return rec.Released()
        timeout = self.dispatch_timeout
        found = self.connections.transact(
            lambda c: pg_beat.release_leases_of_txn(c, owners, dispatch_timeout=timeout)
        )
        return found or rec.Released()

    def forget_workers(self, ids: Sequence[str]) -> None:
        """Remove worker processes that stopped cleanly from the registry."""
        if ids:
            self.connections.with_retry(lambda c: pg_beat.forget_workers_txn(c, ids))

    def list_workers(self, *, limit: int = 1000) -> list[rec.WorkerRecord]:
        return self.connections.with_retry(lambda c: pg_beat.list_workers_txn(c, limit=limit))
