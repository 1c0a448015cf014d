"""Executes one step of one run against the store. Knows nothing of Celery.

``Runner.run_step(run_id, step_seq)`` claims the run, runs the state function with
no transaction open, turns its outcome into a ``Transition`` and commits it fenced
by the lease token. It returns the ``Dispatch`` decisions the caller must publish.
"""

from __future__ import annotations

import contextlib
import random
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import pydantic
import pydantic_core

from leaseflow import errors, faults, logs, metrics
from leaseflow.fsm import checkpoint, registry
from leaseflow.fsm.definition import StateSpec, Workflow
from leaseflow.fsm.outcomes import Complete, Failed, Next
from leaseflow.heartbeat import LeaseKeeper
from leaseflow.store.postgres import PostgresStore
from leaseflow.store.records import Claim, InCommit, Transition
from leaseflow.types import StepOutcome


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Publish the wake-up message ``(run_id, step_seq)`` for ``state``."""

    run_id: str
    workflow: str
    state: str
    step_seq: int
    countdown: float = 0.0


@dataclass(frozen=True, slots=True)
class StepResult:
    """What happened to one message: ``result`` is a stable word for logs and tests."""

    result: str  # committed | lease_lost | skipped | deferred
    dispatch: tuple[Dispatch, ...] = ()
    outcome: str | None = None


D = TypeVar("D")


@dataclass
class StateContext(Generic[D]):
    """What a state function receives as ``ctx`` (``Context[MyModel]`` in annotations)."""

    data: D
    run_id: str
    state: str
    attempt: int
    input: dict[str, Any]
    fencing_token: str
    step_seq: int
    workflow: str
    _keeper: LeaseKeeper = field(repr=False)
    _in_commit: list[InCommit] = field(default_factory=list, repr=False)

    def heartbeat(self) -> None:
        """Extend this run's lease now; raises ``LeaseLost`` if another worker took it."""
        self._keeper.beat_now(self.fencing_token)

    def lease_lost(self) -> bool:
        """True once the heartbeat learnt that this lease is gone: stop early."""
        return self._keeper.lost(self.fencing_token)

    def cancel_requested(self) -> bool:
        return self._keeper.cancel_requested(self.fencing_token)

    def in_commit(self, fn: Callable[[Any], None]) -> None:
        """Run ``fn(conn)`` inside the transition's own transaction (psycopg connection).

        Its writes commit exactly when the transition does: never for a worker whose
        lease was lost, never for an attempt that raised.
        """
        self._in_commit.append(fn)


class Runner:
    """Runs steps for one worker process."""

    def __init__(
        self,
        store: PostgresStore,
        keeper: LeaseKeeper,
        *,
        worker: str,
        ttl: float,
        max_checkpoint_bytes: int,
        compress_min_bytes: int = 256,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.keeper = keeper
        self.worker = worker
        self.ttl = ttl
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self.compress_min_bytes = compress_min_bytes
        self.rand = rand

    # -- the step -------------------------------------------------------------------

    def run_step(self, run_id: str, step_seq: int) -> StepResult:
        started = time.perf_counter()
        claim = self.store.claim(run_id, step_seq, owner=self.worker, ttl=self.ttl)
        metrics.CLAIM_SECONDS.observe(time.perf_counter() - started)
        if claim is None:
            return self._explain_miss(run_id, step_seq)
        metrics.CLAIMS.labels("claimed").inc()
        faults.point("after_claim", run_id=run_id, state=claim.state, step_seq=step_seq)

        try:
            wf = registry.get(claim.workflow, claim.version)
            spec = wf.states[claim.state]
        except (errors.UnknownWorkflow, KeyError):
            return self._fail(
                claim,
                errors.UNKNOWN_STATE,
                f"state {claim.state!r} of workflow {claim.workflow!r} v{claim.version} "
                "is not registered in this worker",
            )
        try:
            data = self._load_context(wf, claim)
        except errors.CheckpointError as exc:
            return self._fail(claim, exc.code, exc.detail)
        except pydantic.ValidationError as exc:
            return self._fail(claim, errors.CONTEXT_INVALID, str(exc))

        ctx: StateContext[Any] = StateContext(
            data=data,
            run_id=run_id,
            state=claim.state,
            attempt=claim.attempt,
            input=claim.input,
            fencing_token=claim.lease_token,
            step_seq=claim.step_seq,
            workflow=wf.name,
            _keeper=self.keeper,
        )
        self.keeper.hold(run_id, claim.lease_token, timeout=spec.timeout)
        try:
            return self._execute(wf, spec, claim, ctx)
        finally:
            self.keeper.release(claim.lease_token)

    def _execute(
        self, wf: Workflow, spec: StateSpec, claim: Claim, ctx: StateContext[Any]
    ) -> StepResult:
        t0 = time.perf_counter()
        try:
            outcome = spec.fn(ctx)
        except Exception as exc:
            metrics.STEP_SECONDS.labels(wf.name, spec.name).observe(time.perf_counter() - t0)
            return self._commit(claim, self._on_error(wf, spec, claim, exc))
        metrics.STEP_SECONDS.labels(wf.name, spec.name).observe(time.perf_counter() - t0)
        transition, accepted = self._on_outcome(wf, spec, claim, ctx, outcome)
        try:
            return self._commit(claim, transition, ctx._in_commit if accepted else ())
        except errors.InCommitError as exc:  # rolled back with the transition
            cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            return self._commit(claim, self._on_error(wf, spec, claim, cause))

    # -- outcome -> transition ------------------------------------------------------

    def _base(self, claim: Claim, **changes: Any) -> Transition:
        return Transition(
            run_id=claim.run_id,
            lease_token=claim.lease_token,
            state=claim.state,
            step_seq=claim.step_seq,
            step_attempt=claim.attempt,
            started_at=claim.started_at,
            worker=self.worker,
            **changes,
        )

    def _failure(
        self, claim: Claim, code: str | None, reason: str, step_error: str | None = None
    ) -> Transition:
        return self._base(
            claim,
            outcome=StepOutcome.FAILED,
            status="failed",
            attempt=claim.attempt,
            max_attempts=claim.max_attempts,
            error_code=code,
            error=reason,
            step_error=step_error or f"{code}: {reason}",
        )

    def _on_error(self, wf: Workflow, spec: StateSpec, claim: Claim, exc: Exception) -> Transition:
        trace = "".join(traceback.format_exception(exc))
        decision = spec.retry.decide(claim.attempt, exc, self.rand())
        if decision.retry:
            return self._base(
                claim,
                outcome=StepOutcome.RETRY,
                status="pending",
                attempt=claim.attempt,
                max_attempts=claim.max_attempts,
                delay=decision.delay,
                step_error=trace,
            )
        if spec.on_error is not None:
            target = wf.states[spec.on_error]
            return self._base(
                claim,
                outcome=StepOutcome.NEXT,
                status="pending",
                next_state=target.name,
                attempt=0,
                max_attempts=target.retry.max_attempts,
                step_error=trace,
            )
        reason = (
            f"{type(exc).__name__}: {exc} (attempt {claim.attempt} of {spec.retry.max_attempts})"
        )
        return self._failure(claim, errors.STATE_ERROR, reason, trace)

    def _on_outcome(
        self, wf: Workflow, spec: StateSpec, claim: Claim, ctx: StateContext[Any], outcome: object
    ) -> tuple[Transition, bool]:
        """The transition for a returned outcome, and whether the engine accepted it
        (an accepted outcome commits the state's ``in_commit`` writes with it)."""
        if isinstance(outcome, str):
            outcome = Next(outcome)
        if isinstance(outcome, Failed):
            return self._failure(claim, outcome.code, outcome.reason), True
        if isinstance(outcome, Complete):
            try:
                checkpoint.dumps(outcome.output, what="output", limit=self.max_checkpoint_bytes)
            except errors.PayloadTooLarge as exc:
                return self._failure(claim, errors.PAYLOAD_TOO_LARGE, str(exc)), False
            except (TypeError, ValueError) as exc:
                reason = f"output is not JSON: {exc}"
                return self._failure(claim, errors.STATE_ERROR, reason), False
            return self._with_checkpoint(
                wf,
                claim,
                ctx,
                self._base(
                    claim,
                    outcome=StepOutcome.COMPLETED,
                    status="completed",
                    attempt=claim.attempt,
                    max_attempts=claim.max_attempts,
                    output=outcome.output,
                ),
            )
        if not isinstance(outcome, Next):
            reason = (
                f"state {spec.name!r} returned {outcome!r}; expected a state name, Next, "
                "Complete or Failed"
            )
            return self._failure(claim, errors.ILLEGAL_TRANSITION, reason), False
        if outcome.state not in spec.to:
            reason = (
                f"state {spec.name!r} returned {outcome.state!r}, which is not in its "
                f"to={list(spec.to)}"
            )
            return self._failure(claim, errors.ILLEGAL_TRANSITION, reason), False
        target = wf.states[outcome.state]
        return self._with_checkpoint(
            wf,
            claim,
            ctx,
            self._base(
                claim,
                outcome=StepOutcome.NEXT,
                status="pending",
                next_state=target.name,
                attempt=0,
                max_attempts=target.retry.max_attempts,
            ),
        )

    def _with_checkpoint(
        self, wf: Workflow, claim: Claim, ctx: StateContext[Any], tr: Transition
    ) -> tuple[Transition, bool]:
        """Attach the new checkpoint, or turn the transition into a failure."""
        try:
            dumped = ctx.data.model_dump(mode="json")
            blob = checkpoint.encode(
                dumped, limit=self.max_checkpoint_bytes, compress_min=self.compress_min_bytes
            )
        except errors.PayloadTooLarge as exc:
            return self._failure(claim, errors.PAYLOAD_TOO_LARGE, str(exc)), False
        except (TypeError, ValueError, pydantic_core.PydanticSerializationError) as exc:
            reason = f"context is not JSON: {exc}"
            return self._failure(claim, errors.CONTEXT_INVALID, reason), False
        if blob == claim.checkpoint:
            return tr, True  # unchanged: the commit keeps the stored bytes
        return replace(tr, checkpoint=blob, context_version=wf.context_version), True

    def _load_context(self, wf: Workflow, claim: Claim) -> Any:
        if claim.context_version > wf.context_version:
            raise errors.CheckpointError(
                errors.CHECKPOINT_CORRUPT,
                f"checkpoint has context version {claim.context_version}, newer than "
                f"this worker's {wf.context_version}",
            )
        if claim.context_version < wf.context_version:
            raise errors.CheckpointError(
                errors.CHECKPOINT_STALE,
                f"checkpoint has context version {claim.context_version}, older than "
                f"{wf.context_version}, and no upcaster is registered",
            )
        return wf.context.model_validate(checkpoint.decode(claim.checkpoint))

    # -- writing --------------------------------------------------------------------

    def _fail(self, claim: Claim, code: str, reason: str) -> StepResult:
        return self._commit(claim, self._failure(claim, code, reason))

    def _commit(
        self, claim: Claim, tr: Transition, callbacks: Sequence[InCommit] = ()
    ) -> StepResult:
        faults.point("before_commit", run_id=tr.run_id, state=tr.state, step_seq=tr.step_seq)
        if not self.store.commit(tr, callbacks):
            metrics.LEASES_LOST.inc()
            logs.event(
                "lease_lost",
                30,
                run_id=tr.run_id,
                state=tr.state,
                step_seq=tr.step_seq,
                lease_token=tr.lease_token,
                worker=self.worker,
            )
            with contextlib.suppress(errors.StoreUnavailable):
                self.store.count_lease_lost(self.worker)
            return StepResult("lease_lost")
        metrics.STEPS.labels(tr.outcome).inc()
        logs.event(
            "step_committed",
            10,
            run_id=tr.run_id,
            state=tr.state,
            step_seq=tr.step_seq,
            outcome=tr.outcome,
            next_state=tr.next_state,
            error_code=tr.error_code,
        )
        faults.point(
            "after_commit_before_enqueue", run_id=tr.run_id, state=tr.state, step_seq=tr.step_seq
        )
        if tr.status != "pending":
            if tr.terminal:
                logs.event(
                    "run_finished",
                    20,
                    run_id=tr.run_id,
                    status=tr.status,
                    error_code=tr.error_code,
                )
            return StepResult("committed", outcome=tr.outcome)
        return StepResult(
            "committed",
            dispatch=(
                Dispatch(
                    run_id=tr.run_id,
                    workflow=claim.workflow,
                    state=tr.next_state or tr.state,
                    step_seq=tr.step_seq + 1,
                    countdown=tr.delay,
                ),
            ),
            outcome=tr.outcome,
        )

    def _explain_miss(self, run_id: str, step_seq: int) -> StepResult:
        """The claim found nothing: a duplicate, a stale message, or one that came early."""
        peek = self.store.peek(run_id)
        if peek is not None and peek.status == "pending" and peek.step_seq == step_seq:
            # Our step, not yet due when the claim ran (a retry's backoff, or the
            # message outran not_before): publish it again for when it is due.
            metrics.CLAIMS.labels("deferred").inc()
            return StepResult(
                "deferred",
                dispatch=(
                    Dispatch(run_id, peek.workflow, peek.state, step_seq, peek.wait_seconds),
                ),
            )
        metrics.CLAIMS.labels("idle").inc()
        logs.event(
            "claim_skipped",
            10,
            run_id=run_id,
            step_seq=step_seq,
            status=peek.status if peek else "missing",
            current_seq=peek.step_seq if peek else None,
        )
        return StepResult("skipped")
