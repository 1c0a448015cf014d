"""Request and response models of the API: what its OpenAPI schema declares.

Responses are built from the store's records (``from_attributes``), so a field the
records lose is a field the schema loses too.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from leaseflow.types import RunStatus

#: A tenant's name, as tokens and runs take it.
TENANT = r"^[A-Za-z0-9._-]{1,100}$"


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ErrorOut(BaseModel):
    """Every error: a stable code, a sentence, and the error's fields."""

    code: str = Field(examples=["E-RUN-NOT-FOUND"])
    message: str
    detail: dict[str, Any] = Field(default_factory=dict)


# -- runs ---------------------------------------------------------------------------


class StartIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workflow: str = Field(min_length=1, max_length=200, examples=["linear5"])
    input: dict[str, Any] | None = None
    version: int | None = Field(None, ge=1, le=2**31 - 1)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)
    priority: int = Field(0, ge=0, le=9)
    #: An admin's token may start the run in another tenant; a tenant's only in its own.
    tenant: str | None = Field(None, pattern=TENANT)


class RunOut(Out):
    """A run without its step log (as listed)."""

    id: str
    tenant: str
    workflow: str
    version: int
    state: str
    prev_state: str | None
    status: RunStatus
    step_seq: int
    attempt: int
    max_attempts: int
    priority: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    not_before: datetime
    input: dict[str, Any]
    output: Any
    error_code: str | None
    error: str | None
    idempotency_key: str | None
    wait_event: str | None
    wait_deadline: datetime | None
    run_deadline: datetime | None
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class StepOut(Out):
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
    context_bytes: int | None
    checkpoint_bytes: int | None


class BranchOut(Out):
    idx: int
    state: str
    status: str
    result: Any
    error: str | None


class GroupOut(Out):
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
    branches: list[BranchOut]


class SignalRecordOut(Out):
    signal_id: str
    event: str
    payload: Any
    received_at: datetime
    consumed_at: datetime | None
    consumed_seq: int | None


class ArtifactOut(Out):
    """An artefact's metadata (``GET /runs/{id}/artifacts/{name}`` has its bytes)."""

    name: str
    content_type: str | None
    size_bytes: int
    stored_bytes: int
    sha256: str
    state: str | None
    step_seq: int | None
    created_at: datetime


class RunDetail(RunOut):
    """A run with its step log, groups and branches, signals and artefacts."""

    steps: list[StepOut]
    groups: list[GroupOut]
    signals: list[SignalRecordOut]
    artifacts: list[ArtifactOut]


class RunPage(BaseModel):
    """Runs newest first; ``next_cursor`` fetches the next page (None: the last)."""

    runs: list[RunOut]
    next_cursor: str | None


class SignalIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event: str = Field(examples=["review"])
    payload: Any = None
    signal_id: str | None = None


class SignalOut(Out):
    """``resumed`` the waiting run, ``stored`` for a later Wait, or a ``duplicate``."""

    run_id: str
    event: str
    signal_id: str
    result: str
    run_status: RunStatus
    state: str


class CancelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=2000)


class CancelOut(Out):
    """``cancelled`` at once, ``requested`` of the running state, or ``finished``."""

    run_id: str
    result: str
    run_status: RunStatus


class RetryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    from_state: str | None = Field(None, min_length=1, max_length=200)


class RetryOut(BaseModel):
    run_id: str
    state: str = Field(description="The state the run resumes at (pending).")


class PurgedOut(Out):
    """Rows deleted with the run, by table."""

    runs: int
    steps: int
    groups: int
    branches: int
    signals: int
    artifacts: int
    total: int
    run_ids: list[str]


# -- operator side -------------------------------------------------------------------


class WorkflowSummary(BaseModel):
    name: str
    versions: list[int]


class WorkflowOut(BaseModel):
    """One version of a workflow: its states, edges (``null``: the entry) and Mermaid."""

    name: str
    version: int
    context_version: int
    initial: str
    states: list[str]
    edges: list[list[str | None]]
    mermaid: str


class WorkflowDetail(BaseModel):
    name: str
    versions: list[WorkflowOut]


class LockOut(Out):
    key: str
    fence: int
    holder: str | None
    holder_run: str | None
    holder_state: str | None
    acquired_at: datetime | None
    expires_at: datetime | None
    expired: bool


class ReleaseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000)


class LockFreedOut(Out):
    key: str
    fence: int
    holder: str | None
    holder_run: str | None
    reason: str | None
    actor: str


class WorkerOut(Out):
    id: str
    hostname: str
    pid: int
    queues: str | None
    concurrency: int | None
    started_at: datetime
    last_seen_at: datetime
    leases_held: int
    leases_lost: int
    status: str


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Ready(BaseModel):
    """``ok``, or ``unavailable`` with the failed checks' reasons in ``checks``."""

    status: str
    checks: dict[str, str]
