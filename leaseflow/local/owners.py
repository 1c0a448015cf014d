"""The home's lock and its owner registry, for the embedded PostgreSQL.

Start, reuse and stop of a home's server are serialised by an exclusive ``flock``
on ``$LEASEFLOW_HOME/embedded.lock`` (:func:`home_lock`). Every process using the
server registers as an *owner*: a file ``$LEASEFLOW_HOME/owners/<pid>`` holding the
process's start time, so a reused pid is not mistaken for an owner. Owners that died
without releasing are pruned by whoever looks next (:func:`live_owners`). The home
and ``owners/`` are 0700, the files in them 0600.
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


@contextlib.contextmanager
def home_lock(home: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """An exclusive ``flock`` on ``home/embedded.lock`` (released if the holder dies).

    The home is made private (0700) if missing, the lock file 0600.
    """
    private.ensure_home(home)
    fd = private.open_private(home / "embedded.lock", os.O_RDWR)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise errors.ConfigurationError(
                        f"the embedded PostgreSQL of {home} is locked by another process "
                        f"for more than {timeout:.0f}s ({home / 'embedded.lock'})"
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


def register(home: Path, pid: int) -> None:
    owners = private.private_dir(home / "owners", repair=True)
    key = _owner_key(pid)
    if key is not None:
        private.write_private(owners / str(pid), key)


def unregister(home: Path, pid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        (home / "owners" / str(pid)).unlink()


def live_owners(home: Path) -> list[int]:
    """The owners still alive; forgets the dead ones (killed without releasing)."""
    alive = []
    with contextlib.suppress(FileNotFoundError):
        for entry in (home / "owners").iterdir():
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
