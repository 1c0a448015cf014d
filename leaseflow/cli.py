"""The ``leaseflow`` command line (click)."""

from __future__ import annotations

import click


@click.group()
def main() -> None:
    """leaseflow: durable state machines on Celery, fenced by Postgres leases."""
