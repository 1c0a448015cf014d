"""The run-store port: what the runner, the heartbeat, the beat jobs, the client and
the CLI need of a store. ``PostgresStore`` is the production adapter; ``MemoryStore``
keeps the same semantics in one process (``leaseflow.testing`` runs on it). Both pass
the contract suite in ``tests/contract``.

The semantics every store keeps:

- A claim takes a pending, due run at the step the message names and issues a fresh
  lease token; anything else claims nothing.
- Every write of a leased run or branch is fenced: it lands only while the token is
  the current one and unexpired by the store's own clock, and the check is part of
  the write. A commit along an edge the workflow did not declare raises
  ``IllegalTransition`` and writes nothing.
- A group's join happens exactly once: the one commit that completes the group moves
  the run to its join, however many final branch commits race.
- The reaper and the dispatcher act once per expired lease, overdue run or probe,
  even when two beats call them at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from leaseflow.fsm.definition import Workflow
from leaseflow.fsm.rules import BranchDecision, Transition
from leaseflow.store import purge_records
from leaseflow.store.artifact_records import ArtifactRecord
from leaseflow.store.records import (
    BranchClaim,
    BranchCommit,
    BranchPeek,
    BranchResult,
    CancelResult,
    Claim,
    Committed,
    Created,
    Due,
    DueBranch,
    ExpiredBranch,
    HeldLock,
    InCommit,
    LockAudit,
    LockContended,
    LockFreed,
    LockRecord,
    LockWant,
    OverdueBranch,
    OverdueRun,
    Peek,
    Reaped,
    Released,
    RunRecord,
    Signalled,
    WaitEnded,
    WorkerInfo,
    WorkerRecord,
)


@dataclass(frozen=True, slots=True)
class NewRun:
    """A run to create: its id, first checkpoint and input."""

    run_id: str
    checkpoint: bytes
    input: dict[str, Any]
    priority: int = 0


class Extended(frozenset[str]):
    """What a heartbeat answers: the lease tokens it extended (a token missing was
    lost); ``cancelled``: those whose run was asked to cancel (a branch's, cancelled)."""

    cancelled: frozenset[str]

    def __new__(cls, extended: Iterable[str] = (), cancelled: Iterable[str] = ()) -> Extended:
        self = super().__new__(cls, extended)
        self.cancelled = frozenset(cancelled)
        return self


@dataclass(frozen=True, slots=True)
class LeaseRef:
    """A lease the heartbeat keeps alive: a run's, or a branch's (``group_id``, ``idx``)."""

    run_id: str
    token: str
    group_id: int | None = None
    idx: int | None = None


@runtime_checkable
class RunStore(Protocol):
    """The run store. Implementations are thread-safe."""

    # -- definitions and new runs ------------------------------------------------------

    def for_tenant(self, tenant: str) -> RunStore:
        """A view that creates runs of ``tenant`` and sees and acts on its runs only
        (another tenant's run is ``RunNotFound``); engine work uses the store itself."""

    def register_workflow(self, wf: Workflow) -> None:
        """Record the workflow's legal transitions (idempotent)."""

    def create_run(
        self,
        *,
        run_id: str,
        wf: Workflow,
        checkpoint: bytes,
        input: dict[str, Any],
        idempotency_key: str | None,
        priority: int = 0,
    ) -> Created:
        """A pending run in the initial state, with ``wf.run_timeout`` as its deadline;
        with a used idempotency key, that run (``IdempotencyConflict`` when its input
        differs). A taken id: ``RunExists``."""

    def create_runs(self, *, wf: Workflow, runs: Sequence[NewRun]) -> None:
        """Create pending runs in one transaction: all or none (``RunExists``)."""

    # -- the step --------------------------------------------------------------------

    def claim(
        self,
        run_id: str,
        step_seq: int,
        *,
        owner: str,
        ttl: float,
        versions: Sequence[int] | None = None,
    ) -> Claim | None:
        """Lease the run if it is pending, due, at ``step_seq``, not past its deadline
        and (when ``versions`` is given) of one of them; else None."""

    def claim_locked(
        self,
        run_id: str,
        step_seq: int,
        *,
        owner: str,
        ttl: float,
        key_of: Callable[[Claim], LockWant | None],
        backoff: float,
        versions: Sequence[int] | None = None,
    ) -> Claim | LockContended | None:
        """``claim``, and in the same transaction the lock ``key_of(claim)`` names, or
        the one the run holds across states (``Claim.lock_fence`` set). Held by someone
        else: nothing is claimed, no attempt spent, the run deferred by ``backoff``
        seconds (``LockContended``)."""

    def hold_on(self, claim: Claim, *, ttl: float, backoff: float) -> Claim | LockContended:
        """A run claimed while it holds a lock across states: the lock refreshed, or
        taken again if it was lost; held by someone else meanwhile, the claim is handed
        back (attempt refunded, run deferred: ``LockContended``)."""

    def peek(self, run_id: str) -> Peek | None:
        """The run as it is now, to explain a claim that found nothing."""

    def commit(
        self,
        claim: Claim,
        tr: Transition,
        *,
        worker: str,
        callbacks: Sequence[InCommit] = (),
        handoff_ttl: float | None = None,
        lock_ttl: float = 60.0,
    ) -> Committed | None:
        """Write ``tr`` (and its fork or wait, if any) iff ``claim``'s lease still holds;
        None when it was lost. ``callbacks`` run in the same transaction. With
        ``handoff_ttl`` the same commit leases the next state to ``worker``
        (inline continuation), returned as ``Committed.handoff``. A Wait that finds
        a stored signal for its event resumes at once (``Committed.resumed``). A run
        asked to cancel, or past its deadline, is ended so instead, nothing else
        written (``Committed.ended``). When the run holds a lock, the commit is guarded:
        refused (None) unless the lock is still the run's; the lock is then freed
        (``claim.releases_lock``) or refreshed for ``lock_ttl`` seconds."""

    def heartbeat(
        self,
        leases: Sequence[LeaseRef],
        *,
        worker: str,
        ttl: float,
        info: WorkerInfo | None = None,
    ) -> Extended:
        """Extend the leases still held (and record the worker as alive); returns the
        tokens extended (a token missing from the answer was lost) and those asked to
        cancel. The worker checks in to the registry (``info``: its queues and pool
        size), whether or not it holds leases."""

    def count_lease_lost(self, worker: str) -> None:
        """Count a commit that was fenced out, against the worker."""

    # -- Parallel / Map branches ------------------------------------------------------

    def claim_branch(
        self,
        group_id: int,
        idx: int,
        *,
        owner: str,
        ttl: float,
        versions: Sequence[int] | None = None,
    ) -> BranchClaim | None:
        """Lease branch ``idx`` of a running group if it is pending and due; else None."""

    def peek_branch(self, group_id: int, idx: int) -> BranchPeek | None:
        """The branch as it is now, to explain a branch claim that found nothing."""

    def commit_branch(
        self,
        group_id: int,
        idx: int,
        token: str,
        decision: BranchDecision,
        *,
        callbacks: Sequence[InCommit] = (),
        expired: bool = False,
    ) -> BranchCommit | None:
        """Record a branch attempt fenced by ``token``; None when the lease was lost.
        ``callbacks`` run only with a final result (completed or failed), never with a
        retry. ``expired=True`` is the reaper, fenced by a token that has run out."""

    def branch_results(self, group_id: int) -> list[BranchResult]:
        """The group's branches in index order."""

    # -- beat ------------------------------------------------------------------------

    def reap(self, *, limit: int = 1000) -> list[Reaped]:
        """Expired run leases: back to pending while attempts remain, else failed."""

    def expired_branches(self, *, limit: int = 1000) -> list[ExpiredBranch]:
        """Branches whose lease ran out (the reaper finishes each with ``commit_branch``)."""

    def overdue_runs(self, *, limit: int = 1000) -> list[OverdueRun]:
        """Pending runs whose message is overdue."""

    def overdue_branches(self, *, limit: int = 1000) -> list[OverdueBranch]:
        """Pending branches whose message is overdue."""

    def redispatch_runs(self, run_ids: Sequence[str]) -> list[Due]:
        """Mark overdue runs re-published; returns those this call got."""

    def redispatch_branches(self, keys: Sequence[tuple[int, int]]) -> list[DueBranch]:
        """Mark overdue branches ``(group_id, idx)`` re-published; returns those this
        call got."""

    def queue_marks(self, queues: Sequence[str]) -> dict[str, datetime]:
        """``{queue: send time of the newest probe that came through it}``."""

    def send_probe(self, queue: str) -> datetime | None:
        """Start a probe of ``queue``: its send time, or None if one is on its way."""

    def probe_passed(self, queue: str, sent_at: datetime) -> None:
        """The probe of ``queue`` sent at ``sent_at`` came through."""

    # -- waits, signals, cancel, re-drive ------------------------------------------------

    def signal(self, run_id: str, event: str, payload: Any, *, signal_id: str) -> Signalled:
        """Store a signal once per ``(run_id, signal_id)`` (a second one is a
        ``duplicate``); if the run waits for ``event`` (and its wait has not timed out),
        resume it at the wait's ``next`` with ``payload`` as ``ctx.signal``.
        ``RunNotFound``; ``RunFinished`` for a finished run."""

    def cancel(self, run_id: str, reason: str | None = None) -> CancelResult:
        """A pending or waiting run is cancelled at once (its open groups stop); a
        running one is asked to (its heartbeat and its commit learn it); a finished
        one is left alone. ``RunNotFound``."""

    def redrive(
        self,
        run_id: str,
        *,
        from_state: str | None = None,
        max_attempts: int | None = None,
        run_timeout: float | None = None,
    ) -> Due:
        """A failed, cancelled or timed-out run back to ``pending`` at the state where it
        stopped (or ``from_state``, which its version must declare: else
        ``UnknownState``), attempts reset (to ``max_attempts`` when given), its
        checkpoint kept, a ``redriven`` step logged, a new deadline ``run_timeout``
        from now when given. ``RunActive``, ``RunCompleted``, ``RunNotFound``."""

    def sweep_waits(self, *, limit: int = 1000) -> list[WaitEnded]:
        """Waits past their deadline by the store's clock: to ``on_timeout`` (a timer:
        to ``next``), else failed ``E-WAIT-TIMEOUT``. Once per wait under two beats."""

    def sweep_deadlines(self, *, limit: int = 1000) -> list[WaitEnded]:
        """Runs past their deadline end ``timed_out`` (``E-RUN-TIMEOUT``)."""

    # -- the worker registry --------------------------------------------------------------

    def reap_dead_workers(self, *, self_id: str, after: float) -> list[str]:
        """Mark workers silent for ``after`` seconds dead (never ``self_id``) and expire
        their leases now, for the reaper; the dead ids. Once each under two beats."""

    def release_leases_of(self, owners: Sequence[str]) -> Released:
        """Hand back what ``owners`` lease (a worker shutting down): runs and branches
        pending at once, attempts refunded, a ``released`` step per run."""

    def forget_workers(self, ids: Sequence[str]) -> None:
        """Remove workers that stopped cleanly from the registry."""

    def list_workers(self, *, limit: int = 1000) -> list[WorkerRecord]:
        """The registry: alive workers first."""

    # -- resource locks ------------------------------------------------------------------

    def acquire_lock(self, key: str, *, holder: str, ttl: float) -> HeldLock:
        """Take ``key`` for ``holder`` (``locks.hold``); ``LockHeld`` if it is held."""

    def refresh_lock(self, key: str, token: str, *, ttl: float) -> bool:
        """Extend a held lock's lease; False if ``token`` no longer holds it."""

    def release_lock(self, key: str, token: str) -> bool:
        """Free a lock ``token`` holds; False if it no longer did."""

    def sweep_locks(self, *, limit: int = 1000) -> list[LockFreed]:
        """Free expired locks, each audited (``expired``); once each under two beats."""

    def force_release(self, key: str, *, actor: str, reason: str) -> LockFreed:
        """Free ``key`` whoever holds it, audited (``forced``): its holder's next guarded
        commit is refused. ``LockNotFound`` when nobody holds it."""

    def list_locks(self, *, limit: int = 1000) -> list[LockRecord]:
        """The held locks, by key."""

    def lock_audit(self, key: str | None = None, *, limit: int = 100) -> list[LockAudit]:
        """Audit rows, newest first."""

    # -- retention -----------------------------------------------------------------------

    def purge_runs(
        self,
        *,
        older_than: float,
        statuses: Sequence[str] = purge_records.FINISHED,
        dry_run: bool = False,
        batch: int = 500,
        max_runs: int | None = None,
        pause: float = 0.0,
    ) -> purge_records.Purged:
        """Delete finished runs of ``statuses`` (finished ones only: else ``ValueError``)
        whose ``finished_at`` is more than ``older_than`` seconds ago by the store's clock,
        with their steps, groups, branches, signals and artifacts: ``batch`` runs per
        short transaction, never one across batches, ``pause`` seconds between batches
        (room for live work), until a batch finds fewer or ``max_runs`` are gone. Two
        purgers at once delete each run once. ``dry_run``: the counts (and the first run
        ids), nothing deleted."""

    def purge_run(self, run_id: str, *, force: bool = False) -> purge_records.Purged:
        """Delete one run with its rows, in one transaction. ``RunNotFound``; an active
        run raises ``RunNotFinished`` unless ``force``: then the locks it holds are freed
        (audited ``forced`` by ``purge``), it is cancelled, and deleted; a worker still
        running one of its states is fenced off (its commit finds no run)."""

    # -- reading ---------------------------------------------------------------------

    def get_run(self, run_id: str, *, with_steps: bool = True) -> RunRecord:
        """The run, with its step log and groups; ``RunNotFound`` if there is none."""

    def get_artifact(self, run_id: str, name: str) -> ArtifactRecord:
        """An artefact of the run with its bytes (``data``); ``ArtifactNotFound``,
        ``RunNotFound``; ``CheckpointError`` if its stored bytes are damaged."""

    def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        tenant: str | None = None,
        before: tuple[datetime, str] | None = None,
    ) -> list[RunRecord]:
        """Newest first (by creation, then id), without step logs; ``before``: the
        ``(created_at, id)`` of the last run of the previous page (keyset)."""

    def close(self) -> None:
        """Release connections and threads."""
