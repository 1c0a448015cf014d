"""One contract, two stores: every test here runs against ``MemoryStore`` and
``PostgresStore`` through the ``env`` fixture (test ids ``[memory]``/``[postgres]``).

Time never passes by sleeping: ``env.age(seconds)`` makes ``seconds`` pass for the
store. The memory store's clock moves forward; in PostgreSQL every stored timestamp
that is judged against ``now()`` moves back by as much, which is the same thing.
The postgres variant needs only ``database_url`` from ``tests/conftest.py``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
import pytest

from leaseflow.fsm.definition import Workflow
from leaseflow.store.base import RunStore
from leaseflow.store.memory import MemoryStore
from leaseflow.store.records import Claim
from tests.contract.workflows import CHECKPOINT, DISPATCH_TIMEOUT, NOTE_SQL, TTL

T = TypeVar("T")

#: Columns compared with ``now()``: ``age`` moves them back (the table's own dates,
#: ``created_at`` and the step log, keep their order and need not move).
_AGED = {
    "lf_runs": (
        "lease_expires_at",
        "not_before",
        "redispatch_at",
        "claimed_at",
        "wait_deadline",
        "run_deadline",
        "finished_at",  # retention judges a finished run's age by it
    ),
    "lf_branches": ("lease_expires_at", "not_before", "redispatch_at", "claimed_at"),
    "lf_queue_marks": ("probe_sent_at", "passed_at"),
    "lf_locks": ("expires_at",),
    "lf_workers": ("last_seen_at",),
}


class ManualClock:
    """The memory store's database time: moves only when a test moves it."""

    def __init__(self) -> None:
        self._now = datetime(2030, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)


class Env:
    """A store under contract, with what the tests need around it."""

    name: str

    def __init__(self, store: RunStore) -> None:
        self.store = store

    def age(self, seconds: float) -> None:
        """Make ``seconds`` pass for the store."""
        raise NotImplementedError

    def app_notes(self) -> list[tuple[str, str]]:
        """``(run_id, note)`` rows the committed ``in_commit`` callbacks wrote."""
        raise NotImplementedError

    def leases_lost(self, worker: str) -> int:
        raise NotImplementedError

    # -- shortcuts -------------------------------------------------------------------

    def start(self, wf: Workflow, input: dict[str, Any] | None = None) -> str:
        """A new pending run of ``wf``; its id."""
        created = self.store.create_run(
            run_id=str(uuid.uuid4()),
            wf=wf,
            checkpoint=CHECKPOINT,
            input=input or {},
            idempotency_key=None,
        )
        return created.run_id

    def claim(self, run_id: str, step_seq: int = 1, *, owner: str = "w1") -> Claim:
        claim = self.store.claim(run_id, step_seq, owner=owner, ttl=TTL)
        assert claim is not None, f"run {run_id} at step {step_seq} could not be claimed"
        return claim

    def race(self, contenders: Sequence[Callable[[], T]]) -> list[T]:
        """Run the contenders at once, released together by a barrier; their results
        in order. Fails if one raises or a thread outlives the race."""
        barrier = threading.Barrier(len(contenders))
        results: list[Any] = [None] * len(contenders)
        failures: list[BaseException] = []

        def contend(i: int) -> None:
            try:
                barrier.wait(timeout=10)
                results[i] = contenders[i]()
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(contenders))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not [t for t in threads if t.is_alive()], "a contender is still running"
        if failures:
            raise failures[0]
        return results


class MemoryEnv(Env):
    name = "memory"

    def __init__(self) -> None:
        self.clock = ManualClock()
        self.memory = MemoryStore(clock=self.clock, dispatch_timeout=DISPATCH_TIMEOUT)
        super().__init__(self.memory)

    def age(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def app_notes(self) -> list[tuple[str, str]]:
        return [tuple(w.params) for w in self.memory.in_commit_log if w.sql == NOTE_SQL]

    def leases_lost(self, worker: str) -> int:
        row = self.memory.workers.get(worker)
        return 0 if row is None else row.leases_lost


class PostgresEnv(Env):
    name = "postgres"

    def __init__(self, database_url: str) -> None:
        from leaseflow.store.postgres import PostgresStore

        super().__init__(PostgresStore(database_url, dispatch_timeout=DISPATCH_TIMEOUT))
        self.db = psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True)
        self.db.execute(
            "CREATE TABLE contract_notes (id bigserial PRIMARY KEY, run_id text, note text)"
        )

    def age(self, seconds: float) -> None:
        with self.db.transaction():
            for table, columns in _AGED.items():
                shifts = ", ".join(f"{c} = {c} - make_interval(secs => %(s)s)" for c in columns)
                self.db.execute(f"UPDATE {table} SET {shifts}", {"s": seconds})

    def app_notes(self) -> list[tuple[str, str]]:
        rows = self.db.execute("SELECT run_id, note FROM contract_notes ORDER BY id")
        return [(run_id, note) for run_id, note in rows]

    def leases_lost(self, worker: str) -> int:
        row = self.db.execute("SELECT leases_lost FROM lf_workers WHERE id = %s", (worker,))
        found = row.fetchone()
        return 0 if found is None else int(found[0])

    def close(self) -> None:
        self.db.close()


@pytest.fixture(params=["memory", "postgres"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    """The store under contract: in memory, or on a fresh migrated PostgreSQL database."""
    if request.param == "memory":
        memory = MemoryEnv()
        yield memory
        memory.store.close()
        return
    postgres = PostgresEnv(request.getfixturevalue("database_url"))
    yield postgres
    postgres.store.close()
    postgres.close()
