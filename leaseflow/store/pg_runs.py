"""The SQL work on runs: registering definitions, creating runs, claiming a step and
committing it. Each ``*_txn`` function runs on the connection (or the thread's pinned
cursor) the store hands it; the store owns the transaction and the retry."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from leaseflow import errors, logs
from leaseflow.fsm.definition import Workflow
from leaseflow.fsm.rules import Transition
from leaseflow.store import prepared, queries, records

#: Where a statement runs: a pooled connection, or a thread's pinned cursor.
Executor = psycopg.Connection[Any] | psycopg.Cursor[Any]

# -- definitions ---------------------------------------------------------------------


def register_workflow_txn(conn: psycopg.Connection[Any], wf: Workflow) -> None:
    """Record ``wf``'s legal transitions unless the same definition is there already.
    Run inside a transaction: the advisory lock makes two registrations take turns."""
    definition = {
        "name": wf.name,
        "version": wf.version,
        "initial": wf.initial.name,
        "regather": wf.regather,
        "states": {
            s.name: {"to": list(s.to), "on_error": s.on_error, "queue": s.queue}
            for s in wf.states.values()
        },
    }
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
    key = {"name": wf.name, "version": wf.version}
    conn.execute(queries.LOCK_DEFINITION, key)
    row = conn.execute(queries.REGISTERED_DIGEST, key).fetchone()
    if row is not None and row[0] == digest:
        return
    if row is not None:
        logs.warning(
            "definition_changed",
            workflow=wf.name,
            version=wf.version,
            hint="bump the workflow version when its edges change",
        )
    conn.execute(
        queries.REGISTER_WORKFLOW, {**key, "digest": digest, "definition": Jsonb(definition)}
    )
    conn.execute(queries.DELETE_TRANSITIONS, key)
    with conn.cursor() as cur:
        cur.executemany(
            queries.INSERT_TRANSITION,
            [{**key, "from_state": a, "to_state": b} for a, b in sorted(set(wf.edges()))],
        )


# -- new runs ------------------------------------------------------------------------


def new_run_params(
    wf: Workflow,
    run_id: str,
    checkpoint: bytes,
    input: dict[str, Any],
    idempotency_key: str | None,
    *,
    dispatch_timeout: float,
    priority: int = 0,
    tenant: str = "default",
) -> dict[str, Any]:
    """The parameters of ``CREATE_RUN``."""
    return {
        "tenant": tenant,
        "priority": priority,
        "run_timeout": wf.run_timeout,
        "id": run_id,
        "workflow": wf.name,
        "version": wf.version,
        "state": wf.initial.name,
        "max_attempts": wf.initial.retry.max_attempts,
        "checkpoint": checkpoint,
        "context_version": wf.context_version,
        "input": Jsonb(input),
        "idempotency_key": idempotency_key,
        "dispatch_timeout": dispatch_timeout,
    }


def create_run_txn(
    conn: psycopg.Connection[Any], wf: Workflow, params: dict[str, Any], input: dict[str, Any]
) -> records.Created:
    """Insert the run; with its idempotency key already used, that run (or
    ``IdempotencyConflict`` when its input differs)."""
    with refusing_taken([params]):
        row = conn.execute(queries.CREATE_RUN, params).fetchone()
    if row is not None:
        return records.Created(run_id=row[0], created=True)
    key = params["idempotency_key"]
    found = conn.execute(
        queries.FIND_IDEMPOTENT, {"tenant": params["tenant"], "workflow": wf.name, "key": key}
    ).fetchone()
    if found is None:  # pragma: no cover - the conflicting row was purged meanwhile
        raise errors.StoreUnavailable("idempotent run vanished; retry")
    if found[1] != input:
        raise errors.IdempotencyConflict(wf.name, str(key), found[0])
    return records.Created(run_id=found[0], created=False)


def create_runs_txn(conn: psycopg.Connection[Any], params: Sequence[dict[str, Any]]) -> None:
    """Insert runs with one pipelined round trip (inside the caller's transaction)."""
    with refusing_taken(params), conn.cursor() as cur:
        cur.executemany(queries.CREATE_RUN, params)


@contextmanager
def refusing_taken(params: Sequence[dict[str, Any]]) -> Iterator[None]:
    """A run id that is taken, or no UUID, as ``errors.RunExists``."""
    try:
        yield
    except (psycopg.errors.UniqueViolation, psycopg.errors.InvalidTextRepresentation) as exc:
        ids = [p["id"] for p in params]
        raise errors.RunExists(ids[0] if len(ids) == 1 else ", ".join(map(str, ids))) from exc


# -- the step ------------------------------------------------------------------------


def int_array(values: Sequence[int] | None) -> str | None:
    """``values`` as a PostgreSQL array literal (``{1,2}``), or None for no filter."""
    return None if values is None else "{" + ",".join(str(int(v)) for v in values) + "}"


def claim_txn(
    cur: psycopg.Cursor[Any],
    run_id: str,
    seq: int,
    *,
    owner: str,
    ttl: float,
    versions: str | None = None,
) -> records.Claim | None:
    """One statement: lease the run at ``seq`` if it is pending and due (and of one
    of ``versions``, an array literal, when given)."""
    params = {"run_id": run_id, "seq": seq, "owner": owner, "ttl": ttl, "versions": versions}
    row = prepared.statement(queries.CLAIM).one(cur.connection, params)
    if row is None:
        return None
    return records.Claim(
        run_id=run_id,
        workflow=row[0],
        version=row[1],
        state=row[2],
        step_seq=row[3],
        attempt=row[4],
        max_attempts=row[5],
        lease_token=row[6],
        started_at=row[7],
        checkpoint=row[8],
        context_version=row[9],
        input=row[10],
        group_id=row[11],
        priority=row[12],
        signal=row[13],
        lock_key=row[14],
        lock_token=row[15],
        lock_until=row[16],
        due_at=row[17],
    )


def commit_params(
    claim: records.Claim, tr: Transition, *, worker: str, dispatch_timeout: float
) -> dict[str, Any]:
    """The parameters of a fenced commit (``queries.fenced_commit``) of ``tr``."""
    return {
        "run_id": claim.run_id,
        "token": claim.lease_token,
        "state": claim.state,
        "next_state": tr.next_state,
        "status": tr.status,
        "attempt": tr.attempt,
        "max_attempts": tr.max_attempts,
        "delay": tr.delay,
        "dispatch_timeout": dispatch_timeout,
        "checkpoint": tr.checkpoint,
        "context_version": tr.context_version,
        "output": None if tr.output is None else Jsonb(tr.output),
        "error_code": tr.error_code,
        "error": tr.error,
        "terminal": tr.terminal,
        "step_attempt": claim.attempt,
        "worker": worker,
        "started_at": claim.started_at,
        "outcome": tr.outcome,
        "step_error": tr.step_error,
        "context_bytes": tr.context_bytes,
        "checkpoint_bytes": tr.checkpoint_bytes,
    }


def fenced_txn(db: Executor, sql: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
    """One fenced commit statement (prepared): its row, or None when the lease was lost."""
    conn = db.connection if isinstance(db, psycopg.Cursor) else db
    return prepared.statement(sql).one(conn, params)


def commit_txn(
    cur: psycopg.Cursor[Any],
    sql: str,
    params: dict[str, Any],
    callbacks: Sequence[records.InCommit],
) -> tuple[Any, ...] | None:
    """The fenced commit on the thread's cursor: one statement, or one short
    transaction when ``ctx.in_commit`` callbacks must join it. Its row, or None."""
    if not callbacks:
        return fenced_txn(cur, sql, params)
    conn = cur.connection
    with conn.transaction():
        row = fenced_txn(cur, sql, params)
        if row is not None:  # fenced out: nothing was written, nothing to run
            run_callbacks(conn, params["run_id"], callbacks)
    return row


def run_callbacks(
    conn: psycopg.Connection[Any], run_id: str, callbacks: Sequence[records.InCommit]
) -> None:
    """``ctx.in_commit`` callbacks, inside the transition's transaction."""
    for callback in callbacks:
        try:
            callback(conn)
        except Exception as exc:
            raise errors.InCommitError(run_id, repr(exc)) from exc


def committed_by_txn(conn: psycopg.Connection[Any], run_id: str, token: str) -> bool:
    """Did a commit under ``token`` land? (its reply was lost with the connection)"""
    row = conn.execute(queries.COMMITTED_BY, {"run_id": run_id, "token": token}).fetchone()
    return row is not None


@contextmanager
def refusing_illegal(run_id: str, from_state: str, to_state: str) -> Iterator[None]:
    """The transition guard trigger's refusal as ``errors.IllegalTransition``."""
    try:
        yield
    except psycopg.errors.CheckViolation as exc:
        if "lf_check_transition" not in (exc.diag.context or ""):
            raise
        raise errors.IllegalTransition(run_id, from_state, to_state) from exc


@contextmanager
def refusing_unstorable(what: str) -> Iterator[None]:
    """A value the database (or the driver) refuses as ``errors.UnstorableValue``: a
    ``DataError`` of any kind (a NUL byte in text or JSON, NaN in JSON, ...), or text
    that is no UTF-8. The same commit would fail every time: no reason to retry it."""
    try:
        yield
    except (psycopg.DataError, UnicodeEncodeError) as exc:
        raise errors.UnstorableValue(what, _refusal(exc)) from exc


def _refusal(exc: Exception) -> str:
    """Why the database refused: its message and detail (the driver's, client side)."""
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        primary, detail = exc.diag.message_primary, exc.diag.message_detail
        return f"{primary}: {detail}" if detail else primary
    return str(exc)
