"""Frozen records that cross the store boundary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

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
    chord: bool
    checkpoint: bytes
    context_version: int
    join_max_attempts: int = 1


@dataclass(frozen=True, slots=True)
class BranchOutcome:
    """How one attempt of a branch ended."""

    group_id: int
    idx: int
    lease_token: str
    status: str  # completed | failed | retry
    result: Any = None
    error: str | None = None
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class BranchCommit:
    """What a branch commit decided: the join to wake, branches released, run failed."""

    run_id: str
    join: tuple[str, str, int] | None = None  # (workflow, join_state, step_seq)
    released: tuple[tuple[int, str], ...] = ()  # (idx, state)
    parent_failed: bool = False
    retry_state: str | None = None


@dataclass(frozen=True, slots=True)
class BranchResult:
    idx: int
    state: str
    status: str
    result: Any
    error: str | None


@dataclass(frozen=True, slots=True)
class Transition:
    """Everything one commit writes: the run row update and its step-log row."""

    run_id: str
    lease_token: str
    state: str  # the state that ran
    step_seq: int
    step_attempt: int
    started_at: datetime
    worker: str
    outcome: str  # a types.StepOutcome
    status: str  # the run's new status
    next_state: str | None = None  # None: stay in ``state``
    attempt: int = 0  # the run's new attempt counter
    max_attempts: int = 1
    delay: float = 0.0  # not_before = now() + delay
    checkpoint: bytes | None = None  # None: unchanged
    context_version: int | None = None
    output: Any = None
    error_code: str | None = None
    error: str | None = None
    step_error: str | None = None  # the traceback for the step log

    @property
    def terminal(self) -> bool:
        return self.status in ("completed", "failed", "cancelled", "timed_out")


@dataclass(frozen=True, slots=True)
class Peek:
    """Why a claim found nothing: the run as it is now."""

    status: str
    step_seq: int
    workflow: str
    state: str
    wait_seconds: float  # not_before - now(), when positive


@dataclass(frozen=True, slots=True)
class Due:
    """A pending run whose message must be (re-)published."""

    run_id: str
    workflow: str
    version: int
    state: str
    step_seq: int
    countdown: float = 0.0


@dataclass(frozen=True, slots=True)
class Reaped:
    run_id: str
    workflow: str
    version: int
    state: str
    step_seq: int  # the new step_seq, to publish when pending
    status: str  # pending (requeued) or failed
    attempt: int
    lease_owner: str | None


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
    steps: tuple[StepRecord, ...] = field(default=())
    #: Parallel/Map groups of the run, each with its branches (status, result, error).
    groups: tuple[dict[str, Any], ...] = field(default=())

    @property
    def terminal(self) -> bool:
        return self.status in ("completed", "failed", "cancelled", "timed_out")

    def to_dict(self) -> dict[str, Any]:
        data = _jsonable({k: v for k, v in asdict(self).items() if k not in ("steps", "groups")})
        data["steps"] = [step.to_dict() for step in self.steps]
        data["groups"] = [dict(group) for group in self.groups]
        return data


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in data.items()}
