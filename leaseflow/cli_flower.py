"""``leaseflow flower``: Flower over leaseflow's Celery app (the ``flower`` extra).

Celery's ``flower`` command with ``-A leaseflow.tasks``: the broker of
``LEASEFLOW_BROKER_URL``, or the embedded Redis of ``LEASEFLOW_HOME`` (started if
needed). Flower's own options follow unchanged (``--port=5555``, ``--basic-auth=...``);
it binds to 127.0.0.1 unless ``--address`` says otherwise. Flower lists a state's task
only from workers run with ``-E`` (``leaseflow worker -E``).
"""

from __future__ import annotations

import importlib.util

import click

from leaseflow import errors
from leaseflow.settings import get_settings


class FlowerMissing(errors.LeaseflowError):
    """Flower is not installed in this environment."""

    code = "E-FLOWER-MISSING"

    def __str__(self) -> str:
        return "Flower is not installed: pip install 'leaseflow[flower]'"


def flower_argv(args: tuple[str, ...]) -> list[str]:
    """Celery's argv for Flower: ``flower`` and its options, loopback by default."""
    argv = ["flower", *args]
    if not any(a == "--address" or a.startswith("--address=") for a in args):
        argv.append("--address=127.0.0.1")
    return argv


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(flower_args: tuple[str, ...]) -> None:
    """Run Flower (Celery's monitor) on leaseflow's broker; options go to Flower.

    Workers send the task events Flower shows only with -E (`leaseflow worker -E`).
    Its HTTP API (/api/tasks, /api/workers) needs --basic-auth or --auth, or
    FLOWER_UNAUTHENTICATED_API=true on a trusted host.
    """
    if importlib.util.find_spec("flower") is None:
        raise FlowerMissing()
    from leaseflow import local
    from leaseflow.tasks import celery_app

    # The embedded Redis, when no broker is configured, must be up for Flower.
    local.export_env(local.resolve(get_settings(), database=False))
    code = celery_app.get_app().start(flower_argv(flower_args))
    if isinstance(code, int) and code != 0:
        raise click.exceptions.Exit(code)


def register(group: click.Group) -> None:
    group.add_command(flower)
