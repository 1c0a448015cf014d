"""What the engine reports once a claim or a commit has landed: metrics, then the
lifecycle hooks (``leaseflow.hooks``, queued: never run inside the commit).

The runner and beat's jobs call one function per event, so the counters stay equal
to the rows written: ``leaseflow_steps_total{outcome}`` to ``lf_steps`` by outcome,
``leaseflow_runs_finished_total{status}`` to the runs the engine ended.
"""

from __future__ import annotations

from leaseflow import errors, hooks, metrics
from leaseflow.fsm import rules
from leaseflow.store import records

_ENDED_CODES = {"cancelled": errors.CANCELLED, "timed_out": errors.RUN_TIMEOUT}


def claimed(claim: records.Claim | records.BranchClaim) -> None:
    """A claim succeeded: count it, a run's start, and how long the state waited."""
    metrics.CLAIMS.labels("claimed").inc()
    if not isinstance(claim, records.Claim):
        return
    if claim.step_seq == 1 and claim.attempt == 1:
        metrics.RUNS_STARTED.labels(claim.workflow).inc()
    if claim.due_at is not None:
        waited = max(0.0, (claim.started_at - claim.due_at).total_seconds())
        joined = claim.group_id is not None and claim.attempt == 1
        histogram = metrics.JOIN_LATENCY if joined else metrics.STATE_LATENCY
        histogram.labels(claim.workflow, claim.state).observe(waited)


def committed(claim: records.Claim, decision: rules.Transition, done: records.Committed) -> None:
    """A run's step committed (or found its run cancelled or timed out: ``ended``)."""
    outcome = done.ended or decision.outcome
    status = done.ended or decision.status
    finished = done.ended is not None or decision.terminal
    metrics.STEPS.labels(claim.workflow, claim.state, outcome).inc()
    if finished:
        metrics.RUNS_FINISHED.labels(claim.workflow, status).inc()
    if done.handoff is not None:
        metrics.CLAIMS.labels("inline").inc()
    code = decision.error_code if done.ended is None else _ENDED_CODES.get(done.ended)
    next_state = None if done.ended else (done.resumed or decision.next_state)
    kinds: tuple[hooks.Kind, ...] = ("transition", "run_finished") if finished else ("transition",)
    for kind in kinds:
        hooks.emit(
            kind,
            run_id=claim.run_id,
            workflow=claim.workflow,
            version=claim.version,
            state=claim.state,
            outcome=outcome,
            status=status,
            next_state=next_state,
            step_seq=claim.step_seq,
            error_code=code,
        )


def branch_committed(
    claim: records.BranchClaim, decision: rules.BranchDecision, done: records.BranchCommit
) -> None:
    """A branch attempt committed: its group may be done (its join due), or have
    failed its run."""
    metrics.BRANCHES.labels(claim.workflow, claim.state, decision.status).inc()
    if done.join is None and not done.parent_failed:
        return
    failed = done.parent_failed
    if failed:
        metrics.RUNS_FINISHED.labels(claim.workflow, "failed").inc()
    kinds: tuple[hooks.Kind, ...] = (
        ("group_finished", "run_finished") if failed else ("group_finished",)
    )
    for kind in kinds:
        hooks.emit(
            kind,
            run_id=claim.run_id,
            workflow=claim.workflow,
            version=claim.version,
            state=claim.state,
            outcome="failed" if failed else "joined",
            status="failed" if failed else "pending",
            next_state=None if done.join is None else done.join.state,
            error_code=errors.BRANCH_FAILED if failed else None,
            group_id=claim.group_id,
        )


def ended_by_beat(row: records.Reaped | records.WaitEnded, outcome: str) -> None:
    """Beat wrote a step row (``lease_expired``, ``timed_out``, ``wait_timeout``) and
    may have ended the run."""
    metrics.STEPS.labels(row.workflow, row.state, outcome).inc()
    if row.status in ("pending", "running", "waiting"):
        return
    metrics.RUNS_FINISHED.labels(row.workflow, row.status).inc()
    hooks.emit(
        "run_finished",
        run_id=row.run_id,
        workflow=row.workflow,
        version=row.version,
        state=row.state,
        outcome=outcome,
        status=row.status,
        error_code=row.error_code if isinstance(row, records.WaitEnded) else None,
    )
