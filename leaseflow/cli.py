"""The ``leaseflow`` command line (click).

Commands import the engine lazily: building the Celery app imports
``LEASEFLOW_WORKFLOWS``, which ``leaseflow --help`` must not need.
Without ``LEASEFLOW_DATABASE_URL`` the commands that read or write runs use the
embedded PostgreSQL under ``LEASEFLOW_HOME`` (``leaseflow.local``): started, or
reused when a worker already runs it.
Every ``LeaseflowError`` (and a malformed environment) becomes a message on stderr
and exit code 1, never a traceback; a malformed argument exits 2.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import pydantic

from leaseflow import errors
from leaseflow.fsm import graph as graph_mod
from leaseflow.fsm import registry
from leaseflow.settings import Settings, get_settings
from leaseflow.types import RunStatus

if TYPE_CHECKING:
    from celery import Celery
    from rich.console import Console

    from leaseflow.client import Client
    from leaseflow.fsm.definition import Workflow
    from leaseflow.store.records import GroupRecord, RunRecord

#: Width of tables written to a pipe or file, so ids and timestamps never wrap.
PIPE_WIDTH = 200


class _Group(click.Group):
    """A group that turns leaseflow's own errors into clean click errors."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except errors.LeaseflowError as exc:
            raise click.ClickException(str(exc)) from exc
        except pydantic.ValidationError as exc:
            if exc.title != Settings.__name__:
                raise
            raise click.ClickException(_settings_problems(exc)) from exc


def _settings_problems(exc: pydantic.ValidationError) -> str:
    lines = ["invalid environment:"]
    for err in exc.errors():
        where = "LEASEFLOW_" + "_".join(str(part) for part in err["loc"]).upper()
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


@click.group(cls=_Group)
def main() -> None:
    """leaseflow: durable state machines on Celery, fenced by Postgres leases."""
    # Like ``celery -A``: the modules of LEASEFLOW_WORKFLOWS may live in the cwd.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


# -- helpers ----------------------------------------------------------------------


def _workflow(name: str, version: int | None) -> Workflow:
    """The workflow, once the modules of ``LEASEFLOW_WORKFLOWS`` are imported."""
    from leaseflow.tasks import celery_app

    celery_app.import_workflows(get_settings().workflows)
    return registry.get(name, version)


@contextmanager
def _celery_app(settings: Settings) -> Iterator[Celery]:
    """The process's Celery app, or a new one if the environment changed since it was
    built: a process that changes ``LEASEFLOW_*`` afterwards (tests, embedding) must
    not publish to the broker or queue of the old environment.
    """
    from leaseflow.tasks import celery_app

    app = celery_app.get_app()
    if celery_app.same_broker(app, settings):
        yield app
        return
    app = celery_app.make_app(settings)
    try:
        yield app
    finally:
        app.close()


def _client() -> Client:
    from leaseflow.client import Client

    return Client(settings=get_settings())


def _console() -> Console:
    from rich.console import Console

    console = Console(markup=False, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(markup=False, highlight=False, width=PIPE_WIDTH)
    return console


def _when(value: datetime | None) -> str:
    return "" if value is None else value.isoformat(sep=" ", timespec="seconds")


def _summary(error: str | None) -> str:
    """One line of an error: the exception line of a traceback, else the first line."""
    if not error:
        return ""
    lines = [line for line in error.strip().splitlines() if line.strip()]
    if lines[0].startswith("Traceback"):
        return lines[-1].strip()
    return lines[0].strip()


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


# -- db ---------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Manage the leaseflow schema."""


def _revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, pool

    from leaseflow import migrations

    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            opts = {"version_table": migrations.VERSION_TABLE}
            return MigrationContext.configure(conn, opts=opts).get_current_revision()
    finally:
        engine.dispose()


@db.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the lf_* tables to the newest schema."""
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    from leaseflow import migrations

    url = get_settings().database_url
    if not url:
        raise errors.ConfigurationError(
            "LEASEFLOW_DATABASE_URL is not set: `db upgrade` migrates the PostgreSQL it "
            "names; the embedded PostgreSQL under LEASEFLOW_HOME is migrated whenever "
            "leaseflow starts it"
        )
    shown = make_url(url).render_as_string(hide_password=True)
    try:
        before = _revision(url)
        migrations.upgrade(url)
        after = _revision(url)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        first = str(exc.orig if isinstance(exc, sqlalchemy.exc.DBAPIError) else exc)
        raise click.ClickException(f"cannot migrate {shown}: {first.strip()}") from exc
    if before == after:
        click.echo(f"{shown}: already at revision {after}")
    else:
        click.echo(f"{shown}: upgraded from {before or '<empty>'} to revision {after}")


# -- worker and beat --------------------------------------------------------------


def _exit_with(code: object) -> None:
    if isinstance(code, int) and code != 0:
        raise click.exceptions.Exit(code)


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.option("-Q", "--queues", help="Comma-separated queues [default: LEASEFLOW_DEFAULT_QUEUE]")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), help="Pool size.")
@click.option("-P", "--pool", help="Pool: prefork, threads, solo, ...")
@click.option("-l", "--loglevel", default="INFO", show_default=True)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(
    queues: str | None,
    concurrency: int | None,
    pool: str | None,
    loglevel: str,
    celery_args: tuple[str, ...],
) -> None:
    """Run a Celery worker for the workflows of LEASEFLOW_WORKFLOWS.

    Arguments after the options go to ``celery worker`` unchanged.
    """
    from leaseflow.tasks import celery_app

    argv = ["worker", "-Q", queues or get_settings().default_queue, "-l", loglevel]
    if concurrency is not None:
        argv += ["-c", str(concurrency)]
    if pool is not None:
        argv += ["--pool", pool]
    _exit_with(celery_app.get_app().worker_main([*argv, *celery_args]))


def default_schedule() -> Path:
    """Where beat keeps its schedule: the user's cache directory, else the temp dir."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "leaseflow"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir())
    return cache / "celerybeat-schedule"


@main.command()
@click.option("-l", "--loglevel", default="INFO", show_default=True)
@click.option(
    "-s",
    "--schedule",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Schedule file [default: ~/.cache/leaseflow/celerybeat-schedule]",
)
def beat(loglevel: str, schedule: Path | None) -> None:
    """Run celery beat: the reaper and the dispatcher."""
    from leaseflow.tasks import celery_app

    path = schedule or default_schedule()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(str(exc), param_hint="'--schedule'") from exc
    _exit_with(celery_app.get_app().start(["beat", "-l", loglevel, "-s", str(path)]))


# -- runs -------------------------------------------------------------------------


@main.command()
@click.argument("workflow")
@click.option("--input", "input_json", default="{}", show_default=True, help="A JSON object.")
@click.option("--idempotency-key", help="Starting twice with one key yields one run.")
@click.option("--version", type=click.IntRange(min=1), help="[default: the newest]")
def start(workflow: str, input_json: str, idempotency_key: str | None, version: int | None) -> None:
    """Start a run of WORKFLOW and print its id."""
    from leaseflow import local
    from leaseflow.client import Client

    try:
        payload = json.loads(input_json)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="'--input'") from exc
    wf = _workflow(workflow, version)
    settings = local.resolve(get_settings())
    with _celery_app(settings) as app, Client(settings=settings, app=app) as client:
        run_id = client.start(wf, payload, idempotency_key=idempotency_key)
    click.echo(run_id)


@main.group()
def runs() -> None:
    """Inspect runs."""


@runs.command("list")
@click.option("--status", type=click.Choice([s.value for s in RunStatus]))
@click.option("--workflow", help="Only runs of this workflow.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def runs_list(status: str | None, workflow: str | None, limit: int, as_json: bool) -> None:
    """The newest runs first."""
    with _client() as client:
        found = client.list_runs(status=status, workflow=workflow, limit=limit)
    if as_json:
        click.echo(_json([run.to_dict() for run in found]))
        return
    from rich.table import Table

    table = Table(title=f"{len(found)} run(s)", title_justify="left")
    for column in ("id", "workflow", "status", "state", "attempt", "error_code"):
        table.add_column(column, no_wrap=column == "id")
    table.add_column("created", no_wrap=True)
    table.add_column("updated", no_wrap=True)
    for run in found:
        table.add_row(
            run.id,
            f"{run.workflow} v{run.version}",
            run.status,
            run.state,
            f"{run.attempt}/{run.max_attempts}",
            run.error_code or "",
            _when(run.created_at),
            _when(run.updated_at),
        )
    _console().print(table)


@runs.command("show")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
def runs_show(run_id: str, as_json: bool) -> None:
    """A run and its step log."""
    with _client() as client:
        run = client.get(run_id)
    if as_json:
        click.echo(_json(run.to_dict()))
        return
    _print_run(run)


def _print_run(run: RunRecord) -> None:
    from rich.table import Table

    details = Table.grid(padding=(0, 2))
    details.add_column(style="bold")
    details.add_column()
    rows: list[tuple[str, str]] = [
        ("id", run.id),
        ("workflow", f"{run.workflow} v{run.version}"),
        ("status", run.status),
        ("state", run.state + (f" (from {run.prev_state})" if run.prev_state else "")),
        ("step", str(run.step_seq)),
        ("attempt", f"{run.attempt}/{run.max_attempts}"),
        ("created", _when(run.created_at)),
        ("updated", _when(run.updated_at)),
    ]
    if run.finished_at is not None:
        rows.append(("finished", _when(run.finished_at)))
    if run.lease_owner is not None:
        rows.append(("lease", f"{run.lease_owner} until {_when(run.lease_expires_at)}"))
    if run.idempotency_key is not None:
        rows.append(("idempotency key", run.idempotency_key))
    rows.append(("input", json.dumps(run.input, ensure_ascii=False)))
    if run.output is not None:
        rows.append(("output", json.dumps(run.output, ensure_ascii=False, default=str)))
    if run.error_code is not None or run.error is not None:
        rows.append(("error", f"{run.error_code or ''} {run.error or ''}".strip()))
    for key, value in rows:
        details.add_row(key, value)

    steps = Table(title=f"{len(run.steps)} step(s)", title_justify="left")
    for column in ("seq", "state", "attempt", "outcome", "next_state"):
        steps.add_column(column)
    steps.add_column("started", no_wrap=True)
    steps.add_column("finished", no_wrap=True)
    steps.add_column("ms", justify="right")
    steps.add_column("worker")
    steps.add_column("error")
    for step in run.steps:
        steps.add_row(
            str(step.seq),
            step.state,
            str(step.attempt),
            step.outcome,
            step.next_state or "",
            _when(step.started_at),
            _when(step.finished_at),
            "" if step.duration_ms is None else str(step.duration_ms),
            step.worker or "",
            _summary(step.error),
        )
    console = _console()
    console.print(details)
    console.print()
    console.print(steps)
    for group in run.groups:
        console.print()
        console.print(_group_table(group))


def _group_table(group: GroupRecord) -> Any:
    """One Parallel/Map group: its counters and each branch's state, result or error."""
    from rich.table import Table

    title = (
        f"{group.kind} group {group.id} (step {group.parent_seq}): "
        f"{group.done} done, {group.failed} failed of {group.width}, "
        f"{group.status}, join {group.join_state!r}, {group.on_branch_error}"
    )
    table = Table(title=title, title_justify="left")
    for column in ("branch", "state", "status", "result / error"):
        table.add_column(column)
    for branch in group.branches:
        shown = branch.error if branch.error else json.dumps(branch.result, default=str)
        table.add_row(str(branch.idx), branch.state, branch.status, _summary(shown))
    return table


# -- demo -------------------------------------------------------------------------


@main.command()
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--crash", is_flag=True, help="SIGKILL the worker mid-state; the reaper recovers.")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True)
def demo(runs: int, crash: bool, concurrency: int, timeout: float) -> None:
    """Run the example agent workflow end to end and summarise it.

    With no LEASEFLOW_DATABASE_URL or LEASEFLOW_BROKER_URL it uses an embedded
    PostgreSQL and a local broker under LEASEFLOW_HOME: nothing to install.
    """
    from rich.console import Console

    from leaseflow import demo as demo_mod
    from leaseflow import local

    settings = local.resolve(get_settings())  # run_demo gives its processes local.child_env
    try:
        report = demo_mod.run_demo(
            settings,
            runs=runs,
            crash=crash,
            concurrency=concurrency,
            timeout=timeout,
            console=Console(),
        )
    except KeyboardInterrupt:
        click.echo("interrupted: every process the demo started was stopped", err=True)
        raise SystemExit(130) from None
    if not report.ok:
        raise SystemExit(1)


# -- graph ------------------------------------------------------------------------


@main.command()
@click.argument("workflow")
@click.option(
    "--format", "fmt", type=click.Choice(graph_mod.FORMATS), default="mermaid", show_default=True
)
@click.option("--version", type=click.IntRange(min=1), help="[default: the newest]")
def graph(workflow: str, fmt: str, version: int | None) -> None:
    """Print the state graph of WORKFLOW as Mermaid or Graphviz dot."""
    click.echo(graph_mod.render(_workflow(workflow, version), fmt), nl=False)


if __name__ == "__main__":
    main()
