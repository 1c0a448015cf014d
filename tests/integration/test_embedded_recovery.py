"""The embedded PostgreSQL recovers from what a postmaster killed -9 leaves behind.

``tests/integration/test_embedded.py`` covers the plain case (a stale
``postmaster.pid`` naming a dead pid). Two leftovers make PostgreSQL itself refuse to
start, and the supervisor (``leaseflow.local.pgctl.kill_stale``) must clear them:
a ``postmaster.pid`` whose pid now belongs to another live process (PostgreSQL
trusts a lock file whose pid exists), and an orphaned backend still attached to the
old shared memory ("pre-existing shared memory block is still in use").

Real servers: each test gets a home in a fresh temp dir; its teardown stops the
server and kills what is left of it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from leaseflow import local
from leaseflow.settings import Settings, libpq_url
from tests.helpers import eventually


@pytest.fixture
def home() -> Iterator[Path]:
    """A fresh LEASEFLOW_HOME, not under pytest's tmp_path (PostgreSQL runs as another
    user when we are root, and must traverse its parents); nothing of it left after."""
    base = Path(tempfile.mkdtemp(prefix="lf-embedded-recovery-"))
    path = base / "home"
    try:
        yield path
    finally:
        local.release(path)
        if path.exists():
            local.stop(path)
        for pid in local.postgres_pids(local.pgdata_dir(path)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
    eventually(
        lambda: not local.postgres_pids(local.pgdata_dir(path)),
        timeout=15,
        message="every PostgreSQL process of the test's home gone",
    )
    shutil.rmtree(base, ignore_errors=True)


def settings_of(home: Path) -> Settings:
    return Settings(home=home, database_url=None, broker_url=None)


def postmasters(pgdata: Path) -> set[int]:
    """The live postmasters of ``pgdata`` (its processes whose parent is not one)."""
    pids = local.postgres_pids(pgdata)
    found = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).ppid() not in pids:
                found.add(pid)
    return found


def can_query(url: str) -> bool:
    with psycopg.connect(libpq_url(url), connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM lf_runs").fetchone()
    return row is not None


def kill_postmaster(server: local.Server) -> None:
    """``kill -9`` of the postmaster alone; wait until it is gone."""
    os.kill(server.postmaster_pid, signal.SIGKILL)
    eventually(
        lambda: server.postmaster_pid not in postmasters(server.pgdata),
        timeout=15,
        message="postmaster dead",
    )


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_a_stale_pid_file_naming_a_live_stranger_is_cleared_and_the_server_restarted(
    home: Path,
):
    # Given a server whose postmaster was killed -9, and whose postmaster.pid now names
    # the pid of another live process (the pid was reused)
    local.resolve(settings_of(home))
    server = local.ensure_server(home)
    kill_postmaster(server)
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        pid_file = server.pgdata / "postmaster.pid"
        lines = pid_file.read_text().splitlines()
        pid_file.write_text("\n".join([str(stranger.pid), *lines[1:]]) + "\n")

        # When this process resolves the home again
        again = local.resolve(settings_of(home))

        # Then a new server runs and answers, and the stranger was left alone
        restarted = local.ensure_server(home)
        assert restarted.postmaster_pid not in (server.postmaster_pid, stranger.pid)
        assert postmasters(server.pgdata) == {restarted.postmaster_pid}
        assert again.database_url == restarted.url and can_query(restarted.url)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait(timeout=10)


def test_an_orphaned_backend_of_a_killed_postmaster_is_killed_and_the_server_restarted(
    home: Path,
):
    # Given a server with a backend frozen (SIGSTOP) mid-session when its postmaster
    # was killed -9: the backend outlives it, attached to the old shared memory
    local.resolve(settings_of(home))
    server = local.ensure_server(home)
    session = psycopg.connect(libpq_url(server.url), autocommit=True)
    try:
        [backend] = session.execute("SELECT pg_backend_pid()").fetchone() or [0]
        os.kill(backend, signal.SIGSTOP)
        kill_postmaster(server)
        assert alive(backend) and backend in local.postgres_pids(server.pgdata)

        # When this process resolves the home again
        again = local.resolve(settings_of(home))

        # Then the orphan is gone, and a new server runs and answers
        restarted = local.ensure_server(home)
        assert not alive(backend)
        assert restarted.postmaster_pid != server.postmaster_pid
        assert postmasters(server.pgdata) == {restarted.postmaster_pid}
        assert again.database_url == restarted.url and can_query(restarted.url)
    finally:
        with contextlib.suppress(Exception):
            session.close()
