"""``/healthz`` (the process is up; no token) and ``/readyz`` (the database answers,
its schema is at the newest migration, the broker answers)."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

import psycopg
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials

from leaseflow import migrations
from leaseflow.api import auth, models
from leaseflow.api.errors import responses
from leaseflow.settings import Settings

router = APIRouter(tags=["health"])
#: Seconds each readiness check may take.
CHECK_TIMEOUT = 2


@router.get("/healthz", response_model=models.Health)
def healthz() -> models.Health:
    """The process is up (no token needed)."""
    return models.Health(status="ok")


@lru_cache(maxsize=1)
def head_revision() -> str | None:
    """The newest migration of this code."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(migrations.config("postgresql://")).get_current_head()


def check_database(settings: Settings) -> tuple[str, str]:
    """``(database, migrations)``: "ok" or why not."""
    try:
        with psycopg.connect(
            settings.libpq_url, connect_timeout=CHECK_TIMEOUT, autocommit=True
        ) as conn:
            rows = conn.execute(f"SELECT version_num FROM {migrations.VERSION_TABLE}").fetchall()
    except psycopg.errors.UndefinedTable:
        return "ok", "no leaseflow schema: run `leaseflow db upgrade`"
    except psycopg.Error as exc:
        return f"unreachable: {str(exc).strip()}", "unknown"
    current = sorted(row[0] for row in rows)
    head = head_revision()
    if current != [head]:
        return "ok", f"at {', '.join(current) or 'no revision'}, the code's newest is {head}"
    return "ok", "ok"


def check_broker(settings: Settings) -> str:
    from kombu import Connection

    try:
        with Connection(settings.broker_url, connect_timeout=CHECK_TIMEOUT) as conn:
            conn.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT)
    except Exception as exc:  # kombu raises what its transport raises
        return f"unreachable: {exc!r}"
    return "ok"


@router.get(
    "/readyz",
    response_model=models.Ready,
    responses={
        503: {"model": models.Ready, "description": "A check failed: `checks` says which"},
        **responses(401),
    },
)
def readyz(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(auth.bearer)],
) -> JSONResponse:
    """Ready: the database answers, its schema is at the newest migration, the broker
    answers. An unreachable or unmigrated database is answered at once (503: the token
    cannot be checked without it); otherwise the token is checked first."""
    settings = request.app.state.engine.settings
    database, schema = check_database(settings)
    if schema == "ok":  # tokens can be checked
        auth.principal(request, credentials)
    checks = {"database": database, "migrations": schema, "broker": check_broker(settings)}
    ok = all(value == "ok" for value in checks.values())
    body = models.Ready(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
