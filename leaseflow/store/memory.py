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

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from leaseflow import errors
from leaseflow.fsm import definition
from leaseflow.fsm.rules import Fork, Transition
from leaseflow.store import _memory as tables
from leaseflow.store import records as rec
from leaseflow.store._memory import Clock, InCommitWrite, WorkerRow
from leaseflow.store.base import LeaseRef, NewRun

__all__ = ["InCommitWrite", "MemoryStore", "RecordingConnection", "WorkerRow"]


class RecordingConnection:
    """The connection ``ctx.in_commit`` callbacks get from the memory store: each
    ``execute(sql, params)`` is recorded, and kept only if the commit lands."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.writes: list[InCommitWrite] = []

    def execute(self, sql: str, params: Any = None) -> RecordingConnection:
        self.writes.append(InCommitWrite(self.run_id, sql, params))
        return self

    def fetchone(self) -> None:
        """Nothing is read back: the recorded writes have not run anywhere."""
        return None

    def fetchall(self) -> list[Any]:
        return []

    def cursor(self) -> RecordingConnection:
        """For callbacks written as ``with conn.cursor() as cur: cur.execute(...)``."""
        return self

    def __enter__(self) -> RecordingConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _Runs(tables.Tables):
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
    ) -> rec.Created:
        self.register_workflow(wf)
        with self._lock:
            if idempotency_key is not None:
                for run in self._runs.values():
                    if run.workflow == wf.name and run.idempotency_key == idempotency_key:
                        if run.input != tables.as_json(input):
                            raise errors.IdempotencyConflict(wf.name, idempotency_key, run.id)
                        return rec.Created(run.id, False)
            key = self._new_ids([run_id])[0]
            self._insert(wf, key, checkpoint, input, idempotency_key)
            return rec.Created(key, True)

    def create_runs(self, *, wf: definition.Workflow, runs: Sequence[NewRun]) -> None:
        if not runs:
            return
        self.register_workflow(wf)
        with self._lock:
            keys = self._new_ids([new.run_id for new in runs])  # all checked before any insert
            for key, new in zip(keys, runs, strict=True):
                self._insert(wf, key, new.checkpoint, new.input, None)

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
    ) -> None:
        now = self._now()
        self._runs[key] = tables.Run(
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
        )
        self._steps[key] = []

    def claim(self, run_id: str, step_seq: int, *, owner: str, ttl: float) -> rec.Claim | None:
        with self._lock:
            now = self._now()
            run = self._runs.get(tables.run_key(run_id) or "")
            if run is None or run.status != "pending" or run.step_seq != step_seq:
                return None
            if run.not_before > now:
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
            )

    def peek(self, run_id: str) -> rec.Peek | None:
        with self._lock:
            run = self._runs.get(tables.run_key(run_id) or "")
            if run is None:
                return None
            wait = tables.wait_seconds(run.not_before, self._now())
            return rec.Peek(run.status, run.step_seq, run.workflow, run.state, wait)

    def commit(
        self,
        claim: rec.Claim,
        tr: Transition,
        *,
        worker: str,
        callbacks: Sequence[rec.InCommit] = (),
        handoff_ttl: float | None = None,
    ) -> rec.Committed | None:
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
            )
            if tr.next_state is not None:
                run.prev_state, run.state = run.state, tr.next_state
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
            handoff = None
            if handoff_ttl is not None:
                run.status, run.attempt, run.claimed_at = "running", 1, now
                run.lease_token, run.lease_owner = str(uuid.uuid4()), worker
                run.lease_expires_at = self._later(now, handoff_ttl)
                handoff = claim.handed_off(tr, token=run.lease_token, started_at=now)
            self.in_commit_log.extend(writes)
            return rec.Committed(step_seq=run.step_seq, group_id=run.group_id, handoff=handoff)

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

    def heartbeat(self, leases: Sequence[LeaseRef], *, worker: str, ttl: float) -> frozenset[str]:
        with self._lock:
            now = self._now()
            seen = self.workers.setdefault(worker, WorkerRow(now))
            seen.last_seen_at = now
            extended: set[str] = set()
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
            return frozenset(extended)

    def count_lease_lost(self, worker: str) -> None:
        with self._lock:
            now = self._now()
            seen = self.workers.setdefault(worker, WorkerRow(now))
            seen.leases_lost += 1
            seen.last_seen_at = now


class _Dispatcher(tables.Tables):
    """The dispatcher: overdue messages of pending runs and branches, queue probes."""

    def _overdue(self, rows: Sequence[tables.Run | tables.Branch], now: datetime) -> list[Any]:
        due = [
            row
            for row in rows
            if row.finished_at is None and row.status == "pending" and row.redispatch_at <= now
        ]
        return sorted(due, key=lambda row: row.redispatch_at)

    def _published_by(self, row: tables.Run | tables.Branch) -> datetime:
        return row.redispatch_at - timedelta(seconds=self.dispatch_timeout)

    def overdue_runs(self, *, limit: int = 1000) -> list[rec.OverdueRun]:
        with self._lock:
            rows: list[tables.Run] = self._overdue(list(self._runs.values()), self._now())[:limit]
            return [
                rec.OverdueRun(run.id, run.workflow, run.state, self._published_by(run))
                for run in rows
            ]

    def overdue_branches(self, *, limit: int = 1000) -> list[rec.OverdueBranch]:
        with self._lock:
            rows: list[tables.Branch] = self._overdue(list(self._branches.values()), self._now())
            return [
                rec.OverdueBranch(
                    b.group_id,
                    b.idx,
                    self._runs[b.run_id].workflow,
                    b.state,
                    self._published_by(b),
                )
                for b in rows[:limit]
            ]

    def redispatch_runs(self, run_ids: Sequence[str]) -> list[rec.Due]:
        with self._lock:
            now = self._now()
            wanted = [self._runs.get(tables.run_key(run_id) or "") for run_id in run_ids]
            due: list[rec.Due] = []
            for run in self._overdue([r for r in wanted if r is not None], now):
                run.redispatch_at = self._later(now, self.dispatch_timeout)
                wait = tables.wait_seconds(run.not_before, now)
                due.append(
                    rec.Due(run.id, run.workflow, run.version, run.state, run.step_seq, wait)
                )
            return due

    def redispatch_branches(self, keys: Sequence[tuple[int, int]]) -> list[rec.DueBranch]:
        with self._lock:
            now = self._now()
            wanted = [self._branches.get((group_id, idx)) for group_id, idx in keys]
            due: list[rec.DueBranch] = []
            for b in self._overdue([b for b in wanted if b is not None], now):
                b.redispatch_at = self._later(now, self.dispatch_timeout)
                workflow = self._runs[b.run_id].workflow
                wait = tables.wait_seconds(b.not_before, now)
                due.append(rec.DueBranch(b.run_id, b.group_id, b.idx, workflow, b.state, wait))
            return due

    def queue_marks(self, queues: Sequence[str]) -> dict[str, datetime]:
        with self._lock:
            marks = {queue: self._marks.get(queue) for queue in queues}
            return {q: m.passed_at for q, m in marks.items() if m and m.passed_at is not None}

    def send_probe(self, queue: str) -> datetime | None:
        with self._lock:
            now = self._now()
            mark = self._marks.setdefault(queue, tables.Mark())
            sent, passed = mark.probe_sent_at, mark.passed_at
            on_its_way = (
                sent is not None
                and (passed is None or sent > passed)
                and sent >= now - timedelta(seconds=self.dispatch_timeout)
            )
            if on_its_way:
                return None
            mark.probe_sent_at = now
            return now

    def probe_passed(self, queue: str, sent_at: datetime) -> None:
        with self._lock:
            mark = self._marks.get(queue)
            if mark is not None:
                passed = mark.passed_at
                mark.passed_at = sent_at if passed is None else max(passed, sent_at)


class MemoryStore(_Runs, tables.Branches, tables.Reaper, _Dispatcher):
    """An in-memory ``RunStore`` with ``PostgresStore``'s semantics; thread-safe.

    ``clock`` (default: the wall clock, UTC) is the store's database time;
    ``dispatch_timeout`` is how long a published message may take before the
    dispatcher considers it overdue.
    """

    def __init__(self, *, clock: Clock | None = None, dispatch_timeout: float = 60.0) -> None:
        super().__init__(clock=clock, dispatch_timeout=dispatch_timeout)

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
            run = self._runs.get(tables.run_key(run_id) or "")
            if run is None:
                raise errors.RunNotFound(run_id)
            if not with_steps:
                return self._record(run)
            groups = tuple(
                group.record(tuple(self.branch_results(group.id)))
                for group in sorted(self._groups.values(), key=lambda g: g.id)
                if group.run_id == run.id
            )
            return self._record(run, tuple(self._steps[run.id]), groups)

    def list_runs(
        self, *, status: str | None = None, workflow: str | None = None, limit: int = 50
    ) -> list[rec.RunRecord]:
        with self._lock:
            runs = [
                run
                for run in self._runs.values()
                if (status is None or run.status == status)
                and (workflow is None or run.workflow == workflow)
            ]
            runs.sort(key=lambda run: (run.created_at, run.order), reverse=True)
            return [self._record(run) for run in runs[: max(limit, 0)]]

    def _record(
        self,
        run: tables.Run,
        steps: tuple[rec.StepRecord, ...] = (),
        groups: tuple[rec.GroupRecord, ...] = (),
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
            steps=steps,
            groups=groups,
        )

    def close(self) -> None:
        """Nothing to release: the tables live as long as the store."""
