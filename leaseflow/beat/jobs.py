"""The beat jobs as plain functions over a store; they return what must be published.

Each job's writes are short statements that lock the rows they act on with
``FOR UPDATE SKIP LOCKED`` and re-check them, so two beat processes (two schedulers
sending every job twice) still act once per expired lease, overdue run or probe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

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


#: A message leaves a moment after the commit that made it due; a probe sent within
#: this slack of a run's last publish does not count as having overtaken it.
PUBLISH_SLACK = timedelta(seconds=1)


@dataclass(frozen=True)
class Probe:
    """A probe message to send through ``queue``: the worker that consumes it records
    ``sent_at`` as the queue's mark (everything published before it was delivered)."""

    queue: str
    sent_at: datetime


@dataclass
class Overdue:
    """What the dispatcher must publish: lost messages again, and probes."""

    dispatches: list[Dispatch] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)


def dispatch_overdue(
    store: PostgresStore,
    queue_of: Callable[[str, str], str],
    *,
    limit: int = 1000,
    probe: bool = True,
) -> Overdue:
    """Pending runs and branches whose message is overdue: lost after the commit, or by
    the broker, or only waiting behind a backlog.

    Only a message published before a probe that has come through its queue (queues
    are FIFO) is gone; re-publishing the others would queue a copy behind the same
    backlog, to be re-published again. For the rest, a probe is sent, one per queue
    at a time (none with ``probe=False``: the arriving probe's own call, which
    re-publishes what it has just shown lost without waiting for the next beat).
    ``queue_of(workflow, state)`` names a state's queue.
    """
    runs = store.overdue_runs(limit=limit)
    branches = store.overdue_branches(limit=limit)
    queues = {row[1:3]: queue_of(*row[1:3]) for row in runs}
    queues.update({row[2:4]: queue_of(*row[2:4]) for row in branches})
    marks = store.queue_marks(sorted(set(queues.values())))
    unproven: set[str] = set()

    def gone(workflow: str, state: str, published_by: datetime) -> bool:
        queue = queues[workflow, state]
        passed = marks.get(queue)
        if passed is not None and published_by < passed - PUBLISH_SLACK:
            return True
        unproven.add(queue)
        return False

    out = Overdue()
    lost_runs = [run_id for run_id, wf, state, by in runs if gone(wf, state, by)]
    for row in store.redispatch_runs(lost_runs):
        metrics.REDISPATCHED.inc()
        logs.event(
            "run_redispatched", 20, run_id=row.run_id, state=row.state, step_seq=row.step_seq
        )
        out.dispatches.append(
            Dispatch(row.run_id, row.workflow, row.state, row.step_seq, row.countdown)
        )
    lost_branches = [(g, i) for g, i, wf, state, by in branches if gone(wf, state, by)]
    for run_id, group_id, idx, workflow, state, wait in store.redispatch_branches(lost_branches):
        metrics.REDISPATCHED.inc()
        logs.event(
            "branch_redispatched", 20, run_id=run_id, group_id=group_id, branch=idx, state=state
        )
        out.dispatches.append(Dispatch(run_id, workflow, state, 0, wait, branch=(group_id, idx)))
    for queue in sorted(unproven) if probe else ():
        sent_at = store.send_probe(queue)
        if sent_at is not None:
            metrics.QUEUE_PROBES.inc()
            logs.event("queue_probe_sent", 20, queue=queue)
            out.probes.append(Probe(queue, sent_at))
    return out
