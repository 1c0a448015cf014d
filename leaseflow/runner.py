"""Executes one step of one run against the store. Knows nothing of Celery.

``Runner.run_step(run_id, step_seq)`` claims the run, runs the state function with
no transaction open, turns its outcome into a ``Transition`` and commits it fenced
by the lease token. It returns the ``Dispatch`` decisions the caller must publish.

Inline continuation: when the next state is declared ``inline=True`` (and the task's
budget allows), the commit itself hands the next state's lease to this worker and
the runner goes on with it in the same call: one statement per state, no broker hop.
"""

from __future__ import annotations

import contextlib
import random
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import pydantic
import pydantic_core

from leaseflow import errors, faults, logs, metrics
from leaseflow.fsm import checkpoint, registry
from leaseflow.fsm.definition import StateSpec, Workflow
from leaseflow.fsm.outcomes import BRANCH_ERROR_POLICIES, Complete, Failed, Map, Next, Parallel
from leaseflow.heartbeat import LeaseKeeper
from leaseflow.store.postgres import PostgresStore
from leaseflow.store.records import (
    BranchClaim,
    BranchCommit,
    BranchOutcome,
    Claim,
    Fork,
    InCommit,
    Transition,
)
from leaseflow.types import StepOutcome


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Publish the wake-up message ``(run_id, step_seq)`` for ``state``."""

    run_id: str
    workflow: str
    state: str
    step_seq: int
    countdown: float = 0.0
    branch: tuple[int, int] | None = None  # (group_id, idx): a branch message
    is_join: bool = False  # wakes a join that a chord body may wake too

    @property
    def args(self) -> tuple[Any, ...]:
        """The message arguments: ``(run_id, step_seq)``, or ``(group_id, idx)``."""
        return self.branch if self.branch is not None else (self.run_id, self.step_seq)

    @property
    def task_id(self) -> str:
        if self.branch is not None:
            return f"{self.run_id}:g{self.branch[0]}:{self.branch[1]}"
        return f"{self.run_id}:{self.step_seq}"


@dataclass(frozen=True, slots=True)
class ForkDispatch:
    """Publish the branches of a new group; ``join`` is the chord body (its wake-up)."""

    group_id: int
    branches: tuple[Dispatch, ...]
    join: Dispatch
    chord: bool  # the group may run as a Celery chord (all branches released at once)


@dataclass(frozen=True, slots=True)
class StepResult:
    """What happened to one message: ``result`` is a stable word for logs and tests."""

    result: str  # committed | lease_lost | skipped | deferred
    dispatch: tuple[Dispatch, ...] = ()
    outcome: str | None = None
    fork: ForkDispatch | None = None
    handoff: Claim | None = None  # inline continuation: the next state, leased to us
    inlined: int = 0  # states run inline after the first, in this call


@dataclass
class _InlineBudget:
    """How much inline continuation one task may still do."""

    queue: str | None  # the task's queue (its first state's)
    allowed: bool  # False when the first state has a time limit (it would cover all)
    states_left: int
    deadline: float  # time.monotonic()

    def take(self, wf: Workflow, tr: Transition) -> bool:
        """May ``tr``'s target run inline now? Spends one unit if so."""
        if not self.allowed or self.states_left <= 0 or time.monotonic() >= self.deadline:
            return False
        if tr.outcome != StepOutcome.NEXT or tr.status != "pending" or tr.delay:
            return False
        target = wf.states.get(tr.next_state or "")
        if target is None or not target.inline or target.timeout is not None:
            return False
        if target.queue != self.queue:
            return False
        self.states_left -= 1
        return True


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
    #: In a join: each branch's result in branch (item) order; None for a failed one.
    branch_results: list[Any] = field(default_factory=list)
    #: In a join: ``{index: error}`` of the branches that failed (``collect`` policy).
    branch_errors: dict[int, str] = field(default_factory=dict)
    #: In a map branch: the item and its index; in a parallel branch: its index.
    item: Any = None
    index: int | None = None

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
        inline_max_states: int = 100,
        inline_max_seconds: float = 2.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.keeper = keeper
        self.worker = worker
        self.ttl = ttl
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self.compress_min_bytes = compress_min_bytes
        self.inline_max_states = inline_max_states
        self.inline_max_seconds = inline_max_seconds
        self.rand = rand

    # -- the step -------------------------------------------------------------------

    def run_step(self, run_id: str, step_seq: int) -> StepResult:
        started = time.perf_counter()
        claim = self.store.claim(run_id, step_seq, owner=self.worker, ttl=self.ttl)
        metrics.CLAIM_SECONDS.observe(time.perf_counter() - started)
        if claim is None:
            return self._explain_miss(run_id, step_seq)
        metrics.CLAIMS.labels("claimed").inc()
        budget = self._budget(claim)
        inlined = 0
        while True:
            result = self._run_claimed(claim, budget)
            if result.handoff is None:
                return replace(result, inlined=inlined) if inlined else result
            claim = result.handoff
            inlined += 1

    def _budget(self, first: Claim) -> _InlineBudget:
        spec = None
        with contextlib.suppress(errors.UnknownWorkflow, KeyError):
            spec = registry.get(first.workflow, first.version).states[first.state]
        return _InlineBudget(
            queue=spec.queue if spec is not None else None,
            allowed=spec is not None and spec.timeout is None,
            states_left=self.inline_max_states,
            deadline=time.monotonic() + self.inline_max_seconds,
        )

    def _run_claimed(self, claim: Claim, budget: _InlineBudget | None) -> StepResult:
        """Run the state ``claim`` leased to us and commit its outcome."""
        run_id, step_seq = claim.run_id, claim.step_seq
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
            data = self._load_context(wf, claim.checkpoint, claim.context_version)
        except errors.CheckpointError as exc:
            return self._fail(claim, exc.code, exc.detail)
        except pydantic.ValidationError as exc:
            return self._fail(claim, errors.CONTEXT_INVALID, str(exc))
        results: list[Any] = []
        failures: dict[int, str] = {}
        if claim.group_id is not None:  # this state is the join of a group
            for branch in self.store.branch_results(claim.group_id):
                results.append(branch.result if branch.status == "completed" else None)
                if branch.status != "completed":
                    failures[branch.idx] = branch.error or branch.status

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
            branch_results=results,
            branch_errors=failures,
        )
        self.keeper.hold(run_id, claim.lease_token, timeout=spec.timeout)
        try:
            return self._execute(wf, spec, claim, ctx, budget)
        finally:
            self.keeper.release(claim.lease_token)

    def _execute(
        self,
        wf: Workflow,
        spec: StateSpec,
        claim: Claim,
        ctx: StateContext[Any],
        budget: _InlineBudget | None = None,
    ) -> StepResult:
        outcome, raised = _call(wf, spec, ctx)
        if raised is not None:
            return self._commit(claim, self._on_error(wf, spec, claim, raised))
        try:
            if isinstance(outcome, Parallel | Map):
                transition, fork = self._on_fork(wf, spec, claim, ctx, outcome)
                if fork is not None:
                    return self._commit_fork(claim, transition, fork, ctx._in_commit)
                return self._commit(claim, transition)
            transition, accepted = self._on_outcome(wf, spec, claim, ctx, outcome)
            handoff = budget is not None and budget.take(wf, transition)
            return self._commit(
                claim, transition, ctx._in_commit if accepted else (), handoff=handoff
            )
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

    def _on_fork(
        self,
        wf: Workflow,
        spec: StateSpec,
        claim: Claim,
        ctx: StateContext[Any],
        outcome: Parallel | Map,
    ) -> tuple[Transition, Fork | None]:
        """The fork of a Parallel or Map (or the failure that refuses it)."""
        illegal = errors.ILLEGAL_TRANSITION
        if outcome.join not in spec.to:
            reason = f"state {spec.name!r} forks to join {outcome.join!r}, not in its to="
            return self._failure(claim, illegal, reason), None
        if outcome.on_branch_error not in BRANCH_ERROR_POLICIES:
            reason = f"on_branch_error must be one of {BRANCH_ERROR_POLICIES}"
            return self._failure(claim, illegal, reason), None
        if isinstance(outcome, Parallel):
            names, items, kind, window = list(outcome.branches), None, "parallel", None
            if not names:
                return self._failure(claim, illegal, "Parallel needs at least one branch"), None
        else:
            items = list(outcome.items)
            names, kind, window = [outcome.branch] * len(items), "map", outcome.max_concurrency
            if window is not None and window < 1:
                return self._failure(claim, illegal, "Map.max_concurrency must be >= 1"), None
            try:
                checkpoint.dumps(items, what="map items", limit=self.max_checkpoint_bytes)
            except errors.PayloadTooLarge as exc:
                return self._failure(claim, errors.PAYLOAD_TOO_LARGE, str(exc)), None
            except (TypeError, ValueError) as exc:
                return self._failure(claim, errors.STATE_ERROR, f"items are not JSON: {exc}"), None
        for name in names:
            if name not in wf.states or not wf.states[name].branch:
                reason = f"{name!r} is not a branch state (declare it with branch=True)"
                return self._failure(claim, illegal, reason), None
        join = wf.states[outcome.join]
        if not names:  # an empty Map goes straight to its join
            move = self._base(
                claim,
                outcome=StepOutcome.NEXT,
                status="pending",
                next_state=join.name,
                attempt=0,
                max_attempts=join.retry.max_attempts,
            )
            return self._with_checkpoint(wf, claim, ctx, move)[0], None
        fork_step = self._base(
            claim,
            outcome=StepOutcome.FORK,
            status="waiting",
            attempt=0,
            max_attempts=join.retry.max_attempts,
        )
        fork_step, ok = self._with_checkpoint(wf, claim, ctx, fork_step)
        if not ok:
            return fork_step, None
        snapshot = fork_step.checkpoint if fork_step.checkpoint is not None else claim.checkpoint
        fork = Fork(
            kind=kind,
            join_state=join.name,
            states=tuple(names),
            max_attempts=tuple(wf.states[n].retry.max_attempts for n in names),
            items=tuple(items) if items is not None else None,
            on_branch_error=outcome.on_branch_error,
            max_concurrency=window,
            chord=window is None,
            join_max_attempts=join.retry.max_attempts,
            checkpoint=snapshot,
            context_version=wf.context_version,
        )
        return replace(fork_step, next_state=None), fork

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

    def _load_context(self, wf: Workflow, blob: bytes, version: int) -> Any:
        if version > wf.context_version:
            raise errors.CheckpointError(
                errors.CHECKPOINT_CORRUPT,
                f"checkpoint has context version {version}, newer than "
                f"this worker's {wf.context_version}",
            )
        if version < wf.context_version:
            raise errors.CheckpointError(
                errors.CHECKPOINT_STALE,
                f"checkpoint has context version {version}, older than "
                f"{wf.context_version}, and no upcaster is registered",
            )
        return wf.context.model_validate(checkpoint.decode(blob))

    # -- writing --------------------------------------------------------------------

    def _fail(self, claim: Claim, code: str, reason: str) -> StepResult:
        return self._commit(claim, self._failure(claim, code, reason))

    def _commit_fork(
        self, claim: Claim, tr: Transition, fork: Fork, callbacks: Sequence[InCommit]
    ) -> StepResult:
        faults.point("before_commit", run_id=tr.run_id, state=tr.state, step_seq=tr.step_seq)
        forked = self.store.commit_fork(tr, fork, callbacks)
        if forked is None:
            return self._lease_lost(tr.run_id, tr.state, tr.step_seq, tr.lease_token)
        group_id, join_seq = forked
        metrics.STEPS.labels(tr.outcome).inc()
        logs.event(
            "run_forked",
            20,
            run_id=tr.run_id,
            state=tr.state,
            step_seq=tr.step_seq,
            group_id=group_id,
            width=len(fork.states),
            join=fork.join_state,
        )
        faults.point(
            "after_commit_before_enqueue", run_id=tr.run_id, state=tr.state, step_seq=tr.step_seq
        )
        released = len(fork.states) if fork.max_concurrency is None else fork.max_concurrency
        branches = tuple(
            Dispatch(tr.run_id, claim.workflow, name, join_seq, branch=(group_id, idx))
            for idx, name in enumerate(fork.states[:released])
        )
        join = Dispatch(tr.run_id, claim.workflow, fork.join_state, join_seq, is_join=True)
        return StepResult(
            "committed",
            outcome=tr.outcome,
            fork=ForkDispatch(group_id, branches, join, chord=fork.chord),
        )

    def _lease_lost(self, run_id: str, state: str, step_seq: int | None, token: str) -> StepResult:
        metrics.LEASES_LOST.inc()
        logs.event(
            "lease_lost",
            30,
            run_id=run_id,
            state=state,
            step_seq=step_seq,
            lease_token=token,
            worker=self.worker,
        )
        with contextlib.suppress(errors.StoreUnavailable):
            self.store.count_lease_lost(self.worker)
        return StepResult("lease_lost")

    def _commit(
        self,
        claim: Claim,
        tr: Transition,
        callbacks: Sequence[InCommit] = (),
        *,
        handoff: bool = False,
    ) -> StepResult:
        faults.point("before_commit", run_id=tr.run_id, state=tr.state, step_seq=tr.step_seq)
        next_token = str(uuid.uuid4()) if handoff else ""
        next_started = None  # set when the commit handed the next state's lease to us
        if handoff:
            next_started = self.store.commit_handoff(
                tr, callbacks, next_token=next_token, ttl=self.ttl
            )
            landed = next_started is not None
        else:
            landed = self.store.commit(tr, callbacks)
        if not landed:
            return self._lease_lost(tr.run_id, tr.state, tr.step_seq, tr.lease_token)
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
            inline=handoff,
        )
        faults.point(
            "after_commit_before_enqueue", run_id=tr.run_id, state=tr.state, step_seq=tr.step_seq
        )
        if next_started is not None and tr.next_state is not None:
            metrics.CLAIMS.labels("inline").inc()
            return StepResult(
                "committed",
                outcome=tr.outcome,
                handoff=Claim(
                    run_id=tr.run_id,
                    workflow=claim.workflow,
                    version=claim.version,
                    state=tr.next_state,
                    step_seq=tr.step_seq + 1,
                    attempt=1,
                    max_attempts=tr.max_attempts,
                    lease_token=next_token,
                    started_at=next_started,
                    checkpoint=claim.checkpoint if tr.checkpoint is None else tr.checkpoint,
                    context_version=claim.context_version
                    if tr.context_version is None
                    else tr.context_version,
                    input=claim.input,
                ),
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

    # -- branches -------------------------------------------------------------------

    def run_branch(self, group_id: int, idx: int) -> StepResult:
        """Claim and run branch ``idx`` of group ``group_id``; commit its result."""
        claim = self.store.claim_branch(group_id, idx, owner=self.worker, ttl=self.ttl)
        if claim is None:
            return self._explain_branch_miss(group_id, idx)
        metrics.CLAIMS.labels("claimed").inc()
        faults.point("after_claim", run_id=claim.run_id, state=claim.state, branch=idx)
        try:
            wf = registry.get(claim.workflow, claim.version)
            spec = wf.states[claim.state]
            data = self._load_context(wf, claim.checkpoint, claim.context_version)
        except (errors.UnknownWorkflow, KeyError):
            reason = f"branch state {claim.state!r} is not registered in this worker"
            return self._finish_branch(claim, "failed", error=f"{errors.UNKNOWN_STATE}: {reason}")
        except errors.CheckpointError as exc:
            return self._finish_branch(claim, "failed", error=str(exc))
        except pydantic.ValidationError as exc:
            return self._finish_branch(claim, "failed", error=f"{errors.CONTEXT_INVALID}: {exc}")
        ctx: StateContext[Any] = StateContext(
            data=data,
            run_id=claim.run_id,
            state=claim.state,
            attempt=claim.attempt,
            input=claim.input,
            fencing_token=claim.lease_token,
            step_seq=0,
            workflow=wf.name,
            _keeper=self.keeper,
            item=claim.item,
            index=idx,
        )
        self.keeper.hold(
            claim.run_id, claim.lease_token, timeout=spec.timeout, branch=(group_id, idx)
        )
        try:
            return self._execute_branch(wf, spec, claim, ctx)
        finally:
            self.keeper.release(claim.lease_token)

    def _execute_branch(
        self, wf: Workflow, spec: StateSpec, claim: BranchClaim, ctx: StateContext[Any]
    ) -> StepResult:
        result, failure = _call(wf, spec, ctx)
        if failure is None:
            try:
                checkpoint.dumps(result, what="branch result", limit=self.max_checkpoint_bytes)
            except errors.PayloadTooLarge as exc:
                error = f"{errors.PAYLOAD_TOO_LARGE}: {exc}"
                return self._finish_branch(claim, "failed", error=error)
            except (TypeError, ValueError) as exc:
                return self._finish_branch(claim, "failed", error=f"result is not JSON: {exc}")
            try:
                return self._finish_branch(
                    claim, "completed", result=result, callbacks=ctx._in_commit
                )
            except errors.InCommitError as exc:  # rolled back with the branch's result
                failure = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
        decision = spec.retry.decide(claim.attempt, failure, self.rand())
        error = (
            f"{type(failure).__name__}: {failure} (attempt {claim.attempt} of {claim.max_attempts})"
        )
        if decision.retry:
            return self._finish_branch(claim, "retry", error=error, delay=decision.delay)
        return self._finish_branch(claim, "failed", error=error)

    def _finish_branch(
        self,
        claim: BranchClaim,
        status: str,
        *,
        result: Any = None,
        error: str | None = None,
        delay: float = 0.0,
        callbacks: Sequence[InCommit] = (),
    ) -> StepResult:
        faults.point("before_commit", run_id=claim.run_id, state=claim.state, branch=claim.idx)
        outcome = BranchOutcome(
            group_id=claim.group_id,
            idx=claim.idx,
            lease_token=claim.lease_token,
            status=status,
            result=result,
            error=error,
            delay=delay,
        )
        done = self.store.commit_branch(outcome, callbacks=callbacks)
        if done is None:
            return self._lease_lost(claim.run_id, claim.state, None, claim.lease_token)
        metrics.STEPS.labels(f"branch_{status}").inc()
        logs.event(
            "branch_committed",
            10,
            run_id=claim.run_id,
            state=claim.state,
            group_id=claim.group_id,
            branch=claim.idx,
            outcome=status,
        )
        faults.point(
            "after_commit_before_enqueue",
            run_id=claim.run_id,
            state=claim.state,
            branch=claim.idx,
        )
        return StepResult(
            "committed",
            dispatch=branch_dispatches(claim.workflow, done, claim.group_id, claim.idx, delay),
            outcome=status,
        )

    def _explain_branch_miss(self, group_id: int, idx: int) -> StepResult:
        peek = self.store.peek_branch(group_id, idx)
        if peek is not None and peek[0] == "pending":
            _, state, workflow, wait = peek
            metrics.CLAIMS.labels("deferred").inc()
            return StepResult(
                "deferred",
                dispatch=(Dispatch("", workflow, state, 0, wait, branch=(group_id, idx)),),
            )
        metrics.CLAIMS.labels("idle").inc()
        logs.event(
            "claim_skipped",
            10,
            group_id=group_id,
            branch=idx,
            status=peek[0] if peek else "missing",
        )
        return StepResult("skipped")

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


def _call(wf: Workflow, spec: StateSpec, ctx: StateContext[Any]) -> tuple[Any, Exception | None]:
    """Run the state function with no transaction open: ``(returned, None)`` or
    ``(None, exception)``; its duration goes to the step histogram either way."""
    t0 = time.perf_counter()
    try:
        return spec.fn(ctx), None
    except Exception as exc:
        return None, exc
    finally:
        metrics.STEP_SECONDS.labels(wf.name, spec.name).observe(time.perf_counter() - t0)


def branch_dispatches(
    workflow: str, done: BranchCommit, group_id: int, idx: int, delay: float = 0.0
) -> tuple[Dispatch, ...]:
    """The messages a branch commit calls for: its retry, released branches, the join."""
    out: list[Dispatch] = []
    if done.retry_state is not None:
        branch = (group_id, idx)
        out.append(Dispatch(done.run_id, workflow, done.retry_state, 0, delay, branch=branch))
    for released, state in done.released:
        out.append(Dispatch(done.run_id, workflow, state, 0, branch=(group_id, released)))
    if done.join is not None:
        wf_name, join_state, join_seq = done.join
        out.append(Dispatch(done.run_id, wf_name, join_state, join_seq, is_join=True))
    return tuple(out)
