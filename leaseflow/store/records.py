"""Frozen records that cross the store boundary: every store method returns these,
never bare tuples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from leaseflow import messages
from leaseflow.fsm.rules import Transition
from leaseflow.store._jsonable import jsonable as _jsonable
from leaseflow.store.artifact_records import ArtifactRecord

# Lock and registry records live in lock_records; re-exported here with the rest.
from leaseflow.store.lock_records import (  # noqa: F401
    HeldLock,
    KeyOf,
    LockAudit,
    LockContended,
    LockFreed,
    LockRecord,
    LockWant,
    WorkerInfo,
    WorkerRecord,
)

#: A ``ctx.in_commit`` callback: ``fn(conn)`` inside the transition's transaction.
InCommit = Callable[[Any], None]


@dataclass(frozen=True, slots=True)
class Claim:
    """A successful claim: this process holds ``lease_token`` until it commits."""

    run_id: str
    workflow: str
    version: int
    state: str
    step_seq: int
    attempt: int
    max_attempts: int
    lease_token: str
    started_at: datetime
    checkpoint: bytes
    context_version: int
    input: dict[str, Any]
    group_id: int | None = None  # set when this state is the join of a group
    priority: int = 0  # the run's message priority
    signal: Any = None  # the payload of the signal that resumed the run (ctx.signal)
    lock_key: str | None = None  # the resource lock the run holds, if any
    lock_token: str | None = None  # its acquisition token (fences the commit)
    lock_until: str | None = None  # the state whose commit releases it (None: this one)
    lock_fence: int | None = None  # the lock's fence (ctx.lock_token)
    due_at: datetime | None = None  # when the state became due (its not_before)

    @property
    def holds_lock(self) -> bool:
        return self.lock_token is not None

    def releases_lock(self, terminal: bool) -> bool:
        """Does this state's commit free the run's lock? At the state that took it
        (or the one ``hold_lock_until`` names), and whenever the run ends."""
        if self.lock_token is None:
            return False
        return terminal or self.lock_until is None or self.lock_until == self.state

    def handed_off(self, tr: Transition, *, token: str, started_at: datetime) -> Claim:
        """The claim of the next state that the commit of ``tr`` leased to the same
        worker (inline continuation): attempt 1 under ``token``."""
        return replace(
            self,
            state=tr.next_state or self.state,
            step_seq=self.step_seq + 1,
            attempt=1,
            max_attempts=tr.max_attempts,
            lease_token=token,
            started_at=started_at,
            due_at=started_at,
            checkpoint=self.checkpoint if tr.checkpoint is None else tr.checkpoint,
            context_version=self.context_version
            if tr.context_version is None
            else tr.context_version,
            group_id=None,
            signal=None,
        )  # a hand-off never happens while the run holds a lock


@dataclass(frozen=True, slots=True)
class Released:
    """What a worker shutting down handed back: runs and branches to publish again."""

    runs: tuple[Due, ...] = ()
    branches: tuple[DueBranch, ...] = ()


@dataclass(frozen=True, slots=True)
class Committed:
    """A fenced commit that landed: the run's new step, and what else it started."""

    step_seq: int  # the run's step_seq after the commit
    group_id: int | None = None  # the group a fork created
    handoff: Claim | None = None  # inline continuation: the next state, leased to us
    #: Instead of the step's decision, the run ended: ``cancelled`` (a cancel was
    #: requested while it ran) or ``timed_out`` (past its deadline).
    ended: str | None = None
    #: A Wait met a stored signal in the same transaction: the run resumed at this state.
    resumed: str | None = None


@dataclass(frozen=True, slots=True)
class BranchClaim:
    """A claimed branch of a Parallel or Map group."""

    group_id: int
    idx: int
    run_id: str
    workflow: str
    version: int
    state: str
    attempt: int
    max_attempts: int
    lease_token: str
    started_at: datetime
    item: Any
    checkpoint: bytes
    context_version: int
    input: dict[str, Any]
    kind: str
    priority: int = 0


@dataclass(frozen=True, slots=True)
class JoinDue:
    """The run moved to its join state: wake it at ``step_seq``."""

    workflow: str
    state: str
    step_seq: int
    version: int | None = None
    priority: int = 0


@dataclass(frozen=True, slots=True)
class BranchRef:
    """A branch of a group to publish: its index and state."""

    idx: int
    state: str


@dataclass(frozen=True, slots=True)
class BranchCommit:
    """What a branch commit decided: the join to wake, branches released, run failed."""

    run_id: str
    join: JoinDue | None = None
    released: tuple[BranchRef, ...] = ()  # held branches that now start (Map window)
    parent_failed: bool = False
    retry_state: str | None = None  # the branch runs again (after its delay)


@dataclass(frozen=True, slots=True)
class BranchResult:
    """A branch as the join and ``runs show`` see it: its result or error."""

    idx: int
    state: str
    status: str
    result: Any
    error: str | None


@dataclass(frozen=True, slots=True)
class GroupRecord:
    """A Parallel or Map group of a run, with its branches."""

    id: int
    kind: str
    join_state: str
    width: int
    done: int
    failed: int
    status: str
    on_branch_error: str
    max_concurrency: int | None
    parent_seq: int
    branches: tuple[BranchResult, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Peek:
    """Why a claim found nothing: the run as it is now."""

    status: str
    step_seq: int
    workflow: str
    state: str
    wait_seconds: float  # not_before - now(), when positive
    version: int = 1
    priority: int = 0
    past_deadline: bool = False  # the run's deadline passed: the sweeper ends it


@dataclass(frozen=True, slots=True)
class BranchPeek:
    """Why a branch claim found nothing: the branch as it is now."""

    status: str
    run_id: str
    workflow: str
    state: str
    wait_seconds: float


@dataclass(frozen=True, slots=True)
class OverdueRun:
    """A pending run whose message is overdue; it was last published by ``published_by``."""

    run_id: str
    workflow: str
    state: str
    published_by: datetime


@dataclass(frozen=True, slots=True)
class OverdueBranch:
    """A pending branch whose message is overdue."""

    group_id: int
    idx: int
    workflow: str
    state: str
    published_by: datetime


@dataclass(frozen=True, slots=True)
class DueBranch:
    """A branch whose message must be re-published."""

    run_id: str
    group_id: int
    idx: int
    workflow: str
    state: str
    countdown: float = 0.0
    priority: int = 0
    version: int | None = None

    def wakeup(self) -> messages.BranchStep:
        """The message that publishes it."""
        return messages.BranchStep(
            self.run_id,
            self.workflow,
            self.state,
            self.group_id,
            self.idx,
            self.countdown,
            self.priority,
            self.version,
        )


@dataclass(frozen=True, slots=True)
class ExpiredBranch:
    """A branch whose lease ran out (for the reaper, fenced by the expired token)."""

    group_id: int
    idx: int
    lease_token: str
    lease_owner: str | None
    attempt: int
    max_attempts: int
    state: str
    workflow: str
    version: int | None = None
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Created:
    """A run ``start`` asked for: new, or the one its idempotency key already named."""

    run_id: str
    created: bool


@dataclass(frozen=True, slots=True)
class Due:
    """A pending run whose message must be (re-)published."""

    run_id: str
    workflow: str
    version: int
    state: str
    step_seq: int
    countdown: float = 0.0
    priority: int = 0

    def wakeup(self) -> messages.StateStep:
        """The message that publishes it (its version is the newest known, or given)."""
        return messages.StateStep(
            self.run_id,
            self.workflow,
            self.state,
            self.step_seq,
            self.countdown,
            self.priority,
            self.version,
        )


@dataclass(frozen=True, slots=True)
class Reaped:
    run_id: str
    workflow: str
    version: int
    state: str
    step_seq: int  # the new step_seq, to publish when pending
    status: str  # pending (requeued), failed, or cancelled (a cancel was requested)
    attempt: int
    lease_owner: str | None
    priority: int = 0


@dataclass(frozen=True, slots=True)
class SignalReceipt:
    """What a signal did: ``resumed`` the run waiting for it, was ``stored`` until a
    Wait asks for its event, or was a ``duplicate`` of one already received (same
    ``signal_id``: delivered once)."""

    run_id: str
    event: str
    signal_id: str
    result: str  # resumed | stored | duplicate
    run_status: str  # the run's status after the signal
    state: str  # the run's state after the signal

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Signalled:
    """A stored signal, and the run to publish when it resumed one."""

    receipt: SignalReceipt
    due: Due | None = None


@dataclass(frozen=True, slots=True)
class CancelResult:
    """What a cancel did: ``cancelled`` the run at once (it was pending or waiting),
    ``requested`` it of the running state, or nothing (``finished``: it had ended)."""

    run_id: str
    result: str  # cancelled | requested | finished
    run_status: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class WaitEnded:
    """A wait the timeout sweeper ended: the run resumed (``pending``) or failed; or a
    run past its deadline, ``timed_out``."""

    run_id: str
    workflow: str
    version: int
    state: str  # the run's state now
    step_seq: int
    status: str  # pending | failed | timed_out
    priority: int = 0
    error_code: str | None = None


@dataclass(frozen=True, slots=True)
class StepRecord:
    seq: int
    state: str
    attempt: int
    outcome: str
    next_state: str | None
    started_at: datetime | None
    finished_at: datetime
    duration_ms: int | None
    worker: str | None
    lease_token: str | None
    error: str | None
    #: The context's JSON and its stored checkpoint, in bytes, as of this step.
    context_bytes: int | None = None
    checkpoint_bytes: int | None = None

    @property
    def checkpoint_ratio(self) -> float | None:
        """Stored checkpoint bytes per byte of context JSON (the codec's ratio)."""
        if not self.context_bytes or self.checkpoint_bytes is None:
            return None
        return self.checkpoint_bytes / self.context_bytes

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True, slots=True)
class SignalRecord:
    """A signal sent to a run, as ``runs show`` lists it."""

    signal_id: str
    event: str
    payload: Any
    received_at: datetime
    consumed_at: datetime | None
    consumed_seq: int | None

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: str
    workflow: str
    version: int
    state: str
    prev_state: str | None
    status: str
    step_seq: int
    attempt: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    not_before: datetime
    input: dict[str, Any]
    output: Any
    error_code: str | None
    error: str | None
    idempotency_key: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    priority: int = 0
    wait_event: str | None = None
    wait_deadline: datetime | None = None
    run_deadline: datetime | None = None
    cancel_requested: bool = False
    tenant: str = "default"
    steps: tuple[StepRecord, ...] = field(default=())
    #: Parallel/Map groups of the run, each with its branches (status, result, error).
    groups: tuple[GroupRecord, ...] = field(default=())
    #: Signals sent to the run, in arrival order, consumed or still stored.
    signals: tuple[SignalRecord, ...] = field(default=())
    #: Artefacts of the run (``ctx.artifacts.put``), by name, without their data.
    artifacts: tuple[ArtifactRecord, ...] = field(default=())

    @property
    def terminal(self) -> bool:
        return self.status in ("completed", "failed", "cancelled", "timed_out")

    def to_dict(self) -> dict[str, Any]:
        nested = ("steps", "groups", "signals", "artifacts")
        data = _jsonable({k: v for k, v in asdict(self).items() if k not in nested})
        data["steps"] = [step.to_dict() for step in self.steps]
        data["groups"] = [group.to_dict() for group in self.groups]
        data["signals"] = [signal.to_dict() for signal in self.signals]
        data["artifacts"] = [artifact.to_dict() for artifact in self.artifacts]
        return data
