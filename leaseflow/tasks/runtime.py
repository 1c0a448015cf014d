"""The per-process engine of a worker: store, heartbeat keeper and runner.

Built lazily on first use in each process (after the prefork pool forked), so no
connection or thread crosses a fork.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

from leaseflow import local
from leaseflow.fsm import rules
from leaseflow.heartbeat import LeaseKeeper
from leaseflow.runner import Runner
from leaseflow.settings import Settings, get_settings
from leaseflow.store import records
from leaseflow.store.postgres import PostgresStore


@dataclass
class Runtime:
    settings: Settings
    store: PostgresStore
    keeper: LeaseKeeper
    runner: Runner
    worker_id: str


_lock = threading.Lock()
_runtime: Runtime | None = None
_pid = 0
_settings: Settings | None = None
#: What the worker tells the registry of itself (set at worker start, before the fork).
worker_info: records.WorkerInfo | None = None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def make_store(settings: Settings, *, application_name: str = "leaseflow") -> PostgresStore:
    return PostgresStore(
        settings.require_database_url(),
        application_name=application_name,
        max_size=settings.pool_max_size,
        statement_timeout_ms=settings.statement_timeout_ms,
        dispatch_timeout=settings.dispatch_timeout,
        async_claims=settings.async_claims,
    )


def limits(settings: Settings) -> rules.Limits:
    """The payload limits of ``settings``."""
    return rules.Limits(
        settings.max_payload_bytes,
        settings.compress_min_bytes,
        settings.max_checkpoint_bytes,
        settings.max_artifact_bytes,
        settings.compress_level,
    )


def configure(settings: Settings | None) -> None:
    """Use ``settings`` instead of the environment's (tests, embedded setups)."""
    global _settings, _runtime
    with _lock:
        if _runtime is not None and _pid == os.getpid():
            _runtime.keeper.stop()
            _runtime.store.close()
        _settings = settings
        _runtime = None


def get() -> Runtime:
    global _runtime, _pid
    with _lock:
        if _runtime is None or _pid != os.getpid():
            # A pool child reuses the server its parent resolved at worker_init.
            settings = local.resolve(_settings or get_settings())
            wid = worker_id()
            store = make_store(settings, application_name=f"leaseflow-worker {wid}"[:63])
            keeper = LeaseKeeper(
                store,
                worker=wid,
                ttl=settings.lease_ttl,
                interval=settings.heartbeat_interval,
                info=worker_info,
            )
            runner = Runner(
                store,
                keeper,
                worker=wid,
                ttl=settings.lease_ttl,
                limits=limits(settings),
                inline_max_states=settings.inline_max_states,
                inline_max_seconds=settings.inline_max_seconds,
            )
            _runtime = Runtime(settings, store, keeper, runner, wid)
            _pid = os.getpid()
        return _runtime
