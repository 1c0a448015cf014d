"""W1 "floor" baseline: the least database work any durable chain with one Celery task
per state can do, to bound what leaseflow's default mode could reach.

``celery -A benchmarks.floor worker`` runs ``floor_step(run_id, seq, token)``, a bare
Celery task over raw psycopg (one autocommit connection per pool process) that does
exactly ONE statement per state: the fenced commit, which also issues the next
state's token (carried in the next message, so there is no claim):

  ``WITH moved AS (UPDATE floor_runs SET step_seq+1, lease_token=$next ... WHERE id AND
  lease_token=$token AND step_seq=$seq) INSERT INTO floor_steps ... FROM moved``

then publishes ``floor_step(run_id, seq + 1, next)``. It is NOT a usable design: with no
start check, a duplicated or re-published message would run its state twice (only
the commit is fenced). It is the floor: a prototype of the issue's "token carried in
the message" direction with its start marker removed.

Configured from ``LFBENCH_BROKER_URL``, ``LFBENCH_QUEUE``, ``LFBENCH_DATABASE_URL``,
with leaseflow's Celery settings.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from celery import Celery

from leaseflow.tasks import celery_app

FLOOR_STEP = "lfbench.floor.step"

SCHEMA = """
CREATE TABLE floor_runs (
    id bigint PRIMARY KEY,
    step_seq int NOT NULL DEFAULT 1,
    status text NOT NULL DEFAULT 'pending',
    lease_token uuid,
    updated_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 80);
CREATE TABLE floor_steps (
    run_id bigint NOT NULL,
    seq int NOT NULL,
    lease_token uuid,
    started_at timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    PRIMARY KEY (run_id, seq)
);
"""

COMMIT = """
WITH moved AS (
    UPDATE floor_runs
       SET step_seq = step_seq + 1, lease_token = %(next)s,
           status = CASE WHEN step_seq >= %(states)s THEN 'completed' ELSE 'pending' END,
           updated_at = now()
     WHERE id = %(run_id)s AND lease_token = %(token)s AND step_seq = %(seq)s
    RETURNING id, status
)
INSERT INTO floor_steps (run_id, seq, lease_token, started_at, finished_at)
SELECT id, %(seq)s, %(token)s, %(started_at)s, clock_timestamp() FROM moved
RETURNING (SELECT status FROM moved)
"""

_conn: tuple[int, Any] | None = None  # (pid, connection): one per pool process


def _pg(url: str) -> Any:
    global _conn
    if _conn is None or _conn[0] != os.getpid():
        import psycopg

        _conn = (os.getpid(), psycopg.connect(url, autocommit=True))
    return _conn[1]


def make_app(broker_url: str, queue: str, database_url: str | None = None) -> Celery:
    app = Celery("lfbench_floor", set_as_current=False)
    app.conf.update(broker_url=broker_url, **celery_app.celery_settings(queue))

    @app.task(name=FLOOR_STEP, ignore_result=True, shared=False, bind=True)
    def floor_step(task: Any, run_id: int, seq: int, token: str, states: int) -> str:
        import datetime as dt

        started = dt.datetime.now(dt.UTC)
        conn = _pg(database_url or os.environ["LFBENCH_DATABASE_URL"])
        nxt = str(uuid.uuid4())
        row = conn.execute(
            COMMIT,
            {
                "next": nxt,
                "states": states,
                "run_id": run_id,
                "token": token,
                "seq": seq,
                "started_at": started,
            },
        ).fetchone()
        if row is None:
            return "fenced"
        if row[0] == "pending":
            task.apply_async((run_id, seq + 1, nxt, states))
        return "committed"

    return app


app = make_app(
    os.environ.get("LFBENCH_BROKER_URL", "memory://"),
    os.environ.get("LFBENCH_QUEUE", "lfbench-floor"),
    os.environ.get("LFBENCH_DATABASE_URL") or None,
)
