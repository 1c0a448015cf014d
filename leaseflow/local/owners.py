"""The home's locks and owner registries, for the embedded PostgreSQL and Redis.

Start, reuse and stop of a home's server are serialised by an exclusive ``flock``
on a lock file of the home (:func:`home_lock`): ``$LEASEFLOW_HOME/embedded.lock`` for
PostgreSQL, ``redis.lock`` for Redis. Every process using a server registers as one of
its *owners*: a file ``<registry>/<pid>`` of the home (``owners/`` for PostgreSQL,
``redis/owners/`` for Redis) holding the process's start time, so a reused pid is not
mistaken for an owner. Owners that died without releasing are pruned by whoever looks
next (:func:`live_owners`). The home and the registries are 0700, the files in them 0600.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from leaseflow import errors
from leaseflow.local import private

#: Seconds to wait for another process holding the home's lock (it may be running initdb).
LOCK_TIMEOUT = 180.0
#: The embedded PostgreSQL's lock file and owner registry, in the home.
POSTGRES_LOCK = "embedded.lock"
POSTGRES_OWNERS = "owners"


@contextlib.contextmanager
def home_lock(
    home: Path,
    timeout: float = LOCK_TIMEOUT,
    *,
    name: str = POSTGRES_LOCK,
    what: str = "the embedded PostgreSQL",
) -> Iterator[None]:
    """An exclusive ``flock`` on ``home/<name>`` (released if the holder dies).

    The home is made private (0700) if missing, the lock file 0600.
    """
    private.ensure_home(home)
    fd = private.open_private(home / name, os.O_RDWR)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise errors.ConfigurationError(
                        f"{what} of {home} is locked by another process "
                        f"for more than {timeout:.0f}s ({home / name})"
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def _owner_key(pid: int) -> str | None:
    """``pid`` and its start time: a pid reused by another process is not an owner."""
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return None


def register(home: Path, pid: int, registry: str = POSTGRES_OWNERS) -> None:
    owners = private.private_dir(home / registry, repair=True)
    key = _owner_key(pid)
    if key is not None:
        private.write_private(owners / str(pid), key)


def unregister(home: Path, pid: int, registry: str = POSTGRES_OWNERS) -> None:
    with contextlib.suppress(FileNotFoundError):
        (home / registry / str(pid)).unlink()


def live_owners(home: Path, registry: str = POSTGRES_OWNERS) -> list[int]:
    """The owners still alive; forgets the dead ones (killed without releasing)."""
    alive = []
    with contextlib.suppress(FileNotFoundError):
        for entry in (home / registry).iterdir():
            try:
                pid = int(entry.name)
                key = entry.read_text().strip()
            except (ValueError, OSError):
                key, pid = "", 0
            if pid and _owner_key(pid) == key and _running(pid):
                alive.append(pid)
            else:
                entry.unlink(missing_ok=True)
    return alive


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
