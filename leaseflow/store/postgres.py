"""The PostgreSQL run store: short statements on psycopg 3 connections.

Each public method takes a connection from ``connections`` (retrying where that is
safe) and hands it to one ``*_txn`` function that owns the SQL: ``pg_runs`` (runs and
their commits), ``pg_groups`` (Parallel / Map), ``pg_beat`` (heartbeats and beat
jobs), ``pg_read``; every statement comes from ``queries``. No transaction stays open
while user code runs: a claim is one statement, a commit is one statement (or one
short explicit transaction when ``ctx.in_commit`` callbacks must join it, or a fork).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

import psycopg

from leaseflow import errors, settings
from leaseflow.fsm.definition import Workflow
from leaseflow.fsm.rules import BranchDecision, Fork, Transition
from leaseflow.store import (
    base,
    connections,
    pg_beat,
    pg_control,
    pg_groups,
    pg_jobs,
    pg_lock_ops,
    pg_locks,
    pg_operations,
    pg_read,
    pg_runs,
    queries,
)
from leaseflow.store import records as rec

#: The connection kinds (see ``connections``).
MAIN = connections.MAIN
CLAIMS = connections.CLAIMS


class PostgresStore(pg_operations.Operations, pg_jobs.BeatJobs, pg_lock_ops.Locks):
    """Run store on PostgreSQL (``base.RunStore``). Safe to share between threads;
    re-opens its connections after a fork."""

    def __init__(
        self,
        database_url: str,
        *,
        application_name: str = "leaseflow",
        max_size: int = 4,
        statement_timeout_ms: int = 30_000,
        dispatch_timeout: float = 60.0,
        async_claims: bool = True,
    ) -> None:
        self.dispatch_timeout = dispatch_timeout
        self.connections = connections.Connections(
            settings.libpq_url(database_url),
            application_name=application_name,
            max_size=max_size,
            statement_timeout_ms=statement_timeout_ms,
            async_claims=async_claims,
        )
        self._registered: set[tuple[str, int]] = set()
        self._registered_pid = os.getpid()

    def connection(self, kind: str = MAIN) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A pooled autocommit connection, for tools that query the database directly."""
        return self.connections.connection(kind)

    def close(self) -> None:
        self.connections.close()

    # -- definitions and new runs --------------------------------------------------

    def register_workflow(self, wf: Workflow) -> None:
        """Record the workflow's legal transitions (idempotent; cached per process)."""
        if self._registered_pid != os.getpid():
            self._registered, self._registered_pid = set(), os.getpid()
        key = (wf.name, wf.version)
        if key in self._registered:
            return
        wf.validate()
        self.connections.transact(lambda c: pg_runs.register_workflow_txn(c, wf), retry=True)
        self._registered.add(key)

    def create_run(
        self,
        *,
        run_id: str,
        wf: Workflow,
        checkpoint: bytes,
        input: dict[str, Any],
        idempotency_key: str | None,
        priority: int = 0,
    ) -> rec.Created:
        self.register_workflow(wf)
        params = pg_runs.new_run_params(
            wf,
            run_id,
            checkpoint,
            input,
            idempotency_key,
            dispatch_timeout=self.dispatch_timeout,
            priority=priority,
        )
        return self.connections.with_retry(lambda c: pg_runs.create_run_txn(c, wf, params, input))

    def create_runs(self, *, wf: Workflow, runs: Sequence[base.NewRun]) -> None:
        """All or none, with one pipelined round trip."""
        if not runs:
            return
        self.register_workflow(wf)
        timeout = self.dispatch_timeout
        params = [
            pg_runs.new_run_params(
                wf,
                r.run_id,
                r.checkpoint,
                r.input,
                None,
                dispatch_timeout=timeout,
                priority=r.priority,
            )
            for r in runs
        ]
        self.connections.transact(lambda c: pg_runs.create_runs_txn(c, params), retry=True)

    # -- the step ------------------------------------------------------------------

    def claim(
        self,
        run_id: str,
        step_seq: int,
        *,
        owner: str,
        ttl: float,
        versions: Sequence[int] | None = None,
    ) -> rec.Claim | None:
        """Take the lease of ``run_id`` at ``step_seq`` if it is pending and due (and of
        one of ``versions``, when given), and not past its deadline.

        With ``async_claims`` the claim commits without waiting for its WAL flush
        (``synchronous_commit=off``): it is visible at once, and every later
        synchronous commit (this lease's heartbeat or fenced commit, anyone's) flushes
        it too, the WAL being one sequence. Only a server crash in between can undo
        it, and that is a crashed worker's case: the run is pending again, this
        lease's commit is fenced out, and the state runs again. A transition is
        never undone: commits stay synchronous.
        """
        # Retried once on a fresh connection when the pooled one was dropped (an idle
        # connection the server closed). If the first claim did land and only its
        # reply was lost, the retry finds the run running and claims nothing: the
        # orphaned lease expires and the reaper hands the run on.
        known = pg_runs.int_array(versions)
        return self.connections.hot_with_retry(
            lambda cur: pg_runs.claim_txn(
                cur, run_id, step_seq, owner=owner, ttl=ttl, versions=known
            ),
            CLAIMS,
        )

    def peek(self, run_id: str) -> rec.Peek | None:
        return self.connections.with_retry(lambda c: pg_read.peek_txn(c, run_id))

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
        """Write ``tr`` iff ``claim``'s lease still holds; None when it was lost.

        ``callbacks`` run inside the same transaction, after the fenced update
        succeeded, so their writes commit exactly when the transition does. A fork
        creates its group and branches in that transaction. With ``handoff_ttl`` the
        same statement leases the next state to ``worker`` (inline continuation).
        A value the database refuses (any ``DataError``) raises ``UnstorableValue``,
        an undeclared edge ``IllegalTransition``; either way nothing is written.
        """
        params = pg_runs.commit_params(
            claim, tr, worker=worker, dispatch_timeout=self.dispatch_timeout
        )
        if (tr.fork is not None or tr.wait is not None) and handoff_ttl is not None:
            raise ValueError("a fork or a wait cannot be handed off")
        if claim.holds_lock:
            if handoff_ttl is not None:
                raise ValueError("a state holding a lock is not handed off")
            guarded = self._guarded(claim, tr, params, callbacks, lock_ttl=lock_ttl)
            return guarded if guarded is not None else self._refused(claim, params)
        if tr.fork is not None:
            forked = _fork(
                self.connections,
                claim,
                tr.fork,
                params,
                callbacks,
                dispatch_timeout=self.dispatch_timeout,
            )
            return forked if forked is not None else self._refused(claim, params)
        if tr.wait is not None:
            waited = self._wait(claim, tr, params, callbacks)
            return waited if waited is not None else self._refused(claim, params)
        if handoff_ttl is None:
            sql = queries.COMMIT_MOVE if tr.moves else queries.COMMIT_STAY
            row = _fenced(self.connections, claim, tr, sql, params, callbacks)
            if row is None:
                return self._refused(claim, params)
            return rec.Committed(step_seq=claim.step_seq + 1)
        if not tr.moves or tr.status != "pending" or tr.delay:
            raise ValueError("only an immediate move to another state can be handed off")
        token = str(uuid.uuid4())
        params |= {"next_token": token, "ttl": handoff_ttl}
        row = _fenced(self.connections, claim, tr, queries.COMMIT_HANDOFF, params, callbacks)
        if row is None:
            return self._refused(claim, params)
        # An empty row: it landed but its reply was lost with the connection; the next
        # state is leased to us and its start time is close enough to now.
        started_at = row[0] if row else datetime.now(UTC)
        handoff = claim.handed_off(tr, token=token, started_at=started_at)
        return rec.Committed(step_seq=claim.step_seq + 1, handoff=handoff)

    def _wait(
        self,
        claim: rec.Claim,
        tr: Transition,
        params: dict[str, Any],
        callbacks: Sequence[rec.InCommit],
    ) -> rec.Committed | None:
        """The commit of a Wait, in one transaction with the stored signal it may meet."""
        timeout = self.dispatch_timeout

        def txn(conn: psycopg.Connection[Any]) -> rec.Committed | None:
            with pg_runs.refusing_unstorable(_step(claim)):
                return pg_control.wait_commit_txn(
                    conn, claim, tr, params, callbacks, dispatch_timeout=timeout
                )

        return self.connections.transact(txn)

    def _guarded(
        self,
        claim: rec.Claim,
        tr: Transition,
        params: dict[str, Any],
        callbacks: Sequence[rec.InCommit],
        *,
        lock_ttl: float,
    ) -> rec.Committed | None:
        """The commit of a state whose run holds a lock, in one transaction: refused
        unless the lock is still the run's (a forced release or the sweeper freed it);
        the lock is then freed (its last state, or the run ends) or refreshed."""
        timeout = self.dispatch_timeout
        release = claim.releases_lock(tr.terminal)

        def txn(conn: psycopg.Connection[Any]) -> rec.Committed | None:
            if not pg_locks.guard_txn(conn, claim):
                raise psycopg.Rollback()
            committed: rec.Committed | None
            if tr.fork is not None:
                group_id = pg_groups.fork_txn(
                    conn, claim, tr.fork, params, callbacks, dispatch_timeout=timeout
                )
                committed = rec.Committed(step_seq=claim.step_seq + 1, group_id=group_id)
            elif tr.wait is not None:
                committed = pg_control.wait_commit_txn(
                    conn, claim, tr, params, callbacks, dispatch_timeout=timeout
                )
            else:
                sql = queries.COMMIT_MOVE if tr.moves else queries.COMMIT_STAY
                row = pg_runs.fenced_txn(conn, sql, params)
                if row is not None:
                    pg_runs.run_callbacks(conn, claim.run_id, callbacks)
                committed = None if row is None else rec.Committed(step_seq=claim.step_seq + 1)
            if committed is None:
                raise psycopg.Rollback()
            pg_locks.settle_lock_txn(conn, claim, release=release, ttl=lock_ttl)
            return committed

        with (
            pg_runs.refusing_illegal(claim.run_id, claim.state, tr.next_state or claim.state),
            pg_runs.refusing_unstorable(_step(claim)),
        ):
            return self.connections.transact(txn)

    def _refused(self, claim: rec.Claim, params: dict[str, Any]) -> rec.Committed | None:
        """A fenced commit was refused: if the lease still holds and the run was asked
        to cancel or passed its deadline, end it so (``Committed.ended``); else None."""
        ended = self.connections.once(lambda c: pg_control.end_leased_txn(c, params))
        if ended is None:
            return None
        return rec.Committed(step_seq=claim.step_seq + 1, ended=ended)

    def heartbeat(
        self,
        leases: Sequence[base.LeaseRef],
        *,
        worker: str,
        ttl: float,
        info: rec.WorkerInfo | None = None,
    ) -> base.Extended:
        """Extend every live lease of this worker, runs and branches, in one statement."""
        runs = [(lease.run_id, lease.token) for lease in leases if lease.group_id is None]
        branches = [(lease.group_id, lease.token) for lease in leases if lease.group_id is not None]
        return self.connections.with_retry(
            lambda c: pg_beat.heartbeat_txn(c, runs, branches, worker=worker, ttl=ttl, info=info)
        )

    def count_lease_lost(self, worker: str) -> None:
        self.connections.with_retry(lambda c: pg_beat.count_lease_lost_txn(c, worker))

    # -- Parallel / Map branches ---------------------------------------------------

    def claim_branch(
        self,
        group_id: int,
        idx: int,
        *,
        owner: str,
        ttl: float,
        versions: Sequence[int] | None = None,
    ) -> rec.BranchClaim | None:
        # As claim(): retried once; a lost reply orphans a lease for the reaper.
        known = pg_runs.int_array(versions)
        return self.connections.hot_with_retry(
            lambda cur: pg_groups.claim_branch_txn(
                cur, group_id, idx, owner=owner, ttl=ttl, versions=known
            ),
            CLAIMS,
        )

    def peek_branch(self, group_id: int, idx: int) -> rec.BranchPeek | None:
        return self.connections.with_retry(lambda c: pg_read.peek_branch_txn(c, group_id, idx))

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
        """Record a branch's attempt, fenced by its lease, in one transaction; None when
        the lease was lost (``UnstorableValue`` for a value the database refuses, as
        ``commit``). ``expired=True`` is the reaper finishing a branch whose lease ran
        out."""

        def txn(conn: psycopg.Connection[Any]) -> rec.BranchCommit:
            with pg_runs.refusing_unstorable(f"branch {idx} of group {group_id}"):
                return pg_groups.commit_branch_txn(
                    conn,
                    group_id,
                    idx,
                    token,
                    decision,
                    callbacks,
                    expired=expired,
                    dispatch_timeout=self.dispatch_timeout,
                )

        return self.connections.transact(txn)

    def branch_results(self, group_id: int) -> list[rec.BranchResult]:
        return self.connections.with_retry(lambda c: pg_read.branch_results_txn(c, group_id))

    # -- reading -------------------------------------------------------------------

    def get_run(self, run_id: str, *, with_steps: bool = True) -> rec.RunRecord:
        return self.connections.with_retry(
            lambda c: pg_read.get_run_txn(c, run_id, with_steps=with_steps)
        )

    def list_runs(
        self, *, status: str | None = None, workflow: str | None = None, limit: int = 50
    ) -> list[rec.RunRecord]:
        return self.connections.with_retry(
            lambda c: pg_read.list_runs_txn(c, status=status, workflow=workflow, limit=limit)
        )


def _fenced(
    conns: connections.Connections,
    claim: rec.Claim,
    tr: Transition,
    sql: str,
    params: dict[str, Any],
    callbacks: Sequence[rec.InCommit],
) -> tuple[Any, ...] | None:
    """A plain or hand-off commit on the thread's own ``MAIN`` cursor: its row; None
    when fenced out; ``()`` when it landed but the connection broke before its reply
    came back."""

    def once() -> tuple[Any, ...] | None:
        with (
            pg_runs.refusing_illegal(claim.run_id, claim.state, tr.next_state or claim.state),
            conns.hot(MAIN) as cur,
            pg_runs.refusing_unstorable(_step(claim)),
        ):
            return pg_runs.commit_txn(cur, sql, params, callbacks)

    try:
        return once()
    except errors.StoreUnavailable:
        # The connection broke: did our COMMIT land before it did? If not, the
        # lease may still hold: the fenced commit is safe to send once more.
        if conns.with_retry(  # on checked connections
            lambda c: pg_runs.committed_by_txn(c, claim.run_id, claim.lease_token)
        ):
            return ()
        return once()


def _fork(
    conns: connections.Connections,
    claim: rec.Claim,
    fork: Fork,
    params: dict[str, Any],
    callbacks: Sequence[rec.InCommit],
    *,
    dispatch_timeout: float,
) -> rec.Committed | None:
    """The forking step, its group and branches, in one fenced transaction (not
    retried)."""

    def txn(conn: psycopg.Connection[Any]) -> int:
        with pg_runs.refusing_unstorable(_step(claim)):
            return pg_groups.fork_txn(
                conn, claim, fork, params, callbacks, dispatch_timeout=dispatch_timeout
            )

    group_id = conns.transact(txn)
    if group_id is None:
        return None
    return rec.Committed(step_seq=claim.step_seq + 1, group_id=group_id)


def _step(claim: rec.Claim) -> str:
    """The commit a refusal names."""
    return f"step {claim.step_seq} of run {claim.run_id}"
