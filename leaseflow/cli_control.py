"""The ``signal``, ``cancel`` and ``retry`` commands: operations on one run.

Errors are raised as ``LeaseflowError`` and printed by the ``leaseflow`` group as
``error[<code>]: <message>`` with exit status 1 (a malformed argument: 2).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from leaseflow import cli_args, errors
from leaseflow.cli_render import to_json
from leaseflow.settings import get_settings

if TYPE_CHECKING:
    from leaseflow.client import Client


def _client() -> Client:
    """A client, with the workflows of ``LEASEFLOW_WORKFLOWS`` imported (a re-drive
    reads the attempt budget and deadline of the run's version from them)."""
    from leaseflow.client import Client
    from leaseflow.tasks import celery_app

    settings = get_settings()
    celery_app.import_workflows(settings.workflows)
    return Client(settings=settings)


@click.command()
@click.argument("run_id")
@click.argument("event")
@click.option(
    "--payload",
    "payload_json",
    help="A JSON value for ctx.signal; @FILE reads it from a file, - from stdin.",
)
@click.option("--id", "signal_id", help="A signal id: the same id twice is delivered once.")
@click.option("--json", "as_json", is_flag=True, help="Print the receipt as JSON.")
def signal(
    run_id: str, event: str, payload_json: str | None, signal_id: str | None, as_json: bool
) -> None:
    """Send EVENT to RUN_ID: it resumes the run waiting for it, or is kept until the
    run waits for it."""
    payload = None
    if payload_json is not None:
        text = cli_args.json_text(payload_json, sys.stdin.buffer, option="--payload")
        payload = cli_args.parse_json(
            text,
            option="--payload",
            too_deep=lambda: errors.InvalidSignal(f"payload: {cli_args.TOO_DEEP}"),
        )
    with _client() as client:
        receipt = client.signal(run_id, event, payload, signal_id=signal_id)
    if as_json:
        click.echo(to_json(receipt.to_dict()))
    elif receipt.result == "resumed":
        click.echo(f"resumed run {receipt.run_id}: pending in state {receipt.state!r}")
    elif receipt.result == "stored":
        click.echo(
            f"stored for run {receipt.run_id} ({receipt.run_status} in state "
            f"{receipt.state!r}): a Wait for {event!r} will consume it"
        )
    else:
        click.echo(f"duplicate: signal {receipt.signal_id!r} was already delivered; ignored")


@click.command()
@click.argument("run_id")
@click.option("--reason", help="Why, kept in the run's error.")
def cancel(run_id: str, reason: str | None) -> None:
    """Cancel RUN_ID: at once if pending or waiting; a running state stops at its commit."""
    with _client() as client:
        done = client.cancel(run_id, reason)
    if done.result == "cancelled":
        click.echo(f"cancelled run {done.run_id}")
    elif done.result == "requested":
        click.echo(
            f"cancel requested: run {done.run_id} is running; its state learns it at its "
            "next heartbeat and its commit ends the run cancelled"
        )
    else:
        click.echo(f"run {done.run_id} had already finished ({done.run_status}): nothing done")


@click.command()
@click.argument("run_id")
@click.option("--from-state", help="Resume at this state of the run's version instead.")
def retry(run_id: str, from_state: str | None) -> None:
    """Re-drive a failed, cancelled or timed-out RUN_ID from where it stopped."""
    with _client() as client:
        state = client.retry(run_id, from_state=from_state)
    click.echo(f"re-driven run {run_id}: pending in state {state!r}")


@click.group()
def locks() -> None:
    """Resource locks held by states and by locks.hold callers."""


@locks.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def locks_list(as_json: bool) -> None:
    """The held locks: key, holder, since, expires, fence."""
    from leaseflow.cli_render import locks_table

    with _client() as client:
        held = client.locks()
    if as_json:
        click.echo(to_json([lock.to_dict() for lock in held]))
    else:
        from leaseflow.cli_render import console

        console().print(locks_table(held))


@locks.command("release")
@click.argument("key")
@click.option("--force", is_flag=True, help="Required: the holder is fenced out.")
@click.option("--reason", required=True, help="Why, kept in the audit trail.")
def locks_release(key: str, force: bool, reason: str) -> None:
    """Free KEY whoever holds it. Audited; its holder's next guarded commit is refused."""
    import getpass
    import socket

    if not force:
        raise click.UsageError("an operator's release takes the lock from its holder: --force")
    actor = f"{getpass.getuser()}@{socket.gethostname()}"
    with _client() as client:
        freed = client.store.force_release(key, actor=actor, reason=reason)
    click.echo(
        f"released lock {freed.key!r} (fence {freed.fence}) from {freed.holder}: audited as "
        f"forced by {actor}"
    )


@click.group()
def workers() -> None:
    """The worker registry: every worker process, as its heartbeats report it."""


@workers.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def workers_list(as_json: bool) -> None:
    """Worker processes: host, pid, queues, pool size, started, last seen, leases held."""
    from leaseflow.cli_render import console, workers_table

    with _client() as client:
        found = client.workers()
    if as_json:
        click.echo(to_json([worker.to_dict() for worker in found]))
    else:
        console().print(workers_table(found))


def register(group: click.Group) -> None:
    for command in (signal, cancel, retry, locks, workers):
        group.add_command(command)
