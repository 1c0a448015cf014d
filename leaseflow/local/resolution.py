"""Which database and broker a process uses, and how its children learn them.

:func:`choose` decides, without I/O, from the settings alone: an unset broker URL (or
the one an embedded-resolving parent exported) means the embedded Redis of
``LEASEFLOW_HOME``; an unset database URL (likewise) means the embedded PostgreSQL of
that home. :func:`resolve` carries the decision out: it starts or reuses the servers
(:mod:`leaseflow.local.redis`, :mod:`leaseflow.local.postgres`) and returns settings
with both URLs filled in.

Resolving never changes ``os.environ``. A process that starts children which must
use the same servers gives them :func:`child_env`: explicitly in the environment of
a subprocess it starts (``leaseflow demo``), or through :func:`export_env` before it
forks or spawns them (the worker before its pool forks, beat). A forked child reuses
its parent's ownership of the servers; a subprocess finds the URLs in
``LEASEFLOW_EMBEDDED_DATABASE_URL`` and ``LEASEFLOW_EMBEDDED_BROKER_URL`` and
re-registers as an owner of the running servers instead of treating them as foreign.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leaseflow.local import broker, masking, postgres, redis
from leaseflow.settings import Settings, libpq_url, reset_settings, sqlalchemy_url

#: The environment a process gives its children (see :func:`child_env`).
ENV_HOME = "LEASEFLOW_HOME"
ENV_DATABASE_URL = "LEASEFLOW_DATABASE_URL"
ENV_BROKER_URL = "LEASEFLOW_BROKER_URL"
#: Marks ``LEASEFLOW_DATABASE_URL`` as the embedded server's: a subprocess seeing it
#: registers as an owner instead of treating the URL as a foreign database.
ENV_EMBEDDED_URL = "LEASEFLOW_EMBEDDED_DATABASE_URL"
#: Marks ``LEASEFLOW_BROKER_URL`` as the embedded Redis's, likewise.
ENV_EMBEDDED_BROKER_URL = "LEASEFLOW_EMBEDDED_BROKER_URL"

#: Inherited by forked children, so a pool child does not repeat its parent's line.
_announced = False


# -- the decision (pure) --------------------------------------------------------------


def home_dir(settings: Settings) -> Path:
    """``LEASEFLOW_HOME`` as an absolute path (relative to the working directory)."""
    return Path(os.path.abspath(settings.home.expanduser()))


def default_broker_url(settings: Settings) -> str:
    """``redis+socket:///<socket>``: the home's embedded Redis (see ``broker.socket_path``)."""
    return broker.embedded_url(home_dir(settings))


def broker_url(settings: Settings) -> str:
    """The broker ``settings`` mean: the configured one, else the embedded Redis's."""
    url = settings.broker_url
    if url is None or broker.is_default(url):
        return default_broker_url(settings)
    return broker.check(url)


def wants_embedded_broker(settings: Settings, environ: Mapping[str, str] | None = None) -> bool:
    """No broker URL (or a bare default), or the one an embedded-resolving parent exported."""
    url = settings.broker_url
    if broker.is_default(url):
        return True
    exported = (os.environ if environ is None else environ).get(ENV_EMBEDDED_BROKER_URL)
    return exported is not None and url == exported


def wants_embedded_database(settings: Settings, environ: Mapping[str, str] | None = None) -> bool:
    """No database URL, or the one an embedded-resolving parent exported to us."""
    url = settings.database_url
    if url is None:
        return True
    exported = (os.environ if environ is None else environ).get(ENV_EMBEDDED_URL)
    return exported is not None and url == sqlalchemy_url(exported)


@dataclass(frozen=True)
class Choice:
    """What :func:`resolve` does for some settings."""

    #: The broker to use: the configured one, else the home's embedded Redis.
    broker_url: str
    #: Start or reuse the embedded PostgreSQL of this home (absolute); ``None``: use
    #: the configured database URL, or no database at all.
    embedded_home: Path | None
    #: Start or reuse the embedded Redis of this home (absolute); ``None``: use the
    #: configured broker URL.
    broker_home: Path | None


def choose(
    settings: Settings, *, database: bool = True, environ: Mapping[str, str] | None = None
) -> Choice:
    """Decide, without I/O, which broker and database ``settings`` mean.

    ``database=False`` leaves the database alone (beat needs only the broker);
    ``environ`` (default ``os.environ``) is only read, for the markers a parent
    process left (``LEASEFLOW_EMBEDDED_DATABASE_URL``, ``..._BROKER_URL``).
    """
    home = home_dir(settings)
    embedded = database and wants_embedded_database(settings, environ)
    embedded_broker = wants_embedded_broker(settings, environ)
    return Choice(
        broker_url(settings), home if embedded else None, home if embedded_broker else None
    )


# -- carrying it out ------------------------------------------------------------------


def resolve(settings: Settings, *, database: bool = True) -> Settings:
    """``settings`` with ``database_url`` and ``broker_url`` filled in where unset.

    A missing broker URL starts (or reuses) the embedded Redis under
    ``settings.home``, a missing database URL the embedded PostgreSQL there, migrated
    to the newest schema; this process becomes one of their owners (released at exit,
    see :func:`release`). ``database=False`` leaves the database alone (beat needs only
    the broker). Explicit URLs are returned as they are, at no cost. The first
    resolution that takes a default prints one line on stderr naming the database and
    broker in use. The environment is left alone: see :func:`export_env`.
    """
    choice = choose(settings, database=database)
    updates: dict[str, Any] = {}
    broker_server = None
    if choice.broker_home is not None:
        broker_server = redis.ensure_server(choice.broker_home)
        updates["broker_url"] = broker_server.url
    server = None
    if choice.embedded_home is not None:
        server = postgres.ensure_server(choice.embedded_home)
        updates["database_url"] = server.url
    if not updates:
        return settings
    resolved = settings.model_copy(update=updates)
    _announce(resolved, server, broker_server)
    return resolved


def release(home: Path | None = None) -> None:
    """Stop owning ``home``'s embedded servers (default: every one this process owns);
    each stops when no live owner is left. Runs at exit by itself."""
    postgres.release(home)
    redis.release(home)


def stop(home: Path) -> bool:
    """Stop ``home``'s embedded servers whoever owns them, and forget their owners; was
    its PostgreSQL running?"""
    redis.stop(home)
    return postgres.stop(home)


def child_env(settings: Settings) -> dict[str, str]:
    """The ``LEASEFLOW_*`` variables that make a child use ``settings``' server and broker.

    ``settings`` as :func:`resolve` returned them: the absolute home, the URLs in
    use, and, for each embedded server, the marker that makes a subprocess register
    as one of its owners.
    """
    env = {ENV_HOME: str(home_dir(settings))}
    if settings.broker_url is not None:
        env[ENV_BROKER_URL] = settings.broker_url
        if redis.serves(settings.broker_url) or wants_embedded_broker(settings):
            env[ENV_EMBEDDED_BROKER_URL] = settings.broker_url
    url = settings.database_url
    if url is not None:
        env[ENV_DATABASE_URL] = url
        if postgres.serves(url) or wants_embedded_database(settings):
            env[ENV_EMBEDDED_URL] = url
    return env


def export_env(settings: Settings) -> None:
    """Put :func:`child_env` into ``os.environ``, for the children to come.

    Only for entry points that start processes and cannot hand them an environment:
    the worker before its pool forks, beat. ``get_settings()`` agrees afterwards.
    """
    os.environ.update(child_env(settings))
    reset_settings()


def _announce(
    resolved: Settings, server: postgres.Server | None, broker_server: redis.Server | None
) -> None:
    """One line on stderr, once per process (and its forked children), when a default is in use."""
    global _announced
    if _announced:
        return
    _announced = True
    if server is not None:
        url = masking.shown(libpq_url(server.url))
        database = f"embedded PostgreSQL {server.version} at {server.pgdata} ({url})"
    elif resolved.database_url is not None:
        database = masking.shown(resolved.database_url)
    else:
        database = "not used by this process"
    if broker_server is not None:
        redis_server = broker_server
        where = f"embedded Redis {redis_server.version} at {redis_server.data} ({redis_server.url})"
    else:
        where = masking.shown(resolved.broker_url or "")
    print(f"leaseflow: database {database}; broker {where}", file=sys.stderr, flush=True)
