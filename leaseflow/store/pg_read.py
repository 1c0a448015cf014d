"""The SQL reads: a run, its step log and groups, a page of runs, and the peeks that
explain a claim that found nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import psycopg

from leaseflow import errors
from leaseflow.fsm import checkpoint
from leaseflow.store import artifact_sql, control_sql, group_sql, queries, records
from leaseflow.store.artifact_records import ArtifactRecord

_RUN_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(records.RunRecord)
    if f.name not in ("steps", "groups", "signals", "artifacts")
)
_GROUP_FIELDS = tuple(
    f.name for f in dataclasses.fields(records.GroupRecord) if f.name != "branches"
)


def peek_txn(conn: psycopg.Connection[Any], run_id: str) -> records.Peek | None:
    """The run as it is now (``None`` if there is none)."""
    row = conn.execute(queries.PEEK, {"run_id": run_id}).fetchone()
    return None if row is None else records.Peek(*row)


def peek_branch_txn(
    conn: psycopg.Connection[Any], group_id: int, idx: int
) -> records.BranchPeek | None:
    row = conn.execute(group_sql.PEEK_BRANCH, {"group_id": group_id, "idx": idx}).fetchone()
    return None if row is None else records.BranchPeek(*row)


def branch_results_txn(conn: psycopg.Connection[Any], group_id: int) -> list[records.BranchResult]:
    rows = conn.execute(group_sql.BRANCH_RESULTS, {"group_id": group_id})
    return [records.BranchResult(*row) for row in rows]


def groups_txn(conn: psycopg.Connection[Any], run_id: str) -> tuple[records.GroupRecord, ...]:
    """The groups of a run with their branches, for ``runs show``."""
    rows = conn.execute(group_sql.GROUPS_OF_RUN, {"run_id": run_id}).fetchall()
    return tuple(
        records.GroupRecord(
            **dict(zip(_GROUP_FIELDS, row, strict=True)),
            branches=tuple(branch_results_txn(conn, row[0])),
        )
        for row in rows
    )


def get_run_txn(
    conn: psycopg.Connection[Any], run_id: str, *, with_steps: bool
) -> records.RunRecord:
    """The run (with its step log and groups); ``RunNotFound`` if there is none."""
    try:
        row = conn.execute(queries.GET_RUN, {"run_id": run_id}).fetchone()
    except psycopg.errors.InvalidTextRepresentation:  # not a uuid: no such run
        row = None
    if row is None:
        raise errors.RunNotFound(run_id)
    if not with_steps:
        return _run_record(row)
    steps = tuple(records.StepRecord(*s) for s in conn.execute(queries.STEPS, {"run_id": run_id}))
    signals = tuple(
        records.SignalRecord(*s)
        for s in conn.execute(control_sql.SIGNALS_OF_RUN, {"run_id": run_id})
    )
    artifacts = tuple(
        ArtifactRecord(*a) for a in conn.execute(artifact_sql.LIST, {"run_id": run_id})
    )
    return _run_record(row, steps, groups_txn(conn, run_id), signals, artifacts)


def get_artifact_txn(conn: psycopg.Connection[Any], run_id: str, name: str) -> ArtifactRecord:
    """One artefact with its bytes; ``ArtifactNotFound`` (``RunNotFound``: no such run)."""
    try:
        row = conn.execute(artifact_sql.GET, {"run_id": run_id, "name": name}).fetchone()
    except psycopg.errors.InvalidTextRepresentation:  # not a uuid: no such run
        raise errors.RunNotFound(run_id) from None
    if row is None:
        if conn.execute(queries.GET_RUN, {"run_id": run_id}).fetchone() is None:
            raise errors.RunNotFound(run_id)
        raise errors.ArtifactNotFound(run_id, name)
    meta = ArtifactRecord(*row[:-1])
    return dataclasses.replace(meta, data=checkpoint.unpack(row[-1], what=f"artifact {name!r}"))


def list_runs_txn(
    conn: psycopg.Connection[Any],
    *,
    status: str | None,
    workflow: str | None,
    limit: int,
    tenant: str | None = None,
    before: tuple[Any, str] | None = None,
) -> list[records.RunRecord]:
    sql = queries.list_runs(
        status=status is not None,
        workflow=workflow is not None,
        tenant=tenant is not None,
        before=before is not None,
    )
    params = {"status": status, "workflow": workflow, "tenant": tenant, "limit": limit}
    if before is not None:
        params["before_at"], params["before_id"] = before
    return [_run_record(row) for row in conn.execute(sql, params)]


def _run_record(
    row: Sequence[Any],
    steps: tuple[records.StepRecord, ...] = (),
    groups: tuple[records.GroupRecord, ...] = (),
    signals: tuple[records.SignalRecord, ...] = (),
    artifacts: tuple[ArtifactRecord, ...] = (),
) -> records.RunRecord:
    fields = dict(zip(_RUN_FIELDS, row, strict=True))
    return records.RunRecord(
        **fields, steps=steps, groups=groups, signals=signals, artifacts=artifacts
    )
