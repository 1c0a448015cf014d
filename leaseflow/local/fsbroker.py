"""A kombu filesystem transport that is safe for several processes (no server needed).

The zero-config broker of leaseflow (``filesystem://`` under ``LEASEFLOW_HOME``, see
:mod:`leaseflow.local.broker`).
kombu's own filesystem transport loses messages when producers and consumers
overlap; see :class:`FilesystemChannel` for what this one does differently.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any
from urllib.parse import quote, unquote

from kombu.transport import filesystem as kombu_filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads
from kombu.utils.objects import cached_property

from leaseflow import errors
from leaseflow.local import private

#: Seconds an idle consumer waits between looks at its queue directories.
FILESYSTEM_POLLING_INTERVAL = 0.1


class FilesystemChannel(kombu_filesystem.Channel):
    """kombu's filesystem channel, made safe for several processes.

    kombu's own creates a message file before writing it, so a consumer can take
    (and lose) an empty message, and it moves taken messages to the temp directory,
    which is atomic only on the same filesystem. Here a message is written under
    ``tmp/`` and renamed into its queue's directory, so it appears whole; a consumer
    takes it by renaming it into ``claimed/`` (exactly one rename wins), then reads
    and deletes it. Each queue has its own directory; exchange tables are read and
    rewritten under an ``flock``.

    Like every kombu virtual transport, a message a consumer took is restored to its
    queue when the consumer closes without acking it, but is lost if the consumer is
    killed; leaseflow's dispatcher re-publishes runs whose message was lost.
    """

    @cached_property
    def root(self) -> Path:
        vhost = unquote(self.connection.client.virtual_host or "").strip("/")
        path = self.transport_options.get("root") or ("/" + vhost if vhost else "")
        if not path:
            raise errors.ConfigurationError(
                "a filesystem:// broker URL needs an absolute directory: filesystem:///path"
            )
        root = Path(path)
        for sub in ("queues", "tmp", "claimed", "control"):
            private.make_dirs(root / sub)  # what it creates (the home, say) is 0700
        return root

    @property
    def control_folder(self) -> Path:
        return self.root / "control"

    def _queue_dir(self, queue: str) -> Path:
        name = quote(queue, safe="")
        if len(name) > 200:
            name = hashlib.sha256(queue.encode()).hexdigest()
        return self.root / "queues" / f"q_{name}"

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}.msg"
        staged = self.root / "tmp" / name
        staged.write_bytes(str_to_bytes(dumps(message)))
        target = self._queue_dir(queue)
        for _ in range(3):  # the queue's directory may be deleted meanwhile
            target.mkdir(exist_ok=True)
            try:
                os.replace(staged, target / name)
                return
            except FileNotFoundError:
                continue
        raise kombu_filesystem.ChannelError(f"cannot add a message to queue {queue!r}")

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        folder = self._queue_dir(queue)
        try:
            names = sorted(n for n in os.listdir(folder) if n.endswith(".msg"))
        except FileNotFoundError:
            raise Empty() from None
        for name in names:
            claimed = self.root / "claimed" / name
            try:
                os.rename(folder / name, claimed)
            except FileNotFoundError:
                continue  # another consumer took it first
            try:
                return loads(bytes_to_str(claimed.read_bytes()))
            finally:
                claimed.unlink(missing_ok=True)
        raise Empty()

    def _purge(self, queue: str) -> int:
        count = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in self._queue_dir(queue).iterdir():
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    count += 1
        return count

    def _size(self, queue: str) -> int:
        try:
            return sum(1 for n in os.listdir(self._queue_dir(queue)) if n.endswith(".msg"))
        except FileNotFoundError:
            return 0

    def _delete(
        self, queue: str, exchange: str, routing_key: str, pattern: str, *args: Any, **kwargs: Any
    ) -> None:
        binding = _binding(routing_key, pattern, queue)
        self._edit_table(exchange, lambda table: [b for b in table if b != binding])
        self._purge(queue)
        with contextlib.suppress(OSError):
            self._queue_dir(queue).rmdir()

    def get_table(self, exchange: str) -> list[Any]:
        path = self._exchange_file(exchange)
        try:
            with path.open("rb") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH)
                return _parse_table(f.read())
        except FileNotFoundError:
            return []

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        binding = _binding(routing_key, pattern, queue)
        self._edit_table(exchange, lambda table: table if binding in table else [binding, *table])

    def _edit_table(self, exchange: str, change: Any) -> None:
        """Rewrite ``exchange``'s table under an exclusive lock (never truncated unlocked)."""
        path = self._exchange_file(exchange)
        path.parent.mkdir(exist_ok=True)
        with path.open("a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            f.seek(0)
            table = _parse_table(f.read())
            new = change(table)
            if new != table:
                f.seek(0)
                f.truncate()
                f.write(str_to_bytes(dumps(new)))


def _binding(routing_key: str, pattern: str, queue: str) -> Any:
    return kombu_filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")


def _parse_table(raw: bytes) -> list[Any]:
    if not raw.strip():
        return []  # created by a binder that has not written it yet
    return [kombu_filesystem.exchange_queue_t(*q) for q in loads(bytes_to_str(raw))]


class FilesystemTransport(kombu_filesystem.Transport):
    """The ``filesystem://`` transport leaseflow configures Celery with."""

    Channel = FilesystemChannel
    polling_interval = FILESYSTEM_POLLING_INTERVAL

    @property
    def default_connection_params(self) -> dict[str, Any]:
        return {"port": self.default_port}  # no host: kombu would warn it assumes localhost
