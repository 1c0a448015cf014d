"""``leaseflow serve``: the HTTP API on uvicorn.

With no active token it binds only to loopback and says so in its first log line;
asked to bind elsewhere without a token, it refuses to start (exit 1).
"""

from __future__ import annotations

import click

from leaseflow import errors
from leaseflow.settings import get_settings

APP_FACTORY = "leaseflow.api.app:create_app"


class Unprotected(errors.LeaseflowError):
    """``serve`` asked to bind a non-loopback address while no token exists."""

    code = "E-SERVE-UNPROTECTED"

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.host = host

    def __str__(self) -> str:
        return (
            f"refusing to serve on {self.host}: no API token exists, so anyone who can reach "
            "it would act as an admin. Create one first (`leaseflow tokens create --name "
            "NAME --admin`) or bind to 127.0.0.1"
        )


def is_loopback(host: str) -> bool:
    from leaseflow.api import auth

    return auth.is_loopback(host)


def tokens_required() -> bool:
    """Does any active token exist (in the database the environment means)?"""
    from leaseflow import local, tokens
    from leaseflow.tasks import runtime

    settings = local.resolve(get_settings())
    local.export_env(settings)  # uvicorn's workers use the same database and broker
    store = runtime.make_store(settings, application_name="leaseflow-serve")
    try:
        return tokens.Tokens(store).any_active()
    finally:
        store.close()


def first_line(host: str, port: int, required: bool) -> str:
    shown = f"[{host}]" if ":" in host else host
    if required:
        how = "tokens required: Authorization: Bearer <token>"
    else:
        how = "no token exists: loopback clients only, every request acts as an admin"
    return f"leaseflow serve: http://{shown}:{port} ({how})"


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--log-level", default="info", show_default=True, help="uvicorn's log level.")
def serve(host: str, port: int, workers: int, log_level: str) -> None:
    """Serve the HTTP API (FastAPI on uvicorn) over the same store as the client.

    Once a token exists every endpoint but /healthz needs `Authorization: Bearer`;
    with none, only loopback addresses are served (and bound).
    """
    import uvicorn

    required = tokens_required()
    if not required and not is_loopback(host):
        raise Unprotected(host)
    click.echo(first_line(host, port, required), err=True)
    uvicorn.run(
        APP_FACTORY, factory=True, host=host, port=port, workers=workers, log_level=log_level
    )


def register(group: click.Group) -> None:
    group.add_command(serve)
