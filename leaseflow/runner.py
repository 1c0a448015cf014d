"""Runs one step of one run against a ``RunStore``; knows no Celery.

claim -> load -> call -> rules -> commit -> messages. ``run_step`` claims a run's
state, ``run_branch`` a branch of a Parallel or Map; both then take the same path:
the state function runs with no transaction open, ``fsm.rules`` decide what its
result means, and the store commits that decision fenced by the lease token. The
messages the caller must publish come back in the ``StepResult``.

Inline continuation: when the next state is declared ``inline=True`` (and the task's
budget allows), the commit itself leases the next state to this worker and the
runner goes on with it in the same call: no claim, no broker hop.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from leaseflow import claims, errors, faults, heartbeat, logs, messages, metrics, observe, steplog
from leaseflow.artifacts import Artifacts
from leaseflow.context import StateContext
from leaseflow.fsm import registry, rules
from leaseflow.fsm.definition import StateSpec, Workflow
from leaseflow.messages import StepResult
from leaseflow.store import base, records

__all__ = ["Runner", "StepResult", "call_state"]

Leased = records.Claim | records.BranchClaim
Decision = rules.Transition | rules.BranchDecision
#: Calls a state function: ``invoke(spec, ctx)``; tests wrap it to inject crashes.
Invoke = Callable[[StateSpec, StateContext[Any]], Any]


def call_state(spec: StateSpec, ctx: StateContext[Any]) -> Any:
    return spec.fn(ctx)


class Runner:
    """Runs steps for one worker process."""

    def __init__(
        self,
        store: base.RunStore,
        keeper: heartbeat.LeaseKeeper,
        *,
        worker: str,
        ttl: float,
        limits: rules.Limits,
        inline_max_states: int = 100,
        inline_max_seconds: float = 2.0,
        rand: Callable[[], float] = random.random,
        monotonic: Callable[[], float] = time.monotonic,
        invoke: Invoke = call_state,
    ) -> None:
        self.store = store
        self.keeper = keeper
        self.worker = worker
        self.ttl = ttl
        self.limits = limits
        self.inline_max_states = inline_max_states
        self.inline_max_seconds = inline_max_seconds
        self.rand = rand
        self.monotonic = monotonic
        self.invoke = invoke

    # -- entry points ------------------------------------------------------------------

    def handle(self, message: messages.Message) -> StepResult:
        """Run what a wake-up message names: a state (or join) step, or a branch."""
        if isinstance(message, messages.BranchStep):
            return self.run_branch(message.group_id, message.idx, workflow=message.workflow)
        return self.run_step(
            message.run_id, message.step_seq, workflow=message.workflow, state=message.state
        )

    def run_step(
        self,
        run_id: str,
        step_seq: int,
        *,
        workflow: str | None = None,
        state: str | None = None,
    ) -> StepResult:
        """Claim ``run_id`` at ``step_seq``, run its state (and any inline successors).

        With ``workflow`` (the task's), only a run of a version of it that this process
        declares is claimed: a run of another version is left untouched for a worker
        that has it (logged and counted as ``version_unknown``)."""
        started = time.perf_counter()
        claim = claims.claim_step(
            self.store,
            run_id,
            step_seq,
            owner=self.worker,
            ttl=self.ttl,
            workflow=workflow,
            state=state,
        )
        metrics.CLAIM_SECONDS.observe(time.perf_counter() - started)
        if isinstance(claim, records.LockContended):
            return claims.contended(
                self.store, run_id, step_seq, claim, workflow=workflow, state=state
            )
        if claim is None:
            return claims.explain_miss(self.store, run_id, step_seq, claims.versions_of(workflow))
        observe.claimed(claim)
        budget = rules.InlineBudget.for_task(
            _spec(claim),
            max_states=self.inline_max_states,
            max_seconds=self.inline_max_seconds,
            now=self.monotonic(),
        )
        inlined = 0
        while True:
            result, handoff = self._run(claim, budget)
            if handoff is None:
                return replace(result, inlined=inlined) if inlined else result
            claim, inlined = handoff, inlined + 1

    def run_branch(self, group_id: int, idx: int, *, workflow: str | None = None) -> StepResult:
        """Claim branch ``idx`` of group ``group_id``, run it, commit its result."""
        versions = claims.versions_of(workflow)
        metrics.CLAIM_ATTEMPTS.inc()
        claim = self.store.claim_branch(
            group_id, idx, owner=self.worker, ttl=self.ttl, versions=versions
        )
        if claim is None:
            return claims.explain_branch_miss(self.store, group_id, idx)
        observe.claimed(claim)
        return self._run(claim, None)[0]

    # -- the one path ----------------------------------------------------------------

    def _run(
        self, claim: Leased, budget: rules.InlineBudget | None
    ) -> tuple[StepResult, records.Claim | None]:
        """Run the state ``claim`` leased to us and commit what it decided."""
        faults.point("after_claim", **_where(claim))
        try:
            wf = registry.get(claim.workflow, claim.version)
            spec = wf.states[claim.state]
        except (errors.UnknownWorkflow, KeyError):
            reason = (
                f"state {claim.state!r} of workflow {claim.workflow!r} v{claim.version} "
                "is not registered in this worker"
            )
            return self._settle(claim, _failure(claim, errors.UNKNOWN_STATE, reason))
        try:
            data = rules.load_context(wf, claim.checkpoint, claim.context_version)
        except errors.CheckpointError as exc:
            regathers = exc.code == errors.CHECKPOINT_STALE and wf.regather is not None
            if regathers and isinstance(claim, records.Claim):
                metrics.REGATHERED.labels(wf.name).inc()
                logs.warning(
                    "checkpoint_regathered",
                    **steplog.ids(claim),
                    regather=wf.regather,
                    reason=exc.detail,
                )
                attempts = {"attempt": claim.attempt, "max_attempts": claim.max_attempts}
                return self._settle(claim, rules.regather(wf, claim.input, self.limits, **attempts))
            return self._settle(claim, _failure(claim, exc.code, exc.detail))
        if isinstance(claim, records.Claim) and spec.lock is not None and claim.lock_fence is None:
            want = claims.lock_want(claim)  # why the claim could not take the state's lock
            reason = (want.error if want else None) or f"state {claim.state!r} took no lock"
            return self._settle(claim, _failure(claim, errors.LOCK_KEY, reason))
        ctx = self._context(wf, claim, data)
        branch = (claim.group_id, claim.idx) if isinstance(claim, records.BranchClaim) else None
        self.keeper.hold(
            claim.run_id,
            claim.lease_token,
            timeout=spec.timeout,
            branch=branch,
            ids=steplog.ids(claim),
        )
        try:
            returned, raised = self._call(wf, spec, ctx)
            decision = self._decide(wf, spec, claim, ctx.data, returned, raised)
            accepted = ctx._in_commit if decision.accepted else ()
            try:
                return self._settle(claim, decision, accepted, budget, wf)
            except errors.InCommitError as exc:  # rolled back with the transition
                cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
                return self._settle(claim, self._decide(wf, spec, claim, ctx.data, None, cause))
            except (errors.UnstorableValue, errors.IllegalTransition) as exc:
                return self._settle(claim, refused(claim, exc))  # see ``refused``
        finally:
            self.keeper.release(claim.lease_token)

    def _context(self, wf: Workflow, claim: Leased, data: Any) -> StateContext[Any]:
        writes: list[records.InCommit] = []  # in_commit writes, artefacts included
        step_seq = claim.step_seq if isinstance(claim, records.Claim) else None
        ctx: StateContext[Any] = StateContext(
            data=data,
            run_id=claim.run_id,
            state=claim.state,
            attempt=claim.attempt,
            input=claim.input,
            fencing_token=claim.lease_token,
            step_seq=step_seq or 0,
            workflow=wf.name,
            _keeper=self.keeper,
            _in_commit=writes,
            artifacts=_artifacts(self.store, claim, step_seq, writes, self.limits),
        )
        if isinstance(claim, records.BranchClaim):
            ctx.item, ctx.index = claim.item, claim.idx
        else:
            ctx.signal, ctx.lock_token = claim.signal, claim.lock_fence
            if claim.group_id is not None:  # this state is the join of a group
                ctx.join(self.store.branch_results(claim.group_id))
        return ctx

    def _call(
        self, wf: Workflow, spec: StateSpec, ctx: StateContext[Any]
    ) -> tuple[Any, Exception | None]:
        """Run the state function with no transaction open: ``(returned, None)`` or
        ``(None, exception)``; its duration goes to the step histogram either way."""
        t0 = time.perf_counter()
        try:
            return self.invoke(spec, ctx), None
        except Exception as exc:
            metrics.STEP_ERRORS.labels(wf.name, spec.name).inc()
            return None, exc
        finally:
            metrics.STEP_SECONDS.labels(wf.name, spec.name).observe(time.perf_counter() - t0)

    def _decide(self, *args: Any) -> Decision:
        return decide(*args, limits=self.limits, rand=self.rand)

    # -- commits ---------------------------------------------------------------------

    def _settle(
        self,
        claim: Leased,
        decision: Decision,
        callbacks: Sequence[records.InCommit] = (),
        budget: rules.InlineBudget | None = None,
        wf: Workflow | None = None,
    ) -> tuple[StepResult, records.Claim | None]:
        """Commit ``decision``; the result, and the next claim when it was handed to us."""
        faults.point("before_commit", **_where(claim))
        if isinstance(claim, records.BranchClaim):
            assert isinstance(decision, rules.BranchDecision)
            return self._commit_branch(claim, decision, callbacks), None
        assert isinstance(decision, rules.Transition)
        inline = (
            budget is not None
            and wf is not None
            and not claim.holds_lock  # a lock is freed or kept by a commit of its own
            and budget.take(wf, decision, self.monotonic())
        )
        committed = self.store.commit(
            claim,
            decision,
            worker=self.worker,
            callbacks=callbacks,
            handoff_ttl=self.ttl if inline else None,
            lock_ttl=self.ttl,
        )
        if committed is None:
            return lease_lost(self.store, self.worker, claim), None
        observe.committed(claim, decision, committed)  # metrics, then hooks (queued)
        if committed.ended is not None:  # cancelled, or past its deadline, meanwhile
            steplog.ended(claim, committed.ended)
            return StepResult("committed", outcome=committed.ended), None
        steplog.committed(claim, decision, inline=inline, resumed=committed.resumed)
        faults.point("after_commit_before_enqueue", **_where(claim))
        if committed.handoff is not None:
            return StepResult("committed", outcome=decision.outcome), committed.handoff
        done = StepResult("committed", outcome=decision.outcome)
        if decision.fork is not None and committed.group_id is not None:
            return replace(done, fork=_fork_start(claim, decision.fork, committed)), None
        next_state = committed.resumed or decision.next_state or claim.state
        if decision.status != "pending" and committed.resumed is None:
            return done, None
        step = messages.StateStep(
            claim.run_id,
            claim.workflow,
            next_state,
            committed.step_seq,
            decision.delay,
            claim.priority,
            claim.version,
        )
        return replace(done, wakeups=(step,)), None

    def _commit_branch(
        self,
        claim: records.BranchClaim,
        decision: rules.BranchDecision,
        callbacks: Sequence[records.InCommit],
    ) -> StepResult:
        done = self.store.commit_branch(
            claim.group_id, claim.idx, claim.lease_token, decision, callbacks=callbacks
        )
        if done is None:
            return lease_lost(self.store, self.worker, claim)
        observe.branch_committed(claim, decision, done)
        steplog.branch_committed(claim, decision, done)
        faults.point("after_commit_before_enqueue", **_where(claim))
        return StepResult(
            "committed",
            wakeups=branch_messages(
                claim.workflow,
                done,
                claim.group_id,
                claim.idx,
                decision.delay,
                priority=claim.priority,
                version=claim.version,
            ),
            outcome=decision.status,
        )


def _artifacts(
    store: base.RunStore,
    claim: Leased,
    step_seq: int | None,
    sink: list[records.InCommit],
    limits: rules.Limits,
) -> Artifacts:
    """``ctx.artifacts`` of an attempt: its puts go to ``sink`` (the commit's writes)."""
    return Artifacts(
        store,
        claim.run_id,
        claim.state,
        step_seq,
        sink=sink,
        limit=limits.max_artifact_bytes,
        compress_min=limits.compress_min_bytes,
        compress_level=limits.compress_level,
    )


def decide(
    wf: Workflow,
    spec: StateSpec,
    claim: Leased,
    data: Any,
    returned: Any,
    raised: Exception | None,
    *,
    limits: rules.Limits,
    rand: Callable[[], float],
) -> Decision:
    """What an attempt's result means (``rules``); ``rand`` only for a retry's jitter."""
    attempts = {"attempt": claim.attempt, "max_attempts": claim.max_attempts}
    jitter = rand() if raised is not None else 0.5
    if isinstance(claim, records.BranchClaim):
        return rules.on_branch(
            spec, returned=returned, raised=raised, limits=limits, rand=jitter, **attempts
        )
    if raised is not None:
        return rules.on_error(wf, spec, exc=raised, rand=jitter, **attempts)
    return rules.on_outcome(
        wf, spec, returned, data=data, stored=claim.checkpoint, limits=limits, **attempts
    )


def _spec(claim: records.Claim) -> StateSpec | None:
    try:
        return registry.get(claim.workflow, claim.version).states.get(claim.state)
    except errors.UnknownWorkflow:
        return None


def _where(claim: Leased) -> dict[str, Any]:
    """The fields that place a fault point: run, state, and step or branch."""
    if isinstance(claim, records.BranchClaim):
        return {"run_id": claim.run_id, "state": claim.state, "branch": claim.idx}
    return {"run_id": claim.run_id, "state": claim.state, "step_seq": claim.step_seq}


def _failure(claim: Leased, code: str, reason: str) -> Decision:
    """The state cannot run here at all (unknown state, unreadable context)."""
    if isinstance(claim, records.BranchClaim):
        return rules.branch_failure(code, reason)
    return rules.failure(code, reason, attempt=claim.attempt, max_attempts=claim.max_attempts)


def refused(claim: Leased, exc: errors.UnstorableValue | errors.IllegalTransition) -> Decision:
    """The failure to commit instead of a decision the store refused.

    What a commit can raise, and what the runner does with it: ``InCommitError`` (a
    callback raised, the transition rolled back with it): decide again, as for an
    error of the state. ``UnstorableValue`` (a value the store cannot take) and
    ``IllegalTransition`` (an edge the store does not know): the step fails with
    that code and the refusal as its reason, committed once, without the state's
    ``in_commit`` callbacks; if that commit is refused too, the refusal propagates.
    ``StoreUnavailable``: propagates, since the database is unreachable and nothing
    can be written; the lease runs out and the reaper hands the run on. A lost
    lease is no exception: the commit returns None, reported as ``lease_lost``.
    """
    logs.warning(
        "commit_refused",
        **steplog.ids(claim),
        error_code=exc.code,
        error=str(exc),
    )
    return _failure(claim, exc.code, str(exc))


def _fork_start(
    claim: records.Claim, fork: rules.Fork, committed: records.Committed
) -> messages.ForkStart:
    assert committed.group_id is not None
    group_id, join_seq = committed.group_id, committed.step_seq
    prio, version = claim.priority, claim.version
    branches = tuple(
        messages.BranchStep(claim.run_id, claim.workflow, name, group_id, idx, 0.0, prio, version)
        for idx, name in enumerate(fork.states[: fork.released])
    )
    join = messages.JoinWake(
        claim.run_id, claim.workflow, fork.join_state, join_seq, 0.0, prio, version
    )
    logs.info(
        "run_forked",
        **steplog.ids(claim),
        group_id=group_id,
        width=len(fork.states),
        join=fork.join_state,
    )
    return messages.ForkStart(group_id, branches, join, chord=fork.chord)


def branch_messages(
    workflow: str,
    done: records.BranchCommit,
    group_id: int,
    idx: int,
    delay: float = 0.0,
    *,
    priority: int = 0,
    version: int | None = None,
) -> tuple[messages.Message, ...]:
    """The messages a branch commit calls for: its retry, released branches, the join."""
    out: list[messages.Message] = []
    run_id = done.run_id
    if done.retry_state is not None:
        out.append(
            messages.BranchStep(
                run_id, workflow, done.retry_state, group_id, idx, delay, priority, version
            )
        )
    for ref in done.released:
        out.append(
            messages.BranchStep(
                run_id, workflow, ref.state, group_id, ref.idx, 0.0, priority, version
            )
        )
    if done.join is not None:
        join = done.join
        out.append(
            messages.JoinWake(
                run_id, join.workflow, join.state, join.step_seq, 0.0, join.priority, join.version
            )
        )
    return tuple(out)


def lease_lost(store: base.RunStore, worker: str, claim: Leased) -> StepResult:
    """The commit was fenced out: log and count it; nothing is published."""
    metrics.LEASES_LOST.labels(claim.workflow, claim.state).inc()
    logs.warning(
        "lease_lost",
        **steplog.ids(claim),
        worker=worker,
    )
    with contextlib.suppress(errors.StoreUnavailable):  # a count, not a correctness matter
        store.count_lease_lost(worker)
    return StepResult("lease_lost")
