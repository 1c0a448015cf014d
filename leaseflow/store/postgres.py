"""The PostgreSQL run store: short statements on psycopg 3 connections.

Each public method takes a connection from ``connections`` (retrying where that is
safe) and hands it to one ``*_txn`` function that owns the SQL: ``pg_runs`` (runs and
their commits), ``pg_groups`` (Parallel / Map), ``pg_beat`` (heartbeats and beat
jobs), ``pg_read``; every statement comes from ``queries``. No transaction stays open
while user code runs: a claim is one statement, a commit is one statement (or one
short explicit transaction when ``ctx.in_commit`` callbacks must join it, or a fork).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

import psycopg

from leaseflow import settings
from leaseflow.fsm.definition import Workflow
from leaseflow.fsm.rules import BranchDecision, Transition
from leaseflow.store import (
    base,
    connections,
    pg_beat,
    pg_commits,
    pg_groups,
    pg_jobs,
    pg_lock_ops,
    pg_operations,
    pg_purge,
    pg_read,
    pg_runs,
)
from leaseflow.store import records as rec
from leaseflow.store.artifact_records import ArtifactRecord

#: The connection kinds (see ``connections``).
MAIN = connections.MAIN
CLAIMS = connections.CLAIMS


class PostgresStore(
    pg_operations.Operations, pg_jobs.BeatJobs, pg_lock_ops.Locks, pg_purge.Retention
):
    """Run store on PostgreSQL (``base.RunStore``). Safe to share between threads;
    re-opens its connections after a fork."""

    #: The tenant of the runs this store creates (``for_tenant``: and the only one it sees).
    tenant = "default"

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
        self._engine_connections = self.connections

    def for_tenant(self, tenant: str) -> PostgresStore:
        """A view of this store whose every request runs as the tenant role with
        ``leaseflow.tenant`` set (row-level security): it creates runs of ``tenant`` and
        sees and acts on that tenant's runs only (another's is ``RunNotFound``). It
        shares this store's connections; closing this store closes them."""
        view = copy.copy(self)
        view.tenant = tenant
        view.connections = connections.TenantConnections(self._engine_connections, tenant)
        return view

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
        self._engine_connections.transact(
            lambda c: pg_runs.register_workflow_txn(c, wf), retry=True
        )
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
            tenant=self.tenant,
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
                tenant=self.tenant,
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
        committed = pg_commits.commit(
            self.connections,
            claim,
            tr,
            params,
            callbacks,
            handoff_ttl=handoff_ttl,
            lock_ttl=lock_ttl,
            dispatch_timeout=self.dispatch_timeout,
        )
        if committed is None:  # fenced out, or the run must end instead: see ``refused``
            return pg_commits.refused(self.connections, claim, params)
        return committed

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

    def get_artifact(self, run_id: str, name: str) -> ArtifactRecord:
        return self.connections.with_retry(lambda c: pg_read.get_artifact_txn(c, run_id, name))

    def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        tenant: str | None = None,
        before: tuple[datetime, str] | None = None,
    ) -> list[rec.RunRecord]:
        return self.connections.with_retry(
            lambda c: pg_read.list_runs_txn(
                c, status=status, workflow=workflow, limit=limit, tenant=tenant, before=before
            )
        )
