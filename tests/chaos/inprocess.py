"""A Celery-free engine on a scratch database, for the checker's own tests.

The runner executes every step and branch in this process, following the
dispatches it returns, so a real ledger (``lf_steps``, ``lf_groups``,
``chaos_effects``) exists in a second without a broker or a worker.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from leaseflow import messages
from leaseflow.fsm import checkpoint, rules
from leaseflow.fsm.definition import Workflow
from leaseflow.heartbeat import LeaseKeeper
from leaseflow.runner import Runner
from leaseflow.settings import Settings
from leaseflow.store.postgres import PostgresStore
from leaseflow.tasks import runtime
from tests.chaos import workflows
from tests.conftest import _admin, _url_for

LIMIT = 1 << 20


@dataclass
class Engine:
    conn: psycopg.Connection[Any]
    store: PostgresStore
    runner: Runner

    def start(self, wf: Workflow, data: dict[str, Any]) -> str:
        blob = checkpoint.encode(wf.context(**data).model_dump(mode="json"), limit=LIMIT)
        return self.store.create_run(
            run_id=str(uuid.uuid4()), wf=wf, checkpoint=blob, input=data, idempotency_key=None
        ).run_id

    def drive(self, run_ids: list[str]) -> None:
        """Run every step and branch the dispatches call for, until none is left."""
        names = dict(
            self.conn.execute(
                "SELECT id::text, workflow FROM lf_runs WHERE id = ANY(%s::uuid[])", (run_ids,)
            ).fetchall()
        )
        # The workflow as a real message carries it: a worker claims only runs of the
        # workflows (and versions) it declares.
        todo: list[messages.Message] = [
            messages.StateStep(run_id, names[run_id], "", 1) for run_id in run_ids
        ]
        while todo:
            d = todo.pop(0)
            result = self.runner.handle(d)
            assert result.result == "committed", (d, result)
            todo.extend(result.wakeups)
            if result.fork is not None:
                todo.extend(result.fork.branches)  # the last branch wakes the join


@contextmanager
def scratch_engine(pg_template: str) -> Iterator[Engine]:
    """A database cloned from the migrated template, with ``chaos_effects``; dropped after."""
    name = f"lf_chaos_{uuid.uuid4().hex[:10]}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    url = _url_for(name)
    settings = Settings(
        database_url=url, workflows=["tests.chaos.workflows"], lease_ttl=30, heartbeat_interval=10
    )
    store = runtime.make_store(settings, application_name="chaos-inprocess")
    keeper = LeaseKeeper(store, worker="inprocess:1", ttl=30, interval=10)
    runner = Runner(store, keeper, worker="inprocess:1", ttl=30, limits=rules.Limits(LIMIT))
    conn = psycopg.connect(url, autocommit=True)
    try:
        workflows.create_effects_table(conn)
        yield Engine(conn, store, runner)
    finally:
        keeper.stop()
        store.close()
        conn.close()
        with _admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
