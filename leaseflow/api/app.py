"""The FastAPI app: ``create_app`` (also uvicorn's factory for ``leaseflow serve``)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from leaseflow import dashboard, logfmt, tokens
from leaseflow.api import auth, errors, routes_admin, routes_health, routes_metrics, routes_runs
from leaseflow.client import Client
from leaseflow.settings import Settings, get_settings

DESCRIPTION = """Start, signal, cancel, retry and read leaseflow runs over HTTP.

Every endpoint but `/healthz` requires `Authorization: Bearer <token>` once any token
exists (`leaseflow tokens create`). A tenant's token sees and acts on its tenant's
runs only (another tenant's run is 404); an admin's token sees every tenant and may
use the operator endpoints. Every error is `{"code", "message", "detail"}`."""


class Engine:
    """What the app keeps for its life: one engine client and the token gate, made
    on first use (or given), closed at shutdown when made here."""

    def __init__(self, settings: Settings | None, client: Client | None) -> None:
        self._settings = settings
        self._client = client
        self._owned = client is None
        self._gate: auth.Gate | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Client:
        with self._lock:
            if self._client is None:
                from leaseflow.tasks import celery_app

                settings = self._settings or get_settings()
                celery_app.import_workflows(settings.workflows)
                self._client = Client(settings=settings)
            client = self._client
        client.app  # noqa: B018  (built once: tenant views share it)
        return client

    @property
    def settings(self) -> Settings:
        return self.client.settings

    @property
    def gate(self) -> auth.Gate:
        gate = self._gate
        if gate is None:
            made = auth.Gate(tokens.Tokens(self.client.engine_store))
            with self._lock:
                gate = self._gate = self._gate or made
        return gate

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            self._gate = None
        if client is not None and self._owned:
            client.close()


def create_app(settings: Settings | None = None, client: Client | None = None) -> FastAPI:
    """The API over ``client`` (kept open), or over a client of ``settings`` (default:
    the environment's, the embedded PostgreSQL included), made on first use and
    closed at shutdown."""
    if settings is None and client is None:  # `leaseflow serve`: each uvicorn process
        logfmt.configure_cli(get_settings())
    engine = Engine(settings, client)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(
        title="leaseflow",
        description=DESCRIPTION,
        version="1",
        lifespan=lifespan,
        responses=errors.responses(500),
    )
    app.state.engine = engine
    errors.install(app)
    app.include_router(routes_health.router)
    app.include_router(routes_runs.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_metrics.router)  # /metrics, unauthenticated (see there)
    dashboard.install(app)  # the HTML pages under /ui (/ leads there)
    return app
