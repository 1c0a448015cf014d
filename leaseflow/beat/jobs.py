"""The beat jobs as plain functions over a store; they return what must be published.

Each job is one short statement that locks the rows it acts on with
``FOR UPDATE SKIP LOCKED``, so two beat processes (two schedulers sending every
job twice) still act once per expired lease or overdue run.
"""

from __future__ import annotations

from leaseflow import errors, logs, metrics
from leaseflow.runner import Dispatch, branch_dispatches
from leaseflow.store.postgres import PostgresStore
from leaseflow.store.records import BranchOutcome


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
    out.extend(reap_branches(store, limit=limit))
    return out


def reap_branches(store: PostgresStore, *, limit: int = 1000) -> list[Dispatch]:
    """Expired branch leases: retried while attempts remain, else the branch fails
    (and its group's policy decides: fail the run, or count it toward the join).

    Each branch is finished by a commit fenced with its expired token, so two
    reapers finish it once.
    """
    out: list[Dispatch] = []
    for (
        group_id,
        idx,
        token,
        owner,
        attempt,
        max_attempts,
        state,
        workflow,
    ) in store.expired_branches(limit=limit):
        retry = attempt < max_attempts
        reason = (
            f"{errors.LEASE_EXPIRED}: lease of {owner or 'unknown worker'} expired "
            f"on attempt {attempt} of {max_attempts}"
        )
        outcome = BranchOutcome(group_id, idx, token, "retry" if retry else "failed", error=reason)
        done = store.commit_branch(outcome, expired=True)
        if done is None:
            continue  # another reaper got it, or its owner committed just in time
        metrics.REAPED.labels("pending" if retry else "failed").inc()
        logs.event(
            "branch_reaped",
            30,
            run_id=done.run_id,
            state=state,
            group_id=group_id,
            branch=idx,
            attempt=attempt,
            lease_owner=owner,
            result="requeued" if retry else "failed",
        )
        out.extend(branch_dispatches(workflow, done, group_id, idx))
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
    for run_id, group_id, idx, workflow, state, wait in store.due_branches(limit=limit):
        metrics.REDISPATCHED.inc()
        logs.event(
            "branch_redispatched", 20, run_id=run_id, group_id=group_id, branch=idx, state=state
        )
        out.append(Dispatch(run_id, workflow, state, 0, wait, branch=(group_id, idx)))
    return out
