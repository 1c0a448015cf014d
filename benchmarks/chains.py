"""W0/W1 baselines: a plain Celery chain of no-op tasks and a "naive durable" chain.

``celery -A benchmarks.chains worker`` runs the app configured from
``LFBENCH_BROKER_URL``, ``LFBENCH_QUEUE`` and (for the naive chain)
``LFBENCH_DATABASE_URL``, with the Celery settings leaseflow uses (JSON only,
``acks_late``, reject on worker lost, prefetch 1, no result backend) and task events
off, as stock Celery, unless ``LFBENCH_EVENTS=1`` (``worker_send_task_events`` and
``task_send_sent_event`` on, for the ``plain_events`` row).

The stock chain (W1's reference): ``noop`` x 4 then ``last(key)``. ``noop`` does
nothing at all; ``last`` stamps its end (``time.time()``) into the sorted set
``key:end`` (``ZADD GT``: the latest end wins) and counts the run done with ``INCR key``,
one pipelined round trip: the only instrumentation, in one task of five.

``tick(key, total)``: a no-op that counts itself with one Redis ``INCR`` of ``key`` (in
the broker's db) and stamps ``key:first`` (its start) when it is the first and
``key:last`` (its end) when it is the ``total``-th. Chains are links of immutable
``tick`` signatures; the calibration drains independent ``tick`` tasks.

With ``LFBENCH_REUSE_REDIS_CLIENTS=1`` every kombu Redis channel of the process reuses
one ``redis.Redis`` client per connection pool, as leaseflow's workers do on their own
channels (acks, task events, publishes): the ``plain_reuse`` baseline, plain Celery
with that fix, to tell the fix's share of leaseflow's ratio from the rest.

``naive_step(run_id, seq, states)``: bare Celery task over raw psycopg, one connection
per pool process, autocommit:

  1. claim, one statement (1 commit): ``UPDATE naive_runs SET status='running',
     lease_token=gen_random_uuid(), ... WHERE id AND step_seq AND status='pending'``;
  2. the no-op state;
  3. one transaction (1 commit): a lease-gated ``UPDATE naive_runs`` (token, status,
     unexpired lease) then ``INSERT INTO naive_steps``;
  4. publish ``naive_step(run_id, seq + 1)`` unless it was the last state.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from leaseflow.tasks import celery_app

TICK = "lfbench.chains.tick"
NOOP = "lfbench.chains.noop"
LAST = "lfbench.chains.last"
NAIVE_STEP = "lfbench.chains.naive_step"

SCHEMA = """
CREATE TABLE naive_runs (
    id bigint PRIMARY KEY,
    state int NOT NULL DEFAULT 1,
    step_seq int NOT NULL DEFAULT 1,
    status text NOT NULL DEFAULT 'pending',
    lease_token uuid,
    lease_owner text,
    lease_expires_at timestamptz,
    claimed_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 80);
CREATE TABLE naive_steps (
    run_id bigint NOT NULL,
    seq int NOT NULL,
    state int NOT NULL,
    lease_token uuid,
    started_at timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    PRIMARY KEY (run_id, seq)
);
"""

CLAIM = """
UPDATE naive_runs
   SET status = 'running', lease_token = gen_random_uuid(), lease_owner = %s,
       lease_expires_at = now() + interval '60 seconds', claimed_at = clock_timestamp(),
       updated_at = now()
 WHERE id = %s AND step_seq = %s AND status = 'pending'
RETURNING state, lease_token, claimed_at
"""

COMMIT = """
UPDATE naive_runs
   SET state = state + 1, step_seq = step_seq + 1,
       status = CASE WHEN state >= %s THEN 'completed' ELSE 'pending' END,
       lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL, claimed_at = NULL,
       updated_at = now()
 WHERE id = %s AND lease_token = %s AND status = 'running' AND lease_expires_at > now()
RETURNING status
"""

STEP = """
INSERT INTO naive_steps (run_id, seq, state, lease_token, started_at, finished_at)
VALUES (%s, %s, %s, %s, %s, clock_timestamp())
"""

_clients: dict[str, tuple[int, Any]] = {}  # kind -> (pid, client): one per pool process


def _redis(url: str) -> Any:
    entry = _clients.get("redis")
    if entry is None or entry[0] != os.getpid():
        import redis

        entry = (os.getpid(), redis.Redis.from_url(url))
        _clients["redis"] = entry
    return entry[1]


def _pg(url: str) -> Any:
    entry = _clients.get("pg")
    if entry is None or entry[0] != os.getpid():
        import psycopg

        entry = (os.getpid(), psycopg.connect(url, autocommit=True))
        _clients["pg"] = entry
    return entry[1]


def make_app(
    broker_url: str, queue: str, database_url: str | None = None, *, events: bool = False
) -> Celery:
    app = Celery("lfbench_chains", set_as_current=False)
    app.conf.update(broker_url=broker_url, **celery_app.celery_settings(queue))
    # Celery's defaults (events off) unless asked, whatever leaseflow's default is
    app.conf.update(worker_send_task_events=events, task_send_sent_event=events)

    @app.task(name=NOOP, ignore_result=True, shared=False)
    def noop() -> None:
        return None

    @app.task(name=LAST, ignore_result=True, shared=False)
    def last(key: str) -> None:
        end = time.time()
        pipe = _redis(app.conf.broker_url).pipeline(transaction=False)
        pipe.zadd(f"{key}:end", {"end": end}, gt=True)
        pipe.incr(key)
        pipe.execute()

    @app.task(name=TICK, ignore_result=True, shared=False)
    def tick(key: str, total: int) -> None:
        t0 = time.time()
        client = _redis(app.conf.broker_url)
        n = client.incr(key)
        if n == 1:
            client.set(f"{key}:first", repr(t0))
        if n == total:
            client.set(f"{key}:last", repr(time.time()))

    @app.task(name=NAIVE_STEP, ignore_result=True, shared=False, bind=True)
    def naive_step(task: Any, run_id: int, seq: int, states: int) -> str:
        conn = _pg(database_url or os.environ["LFBENCH_DATABASE_URL"])
        owner = f"{task.request.hostname}:{os.getpid()}"
        row = conn.execute(CLAIM, (owner, run_id, seq)).fetchone()
        if row is None:
            return "skipped"
        state, token, claimed_at = row
        # the no-op state
        with conn.transaction():
            done = conn.execute(COMMIT, (states, run_id, token)).fetchone()
            if done is None:
                return "lease_lost"
            conn.execute(STEP, (run_id, seq, state, token, claimed_at))
        if done[0] == "pending":
            task.apply_async((run_id, seq + 1, states))
        return "committed"

    return app


def reuse_redis_clients_everywhere() -> None:
    """Every kombu Redis channel made from now on in this process (consumer, event
    dispatcher, producers) reuses one client per pool (``dispatch.reuse_redis_client``)."""
    from kombu.transport import redis as kombu_redis

    from leaseflow.tasks.dispatch import reuse_redis_client

    init = kombu_redis.Channel.__init__
    if getattr(init, "reuses_clients", False):
        return

    def reusing_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        reuse_redis_client(self)

    reusing_init.reuses_clients = True  # type: ignore[attr-defined]
    kombu_redis.Channel.__init__ = reusing_init  # type: ignore[method-assign]


if os.environ.get("LFBENCH_REUSE_REDIS_CLIENTS") == "1":
    reuse_redis_clients_everywhere()

app = make_app(
    os.environ.get("LFBENCH_BROKER_URL", "memory://"),
    os.environ.get("LFBENCH_QUEUE", "lfbench-chains"),
    os.environ.get("LFBENCH_DATABASE_URL") or None,
    events=os.environ.get("LFBENCH_EVENTS") == "1",
)
