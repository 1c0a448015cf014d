"""As root, each home's cluster lives in a directory of the server's own system user.

PostgreSQL refuses to run as root, so it runs as ``embedded_postgres``, who may not
enter a private home, nor the private directories above it (``mkdtemp``'s, pytest's):
leaseflow changes no permission of theirs. The cluster of a home lives instead in
``/var/lib/leaseflow/<digest of the home's real path>/pgdata``, in directories that
user owns (0700), beside a ``home`` file (root's, 0600) naming the home it belongs to:
its path and the random token of its ``cluster.id`` file.

A cluster belongs to one home, not to a path. Once the home is replaced (``rm -rf
.leaseflow``, then a new one at the same path), its next start discards the old
cluster and makes a fresh one, as a private home's ``pgdata`` would go with it. A
cluster whose home in the temp dir is gone is removed when any new cluster is made;
one whose home is missing elsewhere (an unmounted disk?) is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from leaseflow import logs
from leaseflow.local import pgctl, private

#: As root, the clusters live below this directory, which ``pgctl.SYSTEM_USER`` owns.
SYSTEM_DATA = Path("/var/lib/leaseflow")
#: The file of a cluster's directory that names its home.
RECORD = "home"


@dataclass(frozen=True)
class Record:
    """The home a cluster belongs to."""

    path: str  #: the home's real path
    token: str  #: the home's ``cluster.id``: a home made anew at that path has another

    def text(self) -> str:
        return f"{self.token}\n{self.path}\n"

    @classmethod
    def parse(cls, text: str) -> Record | None:
        token, _, path = text.partition("\n")
        path = path.rstrip("\n")
        return cls(path, token) if token and os.path.isabs(path) and "\n" not in path else None


def cluster_of(home: Path) -> Path:
    """The directory of ``SYSTEM_DATA`` that holds ``home``'s cluster (one per real path)."""
    digest = hashlib.sha256(os.path.realpath(home).encode()).hexdigest()[:16]
    return SYSTEM_DATA / digest


def record_of(home: Path) -> Record:
    """``home``'s identity: its real path and the token of its ``cluster.id`` (made once)."""
    token_file = home / "cluster.id"
    token = private.read_tail(token_file, 100).strip()
    if not token:  # none yet (or a process died writing it): the home's lock is held
        token = uuid.uuid4().hex
        private.write_private(token_file, token + "\n")
    return Record(os.path.realpath(home), token)


def prepare(home: Path, user: str | None) -> Path:
    """Before ``home``'s server starts, under its lock: its cluster's directory, ready.

    Private directories of ``user``; a cluster left by an earlier home of that path is
    discarded first; making a new one sweeps the clusters of vanished temp homes.
    """
    private.private_dir(SYSTEM_DATA, user)
    cluster = cluster_of(home)
    mine = record_of(home)
    if os.path.lexists(cluster):
        found = read_record(cluster)
        if found is not None and found != mine:
            logs.warning("embedded_cluster_discarded", home=home, cluster=cluster)
            discard(cluster)
    if os.path.lexists(cluster):
        private.private_dir(cluster, user)
        if not os.path.lexists(cluster / RECORD):  # made before records were kept
            _write_record(cluster, mine)
        return cluster
    private.private_dir(cluster, user)
    _write_record(cluster, mine)
    sweep(keep=cluster)
    return cluster


def read_record(cluster: Path) -> Record | None:
    return Record.parse(private.read_tail(cluster / RECORD, 8192))


def discard(cluster: Path) -> None:
    """Stop the server of ``cluster`` if one runs, and remove the cluster."""
    pgdata = cluster / "pgdata"
    if pgctl.read_postmaster(pgdata) is not None:
        pgctl.stop(pgdata)
    if pgctl.postgres_pids(pgdata):
        pgctl.kill_stale(pgdata)
    shutil.rmtree(cluster, ignore_errors=True)  # never follows a symlink


def sweep(keep: Path) -> list[Path]:
    """Remove the clusters whose home, in the temp dir, is gone; those removed."""
    temp = os.path.realpath(tempfile.gettempdir())
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for cluster in SYSTEM_DATA.iterdir():
            record = read_record(cluster) if cluster != keep else None
            if record is None or os.path.lexists(record.path):
                continue
            if not Path(record.path).is_relative_to(temp):
                continue  # maybe on a disk not mounted now: kept
            pgdata = cluster / "pgdata"
            if pgctl.read_postmaster(pgdata) is not None or pgctl.postgres_pids(pgdata):
                continue
            shutil.rmtree(cluster, ignore_errors=True)
            logs.info("embedded_cluster_swept", cluster=cluster, home=record.path)
            removed.append(cluster)
    return removed


def _write_record(cluster: Path, record: Record) -> None:
    """Root's file in the server user's directory: only ever created, never reopened."""
    private.write_new(cluster / RECORD, record.text())
