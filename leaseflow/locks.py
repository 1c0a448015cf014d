"""Resource locks for code outside workflows: a maintenance command, a web request.

>>> from leaseflow import locks
>>> with locks.hold("vectordb:acme", holder="reindex-cli", ttl=60, max_wait=0) as lock:
...     reindex(fence=lock.token)

The same locks as the states' ``lock=``: one holder per key at a time, whoever it is,
and a fence (``lock.token``) that grows with every acquisition of the key, so the
resource can refuse writes from an older holder. While the block runs a thread
refreshes the lease; leaving the block releases the lock, exceptions included. A
holder that stops refreshing (a paused or dead process) loses the lock once its lease
expires and beat's sweeper frees it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from leaseflow import errors, logs
from leaseflow.store import base, records


@dataclass
class Lock:
    """A lock held by a ``hold`` block: ``token`` is its fence."""

    key: str
    token: int
    holder: str
    _lost: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def lost(self) -> bool:
        """True once a refresh found the lock gone (expired and swept, or forced)."""
        return self._lost.is_set()


def _default_store() -> base.RunStore:
    from leaseflow import local
    from leaseflow.settings import get_settings
    from leaseflow.tasks import runtime

    return runtime.make_store(local.resolve(get_settings()), application_name="leaseflow-locks")


@contextmanager
def hold(
    key: str,
    *,
    holder: str,
    ttl: float = 60.0,
    max_wait: float = 0.0,
    store: base.RunStore | None = None,
) -> Iterator[Lock]:
    """Hold lock ``key`` for the ``with`` block. ``max_wait=0``: fail at once with
    ``LockHeld`` (``E-LOCK-HELD``, naming the holder and since when) when someone else
    holds it; a positive ``max_wait`` retries with backoff for that many seconds."""
    if not key or not isinstance(key, str):
        raise ValueError("a lock key is a non-empty string")
    if not ttl > 0:
        raise ValueError(f"ttl must be > 0 seconds, not {ttl!r}")
    if max_wait < 0:
        raise ValueError(f"max_wait must be >= 0 seconds, not {max_wait!r}")
    own_store = store is None
    db = _default_store() if store is None else store
    try:
        held = _acquire(db, key, holder, ttl, max_wait)
        lock = Lock(key, held.fence, holder)
        stop = threading.Event()
        keeper = threading.Thread(
            target=_refresh,
            args=(db, held.key, held.token, ttl, stop, lock),
            name=f"leaseflow-lock {key}",
            daemon=True,
        )
        keeper.start()
        try:
            yield lock
        finally:
            stop.set()
            keeper.join(timeout=ttl)
            if not db.release_lock(held.key, held.token):
                logs.warning("lock_lost", key=key, holder=holder, fence=held.fence)
    finally:
        if own_store:
            db.close()


def _acquire(
    db: base.RunStore, key: str, holder: str, ttl: float, max_wait: float
) -> records.HeldLock:
    deadline = time.monotonic() + max_wait
    delay = 0.05
    while True:
        try:
            return db.acquire_lock(key, holder=holder, ttl=ttl)
        except errors.LockHeld:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            time.sleep(min(left, delay * (0.5 + random.random())))
            delay = min(delay * 2, 2.0)


def _refresh(
    db: base.RunStore, key: str, token: str, ttl: float, stop: threading.Event, lock: Lock
) -> None:
    """Extend the lease every third of ``ttl`` until ``stop``; mark the lock lost if a
    refresh finds it gone."""
    while not stop.wait(ttl / 3):
        try:
            if not db.refresh_lock(key, token, ttl=ttl):
                lock._lost.set()
                logs.warning("lock_lost", key=key, holder=lock.holder, fence=lock.token)
                return
        except errors.StoreUnavailable as exc:  # the next refresh may get through
            logs.warning("lock_refresh_failed", key=key, error=repr(exc))
