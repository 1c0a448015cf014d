"""``/runs``: start, list, show, signal, cancel, retry, delete runs and read artefacts;
each endpoint one client call, through the request's client (its tenant's view)."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from leaseflow import errors
from leaseflow.api import auth, models
from leaseflow.api import errors as api_errors
from leaseflow.api.errors import AUTHED, responses
from leaseflow.types import RunStatus

router = APIRouter(tags=["runs"])
RUN = "/runs/{run_id}"


def run_id_of(run_id: str) -> str:
    """The run id in its canonical form; ``RunNotFound`` when it is no UUID."""
    try:
        return str(uuid.UUID(run_id))
    except ValueError:
        raise errors.RunNotFound(run_id) from None


def encode_cursor(created_at: datetime, run_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), run_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The ``(created_at, id)`` a cursor names; ``BadRequest`` when it is malformed."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, run_id = json.loads(raw)
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            raise ValueError("no time zone")
        return when, str(uuid.UUID(run_id))
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise api_errors.BadRequest(f"malformed cursor {cursor[:100]!r}") from None


@router.post(
    "/runs",
    status_code=201,
    response_model=models.RunOut,
    responses={
        200: {"model": models.RunOut, "description": "The run the idempotency key named"},
        **responses(*AUTHED, 403, 404, 409, 413),
    },
)
def start_run(
    body: models.StartIn, request: Request, response: Response, who: auth.Who
) -> models.RunOut:
    """Start a run (201); a repeated ``idempotency_key`` with the same input answers
    200 with the run it named, with another input 409 ``E-IDEMPOTENCY-CONFLICT``."""
    client = auth.client_for(request, who)
    if body.tenant is not None and who.admin:
        client = client.for_tenant(body.tenant)
    elif body.tenant is not None and body.tenant != who.tenant:
        raise api_errors.Forbidden(f"token {who.name!r} starts runs of {who.tenant!r} only")
    run_id, created = client.start_with(
        body.workflow,
        body.input,
        idempotency_key=body.idempotency_key,
        version=body.version,
        priority=body.priority,
    )
    if not created:
        response.status_code = 200
    return models.RunOut.model_validate(client.store.get_run(run_id, with_steps=False))


@router.get("/runs", response_model=models.RunPage, responses=responses(*AUTHED))
def list_runs(
    client: auth.Scoped,
    status: RunStatus | None = None,
    workflow: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
    tenant: Annotated[str | None, Query(pattern=models.TENANT)] = None,
) -> models.RunPage:
    """Runs newest first, ``limit`` a page; ``next_cursor`` asks for the next page.
    ``tenant`` filters an admin's listing (a tenant's token sees its own runs only)."""
    before = decode_cursor(cursor) if cursor is not None else None
    found = client.list_runs(status, workflow, limit + 1, tenant=tenant, before=before)
    page, more = found[:limit], len(found) > limit
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if more else None
    runs = [models.RunOut.model_validate(run) for run in page]
    return models.RunPage(runs=runs, next_cursor=next_cursor)


@router.get(RUN, response_model=models.RunDetail, responses=responses(*AUTHED, 404))
def show_run(run_id: str, client: auth.Scoped) -> models.RunDetail:
    """The run with its step log, groups and branches, signals and artefacts."""
    return models.RunDetail.model_validate(client.get(run_id_of(run_id)))


@router.post(
    RUN + "/signals",
    response_model=models.SignalOut,
    responses=responses(*AUTHED, 404, 409, 413),
)
def signal_run(run_id: str, body: models.SignalIn, client: auth.Scoped) -> models.SignalOut:
    """Send ``event``: it resumes the run waiting for it, or is stored for the first
    Wait for it; the same ``signal_id`` twice is delivered once. 409 for a finished run."""
    receipt = client.signal(run_id_of(run_id), body.event, body.payload, signal_id=body.signal_id)
    return models.SignalOut.model_validate(receipt)


@router.post(RUN + "/cancel", response_model=models.CancelOut, responses=responses(*AUTHED, 404))
def cancel_run(
    run_id: str, client: auth.Scoped, body: models.CancelIn | None = None
) -> models.CancelOut:
    """Cancel: at once if pending or waiting; a running state stops at its commit."""
    done = client.cancel(run_id_of(run_id), body.reason if body else None)
    return models.CancelOut.model_validate(done)


@router.post(RUN + "/retry", response_model=models.RetryOut, responses=responses(*AUTHED, 404, 409))
def retry_run(
    run_id: str, client: auth.Scoped, body: models.RetryIn | None = None
) -> models.RetryOut:
    """Re-drive a failed, cancelled or timed-out run (409 for an active or completed one)."""
    canonical = run_id_of(run_id)
    state = client.retry(canonical, from_state=body.from_state if body else None)
    return models.RetryOut(run_id=canonical, state=state)


@router.delete(RUN, response_model=models.PurgedOut, responses=responses(*AUTHED, 404, 409))
def delete_run(run_id: str, client: auth.Scoped, force: bool = False) -> models.PurgedOut:
    """Delete a finished run with its rows (an active one only with ``force``: 409)."""
    done = client.purge_run(run_id_of(run_id), force=force)
    return models.PurgedOut.model_validate(done)


@router.get(
    RUN + "/artifacts/{name:path}",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The bytes as put"},
        **responses(*AUTHED, 404),
    },
)
def get_artifact(run_id: str, name: str, client: auth.Scoped) -> Response:
    """An artefact's bytes, with its content type."""
    found = client.artifact(run_id_of(run_id), name)
    media_type = found.content_type or "application/octet-stream"
    return Response(content=found.data or b"", media_type=media_type)
