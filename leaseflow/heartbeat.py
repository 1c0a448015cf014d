"""One heartbeat thread per worker process: extends all its leases in one UPDATE.

A lease is extended only up to its state's deadline (``timeout=``); past it the
lease runs out and the reaper hands the run to another worker. Expiry is judged by
database time only: this thread sends a TTL, never a timestamp.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from leaseflow import errors, faults, logs
from leaseflow.store import base, records


@dataclass
class _Lease:
    run_id: str
    token: str
    deadline: float | None  # time.monotonic() after which the lease is no longer extended
    branch: tuple[int, int] | None = None  # (group_id, idx) for a branch lease
    lost: bool = False
    cancelled: bool = False  # the run was asked to cancel (a branch: cancelled)
    ids: dict[str, Any] | None = None  # for its log lines (``steplog.ids``)

    def fields(self) -> dict[str, Any]:
        """Its ids, for a log line."""
        return self.ids or {"run_id": self.run_id, "lease_token": self.token}

    @property
    def ref(self) -> base.LeaseRef:
        if self.branch is None:
            return base.LeaseRef(self.run_id, self.token)
        return base.LeaseRef(self.run_id, self.token, *self.branch)


class LeaseKeeper:
    """Holds the leases of this process and keeps them alive.

    With ``background=False`` no thread is started: leases are extended only by
    ``beat()`` and ``ctx.heartbeat()`` (``leaseflow.testing`` moves time by hand).
    """

    def __init__(
        self,
        store: base.RunStore,
        *,
        worker: str,
        ttl: float,
        interval: float,
        background: bool = True,
        info: records.WorkerInfo | None = None,
    ) -> None:
        self.store = store
        self.worker = worker
        self.ttl = ttl
        self.interval = interval
        self.background = background
        #: What this process tells the worker registry with each heartbeat.
        self.info = info
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._stopped = False

    def hold(
        self,
        run_id: str,
        token: str,
        *,
        timeout: float | None = None,
        branch: tuple[int, int] | None = None,
        ids: dict[str, Any] | None = None,
    ) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        lease = _Lease(run_id, token, deadline, branch, ids=ids)
        with self._lock:
            self._leases[token] = lease
        self._ensure_thread()

    def release(self, token: str) -> None:
        with self._lock:
            self._leases.pop(token, None)

    def lost(self, token: str) -> bool:
        with self._lock:
            lease = self._leases.get(token)
            return lease is not None and lease.lost

    def cancel_requested(self, token: str) -> bool:
        """Did a heartbeat learn that the run of this lease was asked to cancel?"""
        with self._lock:
            lease = self._leases.get(token)
            return lease is not None and lease.cancelled

    def beat_now(self, token: str) -> None:
        """Extend one lease at once (``ctx.heartbeat()``); raise ``LeaseLost`` if gone."""
        with self._lock:
            lease = self._leases.get(token)
        if lease is None or lease.lost:
            raise errors.LeaseLost(lease.run_id if lease else "?", token)
        if token not in self._extend([lease]):
            lease.lost = True
            raise errors.LeaseLost(lease.run_id, token)

    def _extend(self, leases: list[_Lease]) -> frozenset[str]:
        """Extend ``leases``; those whose run was asked to cancel are marked so."""
        alive = self.store.heartbeat(
            [lease.ref for lease in leases], worker=self.worker, ttl=self.ttl, info=self.info
        )
        cancelled: frozenset[str] = getattr(alive, "cancelled", frozenset())
        for lease in leases:
            if lease.token in cancelled and not lease.cancelled:
                lease.cancelled = True
                logs.info("cancel_learnt", **lease.fields())
        return alive

    def start(self) -> None:
        """Start beating now, leases or not: the process checks in to the registry at
        once, then every interval."""
        self._ensure_thread()
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def _ensure_thread(self) -> None:
        if not self.background:
            return
        if self._pid != os.getpid():  # forked: the parent's thread does not exist here
            self._pid = os.getpid()
            self._thread = None
        if self._thread is None or not self._thread.is_alive():
            self._stopped = False
            self._thread = threading.Thread(
                target=self._loop, name="leaseflow-heartbeat", daemon=True
            )
            self._thread.start()

    def _loop(self) -> None:
        while not self._stopped:
            self._wake.wait(self.interval)
            if self._stopped:
                return
            self._wake.clear()
            try:
                self.beat()
            except Exception as exc:  # keep beating; the next interval may succeed
                logs.warning("heartbeat_failed", worker=self.worker, error=repr(exc))

    def beat(self) -> None:
        """Extend every lease whose state is within its deadline; mark the lost ones."""
        now = time.monotonic()
        with self._lock:
            due = [
                lease
                for lease in self._leases.values()
                if not lease.lost and (lease.deadline is None or lease.deadline > now)
            ]
        faults.point("during_heartbeat", worker=self.worker)
        alive = self._extend(due)
        for lease in due:
            if lease.token not in alive and lease.token in self._leases:  # not released
                lease.lost = True
                logs.warning(
                    "lease_expired_in_heartbeat",
                    **lease.fields(),
                    worker=self.worker,
                )
