"""``leaseflow tokens create|list|revoke``: the HTTP API's bearer tokens.

A token is printed once, on creation, and stored only as a scrypt hash.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from leaseflow import errors
from leaseflow.cli_render import to_json
from leaseflow.settings import get_settings

if TYPE_CHECKING:
    from leaseflow.tokens import Tokens


class TokenNotFound(errors.LeaseflowError):
    """No active token has that name."""

    code = "E-TOKEN-NOT-FOUND"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no active token named {self.name!r}"


@contextmanager
def _tokens() -> Iterator[Tokens]:
    from leaseflow import local, tokens
    from leaseflow.tasks import runtime

    store = runtime.make_store(local.resolve(get_settings()), application_name="leaseflow-cli")
    try:
        yield tokens.Tokens(store)
    finally:
        store.close()


@click.group()
def tokens() -> None:
    """Bearer tokens of the HTTP API (leaseflow serve)."""


@tokens.command("create")
@click.option("--name", required=True, help="A unique name: letters, digits, ._-")
@click.option("--tenant", default="default", show_default=True, help="The tenant it acts for.")
@click.option("--admin", is_flag=True, help="Every tenant, and the operator endpoints.")
def tokens_create(name: str, tenant: str, admin: bool) -> None:
    """Create a token and print it (the only time it is shown)."""
    with _tokens() as found:
        token = found.create(name, tenant=tenant, admin=admin)
    click.echo(token)


@tokens.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def tokens_list(as_json: bool) -> None:
    """The active tokens: name, tenant, admin, created, last used (never the token)."""
    with _tokens() as found:
        listed = found.list()
    if as_json:
        click.echo(to_json([record.to_dict() for record in listed]))
        return
    for record in listed:
        used = record.last_used_at.isoformat() if record.last_used_at else "never"
        role = "admin" if record.admin else "tenant"
        click.echo(
            f"{record.name}\t{record.tenant}\t{role}\t"
            f"created {record.created_at.isoformat()}\tlast used {used}"
        )


@tokens.command("revoke")
@click.argument("name")
def tokens_revoke(name: str) -> None:
    """Revoke the token NAME at once (exit 1 if there is none)."""
    with _tokens() as found:
        if not found.revoke(name):
            raise TokenNotFound(name)
    click.echo(f"revoked token {name!r}")


def register(group: click.Group) -> None:
    group.add_command(tokens)
