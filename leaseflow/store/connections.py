"""The PostgreSQL store's connections: each thread's own cursors for the per-state
statements, pools for the rest, and what happens when a connection breaks or the
process forks. Driver errors come out of here as leaseflow errors: a lost or
unreachable server as ``errors.StoreUnavailable``, a missing ``lf_*`` table or column
(an unmigrated database) as ``errors.SchemaMissing``."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from leaseflow import errors

T = TypeVar("T")
CONNECT_TIMEOUT = 5  # seconds to open one connection
POOL_TIMEOUT = 10.0  # seconds to wait for a pooled connection
MAIN = "main"
#: Claims have their own connections: with ``async_claims`` they commit with
#: ``synchronous_commit=off`` (see ``PostgresStore.claim``).
CLAIMS = "claims"

Pinned = dict[tuple[str, int], "psycopg.Cursor[Any] | None"]
#: What PostgreSQL says when the schema is missing or older than this code.
SCHEMA_ERRORS = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn)


def schema_missing(exc: psycopg.Error) -> errors.SchemaMissing:
    """``errors.SchemaMissing`` for a driver error of ``SCHEMA_ERRORS``."""
    return errors.SchemaMissing(exc.diag.message_primary or str(exc).strip())


class Connections:
    """This process's connections to one database, by kind (``MAIN``, ``CLAIMS``).
    Safe to share between threads; forgets the parent's connections after a fork."""

    def __init__(
        self,
        conninfo: str,
        *,
        application_name: str,
        max_size: int,
        statement_timeout_ms: int,
        async_claims: bool,
    ) -> None:
        self.conninfo = conninfo
        self.application_name = application_name
        self.max_size = max_size
        self.statement_timeout_ms = statement_timeout_ms
        self.async_claims = async_claims
        self._pools: dict[str, ConnectionPool] = {}
        #: (kind, thread id) -> that thread's own cursor; None while it is in use.
        self._pinned: Pinned = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def pinned(self) -> Pinned:
        """A snapshot of the threads' own cursors (for tests and diagnostics)."""
        with self._lock:
            return dict(self._pinned)

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.autocommit = True

    def _connect_kwargs(self, kind: str) -> dict[str, Any]:
        options = f"-c statement_timeout={self.statement_timeout_ms}"
        if kind == CLAIMS and self.async_claims:
            options += " -c synchronous_commit=off"
        return {
            "application_name": self.application_name,
            "options": options,
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT,
        }

    def _forked(self) -> None:
        """Called with the lock held: forget what the parent process opened (never
        touch its sockets: psycopg does not close a connection it inherited)."""
        if self._pid != os.getpid():
            self._pools = {}
            self._pinned = {}
            self._pid = os.getpid()

    def _pool(self, kind: str) -> ConnectionPool:
        """The ``kind`` pool of this process."""
        with self._lock:
            self._forked()
            pool = self._pools.get(kind)
            if pool is None:
                pool = self._pools[kind] = ConnectionPool(
                    self.conninfo,
                    kwargs=self._connect_kwargs(kind),
                    timeout=POOL_TIMEOUT,
                    configure=self._configure,
                    min_size=1,
                    max_size=self.max_size,
                    open=True,
                    name=f"leaseflow-{kind}-{os.getpid()}",
                )
            return pool

    @contextmanager
    def hot(self, kind: str) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor on this thread's own ``kind`` connection, for the per-state
        statements (claims, commits): no pool check-out per statement.

        At most ``max_size`` threads per kind get one (a thread pool's threads);
        others, and a nested use, fall back to the pool. A connection that breaks is
        closed and replaced on next use; driver errors come out as leaseflow errors.
        """
        key = (kind, threading.get_ident())
        with self._lock:
            self._forked()
            cur = self._pinned.get(key)
            if cur is not None:
                self._pinned[key] = None  # in use: a nested call takes the pool
            elif key not in self._pinned and self._room_to_pin(kind):
                self._pinned[key] = None  # reserved while connecting
                try:
                    cur = self._pin(kind)
                except BaseException:
                    del self._pinned[key]
                    raise
        if cur is None:
            with self.connection(kind) as conn, conn.cursor() as pooled:
                yield pooled
            return
        try:
            yield cur
        except psycopg.OperationalError as exc:
            with self._lock:
                self._pinned.pop(key, None)
            cur.connection.close()
            raise errors.StoreUnavailable(str(exc)) from exc
        except BaseException as exc:
            if cur.connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                with self._lock:
                    self._pinned.pop(key, None)
                cur.connection.close()
            else:
                with self._lock:
                    if key in self._pinned:
                        self._pinned[key] = cur
            if isinstance(exc, SCHEMA_ERRORS):
                raise schema_missing(exc) from exc
            raise
        with self._lock:
            closed = key not in self._pinned  # close() ran meanwhile
            if not closed:
                self._pinned[key] = cur
        if closed:
            cur.connection.close()

    def _room_to_pin(self, kind: str) -> bool:
        """Lock held. Drop the connections of finished threads; is one more allowed?"""
        alive = {t.ident for t in threading.enumerate()}
        for key, cur in list(self._pinned.items()):
            if key[1] not in alive:
                del self._pinned[key]
                if cur is not None:
                    cur.connection.close()
        return sum(k[0] == kind for k in self._pinned) < self.max_size

    def _pin(self, kind: str) -> psycopg.Cursor[Any]:
        try:
            conn = psycopg.connect(self.conninfo, **self._connect_kwargs(kind))
        except psycopg.OperationalError as exc:
            raise errors.StoreUnavailable(str(exc)) from exc
        self._configure(conn)
        return conn.cursor()

    @contextmanager
    def connection(self, kind: str = MAIN) -> Iterator[psycopg.Connection[Any]]:
        """A pooled autocommit connection; driver errors come out as leaseflow errors."""
        try:
            with self._pool(kind).connection() as conn:
                yield conn
        except psycopg.OperationalError as exc:
            raise errors.StoreUnavailable(str(exc)) from exc
        except SCHEMA_ERRORS as exc:
            raise schema_missing(exc) from exc

    def once(self, fn: Callable[[psycopg.Connection[Any]], T], kind: str = MAIN) -> T:
        """``fn(conn)`` on a pooled connection, not retried (a write whose reply must
        not be lost twice, e.g. a reap: the orphan is repaired by the next beat)."""
        with self.connection(kind) as conn:
            return fn(conn)

    def transact(
        self, fn: Callable[[psycopg.Connection[Any]], T], *, retry: bool = False
    ) -> T | None:
        """``fn(conn)`` in one transaction on a pooled ``MAIN`` connection (retried as
        ``with_retry`` when ``retry``); None when ``fn`` raised ``psycopg.Rollback``."""

        def txn(conn: psycopg.Connection[Any]) -> T | None:
            result = None
            with conn.transaction():
                result = fn(conn)
            return result

        return self.with_retry(txn) if retry else self.once(txn)

    def with_retry(self, fn: Callable[[psycopg.Connection[Any]], T], kind: str = MAIN) -> T:
        """Run an idempotent ``fn(conn)``, once more on a fresh connection if it broke."""

        def attempt() -> T:
            with self.connection(kind) as conn:
                return fn(conn)

        return self._retried(attempt, kind)

    def hot_with_retry(self, fn: Callable[[psycopg.Cursor[Any]], T], kind: str) -> T:
        """As ``with_retry``, with a cursor of the thread's own connection (``hot``)."""

        def attempt() -> T:
            with self.hot(kind) as cur:
                return fn(cur)

        return self._retried(attempt, kind)

    def _retried(self, attempt: Callable[[], T], kind: str) -> T:
        """``attempt()``, and once more if the connection broke.

        A pool timeout (no connection to be had) is not retried: it already waited.
        """
        try:
            return attempt()
        except errors.StoreUnavailable as exc:
            if isinstance(exc.__cause__, PoolTimeout):
                raise
            # The server may have dropped every idle connection (a restart, a
            # terminated backend): test them all and replace the broken ones.
            with self._lock:
                pool = self._pools.get(kind)
            if pool is not None:
                pool.check()
            return attempt()

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for pool in self._pools.values():
                    pool.close()
                for cur in self._pinned.values():
                    if cur is not None:
                        cur.connection.close()
            self._pools = {}
            self._pinned = {}


#: The role a tenant-scoped request runs as (row-level security, migration 0008).
TENANT_ROLE = "leaseflow_tenant"
_AS_TENANT = (
    f"SELECT set_config('role', '{TENANT_ROLE}', true), set_config('leaseflow.tenant', %s, true)"
)


class TenantConnections(Connections):
    """``Connections`` whose every use is one transaction as ``TENANT_ROLE`` with
    ``leaseflow.tenant`` set: PostgreSQL's row-level security then shows and lets
    write only that tenant's runs and the rows hanging off them. Shares the pools of
    the engine's ``Connections`` it was made from (which owns and closes them)."""

    def __init__(self, engine: Connections, tenant: str) -> None:
        self.__dict__.update(engine.__dict__)
        self.engine = engine
        self.tenant = tenant

    def _pool(self, kind: str) -> ConnectionPool:
        return self.engine._pool(kind)

    @contextmanager
    def connection(self, kind: str = MAIN) -> Iterator[psycopg.Connection[Any]]:
        with super().connection(kind) as conn, conn.transaction():
            conn.execute(_AS_TENANT, (self.tenant,))  # SET LOCAL ROLE, and the tenant
            yield conn

    def hot(self, kind: str) -> Iterator[psycopg.Cursor[Any]]:  # type: ignore[override]
        raise NotImplementedError("a tenant-scoped store runs no claims or commits")

    def close(self) -> None:
        """The engine's ``Connections`` owns the pools."""
