"""How a step is claimed: plainly, or with its state's resource lock in the claim's
transaction; and why a claim found nothing (a duplicate, an early or stale message, a
run of another version, a lock held elsewhere), with the message to publish again."""

from __future__ import annotations

from collections.abc import Sequence

import pydantic

from leaseflow import errors, logs, messages, metrics
from leaseflow.fsm import locks, registry, rules
from leaseflow.messages import StepResult
from leaseflow.store import base, records

#: Seconds a run whose lock is held elsewhere waits before it is tried again.
LOCK_BACKOFF = 0.5


def versions_of(workflow: str | None) -> list[int] | None:
    """The versions of ``workflow`` this process declares, to claim only runs of those;
    None (claim any) when it declares none: the state then fails ``E-UNKNOWN-STATE``."""
    return (registry.versions(workflow) or None) if workflow is not None else None


def lock_templates(workflow: str | None, state: str | None) -> bool:
    """Does ``state`` of ``workflow`` declare ``lock=`` in any version this process has?"""
    if workflow is None or state is None:
        return False
    for version in registry.versions(workflow):
        spec = registry.get(workflow, version).states.get(state)
        if spec is not None and spec.lock is not None:
            return True
    return False


def lock_want(claim: records.Claim) -> records.LockWant | None:
    """The lock the claimed state needs (its key formatted from the run's context), or
    why it cannot have one; None when the state takes no lock."""
    try:
        wf = registry.get(claim.workflow, claim.version)
    except errors.UnknownWorkflow:
        return None
    spec = wf.states.get(claim.state)
    if spec is None or spec.lock is None:
        return None
    try:
        data = rules.load_context(wf, claim.checkpoint, claim.context_version)
        key = locks.key(spec.lock, data)
    except (errors.LeaseflowError, pydantic.ValidationError) as exc:
        return records.LockWant(None, error=str(exc))
    if claim.holds_lock and claim.lock_key != key:
        return records.LockWant(
            None,
            error=(
                f"the run holds lock {claim.lock_key!r} (until state {claim.lock_until!r}) and "
                f"state {claim.state!r} needs {key!r}: a run holds one lock at a time"
            ),
        )
    return records.LockWant(key, spec.hold_lock_until)


def claim_step(
    store: base.RunStore,
    run_id: str,
    step_seq: int,
    *,
    owner: str,
    ttl: float,
    workflow: str | None,
    state: str | None,
) -> records.Claim | records.LockContended | None:
    """Claim the step: with its lock when the state declares one (the claim and the lock
    in one transaction); a run holding a lock across states keeps it (or takes it
    again). ``LockContended``: held elsewhere, nothing claimed, the run deferred."""
    metrics.CLAIM_ATTEMPTS.inc()
    versions = versions_of(workflow)
    if lock_templates(workflow, state):
        found = store.claim_locked(
            run_id,
            step_seq,
            owner=owner,
            ttl=ttl,
            versions=versions,
            key_of=lock_want,
            backoff=LOCK_BACKOFF,
        )
    else:
        found = store.claim(run_id, step_seq, owner=owner, ttl=ttl, versions=versions)
    if isinstance(found, records.Claim) and found.holds_lock and found.lock_fence is None:
        found = store.hold_on(found, ttl=ttl, backoff=LOCK_BACKOFF)
    return found


def contended(
    store: base.RunStore,
    run_id: str,
    step_seq: int,
    busy: records.LockContended,
    *,
    workflow: str | None = None,
    state: str | None = None,
) -> StepResult:
    """The step's lock is held elsewhere: count it, and publish the step again for when
    the run is due (no attempt was spent)."""
    metrics.CLAIMS.labels("lock_contended").inc()
    logs.info(
        "lock_contended",
        run_id=run_id,
        step_seq=step_seq,
        key=busy.key,
        holder=busy.holder,
        state=state,
        workflow=workflow,
    )
    return explain_miss(store, run_id, step_seq)


def explain_miss(
    store: base.RunStore, run_id: str, step_seq: int, versions: Sequence[int] | None = None
) -> StepResult:
    """The claim found nothing: a duplicate, a stale message, one that came early, a
    run of a version this worker lacks, or one past its deadline."""
    peek = store.peek(run_id)
    ours = peek is not None and peek.status == "pending" and peek.step_seq == step_seq
    if ours and peek is not None and versions is not None and peek.version not in versions:
        metrics.CLAIMS.labels("version_unknown").inc()
        logs.warning(
            "version_unknown",
            run_id=run_id,
            workflow=peek.workflow,
            version=peek.version,
            versions=",".join(map(str, versions)),
            hint="the run is left pending for a worker that declares its version",
            state=peek.state,
            step_seq=step_seq,
        )
        return StepResult("skipped")
    if ours and peek is not None and not peek.past_deadline:
        # Our step, not yet due when the claim ran (a retry's backoff, or the
        # message outran not_before): publish it again for when it is due.
        metrics.CLAIMS.labels("deferred").inc()
        again = messages.StateStep(
            run_id,
            peek.workflow,
            peek.state,
            step_seq,
            peek.wait_seconds,
            peek.priority,
            peek.version,
        )
        return StepResult("deferred", (again,))
    # Lost the race: another worker holds this very step (a duplicate message).
    raced = peek is not None and peek.status == "running" and peek.step_seq == step_seq
    metrics.CLAIMS.labels("lost_race" if raced else "idle").inc()
    logs.debug(
        "claim_skipped",
        run_id=run_id,
        step_seq=step_seq,
        status=peek.status if peek else "missing",
        current_seq=peek.step_seq if peek else None,
        current_state=peek.state if peek else None,
        workflow=peek.workflow if peek else None,
    )
    return StepResult("skipped")


def explain_branch_miss(store: base.RunStore, group_id: int, idx: int) -> StepResult:
    """The branch claim found nothing: a duplicate, or a retry not yet due."""
    peek = store.peek_branch(group_id, idx)
    if peek is not None and peek.status == "pending":
        metrics.CLAIMS.labels("deferred").inc()
        again = messages.BranchStep(
            peek.run_id, peek.workflow, peek.state, group_id, idx, peek.wait_seconds
        )  # without its priority: a branch retry's re-publish is rare
        return StepResult("deferred", (again,))
    raced = peek is not None and peek.status == "running"
    metrics.CLAIMS.labels("lost_race" if raced else "idle").inc()
    logs.debug(
        "claim_skipped",
        group_id=group_id,
        branch=idx,
        status=peek.status if peek else "missing",
        run_id=peek.run_id if peek else None,
        state=peek.state if peek else None,
        workflow=peek.workflow if peek else None,
    )
    return StepResult("skipped")
