"""The zero-config broker: message files under ``$LEASEFLOW_HOME/broker``, no server.

With no ``LEASEFLOW_BROKER_URL``, Celery talks to ``filesystem://$LEASEFLOW_HOME/broker``
through :class:`leaseflow.local.fsbroker.FilesystemTransport` (kombu's own filesystem
transport is not safe for several processes). Pure: nothing here touches the disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

SCHEME = "filesystem://"
#: The kombu transport behind ``filesystem://`` URLs (see ``FilesystemTransport``).
FILESYSTEM_TRANSPORT = "leaseflow.local.fsbroker:FilesystemTransport"


def filesystem_url(home: Path) -> str:
    """``filesystem:///abs/home/broker``: the broker of ``home`` (an absolute path)."""
    return SCHEME + quote(str(home / "broker"))


def is_filesystem(url: str) -> bool:
    return url.startswith(SCHEME)


def is_default(url: str | None) -> bool:
    """No broker configured, or a bare ``filesystem://``: the home's filesystem broker."""
    return url is None or url.rstrip("/") == SCHEME.rstrip("/")


def broker_options(url: str) -> dict[str, Any]:
    """Celery settings a broker URL needs: the safe transport for ``filesystem://``."""
    if not is_filesystem(url):
        return {}
    return {"broker_transport": FILESYSTEM_TRANSPORT}
