"""The PostgreSQL run store: short statements on psycopg 3 connections.

The public method owns the transaction; ``queries`` owns the SQL. No transaction
stays open while user code runs: a claim is one statement, a commit is one
statement (or one short explicit transaction when ``ctx.in_commit`` callbacks
must join it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from leaseflow import errors, logs
from leaseflow.fsm.definition import Workflow
from leaseflow.store import queries
from leaseflow.store.records import (
    BranchClaim,
    BranchCommit,
    BranchOutcome,
    BranchResult,
    Claim,
    Due,
    Fork,
    InCommit,
    Peek,
    Reaped,
    RunRecord,
    StepRecord,
    Transition,
)

T = TypeVar("T")
HOSTNAME = socket.gethostname()
CONNECT_TIMEOUT = 5  # seconds to open one connection
POOL_TIMEOUT = 10.0  # seconds to wait for a pooled connection
MAIN = "main"
#: Claims have their own connections: with ``async_claims`` they commit with
#: ``synchronous_commit=off`` (see ``PostgresStore.claim``).
CLAIMS = "claims"


def _libpq(url: str) -> str:
    for prefix in ("postgresql+psycopg://", "postgres+psycopg://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


class PostgresStore:
    """Run store on PostgreSQL. Safe to share between threads; re-opens after fork."""

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
        self.conninfo = _libpq(database_url)
        self.application_name = application_name
        self.max_size = max_size
        self.statement_timeout_ms = statement_timeout_ms
        self.dispatch_timeout = dispatch_timeout
        self.async_claims = async_claims
        self._pools: dict[str, ConnectionPool] = {}
        #: (kind, thread id) -> that thread's own cursor; None while it is in use.
        self._pinned: dict[tuple[str, int], psycopg.Cursor[Any] | None] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._registered: set[tuple[str, int]] = set()

    # -- connections ------------------------------------------------------------

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.autocommit = True

    def _connect_kwargs(self, kind: str) -> dict[str, Any]:
        options = f"-c statement_timeout={self.statement_timeout_ms}"
        if kind == CLAIMS and self.async_claims:
            options += " -c synchronous_commit=off"
        return {
            "application_name": self.application_name,
            "options": options,
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT,
        }

    def _forked(self) -> None:
        """Called with the lock held: forget what the parent process opened (never
        touch its sockets: psycopg does not close a connection it inherited)."""
        if self._pid != os.getpid():
            self._pools = {}
            self._pinned = {}
            self._registered.clear()
            self._pid = os.getpid()

    def _get_pool(self, kind: str = MAIN) -> ConnectionPool:
        """The ``kind`` pool of this process (``MAIN``, or ``CLAIMS`` for claims)."""
        with self._lock:
            self._forked()
            pool = self._pools.get(kind)
            if pool is None:
                pool = self._pools[kind] = ConnectionPool(
                    self.conninfo,
                    kwargs=self._connect_kwargs(kind),
                    timeout=POOL_TIMEOUT,
                    configure=self._configure,
                    min_size=1,
                    max_size=self.max_size,
                    open=True,
                    name=f"leaseflow-{kind}-{os.getpid()}",
                )
            return pool

    @contextmanager
    def _hot(self, kind: str) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor on this thread's own ``kind`` connection, for the per-state
        statements (claims, commits): no pool check-out per statement.

        At most ``max_size`` threads per kind get one (a thread pool's threads);
        others, and a nested use, fall back to the pool. A connection that breaks is
        closed and replaced on next use; driver errors come out as leaseflow errors.
        """
        key = (kind, threading.get_ident())
        with self._lock:
            self._forked()
            cur = self._pinned.get(key)
            if cur is not None:
                self._pinned[key] = None  # in use: a nested call takes the pool
            elif key not in self._pinned and self._room_to_pin(kind):
                self._pinned[key] = None  # reserved while connecting
                try:
                    cur = self._pin(kind)
                except BaseException:
                    del self._pinned[key]
                    raise
        if cur is None:
            with self.connection(kind) as conn, conn.cursor() as pooled:
                yield pooled
            return
        try:
            yield cur
        except psycopg.OperationalError as exc:
            with self._lock:
                self._pinned.pop(key, None)
            cur.connection.close()
            raise errors.StoreUnavailable(str(exc)) from exc
        except BaseException:
            if cur.connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                with self._lock:
                    self._pinned.pop(key, None)
                cur.connection.close()
                raise
            with self._lock:
                if key in self._pinned:
                    self._pinned[key] = cur
            raise
        with self._lock:
            closed = key not in self._pinned  # close() ran meanwhile
            if not closed:
                self._pinned[key] = cur
        if closed:
            cur.connection.close()

    def _room_to_pin(self, kind: str) -> bool:
        """Lock held. Drop the connections of finished threads; is one more allowed?"""
        alive = {t.ident for t in threading.enumerate()}
        for key, cur in list(self._pinned.items()):
            if key[1] not in alive:
                del self._pinned[key]
                if cur is not None:
                    cur.connection.close()
        return sum(k[0] == kind for k in self._pinned) < self.max_size

    def _pin(self, kind: str) -> psycopg.Cursor[Any]:
        try:
            conn = psycopg.connect(self.conninfo, **self._connect_kwargs(kind))
        except psycopg.OperationalError as exc:
            raise errors.StoreUnavailable(str(exc)) from exc
        self._configure(conn)
        return conn.cursor()

    @contextmanager
    def connection(self, kind: str = MAIN) -> Iterator[psycopg.Connection[Any]]:
        """A pooled autocommit connection; driver errors come out as leaseflow errors."""
        try:
            with self._get_pool(kind).connection() as conn:
                yield conn
        except psycopg.OperationalError as exc:
            raise errors.StoreUnavailable(str(exc)) from exc

    def _with_retry(self, fn: Callable[[Any], T], kind: str = MAIN, *, hot: bool = False) -> T:
        """Run an idempotent ``fn(conn)``, once more on a fresh connection if it broke.
        With ``hot``, ``fn`` gets a cursor of the thread's own connection (``_hot``).

        A pool timeout (no connection to be had) is not retried: it already waited.
        """

        def attempt() -> T:
            if hot:
                with self._hot(kind) as cur:
                    return fn(cur)
            with self.connection(kind) as conn:
                return fn(conn)

        try:
            return attempt()
        except errors.StoreUnavailable as exc:
            if isinstance(exc.__cause__, PoolTimeout):
                raise
            # The server may have dropped every idle connection (a restart, a
            # terminated backend): test them all and replace the broken ones.
            with self._lock:
                pool = self._pools.get(kind)
            if pool is not None:
                pool.check()
            return attempt()

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for pool in self._pools.values():
                    pool.close()
                for cur in self._pinned.values():
                    if cur is not None:
                        cur.connection.close()
            self._pools = {}
            self._pinned = {}

    # -- definitions --------------------------------------------------------------

    def register_workflow(self, wf: Workflow) -> None:
        """Record the workflow's legal transitions (idempotent; cached per process)."""
        key = (wf.name, wf.version)
        if key in self._registered and self._pid == os.getpid():
            return
        wf.validate()
        edges = sorted(set(wf.edges()))
        definition = {
            "name": wf.name,
            "version": wf.version,
            "initial": wf.initial.name,
            "states": {
                s.name: {"to": list(s.to), "on_error": s.on_error, "queue": s.queue}
                for s in wf.states.values()
            },
        }
        digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()

        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s), %s)", (wf.name, wf.version)
                )
                row = conn.execute(
                    queries.REGISTERED_DIGEST, {"name": wf.name, "version": wf.version}
                ).fetchone()
                if row is not None and row[0] == digest:
                    return
                if row is not None:
                    logs.event(
                        "definition_changed",
                        30,
                        workflow=wf.name,
                        version=wf.version,
                        hint="bump the workflow version when its edges change",
                    )
                conn.execute(
                    queries.REGISTER_WORKFLOW,
                    {
                        "name": wf.name,
                        "version": wf.version,
                        "digest": digest,
                        "definition": Jsonb(definition),
                    },
                )
                conn.execute(
                    "DELETE FROM lf_transitions WHERE workflow = %s AND version = %s",
                    (wf.name, wf.version),
                )
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO lf_transitions (workflow, version, from_state, to_state) "
                        "VALUES (%s, %s, %s, %s)",
                        [(wf.name, wf.version, a, b) for a, b in edges],
                    )

        self._with_retry(write)
        self._registered.add(key)

    # -- runs -------------------------------------------------------------------

    def create_run(
        self,
        *,
        run_id: str,
        wf: Workflow,
        checkpoint: bytes,
        input: dict[str, Any],
        idempotency_key: str | None,
    ) -> tuple[str, bool]:
        """Insert a pending run in the initial state; ``(run_id, created)``.

        With an idempotency key already used, returns the existing run (and raises
        ``IdempotencyConflict`` when its input differs).
        """
        self.register_workflow(wf)
        params = self._new_run_params(wf, run_id, checkpoint, input, idempotency_key)

        def insert(conn: psycopg.Connection[Any]) -> tuple[str, bool]:
            row = conn.execute(queries.CREATE_RUN, params).fetchone()
            if row is not None:
                return row[0], True
            found = conn.execute(
                queries.FIND_IDEMPOTENT, {"workflow": wf.name, "key": idempotency_key}
            ).fetchone()
            if found is None:  # pragma: no cover - the conflicting row was purged meanwhile
                raise errors.StoreUnavailable("idempotent run vanished; retry")
            if found[1] != input:
                raise errors.IdempotencyConflict(wf.name, str(idempotency_key), found[0])
            return found[0], False

        return self._with_retry(insert)

    def create_runs(
        self, *, wf: Workflow, runs: Sequence[tuple[str, bytes, dict[str, Any]]]
    ) -> None:
        """Insert pending runs ``(run_id, checkpoint, input)`` in one transaction (all or
        none), with one pipelined round trip per batch."""
        if not runs:
            return
        self.register_workflow(wf)
        params = [self._new_run_params(wf, *run, None) for run in runs]

        def insert(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(queries.CREATE_RUN, params)

        self._with_retry(insert)

    def _new_run_params(
        self,
        wf: Workflow,
        run_id: str,
        checkpoint: bytes,
        input: dict[str, Any],
        idempotency_key: str | None,
    ) -> dict[str, Any]:
        """The parameters of ``CREATE_RUN``."""
        return {
            "id": run_id,
            "workflow": wf.name,
            "version": wf.version,
            "state": wf.initial.name,
            "max_attempts": wf.initial.retry.max_attempts,
            "checkpoint": checkpoint,
            "context_version": wf.context_version,
            "input": Jsonb(input),
            "idempotency_key": idempotency_key,
            "dispatch_timeout": self.dispatch_timeout,
        }

    def claim(self, run_id: str, seq: int, *, owner: str, ttl: float) -> Claim | None:
        """Take the lease of ``run_id`` at ``seq`` if it is pending and due; else None.

        With ``async_claims`` the claim commits without waiting for its WAL flush
        (``synchronous_commit=off``): it is visible at once, and every later
        synchronous commit (this lease's heartbeat or fenced commit, anyone's) flushes
        it too, the WAL being one sequence. Only a server crash in between can undo
        it, and that is a crashed worker's case: the run is pending again, this
        lease's commit is fenced out, and the state runs again. A transition is
        never undone: commits stay synchronous.
        """

        def do(cur: psycopg.Cursor[Any]) -> Claim | None:
            row = cur.execute(
                queries.CLAIM, {"run_id": run_id, "seq": seq, "owner": owner, "ttl": ttl}
            ).fetchone()
            if row is None:
                return None
            return Claim(
                run_id=run_id,
                workflow=row[0],
                version=row[1],
                state=row[2],
                step_seq=row[3],
                attempt=row[4],
                max_attempts=row[5],
                lease_token=row[6],
                started_at=row[7],
                checkpoint=bytes(row[8]),
                context_version=row[9],
                input=row[10],
                group_id=row[11],
            )

        # Retried once on a fresh connection when the pooled one was dropped (an idle
        # connection the server closed). If the first claim did land and only its
        # reply was lost, the retry finds the run running and claims nothing: the
        # orphaned lease expires and the reaper hands the run on.
        return self._with_retry(do, CLAIMS, hot=True)

    def peek(self, run_id: str) -> Peek | None:
        def do(conn: psycopg.Connection[Any]) -> Peek | None:
            row = conn.execute(queries.PEEK, {"run_id": run_id}).fetchone()
            return None if row is None else Peek(*row)

        return self._with_retry(do)

    def commit(
        self,
        tr: Transition,
        callbacks: Sequence[InCommit] = (),
        *,
        dispatch_timeout: float | None = None,
    ) -> bool:
        """Write the transition iff this lease still holds; False when it was lost.

        ``callbacks`` run inside the same transaction, after the fenced update
        succeeded, so their writes commit exactly when the transition does.
        """
        sql = queries.COMMIT_STAY if tr.next_state is None else queries.COMMIT_MOVE
        params = self._commit_params(tr, dispatch_timeout)
        return self._fenced_commit(sql, params, tr, callbacks) is not None

    def commit_handoff(
        self,
        tr: Transition,
        callbacks: Sequence[InCommit] = (),
        *,
        next_token: str,
        ttl: float,
    ) -> datetime | None:
        """Commit a move and, in the same statement, give the lease of the next state
        (``next_token``, attempt 1) to ``tr.worker``: inline continuation.

        Returns the next state's start time, or None when the lease was lost.
        """
        if tr.next_state is None or tr.status != "pending" or tr.delay:
            raise ValueError("only an immediate move to another state can be handed off")
        params = self._commit_params(tr)
        params["next_token"] = next_token
        params["ttl"] = ttl
        row = self._fenced_commit(queries.COMMIT_HANDOFF, params, tr, callbacks)
        if row is None:
            return None
        # An empty row: it landed but its reply was lost with the connection; the next
        # state is leased to us and its start time is close enough to now.
        return row[0] if row else datetime.now(UTC)

    def _fenced_commit(
        self, sql: str, params: dict[str, Any], tr: Transition, callbacks: Sequence[InCommit]
    ) -> tuple[Any, ...] | None:
        """The fenced commit's row; None when fenced out; ``()`` when it landed but the
        connection broke before its reply came back."""
        try:
            return self._commit_once(sql, params, tr.run_id, callbacks)
        except errors.StoreUnavailable:
            # The connection broke: did our COMMIT land before it did? If not, the
            # lease may still hold: the fenced commit is safe to send once more.
            if self._committed_by(tr.run_id, tr.lease_token):  # on checked connections
                return ()
            return self._commit_once(sql, params, tr.run_id, callbacks)

    def _commit_once(
        self, sql: str, params: dict[str, Any], run_id: str, callbacks: Sequence[InCommit]
    ) -> tuple[Any, ...] | None:
        """Run the fenced commit; its returned row, or None when it was fenced out."""
        try:
            with self._hot(MAIN) as cur:
                if not callbacks:
                    return cur.execute(sql, params).fetchone()
                conn = cur.connection
                with conn.transaction():
                    row = cur.execute(sql, params).fetchone()
                    if row is None:
                        raise _Rollback
                    _run_callbacks(conn, run_id, callbacks)
                return row
        except _Rollback:
            return None

    def _commit_params(
        self, tr: Transition, dispatch_timeout: float | None = None
    ) -> dict[str, Any]:
        return {
            "run_id": tr.run_id,
            "token": tr.lease_token,
            "state": tr.state,
            "next_state": tr.next_state,
            "status": tr.status,
            "attempt": tr.attempt,
            "max_attempts": tr.max_attempts,
            "delay": tr.delay,
            "dispatch_timeout": self.dispatch_timeout
            if dispatch_timeout is None
            else dispatch_timeout,
            "checkpoint": tr.checkpoint,
            "context_version": tr.context_version,
            "output": None if tr.output is None else Jsonb(tr.output),
            "error_code": tr.error_code,
            "error": tr.error,
            "terminal": tr.terminal,
            "step_attempt": tr.step_attempt,
            "worker": tr.worker,
            "started_at": tr.started_at,
            "outcome": tr.outcome,
            "step_error": tr.step_error,
        }

    def _committed_by(self, run_id: str, token: str) -> bool:
        def do(conn: psycopg.Connection[Any]) -> bool:
            row = conn.execute(queries.COMMITTED_BY, {"run_id": run_id, "token": token})
            return row.fetchone() is not None

        return self._with_retry(do)

    def heartbeat(
        self,
        leases: Sequence[tuple[str, str]],
        *,
        worker: str,
        ttl: float,
        branches: Sequence[tuple[int, int, str]] = (),
    ) -> dict[str, bool]:
        """Extend every live lease of this worker, runs and branches, in one statement.

        ``leases`` are ``(run_id, token)``, ``branches`` ``(group_id, idx, token)``.
        Returns ``{token: cancel_requested}`` for the leases still held; a token
        missing from the answer was lost.
        """
        params = {
            "worker": worker,
            "hostname": HOSTNAME,
            "pid": os.getpid(),
            "ttl": ttl,
            "run_ids": [run_id for run_id, _ in leases],
            "tokens": [token for _, token in leases],
            "group_ids": [group_id for group_id, _, _ in branches],
            "branch_tokens": [token for _, _, token in branches],
        }

        def do(conn: psycopg.Connection[Any]) -> dict[str, bool]:
            rows = conn.execute(queries.HEARTBEAT, params).fetchall()
            return {token: bool(cancel) for token, cancel in rows}

        return self._with_retry(do)

    # -- Parallel / Map ---------------------------------------------------------------

    def commit_fork(
        self, tr: Transition, fork: Fork, callbacks: Sequence[InCommit] = ()
    ) -> tuple[int, int] | None:
        """The forking step and its group, in one fenced transaction.

        Returns ``(group_id, join_seq)``, or None when the lease was lost.
        """
        width = len(fork.states)
        items = fork.items if fork.items is not None else (None,) * width
        try:
            with self.connection() as conn, conn.transaction():
                group_id = conn.execute(
                    queries.CREATE_GROUP,
                    {
                        "run_id": tr.run_id,
                        "step_seq": tr.step_seq,
                        "state": tr.state,
                        "join_state": fork.join_state,
                        "join_max_attempts": fork.join_max_attempts,
                        "kind": fork.kind,
                        "width": width,
                        "on_branch_error": fork.on_branch_error,
                        "max_concurrency": fork.max_concurrency,
                        "chord": fork.chord,
                        "checkpoint": fork.checkpoint,
                        "context_version": fork.context_version,
                    },
                ).fetchone()[0]  # type: ignore[index]
                params = self._commit_params(tr)
                params["group_id"] = group_id
                if conn.execute(queries.COMMIT_FORK, params).fetchone() is None:
                    raise _Rollback
                conn.execute(
                    queries.CREATE_BRANCHES,
                    {
                        "group_id": group_id,
                        "run_id": tr.run_id,
                        "window": fork.max_concurrency,
                        "dispatch_timeout": self.dispatch_timeout,
                        "idxs": list(range(width)),
                        "states": list(fork.states),
                        "max_attempts": list(fork.max_attempts),
                        "items": [None if item is None else Jsonb(item) for item in items],
                    },
                )
                _run_callbacks(conn, tr.run_id, callbacks)
            return int(group_id), tr.step_seq + 1
        except _Rollback:
            return None

    def claim_branch(
        self, group_id: int, idx: int, *, owner: str, ttl: float
    ) -> BranchClaim | None:
        params = {"group_id": group_id, "idx": idx, "owner": owner, "ttl": ttl}

        def do(cur: psycopg.Cursor[Any]) -> tuple[Any, ...] | None:
            return cur.execute(queries.CLAIM_BRANCH, params).fetchone()

        row = self._with_retry(do, CLAIMS, hot=True)  # as claim(): a lost reply orphans a lease
        if row is None:
            return None
        return BranchClaim(
            group_id=group_id,
            idx=idx,
            run_id=row[0],
            workflow=row[1],
            version=row[2],
            state=row[3],
            attempt=row[4],
            max_attempts=row[5],
            lease_token=row[6],
            started_at=row[7],
            item=row[8],
            checkpoint=bytes(row[9]),
            context_version=row[10],
            input=row[11],
            kind=row[12],
        )

    def peek_branch(self, group_id: int, idx: int) -> tuple[str, str, str, float] | None:
        """``(status, state, workflow, wait_seconds)`` of a branch, or None."""

        def do(conn: psycopg.Connection[Any]) -> tuple[str, str, str, float] | None:
            row = conn.execute(queries.PEEK_BRANCH, {"group_id": group_id, "idx": idx}).fetchone()
            return None if row is None else (row[0], row[1], row[2], row[3])

        return self._with_retry(do)

    def commit_branch(
        self,
        out: BranchOutcome,
        *,
        expired: bool = False,
        callbacks: Sequence[InCommit] = (),
    ) -> BranchCommit | None:
        """Record a branch's attempt, fenced by its lease; None when the lease was lost.

        A final result (completed or failed) counts on the group row with a
        serialising ``UPDATE ... RETURNING``: the one transaction that completes the
        group moves the parent to its join (or, under ``fail_fast``, fails it).
        ``expired=True`` is the reaper finishing a branch whose lease ran out.
        """
        key = {"group_id": out.group_id, "idx": out.idx, "token": out.lease_token}
        try:
            with self.connection() as conn, conn.transaction():
                if out.status == "retry":
                    sql = queries.REQUEUE_EXPIRED_BRANCH if expired else queries.RETRY_BRANCH
                    row = conn.execute(
                        sql,
                        {
                            **key,
                            "error": out.error,
                            "delay": out.delay,
                            "dispatch_timeout": self.dispatch_timeout,
                        },
                    ).fetchone()
                    if row is None:
                        raise _Rollback
                    return BranchCommit(run_id=row[0], retry_state=row[1])
                conn.execute(queries.LOCK_GROUP, {"group_id": out.group_id})
                sql = queries.FINISH_EXPIRED_BRANCH if expired else queries.FINISH_BRANCH
                row = conn.execute(
                    sql,
                    {
                        **key,
                        "status": out.status,
                        "result": None if out.result is None else Jsonb(out.result),
                        "error": out.error,
                    },
                ).fetchone()
                if row is None:
                    raise _Rollback
                _run_callbacks(conn, row[0], callbacks)
                return self._count_branch_txn(conn, row[0], out)
        except _Rollback:
            return None

    def _count_branch_txn(
        self, conn: psycopg.Connection[Any], run_id: str, out: BranchOutcome
    ) -> BranchCommit:
        failed = out.status == "failed"
        group = conn.execute(
            queries.COUNT_BRANCH,
            {"group_id": out.group_id, "done": int(not failed), "failed": int(failed)},
        ).fetchone()
        if group is None:  # the group was closed meanwhile (failed fast)
            return BranchCommit(run_id=run_id)
        done, n_failed, width, policy, join_state, window, join_attempts = group
        if failed and policy == "fail_fast":
            conn.execute(queries.CLOSE_GROUP, {"group_id": out.group_id, "status": "failed"})
            conn.execute(queries.CANCEL_BRANCHES, {"group_id": out.group_id})
            reason = f"branch {out.idx} failed: {out.error}"
            conn.execute(
                queries.FAIL_PARENT,
                {"run_id": run_id, "group_id": out.group_id, "error": reason},
            )
            return BranchCommit(run_id=run_id, parent_failed=True)
        if done + n_failed == width:
            conn.execute(queries.CLOSE_GROUP, {"group_id": out.group_id, "status": "joined"})
            moved = conn.execute(
                queries.JOIN_PARENT,
                {
                    "run_id": run_id,
                    "group_id": out.group_id,
                    "join_state": join_state,
                    "max_attempts": join_attempts,
                    "dispatch_timeout": self.dispatch_timeout,
                },
            ).fetchone()
            if moved is None:  # the parent is no longer waiting (cancelled)
                return BranchCommit(run_id=run_id)
            return BranchCommit(run_id=run_id, join=(moved[0], join_state, moved[1]))
        released: tuple[tuple[int, str], ...] = ()
        if window is not None:
            rows = conn.execute(
                queries.RELEASE_HELD,
                {"group_id": out.group_id, "dispatch_timeout": self.dispatch_timeout},
            ).fetchall()
            released = tuple((r[0], r[1]) for r in rows)
        return BranchCommit(run_id=run_id, released=released)

    def branch_results(self, group_id: int) -> list[BranchResult]:
        def do(conn: psycopg.Connection[Any]) -> list[BranchResult]:
            rows = conn.execute(queries.BRANCH_RESULTS, {"group_id": group_id}).fetchall()
            return [BranchResult(*row) for row in rows]

        return self._with_retry(do)

    def expired_branches(self, *, limit: int = 1000) -> list[tuple[Any, ...]]:
        """``(group_id, idx, token, owner, attempt, max_attempts, state, workflow)``."""
        with self.connection() as conn:
            return conn.execute(queries.EXPIRED_BRANCHES, {"limit": limit}).fetchall()

    def overdue_branches(self, *, limit: int = 1000) -> list[tuple[Any, ...]]:
        """Overdue pending branches: ``(group_id, idx, workflow, state, published_by)``."""
        with self.connection() as conn:
            return conn.execute(
                queries.OVERDUE_BRANCHES,
                {"limit": limit, "dispatch_timeout": self.dispatch_timeout},
            ).fetchall()

    def redispatch_branches(self, keys: Sequence[tuple[int, int]]) -> list[tuple[Any, ...]]:
        """Mark overdue branches ``(group_id, idx)`` re-published; returns those this call
        got: ``(run_id, group_id, idx, workflow, state, wait)``."""
        if not keys:
            return []
        with self.connection() as conn:
            return conn.execute(
                queries.REDISPATCH_BRANCHES,
                {
                    "group_ids": [k[0] for k in keys],
                    "idxs": [k[1] for k in keys],
                    "dispatch_timeout": self.dispatch_timeout,
                },
            ).fetchall()

    def _groups_txn(self, conn: psycopg.Connection[Any], run_id: str) -> list[dict[str, Any]]:
        """The groups of a run with their branches, for ``runs show``."""
        out = []
        for row in conn.execute(queries.GROUPS_OF_RUN, {"run_id": run_id}).fetchall():
            names = (
                "id",
                "kind",
                "join_state",
                "width",
                "done",
                "failed",
                "status",
                "on_branch_error",
                "max_concurrency",
                "parent_seq",
            )
            group = dict(zip(names, row, strict=True))
            group["branches"] = [
                {"idx": b[0], "state": b[1], "status": b[2], "result": b[3], "error": b[4]}
                for b in conn.execute(queries.BRANCH_RESULTS, {"group_id": row[0]})
            ]
            out.append(group)
        return out

    def count_lease_lost(self, worker: str) -> None:
        def do(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                queries.COUNT_LEASE_LOST,
                {"worker": worker, "hostname": HOSTNAME, "pid": os.getpid()},
            )

        self._with_retry(do)

    # -- maintenance (beat) -------------------------------------------------------

    def reap(self, *, limit: int = 1000) -> list[Reaped]:
        def do(conn: psycopg.Connection[Any]) -> list[Reaped]:
            rows = conn.execute(
                queries.REAP, {"limit": limit, "dispatch_timeout": self.dispatch_timeout}
            ).fetchall()
            return [Reaped(*row) for row in rows]

        with self.connection() as conn:
            return do(conn)

    def overdue_runs(self, *, limit: int = 1000) -> list[tuple[str, str, str, datetime]]:
        """Overdue pending runs: ``(run_id, workflow, state, published_by)``."""
        with self.connection() as conn:
            rows = conn.execute(
                queries.OVERDUE, {"limit": limit, "dispatch_timeout": self.dispatch_timeout}
            ).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def redispatch_runs(self, run_ids: Sequence[str]) -> list[Due]:
        """Mark overdue runs re-published; returns those this call got (two dispatchers
        at once: each run goes to one of them)."""
        if not run_ids:
            return []
        with self.connection() as conn:
            rows = conn.execute(
                queries.REDISPATCH,
                {"ids": list(run_ids), "dispatch_timeout": self.dispatch_timeout},
            ).fetchall()
        return [Due(*row) for row in rows]

    def queue_marks(self, queues: Sequence[str]) -> dict[str, datetime]:
        """``{queue: send time of the newest probe that came through it}``."""
        if not queues:
            return {}
        with self.connection() as conn:
            rows = conn.execute(queries.QUEUE_MARKS, {"queues": list(queues)}).fetchall()
        return {queue: passed for queue, passed in rows}

    def send_probe(self, queue: str) -> datetime | None:
        """Start a probe of ``queue``: its send time, or None if one is already on its way."""
        with self.connection() as conn:
            row = conn.execute(
                queries.SEND_PROBE, {"queue": queue, "dispatch_timeout": self.dispatch_timeout}
            ).fetchone()
        return None if row is None else row[0]

    def probe_passed(self, queue: str, sent_at: datetime) -> None:
        """The probe of ``queue`` sent at ``sent_at`` came through."""

        def do(conn: psycopg.Connection[Any]) -> None:
            conn.execute(queries.PROBE_PASSED, {"queue": queue, "sent_at": sent_at})

        self._with_retry(do)

    # -- reading ------------------------------------------------------------------

    def get_run(self, run_id: str, *, with_steps: bool = True) -> RunRecord:
        def do(conn: psycopg.Connection[Any]) -> RunRecord:
            try:
                row = conn.execute(queries.GET_RUN, {"run_id": run_id}).fetchone()
            except psycopg.errors.InvalidTextRepresentation:
                row = None
            if row is None:
                raise errors.RunNotFound(run_id)
            steps: tuple[StepRecord, ...] = ()
            groups: tuple[dict[str, Any], ...] = ()
            if with_steps:
                steps = tuple(
                    StepRecord(*s) for s in conn.execute(queries.STEPS, {"run_id": run_id})
                )
                groups = tuple(self._groups_txn(conn, run_id))
            return _run_record(row, steps, groups)

        return self._with_retry(do)

    def list_runs(
        self, *, status: str | None = None, workflow: str | None = None, limit: int = 50
    ) -> list[RunRecord]:
        clauses: list[str] = []
        params: dict[str, Any] = {"limit": limit}
        if status is not None:
            clauses.append("status = %(status)s")
            params["status"] = status
        if workflow is not None:
            clauses.append("workflow = %(workflow)s")
            params["workflow"] = workflow
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = (
            f"SELECT {queries.RUN_COLUMNS} FROM lf_runs {where} "
            "ORDER BY created_at DESC, id LIMIT %(limit)s"
        )

        def do(conn: psycopg.Connection[Any]) -> list[RunRecord]:
            return [_run_record(row) for row in conn.execute(sql, params)]

        return self._with_retry(do)


def _run_callbacks(
    conn: psycopg.Connection[Any], run_id: str, callbacks: Sequence[InCommit]
) -> None:
    """``ctx.in_commit`` callbacks, inside the transition's transaction."""
    for callback in callbacks:
        try:
            callback(conn)
        except Exception as exc:
            raise errors.InCommitError(run_id, repr(exc)) from exc


def _run_record(
    row: Sequence[Any],
    steps: tuple[StepRecord, ...] = (),
    groups: tuple[dict[str, Any], ...] = (),
) -> RunRecord:
    names = [f.name for f in dataclasses.fields(RunRecord) if f.name not in ("steps", "groups")]
    return RunRecord(**dict(zip(names, row, strict=True)), steps=steps, groups=groups)


class _Rollback(Exception):
    """Internal: abandon the commit transaction (lease lost)."""
