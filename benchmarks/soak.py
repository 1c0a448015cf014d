"""Soak (W7 in spirit): N minutes of open-loop leaseflow runs at a fixed rate on a real
worker that is restarted (warm shutdown) every M seconds, with celery beat recovering
whatever a restart strands; worker memory, table/index growth, dead tuples, HOT
updates, throughput over time, and lost runs.

Setup: a fresh migrated database; one real ``celery worker`` subprocess (prefork -c 2,
acks_late, prefetch 1) and one ``celery -A leaseflow.tasks beat`` on a Redis scratch db;
short maintenance knobs: lease TTL ``--ttl`` (10 s), heartbeat ``--heartbeat`` (3 s),
reaper ``--reaper-interval`` (2 s), dispatcher ``--dispatch-interval`` (2 s), re-publish
after ``--dispatch-timeout`` (10 s). Workflow ``linear_bench`` (5 no-op states).

Load: Poisson arrivals (seeded, precomputed; one sender thread, ``Client.start`` at each
scheduled time, never waiting) at ``--rate`` runs/s, else ``--load`` (default 0.7: W7's
70%) x ``--w1-states-per-s`` (default 216.9, leaseflow's W1 figure in RESULTS.md) / 5
states = 20.0 runs/s, for ``--minutes`` (full 10, quick 1).

Restarts: ``--restart-every`` s (full 60, quick 20) after it was started, the worker's
main process gets SIGTERM (Celery's warm shutdown: finish the tasks in hand, then exit;
SIGKILL after ``--shutdown-timeout``, 60 s), and once it has exited a new worker is
started. Meanwhile runs queue up in the broker; a message lost on the way is re-published
by the dispatcher, an abandoned lease is reaped. After the last send the benchmark waits
up to ``--drain-timeout`` s for every run to finish, then stops the worker (so its
statistics reach ``pg_stat_user_tables``) and takes the end snapshot.

Seen here (celery 5.7, billiard 4.3.2): a warm shutdown under load now and then takes
~30 s instead of ~2 s. py-spy showed the main process in ``Pool.join`` while a pool child
sat in billiard's ``Worker._ensure_messages_consumed``, which polls 300 x 0.1 s for the
main process to read its last results; nothing is lost, the queue just waits. The
per-period table shows each warm shutdown's duration and the gap until the next commit.

Metrics:
  worker RSS   sum of ``VmRSS`` over the worker's main process and pool children, sampled
               every ``--sample-s`` s; per restart period: first sample, max, last sample.
  gap          per restart: SIGTERM -> the new worker's first commit (``lf_steps``).
  sizes        ``pg_relation_size``, ``pg_indexes_size``, ``pg_total_relation_size`` of
               lf_runs and lf_steps, and bytes per row (total size / ``count(*)``), at the
               begin (after one probe run), at ``--steady-after`` s (start of steady state,
               default 10% of the soak) and at the end. leaseflow keeps every finished run
               and step (no retention), so raw sizes grow with the rows by design; bloat is
               judged by bytes per row (target: within 2x of the start of steady state).
  lf_runs      ``n_live_tup``, ``n_dead_tup``, ``n_tup_upd``, ``n_tup_hot_upd`` (HOT ratio
               = hot / upd), ``autovacuum_count`` (statistics lag a few seconds mid-run).
  throughput   states/s per ``--bucket-s`` bucket (full 60, quick 10) of ``lf_steps``
               commit times, with the end-to-end latency (scheduled send -> last commit) of
               the runs scheduled in that bucket.
  runs         started, completed, failed (failed/cancelled/timed_out), lost (still
               pending/running/waiting after the drain), backlog when sending stopped,
               reaped leases, duplicate commits (steps committed beyond 5 per run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from typing import Any

from benchmarks.common import (
    W1_STATES_PER_S,
    CeleryWorker,
    Deadline,
    OpenLoopSender,
    Scratch,
    clean_env,
    distribution,
    fingerprint,
    fingerprint_line,
    ignoring_sigint,
    log,
    poisson_offsets,
    rss_kb,
    warm_shutdown,
)
from benchmarks.recovery import Beat

HELP = "soak: open-loop runs for N minutes, worker restarted every M s; memory, bloat, lost"

STATES = 5
PROFILES = {
    "full": {"minutes": 10.0, "restart_every": 60.0, "bucket_s": 60.0},
    "quick": {"minutes": 1.0, "restart_every": 20.0, "bucket_s": 10.0},
}
TABLES = ("lf_runs", "lf_steps")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, help="load duration (full 10, quick 1)")
    p.add_argument("--quick", action="store_true", help="quick profile: 1 min, restart / 20 s")
    p.add_argument("--rate", type=float, help="runs/s (default: --load x --w1-states-per-s / 5)")
    p.add_argument("--load", type=float, default=0.7, help="fraction of W1 (default 0.7)")
    p.add_argument(
        "--w1-states-per-s",
        type=float,
        default=W1_STATES_PER_S,
        help=f"leaseflow's W1 states/s (default {W1_STATES_PER_S}, RESULTS.md)",
    )
    p.add_argument("--restart-every", type=float, help="s between restarts (full 60, quick 20)")
    p.add_argument("--bucket-s", type=float, help="throughput bucket s (full 60, quick 10)")
    p.add_argument("--steady-after", type=float, help="s; default 10%% of the soak")
    p.add_argument("--seed", type=int, default=7, help="arrival schedule seed (default 7)")
    p.add_argument("--ttl", type=float, default=10.0, help="lease TTL s (default 10)")
    p.add_argument("--heartbeat", type=float, default=3.0, help="heartbeat interval s")
    p.add_argument("--reaper-interval", type=float, default=2.0, help="reaper interval s")
    p.add_argument("--dispatch-interval", type=float, default=2.0, help="dispatcher interval s")
    p.add_argument("--dispatch-timeout", type=float, default=10.0, help="re-publish after s")
    p.add_argument("--shutdown-timeout", type=float, default=60.0, help="SIGKILL after s")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="s to wait after sending")
    p.add_argument("--sample-s", type=float, default=2.0, help="RSS sampling period s")
    p.add_argument("--concurrency", type=int, default=2, help="worker -c (default 2)")
    p.add_argument("--pool", default="prefork", help="worker -P (default prefork)")
    p.add_argument("--redis-db", type=int, help="Redis db to use (default: a free one, 15..1)")
    p.add_argument("--loglevel", default="WARNING", help="worker -l (default WARNING)")
    p.add_argument("--budget", type=float, help="give up after s (default soak + 600)")


# -- database snapshots ------------------------------------------------------------------


def _snapshot(conn: Any, label: str, at: float) -> dict[str, Any]:
    out: dict[str, Any] = {"label": label, "t_s": round(at, 1), "tables": {}}
    for table in TABLES:
        row = conn.execute(
            "SELECT pg_relation_size(c.oid), pg_indexes_size(c.oid),"
            " pg_total_relation_size(c.oid), s.n_live_tup, s.n_dead_tup, s.n_tup_upd,"
            " s.n_tup_hot_upd, s.autovacuum_count"
            " FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid"
            " WHERE c.oid = %s::regclass",
            (table,),
        ).fetchone()
        rows = int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        rel, idx, total, live, dead, upd, hot, autovac = (int(v or 0) for v in row)
        out["tables"][table] = {
            "rows": rows,
            "relation_bytes": rel,
            "indexes_bytes": idx,
            "total_bytes": total,
            "bytes_per_row": round(total / rows, 1) if rows else None,
            "n_live_tup": live,
            "n_dead_tup": dead,
            "n_tup_upd": upd,
            "n_tup_hot_upd": hot,
            "hot_ratio": round(hot / upd, 3) if upd else None,
            "autovacuum_count": autovac,
        }
    return out


def _active(conn: Any) -> int:
    row = conn.execute(
        "SELECT count(*) FROM lf_runs WHERE status IN ('pending', 'running', 'waiting')"
    ).fetchone()
    return int(row[0])


class Period:
    """One worker's life between two restarts."""

    def __init__(self, index: int, worker: CeleryWorker, began: float, members: int) -> None:
        self.index = index
        self.worker = worker
        #: RSS is sampled once the worker has this many processes (main + pool children):
        #: before the pool is forked the main process is still booting.
        self.members = members
        self.began = began  # wall clock: the worker was started
        self.term_prev: float | None = None  # wall clock: SIGTERM to the previous worker
        self.pids: set[int] = {worker.proc.pid}
        self.rss: list[int] = []
        self.ended: float | None = None
        self.shutdown_s: float | None = None
        self.clean: bool | None = None

    def sample(self) -> None:
        members = self.worker.members()
        self.pids.update(members)
        if len(members) >= self.members:
            self.rss.append(rss_kb(members))


def run(args: Any) -> int:
    import psycopg

    from benchmarks import workflows
    from leaseflow.client import Client
    from leaseflow.settings import Settings

    profile = "quick" if args.quick else "full"
    defaults = PROFILES[profile]
    overridden = [
        f"{k}={getattr(args, k):g}" for k in defaults if getattr(args, k, None) is not None
    ]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if overridden:
        profile = f"{profile}+{','.join(overridden)}"
    seconds = args.minutes * 60.0
    rate = args.rate or args.load * args.w1_states_per_s / STATES
    rate_source = (
        "--rate"
        if args.rate
        else f"{args.load:g} x W1 {args.w1_states_per_s:g} states/s / {STATES} states"
    )
    steady_after = args.steady_after if args.steady_after is not None else 0.1 * seconds
    fp = fingerprint()
    print(fingerprint_line(fp), flush=True)
    print(
        f"rate: {rate:.2f} runs/s = {rate * STATES:.1f} states/s ({rate_source}); "
        f"{seconds:g} s, worker restart every {args.restart_every:g} s",
        flush=True,
    )
    began = time.monotonic()
    deadline = Deadline(
        args.budget if args.budget else seconds + args.drain_timeout + 600, "soak benchmark"
    )
    offsets = poisson_offsets(rate, seconds, args.seed)
    periods: list[Period] = []
    snapshots: list[dict[str, Any]] = []
    with Scratch() as scratch:
        redis = scratch.redis(args.redis_db)
        db = scratch.database(migrate=True)
        queue = f"lfbench-soak-{redis.token}"
        knobs = {
            "lease_ttl": args.ttl,
            "heartbeat_interval": args.heartbeat,
            "reaper_interval": args.reaper_interval,
            "dispatch_interval": args.dispatch_interval,
            "dispatch_timeout": args.dispatch_timeout,
        }
        env = clean_env(
            LEASEFLOW_DATABASE_URL=db.sqlalchemy_url,
            LEASEFLOW_BROKER_URL=redis.url,
            LEASEFLOW_DEFAULT_QUEUE=queue,
            LEASEFLOW_WORKFLOWS="benchmarks.workflows",
            **{f"LEASEFLOW_{k.upper()}": str(v) for k, v in knobs.items()},
        )
        settings = Settings(
            database_url=db.sqlalchemy_url,
            broker_url=redis.url,
            default_queue=queue,
            workflows=["benchmarks.workflows"],
            **knobs,
        )
        serial = 0

        def new_worker() -> CeleryWorker:
            nonlocal serial
            serial += 1
            w = CeleryWorker(
                "leaseflow.tasks",
                name=f"soak-w{serial}",
                queue=queue,
                env=env,
                log_dir=scratch.log_dir,
                pool=args.pool,
                concurrency=args.concurrency,
                loglevel=args.loglevel,
            )
            scratch.defer(f"stop worker soak-w{serial}", w.stop)
            return w

        beat = Beat(env=env, log_dir=scratch.log_dir)
        scratch.defer("stop beat", beat.stop)
        client = Client(settings=settings)
        scratch.defer("close client", client.close)
        conn = psycopg.connect(db.url, autocommit=True)
        scratch.defer("close connection", conn.close)
        wf = workflows.linear_bench

        # the first worker; one probe run waits for it to come up
        members = 1 + args.concurrency if args.pool == "prefork" else 1
        period = Period(1, new_worker(), time.time(), members)
        periods.append(period)
        probe = client.start(wf, {})
        limit = time.monotonic() + 90
        done = "SELECT 1 FROM lf_runs WHERE id = %s AND status = 'completed'"
        while conn.execute(done, (probe,)).fetchone() is None:
            period.worker.check()
            deadline.check()
            if time.monotonic() > limit:
                raise TimeoutError("the probe run did not complete within 90 s")
            time.sleep(0.05)
        period.sample()
        beat.check()

        sender = OpenLoopSender(offsets, lambda i: client.start(wf, {}))
        scratch.defer("stop sender", sender.stop)  # runs before the client is closed
        t0 = sender.start()
        snapshots.append(_snapshot(conn, "begin", 0.0))
        log(f"soak: {len(offsets)} runs over {seconds:g} s at {rate:.2f} runs/s")
        next_sample = time.monotonic() + args.sample_s
        next_restart = t0 + args.restart_every
        steady_taken = False
        backlog_at_end = None
        drain_until: float | None = None
        for _ in range(10_000_000):
            deadline.check()
            beat.check()
            now = time.time()
            sending = sender.alive()
            if not steady_taken and now - t0 >= steady_after:
                snapshots.append(_snapshot(conn, "steady", now - t0))
                steady_taken = True
            if sending and now >= next_restart and now - t0 < seconds:
                period.sample()
                period.ended = time.time()
                period.shutdown_s, period.clean = warm_shutdown(
                    period.worker, args.shutdown_timeout
                )
                term = period.ended
                period = Period(len(periods) + 1, new_worker(), time.time(), members)
                period.term_prev = term
                periods.append(period)
                log(
                    f"restart {len(periods) - 1} at {term - t0:.0f}s: warm shutdown took "
                    f"{periods[-2].shutdown_s:.1f}s (clean: {periods[-2].clean}); "
                    f"RSS max {max(periods[-2].rss, default=0) / 1024:.0f} MB"
                )
                next_restart = time.time() + args.restart_every  # each worker lives as long
                next_sample = time.monotonic()
            period.worker.check()
            if time.monotonic() >= next_sample:
                period.sample()
                next_sample = time.monotonic() + args.sample_s
            if not sending:
                if drain_until is None:
                    sender.join(5.0)
                    backlog_at_end = _active(conn)
                    drain_until = time.monotonic() + args.drain_timeout
                    log(f"sending done; backlog {backlog_at_end} runs; draining")
                if _active(conn) == 0 or time.monotonic() > drain_until:
                    break
            time.sleep(0.25)
        if not steady_taken:
            snapshots.append(_snapshot(conn, "steady", time.time() - t0))
        drain_s = time.time() - t0 - seconds
        period.sample()
        period.ended = time.time()
        period.shutdown_s, period.clean = warm_shutdown(period.worker, args.shutdown_timeout)
        sender.stop()
        client.close()
        time.sleep(1.0)  # the exited backends' statistics reach pg_stat_user_tables
        snapshots.append(_snapshot(conn, "end", time.time() - t0))
        figures = _figures(conn, sender, t0, periods, args.bucket_s)
        with ignoring_sigint():
            log("stopping beat, dropping the database")
    report = _report(
        fp,
        args,
        profile,
        rate,
        rate_source,
        seconds,
        steady_after,
        snapshots,
        periods,
        figures,
        backlog_at_end,
        drain_s,
        began,
    )
    _print_tables(report)
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return 0 if report["runs"]["lost"] == 0 and report["runs"]["failed"] == 0 else 1


def _figures(
    conn: Any, sender: OpenLoopSender, t0: float, periods: list[Period], bucket_s: float
) -> dict[str, Any]:
    """Run outcomes, per-bucket throughput and latency, per-period first commits."""
    ok = sender.ok()
    scheduled = {s.value: s.scheduled for s in ok}
    status: dict[str, int] = {}
    for st, n in conn.execute("SELECT status, count(*) FROM lf_runs GROUP BY 1").fetchall():
        status[st] = int(n)
    # per run: committed steps, last commit (the probe is not in ``scheduled``)
    last: dict[str, float] = {}
    dupes = 0
    for run_id, n, fin in conn.execute(
        "SELECT run_id::text, count(*), extract(epoch FROM max(finished_at))::float8"
        " FROM lf_steps WHERE outcome IN ('next', 'completed') GROUP BY run_id"
    ).fetchall():
        dupes += max(0, int(n) - STATES)
        if run_id in scheduled and int(n) >= STATES:
            last[run_id] = fin
    row = conn.execute("SELECT count(*) FROM lf_steps WHERE outcome = 'lease_expired'")
    reaped = int(row.fetchone()[0])
    # throughput per bucket of commit time; e2e per bucket of scheduled time
    buckets: dict[int, dict[str, Any]] = {}
    for b, n in conn.execute(
        "SELECT floor((extract(epoch FROM finished_at) - %s) / %s)::int, count(*)"
        " FROM lf_steps WHERE outcome IN ('next', 'completed')"
        " AND extract(epoch FROM finished_at) >= %s GROUP BY 1 ORDER BY 1",
        (t0, bucket_s, t0),
    ).fetchall():
        buckets.setdefault(int(b), {"states": 0, "e2e": []})["states"] = int(n)
    for run_id, sched in scheduled.items():
        b = int((sched - t0) // bucket_s)
        entry = buckets.setdefault(b, {"states": 0, "e2e": []})
        entry["sent"] = entry.get("sent", 0) + 1
        if run_id in last:
            entry["e2e"].append((last[run_id] - sched) * 1000)
    per_bucket = []
    row = conn.execute(
        "SELECT extract(epoch FROM max(finished_at))::float8 FROM lf_steps"
        " WHERE outcome IN ('next', 'completed')"
    ).fetchone()
    last_commit = (row[0] if row is not None and row[0] is not None else t0) - t0
    for b in sorted(buckets):
        entry = buckets[b]
        dist = distribution(entry["e2e"])
        width = min(bucket_s, max(last_commit - b * bucket_s, 1e-9))  # the last is partial
        per_bucket.append(
            {
                "from_s": round(b * bucket_s, 1),
                "states_per_s": round(entry["states"] / width, 1),
                "runs_sent": entry.get("sent", 0),
                "e2e_ms_p50": dist["p50"],
                "e2e_ms_p99": dist["p99"],
                "e2e_ms_max": dist["max"],
            }
        )
    # per period: the worker's commits (lf_steps.worker = host:pid of a pool process)
    commits: dict[int, tuple[float, float, int]] = {}
    for worker, first, final, n in conn.execute(
        "SELECT worker, extract(epoch FROM min(finished_at))::float8,"
        " extract(epoch FROM max(finished_at))::float8, count(*) FROM lf_steps"
        " WHERE outcome IN ('next', 'completed') AND worker IS NOT NULL GROUP BY worker"
    ).fetchall():
        pid = int(str(worker).rsplit(":", 1)[-1])
        commits[pid] = (first, final, int(n))
    per_period = []
    for p in periods:
        mine = [commits[pid] for pid in p.pids if pid in commits]
        first_commit = min((c[0] for c in mine), default=None)
        per_period.append(
            {
                "period": p.index,
                "from_s": round(p.began - t0, 1),
                "to_s": None if p.ended is None else round(p.ended - t0, 1),
                "states": sum(c[2] for c in mine),
                "rss_mb_first": round(p.rss[0] / 1024, 1) if p.rss else None,
                "rss_mb_max": round(max(p.rss) / 1024, 1) if p.rss else None,
                "rss_mb_last": round(p.rss[-1] / 1024, 1) if p.rss else None,
                "rss_samples": len(p.rss),
                "gap_s": (
                    round(first_commit - p.term_prev, 2)
                    if first_commit is not None and p.term_prev is not None
                    else None
                ),
                "warm_shutdown_s": None if p.shutdown_s is None else round(p.shutdown_s, 2),
                "clean_exit": p.clean,
            }
        )
    e2e_all = [(last[r] - s) * 1000 for r, s in scheduled.items() if r in last]
    commit_rows = conn.execute(
        "SELECT count(*), extract(epoch FROM max(finished_at) - min(finished_at))::float8"
        " FROM lf_steps WHERE outcome IN ('next', 'completed') AND extract(epoch FROM"
        " finished_at) >= %s",
        (t0,),
    ).fetchone()
    return {
        "status": status,
        "runs_started": len(ok),
        "send_errors": len(sender.errors()),
        "send_error_first": next(iter(sender.errors()), None),
        "completed_measured": len(last),
        "duplicate_commits": dupes,
        "reaped_leases": reaped,
        "per_bucket": per_bucket,
        "per_period": per_period,
        "e2e_ms": distribution(e2e_all),
        "send_lag_ms": distribution(sender.lag_ms()),
        "states_committed": int(commit_rows[0]),
        "commit_span_s": commit_rows[1],
    }


def _growth(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    by = {s["label"]: s["tables"] for s in snapshots}
    steady, end = by.get("steady"), by.get("end")
    out: dict[str, Any] = {}
    if steady is None or end is None:
        return out
    for table in TABLES:
        a, b = steady[table], end[table]

        def r(key: str, a: dict[str, Any] = a, b: dict[str, Any] = b) -> float | None:
            return round(b[key] / a[key], 2) if a.get(key) else None

        out[table] = {
            "rows_x": r("rows"),
            "relation_x": r("relation_bytes"),
            "indexes_x": r("indexes_bytes"),
            "total_x": r("total_bytes"),
            "bytes_per_row_x": r("bytes_per_row"),
        }
    return out


def _report(
    fp: dict[str, Any],
    args: Any,
    profile: str,
    rate: float,
    rate_source: str,
    seconds: float,
    steady_after: float,
    snapshots: list[dict[str, Any]],
    periods: list[Period],
    figures: dict[str, Any],
    backlog_at_end: int | None,
    drain_s: float,
    began: float,
) -> dict[str, Any]:
    status = figures["status"]
    active = sum(status.get(s, 0) for s in ("pending", "running", "waiting"))
    failed = sum(status.get(s, 0) for s in ("failed", "cancelled", "timed_out"))
    completed = status.get("completed", 0) - 1  # minus the probe run
    growth = _growth(snapshots)
    rss = [p for p in figures["per_period"] if p["rss_mb_max"] is not None]
    span = figures["commit_span_s"]
    return {
        "benchmark": "soak",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "profile": profile,
        "fingerprint": fp,
        "config": {
            "rate_runs_per_s": round(rate, 3),
            "rate_states_per_s": round(rate * STATES, 2),
            "rate_source": rate_source,
            "load": None if args.rate else args.load,
            "w1_states_per_s": None if args.rate else args.w1_states_per_s,
            "seconds": seconds,
            "restart_every_s": args.restart_every,
            "restart": "SIGTERM to the main process (warm shutdown), then a new worker",
            "steady_after_s": round(steady_after, 1),
            "bucket_s": args.bucket_s,
            "seed": args.seed,
            "lease_ttl_s": args.ttl,
            "heartbeat_s": args.heartbeat,
            "reaper_interval_s": args.reaper_interval,
            "dispatch_interval_s": args.dispatch_interval,
            "dispatch_timeout_s": args.dispatch_timeout,
            "pool": args.pool,
            "concurrency": args.concurrency,
            "broker": "redis (scratch db)",
            "beat": "celery -A leaseflow.tasks beat",
            "drain_timeout_s": args.drain_timeout,
        },
        "runs": {
            "started": figures["runs_started"],
            "completed": completed,
            "failed": failed,
            "lost": active,
            "send_errors": figures["send_errors"],
            "send_error_first": figures["send_error_first"],
            "backlog_when_sending_stopped": backlog_at_end,
            "drain_after_load_s": round(drain_s, 1),
            "reaped_leases": figures["reaped_leases"],
            "duplicate_commits": figures["duplicate_commits"],
        },
        "throughput": {
            "states_committed": figures["states_committed"],
            "states_per_s_overall": round(figures["states_committed"] / span, 1) if span else None,
            "per_bucket": figures["per_bucket"],
        },
        "e2e_ms": figures["e2e_ms"],
        "send_lag_ms": figures["send_lag_ms"],
        "worker": {
            "restarts": len(periods) - 1,
            "rss_mb_start": rss[0]["rss_mb_first"] if rss else None,
            "rss_mb_end": rss[-1]["rss_mb_last"] if rss else None,
            "rss_mb_max": max((p["rss_mb_max"] for p in rss), default=None),
            "per_period": figures["per_period"],
        },
        "snapshots": snapshots,
        "growth_end_over_steady": growth,
        "targets": {
            "lost_eq_0": active == 0,
            "failed_eq_0": failed == 0,
            "no_duplicate_commits": figures["duplicate_commits"] == 0,
            "bytes_per_row_within_2x": bool(growth)
            and all((g["bytes_per_row_x"] or 99) <= 2.0 for g in growth.values()),
            "raw_size_within_2x": bool(growth)
            and all((g["total_x"] or 99) <= 2.0 for g in growth.values()),
        },
        "elapsed_s": round(time.monotonic() - began, 1),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1048576:.2f}"


def _f(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def _print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = report["config"]
    console = Console(width=160)
    title = (
        f"soak: {cfg['rate_runs_per_s']:g} runs/s ({cfg['rate_states_per_s']:g} states/s)"
        f" for {cfg['seconds']:g} s, worker restart every {cfg['restart_every_s']:g} s"
    )
    sizes = Table(title=f"{title}: tables (MB) at begin / start of steady state / end")
    for column in (
        "snapshot",
        "t s",
        "table",
        "rows",
        "heap",
        "indexes",
        "total",
        "B/row",
        "n_dead_tup",
        "n_tup_upd",
        "hot_upd",
        "HOT ratio",
        "autovac",
    ):
        sizes.add_column(column, justify="left" if column in ("snapshot", "table") else "right")
    for snap in report["snapshots"]:
        for table, t in snap["tables"].items():
            sizes.add_row(
                snap["label"],
                _f(snap["t_s"]),
                table,
                str(t["rows"]),
                _mb(t["relation_bytes"]),
                _mb(t["indexes_bytes"]),
                _mb(t["total_bytes"]),
                _f(t["bytes_per_row"]),
                str(t["n_dead_tup"]),
                str(t["n_tup_upd"]),
                str(t["n_tup_hot_upd"]),
                _f(t["hot_ratio"]),
                str(t["autovacuum_count"]),
            )
    console.print(sizes)
    growth = Table(title="growth, end / start of steady state")
    for column in ("table", "rows", "heap", "indexes", "total", "bytes/row"):
        growth.add_column(column, justify="left" if column == "table" else "right")
    for table, g in report["growth_end_over_steady"].items():
        growth.add_row(
            table,
            *(
                f"{_f(g[k])}x"
                for k in ("rows_x", "relation_x", "indexes_x", "total_x", "bytes_per_row_x")
            ),
        )
    console.print(growth)
    workers = Table(title="worker per restart period (RSS = main + pool children)")
    for column in (
        "period",
        "from s",
        "to s",
        "states",
        "RSS MB first",
        "RSS MB max",
        "RSS MB last",
        "gap s",
        "warm shutdown s",
        "clean",
    ):
        workers.add_column(column, justify="right")
    for p in report["worker"]["per_period"]:
        workers.add_row(
            str(p["period"]),
            _f(p["from_s"]),
            _f(p["to_s"]),
            str(p["states"]),
            _f(p["rss_mb_first"]),
            _f(p["rss_mb_max"]),
            _f(p["rss_mb_last"]),
            _f(p["gap_s"]),
            _f(p["warm_shutdown_s"]),
            str(p["clean_exit"]),
        )
    console.print(workers)
    tput = Table(title=f"throughput per {cfg['bucket_s']:g} s (e2e: runs scheduled in it)")
    for column in ("from s", "states/s", "runs sent", "e2e p50 ms", "e2e p99 ms", "e2e max ms"):
        tput.add_column(column, justify="right")
    for b in report["throughput"]["per_bucket"]:
        tput.add_row(
            _f(b["from_s"]),
            _f(b["states_per_s"]),
            str(b["runs_sent"]),
            _f(b["e2e_ms_p50"]),
            _f(b["e2e_ms_p99"]),
            _f(b["e2e_ms_max"]),
        )
    console.print(tput)
    runs = report["runs"]
    w = report["worker"]
    console.print(
        f"runs: started {runs['started']}, completed {runs['completed']}, failed "
        f"{runs['failed']}, lost {runs['lost']} (backlog when sending stopped "
        f"{runs['backlog_when_sending_stopped']}, drained in {runs['drain_after_load_s']} s); "
        f"reaped leases {runs['reaped_leases']}, duplicate commits {runs['duplicate_commits']},"
        f" send errors {runs['send_errors']}"
    )
    console.print(
        f"worker RSS MB: start {_f(w['rss_mb_start'])}, end {_f(w['rss_mb_end'])}, max "
        f"{_f(w['rss_mb_max'])} over {w['restarts']} restarts; states/s overall "
        f"{_f(report['throughput']['states_per_s_overall'])}; e2e ms p50 "
        f"{_f(report['e2e_ms']['p50'])} p99 {_f(report['e2e_ms']['p99'])}"
    )
    console.print(f"targets: {report['targets']}")
