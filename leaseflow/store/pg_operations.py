"""``PostgresStore``'s operations on a run from outside its lease, and the timeout
sweeper: one short transaction each, holding the run's row (see ``pg_control``)."""

from __future__ import annotations

from typing import Any

import psycopg

from leaseflow.store import connections, pg_control
from leaseflow.store import records as rec


class Operations:
    """Signals, cancels, re-drives and the timeout sweeper of ``PostgresStore``."""

    connections: connections.Connections
    dispatch_timeout: float

    def signal(self, run_id: str, event: str, payload: Any, *, signal_id: str) -> rec.Signalled:
        """Store a signal (once per ``signal_id``) and resume the run if it waits for
        ``event``; ``RunNotFound``, or ``RunFinished`` for a finished run. Retried on a
        broken connection: a second delivery of the same ``signal_id`` is a duplicate."""
        timeout = self.dispatch_timeout

        def txn(conn: psycopg.Connection[Any]) -> rec.Signalled:
            return pg_control.signal_txn(
                conn, run_id, event, payload, signal_id, dispatch_timeout=timeout
            )

        found = self.connections.transact(txn, retry=True)
        assert found is not None
        return found

    def cancel(self, run_id: str, reason: str | None = None) -> rec.CancelResult:
        """Cancel a pending or waiting run at once; ask a running one to stop."""
        found = self.connections.transact(
            lambda c: pg_control.cancel_txn(c, run_id, reason), retry=True
        )
        assert found is not None
        return found

    def redrive(
        self,
        run_id: str,
        *,
        from_state: str | None = None,
        max_attempts: int | None = None,
        run_timeout: float | None = None,
    ) -> rec.Due:
        """A failed, cancelled or timed-out run back to pending (see ``RunStore``)."""
        timeout = self.dispatch_timeout

        def txn(conn: psycopg.Connection[Any]) -> rec.Due:
            return pg_control.redrive_txn(
                conn,
                run_id,
                from_state=from_state,
                max_attempts=max_attempts,
                run_timeout=run_timeout,
                dispatch_timeout=timeout,
            )

        found = self.connections.transact(txn)
        assert found is not None
        return found

    def sweep_waits(self, *, limit: int = 1000) -> list[rec.WaitEnded]:
        timeout = self.dispatch_timeout
        found = self.connections.transact(
            lambda c: pg_control.sweep_waits_txn(c, limit=limit, dispatch_timeout=timeout)
        )
        return found or []

    def sweep_deadlines(self, *, limit: int = 1000) -> list[rec.WaitEnded]:
        found = self.connections.transact(lambda c: pg_control.sweep_deadlines_txn(c, limit=limit))
        return found or []
