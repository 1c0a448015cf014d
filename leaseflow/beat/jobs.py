"""The beat jobs as plain functions over a store; they return what must be published.

Each job is one short statement that locks the rows it acts on with
``FOR UPDATE SKIP LOCKED``, so two beat processes (two schedulers sending every
job twice) still act once per expired lease or overdue run.
"""

from __future__ import annotations

from leaseflow import logs, metrics
from leaseflow.runner import Dispatch
from leaseflow.store.postgres import PostgresStore


def reap(store: PostgresStore, *, limit: int = 1000) -> list[Dispatch]:
    """Expired leases: back to pending while attempts remain (re-published), else failed."""
    out: list[Dispatch] = []
    for row in store.reap(limit=limit):
        metrics.REAPED.labels(row.status).inc()
        logs.event(
            "lease_reaped",
            30,
            run_id=row.run_id,
            state=row.state,
            step_seq=row.step_seq - 1,
            attempt=row.attempt,
            lease_owner=row.lease_owner,
            result="requeued" if row.status == "pending" else "failed",
        )
        if row.status == "pending":
            out.append(Dispatch(row.run_id, row.workflow, row.state, row.step_seq))
    return out


def dispatch_overdue(store: PostgresStore, *, limit: int = 1000) -> list[Dispatch]:
    """Pending runs whose wake-up message is overdue (lost after commit, or by the broker)."""
    out: list[Dispatch] = []
    for row in store.due_for_dispatch(limit=limit):
        metrics.REDISPATCHED.inc()
        logs.event(
            "run_redispatched", 20, run_id=row.run_id, state=row.state, step_seq=row.step_seq
        )
        out.append(Dispatch(row.run_id, row.workflow, row.state, row.step_seq, row.countdown))
    return out
