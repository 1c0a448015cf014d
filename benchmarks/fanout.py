"""W3 fan-out and exactly-once join: leaseflow ``Parallel`` vs a plain Celery chord.

Three systems, each with its own real ``celery worker`` subprocess (prefork, -c 2,
JSON, acks_late, prefetch 1) on the same Redis server and scratch db (with a Redis
result backend unless noted), driven closed-loop (one fan-out in flight at a time)
and interleaved run by run (order rotated every round) so that drift hits all alike:

  leaseflow            start -> Parallel(W no-op branches) -> join -> Complete, on a
                       fresh migrated database; the branches run as a Celery chord
                       whose (immutable) body wakes the join.
  leaseflow_nobackend  the same without a result backend (the embedded default): the
                       branch whose commit completes the group publishes the join.
  celery_chord         chord([header(i) for i in range(W)], body): no database.

Metrics per width:
  join latency   last branch commit -> join start. leaseflow: max(lf_branches.finished_at)
                 vs the join step's lf_steps.started_at (database clock). Plain chord:
                 max(header end time.time()) vs body start time.time() (host clock).
  total          fork step start -> join start (plain: first header start -> body start).
  e2e / wall     client publish -> completion seen by the benchmark (polling every
                 --poll-ms), summed over the measured runs.
  joins          join executions per fan-out (leaseflow: join steps in lf_steps per run;
                 plain: body executions per chord). Must be exactly 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

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
    rotated,
    spread,
)

HELP = "W3: leaseflow Parallel fan-out/join vs a plain Celery chord"

#: Measured runs per width (BENCHMARKS.md W3: 100 x 10, 10 x 100, 10 x 1000).
PROFILES = {"full": {10: 100, 100: 10, 1000: 10}, "quick": {10: 20, 100: 5, 1000: 2}}
SYSTEMS = ("leaseflow", "leaseflow_nobackend", "celery_chord")
BASELINE = "celery_chord"


def _widths(text: str) -> list[int]:
    try:
        widths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"widths must be integers: {text!r}") from exc
    if not widths or any(w < 1 or w > 5000 for w in widths):
        raise argparse.ArgumentTypeError("widths must be 1..5000")
    return widths


def _systems(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown systems {unknown}; choose from {SYSTEMS}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--widths", type=_widths, default=[10, 100], help="default: 10,100")
    p.add_argument("--runs", type=int, help="measured runs per width (default: the profile's)")
    p.add_argument(
        "--quick", action="store_true", help="quick profile: 20 runs at width 10, 5 at 100"
    )
    p.add_argument("--systems", type=_systems, default=list(SYSTEMS), help=",".join(SYSTEMS))
    p.add_argument("--concurrency", type=int, default=2, help="worker -c (default 2)")
    p.add_argument("--pool", default="prefork", help="worker -P (default prefork)")
    p.add_argument("--poll-ms", type=float, default=5.0, help="completion poll interval")
    p.add_argument("--redis-db", type=int, help="Redis db to use (default: a free one, 15..1)")
    p.add_argument("--loglevel", default="WARNING", help="worker -l (default WARNING)")
    p.add_argument("--budget", type=float, default=600.0, help="give up after this many s")


# -- the systems ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One measured fan-out."""

    join_ms: float | None
    total_ms: float | None
    joins: int
    ok: bool
    extra: dict[str, float | None]


class System(Protocol):
    name: str
    worker: CeleryWorker

    def launch(self, width: int) -> str: ...

    def finished(self, key: str) -> bool: ...

    def measure(self, keys: list[str], width: int) -> dict[str, Sample]: ...


class RunFailed(RuntimeError):
    pass


class LeaseflowSystem:
    """leaseflow on a fresh database, a worker subprocess, runs started by the Client."""

    def __init__(
        self, name: str, *, backend: bool, scratch: Scratch, redis: ScratchRedis, args: Any
    ) -> None:
        import psycopg

        from benchmarks import workflows
        from leaseflow.client import Client
        from leaseflow.settings import Settings

        self.name = name
        self.workflow = workflows.fan_bench
        self.db = ScratchDatabase()
        scratch.defer(f"drop database {self.db.name}", self.db.drop)
        self.db.migrate()
        queue = f"lfbench-{name}-{redis.token}"
        settings = Settings(
            database_url=self.db.sqlalchemy_url,
            broker_url=redis.url,
            result_backend=redis.url if backend else None,
            default_queue=queue,
            workflows=["benchmarks.workflows"],
        )
        env = clean_env(
            LEASEFLOW_DATABASE_URL=self.db.sqlalchemy_url,
            LEASEFLOW_BROKER_URL=redis.url,
            LEASEFLOW_DEFAULT_QUEUE=queue,
            LEASEFLOW_WORKFLOWS="benchmarks.workflows",
            **({"LEASEFLOW_RESULT_BACKEND": redis.url} if backend else {}),
        )
        self.worker = CeleryWorker(
            "leaseflow.tasks",
            name=name,
            queue=queue,
            env=env,
            log_dir=scratch.log_dir,
            pool=args.pool,
            concurrency=args.concurrency,
            loglevel=args.loglevel,
        )
        scratch.defer(f"stop worker {name}", self.worker.stop)
        self.client = Client(settings=settings)
        scratch.defer(f"close client {name}", self.client.close)
        self.conn = psycopg.connect(self.db.url, autocommit=True)
        scratch.defer(f"close connection {name}", self.conn.close)

    def launch(self, width: int) -> str:
        return self.client.start(self.workflow, {"width": width})

    def finished(self, key: str) -> bool:
        row = self.conn.execute(
            "SELECT status, error_code, error FROM lf_runs WHERE id = %s", (key,)
        ).fetchone()
        if row is None or row[0] in ("pending", "running", "waiting"):
            return False
        if row[0] != "completed":
            raise RunFailed(f"{self.name} run {key} is {row[0]}: {row[1]} {row[2]}")
        return True

    def measure(self, keys: list[str], width: int) -> dict[str, Sample]:
        rows = self.conn.execute(
            """
            SELECT r.id::text, r.status, (r.output->>'missing')::int,
                   extract(epoch FROM j.join_start - b.last_branch) * 1000,
                   extract(epoch FROM j.join_start - f.fork_start) * 1000,
                   coalesce(j.joins, 0), b.done, g.groups, f.fork_ms
              FROM lf_runs r
              LEFT JOIN LATERAL (
                   SELECT min(started_at) AS fork_start,
                          extract(epoch FROM min(finished_at) - min(started_at)) * 1000
                              AS fork_ms
                     FROM lf_steps WHERE run_id = r.id AND state = 'start') f ON true
              LEFT JOIN LATERAL (
                   SELECT min(started_at) AS join_start, count(*) AS joins
                     FROM lf_steps WHERE run_id = r.id AND state = 'join') j ON true
              LEFT JOIN LATERAL (
                   SELECT max(finished_at) AS last_branch,
                          count(*) FILTER (WHERE status = 'completed') AS done
                     FROM lf_branches WHERE run_id = r.id) b ON true
              LEFT JOIN LATERAL (
                   SELECT count(*) AS groups FROM lf_groups WHERE run_id = r.id) g ON true
             WHERE r.id = ANY(%s::uuid[])
            """,
            (keys,),
        ).fetchall()
        out = {}
        for run_id, status, missing, join_ms, total_ms, joins, done, groups, fork_ms in rows:
            ok = status == "completed" and missing == 0 and groups == 1 and done == width
            out[run_id] = Sample(
                join_ms=None if join_ms is None else float(join_ms),
                total_ms=None if total_ms is None else float(total_ms),
                joins=int(joins),
                ok=ok,
                extra={"fork_ms": None if fork_ms is None else float(fork_ms)},
            )
        return out


class PlainChordSystem:
    """A plain Celery chord (benchmarks/plain.py): no database at all."""

    def __init__(self, name: str, *, scratch: Scratch, redis: ScratchRedis, args: Any) -> None:
        from benchmarks import plain

        self.name = name
        self.plain = plain
        queue = f"lfbench-{name}-{redis.token}"
        env = clean_env(
            LFBENCH_BROKER_URL=redis.url, LFBENCH_RESULT_BACKEND=redis.url, LFBENCH_QUEUE=queue
        )
        self.worker = CeleryWorker(
            "benchmarks.plain",
            name=name,
            queue=queue,
            env=env,
            log_dir=scratch.log_dir,
            pool=args.pool,
            concurrency=args.concurrency,
            loglevel=args.loglevel,
        )
        scratch.defer(f"stop worker {name}", self.worker.stop)
        self.app = plain.make_app(redis.url, redis.url, queue)
        scratch.defer(f"close app {name}", self.app.close)
        self.redis = redis.client
        self.key = f"lfbench:{redis.token}:bodies"
        self.records: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.published: dict[str, float] = {}
        self.seq = 0

    def launch(self, width: int) -> str:
        from celery import chord

        self.seq += 1
        label = f"chord-{self.seq}"
        header = [self.app.signature(self.plain.HEADER, args=(i,)) for i in range(width)]
        body = self.app.signature(self.plain.BODY, args=(self.key, label))
        self.published[label] = time.time()
        chord(header, body, app=self.app).apply_async()
        return label

    def drain(self) -> None:
        for _ in range(10_000):
            raw = self.redis.lpop(self.key)
            if raw is None:
                return
            record = json.loads(raw)
            self.records[record["label"]].append(record)

    def finished(self, key: str) -> bool:
        self.drain()
        return key in self.records

    def measure(self, keys: list[str], width: int) -> dict[str, Sample]:
        self.drain()
        out = {}
        for label in keys:
            records = self.records.get(label, [])
            if not records:
                out[label] = Sample(None, None, 0, False, {})
                continue
            first = records[0]
            headers = first["headers"]
            start = first["start"]
            out[label] = Sample(
                join_ms=(start - max(h["t1"] for h in headers)) * 1000,
                total_ms=(start - min(h["t0"] for h in headers)) * 1000,
                joins=len(records),
                ok=sorted(h["i"] for h in headers) == list(range(width)),
                extra={"publish_to_body_ms": (start - self.published[label]) * 1000},
            )
        return out


def _make_system(name: str, scratch: Scratch, redis: ScratchRedis, args: Any) -> System:
    if name == "leaseflow":
        return LeaseflowSystem(name, backend=True, scratch=scratch, redis=redis, args=args)
    if name == "leaseflow_nobackend":
        return LeaseflowSystem(name, backend=False, scratch=scratch, redis=redis, args=args)
    return PlainChordSystem(name, scratch=scratch, redis=redis, args=args)


# -- the loop --------------------------------------------------------------------------------


def _one_run(
    system: System, width: int, *, poll: float, timeout: float, deadline: Deadline
) -> tuple[str, float]:
    """Launch one fan-out and wait for its end; ``(key, wall_ms)``."""
    t0 = time.monotonic()
    key = system.launch(width)
    limit = t0 + timeout
    next_check = t0 + 1.0
    for _ in range(int(timeout / max(poll, 0.0005)) + 10):
        if system.finished(key):
            return key, (time.monotonic() - t0) * 1000
        now = time.monotonic()
        if now > limit:
            break
        if now > next_check:
            system.worker.check()
            deadline.check()
            next_check = now + 1.0
        time.sleep(poll)
    system.worker.check()
    raise TimeoutError(f"{system.name}: fan-out {key} (width {width}) not done in {timeout}s")


def _summary(samples: list[Sample], walls: list[float]) -> dict[str, Any]:
    joins = [s.joins for s in samples]
    extra_keys = sorted({k for s in samples for k in s.extra})
    wall_s = sum(walls) / 1000
    return {
        "runs": len(samples),
        "join_ms": spread([s.join_ms for s in samples if s.join_ms is not None]),
        "total_ms": spread([s.total_ms for s in samples if s.total_ms is not None]),
        "e2e_ms": spread(walls),
        "wall_s": round(wall_s, 3),
        "fanouts_per_s": round(len(walls) / wall_s, 2) if wall_s > 0 else None,
        "joins_per_fanout": {"min": min(joins, default=0), "max": max(joins, default=0)},
        "exactly_once": bool(joins) and all(j == 1 for j in joins),
        "all_ok": bool(samples) and all(s.ok for s in samples),
        **{
            k: spread([s.extra[k] for s in samples if s.extra.get(k) is not None])
            for k in extra_keys
        },
    }


def run(args: Any) -> int:
    profile = "quick" if args.quick else "full"
    if args.runs is not None:
        profile = f"{profile}+runs={args.runs}"
    runs = {
        w: args.runs or PROFILES["quick" if args.quick else "full"].get(w, max(2, 1000 // w))
        for w in args.widths
    }
    poll = args.poll_ms / 1000
    fp = fingerprint()
    print(fingerprint_line(fp), flush=True)
    began = time.monotonic()
    deadline = Deadline(args.budget, "fanout benchmark")
    results: dict[str, Any] = {}
    with Scratch() as scratch:
        redis = scratch.redis(args.redis_db)
        log(f"Redis db {redis.db}; starting {len(args.systems)} workers")
        systems = [_make_system(name, scratch, redis, args) for name in args.systems]
        ready = False
        for width in args.widths:
            n = runs[width]
            warm = max(2, math.ceil(n * 0.05))
            timeout = 30 + 0.1 * width
            for system in systems:  # the first warm-up also waits for the worker to start
                for _ in range(warm):
                    _one_run(
                        system,
                        width,
                        poll=poll,
                        timeout=timeout if ready else timeout + 60,
                        deadline=deadline,
                    )
            ready = True
            log(f"width {width}: {n} measured runs per system ({warm} warm-up)")
            measured: dict[str, list[tuple[str, float]]] = {s.name: [] for s in systems}
            for i in range(n):
                for system in rotated(systems, i):
                    measured[system.name].append(
                        _one_run(system, width, poll=poll, timeout=timeout, deadline=deadline)
                    )
            results[str(width)] = {"runs": n, "warmup": warm, "measured": measured}
        time.sleep(1.0)  # a late duplicate join would show up now
        for width, entry in results.items():
            per_system = {}
            for system in systems:
                keys = [k for k, _ in entry["measured"][system.name]]
                walls = [w for _, w in entry["measured"][system.name]]
                samples = system.measure(keys, int(width))
                per_system[system.name] = _summary([samples[k] for k in keys], walls)
            entry["systems"] = per_system
            del entry["measured"]
        with ignoring_sigint():
            log("stopping workers, dropping databases")
    elapsed = time.monotonic() - began
    report = _report(fp, args, profile, results, elapsed)
    _print_table(report)
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return 0 if report["joins_exactly_once"] and report["all_ok"] else 1


def _report(
    fp: dict[str, Any], args: Any, profile: str, results: dict[str, Any], elapsed: float
) -> dict[str, Any]:
    ratios: dict[str, Any] = {}
    for width, entry in results.items():
        base = entry["systems"].get(BASELINE)
        if base is None:
            continue
        for name, figures in entry["systems"].items():
            if name == BASELINE:
                continue
            ratios.setdefault(width, {})[f"{name}/{BASELINE}"] = {
                "join_p50": ratio(figures["join_ms"]["p50"], base["join_ms"]["p50"]),
                "join_p95": ratio(figures["join_ms"]["p95"], base["join_ms"]["p95"]),
                "total_p50": ratio(figures["total_ms"]["p50"], base["total_ms"]["p50"]),
            }
    every = [fig for entry in results.values() for fig in entry["systems"].values()]
    leaseflow = [
        fig
        for entry in results.values()
        for name, fig in entry["systems"].items()
        if name != BASELINE
    ]
    return {
        "benchmark": "W3-fanout",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "profile": profile,
        "fingerprint": fp,
        "config": {
            "pool": args.pool,
            "concurrency": args.concurrency,
            "broker": "redis (scratch db)",
            "result_backend": "redis (except leaseflow_nobackend)",
            "closed_loop": True,
            "interleaved": True,
            "poll_ms": args.poll_ms,
            "worker_loglevel": args.loglevel,
        },
        "widths": results,
        "ratios": ratios,
        "joins_exactly_once": bool(leaseflow) and all(f["exactly_once"] for f in every),
        "all_ok": all(f["all_ok"] for f in every),
        "elapsed_s": round(elapsed, 1),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="W3 fan-out: join latency and total fan-out time (ms)")
    for column in (
        "width",
        "system",
        "runs",
        "join p50",
        "join p95",
        "join max",
        "total p50",
        "total p95",
        "e2e p50",
        "wall s",
        "joins/fan-out",
    ):
        table.add_column(column, justify="left" if column == "system" else "right")
    for width, entry in report["widths"].items():
        for name, f in entry["systems"].items():
            joins = f["joins_per_fanout"]
            table.add_row(
                width,
                name,
                str(f["runs"]),
                _fmt(f["join_ms"]["p50"]),
                _fmt(f["join_ms"]["p95"]),
                _fmt(f["join_ms"]["max"]),
                _fmt(f["total_ms"]["p50"]),
                _fmt(f["total_ms"]["p95"]),
                _fmt(f["e2e_ms"]["p50"]),
                _fmt(f["wall_s"]),
                str(joins["min"])
                if joins["min"] == joins["max"]
                else f"{joins['min']}..{joins['max']}",
            )
    console = Console(width=140)
    console.print(table)
    ratios = Table(title=f"ratios vs {BASELINE} (same run)")
    for column in ("width", "system", "join p50", "join p95", "total p50"):
        ratios.add_column(column, justify="left" if column == "system" else "right")
    for width, per in report["ratios"].items():
        for name, r in per.items():
            ratios.add_row(
                width,
                name,
                _fmt(r["join_p50"]) + "x",
                _fmt(r["join_p95"]) + "x",
                _fmt(r["total_p50"]) + "x",
            )
    console.print(ratios)
