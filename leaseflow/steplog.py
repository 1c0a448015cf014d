"""The log lines of committed steps: what an operator must see in the worker log.

A retry or a handled error is a WARNING, a failed run an ERROR with its code and the
exception's last line, everything else DEBUG or INFO; every line carries the ids.
"""

from __future__ import annotations

from typing import Any

from leaseflow import errors, logs
from leaseflow.fsm import rules
from leaseflow.store import records


def ids(claim: records.Claim | records.BranchClaim) -> dict[str, Any]:
    """The ids every line about a claimed step carries (a branch: its group and index)."""
    if isinstance(claim, records.BranchClaim):
        where: dict[str, Any] = {"group_id": claim.group_id, "branch": claim.idx}
    else:
        where = {"step_seq": claim.step_seq}
    # workflow and lease_token last: the console text keeps its older prefix for greps
    return {
        "run_id": claim.run_id,
        "state": claim.state,
        **where,
        "workflow": claim.workflow,
        "lease_token": claim.lease_token,
    }


def committed(
    claim: records.Claim,
    decision: rules.Transition,
    *,
    inline: bool,
    resumed: str | None = None,
) -> None:
    """Log a committed step of a run."""
    where = ids(claim)
    logs.debug(
        "step_committed",
        **where,
        outcome=decision.outcome,
        next_state=decision.next_state,
        error_code=decision.error_code,
        inline=inline,
    )
    if decision.outcome == "retry" or (decision.moves and decision.step_error is not None):
        logs.warning(
            "state_retry" if decision.outcome == "retry" else "state_error_handled",
            **where,
            attempt=claim.attempt,
            max_attempts=claim.max_attempts,
            next_state=decision.next_state,
            delay=round(decision.delay, 3) if decision.delay else None,
            error=rules.error_line(decision.step_error),
        )
    if decision.wait is not None:
        wait = decision.wait
        logs.info(
            "run_resumed" if resumed else "run_waiting",
            **where,
            event=wait.event,
            timeout=wait.timeout,
            next_state=resumed,
        )
    if decision.terminal and decision.status == "failed":
        logs.error(
            "run_failed",
            **where,
            attempt=claim.attempt,
            error_code=decision.error_code,
            error=rules.error_line(decision.step_error or decision.error),
        )
    elif decision.terminal:
        logs.info(
            "run_finished",
            **where,
            status=decision.status,
            error_code=decision.error_code,
        )


def ended(claim: records.Claim, status: str) -> None:
    """The state's commit found its run cancelled, or past its deadline: it ended so."""
    logs.warning(
        "run_cancelled" if status == "cancelled" else "run_timed_out",
        **ids(claim),
        error_code=errors.CANCELLED if status == "cancelled" else errors.RUN_TIMEOUT,
    )


def branch_committed(
    claim: records.BranchClaim, decision: rules.BranchDecision, done: records.BranchCommit
) -> None:
    """Log a committed branch attempt (and the run it failed, if any)."""
    logs.debug(
        "branch_committed",
        **ids(claim),
        outcome=decision.status,
    )
    if decision.status != "completed":
        logs.warning(
            "branch_retry" if decision.status == "retry" else "branch_failed",
            **ids(claim),
            attempt=claim.attempt,
            error=rules.error_line(decision.error),
        )
    if done.parent_failed:
        logs.error(
            "run_failed",
            **ids(claim),
            error_code=errors.BRANCH_FAILED,
            error=rules.error_line(decision.error),
        )
