"""The fenced commits of ``PostgresStore`` that take a transaction of their own: a Wait
(with the stored signal it may meet), a commit guarded by the run's lock, and the end of
a run whose commit was refused because it was asked to cancel or passed its deadline."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg

from leaseflow import errors
from leaseflow.fsm.rules import Fork, Transition
from leaseflow.store import connections, pg_control, pg_groups, pg_locks, pg_runs, queries
from leaseflow.store import records as rec


def wait(
    conns: connections.Connections,
    claim: rec.Claim,
    tr: Transition,
    params: dict[str, Any],
    callbacks: Sequence[rec.InCommit],
    *,
    dispatch_timeout: float,
) -> rec.Committed | None:
    """The commit of a Wait, in one transaction with the stored signal it may meet."""
    timeout = dispatch_timeout

    def txn(conn: psycopg.Connection[Any]) -> rec.Committed | None:
        with pg_runs.refusing_unstorable(_step(claim)):
            return pg_control.wait_commit_txn(
                conn, claim, tr, params, callbacks, dispatch_timeout=timeout
            )

    return conns.transact(txn)


def guarded(
    conns: connections.Connections,
    claim: rec.Claim,
    tr: Transition,
    params: dict[str, Any],
    callbacks: Sequence[rec.InCommit],
    *,
    lock_ttl: float,
    dispatch_timeout: float,
) -> rec.Committed | None:
    """The commit of a state whose run holds a lock, in one transaction: refused
    unless the lock is still the run's (a forced release or the sweeper freed it);
    the lock is then freed (its last state, or the run ends) or refreshed."""
    timeout = dispatch_timeout
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
        return conns.transact(txn)


def refused(
    conns: connections.Connections, claim: rec.Claim, params: dict[str, Any]
) -> rec.Committed | None:
    """A fenced commit was refused: if the lease still holds and the run was asked
    to cancel or passed its deadline, end it so (``Committed.ended``); else None."""
    ended = conns.once(lambda c: pg_control.end_leased_txn(c, params))
    if ended is None:
        return None
    return rec.Committed(step_seq=claim.step_seq + 1, ended=ended)


def commit(
    conns: connections.Connections,
    claim: rec.Claim,
    tr: Transition,
    params: dict[str, Any],
    callbacks: Sequence[rec.InCommit],
    *,
    handoff_ttl: float | None,
    lock_ttl: float,
    dispatch_timeout: float,
) -> rec.Committed | None:
    """The fenced commit of ``tr`` by its kind (guarded by the run's lock, a fork, a
    Wait, a plain move or stay, an inline hand-off); None when it was refused."""
    if (tr.fork is not None or tr.wait is not None) and handoff_ttl is not None:
        raise ValueError("a fork or a wait cannot be handed off")
    if claim.holds_lock:
        if handoff_ttl is not None:
            raise ValueError("a state holding a lock is not handed off")
        return guarded(
            conns,
            claim,
            tr,
            params,
            callbacks,
            lock_ttl=lock_ttl,
            dispatch_timeout=dispatch_timeout,
        )
    if tr.fork is not None:
        return _fork(conns, claim, tr.fork, params, callbacks, dispatch_timeout=dispatch_timeout)
    if tr.wait is not None:
        return wait(conns, claim, tr, params, callbacks, dispatch_timeout=dispatch_timeout)
    if handoff_ttl is None:
        sql = queries.COMMIT_MOVE if tr.moves else queries.COMMIT_STAY
        row = _fenced(conns, claim, tr, sql, params, callbacks)
        return None if row is None else rec.Committed(step_seq=claim.step_seq + 1)
    if not tr.moves or tr.status != "pending" or tr.delay:
        raise ValueError("only an immediate move to another state can be handed off")
    token = str(uuid.uuid4())
    params |= {"next_token": token, "ttl": handoff_ttl}
    row = _fenced(conns, claim, tr, queries.COMMIT_HANDOFF, params, callbacks)
    if row is None:
        return None
    # An empty row: it landed but its reply was lost with the connection; the next
    # state is leased to us and its start time is close enough to now.
    started_at = row[0] if row else datetime.now(UTC)
    handoff = claim.handed_off(tr, token=token, started_at=started_at)
    return rec.Committed(step_seq=claim.step_seq + 1, handoff=handoff)


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
            conns.hot(connections.MAIN) as cur,
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
