"""The in-memory run store: ``PostgresStore``'s semantics in one process.

Users unit-test workflows on it and ``leaseflow.testing`` runs on it; it passes the
same contract suite as ``PostgresStore`` (``tests/contract``). Every method holds one
lock, so each is one atomic "transaction". The clock passed in is the store's
database time: lease expiry, ``not_before``, re-dispatch and probe times are judged
by it alone, so a test moves time by moving its clock.

``ctx.in_commit`` callbacks get a ``RecordingConnection``; what they ``execute``
lands in ``MemoryStore.in_commit_log`` only if their commit lands. Every check that
can refuse a commit (the values PostgreSQL would refuse, the fence, the transition
table, the callbacks) runs before anything is written, so a refused commit writes
nothing.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from leaseflow import errors
from leaseflow.fsm import checkpoint, definition, waits
from leaseflow.fsm.rules import Fork, Transition
from leaseflow.store import _memory as tables
from leaseflow.store import records as rec
from leaseflow.store._memory import Clock, InCommitWrite, WorkerRow
from leaseflow.store._memory_conn import RecordingConnection
from leaseflow.store._memory_dispatch import Dispatcher
from leaseflow.store._memory_ops import Lifecycle
from leaseflow.store._memory_purge import Retention
from leaseflow.store._memory_reaper import Reaper
from leaseflow.store._memory_workers import Registry
from leaseflow.store.artifact_records import ArtifactRecord
from leaseflow.store.base import Extended, LeaseRef, NewRun

__all__ = ["InCommitWrite", "MemoryStore", "RecordingConnection", "WorkerRow"]


class _Runs(Lifecycle):
    """Definitions, new runs, claims, commits and leases of runs."""

    def register_workflow(self, wf: definition.Workflow) -> None:
        wf.validate()
        with self._lock:
            self._edges[(wf.name, wf.version)] = frozenset(wf.edges())

    def create_run(
        self,
        *,
        run_id: str,
        wf: definition.Workflow,
        checkpoint: bytes,
        input: dict[str, Any],
        idempotency_key: str | None,
        priority: int = 0,
    ) -> rec.Created:
        self.register_workflow(wf)
        with self._lock:
            if idempotency_key is not None:
                for run in self._runs.values():
                    same = run.tenant == self.tenant and run.workflow == wf.name
                    if same and run.idempotency_key == idempotency_key:
                        if run.input != tables.as_json(input):
                            raise errors.IdempotencyConflict(wf.name, idempotency_key, run.id)
                        return rec.Created(run.id, False)
            key = self._new_ids([run_id])[0]
            self._insert(wf, key, checkpoint, input, idempotency_key, priority)
            return rec.Created(key, True)

    def create_runs(self, *, wf: definition.Workflow, runs: Sequence[NewRun]) -> None:
        if not runs:
            return
        self.register_workflow(wf)
        with self._lock:
            keys = self._new_ids([new.run_id for new in runs])  # all checked before any insert
            for key, new in zip(keys, runs, strict=True):
                self._insert(wf, key, new.checkpoint, new.input, None, new.priority)

    def _new_ids(self, run_ids: Sequence[str]) -> list[str]:
        """The canonical ids of new runs; ``RunExists`` if one is malformed or taken."""
        keys: list[str] = []
        for run_id in run_ids:
            key = tables.run_key(run_id)
            if key is None:
                raise errors.RunExists(run_id)
            if key in self._runs or key in keys:
                raise errors.RunExists(run_id)
            keys.append(key)
        return keys

    def _insert(
        self,
        wf: definition.Workflow,
        key: str,
        checkpoint: bytes,
        input: dict[str, Any],
        idempotency_key: str | None,
        priority: int,
    ) -> None:
        now = self._now()
        deadline = None if wf.run_timeout is None else self._later(now, wf.run_timeout)
        self._runs[key] = tables.Run(
            tenant=self.tenant,
            id=key,
            workflow=wf.name,
            version=wf.version,
            state=wf.initial.name,
            max_attempts=wf.initial.retry.max_attempts,
            checkpoint=bytes(checkpoint),
            context_version=wf.context_version,
            input=tables.as_json(input),
            idempotency_key=idempotency_key,
            created_at=now,
            redispatch_at=self._later(now, self.dispatch_timeout),
            order=next(self._order),
            priority=priority,
            run_deadline=deadline,
        )
        self._steps[key] = []

    def claim(
        self,
        run_id: str,
        step_seq: int,
        *,
        owner: str,
        ttl: float,
        versions: Sequence[int] | None = None,
    ) -> rec.Claim | None:
        with self._lock:
            now = self._now()
            run = self._runs.get(tables.run_key(run_id) or "")
            if run is None or run.status != "pending" or run.step_seq != step_seq:
                return None
            if run.not_before > now or run.past_deadline(now):
                return None
            if versions is not None and run.version not in versions:
                return None
            run.status, run.attempt, run.updated_at = "running", run.attempt + 1, now
            run.lease_token, run.lease_owner = str(uuid.uuid4()), owner
            run.lease_expires_at, run.claimed_at = self._later(now, ttl), now
            return rec.Claim(
                run_id=run.id,
                workflow=run.workflow,
                version=run.version,
                state=run.state,
                step_seq=run.step_seq,
                attempt=run.attempt,
                max_attempts=run.max_attempts,
                lease_token=run.lease_token,
                started_at=now,
                checkpoint=run.checkpoint,
                context_version=run.context_version,
                input=tables.as_json(run.input),
                group_id=run.group_id,
                priority=run.priority,
                signal=tables.as_json(run.signal),
                lock_key=run.lock_key,
                lock_token=run.lock_token,
                lock_until=run.lock_until,
                due_at=run.not_before,
            )

    def peek(self, run_id: str) -> rec.Peek | None:
        with self._lock:
            run = self._runs.get(tables.run_key(run_id) or "")
            if run is None:
                return None
            wait = tables.wait_seconds(run.not_before, self._now())
            return rec.Peek(
                run.status,
                run.step_seq,
                run.workflow,
                run.state,
                wait,
                run.version,
                run.priority,
                run.past_deadline(self._now()),
            )

    def commit(
        self,
        claim: rec.Claim,
        tr: Transition,
        *,
        worker: str,
        callbacks: Sequence[rec.InCommit] = (),
        handoff_ttl: float | None = None,
        lock_ttl: float = 60.0,
    ) -> rec.Committed | None:
        if claim.holds_lock and handoff_ttl is not None:
            raise ValueError("a state holding a lock is not handed off")
        if handoff_ttl is not None and (
            tr.next_state is None or tr.status != "pending" or tr.delay
        ):
            raise ValueError("only an immediate move to another state can be handed off")
        tables.refuse_unstorable(f"step {claim.step_seq} of run {claim.run_id}", tr)
        with self._lock:
            now = self._now()
            run = self._runs.get(tables.run_key(claim.run_id) or "")
            if run is None or not tables.holds(run, claim.lease_token, now):
                return None
            ended = self._ended_instead(run, now)
            if ended is None and claim.holds_lock and not self._guard(claim):
                return None  # the lock is no longer the run's: a guarded commit is refused
            if ended is not None:  # asked to cancel, or past its deadline: ends so instead
                self._end_leased(run, now, ended, worker=worker, started_at=claim.started_at)
                return rec.Committed(step_seq=run.step_seq, ended=ended)
            if tr.next_state is not None:
                self._check_edge(run, tr.next_state)
            writes = self._callbacks(run.id, callbacks)
            # -- nothing can refuse the commit any more: write it --
            self._step(
                run,
                now,
                attempt=claim.attempt,
                outcome=tr.outcome,
                next_state=tr.next_state,
                started_at=claim.started_at,
                duration_ms=round(1000 * (now - claim.started_at).total_seconds()),
                worker=worker,
                lease_token=claim.lease_token,
                error=tr.step_error,
                context_bytes=tr.context_bytes,
                checkpoint_bytes=tr.checkpoint_bytes,
            )
            if tr.next_state is not None:
                run.prev_state, run.state, run.signal = run.state, tr.next_state, None
            tables.clear_lease(run)
            run.status, run.step_seq, run.group_id = tr.status, run.step_seq + 1, None
            run.attempt, run.max_attempts = tr.attempt, tr.max_attempts
            run.not_before = self._later(now, tr.delay)
            run.redispatch_at = self._later(now, tr.delay + self.dispatch_timeout)
            if tr.checkpoint is not None:
                run.checkpoint = bytes(tr.checkpoint)
            if tr.context_version is not None:
                run.context_version = tr.context_version
            run.output = tables.as_json(tr.output)
            run.error_code, run.error = tr.error_code, tr.error
            run.finished_at, run.updated_at = (now if tr.terminal else None), now
            if tr.fork is not None:
                run.group_id = self._fork(run, claim, tr.fork, now)
            resumed = None
            if tr.wait is not None:
                self._park(run, tr.wait, now)
                stored = (
                    None if tr.wait.event is None else self._take_signal(run, tr.wait.event, now)
                )
                if stored is not None:
                    to = waits.on_signal(tr.wait)
                    self._resume(run, to, stored.payload, now)
                    resumed = to.state
            handoff = None
            if handoff_ttl is not None:
                run.status, run.attempt, run.claimed_at = "running", 1, now
                run.lease_token, run.lease_owner = str(uuid.uuid4()), worker
                run.lease_expires_at = self._later(now, handoff_ttl)
                handoff = claim.handed_off(tr, token=run.lease_token, started_at=now)
            if claim.holds_lock:
                self._settle_lock(run, claim, claim.releases_lock(tr.terminal), lock_ttl, now)
            self._keep(writes, now)
            return rec.Committed(
                step_seq=run.step_seq, group_id=run.group_id, handoff=handoff, resumed=resumed
            )

    def _fork(self, run: tables.Run, claim: rec.Claim, fork: Fork, now: datetime) -> int:
        """Create the group of a fork and its branches (``held`` beyond the window)."""
        group = tables.Group(next(self._group_ids), run.id, claim.step_seq, claim.state, fork)
        self._groups[group.id] = group
        items = fork.items if fork.items is not None else (None,) * group.width
        window = fork.max_concurrency
        for idx, (state, attempts, item) in enumerate(
            zip(fork.states, fork.max_attempts, items, strict=True)
        ):
            self._branches[(group.id, idx)] = tables.Branch(
                group_id=group.id,
                idx=idx,
                run_id=run.id,
                state=state,
                status="pending" if window is None or idx < window else "held",
                max_attempts=attempts,
                item=tables.as_json(item),
                not_before=now,
                redispatch_at=self._later(now, self.dispatch_timeout),
            )
        return group.id

    def heartbeat(
        self,
        leases: Sequence[LeaseRef],
        *,
        worker: str,
        ttl: float,
        info: rec.WorkerInfo | None = None,
    ) -> Extended:
        with self._lock:
            now = self._now()
            seen = self.workers.setdefault(worker, WorkerRow(now, started_at=now))
            seen.last_seen_at, seen.status, seen.leases_held = now, "alive", len(leases)
            if info is not None:
                seen.queues = ",".join(info.queues) or seen.queues
                seen.concurrency = info.concurrency or seen.concurrency
            extended: set[str] = set()
            cancelled: set[str] = set()
            for lease in leases:
                row: tables.Run | tables.Branch | None
                if lease.group_id is None:
                    row = self._runs.get(tables.run_key(lease.run_id) or "")
                elif lease.idx is not None:
                    row = self._branches.get((lease.group_id, lease.idx))
                else:  # as the SQL: any branch of the group under that token
                    group = self._groups.get(lease.group_id)
                    width = group.width if group is not None else 0
                    mine = (self._branches[(lease.group_id, i)] for i in range(width))
                    row = next((b for b in mine if b.lease_token == lease.token), None)
                if tables.holds(row, lease.token, now):
                    assert row is not None
                    row.lease_expires_at = self._later(now, ttl)
                    extended.add(lease.token)
                    if isinstance(row, tables.Run):
                        if row.cancel_requested:
                            cancelled.add(lease.token)
                        held = self._held(row.lock_key, row.lock_token)
                        if held is not None:  # the run's lock is leased with it
                            held.expires_at = self._later(now, ttl)
                elif (
                    isinstance(row, tables.Branch)
                    and row.status == "cancelled"
                    and row.lease_token == lease.token
                ):
                    cancelled.add(lease.token)
            return Extended(extended, cancelled)


class MemoryStore(_Runs, tables.Branches, Reaper, Dispatcher, Registry, Retention):
    """An in-memory ``RunStore`` with ``PostgresStore``'s semantics; thread-safe.

    ``clock`` (default: the wall clock, UTC) is the store's database time;
    ``dispatch_timeout`` is how long a published message may take before the
    dispatcher considers it overdue.
    """

    def __init__(self, *, clock: Clock | None = None, dispatch_timeout: float = 60.0) -> None:
        super().__init__(clock=clock, dispatch_timeout=dispatch_timeout)

    def for_tenant(self, tenant: str) -> MemoryStore:
        """A view of this store (same tables) that creates runs of ``tenant`` and sees
        only that tenant's runs: another tenant's run is ``RunNotFound``."""
        view = copy.copy(self)
        view.tenant, view.scoped = tenant, True
        return view

    def _callbacks(self, run_id: str, callbacks: Sequence[rec.InCommit]) -> list[InCommitWrite]:
        conn = RecordingConnection(run_id)
        for callback in callbacks:
            try:
                callback(conn)
            except Exception as exc:
                raise errors.InCommitError(run_id, repr(exc)) from exc
        return conn.writes

    # -- reading ---------------------------------------------------------------------

    def get_run(self, run_id: str, *, with_steps: bool = True) -> rec.RunRecord:
        with self._lock:
            run = self._run(run_id)
            if not with_steps:
                return self._record(run)
            groups = tuple(
                group.record(tuple(self.branch_results(group.id)))
                for group in sorted(self._groups.values(), key=lambda g: g.id)
                if group.run_id == run.id
            )
            artifacts = tuple(
                meta for _, (meta, _) in sorted(self._artifacts.get(run.id, {}).items())
            )
            return self._record(
                run, tuple(self._steps[run.id]), groups, self.signal_records(run.id), artifacts
            )

    def get_artifact(self, run_id: str, name: str) -> ArtifactRecord:
        with self._lock:
            run = self._run(run_id)
            found = self._artifacts.get(run.id, {}).get(name)
        if found is None:
            raise errors.ArtifactNotFound(run_id, name)
        meta, blob = found
        return replace(meta, data=checkpoint.unpack(blob, what=f"artifact {name!r}"))

    def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        tenant: str | None = None,
        before: tuple[datetime, str] | None = None,
    ) -> list[rec.RunRecord]:
        with self._lock:
            # Newest first by creation, ties in creation order (a manual clock makes
            # many); the page after ``before`` is the runs that sort after that run.
            last = None if before is None else self._runs.get(tables.run_key(before[1]) or "")
            after = None if before is None else (before[0], -1 if last is None else last.order)
            runs = [
                run
                for run in self._runs.values()
                if (status is None or run.status == status)
                and (workflow is None or run.workflow == workflow)
                and (tenant is None or run.tenant == tenant)
                and (not self.scoped or run.tenant == self.tenant)
                and (after is None or (run.created_at, run.order) < after)
            ]
            runs.sort(key=lambda run: (run.created_at, run.order), reverse=True)
            return [self._record(run) for run in runs[: max(limit, 0)]]

    def _record(
        self,
        run: tables.Run,
        steps: tuple[rec.StepRecord, ...] = (),
        groups: tuple[rec.GroupRecord, ...] = (),
        signals: tuple[rec.SignalRecord, ...] = (),
        artifacts: tuple[ArtifactRecord, ...] = (),
    ) -> rec.RunRecord:
        return rec.RunRecord(
            id=run.id,
            workflow=run.workflow,
            version=run.version,
            state=run.state,
            prev_state=run.prev_state,
            status=run.status,
            step_seq=run.step_seq,
            attempt=run.attempt,
            max_attempts=run.max_attempts,
            lease_owner=run.lease_owner,
            lease_expires_at=run.lease_expires_at,
            not_before=run.not_before,
            input=tables.as_json(run.input),
            output=tables.as_json(run.output),
            error_code=run.error_code,
            error=run.error,
            idempotency_key=run.idempotency_key,
            created_at=run.created_at,
            updated_at=run.updated_at,
            finished_at=run.finished_at,
            priority=run.priority,
            wait_event=run.wait_event,
            wait_deadline=run.wait_deadline,
            run_deadline=run.run_deadline,
            cancel_requested=run.cancel_requested,
            tenant=run.tenant,
            steps=steps,
            groups=groups,
            signals=signals,
            artifacts=artifacts,
        )

    def close(self) -> None:
        """Nothing to release: the tables live as long as the store."""

    def count_lease_lost(self, worker: str) -> None:
        with self._lock:
            now = self._now()
            seen = self.workers.setdefault(worker, WorkerRow(now))
            seen.leases_lost += 1
            seen.last_seen_at = now
