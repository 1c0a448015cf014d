"""What a step's result means: pure decisions, no I/O, no clock, no randomness of their own.

The runner calls a state function, then asks these rules what the returned value (or
the raised exception) means for the run: move on, complete, fail, retry after a
backoff, fork a group, or, for a branch, record a result. The rules return decision
values (``Transition``, ``Fork``, ``BranchDecision``); the runner commits them.
Time (``now``) and randomness (``rand``) are passed in, so tests pin both.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, replace
from typing import Any

import pydantic
import pydantic_core

from leaseflow import errors
from leaseflow.fsm import checkpoint, waits
from leaseflow.fsm.contexts import first_checkpoint as first_checkpoint
from leaseflow.fsm.contexts import load_context as load_context
from leaseflow.fsm.definition import StateSpec, Workflow
from leaseflow.fsm.limits import CHECKPOINT_SETTING as CHECKPOINT_SETTING
from leaseflow.fsm.limits import PAYLOAD_SETTING as PAYLOAD_SETTING
from leaseflow.fsm.limits import Limits as Limits
from leaseflow.fsm.outcomes import (
    BRANCH_ERROR_POLICIES,
    Complete,
    Failed,
    Map,
    Next,
    Parallel,
    Wait,
)
from leaseflow.types import TERMINAL_STATUSES, StepOutcome


@dataclass(frozen=True, slots=True)
class Fork:
    """The group a forking step creates, written in the same transaction as its step."""

    kind: str  # parallel | map
    join_state: str
    states: tuple[str, ...]  # one per branch, in order
    max_attempts: tuple[int, ...]
    items: tuple[Any, ...] | None  # map items, in order
    on_branch_error: str
    max_concurrency: int | None
    checkpoint: bytes  # the context snapshot every branch reads
    context_version: int
    join_max_attempts: int = 1

    @property
    def chord(self) -> bool:
        """All branches are released at once, so they may run as one Celery chord."""
        return self.max_concurrency is None

    @property
    def released(self) -> int:
        """How many branches start at once (the rest wait for a free slot)."""
        return len(self.states) if self.max_concurrency is None else self.max_concurrency


@dataclass(frozen=True, slots=True)
class Transition:
    """What one step of a run decided; the runner commits it fenced by the lease."""

    outcome: str  # a StepOutcome, written to the step log
    status: str  # the run's new status
    next_state: str | None = None  # None: the run stays in its state
    attempt: int = 0  # the run's new attempt counter
    max_attempts: int = 1
    delay: float = 0.0  # the next attempt is due this many seconds after the commit
    checkpoint: bytes | None = None  # None: the stored context is unchanged
    context_version: int | None = None
    #: The context's JSON and its checkpoint, in bytes (the step log shows the ratio).
    context_bytes: int | None = None
    checkpoint_bytes: int | None = None
    output: Any = None
    error_code: str | None = None
    error: str | None = None
    step_error: str | None = None  # the traceback or reason, for the step log
    fork: Fork | None = None  # a Parallel or Map group to create
    wait: waits.WaitPlan | None = None  # the run waits for a signal or a timer
    #: The engine accepted the outcome: the state's ``ctx.in_commit`` writes commit with it.
    accepted: bool = True

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def moves(self) -> bool:
        """The run moves to another state with this commit."""
        return self.next_state is not None


@dataclass(frozen=True, slots=True)
class BranchDecision:
    """How one attempt of a branch ended."""

    status: str  # completed | failed | retry
    result: Any = None
    error: str | None = None
    delay: float = 0.0
    accepted: bool = True  # the branch's ``in_commit`` writes commit with it


# -- states --------------------------------------------------------------------------


def failure(
    code: str | None, reason: str, *, attempt: int, max_attempts: int, trace: str | None = None
) -> Transition:
    """The run fails with ``code``; the step log keeps ``trace`` (else code and reason).
    Texts are escaped for their text columns (a NUL byte as ``\\x00``), never refused."""
    return Transition(
        outcome=StepOutcome.FAILED,
        status="failed",
        attempt=attempt,
        max_attempts=max_attempts,
        error_code=None if code is None else checkpoint.storable_text(str(code)),
        error=checkpoint.storable_text(str(reason)),
        step_error=checkpoint.storable_text(trace or f"{code}: {reason}"),
        accepted=False,
    )


def error_line(text: str | None, limit: int = 500) -> str | None:
    """An error or a traceback as one log-line field: the exception at its end (the
    trailing unindented lines, ``Type: message``, joined by `` | ``), cut at ``limit``."""
    lines: list[str] = []
    for line in reversed((text or "").rstrip().splitlines()):
        if line.startswith((" ", "\t", "Traceback ")):
            break
        lines.append(line)
    joined = " | ".join(reversed([line for line in lines if line.strip()]))
    if len(joined) > limit:
        joined = joined[: limit - 3] + "..."
    return joined or None


def on_error(
    wf: Workflow,
    spec: StateSpec,
    *,
    attempt: int,
    max_attempts: int,
    exc: BaseException,
    rand: float,
) -> Transition:
    """The state raised ``exc`` on ``attempt``: retry after a backoff, go to its
    ``on_error`` state, or fail ``E-STATE-ERROR`` with the traceback in the step log."""
    trace = checkpoint.storable_text("".join(traceback.format_exception(exc)))
    decision = spec.retry.decide(attempt, exc, rand)
    if decision.retry:
        return Transition(
            outcome=StepOutcome.RETRY,
            status="pending",
            attempt=attempt,
            max_attempts=max_attempts,
            delay=decision.delay,
            step_error=trace,
            accepted=False,
        )
    if spec.on_error is not None:
        target = wf.states[spec.on_error]
        return _move(target, step_error=trace, accepted=False)
    tried = f"attempt {attempt} of {spec.retry.max_attempts}{_given_up(spec, attempt, exc)}"
    reason = f"{type(exc).__name__}: {exc} ({tried})"
    return failure(
        errors.STATE_ERROR, reason, attempt=attempt, max_attempts=max_attempts, trace=trace
    )


def _given_up(spec: StateSpec, attempt: int, exc: BaseException) -> str:
    """Why an error with attempts left is not retried, for its reason ("" otherwise)."""
    if attempt < spec.retry.max_attempts and spec.retry.gives_up_on(exc):
        return f"; {type(exc).__name__} is not retried: see the state's Retry"
    return ""


def on_outcome(
    wf: Workflow,
    spec: StateSpec,
    returned: object,
    *,
    attempt: int,
    max_attempts: int,
    data: pydantic.BaseModel,
    stored: bytes,
    limits: Limits,
) -> Transition:
    """What the value a state returned means; a move, a completion or a fork carries
    the new checkpoint of ``data`` (unless it equals the ``stored`` one)."""

    def fail(code: str | None, reason: str) -> Transition:
        return failure(code, reason, attempt=attempt, max_attempts=max_attempts)

    if isinstance(returned, str):
        returned = Next(returned)
    if spec.end is not None and isinstance(returned, Complete | Failed):  # end= declared
        kind = "Failed" if isinstance(returned, Failed) else "Complete"
        if spec.end != ("failed" if kind == "Failed" else "completed"):
            reason = f"state {spec.name!r} returned {kind}, but it is declared end={spec.end!r}"
            return fail(errors.ILLEGAL_TRANSITION, reason)
    if isinstance(returned, Failed):
        return replace(fail(returned.code, returned.reason), accepted=True)
    if isinstance(returned, Parallel | Map):
        return _on_fork(wf, spec, returned, fail, data=data, stored=stored, limits=limits)
    if isinstance(returned, Wait):
        planned = waits.plan(wf, spec, returned)
        if isinstance(planned, str):
            return fail(errors.ILLEGAL_TRANSITION, planned)
        parked = Transition(
            outcome=StepOutcome.WAIT,
            status="waiting",
            attempt=0,
            max_attempts=planned.next_attempts,
            wait=planned,
        )
        return with_context(parked, wf, data, stored, limits, fail)
    if isinstance(returned, Complete):
        try:
            checkpoint.dumps(
                returned.output,
                what="output",
                limit=limits.max_payload_bytes,
                setting=PAYLOAD_SETTING,
            )
        except errors.PayloadTooLarge as exc:
            return fail(errors.PAYLOAD_TOO_LARGE, str(exc))
        except errors.UnstorableValue as exc:
            return fail(errors.STATE_ERROR, str(exc))
        done = Transition(
            outcome=StepOutcome.COMPLETED,
            status="completed",
            attempt=attempt,
            max_attempts=max_attempts,
            output=returned.output,
        )
        return with_context(done, wf, data, stored, limits, fail)
    if not isinstance(returned, Next):
        reason = (
            f"state {spec.name!r} returned {returned!r}; expected a state name, Next, "
            "Complete, Failed, Parallel, Map or Wait"
        )
        return fail(errors.ILLEGAL_TRANSITION, reason)
    if returned.state not in spec.to:
        reason = (
            f"state {spec.name!r} returned {returned.state!r}, which is not in its "
            f"to={list(spec.to)}"
        )
        return fail(errors.ILLEGAL_TRANSITION, reason)
    return with_context(_move(wf.states[returned.state]), wf, data, stored, limits, fail)


def _move(target: StateSpec, **fields: Any) -> Transition:
    return Transition(
        outcome=StepOutcome.NEXT,
        status="pending",
        next_state=target.name,
        attempt=0,
        max_attempts=target.retry.max_attempts,
        **fields,
    )


def with_context(
    tr: Transition,
    wf: Workflow,
    data: pydantic.BaseModel,
    stored: bytes,
    limits: Limits,
    fail: Any,
) -> Transition:
    """``tr`` with the checkpoint of ``data``, or the failure that refuses it."""
    try:
        raw = checkpoint.dumps(
            data.model_dump(mode="json"),
            what="context",
            limit=limits.checkpoint_limit,
            setting=CHECKPOINT_SETTING,
        )
    except errors.PayloadTooLarge as exc:
        return fail(errors.PAYLOAD_TOO_LARGE, str(exc))
    except errors.UnstorableValue as exc:
        return fail(errors.CONTEXT_INVALID, str(exc))
    except (TypeError, ValueError, pydantic_core.PydanticSerializationError) as exc:
        return fail(errors.CONTEXT_INVALID, f"context is not JSON: {exc}")
    blob = checkpoint.pack(raw, compress_min=limits.compress_min_bytes, level=limits.compress_level)
    if blob == stored:  # unchanged: the commit keeps the stored bytes
        return replace(tr, context_bytes=len(raw), checkpoint_bytes=len(blob))
    return replace(
        tr,
        checkpoint=blob,
        context_version=wf.context_version,
        context_bytes=len(raw),
        checkpoint_bytes=len(blob),
    )


def _on_fork(
    wf: Workflow,
    spec: StateSpec,
    outcome: Parallel | Map,
    fail: Any,
    *,
    data: pydantic.BaseModel,
    stored: bytes,
    limits: Limits,
) -> Transition:
    """The fork of a Parallel or Map, or the failure that refuses it."""
    illegal = errors.ILLEGAL_TRANSITION
    if outcome.join not in spec.to:
        return fail(illegal, f"state {spec.name!r} forks to join {outcome.join!r}, not in its to=")
    if outcome.on_branch_error not in BRANCH_ERROR_POLICIES:
        return fail(illegal, f"on_branch_error must be one of {BRANCH_ERROR_POLICIES}")
    items: list[Any] | None = None
    window: int | None = None
    if isinstance(outcome, Parallel):
        kind, names = "parallel", list(outcome.branches)
        if not names:
            return fail(illegal, "Parallel needs at least one branch")
    else:
        kind, items, window = "map", list(outcome.items), outcome.max_concurrency
        names = [outcome.branch] * len(items)
        if window is not None and window < 1:
            return fail(illegal, "Map.max_concurrency must be >= 1")
        try:
            checkpoint.dumps(
                items, what="Map.items", limit=limits.max_payload_bytes, setting=PAYLOAD_SETTING
            )
        except errors.PayloadTooLarge as exc:
            return fail(errors.PAYLOAD_TOO_LARGE, str(exc))
        except errors.UnstorableValue as exc:
            return fail(errors.STATE_ERROR, str(exc))
    for name in names:
        if name not in wf.states or not wf.states[name].branch:
            return fail(illegal, f"{name!r} is not a branch state (declare it with branch=True)")
        if spec.branches and name not in spec.branches:
            declared = list(spec.branches)
            return fail(illegal, f"state {spec.name!r} forks {name!r}, not in branches={declared}")
    join = wf.states[outcome.join]
    if not names:  # an empty Map goes straight to its join
        return with_context(_move(join), wf, data, stored, limits, fail)
    waiting = Transition(
        outcome=StepOutcome.FORK, status="waiting", attempt=0, max_attempts=join.retry.max_attempts
    )
    waiting = with_context(waiting, wf, data, stored, limits, fail)
    if waiting.outcome != StepOutcome.FORK:
        return waiting  # the context could not be saved
    fork = Fork(
        kind=kind,
        join_state=join.name,
        states=tuple(names),
        max_attempts=tuple(wf.states[n].retry.max_attempts for n in names),
        items=tuple(items) if items is not None else None,
        on_branch_error=outcome.on_branch_error,
        max_concurrency=window,
        checkpoint=stored if waiting.checkpoint is None else waiting.checkpoint,
        context_version=wf.context_version,
        join_max_attempts=join.retry.max_attempts,
    )
    return replace(waiting, fork=fork)


def regather(
    wf: Workflow, input: dict[str, Any], limits: Limits, *, attempt: int, max_attempts: int
) -> Transition:
    """A stale checkpoint with no upcaster path: the run moves to ``wf.regather`` with a
    context rebuilt from its input (the state re-gathers the rest)."""
    assert wf.regather is not None
    try:
        blob, _ = first_checkpoint(wf, input, limits)
    except errors.InvalidInput as exc:
        return failure(
            errors.CHECKPOINT_STALE,
            f"cannot re-gather: the run's input no longer validates: {exc.detail}",
            attempt=attempt,
            max_attempts=max_attempts,
        )
    target = wf.states[wf.regather]
    return replace(
        _move(target, accepted=False),
        outcome=StepOutcome.REGATHERED,
        checkpoint=blob,
        context_version=wf.context_version,
    )


# -- branches ------------------------------------------------------------------------


def on_branch(
    spec: StateSpec,
    *,
    attempt: int,
    max_attempts: int,
    returned: Any = None,
    raised: BaseException | None = None,
    limits: Limits,
    rand: float,
) -> BranchDecision:
    """A branch returned ``returned`` (its result) or raised ``raised``."""
    if raised is None:
        try:
            checkpoint.dumps(
                returned,
                what="branch result",
                limit=limits.max_payload_bytes,
                setting=PAYLOAD_SETTING,
            )
        except errors.PayloadTooLarge as exc:
            return BranchDecision("failed", error=f"{errors.PAYLOAD_TOO_LARGE}: {exc}")
        except errors.UnstorableValue as exc:
            return BranchDecision("failed", error=f"{errors.STATE_ERROR}: {exc}")
        return BranchDecision("completed", result=returned)
    tried = f"attempt {attempt} of {max_attempts}{_given_up(spec, attempt, raised)}"
    error = checkpoint.storable_text(f"{type(raised).__name__}: {raised} ({tried})")
    decision = spec.retry.decide(attempt, raised, rand)
    if decision.retry:
        return BranchDecision("retry", error=error, delay=decision.delay, accepted=False)
    return BranchDecision("failed", error=error, accepted=False)


def branch_failure(code: str, reason: str) -> BranchDecision:
    """The branch cannot run here at all (unknown state, unreadable context), or the
    store refused its commit."""
    error = checkpoint.storable_text(f"{code}: {reason}")
    return BranchDecision("failed", error=error, accepted=False)


def reap_branch(attempt: int, max_attempts: int, owner: str | None) -> BranchDecision:
    """A branch whose lease expired: retried while attempts remain, else failed."""
    reason = (
        f"{errors.LEASE_EXPIRED}: lease of {owner or 'unknown worker'} expired "
        f"on attempt {attempt} of {max_attempts}"
    )
    return BranchDecision("retry" if attempt < max_attempts else "failed", error=reason)


# -- inline continuation -------------------------------------------------------------


@dataclass
class InlineBudget:
    """How much inline continuation one task may still do (``now``: a monotonic clock)."""

    queue: str | None  # the task's queue (its first state's)
    allowed: bool  # False when the first state has a time limit (it would cover all)
    states_left: int
    deadline: float

    @classmethod
    def for_task(
        cls, first: StateSpec | None, *, max_states: int, max_seconds: float, now: float
    ) -> InlineBudget:
        return cls(
            queue=first.queue if first is not None else None,
            allowed=first is not None and first.timeout is None,
            states_left=max_states,
            deadline=now + max_seconds,
        )

    def take(self, wf: Workflow, tr: Transition, now: float) -> bool:
        """May ``tr``'s target run inline now? Spends one unit if so."""
        if not self.allowed or self.states_left <= 0 or now >= self.deadline:
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
