"""Records of resource locks and of the worker registry that cross the store boundary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from leaseflow.store._jsonable import jsonable as _jsonable

if TYPE_CHECKING:
    from leaseflow.store.records import Claim

#: What a locked claim asks of the claimed state: the lock it needs (or None).
KeyOf = Callable[["Claim"], "LockWant | None"]


@dataclass(frozen=True, slots=True)
class LockWant:
    """The lock a claimed state must hold: ``key`` and the state whose commit releases
    it; or the reason its key cannot be made (the step then fails ``E-LOCK-KEY``)."""

    key: str | None
    until: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class LockContended:
    """A claim rolled back because its lock is held by someone else: the run stays
    pending and is tried again after ``delay`` seconds; no attempt is spent."""

    key: str
    holder: str | None
    delay: float


@dataclass(frozen=True, slots=True)
class LockRecord:
    """A held lock, as ``locks list`` shows it."""

    key: str
    fence: int
    holder: str | None
    holder_run: str | None
    holder_state: str | None
    acquired_at: datetime | None
    expires_at: datetime | None
    expired: bool

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True, slots=True)
class LockFreed:
    """A lock freed by someone else than its holder (swept when expired, or forced),
    as its ``lf_lock_audit`` row says."""

    key: str
    fence: int
    holder: str | None
    holder_run: str | None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class LockAudit:
    """An ``lf_lock_audit`` row: a lock freed by someone else than its holder."""

    key: str
    fence: int
    action: str  # expired | forced
    holder: str | None
    holder_run: str | None
    actor: str | None
    reason: str | None
    at: datetime

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a worker process tells the registry of itself with each heartbeat."""

    queues: tuple[str, ...] = ()
    concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A worker process in the registry (``lf_workers``)."""

    id: str
    hostname: str
    pid: int
    queues: str | None
    concurrency: int | None
    started_at: datetime
    last_seen_at: datetime
    leases_held: int
    leases_lost: int
    status: str  # alive | dead

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True, slots=True)
class HeldLock:
    """A lock taken by ``locks.hold``: its fence and token."""

    key: str
    fence: int
    token: str
