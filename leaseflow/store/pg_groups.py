"""The SQL work on Parallel / Map groups: the fork, branch claims and branch commits.

A branch commit and a fork are one transaction each, opened by the store; the
functions here compose the statements inside it. A final branch result counts on the
group row with a serialising ``UPDATE ... RETURNING``: the one transaction that
completes the group moves the parent to its join (or, under ``fail_fast``, fails it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from leaseflow import errors
from leaseflow.fsm.rules import BranchDecision, Fork
from leaseflow.store import group_sql, lock_sql, pg_runs, queries, records

# -- the fork ------------------------------------------------------------------------


def fork_txn(
    conn: psycopg.Connection[Any],
    claim: records.Claim,
    fork: Fork,
    params: dict[str, Any],
    callbacks: Sequence[records.InCommit],
    *,
    dispatch_timeout: float,
) -> int:
    """The forking step and its group (``params``: the fenced commit's). Returns the
    group's id; raises ``psycopg.Rollback`` when the lease was lost."""
    group_id = create_group_txn(conn, claim, fork)
    if group_id is None:
        raise psycopg.Rollback()
    if pg_runs.fenced_txn(conn, queries.COMMIT_FORK, {**params, "group_id": group_id}) is None:
        raise psycopg.Rollback()
    create_branches_txn(conn, group_id, claim.run_id, fork, dispatch_timeout=dispatch_timeout)
    pg_runs.run_callbacks(conn, claim.run_id, callbacks)
    return group_id


def create_group_txn(conn: psycopg.Connection[Any], claim: records.Claim, fork: Fork) -> int | None:
    """The group of the forking step; None if this step's fork committed already."""
    row = conn.execute(
        group_sql.CREATE_GROUP,
        {
            "run_id": claim.run_id,
            "step_seq": claim.step_seq,
            "state": claim.state,
            "join_state": fork.join_state,
            "join_max_attempts": fork.join_max_attempts,
            "kind": fork.kind,
            "width": len(fork.states),
            "on_branch_error": fork.on_branch_error,
            "max_concurrency": fork.max_concurrency,
            "chord": fork.chord,
            "checkpoint": fork.checkpoint,
            "context_version": fork.context_version,
        },
    ).fetchone()
    return None if row is None else int(row[0])


def create_branches_txn(
    conn: psycopg.Connection[Any],
    group_id: int,
    run_id: str,
    fork: Fork,
    *,
    dispatch_timeout: float,
) -> None:
    """The group's branches; beyond a Map's window they are held."""
    width = len(fork.states)
    items = fork.items if fork.items is not None else (None,) * width
    conn.execute(
        group_sql.CREATE_BRANCHES,
        {
            "group_id": group_id,
            "run_id": run_id,
            "window": fork.max_concurrency,
            "dispatch_timeout": dispatch_timeout,
            "idxs": list(range(width)),
            "states": list(fork.states),
            "max_attempts": list(fork.max_attempts),
            "items": [None if item is None else Jsonb(item) for item in items],
        },
    )


# -- branches ------------------------------------------------------------------------


def claim_branch_txn(
    cur: psycopg.Cursor[Any],
    group_id: int,
    idx: int,
    *,
    owner: str,
    ttl: float,
    versions: str | None = None,
) -> records.BranchClaim | None:
    """One statement: lease the branch if it is pending and due in a running group
    (of a run of one of ``versions``, a PostgreSQL int array literal, when given)."""
    params = {"group_id": group_id, "idx": idx, "owner": owner, "ttl": ttl, "versions": versions}
    row = cur.execute(group_sql.CLAIM_BRANCH, params).fetchone()
    if row is None:
        return None
    return records.BranchClaim(
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
        priority=row[13],
    )


def commit_branch_txn(
    conn: psycopg.Connection[Any],
    group_id: int,
    idx: int,
    token: str,
    decision: BranchDecision,
    callbacks: Sequence[records.InCommit],
    *,
    expired: bool,
    dispatch_timeout: float,
) -> records.BranchCommit:
    """A branch attempt, fenced by ``token`` (expired, for the reaper). Raises
    ``psycopg.Rollback`` when the lease was lost."""
    key = {"group_id": group_id, "idx": idx, "token": token}
    if decision.status == "retry":
        sql = group_sql.REQUEUE_EXPIRED_BRANCH if expired else group_sql.RETRY_BRANCH
        params = {
            **key,
            "error": decision.error,
            "delay": decision.delay,
            "dispatch_timeout": dispatch_timeout,
        }
        row = conn.execute(sql, params).fetchone()
        if row is None:
            raise psycopg.Rollback()
        return records.BranchCommit(run_id=row[0], retry_state=row[1])
    conn.execute(group_sql.LOCK_GROUP, {"group_id": group_id})
    sql = group_sql.FINISH_EXPIRED_BRANCH if expired else group_sql.FINISH_BRANCH
    result = None if decision.result is None else Jsonb(decision.result)
    params = {**key, "status": decision.status, "result": result, "error": decision.error}
    row = conn.execute(sql, params).fetchone()
    if row is None:
        raise psycopg.Rollback()
    run_id: str = row[0]
    pg_runs.run_callbacks(conn, run_id, callbacks)
    failed = decision.status == "failed"
    return count_branch_txn(
        conn,
        run_id,
        group_id,
        failed=failed,
        reason=f"branch {idx} failed: {decision.error}" if failed else None,
        dispatch_timeout=dispatch_timeout,
    )


def count_branch_txn(
    conn: psycopg.Connection[Any],
    run_id: str,
    group_id: int,
    *,
    failed: bool,
    reason: str | None,
    dispatch_timeout: float,
) -> records.BranchCommit:
    """Count a final branch result on its group; what the count decided."""
    group = conn.execute(
        group_sql.COUNT_BRANCH,
        {"group_id": group_id, "done": int(not failed), "failed": int(failed)},
    ).fetchone()
    if group is None:  # the group was closed meanwhile (failed fast)
        return records.BranchCommit(run_id=run_id)
    done, n_failed, width, policy, join_state, window, join_attempts = group
    if failed and policy == "fail_fast":
        conn.execute(group_sql.CLOSE_GROUP, {"group_id": group_id, "status": "failed"})
        conn.execute(group_sql.CANCEL_BRANCHES, {"group_id": group_id})
        conn.execute(lock_sql.RELEASE_OF_RUN, {"run_id": run_id})
        conn.execute(
            group_sql.FAIL_PARENT,
            {
                "run_id": run_id,
                "group_id": group_id,
                "code": errors.BRANCH_FAILED,
                "error": reason,
            },
        )
        return records.BranchCommit(run_id=run_id, parent_failed=True)
    if done + n_failed == width:
        conn.execute(group_sql.CLOSE_GROUP, {"group_id": group_id, "status": "joined"})
        with pg_runs.refusing_illegal(run_id, "(its fork state)", join_state):
            moved = conn.execute(
                group_sql.JOIN_PARENT,
                {
                    "run_id": run_id,
                    "group_id": group_id,
                    "join_state": join_state,
                    "max_attempts": join_attempts,
                    "dispatch_timeout": dispatch_timeout,
                },
            ).fetchone()
        if moved is None:  # the parent is no longer waiting (cancelled)
            return records.BranchCommit(run_id=run_id)
        join = records.JoinDue(
            workflow=moved[0],
            state=join_state,
            step_seq=moved[1],
            version=moved[2],
            priority=moved[3],
        )
        return records.BranchCommit(run_id=run_id, join=join)
    released: tuple[records.BranchRef, ...] = ()
    if window is not None:
        rows = conn.execute(
            group_sql.RELEASE_HELD, {"group_id": group_id, "dispatch_timeout": dispatch_timeout}
        ).fetchall()
        released = tuple(records.BranchRef(idx=r[0], state=r[1]) for r in rows)
    return records.BranchCommit(run_id=run_id, released=released)
