"""W0 calibration: the machine's ceilings, measured in the same session as the workloads.

pg 1 conn / 4 conns  commits/s of a tiny step transaction (UPDATE one of 1,000 run rows
                     with a 512-byte checkpoint + INSERT a step row, COMMIT), psycopg loops
                     on 1 and on 4 connections (one thread each) for ``--seconds`` each,
                     on a fresh database ``lf_bench_<random>``.
pgbench              the same transaction as a pgbench script (-c 1 and -c 4, -T
                     ``--seconds``), when ``pgbench`` is on PATH.
plain Celery no-op   ``--tasks`` independent ``benchmarks.chains.tick`` tasks enqueued
                     first, then drained by one prefork -c 2 worker (acks_late, prefetch
                     1, no result backend) on a Redis scratch db: tasks ÷ (last end -
                     first start). Each tick is one Redis ``INCR``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import threading
import time
from typing import Any

from benchmarks.common import (
    CeleryWorker,
    Deadline,
    Scratch,
    ScratchDatabase,
    ScratchRedis,
    clean_env,
    fingerprint,
    fingerprint_line,
    ignoring_sigint,
    log,
    ratio,
)

HELP = "W0: Postgres commits/s (1 and 4 connections), plain Celery no-op tasks/s"

PROFILES = {"full": {"seconds": 10.0, "tasks": 10_000}, "quick": {"seconds": 3.0, "tasks": 2000}}

SCHEMA = """
CREATE TABLE cal_runs (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, checkpoint bytea)
    WITH (fillfactor = 80);
CREATE TABLE cal_steps (id bigserial PRIMARY KEY, run_id int NOT NULL, n int NOT NULL,
                        at timestamptz NOT NULL DEFAULT clock_timestamp());
INSERT INTO cal_runs (id) SELECT g FROM generate_series(1, 1000) g;
"""

UPDATE = "UPDATE cal_runs SET n = n + 1, checkpoint = %s WHERE id = %s RETURNING n"
INSERT = "INSERT INTO cal_steps (run_id, n) VALUES (%s, %s)"

PGBENCH_SCRIPT = """\\set id random(1, 1000)
BEGIN;
UPDATE cal_runs SET n = n + 1, checkpoint = decode(repeat('ab', 512), 'hex') WHERE id = :id;
INSERT INTO cal_steps (run_id, n) VALUES (:id, 1);
COMMIT;
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="quick profile: 3 s loops, 2,000 tasks")
    p.add_argument("--seconds", type=float, help="seconds per Postgres loop (full 10, quick 3)")
    p.add_argument("--tasks", type=int, help="no-op tasks to drain (full 10,000, quick 2,000)")
    p.add_argument("--concurrency", type=int, default=2, help="worker -c (default 2)")
    p.add_argument("--redis-db", type=int, help="Redis db to use (default: a free one, 15..1)")
    p.add_argument("--no-pgbench", action="store_true", help="skip pgbench even if present")
    p.add_argument("--budget", type=float, default=300.0, help="give up after this many s")


def _pg_loop(url: str, connections: int, seconds: float) -> float:
    """Commits/s of the step transaction on ``connections`` threads for ``seconds``."""
    import psycopg

    checkpoint = os.urandom(512)
    counts = [0] * connections
    errors: list[BaseException] = []
    conns = [psycopg.connect(url, autocommit=True) for _ in range(connections)]
    start = threading.Event()
    stop_at: list[float] = [0.0]

    def work(i: int) -> None:
        conn = conns[i]
        rid = 1 + i * 250
        start.wait()
        try:
            for _ in range(10_000_000):
                if time.monotonic() >= stop_at[0]:
                    return
                rid = rid % 1000 + 1
                with conn.transaction():
                    conn.execute(UPDATE, (checkpoint, rid))
                    conn.execute(INSERT, (rid, 1))
                counts[i] += 1
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(connections)]
    try:
        for t in threads:
            t.start()
        t0 = time.monotonic()
        stop_at[0] = t0 + seconds
        start.set()
        for t in threads:
            t.join(seconds + 30)
        elapsed = time.monotonic() - t0
    finally:
        stop_at[0] = 0.0
        for conn in conns:
            conn.close()
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def _pgbench(url: str, clients: int, seconds: float, script: str) -> float | None:
    exe = shutil.which("pgbench")
    if exe is None:
        return None
    out = subprocess.run(
        [
            exe,
            "-n",
            "-f",
            script,
            "-c",
            str(clients),
            "-j",
            str(clients),
            "-T",
            str(int(seconds)),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    for line in out.stdout.splitlines():
        if line.startswith("tps = "):
            return float(line.split()[2])
    log(f"pgbench gave no tps: {out.stderr.strip()[-300:]}")
    return None


def _celery_noop(
    scratch: Scratch, redis: ScratchRedis, tasks: int, concurrency: int, deadline: Deadline
) -> dict[str, Any]:
    from benchmarks import chains

    queue = f"lfbench-cal-{redis.token}"
    key = f"lfbench:{redis.token}:cal"
    app = chains.make_app(redis.url, queue)
    t0 = time.monotonic()
    try:
        tick = app.tasks[chains.TICK]
        with app.producer_or_acquire() as producer:
            for _ in range(tasks):
                tick.apply_async((key, tasks), producer=producer)
    finally:
        app.close()
    enqueue_s = time.monotonic() - t0
    worker = CeleryWorker(
        "benchmarks.chains",
        name="calibrate",
        queue=queue,
        env=clean_env(LFBENCH_BROKER_URL=redis.url, LFBENCH_QUEUE=queue),
        log_dir=scratch.log_dir,
        concurrency=concurrency,
    )
    scratch.defer("stop worker calibrate", worker.stop)
    for _ in range(100_000):
        if int(redis.client.get(key) or 0) >= tasks:
            break
        worker.check()
        deadline.check()
        time.sleep(0.1)
    worker.stop()
    first = float(redis.client.get(f"{key}:first"))
    last = float(redis.client.get(f"{key}:last"))
    return {
        "tasks": tasks,
        "enqueue_per_s": round(tasks / enqueue_s, 1),
        "drain_s": round(last - first, 3),
        "tasks_per_s": round(tasks / (last - first), 1),
    }


def run(args: Any) -> int:
    profile = "quick" if args.quick else "full"
    seconds = args.seconds or PROFILES[profile]["seconds"]
    tasks = args.tasks or PROFILES[profile]["tasks"]
    fp = fingerprint()
    print(fingerprint_line(fp), flush=True)
    began = time.monotonic()
    deadline = Deadline(args.budget, "calibration")
    out: dict[str, Any] = {}
    with Scratch() as scratch:
        import psycopg

        db = ScratchDatabase()
        scratch.defer(f"drop database {db.name}", db.drop)
        with psycopg.connect(db.url, autocommit=True) as conn:
            conn.execute(SCHEMA)
            conn.execute("VACUUM ANALYZE")
        for n in (1, 4):
            deadline.check()
            out[f"pg_commits_per_s_{n}"] = round(_pg_loop(db.url, n, seconds), 1)
            log(f"psycopg loop, {n} connection(s): {out[f'pg_commits_per_s_{n}']} commits/s")
        if not args.no_pgbench and shutil.which("pgbench"):
            script = scratch.log_dir / "step.sql"
            script.write_text(PGBENCH_SCRIPT)
            for n in (1, 4):
                deadline.check()
                tps = _pgbench(db.url, n, seconds, str(script))
                out[f"pgbench_tps_{n}"] = None if tps is None else round(tps, 1)
                log(f"pgbench -c {n}: {tps} tps")
        redis = scratch.redis(args.redis_db)
        out["celery_noop"] = _celery_noop(scratch, redis, tasks, args.concurrency, deadline)
        log(f"plain Celery no-op: {out['celery_noop']}")
        with ignoring_sigint():
            log("stopping the worker, dropping the database")
    report = {
        "benchmark": "W0-calibrate",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "profile": profile,
        "fingerprint": fp,
        "config": {
            "pg_seconds": seconds,
            "pg_transaction": "UPDATE 1 row (512 B bytea) + INSERT 1 row, COMMIT",
            "celery": f"prefork -c {args.concurrency}, acks_late, prefetch 1, redis broker",
        },
        **out,
        "ratios": {
            "pg_4conn/1conn": ratio(out.get("pg_commits_per_s_4"), out.get("pg_commits_per_s_1")),
            "celery_noop_tasks/pg_1conn_commits": ratio(
                out["celery_noop"]["tasks_per_s"], out.get("pg_commits_per_s_1")
            ),
        },
        "elapsed_s": round(time.monotonic() - began, 1),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }
    _print_table(report)
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return 0


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="W0 calibration")
    table.add_column("measure")
    table.add_column("per second", justify="right")
    table.add_row("Postgres step tx, psycopg, 1 connection", _f(report["pg_commits_per_s_1"]))
    table.add_row("Postgres step tx, psycopg, 4 connections", _f(report["pg_commits_per_s_4"]))
    if "pgbench_tps_1" in report:
        table.add_row("Postgres step tx, pgbench -c 1", _f(report["pgbench_tps_1"]))
        table.add_row("Postgres step tx, pgbench -c 4", _f(report["pgbench_tps_4"]))
    c = report["celery_noop"]
    table.add_row(f"plain Celery no-op tasks (drain of {c['tasks']:,})", _f(c["tasks_per_s"]))
    table.add_row("plain Celery publish (client)", _f(c["enqueue_per_s"]))
    Console(width=120).print(table)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"
