"""The SQL work of keeping leases alive and of the beat jobs: heartbeats, the reaper,
the dispatcher's overdue scans, re-publish marks and queue probes. Each statement is
safe to run from two beats at once: it acts once per expiry, overdue run or probe."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg

from leaseflow import errors
from leaseflow.store import base, group_sql, queries, records

HOSTNAME = socket.gethostname()


def heartbeat_txn(
    conn: psycopg.Connection[Any],
    runs: Sequence[tuple[str, str]],
    branches: Sequence[tuple[int, str]],
    *,
    worker: str,
    ttl: float,
    info: records.WorkerInfo | None = None,
) -> base.Extended:
    """One statement: extend the run leases ``(run_id, token)`` and branch leases
    ``(group_id, token)`` still held, record the worker as alive, and learn which of
    them were asked to cancel."""
    params = {
        "worker": worker,
        "hostname": HOSTNAME,
        "pid": os.getpid(),
        "queues": ",".join(info.queues) if info is not None and info.queues else None,
        "concurrency": info.concurrency if info is not None else None,
        "ttl": ttl,
        "run_ids": [run_id for run_id, _ in runs],
        "tokens": [token for _, token in runs],
        "group_ids": [group_id for group_id, _ in branches],
        "branch_tokens": [token for _, token in branches],
    }
    rows = conn.execute(queries.HEARTBEAT, params).fetchall()
    return base.Extended(
        (token for token, _cancel, extended in rows if extended),
        (token for token, cancel, _extended in rows if cancel),
    )


def count_lease_lost_txn(conn: psycopg.Connection[Any], worker: str) -> None:
    conn.execute(
        queries.COUNT_LEASE_LOST, {"worker": worker, "hostname": HOSTNAME, "pid": os.getpid()}
    )


def reap_txn(
    conn: psycopg.Connection[Any], *, limit: int, dispatch_timeout: float
) -> list[records.Reaped]:
    params = {
        "limit": limit,
        "dispatch_timeout": dispatch_timeout,
        "code": errors.LEASE_EXPIRED,
        "cancelled": errors.CANCELLED,
    }
    return [records.Reaped(*row) for row in conn.execute(queries.REAP, params)]


def expired_branches_txn(
    conn: psycopg.Connection[Any], *, limit: int
) -> list[records.ExpiredBranch]:
    rows = conn.execute(group_sql.EXPIRED_BRANCHES, {"limit": limit})
    return [records.ExpiredBranch(*row) for row in rows]


def overdue_runs_txn(
    conn: psycopg.Connection[Any], *, limit: int, dispatch_timeout: float
) -> list[records.OverdueRun]:
    rows = conn.execute(queries.OVERDUE, {"limit": limit, "dispatch_timeout": dispatch_timeout})
    return [records.OverdueRun(*row) for row in rows]


def overdue_branches_txn(
    conn: psycopg.Connection[Any], *, limit: int, dispatch_timeout: float
) -> list[records.OverdueBranch]:
    params = {"limit": limit, "dispatch_timeout": dispatch_timeout}
    return [records.OverdueBranch(*row) for row in conn.execute(group_sql.OVERDUE_BRANCHES, params)]


def redispatch_runs_txn(
    conn: psycopg.Connection[Any], run_ids: Sequence[str], *, dispatch_timeout: float
) -> list[records.Due]:
    params = {"ids": list(run_ids), "dispatch_timeout": dispatch_timeout}
    return [records.Due(*row) for row in conn.execute(queries.REDISPATCH, params)]


def redispatch_branches_txn(
    conn: psycopg.Connection[Any], keys: Sequence[tuple[int, int]], *, dispatch_timeout: float
) -> list[records.DueBranch]:
    params = {
        "group_ids": [k[0] for k in keys],
        "idxs": [k[1] for k in keys],
        "dispatch_timeout": dispatch_timeout,
    }
    return [records.DueBranch(*row) for row in conn.execute(group_sql.REDISPATCH_BRANCHES, params)]


def queue_marks_txn(conn: psycopg.Connection[Any], queues: Sequence[str]) -> dict[str, datetime]:
    rows = conn.execute(queries.QUEUE_MARKS, {"queues": list(queues)})
    return {queue: passed for queue, passed in rows}


def send_probe_txn(
    conn: psycopg.Connection[Any], queue: str, *, dispatch_timeout: float
) -> datetime | None:
    params = {"queue": queue, "dispatch_timeout": dispatch_timeout}
    row = conn.execute(queries.SEND_PROBE, params).fetchone()
    return None if row is None else row[0]


def probe_passed_txn(conn: psycopg.Connection[Any], queue: str, sent_at: datetime) -> None:
    conn.execute(queries.PROBE_PASSED, {"queue": queue, "sent_at": sent_at})


# -- the worker registry ---------------------------------------------------------------


def mark_dead_txn(conn: psycopg.Connection[Any], *, self_id: str, after: float) -> list[str]:
    rows = conn.execute(queries.MARK_DEAD, {"self": self_id, "after": after}).fetchall()
    return [row[0] for row in rows]


def expire_leases_of_txn(conn: psycopg.Connection[Any], owners: Sequence[str]) -> int:
    row = conn.execute(queries.EXPIRE_LEASES_OF, {"owners": list(owners)}).fetchone()
    return 0 if row is None else int(row[0])


def release_leases_of_txn(
    conn: psycopg.Connection[Any], owners: Sequence[str], *, dispatch_timeout: float
) -> records.Released:
    params = {"owners": list(owners), "dispatch_timeout": dispatch_timeout}
    runs = tuple(records.Due(*row) for row in conn.execute(queries.RELEASE_RUNS_OF, params))
    branches = tuple(
        records.DueBranch(*row) for row in conn.execute(queries.RELEASE_BRANCHES_OF, params)
    )
    return records.Released(runs, branches)


def forget_workers_txn(conn: psycopg.Connection[Any], ids: Sequence[str]) -> None:
    conn.execute(queries.FORGET_WORKERS, {"ids": list(ids)})


def list_workers_txn(conn: psycopg.Connection[Any], *, limit: int) -> list[records.WorkerRecord]:
    return [
        records.WorkerRecord(*row) for row in conn.execute(queries.LIST_WORKERS, {"limit": limit})
    ]
