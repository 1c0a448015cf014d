"""W8 deep-backlog claim: claim, reaper and dispatcher statement latency as lf_runs grows.

One fresh migrated database. For each depth (cumulative: the table grows from one depth
to the next) the benchmark

  1. bulk-loads finished runs up to ``depth`` finished rows (``INSERT ... SELECT generate_series``,
     status ``completed``, checkpoint ``b'\\x00{}'``, input ``{}``, workflow
     ``linear_bench`` whose transitions are registered; the load runs with
     ``session_replication_role = replica`` when allowed, so the transition trigger is
     skipped for the bulk rows only), plus ``--pending`` (+50 warm-up) pending runs at state ``s1``;
  2. ``VACUUM ANALYZE lf_runs`` and, when allowed, ``CHECKPOINT``: the bulk load's WAL
     would otherwise set off a checkpoint during the timing, and the first change to
     each page after a checkpoint writes the whole page to the WAL (checkpoints that
     still overlap the timing are counted in the report);
  3. times ``PostgresStore.claim`` (``leaseflow.store.queries.CLAIM``, one statement by
     primary key, on the store's own claim connection) once for every pending run, in
     random order;
  4. times the beat statements through the store ``--scans`` times each with nothing to
     do (``REAP``: no expired lease; ``OVERDUE`` + ``REDISPATCH``: nothing overdue),
     then once each with work:
     a reap of the ``--pending`` claims after their leases were moved into the past,
     and a dispatch of the same runs after their ``redispatch_at`` was moved back;
  5. marks those runs completed (they join the finished rows of the next depth).

Reports p50/p99/max per depth and the ratios p99(depth)/p99(first depth).
Target (BENCHMARKS.md/issue): claim p99 flat, ≤ 1.5x of the 1,000-row case.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import time
from typing import Any

from benchmarks.common import (
    Deadline,
    Scratch,
    ScratchDatabase,
    fingerprint,
    fingerprint_line,
    ignoring_sigint,
    log,
    percentile,
    ratio,
)

HELP = "W8: claim/reaper/dispatcher latency with 1k..1M rows in lf_runs"

#: Extra pending runs per depth, claimed (untimed) before the measured ones.
WARMUP = 50
PROFILES = {"full": [1_000, 100_000, 1_000_000], "quick": [1_000, 100_000]}


def _depths(text: str) -> list[int]:
    try:
        depths = sorted(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"depths must be integers: {text!r}") from exc
    if not depths or any(d < 1 or d > 5_000_000 for d in depths):
        raise argparse.ArgumentTypeError("depths must be 1..5,000,000")
    return depths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--depths", type=_depths, help="rows in lf_runs (full 1k,100k,1M)")
    p.add_argument("--quick", action="store_true", help="quick profile: 1k and 100k rows")
    p.add_argument("--pending", type=int, default=1000, help="pending runs per depth (1000)")
    p.add_argument("--scans", type=int, default=50, help="empty reaper/dispatcher scans")
    p.add_argument("--budget", type=float, default=900.0, help="give up after this many s")


LOAD_FINISHED = """
INSERT INTO lf_runs (id, workflow, version, state, prev_state, status, step_seq, attempt,
                     max_attempts, checkpoint, input, output, created_at, updated_at,
                     finished_at, not_before, redispatch_at)
SELECT gen_random_uuid(), 'linear_bench', %(version)s, 's5', 's4', 'completed', 6, 1, 1,
       '\\x007b7d'::bytea, '{}'::jsonb, 'null'::jsonb,
       now() - (g || ' seconds')::interval, now() - (g || ' seconds')::interval,
       now() - (g || ' seconds')::interval, now() - (g || ' seconds')::interval,
       now() - (g || ' seconds')::interval
  FROM generate_series(1, %(n)s) g
"""


def _redispatch_overdue(store: Any, limit: int) -> list[Any]:
    """The dispatcher's database work for overdue runs whose queue mark shows them lost:
    find them, then mark them re-published."""
    return store.redispatch_runs([run.run_id for run in store.overdue_runs(limit=limit)])


LOAD_PENDING = """
INSERT INTO lf_runs (id, workflow, version, state, status, step_seq, attempt, max_attempts,
                     checkpoint, input, redispatch_at)
SELECT gen_random_uuid(), 'linear_bench', %(version)s, 's1', 'pending', 1, 0, 3,
       '\\x007b7d'::bytea, '{}'::jsonb, now() + interval '1 hour'
  FROM generate_series(1, %(n)s)
RETURNING id::text
"""


def _ms(seconds: list[float]) -> dict[str, float | int | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {
        "n": len(seconds),
        "p50": r(percentile(seconds, 50)),
        "p99": r(percentile(seconds, 99)),
        "max": r(max(seconds) if seconds else None),
    }


def _checkpoint(conn: Any) -> bool:
    """``CHECKPOINT`` now, if this role may (superuser or ``pg_checkpoint``)."""
    import psycopg

    try:
        conn.execute("CHECKPOINT")
    except psycopg.Error as exc:
        log(f"CHECKPOINT not allowed ({exc}); a checkpoint may overlap the timing")
        return False
    return True


def _checkpoints(conn: Any) -> int:
    """Checkpoints started so far (timed + requested), cluster-wide."""
    row = conn.execute(
        "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
    ).fetchone()
    return int(row[0])


def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(args: Any) -> int:
    import psycopg

    from benchmarks import workflows
    from leaseflow.store.postgres import PostgresStore

    profile = "quick" if args.quick else "full"
    depths = args.depths or PROFILES[profile]
    if args.depths:
        profile = f"{profile}+depths"
    fp = fingerprint()
    print(fingerprint_line(fp), flush=True)
    began = time.monotonic()
    deadline = Deadline(args.budget, "backlog benchmark")
    results: dict[str, Any] = {}
    rng = random.Random(8)
    replica = False
    with Scratch() as scratch:
        db = ScratchDatabase()
        scratch.defer(f"drop database {db.name}", db.drop)
        db.migrate()
        store = PostgresStore(db.url, application_name="lfbench-backlog", max_size=2)
        scratch.defer("close store", store.close)
        wf = workflows.linear_bench
        store.register_workflow(wf)
        conn = psycopg.connect(db.url, autocommit=True)
        scratch.defer("close connection", conn.close)
        try:
            conn.execute("SET session_replication_role = replica")
            conn.execute("SET session_replication_role = DEFAULT")
            replica = True
        except psycopg.Error:
            log("session_replication_role not allowed: bulk load goes through the trigger")
        rows = 0
        for depth in depths:
            deadline.check()
            finished = max(0, depth - rows)  # the previous depths' runs are finished too
            t0 = time.monotonic()
            with conn.transaction():
                if replica:
                    conn.execute("SET LOCAL session_replication_role = replica")
                conn.execute(LOAD_FINISHED, {"version": wf.version, "n": finished})
            loaded = [
                r[0]
                for r in conn.execute(
                    LOAD_PENDING, {"version": wf.version, "n": args.pending + WARMUP}
                ).fetchall()
            ]
            warm, pending = loaded[:WARMUP], loaded[WARMUP:]
            rows += finished + len(loaded)
            conn.execute("VACUUM ANALYZE lf_runs")
            checkpointed = _checkpoint(conn)
            checkpoints0 = _checkpoints(conn)
            total = conn.execute("SELECT count(*) FROM lf_runs").fetchone()[0]
            size = conn.execute(
                "SELECT pg_total_relation_size('lf_runs'), pg_indexes_size('lf_runs')"
            ).fetchone()
            log(
                f"depth {depth}: {total} rows ({finished} loaded + {args.pending} pending) "
                f"in {time.monotonic() - t0:.1f}s; timing"
            )
            for run_id in warm:  # warm the pool, the plan cache and the buffers
                store.claim(run_id, 1, owner="bench:0", ttl=600.0)
                store.reap(limit=1000)
                _redispatch_overdue(store, 1000)
            rng.shuffle(pending)
            claims: list[float] = []
            for run_id in pending:
                dt_s, claim = _timed(lambda r=run_id: store.claim(r, 1, owner="bench:0", ttl=600.0))
                if claim is None:
                    raise RuntimeError(f"claim of pending run {run_id} found nothing")
                claims.append(dt_s)
            reap_empty: list[float] = []
            due_empty: list[float] = []
            for _ in range(args.scans):
                dt_s, found = _timed(lambda: store.reap(limit=1000))
                if found:
                    raise RuntimeError(f"reaper found {len(found)} expired leases early")
                reap_empty.append(dt_s)
                dt_s, _ = _timed(lambda: _redispatch_overdue(store, 1000))
                due_empty.append(dt_s)
            checkpoints_during = _checkpoints(conn) - checkpoints0
            conn.execute(  # the leases run out
                "UPDATE lf_runs SET lease_expires_at = now() - interval '1 second'"
                " WHERE id = ANY(%s::uuid[])",
                (pending,),
            )
            reap_s, reaped = _timed(lambda: store.reap(limit=max(1000, args.pending)))
            conn.execute(
                "UPDATE lf_runs SET redispatch_at = now() - interval '1 second'"
                " WHERE id = ANY(%s::uuid[])",
                (pending,),
            )
            due_s, due = _timed(lambda: _redispatch_overdue(store, max(1000, args.pending)))
            explain = conn.execute(
                "EXPLAIN (COSTS OFF) " + _literal_claim(), (pending[0],)
            ).fetchall()
            with conn.transaction():
                if replica:
                    conn.execute("SET LOCAL session_replication_role = replica")
                conn.execute(
                    "UPDATE lf_runs SET status = 'completed', finished_at = now(),"
                    " lease_token = NULL, lease_expires_at = NULL WHERE id = ANY(%s::uuid[])",
                    (loaded,),
                )
            results[str(depth)] = {
                "rows": int(total),
                "table_bytes": int(size[0]),
                "index_bytes": int(size[1]),
                "claim_ms": _ms(claims),
                "reap_empty_ms": _ms(reap_empty),
                "due_empty_ms": _ms(due_empty),
                "reap_batch": {"rows": len(reaped), "ms": round(reap_s * 1000, 2)},
                "due_batch": {"rows": len(due), "ms": round(due_s * 1000, 2)},
                "claim_plan": " / ".join(r[0].strip() for r in explain),
                "checkpoint_before_timing": checkpointed,
                "checkpoints_during_timing": checkpoints_during,
            }
            log(f"depth {depth}: {json.dumps(results[str(depth)])}")
        with ignoring_sigint():
            log("dropping the database")
    report = _report(fp, args, profile, depths, replica, results, time.monotonic() - began)
    _print_table(report)
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return 0


def _literal_claim() -> str:
    from leaseflow.store import queries

    sql = queries.CLAIM
    for name, value in (("owner", "'bench:0'"), ("ttl", "1"), ("seq", "1")):
        sql = sql.replace(f"%({name})s", value)
    sql = sql.replace("%(run_id)s", "%s::uuid")
    # EXPLAIN without ANALYZE: the UPDATE is planned, not executed
    return sql


def _report(
    fp: dict[str, Any],
    args: Any,
    profile: str,
    depths: list[int],
    replica: bool,
    results: dict[str, Any],
    elapsed: float,
) -> dict[str, Any]:
    base = results.get(str(depths[0]), {})
    ratios: dict[str, Any] = {}
    for depth, r in results.items():
        ratios[depth] = {
            "claim_p99": ratio(r["claim_ms"]["p99"], base["claim_ms"]["p99"]),
            "claim_p50": ratio(r["claim_ms"]["p50"], base["claim_ms"]["p50"]),
            "reap_empty_p99": ratio(r["reap_empty_ms"]["p99"], base["reap_empty_ms"]["p99"]),
            "due_empty_p99": ratio(r["due_empty_ms"]["p99"], base["due_empty_ms"]["p99"]),
        }
    deepest = str(depths[-1])
    flat = ratios.get(deepest, {}).get("claim_p99")
    return {
        "benchmark": "W8-backlog",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "profile": profile,
        "fingerprint": fp,
        "config": {
            "depths": depths,
            "pending_per_depth": args.pending,
            "empty_scans": args.scans,
            "bulk_load_replica_role": replica,
            "claim_via": "PostgresStore.claim (own claim connection, autocommit, one statement)",
        },
        "depths": results,
        "ratios_vs_first_depth": ratios,
        "claim_p99_deepest_over_first": flat,
        "claim_p99_flat": flat is not None and flat <= 1.5,
        "elapsed_s": round(elapsed, 1),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="W8 deep backlog: statement latency via the store (ms)")
    for column in (
        "rows",
        "claim p50",
        "claim p99",
        "claim max",
        "reap(empty) p50/p99",
        "due(empty) p50/p99",
        "reap 1k batch",
        "due 1k batch",
        "claim p99 / first",
    ):
        table.add_column(column, justify="right")
    for depth, r in report["depths"].items():
        c, re_, du = r["claim_ms"], r["reap_empty_ms"], r["due_empty_ms"]
        table.add_row(
            f"{r['rows']:,}",
            f"{c['p50']:.3f}",
            f"{c['p99']:.3f}",
            f"{c['max']:.2f}",
            _pair(re_),
            _pair(du),
            f"{r['reap_batch']['ms']:.1f} ({r['reap_batch']['rows']})",
            f"{r['due_batch']['ms']:.1f} ({r['due_batch']['rows']})",
            f"{report['ratios_vs_first_depth'][depth]['claim_p99']}x",
        )
    console = Console(width=150)
    console.print(table)
    console.print(
        f"claim p99 deepest/first = {report['claim_p99_deepest_over_first']}x "
        f"(target <= 1.5x): {'flat' if report['claim_p99_flat'] else 'NOT flat'}"
    )
    for depth, r in report["depths"].items():
        console.print(f"claim plan at {depth}: {r['claim_plan']}")


def _pair(m: dict[str, Any]) -> str:
    if m["p50"] is None:
        return "-"
    return f"{m['p50']:.2f}/{m['p99']:.2f}"
