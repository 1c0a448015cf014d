"""The ``purge`` command: delete finished runs by age, or one run.

Errors are raised as ``LeaseflowError`` (or click usage errors) and printed by the
``leaseflow`` group as ``error[<code>]: <message>``, exit 1 (a usage error: 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from leaseflow import durations
from leaseflow.cli_render import to_json
from leaseflow.settings import get_settings
from leaseflow.store import purge_records

if TYPE_CHECKING:
    from leaseflow.client import Client
    from leaseflow.store.purge_records import Purged


class Duration(click.ParamType):
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w``, ``1d12h`` or plain seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        try:
            return durations.parse(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _statuses(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    if value is None:
        return purge_records.FINISHED
    try:
        return purge_records.check_statuses([s.strip() for s in value.split(",") if s.strip()])
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


def _client() -> Client:
    from leaseflow.client import Client

    return Client(settings=get_settings())


@click.command()
@click.argument("run_id", required=False)
@click.option(
    "--older-than",
    type=Duration(),
    help="Purge runs finished longer ago than this: 90s, 30m, 12h, 7d, 2w, 1d12h, 3600.",
)
@click.option(
    "--status",
    "statuses",
    callback=_statuses,
    help="Comma-separated finished statuses [default: completed,failed,cancelled,timed_out].",
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option(
    "--pause",
    type=click.FloatRange(min=0),
    default=purge_records.PAUSE,
    show_default=True,
    help="Seconds between batches of 500 runs, room for live work (0: as fast as it can).",
)
@click.option("--force", is_flag=True, help="With RUN_ID: purge it even if active (cancel it).")
@click.option("--json", "as_json", is_flag=True, help="Print what was deleted as JSON.")
@click.pass_context
def purge(
    ctx: click.Context,
    run_id: str | None,
    older_than: float | None,
    statuses: tuple[str, ...],
    dry_run: bool,
    pause: float,
    force: bool,
    as_json: bool,
) -> None:
    """Delete finished runs older than --older-than with their steps, groups, branches,
    signals and artifacts (in small batches), or delete RUN_ID."""
    source = ctx.get_parameter_source
    if run_id is not None:
        if older_than is not None:
            raise click.UsageError("give RUN_ID or --older-than, not both")
        if dry_run or source("statuses") is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError("--dry-run and --status go with --older-than, not RUN_ID")
        with _client() as client:
            done = client.purge_run(run_id, force=force)
        _print(done, as_json, f"run {run_id}")
        return
    if older_than is None:
        raise click.UsageError("give --older-than DURATION (e.g. 7d) or a RUN_ID")
    if force:
        raise click.UsageError("--force goes with RUN_ID (an active run): finished runs need none")
    with _client() as client:
        done = client.purge(older_than, statuses=statuses, dry_run=dry_run, pause=pause)
    runs = "run" if done.runs == 1 else "runs"
    age = durations.describe(older_than)
    _print(
        done, as_json, f"{done.runs} {runs} finished more than {age} ago ({', '.join(statuses)})"
    )


def _print(done: Purged, as_json: bool, which: str) -> None:
    """One line of what was (or would be) deleted, or the JSON of it."""
    if as_json:
        click.echo(to_json(done.to_dict()))
        return
    verb = "would purge" if done.dry_run else "purged"
    rows = ", ".join(f"{n} {table}" for table, n in done.counts().items() if table != "runs")
    click.echo(f"{verb} {which}: {rows}")


def register(group: click.Group) -> None:
    group.add_command(purge)
