"""The beat jobs as plain functions over a store; they return what must be published.

Each job's writes are short statements that lock the rows they act on with
``FOR UPDATE SKIP LOCKED`` and re-check them, so two beat processes (two schedulers
sending every job twice) still act once per expired lease, overdue run or probe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from leaseflow import errors, logs, messages, metrics, observe, runner
from leaseflow.fsm import rules
from leaseflow.store import base, purge_records, records


def reap_dead_workers(store: base.RunStore, *, self_id: str, after: float) -> list[str]:
    """Workers that stopped checking in ``after`` seconds ago are dead: their leases
    expire now, so the reaper (run right after) hands their runs on at once, each
    attempt counted as a crash. Never the worker running this job (``self_id``)."""
    dead = store.reap_dead_workers(self_id=self_id, after=after)
    for worker in dead:
        metrics.WORKERS_REAPED.inc()
        logs.warning("worker_dead", worker=worker, silent_for=after)
    return dead


def reap(store: base.RunStore, *, limit: int = 1000) -> list[messages.Message]:
    """Expired leases: back to pending while attempts remain (re-published), else failed."""
    out: list[messages.Message] = []
    for row in store.reap(limit=limit):
        metrics.REAPED.labels(row.status).inc()
        observe.ended_by_beat(row, "lease_expired")
        failed = row.status == "failed"  # no attempt left: the run fails E-LEASE-EXPIRED
        (logs.error if failed else logs.warning)(
            "lease_reaped",
            run_id=row.run_id,
            state=row.state,
            step_seq=row.step_seq - 1,
            workflow=row.workflow,
            attempt=row.attempt,
            lease_owner=row.lease_owner,
            result="requeued" if row.status == "pending" else row.status,
            error_code=errors.LEASE_EXPIRED if failed else None,
        )
        if row.status == "pending":
            out.append(
                messages.StateStep(
                    row.run_id,
                    row.workflow,
                    row.state,
                    row.step_seq,
                    priority=row.priority,
                    version=row.version,
                )
            )
    out.extend(reap_branches(store, limit=limit))
    return out


def reap_branches(store: base.RunStore, *, limit: int = 1000) -> list[messages.Message]:
    """Expired branch leases: retried while attempts remain, else the branch fails
    (and its group's policy decides: fail the run, or count it toward the join).

    Each branch is finished by a commit fenced with its expired token, so two
    reapers finish it once.
    """
    out: list[messages.Message] = []
    for b in store.expired_branches(limit=limit):
        decision = rules.reap_branch(b.attempt, b.max_attempts, b.lease_owner)
        done = store.commit_branch(b.group_id, b.idx, b.lease_token, decision, expired=True)
        if done is None:
            continue  # another reaper got it, or its owner committed just in time
        retry = decision.status == "retry"
        metrics.REAPED.labels("pending" if retry else "failed").inc()
        logs.warning(
            "branch_reaped",
            run_id=done.run_id,
            state=b.state,
            group_id=b.group_id,
            branch=b.idx,
            workflow=b.workflow,
            lease_token=b.lease_token,
            attempt=b.attempt,
            lease_owner=b.lease_owner,
            result="requeued" if retry else "failed",
        )
        if done.parent_failed:
            metrics.RUNS_FINISHED.labels(b.workflow, "failed").inc()
            logs.error(
                "run_failed",
                run_id=done.run_id,
                state=b.state,
                group_id=b.group_id,
                branch=b.idx,
                workflow=b.workflow,
                error_code=errors.BRANCH_FAILED,
                error=rules.error_line(decision.error),
            )
        out.extend(
            runner.branch_messages(
                b.workflow, done, b.group_id, b.idx, priority=b.priority, version=b.version
            )
        )
    return out


def _ended(row: records.WaitEnded) -> dict[str, Any]:
    """The ids of a run the timeout sweeper moved (its state and step now)."""
    return {
        "run_id": row.run_id,
        "state": row.state,
        "step_seq": row.step_seq,
        "workflow": row.workflow,
    }


def sweep_timeouts(store: base.RunStore, *, limit: int = 1000) -> list[messages.Message]:
    """Runs past their deadline end ``timed_out``; waits past theirs move to
    ``on_timeout`` (a timer to ``next``: published) or fail ``E-WAIT-TIMEOUT``.

    Judged by the store's clock alone. Deadlines first: a waiting run past both its
    deadline and its wait's ends ``timed_out``."""
    out: list[messages.Message] = []
    for row in store.sweep_deadlines(limit=limit):
        observe.ended_by_beat(row, "timed_out")
        logs.warning("run_timed_out", **_ended(row), error_code=row.error_code)
    for row in store.sweep_waits(limit=limit):
        observe.ended_by_beat(row, "wait_timeout")
        if row.status != "pending":
            logs.error("run_failed", **_ended(row), error_code=row.error_code)
            continue
        logs.info(
            "wait_timed_out",
            run_id=row.run_id,
            next_state=row.state,
            step_seq=row.step_seq,
            workflow=row.workflow,
        )
        out.append(
            messages.StateStep(
                row.run_id,
                row.workflow,
                row.state,
                row.step_seq,
                priority=row.priority,
                version=row.version,
            )
        )
    return out


def sweep_locks(store: base.RunStore, *, limit: int = 1000) -> int:
    """Free the locks whose lease expired (their holder died, paused, or stopped
    refreshing), each audited in ``lf_lock_audit``; returns how many."""
    freed = store.sweep_locks(limit=limit)
    for row in freed:
        metrics.LOCKS_SWEPT.inc()
        logs.warning(
            "lock_swept",
            key=row.key,
            fence=row.fence,
            holder=row.holder,
            run_id=row.holder_run,
        )
    return len(freed)


#: The most runs one retention tick deletes, so that a tick never runs long; a backlog
#: is worked off over the next ticks.
RETENTION_MAX_RUNS = 10_000
#: Runs per batch (one short transaction each).
RETENTION_BATCH = 500


def purge_finished(
    store: base.RunStore,
    *,
    older_than: float,
    max_runs: int = RETENTION_MAX_RUNS,
    batch: int = RETENTION_BATCH,
) -> purge_records.Purged:
    """Retention: delete runs finished more than ``older_than`` seconds ago with their
    rows, in batches, at most ``max_runs`` per call; logs what it deleted. Two beats at
    once delete each run once."""
    done = store.purge_runs(
        older_than=older_than, batch=batch, max_runs=max_runs, pause=purge_records.PAUSE
    )
    if done.runs:
        logs.info("runs_purged", older_than=older_than, **done.counts())
    return done


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

    wakeups: list[messages.Message] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)


def dispatch_overdue(
    store: base.RunStore,
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
    states = {(r.workflow, r.state) for r in runs} | {(b.workflow, b.state) for b in branches}
    queues = {(workflow, state): queue_of(workflow, state) for workflow, state in states}
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
    lost_runs = [r.run_id for r in runs if gone(r.workflow, r.state, r.published_by)]
    for row in store.redispatch_runs(lost_runs):
        metrics.REDISPATCHED.inc()
        logs.info(
            "run_redispatched",
            run_id=row.run_id,
            state=row.state,
            step_seq=row.step_seq,
            workflow=row.workflow,
        )
        out.wakeups.append(row.wakeup())
    lost_branches = [
        (b.group_id, b.idx) for b in branches if gone(b.workflow, b.state, b.published_by)
    ]
    for due in store.redispatch_branches(lost_branches):
        metrics.REDISPATCHED.inc()
        logs.info(
            "branch_redispatched",
            run_id=due.run_id,
            group_id=due.group_id,
            branch=due.idx,
            state=due.state,
            workflow=due.workflow,
        )
        out.wakeups.append(due.wakeup())
    for queue in sorted(unproven) if probe else ():
        sent_at = store.send_probe(queue)
        if sent_at is not None:
            metrics.QUEUE_PROBES.inc()
            logs.info("queue_probe_sent", queue=queue)
            out.probes.append(Probe(queue, sent_at))
    return out
