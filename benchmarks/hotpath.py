"""Hot path without Celery: CPU per state of the database work, client and server side.

One process, one database connection per variant, ``--runs`` runs of 5 states each
(states 1-4 measured), on a fresh migrated database per variant:

  runner      ``Runner.run_step`` as a worker runs it (claim, context load, state
              function, checkpoint, fenced commit; no publish)
  raw         the same two statements (``queries.CLAIM`` then ``queries.COMMIT_MOVE``)
              from a bare psycopg loop: the SQL floor of the current design
  handoff     the "token carried in the message" direction: the commit issues the next
              token (``lease_token = $next``, fence on token and seq, status stays
              pending), and the next state starts with one read that checks the token
              and takes a session advisory lock (the cheap start marker that keeps a
              duplicated message from running the body twice)
  one_stmt    the fenced commit alone (no start check at all; not a safe design)

``client ms`` is this process's CPU time per state, ``server ms`` the CPU time of the
connection's PostgreSQL backend (``/proc/<pid>/stat``, so run it on the database host).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from benchmarks.common import ScratchDatabase, fingerprint, fingerprint_line, log

HELP = "CPU per state of the hot path's SQL and runner, no Celery (directions compared)"

VARIANTS = ("runner", "raw", "handoff", "one_stmt")

START = """
SELECT (SELECT count(pg_advisory_unlock(k)) FROM unnest(%(release)s::bigint[]) k),
       CASE WHEN r.id IS NOT NULL THEN pg_try_advisory_lock(%(key)s) END,
       r.workflow, r.version, r.state, r.attempt, r.max_attempts, clock_timestamp(),
       r.checkpoint, r.context_version, r.input, r.group_id
  FROM (SELECT 1) one
  LEFT JOIN lf_runs r ON r.id = %(run_id)s AND r.step_seq = %(seq)s
        AND r.lease_token = %(token)s AND r.status = 'pending' AND r.not_before <= now()
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=1000, help="runs per variant (5 states each)")
    p.add_argument("--quick", action="store_true", help="300 runs per variant")


def _handoff_commit() -> str:
    from leaseflow.store import queries

    fence = """
 WHERE id = %(run_id)s AND lease_token = %(token)s AND step_seq = %(seq)s
   AND (status = 'pending' OR (status = 'running' AND lease_expires_at > now()))
"""
    # the next token is issued with the commit; the run stays pending, unleased
    lease = """
       status = %(status)s,
       attempt = %(attempt)s,
       lease_token = %(next)s,
       lease_owner = NULL,
       lease_expires_at = NULL,
       claimed_at = NULL,"""
    return queries.fenced_commit(queries.MOVE_TO, lease, fence=fence)


def _commit_params(run_id: str, seq: int, token: str, started: Any) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "token": token,
        "seq": seq,
        "state": f"s{seq}",
        "next_state": f"s{seq + 1}",
        "status": "pending",
        "attempt": 0,
        "max_attempts": 1,
        "delay": 0.0,
        "dispatch_timeout": 60.0,
        "checkpoint": None,
        "context_version": None,
        "output": None,
        "error_code": None,
        "error": None,
        "terminal": False,
        "step_attempt": 1,
        "worker": "bench",
        "started_at": started,
        "outcome": "next",
        "step_error": None,
    }


def _backend_cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _measure(backend_pids: list[int], body: Callable[[], int]) -> dict[str, float]:
    """Client CPU of this process and server CPU of ``backend_pids`` per state."""
    b0, c0, t0 = _backend_cpu(backend_pids), time.process_time(), time.perf_counter()
    states = body()
    wall, client = time.perf_counter() - t0, time.process_time() - c0
    server = _backend_cpu(backend_pids) - b0
    return {
        "states": states,
        "wall_ms": round(wall / states * 1000, 3),
        "client_ms": round(client / states * 1000, 3),
        "server_ms": round(server / states * 1000, 3),
        "total_cpu_ms": round((client + server) / states * 1000, 3),
    }


def _variant(name: str, runs: int) -> dict[str, float]:
    import psycopg

    from benchmarks import workflows
    from leaseflow.fsm import checkpoint, rules
    from leaseflow.heartbeat import LeaseKeeper
    from leaseflow.runner import Runner
    from leaseflow.store import queries
    from leaseflow.store.base import NewRun
    from leaseflow.store.postgres import PostgresStore

    db = ScratchDatabase()
    try:
        db.migrate()
        store = PostgresStore(
            db.sqlalchemy_url,
            application_name="lfbench-hotpath",
            max_size=2,
            statement_timeout_ms=10_000,
            dispatch_timeout=60,
        )
        wf = workflows.linear_bench
        blob = checkpoint.encode(wf.context().model_dump(mode="json"), limit=1 << 20)
        new = [NewRun(str(uuid.uuid4()), blob, {}) for _ in range(runs)]
        store.create_runs(wf=wf, runs=new)
        with psycopg.connect(db.url, autocommit=True) as conn:
            ids = [r[0] for r in conn.execute("SELECT id::text FROM lf_runs").fetchall()]
            tokens = {i: str(uuid.uuid4()) for i in ids}
            if name in ("handoff", "one_stmt"):  # the token issued with the run
                with conn.cursor() as cur:
                    cur.executemany(
                        "UPDATE lf_runs SET lease_token = %s WHERE id = %s",
                        [(t, i) for i, t in tokens.items()],
                    )
            conn.execute("VACUUM ANALYZE lf_runs")
        if name == "runner":
            keeper = LeaseKeeper(store, worker="bench", ttl=60, interval=30)
            runner = Runner(store, keeper, worker="bench", ttl=60, limits=rules.Limits(1 << 20))
            runner.run_step(ids[0], 1)  # warm: registry, pool, prepared statements
            with psycopg.connect(db.url, autocommit=True) as conn:
                pids = [  # every pooled connection: claim and commit may use either
                    r[0]
                    for r in conn.execute(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                        " AND application_name = 'lfbench-hotpath'"
                    ).fetchall()
                ]

            def body() -> int:
                n = 0
                for seq in range(1, 5):
                    for run_id in ids[1:]:
                        if runner.run_step(run_id, seq).result != "committed":
                            raise RuntimeError(f"{run_id} step {seq} did not commit")
                        n += 1
                return n

            try:
                return _measure(pids, body)
            finally:
                keeper.stop()
                store.close()
        store.close()
        conn = psycopg.connect(db.url, autocommit=True)
        handoff = _handoff_commit()
        try:

            def body() -> int:
                n, release = 0, []
                for seq in range(1, 5):
                    for run_id in ids:
                        token = tokens[run_id]
                        if name == "raw":
                            row = conn.execute(
                                queries.CLAIM,
                                {
                                    "run_id": run_id,
                                    "seq": seq,
                                    "owner": "b",
                                    "ttl": 60,
                                    "versions": None,
                                },
                            ).fetchone()
                            token, started = row[6], row[7]
                            sql, params = queries.COMMIT_MOVE, {}
                        else:
                            started = dt.datetime.now(dt.UTC)
                            if name == "handoff":
                                key = int.from_bytes(
                                    hashlib.blake2b(token.encode(), digest_size=8).digest(),
                                    "big",
                                    signed=True,
                                )
                                row = conn.execute(
                                    START,
                                    {
                                        "release": release,
                                        "key": key,
                                        "run_id": run_id,
                                        "seq": seq,
                                        "token": token,
                                    },
                                ).fetchone()
                                if row[1] is not True:
                                    raise RuntimeError("start found nothing")
                                release = [key]
                                started = row[7]
                            nxt = str(uuid.uuid4())
                            tokens[run_id] = nxt
                            sql, params = handoff, {"next": nxt}
                        p = _commit_params(run_id, seq, token, started) | params
                        if conn.execute(sql, p).fetchone() is None:
                            raise RuntimeError(f"{name}: commit fenced out")
                        n += 1
                return n

            return _measure([conn.info.backend_pid], body)
        finally:
            conn.close()
    finally:
        db.drop()


def run(args: Any) -> int:
    runs = 300 if args.quick else args.runs
    fp = fingerprint()
    print(fingerprint_line(fp), flush=True)
    results: dict[str, dict[str, float]] = {}
    began = time.monotonic()
    for name in VARIANTS:
        results[name] = _variant(name, runs)
        log(f"{name}: {results[name]}")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"hot path CPU per state, no Celery ({runs} runs x 4 measured states)")
    for col in ("variant", "statements", "wall ms", "client ms", "server ms", "total CPU ms"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    statements = {"runner": "2", "raw": "2", "handoff": "1 read + 1", "one_stmt": "1"}
    for name, r in results.items():
        table.add_row(
            name,
            statements[name],
            f"{r['wall_ms']:.3f}",
            f"{r['client_ms']:.3f}",
            f"{r['server_ms']:.3f}",
            f"{r['total_cpu_ms']:.3f}",
        )
    Console(width=120).print(table)
    report = {
        "benchmark": "hotpath",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "runs": runs,
        "fingerprint": fp,
        "variants": results,
        "saving_vs_raw_ms": {
            k: round(results["raw"]["total_cpu_ms"] - v["total_cpu_ms"], 3)
            for k, v in results.items()
        },
        "elapsed_s": round(time.monotonic() - began, 1),
    }
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return 0
