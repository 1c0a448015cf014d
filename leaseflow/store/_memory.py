"""The tables of ``MemoryStore`` and the parts of it that need no transition table:
Parallel/Map branches and the beat jobs. Each public method holds the store's one
lock, so it is one atomic "transaction"; time is the store's clock alone."""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from leaseflow import errors
from leaseflow.fsm.rules import BranchDecision, Fork
from leaseflow.store import artifact_sql
from leaseflow.store import records as rec
from leaseflow.store._refusals import refuse_json, refuse_unstorable
from leaseflow.store.artifact_records import ArtifactRecord

__all__ = ["refuse_json", "refuse_unstorable"]

Clock = Callable[[], datetime]


@dataclass(frozen=True, slots=True)
class InCommitWrite:
    """One ``execute`` of an ``in_commit`` callback, kept once its commit landed."""

    run_id: str
    sql: str
    params: Any = None


@dataclass(slots=True)
class WorkerRow:
    """A worker as the heartbeat and the lease-lost count saw it."""

    last_seen_at: datetime
    leases_lost: int = 0
    started_at: datetime | None = None
    queues: str | None = None
    concurrency: int | None = None
    leases_held: int = 0
    status: str = "alive"


@dataclass(slots=True)
class Run:
    id: str
    workflow: str
    version: int
    state: str
    max_attempts: int
    checkpoint: bytes
    context_version: int
    input: dict[str, Any]
    idempotency_key: str | None
    created_at: datetime
    redispatch_at: datetime
    order: int  # creation order: newest first among equal ``created_at``
    prev_state: str | None = None
    status: str = "pending"
    step_seq: int = 1
    attempt: int = 0
    lease_token: str | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    claimed_at: datetime | None = None
    output: Any = None
    error_code: str | None = None
    error: str | None = None
    group_id: int | None = None
    finished_at: datetime | None = None
    priority: int = 0
    run_deadline: datetime | None = None
    wait: dict[str, Any] | None = None  # a WaitPlan's JSON while the run waits
    wait_event: str | None = None
    wait_deadline: datetime | None = None
    signal: Any = None  # the payload that resumed the run, until it moves on
    cancel_requested: bool = False
    cancel_reason: str | None = None
    lock_key: str | None = None  # the lock the run holds, its token, where it is freed
    lock_token: str | None = None
    lock_until: str | None = None
    tenant: str = "default"
    not_before: datetime = field(init=False)
    updated_at: datetime = field(init=False)

    def past_deadline(self, now: datetime) -> bool:
        return self.run_deadline is not None and self.run_deadline <= now

    def __post_init__(self) -> None:
        self.not_before = self.updated_at = self.created_at


@dataclass(slots=True)
class Group:
    id: int
    run_id: str
    parent_seq: int
    parent_state: str
    fork: Fork
    status: str = "running"
    done: int = 0
    failed: int = 0

    @property
    def width(self) -> int:
        return len(self.fork.states)

    def record(self, branches: tuple[rec.BranchResult, ...] = ()) -> rec.GroupRecord:
        return rec.GroupRecord(
            id=self.id,
            kind=self.fork.kind,
            join_state=self.fork.join_state,
            width=self.width,
            done=self.done,
            failed=self.failed,
            status=self.status,
            on_branch_error=self.fork.on_branch_error,
            max_concurrency=self.fork.max_concurrency,
            parent_seq=self.parent_seq,
            branches=branches,
        )


@dataclass(slots=True)
class Branch:
    group_id: int
    idx: int
    run_id: str
    state: str
    status: str
    max_attempts: int
    item: Any
    not_before: datetime
    redispatch_at: datetime
    attempt: int = 0
    lease_token: str | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    claimed_at: datetime | None = None
    result: Any = None
    error: str | None = None
    finished_at: datetime | None = None

    def record(self) -> rec.BranchResult:
        return rec.BranchResult(self.idx, self.state, self.status, as_json(self.result), self.error)


@dataclass(slots=True)
class SignalRow:
    id: int
    run_id: str
    signal_id: str
    event: str
    payload: Any
    received_at: datetime
    consumed_at: datetime | None = None
    consumed_seq: int | None = None

    def record(self) -> rec.SignalRecord:
        return rec.SignalRecord(
            self.signal_id,
            self.event,
            as_json(self.payload),
            self.received_at,
            self.consumed_at,
            self.consumed_seq,
        )


@dataclass(slots=True)
class LockRow:
    key: str
    fence: int = 0
    token: str | None = None
    holder: str | None = None
    holder_run: str | None = None
    holder_state: str | None = None
    acquired_at: datetime | None = None
    expires_at: datetime | None = None
    released_at: datetime | None = None


@dataclass(slots=True)
class Mark:
    probe_sent_at: datetime | None = None
    passed_at: datetime | None = None


def as_json(value: Any) -> Any:
    """``value`` as a JSONB column gives it back: a copy, tuples as lists."""
    return None if value is None else json.loads(json.dumps(value))


def run_key(run_id: str) -> str | None:
    """The canonical form of a run id (a UUID), or None when it is malformed."""
    try:
        return str(uuid.UUID(str(run_id)))
    except ValueError:
        return None


def wait_seconds(not_before: datetime, now: datetime) -> float:
    return max(0.0, (not_before - now).total_seconds())


def free_lock(row: LockRow, now: datetime) -> None:
    row.token = row.holder = row.holder_run = row.holder_state = row.expires_at = None
    row.released_at = now


def clear_lease(row: Run | Branch) -> None:
    row.lease_token = row.lease_owner = None
    row.lease_expires_at = row.claimed_at = None


def holds(row: Run | Branch | None, token: str, now: datetime, *, expired: bool = False) -> bool:
    """The fence: ``token`` is the row's running lease, unexpired (for the reaper:
    expired) by the store's clock."""
    if row is None or row.status != "running" or row.lease_token != token:
        return False
    assert row.lease_expires_at is not None
    return row.lease_expires_at <= now if expired else row.lease_expires_at > now


class Tables:
    """The tables and the helpers every part of the store shares."""

    #: The tenant new runs get; when ``scoped`` (``for_tenant``), the only one whose
    #: runs this view sees (another tenant's run is "not found", as under PostgreSQL's
    #: row-level security).
    tenant = "default"
    scoped = False

    def __init__(self, *, clock: Clock | None = None, dispatch_timeout: float = 60.0) -> None:
        self._clock: Clock = clock or (lambda: datetime.now(UTC))
        self.dispatch_timeout = dispatch_timeout
        self._lock = threading.RLock()
        self._edges: dict[tuple[str, int], frozenset[tuple[str, str]]] = {}
        self._runs: dict[str, Run] = {}
        self._steps: dict[str, list[rec.StepRecord]] = {}
        self._groups: dict[int, Group] = {}
        self._branches: dict[tuple[int, int], Branch] = {}
        self._marks: dict[str, Mark] = {}
        self._signals: dict[str, list[SignalRow]] = {}
        self._locks: dict[str, LockRow] = {}
        self._lock_audit: list[rec.LockAudit] = []
        self._signal_ids = itertools.count(1)
        self._order = itertools.count()
        self._group_ids = itertools.count(1)
        #: The writes of ``in_commit`` callbacks whose commit landed, in commit order.
        self.in_commit_log: list[InCommitWrite] = []
        #: ``run_id -> {name: (metadata, stored bytes)}``: artefacts, deleted with their run.
        self._artifacts: dict[str, dict[str, tuple[ArtifactRecord, bytes]]] = {}
        #: Workers seen by ``heartbeat`` and ``count_lease_lost``.
        self.workers: dict[str, WorkerRow] = {}

    def _now(self) -> datetime:
        return self._clock()

    def _later(self, now: datetime, seconds: float) -> datetime:
        return now + timedelta(seconds=seconds)

    def _callbacks(self, run_id: str, callbacks: Sequence[rec.InCommit]) -> list[InCommitWrite]:
        """Run the ``in_commit`` callbacks (``InCommitError`` if one raises); returns
        their writes, to keep if the commit lands."""
        raise NotImplementedError

    def _keep(self, writes: list[InCommitWrite], now: datetime) -> None:
        """The writes of a commit that landed: artefacts to their table, the rest to
        ``in_commit_log``."""
        for write in writes:
            if write.sql != artifact_sql.PUT:
                self.in_commit_log.append(write)
                continue
            p = dict(write.params)
            blob = p.pop("data")
            del p["codec"]
            meta = ArtifactRecord(**p, created_at=now)
            self._artifacts.setdefault(meta.run_id, {})[meta.name] = (meta, blob)

    def _held(self, key: str | None, token: str | None) -> LockRow | None:
        """The lock ``key`` if ``token`` holds it."""
        row = self._locks.get(key or "")
        return row if row is not None and token is not None and row.token == token else None

    def _free_run_lock(self, run: Run, now: datetime) -> None:
        """The run ends: its lock (if still its own) is freed and forgotten."""
        row = self._held(run.lock_key, run.lock_token)
        if row is not None:
            free_lock(row, now)
        run.lock_key = run.lock_token = run.lock_until = None

    def _check_edge(self, run: Run, to_state: str) -> None:
        """The transition guard: refuse a move along an undeclared edge."""
        if to_state == run.state:
            return
        if (run.state, to_state) not in self._edges.get((run.workflow, run.version), ()):
            raise errors.IllegalTransition(run.id, run.state, to_state)

    def _step(self, run: Run, now: datetime, **fields: Any) -> None:
        """Log the step that ends ``run.step_seq`` (call before bumping it)."""
        row: dict[str, Any] = {
            "attempt": run.attempt,
            "next_state": None,
            "started_at": None,
            "duration_ms": None,
            "worker": None,
            "lease_token": None,
            "error": None,
        }
        row.update(fields)
        self._steps[run.id].append(
            rec.StepRecord(seq=run.step_seq, state=run.state, finished_at=now, **row)
        )


class Branches(Tables):
    """Parallel / Map branches: claims, fenced commits, the join (exactly once)."""

    def claim_branch(
        self,
        group_id: int,
        idx: int,
        *,
        owner: str,
        ttl: float,
        versions: Sequence[int] | None = None,
    ) -> rec.BranchClaim | None:
        with self._lock:
            now = self._now()
            branch = self._branches.get((group_id, idx))
            if branch is None or branch.status != "pending" or branch.not_before > now:
                return None
            group = self._groups[group_id]
            if group.status != "running":
                return None
            run = self._runs[branch.run_id]
            if versions is not None and run.version not in versions:
                return None
            branch.status, branch.attempt = "running", branch.attempt + 1
            branch.lease_token, branch.lease_owner = str(uuid.uuid4()), owner
            branch.lease_expires_at, branch.claimed_at = self._later(now, ttl), now
            return rec.BranchClaim(
                group_id=group_id,
                idx=idx,
                run_id=run.id,
                workflow=run.workflow,
                version=run.version,
                state=branch.state,
                attempt=branch.attempt,
                max_attempts=branch.max_attempts,
                lease_token=branch.lease_token,
                started_at=now,
                item=as_json(branch.item),
                checkpoint=group.fork.checkpoint,
                context_version=group.fork.context_version,
                input=as_json(run.input),
                kind=group.fork.kind,
                priority=run.priority,
            )

    def peek_branch(self, group_id: int, idx: int) -> rec.BranchPeek | None:
        with self._lock:
            branch = self._branches.get((group_id, idx))
            if branch is None:
                return None
            workflow = self._runs[branch.run_id].workflow
            wait = wait_seconds(branch.not_before, self._now())
            return rec.BranchPeek(branch.status, branch.run_id, workflow, branch.state, wait)

    def commit_branch(
        self,
        group_id: int,
        idx: int,
        token: str,
        decision: BranchDecision,
        *,
        callbacks: Sequence[rec.InCommit] = (),
        expired: bool = False,
    ) -> rec.BranchCommit | None:
        refuse_unstorable(f"branch {idx} of group {group_id}", decision)
        with self._lock:
            now = self._now()
            branch = self._branches.get((group_id, idx))
            if branch is None or not holds(branch, token, now, expired=expired):
                return None
            run = self._runs[branch.run_id]
            if decision.status == "retry":  # as the SQL: a retry runs no callbacks
                clear_lease(branch)
                branch.status, branch.error = "pending", decision.error
                branch.not_before = self._later(now, decision.delay)
                branch.redispatch_at = self._later(now, decision.delay + self.dispatch_timeout)
                return rec.BranchCommit(run_id=run.id, retry_state=branch.state)
            group = self._groups[group_id]
            failed = decision.status == "failed"
            fails_fast = failed and group.fork.on_branch_error == "fail_fast"
            joins = not fails_fast and group.done + group.failed + 1 == group.width
            parent_waits = run.status == "waiting" and run.group_id == group_id
            if group.status == "running" and joins and parent_waits:
                self._check_edge(run, group.fork.join_state)
            writes = self._callbacks(run.id, callbacks)
            # -- nothing can refuse the commit any more: write it --
            clear_lease(branch)
            branch.status, branch.finished_at = decision.status, now
            branch.result, branch.error = as_json(decision.result), decision.error
            self._keep(writes, now)
            if group.status != "running":  # closed meanwhile (failed fast)
                return rec.BranchCommit(run_id=run.id)
            group.done += not failed
            group.failed += failed
            if fails_fast:
                self._fail_group(group, run, f"branch {idx} failed: {decision.error}", now)
                return rec.BranchCommit(run_id=run.id, parent_failed=True)
            if joins:
                group.status = "joined"
                if not parent_waits:  # the parent is no longer waiting (cancelled)
                    return rec.BranchCommit(run_id=run.id)
                run.prev_state, run.state = run.state, group.fork.join_state
                run.status, run.attempt = "pending", 0
                run.max_attempts = group.fork.join_max_attempts
                run.not_before = run.updated_at = now
                run.redispatch_at = self._later(now, self.dispatch_timeout)
                join = rec.JoinDue(run.workflow, run.state, run.step_seq, run.version, run.priority)
                return rec.BranchCommit(run_id=run.id, join=join)
            return rec.BranchCommit(run_id=run.id, released=self._release(group, now))

    def _fail_group(self, group: Group, run: Run, reason: str, now: datetime) -> None:
        """fail_fast: close the group, cancel the other branches, fail the parent."""
        group.status = "failed"
        for idx in range(group.width):
            sibling = self._branches[(group.id, idx)]
            if sibling.status in ("held", "pending", "running"):
                sibling.status, sibling.finished_at = "cancelled", now
                sibling.lease_token = sibling.lease_owner = None
                sibling.lease_expires_at = None
        if run.status == "waiting" and run.group_id == group.id:
            self._free_run_lock(run, now)
            self._step(run, now, attempt=1, outcome="failed", started_at=now, error=reason)
            run.status, run.error_code, run.error = "failed", errors.BRANCH_FAILED, reason
            run.step_seq += 1
            run.finished_at = run.updated_at = now

    def _release(self, group: Group, now: datetime) -> tuple[rec.BranchRef, ...]:
        """Map window: the first held branch takes the slot a final branch freed."""
        if group.fork.max_concurrency is None:
            return ()
        for idx in range(group.width):
            branch = self._branches[(group.id, idx)]
            if branch.status == "held":
                branch.status, branch.not_before = "pending", now
                branch.redispatch_at = self._later(now, self.dispatch_timeout)
                return (rec.BranchRef(idx, branch.state),)
        return ()

    def branch_results(self, group_id: int) -> list[rec.BranchResult]:
        with self._lock:
            group = self._groups.get(group_id)
            if group is None:
                return []
            return [self._branches[(group_id, i)].record() for i in range(group.width)]
