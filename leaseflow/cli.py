"""The ``leaseflow`` command line (click).

Commands import the engine lazily: building the Celery app imports
``LEASEFLOW_WORKFLOWS``, which ``leaseflow --help`` must not need.
Without ``LEASEFLOW_DATABASE_URL`` the commands that read or write runs use the
embedded PostgreSQL under ``LEASEFLOW_HOME`` (``leaseflow.local``): started, or
reused when a worker already runs it.
Every error is one ``error[<code>]: <message>`` on stderr, never a traceback: the
``code`` of the ``LeaseflowError`` (``E-CONFIG`` for a malformed environment,
``E-USAGE`` for a malformed argument). Usage errors exit 2, every other error 1.
With ``--json`` among the arguments, the error is printed as one JSON object
``{"code": ..., "message": ...}``, on stderr too: stdout only ever carries results.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import pydantic

from leaseflow import (
    cli_args,
    cli_control,
    cli_flower,
    cli_purge,
    cli_serve,
    cli_tokens,
    errors,
    logfmt,
)
from leaseflow import cli_render as render
from leaseflow.fsm import graph as graph_mod
from leaseflow.fsm import registry
from leaseflow.settings import Settings, get_settings
from leaseflow.types import RunStatus

if TYPE_CHECKING:
    from celery import Celery

    from leaseflow.client import Client
    from leaseflow.fsm.definition import Workflow

#: The code of a malformed command line (bad arguments, unknown option, bad ``--input``).
USAGE = "E-USAGE"
#: The code of an error click raises that is not a usage error (none is expected).
CLI_ERROR = "E-CLI"
#: Exit statuses: a usage error, any other error.
EXIT_USAGE = 2
EXIT_ERROR = 1


class MigrationFailed(errors.LeaseflowError):
    """``db upgrade`` could not migrate the database (it was reachable)."""

    code = "E-DB-MIGRATION"


class _Group(click.Group):
    """The ``leaseflow`` group: every error becomes ``error[<code>]: <message>`` (or
    a JSON object with ``--json``) on stderr, and exit 2 (usage) or 1."""

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        as_json = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
        try:
            status = super().main(args, prog_name, complete_var, False, **extra)
        except click.Abort:
            click.echo("Aborted!", err=True)
            status = EXIT_ERROR
        except click.UsageError as exc:
            hint = f"Try '{exc.ctx.command_path} --help' for help." if exc.ctx else None
            status = _report(USAGE, exc.format_message(), as_json, hint=hint)
        except click.ClickException as exc:
            status = _report(CLI_ERROR, exc.format_message(), as_json, status=exc.exit_code)
        except errors.LeaseflowError as exc:
            status = _report(exc.code, str(exc), as_json)
        except pydantic.ValidationError as exc:
            if exc.title != Settings.__name__:
                raise
            status = _report(errors.ConfigurationError.code, _settings_problems(exc), as_json)
        sys.exit(status if isinstance(status, int) else 0)


def _report(
    code: str, message: str, as_json: bool, *, hint: str | None = None, status: int | None = None
) -> int:
    """Print one error on stderr; its exit status (2 for usage errors, else 1)."""
    if as_json:
        click.echo(json.dumps({"code": code, "message": message}, ensure_ascii=False), err=True)
    else:
        click.echo(f"error[{code}]: {message}", err=True)
        if hint:
            click.echo(hint, err=True)
    if status is not None:
        return status
    return EXIT_USAGE if code == USAGE else EXIT_ERROR


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
    # LEASEFLOW_LOG_FORMAT and _LEVEL (a worker's are Celery's); a bad environment is
    # reported by the command that reads it (``--help`` needs none).
    with contextlib.suppress(pydantic.ValidationError, errors.LeaseflowError):
        logfmt.configure_cli(get_settings())


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

    from leaseflow import local, migrations

    url = get_settings().database_url
    if not url:
        raise errors.ConfigurationError(
            "LEASEFLOW_DATABASE_URL is not set: `db upgrade` migrates the PostgreSQL it "
            "names; the embedded PostgreSQL under LEASEFLOW_HOME is migrated whenever "
            "leaseflow starts it"
        )
    shown = local.shown(url)  # every password form masked, the query string's too
    try:
        before = _revision(url)
        migrations.upgrade(url)
        after = _revision(url)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        first = str(exc.orig if isinstance(exc, sqlalchemy.exc.DBAPIError) else exc)
        message = f"cannot migrate {shown}: {local.scrubbed(first.strip(), url)}"
        if isinstance(exc, sqlalchemy.exc.OperationalError):  # not reached
            raise errors.StoreUnavailable(message) from exc
        raise MigrationFailed(message) from exc
    if before == after:
        click.echo(f"{shown}: already at revision {after}")
    else:
        click.echo(f"{shown}: upgraded from {before or '<empty>'} to revision {after}")


# -- worker and beat --------------------------------------------------------------


def _exit_with(code: object) -> None:
    if isinstance(code, int) and code != 0:
        raise click.exceptions.Exit(code)


def _check_definitions(*, need_workflows: bool) -> None:
    """Before Celery starts: import ``LEASEFLOW_WORKFLOWS`` and validate every
    definition; print every problem (and, when ``need_workflows``, the lack of any
    workflow) and exit 1 instead of starting a process that cannot serve them."""
    from leaseflow.tasks import celery_app

    settings = get_settings()
    celery_app.import_workflows(settings.workflows)
    problems = celery_app.startup_problems(settings, need_workflows=need_workflows)
    for problem in problems:
        _report(problem.code, str(problem), as_json=False)
    if problems:
        raise SystemExit(EXIT_ERROR)


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.option("-Q", "--queues", help="Comma-separated queues [default: LEASEFLOW_DEFAULT_QUEUE]")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), help="Pool size.")
@click.option("-P", "--pool", help="Pool: prefork, threads, solo, ...")
@click.option("-l", "--loglevel", default="INFO", show_default=True)
@click.option(
    "-E",
    "--task-events",
    is_flag=True,
    help="Send task events (for Flower), as celery worker -E; off by default.",
)
@click.option(
    "--maintenance-only",
    is_flag=True,
    help="Serve only the beat queue (reaper, dispatcher): needs no LEASEFLOW_WORKFLOWS.",
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(
    queues: str | None,
    concurrency: int | None,
    pool: str | None,
    loglevel: str,
    task_events: bool,
    maintenance_only: bool,
    celery_args: tuple[str, ...],
) -> None:
    """Run a Celery worker for the workflows of LEASEFLOW_WORKFLOWS.

    Every definition is validated first: an invalid one, or no workflow at all
    (unless --maintenance-only), and the worker does not start.
    Arguments after the options go to ``celery worker`` unchanged.
    Task events are off, as in Celery, unless -E asks for them (Flower shows tasks
    from them): then the worker also sends ``task-sent`` for each state it publishes.
    """
    from leaseflow.tasks import celery_app

    if maintenance_only and queues:
        raise click.UsageError("--maintenance-only serves the beat queue only: drop -Q")
    _check_definitions(need_workflows=not maintenance_only)
    settings = get_settings()
    queue = settings.maintenance_queue if maintenance_only else queues or settings.default_queue
    argv = ["worker", "-Q", queue, "-l", loglevel]
    if concurrency is not None:
        argv += ["-c", str(concurrency)]
    if pool is not None:
        argv += ["--pool", pool]
    if task_events:
        argv += ["-E"]
    _exit_with(celery_app.get_app().worker_main([*argv, *celery_args]))


def default_schedule() -> Path:
    """Where beat keeps its schedule (a pickle): ``$LEASEFLOW_HOME/celerybeat-schedule``.

    The home is made private (0700) if missing, and refused if another user could
    write it: never a shared directory such as /tmp or a cache of every project.
    """
    from leaseflow import local

    home = local.ensure_home(local.home_dir(get_settings()))
    return home / "celerybeat-schedule"


@main.command()
@click.option("-l", "--loglevel", default="INFO", show_default=True)
@click.option(
    "-s",
    "--schedule",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Schedule file [default: $LEASEFLOW_HOME/celerybeat-schedule]",
)
def beat(loglevel: str, schedule: Path | None) -> None:
    """Run celery beat: the reaper and the dispatcher (every definition is validated first)."""
    from leaseflow.tasks import celery_app

    _check_definitions(need_workflows=False)
    path = schedule or default_schedule()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(str(exc), param_hint="'--schedule'") from exc
    _exit_with(celery_app.get_app().start(["beat", "-l", loglevel, "-s", str(path)]))


# -- runs -------------------------------------------------------------------------


@main.command()
@click.argument("workflow")
@click.option(
    "--input",
    "input_json",
    default="{}",
    show_default=True,
    help="A JSON object; @FILE reads it from a file, - from stdin.",
)
@click.option("--idempotency-key", help="Starting twice with one key yields one run.")
@click.option("--version", type=click.IntRange(min=1), help="[default: the newest]")
@click.option(
    "--priority",
    type=click.IntRange(0, 9),
    default=0,
    show_default=True,
    help="0 (default) to 9 (most urgent): the run's messages are served in this order.",
)
def start(
    workflow: str,
    input_json: str,
    idempotency_key: str | None,
    version: int | None,
    priority: int,
) -> None:
    """Start a run of WORKFLOW and print its id."""
    from leaseflow import local
    from leaseflow.client import Client

    text = cli_args.json_text(input_json, sys.stdin.buffer, option="--input")
    payload = cli_args.parse_json(
        text, option="--input", too_deep=lambda: errors.InvalidInput(workflow, cli_args.TOO_DEEP)
    )
    wf = _workflow(workflow, version)
    settings = local.resolve(get_settings())
    with _celery_app(settings) as app, Client(settings=settings, app=app) as client:
        run_id = client.start(wf, payload, idempotency_key=idempotency_key, priority=priority)
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
        click.echo(render.to_json([run.to_dict() for run in found]))
        return
    render.console().print(render.runs_table(found))


@runs.command("show")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
def runs_show(run_id: str, as_json: bool) -> None:
    """A run and its step log."""
    with _client() as client:
        run = client.get(run_id)
    if as_json:
        click.echo(render.to_json(run.to_dict()))
        return
    render.print_run(run)


@runs.command("artifact")
@click.argument("run_id")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="A file.")
def runs_artifact(run_id: str, name: str, output: Path | None) -> None:
    """Write an artefact's bytes to stdout (or to --output), exactly as put."""
    with _client() as client:
        found = client.artifact(run_id, name)
    assert found.data is not None
    if output is not None:
        output.write_bytes(found.data)
    else:
        sys.stdout.buffer.write(found.data)
        sys.stdout.buffer.flush()


# -- demo -------------------------------------------------------------------------


@main.command()
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--crash", is_flag=True, help="SIGKILL the worker mid-state; the reaper recovers.")
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Worker processes, and runs kept in flight (the states mostly wait).",
)
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


cli_control.register(main)
cli_flower.register(main)
cli_purge.register(main)
cli_serve.register(main)
cli_tokens.register(main)

if __name__ == "__main__":
    main()
