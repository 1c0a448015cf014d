"""The operator side: the workflows this process declares (any token), resource locks
and the worker registry (admin tokens only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from leaseflow.api import auth, models
from leaseflow.api.errors import AUTHED, responses

router = APIRouter()


@router.get(
    "/workflows",
    tags=["workflows"],
    response_model=list[models.WorkflowSummary],
    responses=responses(*AUTHED),
)
def list_workflows(client: auth.Scoped) -> list[models.WorkflowSummary]:
    """Every workflow this server declares (``LEASEFLOW_WORKFLOWS``), with its versions."""
    versions: dict[str, list[int]] = {}
    for wf in client.workflows():
        versions.setdefault(wf.name, []).append(wf.version)
    return [
        models.WorkflowSummary(name=name, versions=sorted(found))
        for name, found in sorted(versions.items())
    ]


@router.get(
    "/workflows/{name}",
    tags=["workflows"],
    response_model=models.WorkflowDetail,
    responses=responses(*AUTHED, 404),
)
def show_workflow(name: str, client: auth.Scoped) -> models.WorkflowDetail:
    """The versions of a workflow, oldest first: states, edges and Mermaid source."""
    found = [models.WorkflowOut(**client.describe(wf)) for wf in client.workflow(name)]
    return models.WorkflowDetail(name=name, versions=found)


@router.get(
    "/locks",
    tags=["locks"],
    response_model=list[models.LockOut],
    responses=responses(*AUTHED, 403),
)
def list_locks(
    request: Request,
    who: auth.Admin,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> list[models.LockOut]:
    """Resource locks held now: key, holder, since, expiry, fence (admin only)."""
    client = auth.client_for(request, who)
    return [models.LockOut.model_validate(lock) for lock in client.locks(limit=limit)]


@router.post(
    "/locks/{key:path}/release",
    tags=["locks"],
    response_model=models.LockFreedOut,
    responses=responses(*AUTHED, 403, 404),
)
def release_lock(
    key: Annotated[str, Path(description="The lock's key; may contain ':' and '/'.")],
    body: models.ReleaseIn,
    request: Request,
    who: auth.Admin,
) -> models.LockFreedOut:
    """Free a lock whoever holds it, audited as forced by the token's name; its holder's
    next guarded commit is refused. 404 when it is not held (admin only)."""
    client = auth.client_for(request, who)
    freed = client.release_lock(key, actor=who.name, reason=body.reason)
    return models.LockFreedOut(
        key=freed.key,
        fence=freed.fence,
        holder=freed.holder,
        holder_run=freed.holder_run,
        reason=freed.reason,
        actor=who.name,
    )


@router.get(
    "/workers",
    tags=["workers"],
    response_model=list[models.WorkerOut],
    responses=responses(*AUTHED, 403),
)
def list_workers(
    request: Request,
    who: auth.Admin,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> list[models.WorkerOut]:
    """The worker registry: host, pid, queues, pool size, leases, last check-in (admin)."""
    client = auth.client_for(request, who)
    return [models.WorkerOut.model_validate(w) for w in client.workers(limit=limit)]
